"""The robust optimiser (autobuild.optimize): a hidden non-additive log-FID oracle, budgets, evaluation count,
confirmation, content-keyed resume."""
from __future__ import annotations

import json

import numpy as np
import pytest

from autobuild import optimize as O
from multiquant.options import Option

OPTIONS = [f"{m}-{b}" for b in (4, 3) for m in ("mse", "kmeans_all")]
PENALTY = {"mse-4": 0.10, "kmeans_all-4": 0.05, "mse-3": 0.60, "kmeans_all-3": 0.35}


def _table(layers: int = 10, seed: int = 0):
    rng = np.random.default_rng(seed)
    table = {}
    for layer in range(layers):
        out, inp = int(rng.choice([64, 128, 256])), int(rng.choice([64, 128, 256]))
        key = f"model.blocks.{layer // 2}.part{layer % 2}.linear.weight_quantizer"  # two layers per block
        table[key] = {o: [o, out * inp * 2, Option.parse(o).nbytes(out * inp, out, 16), PENALTY[o] * rng.uniform(0.8, 1.2)]
                      for o in OPTIONS}
    return table


class Oracle:
    """log FID = log 50 + sum_l s_l p(o_l) + gamma_b (damage of block b)^2 (interactions inside blocks) + noise."""

    def __init__(self, table, seed=0, noise=0.01):
        self.space = O.Space.of(table)
        rng = np.random.default_rng(seed + 1)
        self.s = rng.lognormal(-0.5, 0.8, len(self.space.layers))
        self.w = self.s[:, None] * np.array([[table[k][o][3] for o in self.space.options] for k in self.space.layers])
        self.blocks = self.space.blocks()
        self.gamma = rng.uniform(0.5, 3.0, self.blocks.max() + 1)
        self.rng, self.noise, self.calls = np.random.default_rng(seed + 2), noise, []

    def log_fid(self, choices):
        choices = np.atleast_2d(choices)
        d = self.w[np.arange(len(self.space.layers))[None, :], choices]
        out = np.log(50.0) + d.sum(axis=1)
        for b in range(self.blocks.max() + 1):
            out += self.gamma[b] * d[:, self.blocks == b].sum(axis=1) ** 2
        return out

    def measure(self, configs, kind):
        self.calls.append((kind, len(configs)))
        out = []
        for config in configs:
            choice = self.space.choice_of(config)
            fid = float(np.exp(self.log_fid(choice)[0] + self.rng.normal(0, self.noise)))
            out.append({"FID-GT-1k": fid, "avg_bits": self.space.avg_bits(choice), "config": dict(config)})
        return out

    def measure_layers(self, method):
        low = [k for k, o in enumerate(self.space.options) if o == f"{method}-3"][0]
        d = self.w[:, low]
        # the layer alone: its own term and its own square (no partner in the block)
        return {key: 50 * (np.exp(d[i] + self.gamma[self.blocks[i]] * d[i] ** 2) - 1)
                for i, key in enumerate(self.space.layers)}, 0.1 * len(self.space.layers)


def test_optimiser_stays_within_evaluations_and_beats_its_own_seeds_on_a_non_additive_oracle():
    table = _table()
    oracle = Oracle(table)
    space = oracle.space
    budgets = [3.4, 3.7]
    result = O.optimize(table, budgets, oracle.measure, oracle.measure_layers, max_evaluations=30, per_budget=2,
                        members=4, seed=0, log=None)
    assert result["evaluations"] <= 30 + 1e-9
    assert result["sweep_evaluations"] == pytest.approx(2 * 0.1 * len(space.layers))
    assert result["evaluations"] == pytest.approx(result["full_evaluations"] + result["sweep_evaluations"] +
                                                  result["confirm_evaluations"])
    assert sum(n for kind, n in oracle.calls if kind == "main") == result["full_evaluations"]
    sources = {h["source"] for h in result["history"]}
    assert {"uniform_mse-4", "knapsack_best", "knapsack_mse"} <= sources
    assert any(s.startswith(("sens", "ridge", "trees", "mutation")) for s in sources)  # surrogate rounds ran
    for budget in budgets:
        best = result["best"][f"{budget:g}"]
        choice = space.choice_of(best["config"])
        assert space.avg_bits(choice) <= budget + 1e-9
        true = float(np.exp(oracle.log_fid(choice)[0]))
        seeds = [space.choice_of(dict(zip(space.layers, h["config"]))) for h in result["history"]
                 if h["source"].startswith("knapsack") and h["avg_bits"] <= budget + 1e-9]
        uniform = [space.choice_of(dict(zip(space.layers, h["config"]))) for h in result["history"]
                   if h["source"].startswith("uniform") and h["avg_bits"] <= budget + 1e-9]
        seed_true = min(float(np.exp(oracle.log_fid(c)[0])) for c in seeds + uniform)
        assert true <= seed_true * 1.02  # noise 1%: the pick is at least as good as every seed source
        assert best["fid_confirm"] is not None


def test_optimiser_is_reproducible_and_every_budget_below_the_floor_is_refused():
    table = _table(layers=6, seed=3)
    runs = [O.optimize(table, [3.6], Oracle(table, seed=5).measure, Oracle(table, seed=5).measure_layers,
                       max_evaluations=20, members=3, seed=7, log=None) for _ in range(2)]
    assert [h["config"] for h in runs[0]["history"]] == [h["config"] for h in runs[1]["history"]]
    with pytest.raises(O.BudgetError, match="below the smallest achievable"):
        O.optimize(table, [2.0], Oracle(table).measure, None, max_evaluations=10, log=None)
    oracle = Oracle(table)
    with pytest.raises(O.BudgetError, match="cannot cover the 4 uniform anchors and 2 confirmations.*at least 6"):
        O.optimize(table, [3.6], oracle.measure, None, max_evaluations=5, log=None)  # 4 + 2 per budget needed
    assert oracle.calls == []  # refused before anything was measured

    def sweeps_of_full_images(method):  # one-layer sweeps at the full protocol's image count: 1 per layer
        raise AssertionError("refused before any sweep ran")

    sweeps_of_full_images.cost_per_method = 6.0  # 6 layers x (full images / full images), as sweep_measure sets
    with pytest.raises(O.BudgetError, match=r"one-layer sweeps \(12 evaluations.*at least 18"):
        O.optimize(table, [3.6], oracle.measure, sweeps_of_full_images, max_evaluations=17, log=None)  # 4+12+2
    assert oracle.calls == []


def test_sequential_linearisation_finds_the_optimum_of_a_pairwise_model_within_budget():
    table = _table(layers=6, seed=1)
    oracle = Oracle(table, seed=1)
    space = oracle.space
    budget = 3.6
    grid = np.array(np.meshgrid(*[range(len(space.options))] * len(space.layers))).reshape(len(space.layers), -1).T
    feasible = grid[[space.avg_bits(c) <= budget + 1e-9 for c in grid]]
    optimum = oracle.log_fid(feasible).min()
    start = space.solve(-space.error, budget)
    found = O.optimise_model(oracle.log_fid, space, budget, [start], iterations=8)
    assert space.avg_bits(found) <= budget + 1e-9
    assert oracle.log_fid(found)[0] <= optimum + 0.05  # near the brute-force optimum (log FID units)
    assert oracle.log_fid(found)[0] <= oracle.log_fid(start)[0]


class _FakeScorer:
    """``record`` in the store's schema: FID from a hash of the configuration (deterministic)."""

    def __init__(self):
        self.scored = 0

    def record(self, config, index, **extra):
        import zlib

        self.scored += 1
        fid = 10.0 + zlib.crc32(repr(sorted(config.items())).encode()) % 1000 / 10.0
        return {"config": {k: [v, 2, 1, 0.0] for k, v in config.items()}, "quantized_size": 1,
                "quantized_error": 0.0, "FID-GT-1k": fid, "avg_bits": 4.0, "bops": 0.0, "index": index,
                "timings": {}, **extra}


def test_content_measure_resumes_by_content_not_by_order(tmp_path):
    scorer = _FakeScorer()
    measure = O.ContentMeasure({"main": (scorer, {"model": "fake"})}, tmp_path, log=lambda m: None)
    a, b, c = ({"l0": "mse-3", "l1": o} for o in ("mse-3", "mse-4", "kmeans_all-3"))
    first = measure([a, b, a], "main")
    assert scorer.scored == 2 and first[0]["FID-GT-1k"] == first[2]["FID-GT-1k"]
    again = O.ContentMeasure({"main": (scorer, {"model": "fake"})}, tmp_path, log=lambda m: None)
    second = again([c, b], "main")  # another order, one new configuration
    assert scorer.scored == 3
    assert second[1]["FID-GT-1k"] == first[1]["FID-GT-1k"]


def test_cli_scores_every_configuration_with_quantized_activations_and_output_shifts(tmp_path):
    """`optimize --quant_act --act_bit 8 --output_shifts` on the tiny DiT: every record of both seeds' stores is an
    A8 score and the protocol of optimize.json says so; the settings say the trees saw the output shifts."""
    from qua2sedimo.cli import main as cli_main
    from multiquant.store import load_quant_cache

    out = tmp_path / "opt"
    assert cli_main(["optimize", "--model", "mnist_dit", "--tiny", "--device", "cpu", "--num_images", "4",
                     "--budgets", "6", "--sweep_images", "0", "--max_evaluations", "12", "--per_budget", "1",
                     "--confirm_top", "1", "--quant_act", "--act_bit", "8", "--output_shifts", "--out", str(out)]) == 0
    result = json.loads((out / "optimize.json").read_text())
    assert result["protocol"]["act_bits"] == 8 and result["evaluations"] <= 12
    assert result["settings"]["output_shifts"] is True
    for seed in ("main", "confirm"):
        records = load_quant_cache(out / "scored" / seed / "quant_cache.pkl")
        assert records and {r["act_bits"] for r in records} == {8}


def test_trees_surrogate_reads_the_summed_output_shift_by_hand():
    """With output shifts, the trees' features end with |sum of shifts| and the summed shift per channel."""
    space = O.Space(table=None, ties={}, layers=["a", "b"], options=["mse-3", "mse-4"],
                    cost=np.ones((2, 2)), error=np.full((2, 2), 0.1))
    shifted = space.with_shifts({"a": {"mse-3": [0.3, -0.1], "mse-4": [0.05, 0.0]},
                                 "b": {"mse-3": [-0.5, 0.2], "mse-4": [0.0, 0.1]}})
    assert shifted.shift.shape == (2, 2, 2) and space.shift is None
    choices = np.array([[0, 0], [1, 1]])
    space.blocks = shifted.blocks = lambda: np.array([0, 0])  # one block (blocks() reads the option table)
    plain, with_shift = O._features("trees", space, None, choices), O._features("trees", shifted, None, choices)
    assert with_shift.shape[1] == plain.shape[1] + 3
    np.testing.assert_allclose(with_shift[:, :plain.shape[1]], plain)
    np.testing.assert_allclose(with_shift[:, -2:], [[-0.2, 0.1], [0.05, 0.1]], atol=1e-12)
    np.testing.assert_allclose(with_shift[:, -3], [np.hypot(-0.2, 0.1), np.hypot(0.05, 0.1)], atol=1e-12)


def test_ridge_shift_surrogate_reads_the_quadratic_form_of_the_summed_signature_by_hand():
    """With a signature, ridge_shift's features are ridge's, then the summed coordinates z and z_i z_j: for
    rows (3, 0) and (0, 4) the squares sum to |summed change|^2 in one common unit (25 : 9 : 0 here); without a
    signature the surrogate is not a candidate."""
    space = O.Space(table=None, ties={}, layers=["a", "b"], options=["mse-3", "mse-4"],
                    cost=np.ones((2, 2)), error=np.full((2, 2), 0.1))
    signed = space.with_signature({"a": {"mse-3": [3.0, 0.0], "mse-4": [0.0, 0.0]},
                                   "b": {"mse-3": [0.0, 4.0], "mse-4": [0.0, 0.0]}})
    assert signed.shift_coords.shape == (2, 2, 2) and space.shift_coords is None
    choices = np.array([[0, 0], [0, 1], [1, 1]])
    ridge, features = O._features("ridge", space, None, choices), O._features("ridge_shift", signed, None, choices)
    assert features.shape[1] == ridge.shape[1] + 2 + 3
    np.testing.assert_allclose(features[:, :ridge.shape[1]], ridge)
    z, quad = features[:, ridge.shape[1]:ridge.shape[1] + 2], features[:, -3:]
    np.testing.assert_allclose(quad, np.stack([z[:, 0] ** 2, z[:, 0] * z[:, 1], z[:, 1] ** 2], axis=1), atol=1e-12)
    squares = quad[:, 0] + quad[:, 2]
    np.testing.assert_allclose(squares / squares[0], [1.0, 9 / 25, 0.0], atol=1e-12)
    y = np.random.default_rng(0).normal(size=12)
    many = np.random.default_rng(1).integers(0, 2, (12, 2))
    assert "ridge_shift" not in O.select_surrogate(space, None, many, y, seed=0, folds=2)[1]
    assert "ridge_shift" in O.select_surrogate(signed, None, many, y, seed=0, folds=2)[1]
