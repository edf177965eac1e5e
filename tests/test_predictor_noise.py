"""benchmarks/predictor_noise.py: the label-noise ceiling of the predictor benchmark."""
from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
from benchmark_script import load_benchmark


def _benchmark():
    return load_benchmark("predictor_noise")


def _pareto(pairs, uniform: bool = True) -> dict:
    rows = {f"m{i}": {"fid": a, "fid_confirm": b, "avg_bits": 3.5} for i, (a, b) in enumerate(pairs)}
    return {"budgets": [{"budget": 3.5, "methods": rows}, {"budget": 3.7, "methods": dict(rows)}],  # repeats count once
            "uniform": {"u": {"fid": 50.0, "fid_confirm": 55.0}, "fp16_note": "not a row"} if uniform else {}}


def test_seed_pairs_are_distinct_rows_and_uniform_entries():
    bench = _benchmark()
    pairs = bench.seed_pairs(_pareto([(10.0, 11.0), (20.0, 18.0), (30.0, None)]))
    np.testing.assert_allclose(pairs, [[10.0, 11.0], [20.0, 18.0], [50.0, 55.0]])


@pytest.mark.parametrize("noisy", [False, True])
def test_noise_ceiling_by_hand(tmp_path, noisy):
    """Identical seeds: no label noise, sd 0 and a ceiling of exactly 1. Noisy seeds: sd = std(log ratio) /
    sqrt(2), and the ceiling is below 1 but high where the labels spread far more than the noise."""
    bench = _benchmark()
    rng = np.random.default_rng(3)
    fids = np.exp(rng.normal(4.0, 0.6, 40))
    ratio = np.exp(rng.normal(0, 0.1, 40)) if noisy else np.ones(40)
    pareto = _pareto(zip(fids.tolist(), (fids * ratio).tolist()), uniform=noisy)
    (tmp_path / "pareto.json").write_text(json.dumps(pareto))
    records = [{"config": {"a": ["mse-4", 9, 3, 0.1]}, "FID-GT-1k": float(f), "avg_bits": float(b)}
               for f, b in zip(np.exp(rng.normal(4.5, 0.6, 60)), rng.uniform(3, 4, 60))]
    (tmp_path / "cache.pkl").write_bytes(pickle.dumps(records))
    (tmp_path / "predictor_m.json").write_text(json.dumps({"model": "m", "predictor": {}}))
    result = bench.main(["--model", "m", "--cache", str(tmp_path / "cache.pkl"), "--pareto", str(tmp_path / "pareto.json"),
                         "--repeats", "5", "--out", str(tmp_path)])["noise_ceiling"]
    log_ratio = np.log(np.concatenate([1.0 / ratio, [50.0 / 55.0]] if noisy else [1.0 / ratio]))
    assert result["pairs"] == len(log_ratio)
    assert result["log_fid_noise_sd"] == pytest.approx(log_ratio.std(ddof=1) / np.sqrt(2), rel=1e-5, abs=1e-12)  # pairs kept to 6 decimals
    saved = json.loads((tmp_path / "predictor_m.json").read_text())
    assert saved["noise_ceiling"]["pairs"] == len(log_ratio) and saved["model"] == "m"  # the rest is kept
    for target in ("default", "quality"):
        if noisy:
            assert 0.8 < result[target]["srcc_seed_vs_seed"] < 1.0
        else:
            assert result[target]["srcc_seed_vs_seed"] == pytest.approx(1.0)
