"""The ``qua2sedimo`` command: one entry point over the whole pipeline.

Each half registers its subcommands (``multiquant.commands.register``, ``autobuild.commands.register``); this
module collects them, adds the demo, and runs the chosen one.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

# flags whose value may start with '-' (a target expression such as "-1*FID-GT-1k"), which argparse would
# otherwise read as an option
DASH_VALUE_FLAGS = ("--target",)


def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(outdir=Path(args.outdir), quick=args.quick, full=args.full, device=args.device,
             num_images=args.num_images, mq=args.mq, model=args.model)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from autobuild import commands as autobuild_commands
    from multiquant import commands as multiquant_commands

    parser = argparse.ArgumentParser(prog="qua2sedimo", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    multiquant_commands.register(sub)
    autobuild_commands.register(sub)

    p = sub.add_parser("demo", help="measured answer on an embedded MNIST testbed (FP16, uniform 4-bit, best "
                                    "~3.5-bit configuration, sample grid), on a CPU in minutes")
    p.add_argument("--model", default="mnist_dit", choices=("mnist_dit", "mnist_unet"),
                   help="embedded testbed: the DiT (default) or the plain-module U-Net DDPM")
    p.add_argument("--outdir", default="demo_out", help="output folder (default ./demo_out)")
    p.add_argument("--quick", action="store_true", help="200 digits per configuration instead of 500 (noisier FID)")
    p.add_argument("--full", action="store_true", help="the dataset's 1,000 digits, and train the predictor on the "
                                                       "shipped dataset (several minutes)")
    p.add_argument("--num_images", type=int, default=None, help="digits per configuration (overrides the presets)")
    p.add_argument("--mq", default=None, help="multiquantizer checkpoint (default: the shipped one)")
    p.add_argument("--device", default=None, help="cpu (default) or cuda")
    p.set_defaults(func=cmd_demo)
    return parser


def _join_dash_values(argv: Sequence[str]) -> list[str]:
    """``--target "-1*FID-GT-1k"`` -> ``--target=-1*FID-GT-1k``."""
    out, argv = [], list(argv)
    i = 0
    while i < len(argv):
        if argv[i] in DASH_VALUE_FLAGS and i + 1 < len(argv):
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


def main(argv: Sequence[str] | None = None) -> int:
    argv = _join_dash_values(sys.argv[1:] if argv is None else argv)
    from multiquant.errors import UserError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except (UserError, ValueError, KeyError, FileNotFoundError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
