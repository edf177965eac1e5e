"""The flags every subcommand that takes a model shares, declared once.

``--model NAME`` or ``--family SPEC`` (one of them; the ``qua2sedimo`` command resolves ``--family`` with
:func:`multiquant.families.resolve_family` and sets ``args.model`` to the family's name before the command runs),
plus ``--pretrained``, ``--tiny`` and ``--device`` where the command uses them, and SDXL's refiner flags.
"""
from __future__ import annotations

import argparse

class ArgumentParser(argparse.ArgumentParser):
    """argparse with one change: an abbreviation shared only by spellings of one flag (``--out`` for ``--outdir``,
    ``--output_dir`` and ``--output-dir``) names that flag instead of being refused as ambiguous; abbreviations of
    different flags stay ambiguous. Subparsers inherit the class."""

    def _get_option_tuples(self, option_string):
        seen, unique = set(), []
        for option in super()._get_option_tuples(option_string):  # (action, flag, ...) per matching spelling
            if id(option[0]) not in seen:
                seen.add(id(option[0]))
                unique.append(option)
        return unique


FAMILY_HELP = ("your own family: pkg.module:ATTR or path/to/file.py:ATTR (a FamilySpec, or a callable returning one), "
               "or a name published in the 'qua2sedimo.families' entry-point group")


def add_model_flags(p: argparse.ArgumentParser, required: bool = True, weights: bool = True, tiny: bool = True,
                    device: bool = True, model_help: str = "model family (qua2sedimo families lists them)",
                    tiny_help: str = "use a tiny random denoiser (tests, smoke runs)") -> argparse.ArgumentParser:
    """``--model``/``--family`` (one of them, ``required`` or not) and, when the command uses them, ``--pretrained``
    (``weights``), ``--tiny`` and ``--device``."""
    group = p.add_mutually_exclusive_group(required=required)
    group.add_argument("--model", default=None, help=model_help)
    group.add_argument("--family", default=None, metavar="SPEC", help=FAMILY_HELP)
    if weights:
        p.add_argument("--pretrained", default=None,
                       help="local pipeline/denoiser directory, weights file or hub id (default: the family's)")
    if tiny:
        p.add_argument("--tiny", action="store_true", help=tiny_help)
    if device:
        p.add_argument("--device", default=None, help="cuda / cpu (default: cuda if available)")
    return p


def add_activation_args(p: argparse.ArgumentParser) -> None:
    """``--quant_act`` and ``--act_bit``: online token-wise quantization of every Linear/Conv input."""
    from .activations import ACT_BITS_CHOICES

    p.add_argument("--quant_act", action="store_true",
                   help="online token-wise activation quantization of every Linear/Conv input (attention matmuls "
                        "stay FP)")
    p.add_argument("--act_bit", type=int, default=8, choices=list(ACT_BITS_CHOICES),
                   help="activation bits with --quant_act (default 8)")


def act_bits_arg(args) -> int | None:
    """The activation bits the flags ask for (None: FP activations)."""
    return args.act_bit if getattr(args, "quant_act", False) else None


def add_refiner_args(p: argparse.ArgumentParser) -> None:
    """SDXL's FP16 refiner (``--refiner`` / ``--no_refiner``), on the commands that generate images."""
    p.add_argument("--refiner", default=None, help="SDXL: local refiner pipeline directory or hub id "
                                                   "(default: the family's refiner, kept FP16)")
    p.add_argument("--no_refiner", action="store_true", help="SDXL: the base model runs the whole schedule")


def refiner_arg(args):
    """None (the family's protocol), False (--no_refiner) or the --refiner location."""
    if getattr(args, "no_refiner", False):
        if getattr(args, "refiner", None):
            from .errors import InputError

            raise InputError("give --refiner DIR or --no_refiner, not both")
        return False
    return getattr(args, "refiner", None)


def default_device(arg: str | None = None) -> str:
    """``arg``, else the one default (``multiquant.utils.default_device``: CUDA when there, else the CPU), as text."""
    from .utils import default_device as _default

    return arg if arg else str(_default())
