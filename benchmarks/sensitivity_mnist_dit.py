"""Per-layer sensitivity of the MNIST DiT, and how well *additive* single-layer degradations predict the
FID of mixed configurations -- the assumption a learned predictor has to beat.

    python benchmarks/sensitivity_mnist_dit.py --quant_cache runs/mnist/quant_cache.pkl --num_images 100
    python benchmarks/sensitivity_mnist_dit.py --tiny --pixel_features          # CPU smoke check, ~1 minute

1. For each quantizer method (default: the methods used in the cache) and each measured width (default 3):
   quantize one search layer at a time (``qua2sedimo sensitivity``'s protocol, resumable records under
   ``--workdir``) and record its FID degradation and the combined sensitivity ranking.
2. For every configuration of the quant cache, predict its FID as the SUM of its layers' single-layer
   degradations under the layer's option. Widths that were not measured are scaled with the allocator's
   value model (degradation ~ 2^-b: a 4-bit layer counts half its 3-bit damage); the JSON says which.
3. Spearman rank correlation (SRCC) of that sum with the cache's measured FID-GT-1k, next to the zero-cost
   baselines of the cache itself (summed weight error, average bits).

Without ``--quant_cache`` it scores ``--num_random`` random configurations itself with the same small protocol
(FID-GT; FID-FP with ``--pixel_features``); with ``--tiny`` that checks the script, not the model.
Writes ``benchmarks/results/sensitivity_mnist_dit.json``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from multiquant.paths import constants  # noqa: E402
from benchmarks.common import environment, write_result  # noqa: E402
from multiquant.families import get_family  # noqa: E402
from multiquant.options import FP_OPTION, Option, option_of  # noqa: E402
from multiquant.sensitivity import run_sensitivity, search_groups, setup_protocol  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quant_cache", default=None, help="quant_cache.pkl of scored random mnist_dit configurations")
    p.add_argument("--methods", default=None, help="comma list (default: those in the cache; mse without one)")
    p.add_argument("--bits", default="3", help="widths measured per layer, comma list (default 3; '3,4' measures both)")
    p.add_argument("--num_images", type=int, default=100, help="images per single-layer measurement")
    p.add_argument("--image_seed", type=int, default=42)
    p.add_argument("--prompt_seed", type=int, default=42)
    p.add_argument("--tiny", action="store_true", help="tiny random mnist_dit (smoke check of this script)")
    p.add_argument("--pixel_features", action="store_true", help="pooled-pixel FID features (no classifier needed)")
    p.add_argument("--num_random", type=int, default=12,
                   help="without --quant_cache: score this many random configurations here (same protocol)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--workdir", default=None,
                   help="resumable per-layer records and sensitivity reports (default results/sensitivity_mnist_dit/)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 avoids stalls on a shared CPU)")
    p.add_argument("--out", default=None, help="output folder (default benchmarks/results)")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------- pure parts
def degradation_lookup(reports: dict, fid_key: str) -> dict:
    """{(key, method, bits): single-layer FID degradation} from the per-(method, bits) sensitivity reports."""
    table = {}
    for (method, bits), report in reports.items():
        for layer in report["layers"]:
            table[(layer["key"], method, bits)] = float(layer["raw"][fid_key])
    return table


def additive_prediction(config: dict, heads: list[str], table: dict, measured_bits: tuple[int, ...]) -> tuple[float, int]:
    """Sum of single-layer degradations of ``config``; (sum, number of layers whose width was scaled)."""
    total, scaled = 0.0, 0
    for key in heads:
        option = option_of(config[key])
        if option == FP_OPTION:
            continue
        parsed = Option.parse(option)
        method, bits = parsed.method, parsed.bits
        if (key, method, bits) in table:
            total += table[(key, method, bits)]
            continue
        # not measured at this width: the allocator's value model, degradation ~ 2^-b
        ref_bits = min(measured_bits, key=lambda b: abs(b - bits))
        total += table[(key, method, ref_bits)] * 2.0 ** (ref_bits - bits)
        scaled += 1
    return total, scaled


def srcc(a, b) -> float | None:
    from scipy.stats import spearmanr

    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    return float(spearmanr(a, b).statistic)


# ------------------------------------------------------------------------------------------ runs
def load_cache(path, heads) -> list[dict]:
    from multiquant.store import load_quant_cache

    records = load_quant_cache(path)
    missing = [k for k in heads if k not in records[0]["config"]]
    if missing:
        raise SystemExit(f"{path}: its configurations lack layer {missing[0]!r} of this model "
                         f"(a cache of another model, or of the tiny one? pass --tiny accordingly)")
    return records


def self_scored_cache(protocol, settings: dict, num: int, methods, workdir: Path, log) -> list[dict]:
    """Random configurations (the reference sampler over ``methods`` x {3, 4}) scored with the protocol;
    kept in a resumable record store beside the per-layer records."""
    from multiquant.config import sample_random_config
    from multiquant.store import RecordStore

    store = RecordStore(workdir / f"random_configs_{'_'.join(methods)}", dict(settings, kind="random", seed=0,
                        methods=list(methods)), required_keys=("config", "fid_fp"))
    done = store.done_indices()
    for index in range(num):
        if index in done:
            continue
        config = sample_random_config(protocol.layers, seed=0, index=index, methods=tuple(methods))
        metrics = protocol.measure({k: (Option.parse(v).method, Option.parse(v).bits) for k, v in config.items()})
        store.commit(index, dict(metrics, config=dict(config), quantized_error=metrics["weight_error"]))
        log(f"random configuration {index}: FID-FP {metrics['fid_fp']:.4g}"
            + (f"  FID-GT {metrics['fid_gt']:.4g}" if "fid_gt" in metrics else ""))
    return [r for r in store.records() if r["index"] < num]


# single-layer degradations that can be summed, by the record key they come from
ADDITIVE_METRICS = {"FID-FP": "fid_fp", "FID-GT increase": "fid_gt_increase", "1-SSIM(FP)": "one_minus_ssim"}


def correlation_table(cache: list[dict], targets: dict, reports: dict, heads, measured_bits) -> tuple[dict, int]:
    """{target: {predictor: SRCC}} for the additive sums and the cache's zero-cost baselines."""
    predictors, scaled = {}, 0
    for name, key in ADDITIVE_METRICS.items():
        if all(key in l["raw"] for rep in reports.values() for l in rep["layers"]):
            table = degradation_lookup(reports, key)
            sums = [additive_prediction(r["config"], heads, table, measured_bits) for r in cache]
            predictors[f"sum of single-layer {name}"] = [p for p, _ in sums]
            scaled = int(sum(n for _, n in sums))
    predictors["summed weight error (quantized_error)"] = [r.get("quantized_error", np.nan) for r in cache]
    if all("avg_bits" in r for r in cache):
        predictors["avg_bits (expected negative)"] = [r["avg_bits"] for r in cache]
    return {t: {p: srcc(values, target) for p, values in predictors.items()} for t, target in targets.items()}, scaled


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    family = get_family("mnist_dit")
    log = print
    measured_bits = tuple(sorted({int(b) for b in args.bits.split(",")}))
    # Rank by FID-FP (low variance at small N); also record FID-GT where the classifier's reference
    # statistics exist (pooled pixels have none) for the FID-GT targets and the FID-GT-increase sums.
    protocol, settings = setup_protocol(family, tiny=args.tiny, device=args.device, num_prompts=args.num_images,
                                        prompt_seed=args.prompt_seed, image_seed=args.image_seed,
                                        pixel_features=args.pixel_features, fid_against="fp",
                                        with_reference=not args.pixel_features, cache_weights=True, log=log)
    groups = search_groups(protocol.layers)
    heads = [g[0].key for g in groups]

    cache = load_cache(args.quant_cache, heads) if args.quant_cache else None
    if args.methods:
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    elif cache is not None:
        methods = sorted({Option.parse(option_of(v)).method for r in cache for v in r["config"].values()
                          if option_of(v) != FP_OPTION})
    else:
        methods = ["mse"]

    workdir = Path(args.workdir) if args.workdir else Path(constants.RESULTS_DIR) / "sensitivity_mnist_dit"
    reports = {}
    for method in methods:
        for bits in measured_bits:
            reports[(method, bits)] = run_sensitivity(protocol, settings, workdir, bits, method, log=log)

    if cache is None:
        if not args.num_random:
            raise SystemExit("pass --quant_cache FILE (the scored random configurations of mnist_dit) or --num_random N")
        cache = self_scored_cache(protocol, settings, args.num_random, methods, workdir, log)
        where = f"{len(cache)} self-scored random configurations, same {args.num_images}-image protocol" + (
            ", tiny smoke check" if args.tiny else "")
        targets = {f"FID-FP ({where})": [r["fid_fp"] for r in cache]}
        if all("fid_gt" in r for r in cache):
            targets[f"FID-GT ({where})"] = [r["fid_gt"] for r in cache]
    else:
        targets = {f"FID-GT-1k of the quant cache ({len(cache)} configurations)": [float(r["FID-GT-1k"]) for r in cache]}
    correlations, scaled_layers = correlation_table(cache, targets, reports, heads, measured_bits)

    rankings = {f"{m}-{b}": [{"rank": l["rank"], "key": l["key"], "sensitivity": round(l["sensitivity"], 4),
                              "band": l["band"], **{k: l["raw"][k] for k in ADDITIVE_METRICS.values() if k in l["raw"]}}
                             for l in sorted(rep["layers"], key=lambda l: l["rank"])]
                for (m, b), rep in reports.items()}
    result = {
        "model": "mnist_dit" + (" (tiny random)" if args.tiny else ""), "environment": environment(),
        "settings": {**{k: settings[k] for k in ("num_prompts", "prompt_seed", "image_seed", "feature_net",
                                                   "fid_against", "second_metric")},
                     "methods": methods, "measured_bits": list(measured_bits), "quant_cache": args.quant_cache},
        "sensitivity_score": f"0.6 x norm[FID-FP] + 0.4 x norm[{settings['second_metric']}]",
        "num_configurations": len(cache),
        "unmeasured_widths": (f"{scaled_layers} layer-options per sum scaled from the nearest measured width by "
                              f"2^-(b - b_measured)" if scaled_layers else "none: every option measured"),
        "srcc": correlations, "rankings": rankings,
        "top10": {name: [r["key"] for r in ranking[:10]] for name, ranking in rankings.items()},
        "seconds": time.perf_counter() - t0,
    }
    out = write_result("sensitivity_mnist_dit" + ("_tiny" if args.tiny else ""), result, args.out)
    for target, row in correlations.items():
        log(f"SRCC vs {target}:")
        for predictor, value in row.items():
            log(f"  {predictor:<42} {'n/a' if value is None else f'{value:+.3f}'}")
    log(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
