"""The bit allocator: value model, greedy vs the exact MILP optimum, budgets at the edges, file checks."""
from __future__ import annotations

import argparse
import json
import pickle

import numpy as np
import pytest

from multiquant.allocation import (BudgetError, Knapsack, bops_cost_table, build_problem, check_same_model,
                                   solve_exact, solve_greedy, value_table)
from multiquant.flops import flops_table
from multiquant.sensitivity import add_parsers


def _random_knapsack(seed: int) -> Knapsack:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(6, 14))
    bits = (4, 8, 16) if seed % 2 == 0 else (3, 4)
    s = rng.random(n) ** 2
    s[rng.random(n) < 0.2] = 0.0  # min-max normalisation gives exact zeros
    macs = np.round(np.exp(rng.normal(10, 1.5, n)))
    cost = bops_cost_table(macs, bits)
    budget = rng.uniform(cost[:, 0].sum(), cost[:, -1].sum())
    return Knapsack(tuple(f"l{i}" for i in range(n)), bits, value_table(s, bits), cost, budget)


# ------------------------------------------------------------------------------------------ value model
def test_value_model_is_zero_at_the_lowest_width_and_grows_towards_the_sensitivity():
    v = value_table([0.0, 0.5, 1.0], (4, 8, 16))
    np.testing.assert_allclose(v[:, 0], 0.0)
    np.testing.assert_allclose(v[2], [0.0, 1 - 2.0 ** -4, 1 - 2.0 ** -12])
    np.testing.assert_allclose(v[1], 0.5 * v[2])
    assert (np.diff(v, axis=1) >= 0).all()
    with pytest.raises(ValueError):
        value_table([-0.1], (3, 4))


# ------------------------------------------------------------------------------------ greedy vs exact
def test_greedy_is_feasible_and_close_to_the_milp_optimum():
    ratios = []
    for seed in range(60):
        ks = _random_knapsack(seed)
        greedy, exact = solve_greedy(ks), solve_exact(ks)
        assert greedy.cost <= ks.budget * (1 + 1e-9)
        assert exact.cost <= ks.budget * (1 + 1e-9)
        assert greedy.value <= exact.value + 1e-9  # the MILP really is the optimum
        np.testing.assert_allclose(greedy.cost, ks.cost[np.arange(len(ks.names)), greedy.choice].sum())
        ratios.append(greedy.value / exact.value if exact.value > 0 else 1.0)
    ratios = np.array(ratios)
    # Observed on these 60 instances (6-13 layers): worst 0.768, next 0.841, mean 0.989, optimal in 50 of 60.
    # (Tiny instances are the hard case: on 20-40 layers the worst of 200 was 0.90.)
    assert ratios.min() >= 0.75
    assert ratios.mean() >= 0.97
    assert (ratios > 1 - 1e-9).mean() >= 0.75


def test_greedy_takes_the_best_ratio_first_and_stops_when_nothing_fits():
    # layer a: cheap and sensitive; layer b: expensive and mildly sensitive
    ks = Knapsack(("a", "b"), (4, 8), value_table([1.0, 0.5], (4, 8)),
                  bops_cost_table([10, 100], (4, 8)), budget=bops_cost_table([10, 100], (4, 8))[:, 0].sum() + 640)
    alloc = solve_greedy(ks)
    assert [u["layer"] for u in alloc.upgrades] == ["a"]  # b's upgrade (+6400) never fits
    assert alloc.bits_of(ks) == {"a": 8, "b": 4}


def test_single_upgrade_safeguard_beats_a_crowded_out_greedy():
    # two cheap upgrades of mediocre value use the budget that one valuable upgrade needs
    value = np.array([[0, 0.3], [0, 0.3], [0, 1.0]])
    cost = np.array([[0, 1.0], [0, 1.0], [0, 2.5]])
    alloc = solve_greedy(Knapsack(("a", "b", "c"), (3, 4), value, cost, budget=2.5))
    assert alloc.choice.tolist() == [0, 0, 1] and alloc.value == pytest.approx(1.0)


# ------------------------------------------------------------------------------------- budget edges
def _sens(model="m", tiny=False, scores=(0.9, 0.1, 0.5), keys=None):
    keys = keys or [f"model.l{i}.weight_quantizer" for i in range(len(scores))]
    return {"settings": {"model": model, "tiny": tiny, "method": "mse", "bits": 4},
            "layers": [{"key": k, "sensitivity": s} for k, s in zip(keys, scores)]}


def _flops(model="m", tiny=False, n=3, tied=False):
    layers = [{"key": f"model.l{i}.weight_quantizer", "numel": 64 * 32, "channels": 64, "macs": 1000 * (i + 1),
               "tied_to": None} for i in range(n)]
    if tied:  # a copy of l0: one choice for both
        layers.append({"key": "model.copy.weight_quantizer", "numel": 64 * 32, "channels": 64, "macs": 1000,
                       "tied_to": "model.l0.weight_quantizer"})
    return {"model": model, "tiny": tiny, "fp_prec": 16, "layers": layers}


@pytest.mark.parametrize("solver", [solve_greedy, solve_exact])
def test_budget_below_the_minimum_is_a_clear_error(solver):
    for x in (0.0, 0.2):  # everything at 4 bits costs 0.25 of everything at 16
        problem = build_problem(_sens(), _flops(), (4, 8, 16), budget_multiplier=x)
        with pytest.raises(BudgetError, match="no allocation fits"):
            solver(problem.knapsack)


def test_budget_one_puts_every_layer_at_the_top_and_a_quarter_keeps_all_lowest():
    problem = build_problem(_sens(), _flops(tied=True), (4, 8, 16), budget_multiplier=1.0)
    alloc = solve_greedy(problem.knapsack)
    assert set(alloc.bits_of(problem.knapsack).values()) == {16}
    assert alloc.cost == pytest.approx(problem.reference_cost)
    low = build_problem(_sens(), _flops(), (4, 8, 16), budget_multiplier=0.25)
    assert set(solve_greedy(low.knapsack).bits_of(low.knapsack).values()) == {4}


def test_tied_copies_share_one_choice_and_pay_for_both():
    problem = build_problem(_sens(), _flops(tied=True), (4, 8), budget_multiplier=0.5)
    item = problem.items[0]
    assert item.copies == ("model.l0.weight_quantizer", "model.copy.weight_quantizer")
    assert problem.knapsack.cost[0, 0] == 2 * 1000 * 4 * 16


def test_unmeasured_layers_are_held_at_the_chosen_width():
    sens = _sens(scores=(0.9, 0.1))  # l2 has no sensitivity
    problem = build_problem(sens, _flops(), (4, 8, 16), budget_multiplier=0.6)
    assert [it.key for it in problem.fixed] == ["model.l2.weight_quantizer"]
    assert problem.fixed_cost == 3000 * 16 * 16


def test_a_sensitivity_file_of_another_model_is_refused():
    with pytest.raises(ValueError, match="'pixart_alpha'.*'sdxl'"):
        check_same_model(_sens(model="pixart_alpha"), _flops(model="sdxl"), "s.json", "f.json")
    with pytest.raises(ValueError, match="not 'dit'"):
        check_same_model(_sens(model="m"), _flops(model="m"), "s.json", "f.json", model="dit")
    with pytest.raises(ValueError, match="different architectures"):
        check_same_model(_sens(keys=["model.other.weight_quantizer"], scores=(0.5,)), _flops(), "s.json", "f.json")


# -------------------------------------------------------------------------- average-bits form, CLI
def _cli(argv):
    parser = argparse.ArgumentParser()
    add_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_budget_bits_matches_the_systems_avg_bits_and_writes_a_reference_config(tmp_path):
    from multiquant.checkpoint import MultiQuantizer
    from multiquant.config import config_record, load_config, validate_config
    from multiquant.families import get_family
    from multiquant.layers import fp_bytes

    family = get_family("mnist_dit")
    flops = flops_table("mnist_dit", tiny=True)
    keys = [r["key"] for r in flops["layers"] if not r["tied_to"]]
    sens = {"settings": {"model": "mnist_dit", "tiny": True, "method": "mse", "bits": 3},
            "layers": [{"key": k, "sensitivity": float(i) / len(keys)} for i, k in enumerate(keys)]}
    (tmp_path / "s.json").write_text(json.dumps(sens))
    (tmp_path / "f.json").write_text(json.dumps(flops))
    assert _cli(["optimize-mixed-precision", "--sensitivity_file", str(tmp_path / "s.json"), "--flops_file",
                 str(tmp_path / "f.json"), "--budget_bits", "5", "--outdir", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "quantization_config_5bits.json").read_text())
    assert report["totals"]["final_cost"] <= 5 + 1e-9 and report["totals"]["unit"] == "avg bits"
    config = load_config(tmp_path / "out" / "mnist_dit_tiny_mse_5bits.pkl")
    assert pickle.loads((tmp_path / "out" / "mnist_dit_tiny_mse_5bits.pkl").read_bytes()) == dict(config)
    assert set(config.values()) <= {"mse-3", "mse-4"}
    from multiquant.config import load_config_origin

    origin = load_config_origin(tmp_path / "out" / "mnist_dit_tiny_mse_5bits.pkl")
    assert (origin["kind"], origin["budget"], origin["solver"]) == ("greedy", 5.0, "greedy")

    model = family.build("tiny")
    mq = MultiQuantizer.build(model, family, methods=("mse",), bits=(3, 4), show_progress=False)
    config = validate_config(config, mq.layers, options=mq.options)  # tied copies agree
    record = config_record(config, mq.table, mq.fp_prec, fp_bytes(mq.layers, mq.fp_prec))
    assert record["avg_bits"] == pytest.approx(report["totals"]["final_cost"], rel=1e-12)


def test_cli_bops_form_writes_the_allocation(tmp_path):
    (tmp_path / "s.json").write_text(json.dumps(_sens()))
    (tmp_path / "f.json").write_text(json.dumps(_flops()))
    assert _cli(["optimize-mixed-precision", "--sensitivity_file", str(tmp_path / "s.json"), "--flops_file",
                 str(tmp_path / "f.json"), "--budget_multiplier", "0.5", "--outdir", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "quantization_config_0.5.json").read_text())
    assert set(report) >= {"metadata", "bit_allocation", "totals"}
    assert report["totals"]["final_cost"] <= report["totals"]["budget"] * (1 + 1e-12)
    assert report["totals"]["unit"] == "kBOPs"
    assert sum(report["totals"]["bit_distribution"].values()) == 3
    assert report["bit_allocation"]["model.l0.weight_quantizer"] >= report["bit_allocation"]["model.l1.weight_quantizer"]


def test_several_sensitivity_files_choose_the_method_per_layer_from_measurement(tmp_path):
    flops = flops_table("mnist_dit", tiny=True)
    keys = [r["key"] for r in flops["layers"] if not r["tied_to"]]
    (tmp_path / "f.json").write_text(json.dumps(flops))
    for method, even, odd in (("mse", 0.1, 10.0), ("kmeans_all", 10.0, 0.1)):  # each method hurts half the layers
        sens = {"settings": {"model": "mnist_dit", "tiny": True, "method": method, "bits": 3},
                "layers": [{"key": k, "sensitivity": 0.5, "fid_degradation": even if i % 2 == 0 else odd}
                           for i, k in enumerate(keys)]}
        (tmp_path / f"{method}.json").write_text(json.dumps(sens))
    files = [str(tmp_path / "mse.json"), str(tmp_path / "kmeans_all.json")]
    assert _cli(["optimize-mixed-precision", "--sensitivity_file", *files, "--flops_file", str(tmp_path / "f.json"),
                 "--budget_bits", "12", "--outdir", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "quantization_config_12bits_per_layer_method.json").read_text())
    methods = report["method_allocation"]
    assert all(methods[k] == ("mse" if i % 2 == 0 else "kmeans_all") for i, k in enumerate(keys))
    assert set(report["bit_allocation"].values()) == {4}  # a generous budget: every layer at its best option
    assert report["quantization_config"][keys[0]] == {"method": "mse", "weight_bits": 4, "act_bits": 8}
    assert report["totals"]["final_cost"] <= 12 + 1e-9
    # told otherwise: --method picks that file and that method everywhere
    assert _cli(["optimize-mixed-precision", "--sensitivity_file", *files, "--flops_file", str(tmp_path / "f.json"),
                 "--budget_bits", "12", "--method", "kmeans_all", "--outdir", str(tmp_path / "one")]) == 0
    one = json.loads((tmp_path / "one" / "quantization_config_12bits.json").read_text())
    assert one["metadata"]["method"] == "kmeans_all"


def test_no_save_and_quiet(tmp_path, capsys):
    (tmp_path / "s.json").write_text(json.dumps(_sens()))
    (tmp_path / "f.json").write_text(json.dumps(_flops()))
    base = ["optimize-mixed-precision", "--sensitivity_file", str(tmp_path / "s.json"), "--flops_file",
            str(tmp_path / "f.json"), "--budget_multiplier", "0.5"]
    assert _cli(base + ["--outdir", str(tmp_path / "a"), "--quiet"]) == 0
    assert (tmp_path / "a" / "quantization_config_0.5.json").is_file()
    assert "budget" not in capsys.readouterr().out
    assert _cli(base + ["--outdir", str(tmp_path / "b"), "--no_save"]) == 0
    assert "utilisation" in capsys.readouterr().out and not (tmp_path / "b").exists()
