"""The one multiple-choice knapsack solver: pick one choice per group, total cost <= capacity, maximum value.

Serves the bit allocator (:mod:`multiquant.allocation`), ``build-config`` (:mod:`autobuild.configs`) and the
searches (:mod:`autobuild.search`, :mod:`autobuild.optimize`). Groups are ragged: group ``g`` has
``len(values[g])`` choices with ``values[g][c]`` and ``costs[g][c]``.

* :func:`solve_exact`: the optimum as a 0/1 MILP (scipy's HiGHS, relative gap 0), after dropping dominated
  choices (another choice of the group costs no more and is worth at least as much), which cannot change the
  optimum. The cost row is scaled by the capacity so HiGHS's tolerances are relative; a solution that a
  tolerance let over the capacity is re-solved with a tighter row.
* :func:`solve_greedy`: bang for buck. Every group starts at its cheapest choice; repeatedly the fitting
  switch with the largest value gained per cost added is taken (a switch that adds no cost and gains is
  taken first; ties go to the larger gain, then the earlier group and choice); it stops when none fits.
  The single-upgrade safeguard then keeps the better of that and "one group upgraded alone" (a few cheap
  upgrades can crowd out one valuable one; the safeguard bounds the worst case). Two switches serve the seed
  allocator as its document describes it (:mod:`multiquant.allocation`, ``--allocator documented``):
  ``one_step`` climbs each group's choices in the order given, one at a time (from its first choice), and
  ``spend`` also takes switches that add cost and gain nothing, once nothing that gains fits (efficiency 0 is
  the last to be taken, not never).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from .errors import UserError

__all__ = ["BudgetError", "Solution", "solve_exact", "solve_greedy", "pareto_prune"]


class BudgetError(UserError, ValueError):
    """The budget cannot be met (below the cheapest allocation) or is malformed."""


@dataclass
class Solution:
    """``choice[g]`` indexes group g's choices; ``trail``: the greedy switches in order (empty for exact)."""

    choice: list[int]
    value: float
    cost: float
    status: str
    trail: list[dict] = field(default_factory=list)


def _as_groups(values: Sequence, costs: Sequence) -> tuple[list[np.ndarray], list[np.ndarray]]:
    values = [np.asarray(v, dtype=np.float64).ravel() for v in values]
    costs = [np.asarray(c, dtype=np.float64).ravel() for c in costs]
    if len(values) != len(costs) or any(len(v) != len(c) or len(v) == 0 for v, c in zip(values, costs)):
        raise ValueError("values and costs must list the same non-empty groups with the same number of choices")
    if not all(np.isfinite(v).all() and np.isfinite(c).all() for v, c in zip(values, costs)):
        raise ValueError("values and costs must be finite")
    return values, costs


def _tolerance(capacity: float) -> float:
    # costs are integers up to ~1e15: a relative slack absorbs float rounding of the capacity
    return 1e-9 * max(abs(capacity), 1.0)


def _check_capacity(capacity: float, floor: float) -> None:
    if not (math.isfinite(capacity) and capacity >= 0):
        raise BudgetError(f"budget must be a finite, non-negative number, got {capacity}")
    if floor > capacity + _tolerance(capacity):
        raise BudgetError(f"budget {capacity:.6g} is below the cheapest allocation {floor:.6g}: no allocation "
                          f"fits. Fix: raise the budget to at least {floor:.6g} (or offer cheaper choices)")


def _solution(values, costs, choice, status, trail=None) -> Solution:
    choice = [int(c) for c in choice]
    return Solution(choice, float(sum(v[c] for v, c in zip(values, choice))),
                    float(sum(c_[c] for c_, c in zip(costs, choice))), status, list(trail or []))


def pareto_prune(costs: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Rows of the non-dominated choices (no other row is at most as costly and worth at least as much;
    of exact duplicates the first is kept), ordered by increasing cost."""
    costs, values = np.asarray(costs), np.asarray(values)
    order = np.lexsort((-values, costs))  # by cost, then best value first
    keep, best = [], -np.inf
    for row in order:
        if values[row] > best:
            keep.append(row)
            best = values[row]
    return np.asarray(keep, dtype=np.int64)


def solve_exact(values: Sequence, costs: Sequence, capacity: float, time_limit: float | None = None) -> Solution:
    """The optimum (see the module doc). Raises :class:`BudgetError` below the cheapest allocation."""
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import csr_matrix

    values, costs = _as_groups(values, costs)
    _check_capacity(capacity, float(sum(c.min() for c in costs)))
    best_each = [int(np.flatnonzero(v == v.max())[np.argmin(c[v == v.max()])]) for v, c in zip(values, costs)]
    if sum(c[i] for c, i in zip(costs, best_each)) <= capacity + _tolerance(capacity):
        return _solution(values, costs, best_each, "unconstrained optimum")  # the budget does not bind
    kept = [pareto_prune(c, v) for c, v in zip(costs, values)]
    sizes = [len(k) for k in kept]
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    cost = np.concatenate([costs[g][k] for g, k in enumerate(kept)])
    value = np.concatenate([values[g][k] for g, k in enumerate(kept)])
    n, groups = int(offsets[-1]), len(kept)
    one_each = csr_matrix((np.ones(n), (np.repeat(np.arange(groups), sizes), np.arange(n))), shape=(groups, n))
    scale = max(float(capacity), 1e-12)
    row = csr_matrix(cost[None, :] / scale)
    options = {"mip_rel_gap": 0.0, "presolve": True}
    if time_limit:
        options["time_limit"] = float(time_limit)
    limit = 1.0 + _tolerance(capacity) / scale
    for _ in range(5):  # re-solve with a tighter row if HiGHS's feasibility tolerance let a unit through
        result = milp(-value, constraints=[LinearConstraint(one_each, 1, 1), LinearConstraint(row, -np.inf, limit)],
                      integrality=np.ones(n), bounds=Bounds(0, 1), options=options)
        if result.x is None:
            raise RuntimeError(f"the exact knapsack solver found no allocation ({result.message}); try the greedy one")
        picks = [int(kept[g][int(np.argmax(result.x[offsets[g]:offsets[g + 1]]))]) for g in range(groups)]
        solution = _solution(values, costs, picks, "exact" if result.status == 0 else f"exact ({result.message})")
        if solution.cost <= capacity + _tolerance(capacity):
            return solution
        limit -= 2 * (solution.cost - capacity) / scale
    raise RuntimeError(f"could not meet the budget {capacity:.6g} exactly (solver tolerance); raise it slightly")


def solve_greedy(values: Sequence, costs: Sequence, capacity: float, names: Sequence[str] | None = None,
                 safeguard: bool = True, one_step: bool = False, spend: bool = False) -> Solution:
    """Bang for buck from the cheapest choice of every group, plus the single-upgrade safeguard (module doc).
    ``one_step``: start every group at its first choice and only switch to the next one; ``spend``: switches
    that add cost without gaining are taken too (last). ``trail`` entries: ``group`` (name or index),
    ``from``/``to`` (choice indices), ``value_gain``, ``cost_added``, ``ratio`` (None for a free switch)."""
    values, costs = _as_groups(values, costs)
    names = list(names) if names is not None else list(range(len(values)))
    if one_step:
        start = [0] * len(values)
    else:
        start = [int(np.lexsort((-v, c))[0]) for v, c in zip(values, costs)]  # cheapest, best value on ties
    _check_capacity(capacity, float(sum(c[i] for c, i in zip(costs, start))))
    tol = _tolerance(capacity)
    width = max(len(v) for v in values)
    pad = lambda arrays, fill: np.stack([np.pad(a, (0, width - len(a)), constant_values=fill) for a in arrays])  # noqa: E731
    value, cost = pad(values, -np.inf), pad(costs, np.inf)
    choice = np.array(start, dtype=np.int64)
    rows = np.arange(len(values))
    spent = float(cost[rows, choice].sum())
    trail = []
    while True:
        gain = value - value[rows, choice][:, None]
        added = cost - cost[rows, choice][:, None]
        worth = (gain > 0) | ((gain >= 0) & (added > 0)) if spend else gain > 0
        fits = np.isfinite(added) & (added <= capacity - spent + tol) & worth
        if one_step:
            fits &= np.arange(width)[None, :] == choice[:, None] + 1
        if not fits.any():
            break
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(added > 0, gain / np.where(added > 0, added, 1.0), np.inf)
        ratio = np.where(fits, ratio, -np.inf)
        tied = ratio == ratio.max()
        best_gain = np.where(tied, gain, -np.inf).max()
        group, to = divmod(int(np.flatnonzero((tied & (gain == best_gain)).ravel())[0]), width)
        trail.append({"group": names[group], "from": int(choice[group]), "to": int(to),
                      "value_gain": float(gain[group, to]), "cost_added": float(added[group, to]),
                      "ratio": float(ratio[group, to]) if math.isfinite(ratio[group, to]) else None})
        spent += float(added[group, to])
        choice[group] = to
    greedy = _solution(values, costs, choice, "greedy", trail)
    if safeguard:
        single = _best_single_upgrade(values, costs, value, cost, start, capacity, names)
        if single is not None and single.value > greedy.value + 1e-12:
            return single
    return greedy


def _best_single_upgrade(values, costs, value, cost, start, capacity, names) -> Solution | None:
    """Every group at its start except one, switched to its best choice that fits alone."""
    rows = np.arange(len(values))
    base = float(cost[rows, start].sum())
    gain = value - value[rows, start][:, None]
    added = cost - cost[rows, start][:, None]
    gain = np.where(np.isfinite(added) & (added <= capacity - base + _tolerance(capacity)), gain, -np.inf)
    group, to = divmod(int(np.argmax(gain)), value.shape[1])
    if not (np.isfinite(gain[group, to]) and gain[group, to] > 0):
        return None
    choice = list(start)
    choice[group] = to
    trail = [{"group": names[group], "from": int(start[group]), "to": int(to), "value_gain": float(gain[group, to]),
              "cost_added": float(added[group, to]),
              "ratio": float(gain[group, to] / added[group, to]) if added[group, to] > 0 else None,
              "note": "best single upgrade beat the greedy sequence"}]
    return _solution(values, costs, choice, "greedy (single-upgrade safeguard)", trail)
