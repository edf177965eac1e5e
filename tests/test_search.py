"""The measured budgeted search (autobuild.search): a hidden additive log-FID oracle, budgets, seeds, resume."""
from __future__ import annotations

import json
import zlib

import numpy as np
import pytest
import torch

from autobuild import search as S
from autobuild.configs import Knapsack, solve_knapsack
from multiquant.config import config_record
from multiquant.options import Option, OptionTable

torch.set_num_threads(1)
METHODS = ("mse", "kmeans", "kmeans_all")
OPTIONS = [f"{m}-{b}" for b in (4, 3) for m in METHODS]
PENALTY = {"mse-4": 0.10, "kmeans-4": 0.03, "kmeans_all-4": 0.06, "mse-3": 0.60, "kmeans-3": 0.25,
           "kmeans_all-3": 0.40}
BUDGETS = [3.4, 3.6, 3.8]
BASE = np.log(50.0)


# ------------------------------------------------------------------------------------------ fixtures
def _table(seed: int = 0, layers: int = 12):
    """12 layers x 6 options, sizes by the reference formulas, and the oracle's true log-FID coefficients
    (a per-layer sensitivity times a per-option penalty, jittered so that it is not a product model)."""
    rng = np.random.default_rng(seed)
    table, coef = {}, {}
    for layer in range(layers):
        out, inp = int(rng.choice([64, 128, 192, 256, 384])), int(rng.choice([64, 128, 192, 256, 768]))
        key = f"model.blocks.{layer}.linear.weight_quantizer"
        sensitivity = rng.lognormal(-1.5, 1.0)
        table[key] = {}
        for option in OPTIONS:
            method, bits = option.rsplit("-", 1)
            table[key][option] = [option, out * inp * 2, Option(method, int(bits)).nbytes(out * inp, out, 16),
                                  PENALTY[option]]
            coef[(key, option)] = sensitivity * PENALTY[option] * rng.uniform(0.7, 1.3)
    return OptionTable(table, 16), coef


class Oracle:
    """Measured FID = exp(true additive log FID + noise); the noise is a function of the configuration (like a
    re-run of the real scorer with fixed seeds), so re-measuring gives the same value."""

    def __init__(self, table: OptionTable, coef: dict, noise: float = 0.01):
        self.table, self.coef, self.noise, self.calls = table, coef, noise, 0

    def truth(self, item) -> float:
        config = S._plain(item)
        return BASE + sum(self.coef[(k, S._option(config[k]))] for k in self.table.keys if (k, S._option(config[k]))
                          in self.coef)

    def record(self, config: dict, **extra) -> dict:
        self.calls += 1
        rec = config_record(dict(config), self.table.table, 16, self.table.fp_bytes)
        seed = zlib.crc32("|".join(S._option(config[k]) for k in self.table.keys).encode())
        noise = np.random.default_rng(seed).normal(0.0, self.noise)
        rec.update({"FID-GT-1k": float(np.exp(self.truth(config) + noise)), "bops": 0.0, "timings": {},
                    **extra})
        return rec

    def __call__(self, configs: list[dict]) -> list[dict]:  # the `measure` of search()
        return [self.record(c) for c in configs]


def _random_configs(table: OptionTable, n: int, seed: int) -> list[dict]:
    """The dataset's sampler: per configuration p ~ U(0, 1), each layer 3-bit with probability p, method uniform."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        p = rng.uniform()
        out.append({k: f"{METHODS[rng.integers(3)]}-{3 if rng.random() < p else 4}" for k in table.keys})
    return out


def _optimum(table: OptionTable, coef: dict, budget: float) -> float:
    """True optimum of the oracle at the budget (exact knapsack on the true coefficients)."""
    costs = [np.array([table.quant_bytes(k, o) for o in OPTIONS]) for k in table.keys]
    values = [np.array([-coef[(k, o)] for o in OPTIONS]) for k in table.keys]
    return BASE - solve_knapsack(Knapsack(costs, values, table.fp_bytes, 16), budget).score


def _proposals(result) -> list:
    return [(e["budget"], e["kind"], e["thompson_seed"], tuple(e["config"])) for r in result["rounds"]
            for e in r["proposals"]]


# ------------------------------------------------------------------------------------------ features
def test_design_and_encoding():
    table, _ = _table()
    columns = S.option_design(table)
    assert len(columns) == 12 * 6 and columns[0] == (table.keys[0], OPTIONS[0])
    configs = _random_configs(table, 5, 1)
    records = Oracle(table, _table()[1])(configs)
    x = S.encode(configs, columns)
    assert np.array_equal(x, S.encode(records, columns))  # record form == plain form
    assert np.all(x.sum(axis=1) == 12) and set(np.unique(x)) == {0.0, 1.0}
    j = columns.index((table.keys[3], configs[2][table.keys[3]]))
    assert x[2, j] == 1
    with pytest.raises(ValueError, match="not an option of the table"):
        S.encode([dict(configs[0], **{table.keys[0]: "mse-2"})], columns)
    tied = S.option_design(table, ties={table.keys[1]: table.keys[0]})
    assert len(tied) == 11 * 6 and all(k != table.keys[1] for k, _ in tied)


def test_log_target_needs_positive_values():
    table, coef = _table()
    records = Oracle(table, coef)(_random_configs(table, 6, 0))
    records[3]["FID-GT-1k"] = 0.0
    with pytest.raises(ValueError, match="finite positive 'FID-GT-1k'"):
        S.search(records, table, [3.6], Oracle(table, coef), rounds=1, log=None)


# ------------------------------------------------------------------------------------------ the search
@pytest.fixture(scope="module")
def searched():
    table, coef = _table(0)
    oracle = Oracle(table, coef)
    initial = oracle(_random_configs(table, 30, 2))
    result = S.search(initial, table, BUDGETS, oracle, rounds=6, per_budget=3, seed=0, log=None)
    return table, coef, oracle, initial, result


def test_search_reaches_the_true_knapsack_optimum(searched):
    table, coef, oracle, initial, result = searched
    assert result["settings"]["n_search"] == oracle.calls - len(initial) > 0
    for budget in BUDGETS:
        best = result["best"][f"{budget:g}"]
        optimum = _optimum(table, coef, budget)
        found = oracle.truth(best["config"])
        start = min(oracle.truth(r) for r in initial if r["avg_bits"] <= budget)
        assert best["source"] == "search" and best["avg_bits"] <= budget
        assert optimum - 1e-9 <= found <= optimum + 0.05, (budget, found, optimum)  # within 5% of the best FID
        assert found < start - 0.1, (budget, found, start)  # far better than the best random configuration


def test_every_proposal_meets_its_budget(searched):
    table, _, _, _, result = searched
    entries = [e for r in result["rounds"] for e in r["proposals"]]
    assert len(entries) == result["settings"]["n_search"] and {e["kind"] for e in entries} == {"mean", "thompson"}
    for e in entries:
        config = dict(zip(result["keys"], e["config"]))
        assert e["avg_bits"] <= e["budget"] and table.avg_bits(config) == pytest.approx(e["avg_bits"])
        assert e["predicted_fid"] > 0 and (e["thompson_seed"] is None) == (e["kind"] == "mean")
    assert len({tuple(e["config"]) for e in entries}) == len(entries)  # nothing measured twice


def test_seeded_and_reproducible():
    table, coef = _table(1)
    initial = Oracle(table, coef)(_random_configs(table, 30, 3))

    def run(seed):
        return S.search(initial, table, BUDGETS, Oracle(table, coef), rounds=2, per_budget=3, seed=seed, log=None)

    first, again, other = run(0), run(0), run(1)
    assert _proposals(first) == _proposals(again) and first["best"] == again["best"]
    assert _proposals(first) != _proposals(other)
    assert json.loads(json.dumps(first)) == first  # the result is plain JSON


def test_tied_copies_follow_their_layer_and_are_costed():
    table, coef = _table(2, layers=8)
    copy, canonical = table.keys[5], table.keys[0]  # treat layer 5 as a tied copy of layer 0
    oracle = Oracle(table, coef)
    initial = oracle([dict(c, **{copy: c[canonical]}) for c in _random_configs(table, 20, 4)])
    result = S.search(initial, table, [3.6], oracle, rounds=2, per_budget=2, ties={copy: canonical}, log=None)
    entries = [dict(zip(result["keys"], e["config"])) for r in result["rounds"] for e in r["proposals"]]
    assert entries and all(c[copy] == c[canonical] for c in entries)
    assert all(table.avg_bits(c) <= 3.6 for c in entries)  # the copy's bytes were counted


# ------------------------------------------------------------------------------------------ resume
def test_resume_through_the_record_store(tmp_path):
    """2 rounds, then 4 rounds over the same store == a fresh 4-round run; the resumed run scores only rounds
    3-4 (the real RecordStore and score_into_store, with the oracle as the scorer)."""
    from multiquant.store import RecordStore

    table, coef = _table(3)
    initial = Oracle(table, coef)(_random_configs(table, 30, 5))
    meta = {"kind": "search", "seed": 0}

    def run(directory, rounds):
        oracle = Oracle(table, coef)
        measure = S.StoreMeasure(RecordStore(directory, meta), oracle, log=lambda msg: None)
        result = S.search(initial, table, BUDGETS, measure, rounds=rounds, per_budget=2, seed=0, log=None)
        return result, oracle.calls, RecordStore(directory, meta).records()

    short, short_calls, _ = run(tmp_path / "a", 2)
    resumed, resumed_calls, resumed_records = run(tmp_path / "a", 4)
    fresh, fresh_calls, fresh_records = run(tmp_path / "b", 4)
    assert short_calls + resumed_calls == fresh_calls == len(fresh_records) and resumed_calls > 0
    assert _proposals(resumed) == _proposals(fresh) and _proposals(resumed)[:short_calls] == _proposals(short)

    def strip(records):
        return [({k: v[0] for k, v in r["config"].items()}, r["FID-GT-1k"], r["index"]) for r in records]

    assert strip(resumed_records) == strip(fresh_records)
    assert resumed["best"] == fresh["best"]


def test_a_store_of_another_search_is_refused(tmp_path):
    from multiquant.store import RecordStore, StoreError

    table, coef = _table(3)
    initial = Oracle(table, coef)(_random_configs(table, 30, 5))
    store = RecordStore(tmp_path, {"kind": "search"})
    S.search(initial, table, [3.6], S.StoreMeasure(store, Oracle(table, coef), log=lambda m: None), rounds=1,
             per_budget=2, seed=0, log=None)
    with pytest.raises(StoreError, match="not the one the search proposes"):  # same directory, other seed
        S.search(initial, table, [3.6], S.StoreMeasure(store, Oracle(table, coef), log=lambda m: None), rounds=1,
                 per_budget=2, seed=5, log=None)


# ------------------------------------------------------------------------------------------ CLI
def test_cli_on_the_tiny_model(tmp_path, capsys):
    """`qua2sedimo search` end to end on the tiny MNIST DiT (random starting data, few images); a re-run
    resumes without scoring anything."""
    from qua2sedimo.cli import main as cli_main
    from multiquant.config import load_config

    out = tmp_path / "search"
    argv = ["search", "--model", "mnist_dit", "--tiny", "--device", "cpu", "--num_random", "6", "--num_images", "6",
            "--budgets", "4.6,6", "--rounds", "2", "--per_budget", "1", "--out", str(out)]
    assert cli_main(argv) == 0
    result = json.loads((out / "search.json").read_text())
    assert result["scored_this_run"] == result["settings"]["n_search"] > 0 and result["protocol"]["num_images"] == 6
    for budget in ("4.6", "6"):
        best = result["best"][budget]
        assert best["avg_bits"] <= float(budget)
        assert dict(load_config(best["config_path"])) == best["config"]
        from multiquant.config import load_config_origin

        origin = load_config_origin(best["config_path"])
        assert (origin["kind"], origin["budget"], origin["fid"]) == ("search", float(budget), best["fid"])
    assert (out / "configs" / "mnist_dit_46_search.json").exists()
    assert cli_main(argv) == 0
    again = json.loads((out / "search.json").read_text())
    assert again["scored_this_run"] == 0 and again["rounds"] == result["rounds"]
    assert cli_main([*argv[:-2], "--seed", "3", "--out", str(out)]) == 2  # another search in the same directory
    assert "different settings (seed)" in capsys.readouterr().err


def test_cli_scores_with_quantized_activations_and_refuses_a_dataset_of_other_activation_bits(tmp_path, capsys):
    """`search --quant_act --act_bit 8`: its own random start and every proposal are scored at A8 (the records
    and the protocol say so); started from that dataset without --quant_act, it refuses in one line."""
    from qua2sedimo.cli import main as cli_main
    from multiquant.store import load_quant_cache

    out = tmp_path / "a8"
    argv = ["search", "--model", "mnist_dit", "--tiny", "--device", "cpu", "--num_images", "4", "--budgets", "6",
            "--rounds", "1", "--per_budget", "1"]
    assert cli_main([*argv, "--num_random", "4", "--quant_act", "--act_bit", "8", "--out", str(out)]) == 0
    result = json.loads((out / "search.json").read_text())
    assert result["protocol"]["act_bits"] == 8
    start = load_quant_cache(out / "random" / "quant_cache.pkl")
    assert len(start) == 4 and {r["act_bits"] for r in start} == {8}
    capsys.readouterr()
    fp_out = tmp_path / "a16"
    assert cli_main([*argv, "--cache", str(out / "random" / "quant_cache.pkl"), "--mq",
                     str(out / "mnist_dit_tiny_mq.safetensors"), "--out", str(fp_out)]) == 2
    err = capsys.readouterr().err
    assert "activations at A8, this search at A16" in err and "Traceback" not in err
