"""The qua2sedimo command: one entry point over the whole pipeline.

Each half registers its subcommands (``multiquant.commands.register``, ``autobuild.commands.register``); this
module collects them, adds the demo, and gives every command the same treatment: both flag spellings
(``--num_images`` and ``--num-images``), ``--model``/``--family`` resolved to a registered family, and one
error handling (bad input: ``error: <one line>`` on stderr, exit 2; ``--debug`` shows the traceback).
"""
from __future__ import annotations

import argparse
import json
import pickle
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


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def add_spelling_aliases(parser: argparse.ArgumentParser) -> None:
    """Accept ``--num-images`` for ``--num_images`` and the other way round, for every long flag."""
    for action in list(parser._actions):
        for flag in list(action.option_strings):
            if not flag.startswith("--"):
                continue
            name = flag[2:]
            for other in (name.replace("_", "-"), name.replace("-", "_")):
                alias = "--" + other
                if alias != flag and alias not in parser._option_string_actions:
                    action.option_strings.append(alias)
                    parser._option_string_actions[alias] = action


def build_parser() -> argparse.ArgumentParser:
    from autobuild import commands as autobuild_commands
    from multiquant import commands as multiquant_commands

    from multiquant.cli_flags import ArgumentParser

    parser = ArgumentParser(prog="qua2sedimo", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    multiquant_commands.register(sub)
    autobuild_commands.register(sub)

    p = sub.add_parser("demo", help="measured answer on an embedded MNIST testbed (FP16, uniform 4-bit, best "
                                    "~3.5-bit configuration, sample grid), on a CPU in minutes")
    p.add_argument("--model", default="mnist_dit", choices=("mnist_dit", "mnist_unet"),
                   help="embedded testbed: the DiT (default) or the plain-module U-Net DDPM")
    p.add_argument("--outdir", default="demo_out", help="output folder (default ./demo_out)")
    p.add_argument("--quick", action="store_true", help="128 digits per configuration instead of 256 (noisier FID)")
    p.add_argument("--full", action="store_true", help="the dataset's 1,000 digits, and train the predictor on the "
                                                       "shipped dataset (several minutes)")
    p.add_argument("--num_images", type=int, default=None, help="digits per configuration (overrides the presets)")
    p.add_argument("--mq", default=None, help="multiquantizer checkpoint (default: the shipped one)")
    p.add_argument("--device", default=None, help="cpu (default) or cuda")
    p.set_defaults(func=cmd_demo)

    for subparser in _subparsers(parser).values():
        subparser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                               help="show the full traceback of an error")
        add_spelling_aliases(subparser)
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


def resolve_model_flags(args: argparse.Namespace) -> None:
    """``--family SPEC`` (or ``--model`` given a spec or an entry-point name): import and register the family, and
    set ``args.model`` to its name, so every command finds it with ``get_family(args.model)``."""
    from multiquant.families import resolve_family

    text = getattr(args, "family", None) or getattr(args, "model", None)
    if text:
        args.model = resolve_family(text).name


def user_error_message(err: BaseException) -> str | None:
    """One line for an error caused by what the user gave; ``None`` for a bug (which keeps its traceback)."""
    from multiquant.errors import UserError

    if isinstance(err, UserError):
        return str(err)
    if isinstance(err, (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)) and err.filename:
        return f"{err.strerror or type(err).__name__}: {err.filename}"
    if isinstance(err, json.JSONDecodeError):
        return f"a JSON file is not valid JSON ({err.msg} at line {err.lineno} column {err.colno}): fix or recreate it"
    if isinstance(err, (pickle.UnpicklingError, EOFError)):
        return f"a pickle file is truncated or corrupt ({type(err).__name__}: {err}): recreate it"
    if type(err).__name__ == "SafetensorError":  # safetensors' header/format errors
        return f"a .safetensors file is truncated or not a safetensors file ({err}): recreate it"
    if isinstance(err, RecursionError):
        return "an input is nested too deeply (e.g. the --target expression): simplify it"
    if isinstance(err, OverflowError):
        return f"a number in the input is too large ({err}): use a smaller value"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    argv = _join_dash_values(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        resolve_model_flags(args)
        return args.func(args) or 0
    except Exception as err:
        message = None if args.debug else user_error_message(err)
        if message is None:
            raise  # a bug (or --debug): the whole traceback, exit 1
        print(f"error: {' '.join(message.split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
