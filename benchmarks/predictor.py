"""Predictor quality on one testbed's scored dataset: 5-fold held-out SRCC for the default and the quality-only
target, beside every baseline (ridge on the same split, gradient-boosted trees, trees on the ridge residual,
training-free proxies).

    python benchmarks/predictor.py --model mnist_dit --workers 5          # GPU machine: 16 CPU cores
    python benchmarks/predictor.py --model mnist_unet --output_shifts     # + shift baselines and ridge_shift prior

Writes ``benchmarks/results/predictor_<model>.json`` (``predictor: {default: {srcc, ...}, quality: {srcc, ...},
baselines: {default: {...}, quality: {...}}}``) and keeps the quality-target ensemble in ``--keep`` for
``benchmarks/pareto.py``'s build-config rows.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from autobuild.output_shift import SIGNATURE  # noqa: E402
from autobuild.train_predictor import component_counts  # noqa: E402
from benchmarks.common import RESULTS, environment, write_result  # noqa: E402

TARGETS = {"default": "-1*FID-GT-1k - avg_bits*150", "quality": "-1*FID-GT-1k"}


def summary(metrics: dict) -> dict:
    base = metrics["baselines"]
    ridge = base.get("ridge_learned", {}).get("srcc_mean")
    return {"srcc": metrics["srcc_mean"], "ndcg10": metrics["ndcg10_mean"], "target": metrics["target"],
            "fold_srcc": [f["srcc"] for f in metrics["folds"]],
            "best_epochs": [f["best_epoch"] for f in metrics["folds"]],
            "folds_at_prior": sum(1 for f in metrics["folds"] if f["best_epoch"] == 0),
            "prior_kinds": [f.get("prior_kind") for f in metrics["folds"]],
            "ridge_learned": ridge, "gain_over_ridge": None if ridge is None else metrics["srcc_mean"] - ridge,
            "prior_learned": base.get("prior_learned", {}).get("srcc_mean"),
            # the prior without its kernel residual (autobuild.train.fit_shift_kernel), and the folds that kept one
            "prior_no_kernel_learned": base.get("prior_no_kernel_learned", {}).get("srcc_mean"),
            "kernel_folds": sum(1 for f in metrics["folds"] if (f.get("shift_kernel") or {}).get("kept")),
            "shift_kernels": [f.get("shift_kernel") for f in metrics["folds"]],
            "gbm_learned": base.get("gbm_learned", {}).get("srcc_mean"),
            "seconds": metrics["timings"]["wall_seconds"],
            "training": {k: metrics["options"].get(k) for k in TRAINING_KEYS}}


# the training options a result depends on beyond the flags (autobuild.train.TrainOptions)
TRAINING_KEYS = ("cross_fit", "prior_margin", "shift_components", "node_shifts", "shift_kernel", "linear_prior", "epochs",
                 "patience", "hidden")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--cache", default=None, help="default quant_caches/<model>/quant_cache.pkl")
    p.add_argument("--device", default="cpu")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--epochs", type=int, default=300)
    p.add_argument("--size", choices=("full", "tiny"), default="full")
    p.add_argument("--keep", default=None, help="where the quality-target ensemble goes (default "
                                                "benchmarks/results/predictor_<model>_work/quality)")
    p.add_argument("--targets", default="default,quality", help="comma list of: default, quality")
    p.add_argument("--prior", default="linear", choices=("linear", "auto", "none"),
                   help="the GNN's linear prior (autobuild.train.fit_prior): always (linear, the default of "
                        "train-predictor), per fold with or without by validation (auto), never")
    p.add_argument("--merge", action="store_true", help="keep the targets already in the result file")
    p.add_argument("--output_shifts", action="store_true",
                   help="measure the output shifts (autobuild.output_shift) with the shipped weights and "
                        "multiquantizer (CPU, fp32, seed 0): the baselines with each configuration's summed shift, "
                        "and the GNN's prior may be ridge_shift (one-hot + a quadratic form of the summed output-change "
                        "signature, autobuild.train.fit_prior)")
    p.add_argument("--shift_components", type=component_counts, default=(32, 64),
                   help="leading components of the signature in the ridge_shift prior, comma separated: one "
                        "candidate each, by the prior's inner CV (0: no shift prior)")
    p.add_argument("--no_node_shifts", dest="node_shifts", action="store_false",
                   help="with --output_shifts: the GNN's layer nodes do not read their option's output change (by "
                        "default they do, and its head a readout of the summed change, autobuild.gnn.ShiftReadout)")
    p.add_argument("--unguarded", action="store_true",
                   help="also train every target without the prior margin (TrainOptions.prior_margin=False) on the "
                        "same folds and record it as gnn_unguarded: what the network would score if any "
                        "validation gain let it replace its prior")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    from autobuild.dag import units
    from autobuild.train import TrainOptions, train_predictor
    from autobuild.train_predictor import family_graph
    from multiquant.store import load_quant_cache

    cache = args.cache or f"quant_caches/{args.model}/quant_cache.pkl"
    records = load_quant_cache(cache, require_config=True)
    graph = family_graph(args.model, args.size)
    keep = Path(args.keep) if args.keep else RESULTS / f"predictor_{args.model}_work" / "quality"
    started = time.perf_counter()
    env = environment()
    measured = f"re-measured on {env['device']} ({args.workers} fold process(es), 1 torch thread each), {env['date']}"
    out = {}
    wanted = [t.strip() for t in args.targets.split(",") if t.strip()]
    prior = {"auto": "auto", "linear": True, "none": False}[args.prior]
    shifts, signature, shift_info = measured_shifts(args.model) if args.output_shifts else (None, None, None)
    for name, target in ((n, TARGETS[n]) for n in wanted):
        options = TrainOptions(workers=args.workers, tabular_baselines=True, linear_prior=prior, output_shifts=shifts,
                               shift_signature=signature, shift_components=args.shift_components,
                               node_shifts=args.node_shifts)
        metrics = train_predictor(records, graph, target, folds=args.folds, epochs=args.epochs, seed=12345,
                                  device=args.device, out_dir=keep if name == "quality" else keep.parent / name,
                                  units=units(graph, "block"), log=None, options=options)
        unguarded = None
        if args.unguarded:  # the same folds and seeds, only the margin off (nothing saved)
            free = train_predictor(records, graph, target, folds=args.folds, epochs=args.epochs, seed=12345,
                                   device=args.device, units=units(graph, "block"), log=None,
                                   options=replace(options, prior_margin=False, tabular_baselines=False))
            unguarded = {"srcc": free["srcc_mean"], "fold_srcc": [f["srcc"] for f in free["folds"]],
                         "best_epochs": [f["best_epoch"] for f in free["folds"]]}
        shift_prior = ({"signature": SIGNATURE, "components": list(args.shift_components)}
                       if signature is not None and max(args.shift_components) > 0 else None)
        out[name] = (dict(summary(metrics), prior=args.prior, shift_prior=shift_prior, device=args.device,
                          measured=measured, **({"gnn_unguarded": unguarded} if unguarded else {})),
                     {b: {"srcc": v["srcc_mean"], "ndcg10": v["ndcg10_mean"], **({"kind": v["kind"]} if "kind" in v else {})}
                      for b, v in metrics["baselines"].items()})
        print(f"{name}: SRCC {metrics['srcc_mean']:.4f}; " + ", ".join(f"{b} {v['srcc_mean']:.4f}"
                                                                     for b, v in metrics["baselines"].items()))
    path = (Path(args.out) if args.out else RESULTS) / f"predictor_{args.model}.json"
    old = json.loads(path.read_text()).get("predictor", {}) if args.merge and path.exists() else {}
    predictor = {name: old[name] for name in TARGETS if name in old and name not in out}
    predictor.update({name: s for name, (s, _) in out.items()})
    baselines = dict(old.get("baselines", {}))
    baselines.update({name: b for name, (_, b) in out.items()})
    result = {"model": args.model, "dataset": cache, "num_configs": len(records),
              "predictor": {**predictor, "baselines": baselines, "quality_dir": str(keep)},
              "goals": {"srcc": ">= 0.9 on both targets",
                        "gnn_vs_ridge": "where ridge_learned < 0.85, the GNN beats it by >= 0.05"},
              "measured": measured, "environment": env, "seconds": time.perf_counter() - started}
    if shift_info is not None:
        result["output_shifts"] = shift_info
    write_result(f"predictor_{args.model}", result, Path(args.out) if args.out else RESULTS)
    return result


def measured_shifts(model: str) -> tuple[dict, dict, dict]:
    """The output-shift table (one value per channel), the output-change signature (autobuild.output_shift.
    SIGNATURE) and how they were measured: the family's trained weights and shipped multiquantizer, fp32 on the
    CPU, seed 0."""
    from autobuild.output_shift import family_shift_tables
    from multiquant.families import get_family

    return family_shift_tables(get_family(model), seed=0)


if __name__ == "__main__":
    main()
