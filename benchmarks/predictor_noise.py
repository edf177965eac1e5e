"""How well could any predictor rank a testbed's labels? A noise ceiling for benchmarks/predictor.py's SRCC.

The pareto benchmark scores every configuration it builds at two image seeds (``fid`` and ``fid_confirm`` in
``pareto_<model>.json``). Their log ratio estimates the label noise of one FID measurement: standard deviation
sd / sqrt(2) in log FID if both seeds are equally noisy. Labels that differ from the dataset's by that noise,
twice over (two seeds), rank each other with this SRCC inside the predictor's own folds: what one seed's labels
say about another's, the most a predictor scored against one seed can be expected to reach.

    python benchmarks/predictor_noise.py --model mnist_unet

Adds ``noise_ceiling`` to ``benchmarks/results/predictor_<model>.json`` (run it after benchmarks/predictor.py,
which rewrites that file).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import RESULTS, environment, write_result  # noqa: E402
from benchmarks.predictor import TARGETS  # noqa: E402


def seed_pairs(pareto: dict) -> np.ndarray:
    """Distinct (fid, fid_confirm) pairs of every row and uniform entry of a pareto result."""
    pairs = set()
    rows = [v for b in pareto.get("budgets", []) for v in b.get("methods", {}).values()]
    rows += [v for v in pareto.get("uniform", {}).values() if isinstance(v, dict)]
    for row in rows:
        if row.get("fid") and row.get("fid_confirm"):
            pairs.add((round(float(row["fid"]), 6), round(float(row["fid_confirm"]), 6)))
    return np.array(sorted(pairs))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--cache", default=None, help="default quant_caches/<model>/quant_cache.pkl")
    p.add_argument("--pareto", default=None, help="default benchmarks/results/pareto_<model>.json")
    p.add_argument("--repeats", type=int, default=200, help="noise draws")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    from scipy.stats import spearmanr

    from autobuild.target import parse_target
    from autobuild.train import make_folds
    from multiquant.store import load_quant_cache

    out_dir = Path(args.out) if args.out else RESULTS
    pareto = Path(args.pareto) if args.pareto else RESULTS / f"pareto_{args.model}.json"
    pairs = seed_pairs(json.loads(pareto.read_text()))
    log_ratio = np.log(pairs[:, 0] / pairs[:, 1])
    sd = float(log_ratio.std(ddof=1)) / np.sqrt(2.0)  # one measurement's noise in log FID
    records = load_quant_cache(args.cache or f"quant_caches/{args.model}/quant_cache.pkl", require_config=True)
    log_fid = np.log([float(r["FID-GT-1k"]) for r in records])
    folds = make_folds(len(records), 5, 12345)  # benchmarks/predictor.py's folds
    rng = np.random.default_rng(args.seed)
    ceiling = {}
    for name, expr in TARGETS.items():
        target = parse_target(expr, records[0].keys())
        values = []
        for _ in range(args.repeats):
            a, b = (log_fid + rng.normal(0, sd, len(log_fid)) for _ in range(2))
            ya = [target({**r, "FID-GT-1k": float(np.exp(v))}) for r, v in zip(records, a)]
            yb = [target({**r, "FID-GT-1k": float(np.exp(v))}) for r, v in zip(records, b)]
            values += [spearmanr(np.take(ya, f), np.take(yb, f)).statistic for f in folds]
        ceiling[name] = {"srcc_seed_vs_seed": float(np.mean(values)), "srcc_sd": float(np.std(values))}
    path = out_dir / f"predictor_{args.model}.json"
    result = json.loads(path.read_text())
    result["noise_ceiling"] = {
        **ceiling, "log_fid_noise_sd": sd, "pairs": len(pairs), "log_ratio_mean": float(log_ratio.mean()),
        "source": f"{pareto.name} fid vs fid_confirm (its two image seeds)", "repeats": args.repeats,
        "seed": args.seed, "method": "log FID + N(0, sd) twice, SRCC between the two inside each of the 5 folds",
        "environment": environment()}
    write_result(f"predictor_{args.model}", result, out_dir)
    print(f"{args.model}: label noise sd {sd:.4f} in log FID ({len(pairs)} seed pairs); seed-vs-seed SRCC "
          + ", ".join(f"{k} {v['srcc_seed_vs_seed']:.4f}" for k, v in ceiling.items()))
    return result


if __name__ == "__main__":
    main()
