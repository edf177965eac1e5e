"""Quantizable weight layers of a denoiser, with the reference's key names.

Every ``nn.Linear``/``nn.Conv1d``/``nn.Conv2d`` weight of the denoiser is one quantizable layer, keyed
``model.<module path>.weight_quantizer``. A split layer (its input is a channel concat) is two layers:
``...weight_quantizer`` for input channels ``[:split]`` and ``...weight_quantizer_0`` for ``[split:]``.
Excluded layers stay FP and are outside the search space; tied layers share the canonical layer's
choice and codes (the configuration still lists them, for file compatibility).
"""
from __future__ import annotations

from dataclasses import dataclass
from math import prod

import torch
from torch import nn

from .errors import UserError
from .families import FamilySpec

QUANTIZABLE_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d)


@dataclass(frozen=True)
class LayerRef:
    key: str  # quantizer key, e.g. "model.transformer_blocks.0.attn1.to_q.weight_quantizer"
    path: str  # module path inside the denoiser
    cols: tuple[int, int] | None  # input-channel slice [start, stop) of a split half; None = whole weight
    shape: tuple[int, ...]  # shape of this (half) weight
    tied_to: str | None = None  # key of the canonical layer this one is a copy of

    @property
    def numel(self) -> int:
        return prod(self.shape)

    @property
    def channels(self) -> int:
        return self.shape[0]

    def weight(self, model: nn.Module) -> torch.Tensor:
        """A view of this layer's (half) weight inside ``model``."""
        w = model.get_submodule(self.path).weight
        return w if self.cols is None else w[:, self.cols[0]:self.cols[1]]


def quantizer_key(path: str, half: int = 0) -> str:
    return f"model.{path}.weight_quantizer" + ("_0" if half == 1 else "")


def quantizable_layers(model: nn.Module, family: FamilySpec) -> list[LayerRef]:
    """All quantizable layers in module traversal order (the reference's order)."""
    splits = family.splits(model)
    layers = []
    for path, module in model.named_modules():
        if not isinstance(module, QUANTIZABLE_TYPES) or family.is_excluded(path):
            continue
        shape = tuple(module.weight.shape)
        canonical = family.canonical_path(path)
        if path in splits:
            s = splits[path]
            if not 0 < s < shape[1]:
                raise ValueError(f"split {s} of {path} is outside its {shape[1]} input channels")
            halves = [(0, s), (s, shape[1])]
            for half, (a, b) in enumerate(halves):
                tied = quantizer_key(canonical, half) if canonical else None
                layers.append(LayerRef(quantizer_key(path, half), path, (a, b), (shape[0], b - a) + shape[2:], tied))
        else:
            tied = quantizer_key(canonical) if canonical else None
            layers.append(LayerRef(quantizer_key(path), path, None, shape, tied))
    if not layers:  # every command needs at least one: say so here, not as a division by zero downstream
        excluded = excluded_layers(model, family)
        raise UserError(f"family {family.name!r}: its denoiser ({type(model).__name__}) has no quantizable layer "
                        f"(no nn.Linear, nn.Conv1d or nn.Conv2d module"
                        + (f"; all {len(excluded)} are excluded by the family's exclude patterns" if excluded else "")
                        + "): there is nothing to quantize")
    return layers


def excluded_layers(model: nn.Module, family: FamilySpec) -> list[str]:
    return [p for p, m in model.named_modules() if isinstance(m, QUANTIZABLE_TYPES) and family.is_excluded(p)]


def fp_bytes(layers: list[LayerRef], fp_prec: int, dedup: bool = False) -> int:
    """FP weight bytes of the quantizable layers (the reference's FP_SIZE when ``dedup`` is False;
    with ``dedup`` tied copies are counted once)."""
    return sum(int(ref.numel * fp_prec / 8) for ref in layers if not (dedup and ref.tied_to))
