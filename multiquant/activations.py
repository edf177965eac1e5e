"""Online (dynamic) activation quantization of the inputs of every quantizable layer.

Token-wise asymmetric min-max fake quantization, recomputed for every tensor on every call (no
calibration), as the reference intended for ``--quant_act`` (its flag never switched it on):
[B, N, C] inputs get one range per token (row of C), [B, C, H, W] conv inputs one range per
(sample, channel), [B, C] one per row. A zero range is guarded (the reference produced NaN).
"""
from __future__ import annotations

import torch
from torch import nn

from .errors import InputError
from .layers import QUANTIZABLE_TYPES

ACT_BITS_CHOICES = (8, 6, 4)
SCHEME = ("online token-wise asymmetric min-max of the inputs of every Linear/Conv layer; attention matmuls "
          "(Q K^T, softmax x V) not quantized")


def check_act_bits(bits: int | None) -> int | None:
    """``bits`` if it is a supported activation width (or None: FP activations), else a one-line error."""
    if bits is None:
        return None
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 16:
        raise InputError(f"activation bits must be an integer in 2..16 (e.g. 8 or 6), got {bits!r}")
    return bits


def quantize_rows(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Fake-quantize each row (last dim) of ``x`` to ``bits`` with its own min-max range."""
    levels = 2 ** bits - 1
    lo = x.amin(dim=-1, keepdim=True)
    hi = x.amax(dim=-1, keepdim=True)
    scale = ((hi - lo) / levels).clamp_min(torch.finfo(x.dtype).tiny)
    zero = torch.round(-lo / scale)
    q = torch.clamp(torch.round(x / scale) + zero, 0, levels)
    return (q - zero) * scale


def quantize_activation(x: torch.Tensor, bits: int) -> torch.Tensor:
    if x.dim() == 4:  # conv input: one range per (sample, channel) over H*W
        b, c, h, w = x.shape
        return quantize_rows(x.reshape(b, c, h * w), bits).reshape(b, c, h, w)
    return quantize_rows(x, bits)  # [B, N, C] per token, [B, C] per row


def enable_activation_quant(model: nn.Module, bits: int = 8) -> list:
    """Quantize the input of every Linear/Conv on every forward; returns the hook handles
    (``handle.remove()`` switches it off)."""

    def hook(module, args):
        if not args or not torch.is_tensor(args[0]) or not args[0].is_floating_point():
            return None
        return (quantize_activation(args[0], bits),) + tuple(args[1:])

    return [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, QUANTIZABLE_TYPES)]
