"""benchmarks/export.py's small-M bookkeeping: which layer calls of a forward take the fused kernel (census), and
the crossover read off the micro-benchmark's cases. The timings themselves need a GPU (not tested here)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from test_kernels import random_part

from multiquant.packed import packed_layer
from benchmark_script import load_benchmark
from multiquant.errors import UserError



def _bench():
    return load_benchmark("export")


class TwoInputs(nn.Module):
    """A text-conditioned toy: K/V over the tokens (M = batch x tokens), a query layer over the pixels, a split
    layer (two slices: never the fused kernel) on the pooled text."""

    def __init__(self):
        super().__init__()
        self.kv = packed_layer(nn.Linear(6, 4), [random_part("mse-3", (4, 6), seed=1)])
        self.q = packed_layer(nn.Linear(6, 4), [random_part("kmeans-4", (4, 6), seed=2)])
        self.split = packed_layer(nn.Linear(6, 4), [random_part("mse-4", (4, 3), seed=3),
                                                    random_part("fp16", (4, 3), seed=4)])

    def forward(self, hidden_states, encoder_hidden_states):
        return self.q(hidden_states).sum() + self.kv(encoder_hidden_states).sum() + self.split(
            encoder_hidden_states.mean(1)).sum()


def test_census_counts_the_calls_under_the_threshold_and_their_weights():
    bench = _bench()
    model = TwoInputs()
    inputs = {"hidden_states": torch.randn(2, 50, 6), "encoder_hidden_states": torch.randn(2, 7, 6)}
    census = bench.small_m_census(model, inputs, max_rows=14)
    assert census["calls"] == 1 and census["rows"] == {"14": 1}  # kv at 2 x 7 rows; q has 100; split: two slices
    assert census["packed_linear_calls"] == 3 and census["weights"] == 24 and census["packed_linear_weights"] == 72
    assert abs(census["weights_fraction"] - 1 / 3) < 1e-12
    assert bench.small_m_census(model, inputs, max_rows=100)["calls"] == 2
    assert bench.small_m_census(model, inputs, max_rows=0)["calls"] == 0


def test_crossover_is_the_largest_row_count_up_to_which_the_fused_kernel_always_paid():
    bench = _bench()

    def case(shape, option, rows, ratio):
        return {"shape": shape, "option": option, "rows": rows, "fused_graph_vs_decode_cublas": ratio}

    cases = [case("kv", "mse-4", 240, 0.9), case("kv", "mse-4", 2, 0.5), case("kv", "mse-4", 512, 1.2),
             case("kv", "mse-4", 2048, 0.99),  # paying again after a loss does not extend the crossover
             case("kv", "kmeans-3", 2, 1.1), case("kv", "kmeans-3", 16, 0.8),  # loses at the smallest M: 0
             case("adaln", "mse-4", 2, 0.7), case("adaln", "mse-4", 16, 1.0)]
    assert bench._crossover(cases, "graph") == {"kv": {"mse-4": 240, "kmeans-3": 0}, "adaln": {"mse-4": 16}}
    assert bench._crossover([{"shape": "kv", "option": "mse-4", "rows": 2, "fused_error": "x"}], "graph") == {
        "kv": {"mse-4": 0}}  # a failed fused kernel never pays


def test_census_of_the_measured_setting_on_cpu_takes_no_fused_calls():
    """CPU inputs never run the kernels: nothing is timed, every call decodes (the measured dispatch is GPU-only)."""
    from multiquant import kernels

    census = _bench().small_m_census(TwoInputs(), {"hidden_states": torch.randn(2, 5, 6),
                                                   "encoder_hidden_states": torch.randn(2, 7, 6)}, kernels.MEASURED)
    assert census["calls"] == 0 and census["packed_linear_calls"] == 3


def test_shapes_for_a_subset_of_models_and_shapes():
    bench = _bench()

    def shapes(text, model="dit"):
        return bench._shapes_for(bench.parse_args(["--shapes", text]), model, tiny=False)

    assert shapes("b2_512") == [(2, 512)] == shapes("2x512") and shapes("b2_512", "pixart_alpha") == [(2, 512)]
    assert shapes("b2_512,b16_1024") == [(2, 512), (16, 1024)] and shapes("b4") == [(4, None)]
    assert shapes("pixart_alpha:2x1024;dit:16x512") == [(16, 512)]
    assert shapes("pixart_alpha:2x1024") == []  # no shapes named for this model: it is skipped
    assert shapes("pixart_alpha:2x1024", "pixart_alpha") == [(2, 1024)]
    for bad in ("b_512", "twoxfive", "2x5x6"):
        with pytest.raises(UserError, match="--shapes"):
            shapes(bad)


def test_side_by_side_paths_measure_each_small_m_setting_once():
    from multiquant import kernels

    bench = _bench()

    def paths(*argv):
        return {name: setting for name, (fast, setting) in bench.bench_paths(bench.parse_args(list(argv))).items()}

    measured = kernels.MEASURED
    assert paths("--small_m_max", "measured") == {"fast": measured, "fast_no_small_m": 0, "eager": 0}
    assert paths("--small_m_max", "0") == {"fast": 0, "fast_small_m_measured": measured, "eager": 0}
    assert paths("--small_m_max", "measured", "--small_m_compare", "64") == {
        "fast": measured, "fast_no_small_m": 0, "fast_small_m": 64, "eager": 0}
    assert paths("--small_m_max", "256", "--no_small_m_compare") == {"fast": 256, "eager": 0}
    chosen = bench.bench_paths(bench.parse_args(["--small_m_max", "0"]))
    assert bench._path_with(chosen, measured) == "fast_small_m_measured" and bench._path_with(chosen, 0) == "fast"
    # the per-weight decode kernel beside the default, at the default's setting; never the small-M comparison's
    assert paths("--small_m_max", "measured", "--decode_compare") == {
        "fast": measured, "fast_no_small_m": 0, "fast_per_weight_decode": measured, "eager": 0}
    chosen = bench.bench_paths(bench.parse_args(["--small_m_max", "0", "--no_small_m_compare", "--decode_compare",
                                                 "--decode_ahead_compare", "--batched_decode_compare",
                                                 "--batched_ahead_compare"]))
    assert list(chosen) == ["fast", "fast_per_weight_decode", "fast_decode_ahead", "fast_batched_decode",
                            "fast_batched_ahead", "eager"]
    assert bench._path_with(chosen, measured) is None and bench._path_with(chosen, 0) == "fast"


def _row(model, batch, resolution, latency):
    return {"model": model, "batch": batch, "resolution": resolution,
            "configs": {"uniform_mse-4": {"latency_ratio_vs_fp16": latency, "peak_ratio_vs_fp16": 0.3,
                                          "max_abs_diff_vs_simulated": 0.0}}}


def test_a_subset_run_merges_into_the_previous_rows():
    bench = _bench()
    previous = {"date": "old", "device": "GPU A", "produced_by": "a note on the old run", "micro_v2": {"x": 1},
                "targets": {"stale": 1}, "models": {"pixart_alpha": {"n": 1}, "dit": {"n": 2}},
                "shapes": [_row("pixart_alpha", 2, 512, 1.5), _row("pixart_alpha", 16, 512, 1.2),
                           _row("dit", 2, 512, 1.4)],
                "pipeline_memory": [{"model": "pixart_alpha", "batch": 2, "resolution": 512, "p": "old"},
                                    {"model": "dit", "batch": 2, "resolution": 512, "p": "old"}]}
    result = {"date": "new", "device": "GPU B", "models": {"dit": {"n": 3}},
              "shapes": [_row("dit", 2, 512, 1.1), _row("dit", 16, 1024, 1.0)],
              "pipeline_memory": [{"model": "dit", "batch": 2, "resolution": 512, "p": "new"}]}
    merged = bench.merge_previous(result, previous)
    assert [(r["model"], r["batch"], r["resolution"], r["measured_in"]) for r in merged["shapes"]] == [
        ("pixart_alpha", 2, 512, "old"), ("pixart_alpha", 16, 512, "old"), ("dit", 2, 512, "new"),
        ("dit", 16, 1024, "new")]  # the re-measured row replaced in place, the new shape appended
    assert merged["shapes"][2]["configs"]["uniform_mse-4"]["latency_ratio_vs_fp16"] == 1.1
    assert merged["models"] == {"pixart_alpha": {"n": 1}, "dit": {"n": 3}}
    assert [e["p"] for e in merged["pipeline_memory"]] == ["old", "new"]
    assert merged["device"] == "GPU B" and merged["micro_v2"] == {"x": 1} and "targets" not in merged
    assert "produced_by" not in merged and merged["merged"]["previous_notes"] == {"produced_by": "a note on the old run"}
    again = bench.merge_previous(result, merged)  # the merge record stays one level deep, run after run
    assert again["merged"]["previous_notes"] == {} and again["merged"]["previous_date"] == "new"
    assert merged["merged"]["rows_from_previous_run"] == ["pixart_alpha b2 512px", "pixart_alpha b16 512px"]
    assert merged["merged"]["figures_from_previous_run"] == ["micro_v2"]
    assert result["shapes"][0].get("measured_in") is None  # the run's own rows are not modified
    # merging again (the next save of the same run) gives the same file
    assert bench.merge_previous(result, previous) == merged
    summary = bench.target_summary(merged)
    assert summary["latency_ratio_vs_fp16"]["worst"] == 1.5 and not summary["latency_ratio_vs_fp16"]["met_everywhere"]


def test_previous_results_that_do_not_parse_ask_for_no_merge(tmp_path):
    bench = _bench()
    assert bench.read_previous("export", tmp_path) is None
    (tmp_path / "export.json").write_text("{not json")
    with pytest.raises(UserError, match="--no_merge"):
        bench.read_previous("export", tmp_path)
