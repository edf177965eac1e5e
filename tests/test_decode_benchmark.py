"""benchmarks/decode.py end to end in its smoke setting (Triton's interpreter, the tiny models' shapes): both
decode kernels' weights equal the eager path's, each case names the kernel that ran, and the per-forward sums
weight every shape by how often the model has it. The GPU timings themselves are not tested here."""
from __future__ import annotations

import json

import pytest

from benchmark_script import load_benchmark

pytest.importorskip("triton")


def test_smoke_run_checks_both_kernels_and_sums_per_forward(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # what --smoke sets, undone after the test
    bench = load_benchmark("decode")
    bench.main(["--smoke", "--models", "dit", "--options", "mse-3,kmeans_all-4", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "decode_smoke.json").read_text())
    assert result["smoke"] and result["all_exact_vs_eager"]
    shapes = result["models"]["dit"]["shapes"]
    assert sum(shapes.values()) == result["models"]["dit"]["layers"] == 21
    cases = {(tuple(c["shape"]), c["option"]): c for c in result["cases"]}
    for (shape, option), case in cases.items():
        whole_groups = case["row_len"] % 8 == 0
        assert case["group"]["kernel"] == ("group" if whole_groups else "per_weight"), shape
        assert case["per_weight"]["kernel"] == "per_weight"
        assert case["bytes_written"] == 2 * case["numel"]  # float16 weights (the default dtype)
    assert any(c["row_len"] % 8 for c in cases.values())  # the smoke shapes that are not whole groups
    for option in ("mse-3", "kmeans_all-4"):
        summed = sum(n * cases[(tuple(int(d) for d in name.split("x")), option)]["group"]["us"]
                     for name, n in shapes.items())
        assert result["per_forward"]["dit"][option]["group_us"] == pytest.approx(summed)
