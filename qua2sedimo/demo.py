"""``qua2sedimo demo``: the whole pipeline on an embedded testbed (the MNIST DiT by default, or ``--model
mnist_unet``, the plain-module U-Net), on a CPU, in minutes.

Stages (each prints what it wrote): multiquantizer -> FP16 reference -> a handful of scored random
configurations (``quant_cache.pkl``) -> predictor, Pareto configurations and report (trained on the shipped
pre-scored dataset, when it is there) -> ``summary.json``.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import constants

from autobuild.pipeline import demo_predictor_stage
from multiquant.evaluate import random_configs, score_into_store, setup_scorer
from multiquant.families import get_family
from multiquant.store import RecordStore
from multiquant.utils import atomic_path


def shipped_cache(model: str) -> Path:
    return constants.REPO_ROOT / "quant_caches" / model / "quant_cache.pkl"


PRESETS = {  # images per configuration and random configurations scored
    "quick": {"num_images": 64, "num_configs": 2},
    "full": {"num_images": 1000, "num_configs": 4},  # the shipped dataset's protocol: comparable FIDs
}


def _say(msg: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run_demo(outdir: Path, quick: bool = False, device: str | None = None, seed: int = 0,
             model: str = "mnist_dit") -> dict:
    import torch

    torch.manual_seed(seed)
    preset = PRESETS["quick" if quick else "full"]
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    family = get_family(model)
    start = time.perf_counter()

    # --quick reuses the shipped checkpoint (checked against the weights); the full demo builds its own
    shipped = Path(constants.MULTIQUANTIZER_DIR) / f"{model}_mq.safetensors"
    mq_path = shipped if quick and shipped.exists() else outdir / f"{model}_mq.safetensors"
    _say(f"1/4 multiquantizer for {family.name} (UAQ, K-Means-C, K-Means-A at 3 and 4 bits, every layer)")
    scorer, settings = setup_scorer(family, device=device or "cpu", num_images=preset["num_images"],
                                    mq_path=mq_path, build_mq=True, log=_say)
    _say(f"    {len(scorer.mq.layers)} layers: {mq_path}")

    _say(f"2/4 FP16 reference: {preset['num_images']} digits, MNIST-FID against held-out real digits")
    fp = scorer.fp_reference()
    _say(f"    FP16 MNIST-FID = {fp['fid_gt']:.2f}")

    _say(f"3/4 scoring {preset['num_configs']} random configurations -> {outdir / 'quant_cache.pkl'}")
    store = RecordStore(outdir, dict(settings, kind="random", seed=seed))
    score_into_store(scorer, store, random_configs(scorer.mq.layers, seed, preset["num_configs"]),
                     extra_of=lambda i: {"seed": seed}, log=lambda m: _say("    " + m))
    records = store.records()
    summary = {
        "model": family.name, "num_images": preset["num_images"], "seed": seed, "settings": settings,
        "fp_fid": float(fp["fid_gt"]),
        "configs": [{"index": r["index"], "avg_bits": r["avg_bits"], "FID": float(r["FID-GT-1k"]),
                     "psnr_fp": r.get("psnr_fp"), "bops": r.get("bops")} for r in records],
        "quant_cache": str(store.cache_path), "multiquantizer": str(mq_path),
    }

    _say("4/4 predictor, Pareto configurations and report from the shipped pre-scored dataset")
    summary.update(_predictor_stage(outdir, quick, model, log=_say))

    summary["seconds"] = time.perf_counter() - start
    with atomic_path(outdir / "summary.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=1, default=float))
    _say(f"done in {summary['seconds']:.0f} s. Everything is in {outdir}/ (summary.json, quant_cache.pkl, ...)")
    return summary


def _predictor_stage(outdir: Path, quick: bool, model: str, log) -> dict:
    """Train the GNN predictor on the shipped dataset and build budgeted configurations (when available)."""
    cache = shipped_cache(model)
    if not cache.exists():
        log(f"    skipped: no shipped dataset at {cache}")
        return {}
    return demo_predictor_stage(cache, outdir, quick=quick, log=log, model=model)
