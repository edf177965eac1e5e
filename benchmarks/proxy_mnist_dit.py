"""How well the cheap FP-reference proxy ranks configurations like FID, and how much faster it is.

    python benchmarks/proxy_mnist_dit.py --fid_cache A/quant_cache.pkl --proxy_cache B/quant_cache.pkl

``A``: configurations scored with the full protocol (1,000 images, FID). ``B``: the same configuration
indices (same --seed) scored on a small image set; its proxies (PSNR/SSIM/FID-FP against the same-seed FP
images) are compared with A's FID by Spearman rank correlation, and the per-configuration times give the
rates. Merges its figures into benchmarks/results/eval_random.json.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import RESULTS, environment  # noqa: E402
from multiquant.store import load_quant_cache  # noqa: E402
from multiquant.utils import json_default, write_text_atomic  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--fid_cache", required=True)
    ap.add_argument("--proxy_cache", required=True)
    ap.add_argument("--out", default=str(RESULTS / "eval_random.json"))
    ap.add_argument("--timing_device", default=None, help="device both caches were scored on (for the record)")
    args = ap.parse_args(argv)
    full = {r["index"]: r for r in load_quant_cache(args.fid_cache)}
    small = {r["index"]: r for r in load_quant_cache(args.proxy_cache)}
    common = sorted(set(full) & set(small))
    if len(common) < 10:
        raise SystemExit(f"only {len(common)} configurations in common: score the same --seed in both runs")
    fid = np.array([float(full[i]["FID-GT-1k"]) for i in common])
    proxies = {"psnr_fp": 1, "ssim_fp": 1, "FID-FP-1k": -1, "FID-GT-1k": -1}  # sign: higher = better config
    srcc = {}
    for name, sign in proxies.items():
        vals = np.array([float(small[i].get(name, np.nan)) for i in common])
        if np.isfinite(vals).all():
            srcc[name] = float(spearmanr(-sign * vals, fid).statistic)  # oriented to rank like FID (lower better)
    fid_s = float(np.median([full[i]["timings"]["total_s"] for i in common]))
    proxy_s = float(np.median([small[i]["timings"]["total_s"] for i in common]))
    best = max(srcc, key=srcc.get)
    figures = {
        "proxy_model": "mnist_dit", "proxy_configs": len(common),
        "proxy_images_per_config": small[common[0]].get("num_images"),
        "fid_images_per_config": full[common[0]].get("num_images"),
        "proxy_srcc_vs_fid_all": srcc, "proxy_metric": best, "proxy_srcc_vs_fid": srcc[best],
        "proxy_seconds_per_config": proxy_s, "fid_seconds_per_config": fid_s,
        "proxy_configs_per_hour": 3600 / proxy_s, "fid_configs_per_hour_mnist": 3600 / fid_s,
        "proxy_rate_over_fid": fid_s / proxy_s, "proxy_timing_device": args.timing_device,
        "proxy_analysis_environment": environment(),
    }
    out = Path(args.out)
    merged = json.loads(out.read_text()) if out.exists() else {}
    merged.update(figures)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, json.dumps(merged, indent=1, default=json_default))
    print(json.dumps(figures, indent=1, default=json_default))


if __name__ == "__main__":
    main()
