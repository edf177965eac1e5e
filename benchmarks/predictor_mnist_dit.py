"""Train the predictor on the shipped mnist_dit dataset and record held-out quality and training time.

    python benchmarks/predictor_mnist_dit.py --device cpu     # then again with --device cuda on a GPU

Each run merges its figures into benchmarks/results/predictor_mnist_dit.json under its device type
("cpu" / "cuda"); the quality figures (srcc_mean, ndcg10_mean, baselines, folds) come from the latest run.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import RESULTS, environment  # noqa: E402

CACHE = Path(__file__).resolve().parents[1] / "quant_caches" / "mnist_dit" / "quant_cache.pkl"
TARGET = "-1*FID-GT-1k - avg_bits*150"


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--loss", default="srcc")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--learn", choices=("auto", "target"), default="auto")
    ap.add_argument("--mse_weight", type=float, default=None)
    ap.add_argument("--additive", type=int, choices=(0, 1), default=None)
    ap.add_argument("--out", default=str(RESULTS / "predictor_mnist_dit.json"))
    args = ap.parse_args(argv)
    from autobuild.train import TrainOptions, train_predictor
    from autobuild.train_predictor import family_graph
    from multiquant.store import load_quant_cache

    additive = None if args.additive is None else bool(args.additive)
    overrides = {k: v for k, v in (("mse_weight", args.mse_weight), ("additive", additive)) if v is not None}
    options = TrainOptions(workers=args.workers, learn=args.learn, **overrides)
    records = load_quant_cache(CACHE, require_config=True)
    graph = family_graph("mnist_dit", "full")
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        metrics = train_predictor(records, graph, TARGET, loss=args.loss, folds=5, seed=12345, device=args.device,
                                  out_dir=tmp, options=options)
        seconds = time.perf_counter() - start
    out = Path(args.out)
    result = json.loads(out.read_text()) if out.exists() else {}
    kind = "cuda" if str(args.device).startswith("cuda") else "cpu"
    result.update({"model": "mnist_dit", "dataset": str(CACHE.relative_to(CACHE.parents[2])),
                   "num_configs": len(records), "target": TARGET, "loss": args.loss, "learned": metrics["learned"],
                   "options": metrics["options"],
                   "srcc_mean": metrics["srcc_mean"], "ndcg10_mean": metrics["ndcg10_mean"],
                   "folds": metrics["folds"], "baselines": metrics["baselines"],
                   "beats_every_baseline": all(metrics["srcc_mean"] > b["srcc_mean"]
                                               for b in metrics["baselines"].values() if b["srcc_mean"] == b["srcc_mean"]),
                   f"{kind}_train_seconds": seconds, f"{kind}_environment": environment(),
                   "targets": {"srcc_mean": ">= 0.9 and above every baseline", "cpu_train_seconds": "<= 600 (2 cores)",
                               "cuda_train_seconds": "<= 120"}})
    out.write_text(json.dumps(result, indent=1, default=lambda x: None if x != x else float(x)))
    print(json.dumps({k: v for k, v in result.items() if k not in ("folds",)}, indent=1, default=str))


if __name__ == "__main__":
    main()
