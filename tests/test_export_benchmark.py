"""benchmarks/export.py's small-M bookkeeping: which layer calls of a forward take the fused kernel (census), and
the crossover read off the micro-benchmark's cases. The timings themselves need a GPU (not tested here)."""
from __future__ import annotations


import torch
from torch import nn

from test_kernels import random_part

from multiquant.packed import packed_layer
from benchmark_script import load_benchmark



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
