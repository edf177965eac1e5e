"""Train the GNN predictor on a scored-configuration cache (K-fold CV + fold ensemble).

    qua2sedimo train-predictor --cache quant_cache.pkl --model mnist_dit \\
        --target "-1*FID-GT-1k - avg_bits*150" --loss srcc --out runs/predictor

``add_train_predictor_arguments`` and ``run_train_predictor`` are what the sub-command wires to
(``autobuild.commands``).
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from multiquant.cli_flags import add_model_flags
from multiquant.errors import UserError

__all__ = ["add_train_predictor_arguments", "run_train_predictor", "family_graph", "measured_signature",
           "component_counts"]


def add_train_predictor_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``train-predictor`` flags (for a sub-parser of the ``qua2sedimo`` command)."""
    p.add_argument("--cache", required=True, type=Path, help="quant_cache.pkl (list of scored-config records)")
    add_model_flags(p, weights=False, device=False, model_help="model family of the cache, e.g. mnist_dit, dit, "
                                                               "pixart_alpha", tiny_help="= --size tiny")
    p.add_argument("--target", default="-1*FID-GT-1k - avg_bits*150",
                   help="expression over record keys; higher = better configuration")
    p.add_argument("--loss", choices=("srcc", "ndcg", "hybrid"), default="srcc", help="ranking loss")
    p.add_argument("--out", required=True, type=Path, help="output directory (ensemble + metrics.json)")
    p.add_argument("--epochs", type=int, default=300, help="maximum epochs per fold (early stopping on validation)")
    p.add_argument("--patience", type=int, default=40, help="epochs without validation gain before a fold stops")
    p.add_argument("--folds", type=int, default=5, help="cross-validation folds (= ensemble members)")
    p.add_argument("--seed", type=int, default=12345, help="seed of the fold split and every initialisation")
    p.add_argument("--device", default="cpu", help="training device")
    p.add_argument("--batch-size", type=int, default=128, help="graphs per step (0 = the whole training part)")
    p.add_argument("--hidden", type=int, default=64, help="hidden width of the GNN")
    p.add_argument("--layers", type=int, default=4, help="GATv2 layers = hop levels - 1")
    p.add_argument("--heads", type=int, default=1, help="attention heads per GATv2 layer")
    p.add_argument("--workers", type=int, default=1, help="folds trained in parallel processes (CPU)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per fold")
    p.add_argument("--size", choices=("full", "tiny"), default="full",
                   help="denoiser size whose structure the DAG is traced from (full: on the meta device)")
    p.add_argument("--unit-level", default="block", choices=("block", "node", "none"),
                   help="hop read-outs use the outputs of autobuild.dag units(graph, LEVEL) (default block, as the "
                        "demo and benchmarks do); none: global means over the layer nodes")
    p.add_argument("--learn", choices=("auto", "target"), default="auto",
                   help="auto: learn the target's one measured key (log FID) and read avg_bits & co exactly from "
                        "each configuration; target: learn the target expression itself (the reference)")
    p.add_argument("--missing", choices=("error", "fp16"), default="error",
                   help="a layer absent from a record's config: fail, or treat it as unquantized")
    p.add_argument("--output_shifts", action="store_const", const=True, default=None,
                   help="first measure each (layer, option)'s output change with the family's weights and "
                        "multiquantizer (2 x layers x options denoiser forwards of 16 inputs on the CPU: 25-55 s on "
                        "the MNIST testbeds): the GNN's layer nodes read it and the prior may be ridge_shift, one-hot "
                        "options plus a quadratic form of the summed change (autobuild/output_shift.py), which a "
                        "validation picks only where it fits better. Default: measured when the multiquantizer file "
                        "exists, the denoiser has at most 50M parameters and the weights load, else trained without "
                        "(said, and recorded in metrics.json); --output_shifts: required at any size (a missing "
                        "file is an error); --no_output_shifts: never")
    p.add_argument("--no_output_shifts", dest="output_shifts", action="store_const", const=False,
                   help="train without output shifts (see --output_shifts)")
    p.add_argument("--pretrained", default=None, help="with --output_shifts: the denoiser weights (default: the "
                                                       "family's)")
    p.add_argument("--mq", default=None, help="with --output_shifts: the multiquantizer the cache was scored with "
                                              "(default multiquantizers/<model>_mq.safetensors)")
    p.add_argument("--shift_components", type=component_counts, default=(32, 64),
                   help="leading components of the output-change signature in the ridge_shift prior, comma "
                        "separated: each count is a candidate, picked by the prior's inner CV (default 32,64); the "
                        "GNN's layer nodes read the largest")
    return p


def component_counts(text: str) -> tuple[int, ...]:
    """``"32,64"`` -> (32, 64): an argparse type for --shift_components (0 alone: no shift prior)."""
    try:
        counts = tuple(sorted({int(v) for v in str(text).split(",") if v.strip()}))
    except ValueError:
        counts = ()
    if not counts or min(counts) < 0:
        raise argparse.ArgumentTypeError(f"expected comma-separated non-negative integers such as 32,64, got {text!r}")
    return counts


def family_graph(model: str, size: str = "full"):
    """The family's DAG (``autobuild.dag.build_dag``): traced from the full-size denoiser on the meta
    device, or the tiny one on the CPU."""
    from multiquant.families import get_family

    from autobuild.dag import build_dag

    family = get_family(model)
    denoiser = family.build(size, device="meta" if size == "full" else "cpu")
    return build_dag(denoiser, family)


# The default measures output changes only of denoisers up to this size: one CPU forward per layer and option is
# 21-32 s in all on the MNIST testbeds (0.7M / 4.6M parameters) but hours on a DiT-XL or PixArt (600M+).
AUTO_SHIFT_MAX_PARAMS = 50_000_000


def measured_signature(model: str, wanted: bool | None, pretrained=None, mq=None, tiny: bool = False,
                       log=print, max_params: int = AUTO_SHIFT_MAX_PARAMS) -> tuple[dict | None, dict]:
    """The output-change signature (autobuild.output_shift.SIGNATURE) of the family's denoiser under its
    multiquantizer, and how it was measured (or why not) for the predictor's recorded options. ``wanted``: True
    measures or fails, False never measures, None (the default) measures when the multiquantizer file exists,
    the denoiser has at most ``max_params`` parameters and the weights load, and otherwise says why it trains
    without."""
    if wanted is False:
        return None, {"measured": False, "reason": "--no_output_shifts"}
    from autobuild.output_shift import family_shift_tables
    from multiquant.evaluate import default_multiquantizer_path
    from multiquant.families import family_flag, get_family

    family = get_family(model)
    path = Path(mq) if mq else default_multiquantizer_path(family, tiny)
    try:
        if not path.is_file():  # checked before loading the weights, which can be large
            from multiquant.errors import MissingFileError

            raise MissingFileError(f"no multiquantizer at {path} (build it with `qua2sedimo multiquantizer "
                                   f"{family_flag(family)}{' --tiny' if tiny else ''}` or pass --mq)")
        if wanted is None:  # counted on the meta device, before any weights are read
            size = sum(p.numel() for p in family.build("tiny" if tiny else "full",
                                                       device="cpu" if tiny else "meta").parameters())
            if size > max_params:
                raise UserError(f"the denoiser has {size / 1e6:.0f}M parameters (the default measures up to "
                                f"{max_params / 1e6:.0f}M: one CPU forward per layer and option would take long)")
        _, signature, info = family_shift_tables(family, pretrained, path, tiny=tiny, per_channel=False,
                                                 log=log)
    except (UserError, OSError) as err:
        if wanted:
            raise
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        log(f"output shifts not measured ({reason}): training without them (--output_shifts makes this an error, "
            f"--no_output_shifts skips the attempt)")
        return None, {"measured": False, "reason": reason}
    log(f"output shifts of {len(signature)} layers measured in {info['seconds'] + info['signature_seconds']:.0f}s "
        f"(--no_output_shifts skips them)")
    return signature, {"measured": True, **info}


def _units(graph, level: str | None):
    if level in (None, "none"):
        return None
    from autobuild.dag import units

    return units(graph, level)


def run_train_predictor(args) -> int:
    from autobuild.train import TrainOptions, known_term_warning, learned_validation, train_predictor

    from multiquant.store import load_quant_cache

    records = load_quant_cache(args.cache, require_config=True)  # restricted unpickler, records checked
    graph = family_graph(args.model, "tiny" if args.tiny else args.size)
    signature, source = measured_signature(args.model, args.output_shifts, args.pretrained, args.mq,
                                           tiny=bool(args.tiny) or args.size == "tiny")
    options = TrainOptions(hidden=args.hidden, layers=args.layers, heads=args.heads, patience=args.patience,
                           workers=args.workers, threads=args.threads, missing=args.missing, learn=args.learn,
                           shift_signature=signature, shift_components=args.shift_components, shift_source=source)
    print(f"{len(records)} records, graph: {graph.number_of_nodes()} nodes, {graph.number_of_edges()} edges")
    metrics = train_predictor(records, graph, args.target, loss=args.loss, folds=args.folds, epochs=args.epochs,
                              batch_size=args.batch_size, seed=args.seed, device=args.device, out_dir=args.out,
                              units=_units(graph, args.unit_level), options=options)
    print(f"held-out SRCC {metrics['srcc_mean']:.4f}, NDCG@10 {metrics['ndcg10_mean']:.4f} "
          f"({metrics['timings']['wall_seconds']:.0f}s)")
    learned_srcc, learned_what = learned_validation(metrics)
    if learned_what != str(metrics.get("target")):
        print(f"  learned part {learned_what}: held-out SRCC {learned_srcc:.4f}")
    for name, b in metrics["baselines"].items():
        srcc = b["srcc_mean"]
        print(f"  baseline {name:>20}: SRCC {srcc:.4f}" if not math.isnan(srcc) else f"  baseline {name}: n/a",
              f"NDCG@10 {b['ndcg10_mean']:.4f}")
    warning = known_term_warning(metrics)
    if warning:
        print(warning, file=sys.stderr)
    print(f"ensemble and metrics.json written to {args.out}")
    return 0

