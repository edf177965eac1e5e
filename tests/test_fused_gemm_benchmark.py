"""benchmarks/fused_gemm.py in its smoke setting (Triton's interpreter): the experimental many-row fused kernel's
outputs lie within the stated error bound of the float64 product for UAQ and a K-Means table (tl.gather and L1
reads). The GPU timings themselves are not tested here."""
from __future__ import annotations

import json

import pytest

from benchmark_script import load_benchmark

pytest.importorskip("triton")


def test_smoke_run_is_within_the_error_bound(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # what --smoke sets, undone after the test
    bench = load_benchmark("fused_gemm")
    bench.main(["--smoke", "--options", "mse-4,kmeans-3", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "fused_gemm_smoke.json").read_text())
    assert result["smoke"] and result["all_within_bound"]
    tiled = {c["option"]: c["tiled"] for c in result["cases"]}
    assert set(tiled["mse-4"]) == {"m16n16k32w4s1"}
    assert set(tiled["kmeans-3"]) == {"m16n16k32w4s1", "m16n16k32w4s1_l1"}  # both table reads ran
    assert all(t["within_bound"] and t["us"] > 0 for per in tiled.values() for t in per.values())
