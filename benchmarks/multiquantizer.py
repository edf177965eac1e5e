"""Benchmark the multiquantizer build against the reference's algorithm, in one run.

    python benchmarks/multiquantizer.py [--model pixart_alpha] [--out DIR]

Full-size architecture with random fp16 weights of the real shapes. The reference style (scikit-learn
K-Means per channel with 100 iterations and a per-element Python replacement loop, K-Means-A with
scikit-learn on the whole tensor, the per-channel 10-candidate clipping loop) is timed on a sample of the
same layers and extrapolated to the whole model by channel and element counts.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import environment, sync, timed, write_result  # noqa: E402
from multiquant.checkpoint import MultiQuantizer  # noqa: E402
from multiquant.config import ConfigApplier, sample_random_config  # noqa: E402
from multiquant.families import get_family  # noqa: E402
from multiquant.layers import fp_bytes, quantizable_layers  # noqa: E402
from multiquant.utils import default_device  # noqa: E402


def reference_uaq_channel(row: torch.Tensor, bits: int) -> float:
    """One channel, 10 candidates, as the reference loops (tensor ops on the device, one channel at a time)."""
    best, levels = None, 2 ** bits - 1
    for i in range(10):
        a = 1.0 - 0.1 * i
        lo, hi = row.min() * a, row.max() * a
        delta = (hi - lo) / levels
        z = torch.round(-lo / delta)
        q = torch.clamp(torch.round(row / delta) + z, 0, levels)
        score = ((q - z) * delta - row).abs().pow(2.4).mean()
        if best is None or score < best[0]:
            best = (score, delta, z)
    return float(best[1])


def reference_kmeans(values: np.ndarray, k: int) -> np.ndarray:
    from sklearn.cluster import KMeans

    km = KMeans(n_clusters=min(k, len(values)), max_iter=100).fit(values.reshape(-1, 1))
    centres, labels = km.cluster_centers_[:, 0], km.labels_
    out = np.empty_like(values)
    for i in range(len(values)):  # the reference replaces every element in a Python loop
        out[i] = centres[labels[i]]
    return out


def reference_style_seconds(model, layers, sample_layers: int, sample_channels: int, bits=(4, 3)) -> dict:
    """Time the reference's per-channel work on a sample; extrapolate by channel/element counts."""
    rng = np.random.default_rng(0)
    picks = [layers[i] for i in sorted(rng.choice(len(layers), sample_layers, replace=False))]
    per_channel = {"uaq": [], "kmeans_c": []}
    per_element_kma = []
    for ref in picks:
        w = ref.weight(model).detach().reshape(ref.channels, -1)
        rows = w[:sample_channels]
        for b in bits:
            t = time.perf_counter()
            for r in rows:
                reference_uaq_channel(r.float(), b)
            sync()
            per_channel["uaq"].append((time.perf_counter() - t) / len(rows) / w.shape[1])
            host = rows.float().cpu().numpy().astype(np.float64)
            t = time.perf_counter()
            for r in host:
                reference_kmeans(r, 2 ** b)
            per_channel["kmeans_c"].append((time.perf_counter() - t) / len(rows) / w.shape[1])
            flat = w.float().cpu().numpy().astype(np.float64).reshape(-1)[: 200_000]
            t = time.perf_counter()
            reference_kmeans(flat, 2 ** b)
            per_element_kma.append((time.perf_counter() - t) / len(flat))
    total_elements = sum(r.numel for r in layers if not r.tied_to)
    # per-weight costs (seconds per element) times the model's element count, per bit width
    est = {"uaq": float(np.mean(per_channel["uaq"])) * total_elements * len(bits),
           "kmeans_c": float(np.mean(per_channel["kmeans_c"])) * total_elements * len(bits),
           "kmeans_a": float(np.mean(per_element_kma)) * total_elements * len(bits)}
    est["total"] = sum(est.values())
    est["sampled_layers"] = [r.key for r in picks]
    est["sampled_channels_per_layer"] = sample_channels
    return est


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="pixart_alpha")
    ap.add_argument("--sample_layers", type=int, default=4)
    ap.add_argument("--sample_channels", type=int, default=8)
    ap.add_argument("--apply_trials", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    device = str(default_device())
    family = get_family(args.model)
    model = family.build("full" if device == "cuda" else "tiny", device=device, dtype=family.dtype if device == "cuda" else torch.float32)
    layers = quantizable_layers(model, family)

    mq, build_s = timed(MultiQuantizer.build, model, family, show_progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        path = mq.save_pretrained(tmp)
        checkpoint_bytes = path.stat().st_size
        loaded, load_s = timed(MultiQuantizer.from_pretrained, path, device=device)
    applier = ConfigApplier(model, loaded)
    apply_times = []
    for i in range(args.apply_trials):
        config = sample_random_config(layers, seed=0, index=i)
        _, s = timed(applier.apply, config)
        apply_times.append(s)
    ref = reference_style_seconds(model, layers, args.sample_layers, args.sample_channels)
    result = {
        **environment(), "model": args.model, "architecture": "full-size" if device == "cuda" else "tiny",
        "weights": "random (diffusers init), real shapes", "dtype": str(family.dtype),
        "num_layers": len(layers), "fp16_bytes": fp_bytes(layers, family.fp_prec),
        "build_seconds": build_s, "reference_style_seconds": ref["total"],
        "reference_style_breakdown": ref, "speedup": ref["total"] / build_s,
        "checkpoint_bytes": checkpoint_bytes, "checkpoint_ratio": checkpoint_bytes / fp_bytes(layers, family.fp_prec),
        "load_seconds": load_s, "apply_config_seconds": max(apply_times), "apply_config_seconds_all": apply_times,
        "peak_gpu_bytes": torch.cuda.max_memory_allocated() if device == "cuda" else None,
        "targets": {"build_seconds": "< 180", "speedup": ">= 200", "checkpoint_ratio": "<= 1.6",
                    "apply_config_seconds": "< 1"},
    }
    write_result("multiquantizer", result, args.out)


if __name__ == "__main__":
    main()
