"""The ``qua2sedimo`` command: one entry point over the whole pipeline.

Each subcommand is a thin argparse front over a library function; per-model scripts in
``multiquant/scripts/`` call the same functions with the family preset.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import constants


def _add_model_args(p: argparse.ArgumentParser, model_required: bool = True) -> None:
    p.add_argument("--model", required=model_required, help="model family (qua2sedimo families lists them)")
    p.add_argument("--pretrained", default=None, help="local pipeline/denoiser directory or hub id (default: the family's)")
    p.add_argument("--tiny", action="store_true", help="use a tiny random denoiser (tests, smoke runs)")
    p.add_argument("--device", default=None, help="cuda / cpu (default: cuda if available)")


def _device(arg):
    import torch

    return arg or ("cuda" if torch.cuda.is_available() else "cpu")


def load_denoiser(args):
    """The family spec and its denoiser as the flags ask (tiny random, or trained weights)."""
    import torch

    from .families import get_family

    family = get_family(args.model)
    device = _device(args.device)
    dtype = family.dtype if device != "cpu" else torch.float32  # fp16 matmuls are slow or missing on CPUs
    if args.tiny:
        return family, family.build("tiny", device=device, dtype=dtype)
    return family, family.load(args.pretrained, dtype=dtype, device=device)


# ------------------------------------------------------------------------------------------ inspect
def cmd_inspect(args) -> int:
    from .families import get_family
    from .layers import excluded_layers, fp_bytes, quantizable_layers

    family = get_family(args.model)
    if args.full_size:
        model = family.build("full", device="meta")
    else:
        family, model = load_denoiser(args)
    layers = quantizable_layers(model, family)
    info = {
        "model": family.name, "num_layers": len(layers), "fp_bytes": fp_bytes(layers, family.fp_prec),
        "fp_prec": family.fp_prec, "fp_bytes_dedup": fp_bytes(layers, family.fp_prec, dedup=True),
        "num_search_layers": sum(1 for r in layers if not r.tied_to),
        "num_split_halves": sum(1 for r in layers if r.cols is not None),
        "num_tied": sum(1 for r in layers if r.tied_to), "excluded": excluded_layers(model, family),
        "reference_fp_bytes": family.reference_fp_bytes,
        "num_weights": sum(r.numel for r in layers),
    }
    if args.layers:
        info["layers"] = [{"key": r.key, "shape": list(r.shape), "tied_to": r.tied_to} for r in layers]
    if args.json:
        print(json.dumps(info, indent=1))
    else:
        for k, v in info.items():
            print(f"{k:>20}: {v}")
    return 0


def cmd_families(args) -> int:
    from .families import get_family, list_families

    for name in list_families():
        f = get_family(name)
        print(f"{name:14} {f.hub_id or f.default_pretrained}  {f.resolution}px  {f.steps} steps  guidance {f.guidance}")
    return 0


# ----------------------------------------------------------------------------------- multiquantizer
def cmd_multiquantizer(args) -> int:
    from .checkpoint import MultiQuantizer

    family, model = load_denoiser(args)
    bits = tuple(int(b) for b in args.bits.split(","))
    mq = MultiQuantizer.build(model, family, bits=bits, seed=args.seed, kmeans_iters=args.kmeans_iters,
                              model_id=args.pretrained, show_progress=True)
    out = Path(args.out) if args.out else Path(constants.MULTIQUANTIZER_DIR) / f"{family.name}_mq.safetensors"
    path = mq.save_pretrained(out)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB, {len(mq.layers)} layers, "
          f"{mq.manifest['build_seconds']:.1f} s)")
    if args.export_table:
        print(f"wrote {mq.export_option_table(args.export_table)}")
    return 0


def cmd_export_table(args) -> int:
    from .checkpoint import MultiQuantizer

    mq = MultiQuantizer.from_pretrained(args.checkpoint)
    print(f"wrote {mq.export_option_table(args.out)}")
    return 0


# ------------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qua2sedimo", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("families", help="list the registered model families")
    p.set_defaults(func=cmd_families)

    p = sub.add_parser("inspect", help="quantizable layers and FP size of a denoiser")
    _add_model_args(p)
    p.add_argument("--full-size", action="store_true", help="full-size architecture on the meta device (no weights)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--layers", action="store_true", help="also list every layer")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("multiquantizer", help="build the multiquantizer checkpoint (all options of all layers)")
    _add_model_args(p)
    p.add_argument("--bits", default="4,3")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kmeans_iters", type=int, default=100)
    p.add_argument("--out", default=None, help="file or directory (default multiquantizers/<model>_mq.safetensors)")
    p.add_argument("--export_table", default=None, help="also write the option table (<model>_mq.pkl or .json)")
    p.set_defaults(func=cmd_multiquantizer)

    p = sub.add_parser("export-table", help="write a checkpoint's per-layer option table (_mq.pkl / .json)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_export_table)

    for register in _EXTENSIONS:
        register(sub)
    return parser


_EXTENSIONS: list = []  # subcommands registered by other modules (see below)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except (ValueError, KeyError, FileNotFoundError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
