"""The one knapsack solver: exact MILP against brute force, greedy on unordered choices, budget errors."""
import itertools

import numpy as np
import pytest

from multiquant.knapsack import BudgetError, solve_exact, solve_greedy


def _instance(seed: int):
    rng = np.random.default_rng(seed)
    groups = int(rng.integers(2, 6))
    sizes = rng.integers(1, 5, groups)
    costs = [rng.integers(1, 50, k).astype(float) for k in sizes]  # choices in no particular order
    values = [rng.normal(0, 1, k) for k in sizes]
    low, high = sum(c.min() for c in costs), sum(c.max() for c in costs)
    return values, costs, float(rng.uniform(low, high))


def _brute(values, costs, capacity):
    best = -np.inf
    for pick in itertools.product(*[range(len(v)) for v in values]):
        if sum(c[i] for c, i in zip(costs, pick)) <= capacity + 1e-9:
            best = max(best, sum(v[i] for v, i in zip(values, pick)))
    return best


@pytest.mark.parametrize("seed", range(25))
def test_exact_is_the_brute_force_optimum_and_greedy_is_feasible_below_it(seed):
    values, costs, capacity = _instance(seed)
    exact, greedy = solve_exact(values, costs, capacity), solve_greedy(values, costs, capacity)
    np.testing.assert_allclose(exact.value, _brute(values, costs, capacity), atol=1e-9)
    assert exact.cost <= capacity + 1e-9 and greedy.cost <= capacity + 1e-9
    assert greedy.value <= exact.value + 1e-9
    np.testing.assert_allclose(greedy.value, sum(v[i] for v, i in zip(values, greedy.choice)))


def test_greedy_follows_the_ratio_order_and_the_safeguard_wins_when_cheap_upgrades_crowd_out():
    # the cheapest choice of group 0 is its second one (choices need not be ordered by cost)
    values = [np.array([1.0, 0.0]), np.array([0.0, 0.3]), np.array([0.0, 0.3]), np.array([0.0, 5.0])]
    costs = [np.array([4.0, 0.0]), np.array([0.0, 1.0]), np.array([0.0, 1.0]), np.array([0.0, 10.0])]
    result = solve_greedy(values, costs, capacity=11.0)
    # ratios: group 3 0.5, groups 1/2 0.3, group 0 0.25: take 3 (10), then 1 (1), then nothing fits
    assert [t["group"] for t in result.trail] == [3, 1]
    assert result.choice == [1, 1, 0, 1] and result.cost == 11.0
    np.testing.assert_allclose(result.value, 5.3)
    tight = solve_greedy([np.array([0.0, 0.6]), np.array([0.0, 0.6]), np.array([0.0, 5.0])],
                         [np.array([0.0, 1.0]), np.array([0.0, 1.0]), np.array([0.0, 10.0])], capacity=10.0)
    assert tight.choice == [0, 0, 1] and "safeguard" in tight.status  # ratios 0.6 > 0.5, but 5.0 alone wins


def test_budget_below_the_cheapest_allocation_is_a_user_error():
    with pytest.raises(BudgetError, match="below the cheapest allocation"):
        solve_exact([np.array([1.0, 2.0])], [np.array([3.0, 4.0])], 2.0)
    with pytest.raises(BudgetError):
        solve_greedy([np.array([1.0])], [np.array([3.0])], float("nan"))
