"""Packed b-bit weight modules: real memory savings at inference.

A packed layer keeps its weight as packed integer codes (``packing.pack_codes``: 8 codes in b bytes) plus
the quantizer's parameters, and dequantizes it on the fly in ``forward`` into the compute dtype, one layer
at a time: only the layer being run ever exists as a dense weight.

    PackedLinear / PackedConv1d / PackedConv2d   drop-in subclasses of nn.Linear / nn.Conv1d / nn.Conv2d
      .parts   PackedSlices (a ModuleList) of PackedWeight, one per input-channel slice (two for a split layer), joined
               along the input dimension at dequantization
      .bias    the ordinary FP bias

Every method reduces to one table lookup per weight: UAQ's per-channel grid ``(q - zero) * scale`` is a
per-channel table of 2^b values, K-Means-C has a per-channel codebook, K-Means-A one codebook. Tables are
built in float32 and rounded to the compute dtype, exactly as ``MultiQuantizer.dequantize`` +
``.to(dtype)`` does, so a packed layer reproduces the simulated configuration bit for bit.

On CUDA the forward takes the fast path of :mod:`multiquant.kernels` (one Triton decode into a shared scratch
buffer, then the same cuBLAS GEMM; bit-exact with this eager path, which stays the reference and the CPU path).
A PackedLinear run on few rows (text-token K/V, timestep / adaLN MLPs) may take the fused kernel instead, reading
the packed codes directly, where it was measured faster for that layer kind on this GPU (the measured dispatch of
:mod:`multiquant.kernels`; ``kernels.tune_small_m`` before torch.compile / CUDA graphs): same weight, float32
accumulation, within the bound stated in :func:`multiquant.kernels.packed_linear` of the eager result, not
bit-exact (``kernels.small_m_threshold(0)``: never).

Subclassing the stock layers keeps ``isinstance(m, nn.Linear)`` checks (activation-quant hooks, layer
discovery) working; ``.weight`` is a read-only property that dequantizes the whole weight on demand.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .options import METHODS, Option

# Quantizer parameters whose dtype is part of the format: model.to(dtype) moves them but never casts them.
KEEP_DTYPE = ("scale", "codebook")


# ------------------------------------------------------------------------------------------ kernels
@functools.lru_cache(maxsize=None)
def _arange(n: int, device: torch.device, dtype: torch.dtype, step: int = 1) -> torch.Tensor:
    return torch.arange(0, n * step, step, device=device, dtype=dtype)  # cached: never modify in place


@functools.lru_cache(maxsize=None)
def _unpack_plan(bits: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Code i of a group of 8 starts at bit i*b: in byte (i*b)//8 at shift (i*b)%8, spilling into the
    next byte when shift + b > 8 (never past the group's last byte). Cached per device: a host-to-device
    copy in every forward would stall the GPU."""
    offsets = torch.arange(8) * bits
    lo = offsets // 8
    hi = torch.clamp(lo + 1, max=bits - 1)  # an unused high byte is masked off below
    return lo.to(device), hi.to(device), (offsets % 8).to(device=device, dtype=torch.int16)


def unpack_codes_lean(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Same result as :func:`multiquant.packing.unpack_codes`, but with int16 temporaries and a fixed
    handful of kernels (it runs in every forward)."""
    lo, hi, shift = _unpack_plan(bits, packed.device)
    groups = packed.view(-1, bits).to(torch.int16)
    codes = groups[:, lo]
    high = groups[:, hi]
    high &= 0x7F  # a code ends at bit shift + b - 1 <= 14 of the pair: the high byte's top bit is never
    high <<= 8    # needed, and dropping it keeps the int16 pair non-negative (no overflow, logical >>)
    codes |= high
    del high
    codes >>= shift
    codes &= (1 << bits) - 1
    return codes.view(-1)[:numel]


def lookup_table(method: str, bits: int, params: dict, dtype: torch.dtype) -> torch.Tensor:
    """The dequantized value of every code: [C, 2^b] (per channel) or [1, 2^b] (K-Means-A), in ``dtype``."""
    if not METHODS[method].codebook:
        levels = _arange(2 ** bits, params["scale"].device, torch.float32)
        # same float32 arithmetic as quantizers.uaq_dequantize, then one rounding to dtype
        table = (levels[None, :] - params["zero"].float()[:, None]) * params["scale"].float()[:, None]
        return table.to(dtype)
    return params["codebook"].to(dtype)  # gather-then-cast == cast-then-gather


def dequantize_packed(method: str, bits: int, codes: torch.Tensor, params: dict, shape: tuple[int, ...],
                      dtype: torch.dtype) -> torch.Tensor:
    """Dense weight of one packed slice, shaped ``shape``, in ``dtype``."""
    channels = shape[0]
    numel = _numel(shape)
    table = lookup_table(method, bits, params, dtype)
    index = unpack_codes_lean(codes, bits, numel).to(torch.int32)
    if table.shape[0] > 1:  # per-channel tables: offset each row into the flattened table
        rows = _arange(channels, index.device, torch.int32, step=2 ** bits)
        index = index.view(channels, -1).add_(rows[:, None]).view(-1)
    return torch.index_select(table.reshape(-1), 0, index).view(shape)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


# ------------------------------------------------------------------------------------------ modules
class PackedWeight(nn.Module):
    """One input-channel slice of a layer's weight: packed codes + quantizer parameters, or (an FP half
    of a split layer) the dense slice itself.

    Buffers: ``codes`` (uint8, packed), ``scale`` (float32 [C]) and ``zero`` (int16 [C]) for UAQ, or
    ``codebook`` ([C, 2^b] / [1, 2^b]) for K-Means; ``dense`` for an unquantized slice."""

    def __init__(self, option: str, shape: tuple[int, ...], codebook_dtype: torch.dtype = torch.float32,
                 dense_dtype: torch.dtype = torch.float32, device="meta"):
        super().__init__()
        self.option = option
        self.shape = tuple(int(s) for s in shape)
        parsed = Option.parse(option)
        if parsed.is_fp:
            self.method, self.bits = "dense", None
            self.register_buffer("dense", torch.empty(self.shape, dtype=dense_dtype, device=device))
            return
        self.method, self.bits = parsed.method, parsed.bits
        channels, levels = self.shape[0], 2 ** self.bits
        self.register_buffer("codes", torch.empty(-(-self.numel // 8) * self.bits, dtype=torch.uint8, device=device))
        if parsed.spec.codebook:
            rows = parsed.spec.table_rows(channels)
            self.register_buffer("codebook", torch.empty(rows, levels, dtype=codebook_dtype, device=device))
        else:
            self.register_buffer("scale", torch.empty(channels, dtype=torch.float32, device=device))
            self.register_buffer("zero", torch.empty(channels, dtype=torch.int16, device=device))

    @property
    def numel(self) -> int:
        return _numel(self.shape)

    def params(self) -> dict[str, torch.Tensor]:
        return {} if self.method == "dense" else {name: getattr(self, name) for name in METHODS[self.method].params}

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        if self.method == "dense":
            return self.dense.to(dtype)
        return dequantize_packed(self.method, self.bits, self.codes, self.params(), self.shape, dtype)

    def _apply(self, fn, recurse=True):
        # model.to(float16) must not round the float32 UAQ scales (nor codebooks): move them, keep dtype.
        kept = {name: self._buffers[name] for name in KEEP_DTYPE if self._buffers.get(name) is not None}
        super()._apply(fn, recurse)
        for name, before in kept.items():
            after = self._buffers[name]
            if after.dtype != before.dtype:
                self._buffers[name] = before.to(after.device)
        kernels.structure_changed()
        return self

    # every way a buffer is replaced tells the fast path's plans to look again (kernels.STRUCTURE)
    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        if isinstance(value, torch.Tensor) or name in self.__dict__.get("_buffers", ()):
            kernels.structure_changed()

    def __delattr__(self, name):
        super().__delattr__(name)
        kernels.structure_changed()

    def register_buffer(self, name, tensor, persistent=True):
        super().register_buffer(name, tensor, persistent)
        kernels.structure_changed()

    def extra_repr(self) -> str:
        return f"{self.option}, shape={self.shape}"


class PackedSlices(nn.ModuleList):
    """A packed layer's slices: a ModuleList that tells the fast path's plans when a slice is replaced, added or
    removed (kernels.STRUCTURE)."""

    def add_module(self, name, module):  # append / extend
        super().add_module(name, module)
        kernels.structure_changed()

    def insert(self, index, module):
        super().insert(index, module)
        kernels.structure_changed()

    def __setattr__(self, name, value):  # slices[i] = part (not .training, which every .eval() sets)
        super().__setattr__(name, value)
        if isinstance(value, nn.Module):
            kernels.structure_changed()

    def __delitem__(self, index):  # del / pop
        super().__delitem__(index)
        kernels.structure_changed()

    def __delattr__(self, name):
        super().__delattr__(name)
        kernels.structure_changed()


class _PackedLayer:
    """Shared behaviour of the packed layer classes (mixed into nn.Linear / nn.Conv1d / nn.Conv2d)."""

    parts: nn.ModuleList
    compute_dtype: torch.dtype

    def __setattr__(self, name, value):
        if name == "parts" and isinstance(value, nn.ModuleList) and not isinstance(value, PackedSlices):
            value = PackedSlices(list(value))  # the fast path follows replacements inside it too
        nn.Module.__setattr__(self, name, value)
        if name == "parts":
            kernels.structure_changed()

    def _init_packed(self, dense: nn.Module, parts: list[PackedWeight], compute_dtype: torch.dtype) -> None:
        nn.Module.__init__(self)  # not the stock __init__: it would allocate a dense weight
        # the stock layer's hyper-parameters (features / channels, stride, padding, ...), not its tensors
        for name in list(type(dense).__constants__) + ["transposed", "_reversed_padding_repeated_twice"]:
            if hasattr(dense, name):
                setattr(self, name, getattr(dense, name))
        self.parts = PackedSlices(parts)
        self.register_parameter("bias", dense.bias)
        self.compute_dtype = compute_dtype
        width = sum(p.shape[1] for p in parts)
        if width != self.weight_shape[1]:
            raise ValueError(f"packed slices cover {width} input channels, the layer has {self.weight_shape[1]}")

    @property
    def weight_shape(self) -> tuple[int, ...]:
        first = self.parts[0].shape
        return (first[0], sum(p.shape[1] for p in self.parts)) + tuple(first[2:])

    def dequantize_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense weight in ``dtype`` (default: the compute dtype); slices joined along the input dim."""
        dtype = dtype or self.compute_dtype
        pieces = [part.dequantize(dtype) for part in self.parts]
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)

    @property
    def weight(self) -> torch.Tensor:  # read-only: a fresh dense copy, for code that inspects .weight
        return self.dequantize_weight()

    def forward_weight(self, input: torch.Tensor) -> torch.Tensor:
        """The weight a forward on ``input`` multiplies by: on CUDA, the Triton decode into the shared scratch
        buffer (multiquant/kernels.py, bit-exact with the eager path); elsewhere the eager dequantization."""
        if kernels.can_use_kernels(input):  # a CUDA input, the fast path on
            return kernels.fast_weight(self, input.dtype, input.device)
        return self.dequantize_weight(input.dtype)

    def _apply(self, fn, recurse=True):
        self.__dict__.pop("_fast_plan", None)  # plans hold the old device's tensors
        self.__dict__.pop("_small_m_plans", None)
        super()._apply(fn, recurse)
        self.compute_dtype = fn(torch.empty(0, dtype=self.compute_dtype)).dtype  # follow model.to(dtype)
        return self

    def packed_nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for p in self.parts for t in p.buffers())

    def extra_repr(self) -> str:
        options = "+".join(p.option for p in self.parts)
        return f"{super().extra_repr()}, packed={options}"


class PackedLinear(_PackedLayer, nn.Linear):
    def __init__(self, dense: nn.Linear, parts: list[PackedWeight], compute_dtype=torch.float32):
        self._init_packed(dense, parts, compute_dtype)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not kernels.can_use_kernels(input):  # (one gate per call: a batch-2 forward is bound by host time)
            return F.linear(input, self.dequantize_weight(input.dtype), self.bias)
        if kernels.takes_small_m_path(self, input):
            return kernels.packed_linear(self, input)  # few rows: the fused kernel reads the packed codes
        return F.linear(input, kernels.fast_weight(self, input.dtype, input.device), self.bias)


class PackedConv1d(_PackedLayer, nn.Conv1d):
    def __init__(self, dense: nn.Conv1d, parts: list[PackedWeight], compute_dtype=torch.float32):
        self._init_packed(dense, parts, compute_dtype)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(input, self.forward_weight(input), self.bias)


class PackedConv2d(_PackedLayer, nn.Conv2d):
    def __init__(self, dense: nn.Conv2d, parts: list[PackedWeight], compute_dtype=torch.float32):
        self._init_packed(dense, parts, compute_dtype)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(input, self.forward_weight(input), self.bias)


PACKED_CLASSES = {nn.Linear: PackedLinear, nn.Conv1d: PackedConv1d, nn.Conv2d: PackedConv2d}
PACKED_TYPES = tuple(PACKED_CLASSES.values())


def packed_layer(dense: nn.Module, parts: list[PackedWeight], compute_dtype=torch.float32) -> nn.Module:
    """The packed counterpart of a stock ``nn.Linear``/``nn.Conv1d``/``nn.Conv2d`` (same hyper-parameters and
    bias; the weight comes from ``parts``)."""
    cls = PACKED_CLASSES.get(type(dense))
    if cls is None:
        raise TypeError(f"cannot pack a {type(dense).__name__}: only nn.Linear, nn.Conv1d and nn.Conv2d "
                        f"(not subclasses) have packed versions")
    return cls(dense, parts, compute_dtype)
