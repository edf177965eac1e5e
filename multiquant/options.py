"""The option vocabulary: what ``"mse-4"``, ``"kmeans_all-3"`` and ``"fp16"`` mean, in one place.

An option is a quantization method at a bit width, written ``"<method>-<bits>"`` (the reference's spelling),
or ``"fp16"``: the layer stays unquantized. :data:`METHODS` is the method registry (option spelling, the
paper's name, the shape of the dequantization table and so its storage cost); :class:`Option` parses and
formats option strings; :class:`OptionTable` holds every layer's options with their bytes and errors
(the reference ``_mq.pkl`` form) and gives a configuration's size and average bits.

Storage cost (the reference's formulas): ``numel * bits / 8`` bytes of codes plus the table at FP precision:
UAQ stores a scale and a zero-point per output channel, K-Means-C a 2^b codebook per channel, K-Means-A one
2^b codebook. An unquantized layer costs ``numel * fp_prec / 8``. ``avg_bits = fp_prec * size / fp_bytes``.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from .errors import InputError, MissingFileError, UserError

__all__ = ["Method", "METHODS", "METHOD_NAMES", "DEFAULT_METHOD", "Option", "OptionError", "FP_OPTION", "FP_BITS",
           "MIN_BITS", "MAX_BITS", "option_of", "options_for", "avg_bits_of", "size_budget", "OptionTable"]

FP_OPTION = "fp16"  # the unquantized layer, whatever the model's precision (the reference's spelling)
FP_BITS = 16  # "16 bits" means the unquantized weight
MIN_BITS, MAX_BITS = 2, 8  # widths the packed codes support
# Other spellings of "unquantized" that hand-written predictor inputs use; only Option.parse(lenient=True).
_FP_ALIASES = frozenset({"fp16", "fp", "fp32", "bf16", "none", "fp-16", "fp-32", "fp16-16"})


class OptionError(UserError, ValueError):
    """A malformed option string (not ``method-bits`` with a known method and width, nor ``fp16``)."""


@dataclass(frozen=True)
class Method:
    """One quantization method. ``codebook``: the table is 2^b learned centroids (K-Means) rather than a
    uniform grid given by (scale, zero-point); ``per_channel``: one table per output channel, else one for
    the whole tensor."""

    name: str  # option spelling, as the reference writes it
    label: str  # the paper's name
    codebook: bool
    per_channel: bool

    @property
    def params(self) -> tuple[str, ...]:
        """Tensors stored beside the packed codes."""
        return ("codebook",) if self.codebook else ("scale", "zero")

    def table_rows(self, channels: int) -> int:
        return channels if self.per_channel else 1

    def overhead_bits(self, bits: int, channels: int, fp_prec: int) -> int:
        """Bits of the dequantization table(s) at FP precision."""
        entries = 2 ** bits if self.codebook else 2  # centroids, or (scale, zero-point)
        return entries * self.table_rows(channels) * fp_prec

    def gemm_bits(self, bits: int) -> int:
        """Weight bits the matmul sees: a codebook lookup yields FP16 weights, a uniform grid keeps b bits."""
        return FP_BITS if self.codebook else bits


METHODS: "OrderedDict[str, Method]" = OrderedDict((m.name, m) for m in (
    Method("mse", "UAQ", codebook=False, per_channel=True),
    Method("kmeans", "K-Means-C", codebook=True, per_channel=True),
    Method("kmeans_all", "K-Means-A", codebook=True, per_channel=False),
))
METHOD_NAMES = tuple(METHODS)  # ("mse", "kmeans", "kmeans_all"): the multiquantizer's order
DEFAULT_METHOD = "mse"  # UAQ, the reference's default


@dataclass(frozen=True)
class Option:
    """A method at a bit width, or the unquantized layer (``method is None``, ``bits == 16``)."""

    method: str | None
    bits: int

    def __post_init__(self):
        if self.method is None:
            if self.bits != FP_BITS:
                raise OptionError(f"an unquantized option has {FP_BITS} bits, got {self.bits!r}")
            return
        if self.method not in METHODS:
            raise OptionError(f"unknown quantization method {self.method!r}; expected one of {METHOD_NAMES}")
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not MIN_BITS <= self.bits <= MAX_BITS:
            raise OptionError(f"bits must be an integer in {MIN_BITS}..{MAX_BITS}, got {self.bits!r}")

    # ------------------------------------------------------------------------------ text
    @classmethod
    def parse(cls, text, lenient: bool = False) -> "Option":
        """``"kmeans_all-3"`` -> ``Option("kmeans_all", 3)``; ``"fp16"`` -> the unquantized option.

        ``lenient`` also takes any case, surrounding spaces, ``<method>-16`` and other spellings of FP
        (``fp``, ``fp32``, ``bf16``, ``none``): what hand-written predictor inputs use."""
        if isinstance(text, Option):
            return text
        text = str(text)
        if lenient:
            text = text.strip().lower()
            if text in _FP_ALIASES:
                return FP
        if text == FP_OPTION:
            return FP
        method, sep, bits = text.rpartition("-")
        if not sep or method not in METHODS or not bits.isdigit():
            raise OptionError(f"malformed option {text!r}: expected 'method-bits' with method in {METHOD_NAMES} "
                              f"(e.g. 'mse-4', 'kmeans_all-3') or {FP_OPTION!r}")
        if lenient and int(bits) == FP_BITS:
            return FP
        return cls(method, int(bits))

    def __str__(self) -> str:
        return FP_OPTION if self.method is None else f"{self.method}-{self.bits}"

    @classmethod
    def of_bits(cls, method: str, bits: int) -> "Option":
        """``method`` at ``bits``; 16 bits is the unquantized option."""
        return FP if bits == FP_BITS else cls(method, int(bits))

    # ------------------------------------------------------------------------------ meaning
    @property
    def is_fp(self) -> bool:
        return self.method is None

    @property
    def spec(self) -> Method:
        if self.method is None:
            raise OptionError(f"{FP_OPTION!r} has no quantization method")
        return METHODS[self.method]

    @property
    def label(self) -> str:
        """``K-Means-C 3-bit``; ``FP16``."""
        return "FP16" if self.is_fp else f"{self.spec.label} {self.bits}-bit"

    @property
    def gemm_bits(self) -> int:
        return FP_BITS if self.is_fp else self.spec.gemm_bits(self.bits)

    def nbytes(self, numel: int, channels: int, fp_prec: int) -> int:
        """Bytes of one layer of ``numel`` weights and ``channels`` output channels under this option."""
        if self.is_fp:
            return int(numel * fp_prec / 8)
        return int(numel * self.bits / 8) + self.spec.overhead_bits(self.bits, channels, fp_prec) // 8

    def sort_key(self) -> tuple:
        """High bits first, then the registry's method order (mse-4, kmeans-4, kmeans_all-4, mse-3, ...); FP last."""
        if self.is_fp:
            return (0, len(METHODS), FP_OPTION)
        return (-self.bits, METHOD_NAMES.index(self.method), str(self))


FP = Option(None, FP_BITS)


def option_of(entry):
    """The option of a configuration value: an option string, or a quant-cache entry
    ``[option, fp_bytes, quant_bytes, error]``."""
    return entry[0] if isinstance(entry, (list, tuple)) else entry


def options_for(methods=METHOD_NAMES, bits=(4, 3)) -> list[str]:
    """Every method at every width, widths outermost (the multiquantizer's option order)."""
    return [str(Option(m, int(b))) for b in bits for m in methods]


def avg_bits_of(size: int, fp_bytes: int, fp_prec: int) -> float:
    """Average bits of ``size`` quantized bytes (overhead included) over ``fp_bytes`` FP bytes."""
    return fp_prec * size / fp_bytes


def size_budget(avg_bits: float, fp_bytes: int, fp_prec: int) -> int:
    """Largest size (bytes) with ``avg_bits_of(size) <= avg_bits`` (up to float round-off)."""
    return int(math.floor(avg_bits * fp_bytes / fp_prec + 1e-9))


# ------------------------------------------------------------------------------------------ option table
@dataclass
class OptionTable:
    """Per-layer options with their sizes: ``{key: {option: [option, fp_bytes, quant_bytes, error]}}`` (the
    reference ``_mq.pkl`` form; ``MultiQuantizer.table``) plus the precision sizes are costed at."""

    table: dict
    fp_prec: int = 16

    @property
    def keys(self) -> list[str]:
        return list(self.table)

    @property
    def options(self) -> list[str]:
        """Options every layer has, in the first layer's order (e.g. mse-4, kmeans-4, ..., kmeans_all-3)."""
        first = list(next(iter(self.table.values())))
        return [o for o in first if all(o in per_key for per_key in self.table.values())]

    def layer_fp_bytes(self, key: str) -> int:
        return int(next(iter(self.table[key].values()))[1])

    @property
    def fp_bytes(self) -> int:
        """FP bytes of every listed layer (tied copies included): the denominator of ``avg_bits``."""
        return int(sum(self.layer_fp_bytes(k) for k in self.table))

    def entry(self, key: str, option: str) -> list:
        """``[option, fp_bytes, quant_bytes, error]`` of one layer; an unquantized layer costs its FP bytes."""
        if option == FP_OPTION:
            fp = self.layer_fp_bytes(key)
            return [FP_OPTION, fp, fp, 0.0]
        entry = self.table[key][option]
        return [entry[0], int(entry[1]), int(entry[2]), float(entry[3])]

    def quant_bytes(self, key: str, option: str) -> int:
        return self.entry(key, option)[2]

    def record(self, config: Mapping[str, str], fp_bytes: int | None = None) -> dict:
        """The reference's per-configuration statistics: per-layer ``[option, fp_bytes, quant_bytes, error]``,
        ``quantized_size`` (bytes incl. overhead), ``quantized_error`` and ``avg_bits``. ``fp_bytes``: the
        denominator (default: the table's). The error is the correctly rounded sum (``math.fsum``), so it is
        the same on every Python (3.12's ``sum`` compensates, older ones do not)."""
        per_layer = OrderedDict((key, self.entry(key, option)) for key, option in config.items())
        size = sum(v[2] for v in per_layer.values())
        return {"config": per_layer, "quantized_size": int(size),
                "quantized_error": math.fsum(v[3] for v in per_layer.values()),
                "avg_bits": avg_bits_of(size, self.fp_bytes if fp_bytes is None else fp_bytes, self.fp_prec)}

    def avg_bits(self, config: Mapping[str, str]) -> float:
        """``fp_prec * sum(quant_bytes) / fp_bytes`` of a full ``{key: option}`` configuration."""
        return avg_bits_of(sum(self.quant_bytes(k, o) for k, o in config.items()), self.fp_bytes, self.fp_prec)

    def min_avg_bits(self, bits: int | None = None) -> float:
        """Every layer at its cheapest option (of width ``bits`` when given)."""
        return avg_bits_of(sum(min(e[2] for o, e in v.items() if bits is None or Option.parse(o).bits == bits)
                               for v in self.table.values()), self.fp_bytes, self.fp_prec)

    def max_avg_bits(self) -> float:
        """Every layer at its dearest option."""
        return avg_bits_of(sum(max(e[2] for e in v.values()) for v in self.table.values()), self.fp_bytes,
                           self.fp_prec)

    @property
    def widths(self) -> list[int]:
        """Bit widths of the quantized options every layer has, ascending."""
        return sorted({Option.parse(o).bits for o in self.options} - {FP_BITS})

    def digest(self) -> str:
        text = json.dumps([[k, [[str(e[0]), int(e[1]), int(e[2]), float(e[3])] for e in v.values()]]
                           for k, v in self.table.items()])
        return hashlib.sha256(f"{self.fp_prec}|{text}".encode()).hexdigest()[:16]

    # -------------------------------------------------------------------------------- construction
    @classmethod
    def from_source(cls, source, fp_prec: int | None = None) -> "OptionTable":
        """``source``: an :class:`OptionTable`, a ``MultiQuantizer``, its ``.safetensors`` path, an exported
        table (``.json`` / ``_mq.pkl``), a table dict, or scored records (``quant_cache`` list: the table is
        collected from the entries the records carry)."""
        if isinstance(source, OptionTable):
            return source
        if hasattr(source, "table") and hasattr(source, "fp_prec"):  # MultiQuantizer
            return cls(dict(source.table), int(source.fp_prec))
        if isinstance(source, (str, os.PathLike)):
            return cls._from_path(Path(source), fp_prec)
        if isinstance(source, Mapping):
            return cls(dict(source), fp_prec or 16)
        if isinstance(source, Sequence):
            return cls.from_records(source, fp_prec or 16)
        raise TypeError(f"cannot read an option table from {type(source).__name__}")

    @classmethod
    def _from_path(cls, path: Path, fp_prec: int | None) -> "OptionTable":
        if not path.exists():
            raise MissingFileError(f"option table {path} does not exist: pass the multiquantizer "
                                   f"(multiquantizers/<model>_mq.safetensors) or its exported table")
        if path.suffix == ".safetensors" or path.is_dir():
            from .checkpoint import MultiQuantizer  # the checkpoint builds on this module

            mq = MultiQuantizer.from_pretrained(path)
            return cls(dict(mq.table), int(mq.fp_prec))
        if path.suffix == ".json":
            from .utils import read_json

            return cls(read_json(path, "option table"), fp_prec or 16)
        from .safe_pickle import safe_load

        data = safe_load(path)
        if isinstance(data, list):
            return cls.from_records(data, fp_prec or 16)
        return cls(dict(data), fp_prec or 16)

    @classmethod
    def from_records(cls, records: Sequence[Mapping], fp_prec: int = 16) -> "OptionTable":
        """The table seen in scored configurations (each record's ``config`` holds its layers' entries).
        Raises if some layer never appears with some option (score more configurations, or pass the
        multiquantizer)."""
        table: dict[str, dict[str, list]] = {}
        for record in records:
            for key, entry in record["config"].items():
                table.setdefault(key, {}).setdefault(str(entry[0]), [str(entry[0]), int(entry[1]), int(entry[2]),
                                                                     float(entry[3])])
        if not table:
            raise InputError("no configurations to collect an option table from: pass the multiquantizer (--mq)")
        options = sorted({o for per_key in table.values() for o in per_key}, key=lambda o: Option.parse(o).sort_key())
        gaps = [(k, o) for k, per_key in table.items() for o in options if o not in per_key]
        if gaps:
            raise InputError(f"the records never use option {gaps[0][1]!r} for layer {gaps[0][0]!r} "
                             f"({len(gaps)} gaps): pass the multiquantizer (--mq) for the full option table")
        return cls({k: {o: per_key[o] for o in options} for k, per_key in table.items()}, fp_prec)
