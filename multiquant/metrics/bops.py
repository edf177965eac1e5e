"""Bit-operations (BOPs) of a quantization configuration, from MACs measured in a real forward pass.

:func:`layer_macs` runs one denoiser forward at the family's protocol resolution (on the meta device
for full-size models: only shapes are needed) and records

* ``<module path>``: MACs of every ``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d`` call (forward hooks);
* ``<module path>::qk`` and ``<module path>::av``: the Q·Kᵀ and attn·V products of
  ``F.scaled_dot_product_attention`` and ``F.multi_head_attention_forward`` calls made inside that module;
* ``<module path>::matmul``: other activation-activation products (``matmul``/``bmm``/``baddbmm``/...,
  e.g. explicit-softmax attention processors);
* ``<module path>::linear``: ``F.linear``/``F.conv*`` calls outside a Linear/Conv module (e.g. the
  projections inside ``F.multi_head_attention_forward`` of Hunyuan's pooler).

This replaces the reference's constant attention terms, several of which were wrong (paper §5.5).
Element-wise work (norms, activations, softmax) is not a multiply-accumulate of a GEMM and is not counted.

:func:`config_bops` prices those MACs (tera-BOPs, float, not floored):

* quantizable weight layers: ``MACs x w_bits x act_bits`` where ``w_bits`` is the bit width for UAQ
  (``mse-b``) and 16 for K-Means options and ``fp16``: a K-Means LUT dequantizes weights to FP16
  before the GEMM, the reference's convention. A split layer's halves are priced by their share of
  the input channels, each with its own option;
* attention products (``::qk``, ``::av``, ``::matmul``): ``act_bits x act_bits``;
* everything else (excluded weight layers, ``::linear``): 16 x 16.
"""
from __future__ import annotations

from collections import defaultdict
from math import prod

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ..layers import QUANTIZABLE_TYPES, LayerRef
from ..options import Option, option_of

__all__ = ["layer_macs", "config_bops", "weight_bits", "ATTENTION_SUFFIXES"]

# Text-encoder sequence lengths of the generation protocols (cross-attention MACs depend on them).
# Hunyuan's inputs already use its config's text_len (77 CLIP) and text_len_t5 (256).
ATTENTION_SUFFIXES = ("::qk", "::av", "::matmul")

_MATMULS = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.bmm, torch.Tensor.bmm,
            torch.mm, torch.Tensor.mm, torch.baddbmm, torch.Tensor.baddbmm, torch.addmm, torch.Tensor.addmm,
            torch.addbmm, torch.Tensor.addbmm}
_WEIGHT_FUNCS = {F.linear, F.conv1d, F.conv2d, F.conv3d}


def _matmul_operands(func, args):
    if func in (torch.baddbmm, torch.Tensor.baddbmm, torch.addmm, torch.Tensor.addmm, torch.addbmm,
                torch.Tensor.addbmm):
        return args[1], args[2]  # (input, mat1, mat2)
    return args[0], args[1]


def _weight_op_macs(func, args, kwargs, out: torch.Tensor) -> int:
    weight = args[1] if len(args) > 1 else kwargs["weight"]
    if func is F.linear:
        return out.numel() * weight.shape[-1]
    return out.numel() * prod(weight.shape[1:])  # (in/groups) * kernel per output element


class _MacCounter(TorchFunctionMode):
    """Counts attention/matmul MACs of calls made while a forward runs, per innermost module."""

    def __init__(self, macs: dict, stack: list):
        super().__init__()
        self.macs = macs
        self.stack = stack  # [(path, module)] of the modules currently executing

    def _where(self) -> str:
        return self.stack[-1][0] if self.stack else ""

    def _inside_weight_layer(self) -> bool:
        return bool(self.stack) and isinstance(self.stack[-1][1], QUANTIZABLE_TYPES)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is F.scaled_dot_product_attention:
            q = args[0] if args else kwargs["query"]
            k = args[1] if len(args) > 1 else kwargs["key"]
            v = args[2] if len(args) > 2 else kwargs["value"]
            batch_heads = prod(q.shape[:-2])
            self._add("::qk", batch_heads * q.shape[-2] * k.shape[-2] * q.shape[-1])
            self._add("::av", batch_heads * q.shape[-2] * k.shape[-2] * v.shape[-1])
        elif func is F.multi_head_attention_forward:
            self._count_mha(args, kwargs)
        elif func in _MATMULS:
            a, _ = _matmul_operands(func, args)
            result = out if isinstance(out, torch.Tensor) else None
            if result is not None and a.ndim >= 1:
                self._add("::matmul", result.numel() * a.shape[-1] if func not in (torch.addbmm, torch.Tensor.addbmm)
                          else a.shape[0] * result.numel() * a.shape[-1])
        elif func in _WEIGHT_FUNCS and not self._inside_weight_layer():
            self._add("::linear", _weight_op_macs(func, args, kwargs, out))
        return out

    def _count_mha(self, args, kwargs):
        names = ("query", "key", "value", "embed_dim_to_check", "num_heads")
        given = dict(zip(names, args))
        given.update({k: kwargs[k] for k in names if k in kwargs})
        q, k, v = given["query"], given["key"], given["value"]
        # [L, N, E] or unbatched [L, E]
        n = q.shape[1] if q.ndim == 3 else 1
        lq, lk, e = q.shape[0], k.shape[0], q.shape[-1]
        self._add("::linear", n * (lq * e * e + lk * k.shape[-1] * e + lk * v.shape[-1] * e + lq * e * e))
        self._add("::qk", n * lq * lk * e)
        self._add("::av", n * lq * lk * e)

    def _add(self, suffix: str, macs: int) -> None:
        self.macs[self._where() + suffix] += int(macs)


def _with_text_tokens(kwargs: dict, tokens: int) -> dict:
    ehs = kwargs.get("encoder_hidden_states")
    if not isinstance(ehs, torch.Tensor) or ehs.ndim != 3 or ehs.shape[1] == tokens:
        return kwargs
    g = torch.Generator().manual_seed(1)
    new = torch.randn(ehs.shape[0], tokens, ehs.shape[2], generator=g).to(device=ehs.device, dtype=ehs.dtype)
    return dict(kwargs, encoder_hidden_states=new)


@torch.no_grad()
def layer_macs(model: nn.Module, family, resolution: int | None = None, batch: int = 1,
               text_tokens: int | None = None, inputs: dict | None = None) -> dict[str, int]:
    """MACs of one denoiser forward, per module path (see module doc for the key scheme).

    ``resolution`` defaults to the family's protocol resolution; ``text_tokens`` (cross-attention
    length) to the family's ``text_tokens``; ``inputs`` overrides the forward kwargs entirely.
    One forward = one denoiser evaluation at ``batch`` (classifier-free guidance doubles it).
    Works on the meta device."""
    from ..adapters import example_inputs
    from ..errors import user_forward

    if inputs is None:
        inputs = example_inputs(family, model, batch, resolution=resolution or family.resolution)
        tokens = text_tokens if text_tokens is not None else family.text_tokens
        if tokens is not None:
            inputs = _with_text_tokens(inputs, tokens)

    macs: dict[str, int] = defaultdict(int)
    stack: list[tuple[str, nn.Module]] = []
    handles = []

    def pre_hook(path):
        def hook(module, args):
            stack.append((path, module))
        return hook

    def post_hook(path):
        def hook(module, args, output):
            stack.pop()
            if isinstance(module, QUANTIZABLE_TYPES) and isinstance(output, torch.Tensor):
                per_output = module.weight.shape[1] * prod(module.weight.shape[2:])  # in(/groups) x kernel
                macs[path] += output.numel() * per_output
        return hook

    try:
        for path, module in model.named_modules():
            if path == "":
                continue
            handles.append(module.register_forward_pre_hook(pre_hook(path)))
            handles.append(module.register_forward_hook(post_hook(path), always_call=True))
        with _MacCounter(macs, stack), user_forward(family, model):
            model(**inputs)
    finally:
        for h in handles:
            h.remove()
    return dict(macs)


def weight_bits(option: str) -> int:
    """Bits the GEMM sees for a weight option: b for UAQ ``mse-b``; 16 for K-Means (LUT -> FP16) and FP."""
    return Option.parse(option, lenient=True).gemm_bits


def _option_of(config: dict, ref: LayerRef) -> str:
    entry = config.get(ref.key)
    if entry is None and ref.tied_to is not None:
        entry = config.get(ref.tied_to)
    if entry is None:
        raise KeyError(f"configuration has no option for {ref.key}")
    return option_of(entry)


def config_bops(config: dict, layers: list[LayerRef], macs: dict[str, int], act_bits: int = 16) -> float:
    """Tera-BOPs (float) of ``config`` (quantizer key -> option string or reference ``[option, ...]`` list)."""
    in_channels: dict[str, int] = defaultdict(int)  # full input width of each layer path (sum of its halves)
    for ref in layers:
        in_channels[ref.path] = max(in_channels[ref.path], ref.cols[1] if ref.cols else ref.shape[1])
    total = 0.0
    priced: set[str] = set()
    for ref in layers:
        layer_mac = macs.get(ref.path, 0)
        share = (ref.cols[1] - ref.cols[0]) / in_channels[ref.path] if ref.cols else 1.0
        total += layer_mac * share * weight_bits(_option_of(config, ref)) * act_bits
        priced.add(ref.path)
    for key, value in macs.items():
        if key in priced:
            continue
        if key.endswith(ATTENTION_SUFFIXES):
            total += value * act_bits * act_bits
        else:
            total += value * 16 * 16
    return total / 1e12
