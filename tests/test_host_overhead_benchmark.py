"""benchmarks/host_overhead.py's whole-model mode on the CPU: the packed copy replaces every stock nn.Linear and
computes what the dense model computes with the packed weights (the GPU host timings themselves are not tested)."""
from __future__ import annotations

import torch

from benchmark_script import load_benchmark
from multiquant.families import get_family
from multiquant.packed import PackedLinear


def test_packed_copy_replaces_every_linear_and_matches_the_dequantized_dense_model():
    bench = load_benchmark("host_overhead")
    family = get_family("mnist_dit")
    dense = family.build("tiny", device="cpu", dtype=torch.float32, seed=0).eval()
    linears = [n for n, m in dense.named_modules() if type(m) is torch.nn.Linear]
    packed = bench.packed_copy(family.build("tiny", device="cpu", dtype=torch.float32, seed=0).eval(), "kmeans-3",
                               torch.float32, "cpu")
    assert [n for n, m in packed.named_modules() if isinstance(m, PackedLinear)] == linears and linears
    for name in linears:  # the reference: the dense model holding the packed layers' weights
        dense.get_submodule(name).weight.data.copy_(packed.get_submodule(name).dequantize_weight(torch.float32))
    inputs = bench.forward_inputs_for(family, dense, batch=2)
    with torch.no_grad():
        want, got = dense(**inputs), packed(**inputs)
    want, got = (getattr(o, "sample", o) for o in (want, got))
    assert torch.equal(got, want) and got.abs().sum() > 0


def test_model_profile_reports_both_models(tmp_path):
    bench = load_benchmark("host_overhead")
    args = bench.parse_args(["--smoke", "--model", "mnist_dit", "--trials", "1"])
    entry = bench.model_profile(args, torch.device("cpu"), torch.float32)
    assert entry["packed_linear_layers"] > 0 and entry["profile"]
    assert all(entry[name]["wall_ms"] >= entry[name]["host_ms"] > 0 for name in ("fp16", "packed"))
