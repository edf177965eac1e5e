"""Fast packed layers on NVIDIA GPUs: one Triton kernel per layer decodes the packed codes through the layer's
table straight into a reused dense scratch buffer, then the stock cuBLAS GEMM (``F.linear`` / convolution) runs
on it.

Why this shape: the eager path of :mod:`multiquant.packed` runs about ten PyTorch kernels per layer with
weight-sized int16/int32 temporaries. Here a layer costs one decode launch (reads b/8 bytes and writes 2 bytes
per weight, memory-bound) plus the same GEMM the FP16 model runs; no temporary but the scratch exists.

Exactness: the decoded weight equals the eager path's bit for bit (UAQ: ``(code - zero) * scale`` in float32,
one round-to-nearest-even to the compute dtype, as :func:`multiquant.packed.lookup_table`; K-Means: a gather
of the codebook, then the cast), and the GEMM is the same cuBLAS call on the same shapes, so a fast packed
model reproduces the eager one (and the simulated configuration) exactly.

    use_packed_kernels(False)      # context manager: force the eager path (reference, benchmarks)
    QUA2SEDIMO_PACKED_KERNELS=0    # environment: the same, process-wide

The fast path is taken automatically for CUDA inputs when Triton imports. It is single-stream: the scratch
buffer is shared by every layer of one (device, dtype), so two layers must not run concurrently on different
streams. Under ``torch.compile`` the decode is a custom op (``qua2sedimo::decode_packed``) that returns a fresh
tensor, so Inductor plans its memory; CUDA-graph capture records the eager path as it is (warm up once first,
as capture always requires, so the scratch exists before capture).
"""
from __future__ import annotations

import contextlib
import functools
import os
import weakref
from dataclasses import dataclass

import torch
from torch import nn

MODES = {"mse": 0, "kmeans": 1, "kmeans_all": 2}  # table kind: UAQ grid, per-channel codebook, one codebook
MAX_NUMEL = 2 ** 31 // 8  # int32 indexing inside the kernel (byte index = numel / 8 * bits)
_ENABLED = [os.environ.get("QUA2SEDIMO_PACKED_KERNELS", "1") != "0"]


@contextlib.contextmanager
def use_packed_kernels(enabled: bool):
    """Within the block, CUDA packed layers take the fast path (True) or the eager reference path (False)."""
    previous = _ENABLED[0]
    _ENABLED[0] = bool(enabled)
    try:
        yield
    finally:
        _ENABLED[0] = previous


def kernels_enabled() -> bool:
    return _ENABLED[0] and _triton() is not None


@functools.lru_cache(maxsize=None)
def _triton():
    try:
        import triton  # noqa: F401
    except ImportError:  # CPU-only installs: the eager path is the only path
        return None
    return triton


# ------------------------------------------------------------------------------------------- kernels
@functools.lru_cache(maxsize=None)
def _jit(interpret: bool):
    """The Triton kernels, built lazily (``interpret`` in the key: TRITON_INTERPRET=1 is read at decoration,
    so CPU tests can build interpreter versions after the module was imported)."""
    import triton
    import triton.language as tl

    @triton.jit
    def decode_kernel(codes_ptr, scale_ptr, zero_ptr, book_ptr, out_ptr, rows, row_len, out_stride, col_offset,
                      BITS: tl.constexpr, MODE: tl.constexpr, ROWS: tl.constexpr, BLOCK_K: tl.constexpr):
        # one [ROWS, BLOCK_K] tile of the [rows, row_len] slice; code i of the flat weight starts at bit i*b
        # of its group of 8 (multiquant/packing.py): byte (i//8)*b + (i%8)*b//8, spilling into the next byte
        r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        row_ok = r < rows
        mask = row_ok[:, None] & (k < row_len)[None, :]
        flat = r[:, None] * row_len + k[None, :]
        bit = (flat & 7) * BITS
        byte = (flat >> 3) * BITS + (bit >> 3)
        shift = bit & 7
        lo = tl.load(codes_ptr + byte, mask=mask, other=0).to(tl.int32)
        hi = tl.load(codes_ptr + byte + 1, mask=mask & (shift + BITS > 8), other=0).to(tl.int32)
        code = ((lo | (hi << 8)) >> shift) & ((1 << BITS) - 1)
        if MODE == 0:  # UAQ: the float32 grid value, as packed.lookup_table computes it
            scale = tl.load(scale_ptr + r, mask=row_ok, other=0.0)
            zero = tl.load(zero_ptr + r, mask=row_ok, other=0).to(tl.float32)
            value = (code.to(tl.float32) - zero[:, None]) * scale[:, None]
        elif MODE == 1:  # K-Means-C: row r's codebook
            value = tl.load(book_ptr + r[:, None] * (1 << BITS) + code, mask=mask, other=0.0)
        else:  # K-Means-A: one codebook
            value = tl.load(book_ptr + code, mask=mask, other=0.0)
        tl.store(out_ptr + r[:, None] * out_stride + col_offset + k[None, :],
                 value.to(out_ptr.dtype.element_ty, fp_downcast_rounding="rtne"), mask=mask)

    return decode_kernel


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _blocks(rows: int, row_len: int) -> tuple[int, int]:
    """Tile [ROWS, BLOCK_K] of about 4096 weights: 512-byte contiguous fp16 stores per row segment, and
    several rows per program for the short rows of small convolutions."""
    block_k = min(256, max(16, 1 << (row_len - 1).bit_length()))
    return max(1, 4096 // block_k), block_k


@dataclass(frozen=True)
class PartGeometry:
    rows: int
    row_len: int
    col_offset: int  # where this slice's columns start in the layer's [rows, total] weight


def decode_into(part: nn.Module, out: torch.Tensor, col_offset: int = 0) -> None:
    """Decode one packed slice (a :class:`multiquant.packed.PackedWeight`) into ``out`` [C, total] at columns
    ``col_offset: col_offset + row_len`` (``out`` contiguous rows; any float dtype). A dense slice is copied."""
    rows = part.shape[0]
    row_len = part.numel // rows
    if part.method == "dense":
        out[:, col_offset:col_offset + row_len].copy_(part.dense.reshape(rows, row_len))
        return
    _launch_decode(part, out, PartGeometry(rows, row_len, col_offset))


def _decode_args(part, out: torch.Tensor, geo: PartGeometry):
    mode = MODES[part.method]
    codes = part.codes
    scale = part.scale if mode == 0 else codes  # unused pointers: any tensor
    zero = part.zero if mode == 0 else codes
    book = part.codebook if mode != 0 else codes
    rows_per, block_k = _blocks(geo.rows, geo.row_len)
    grid = (triton_cdiv(geo.rows, rows_per), triton_cdiv(geo.row_len, block_k))
    args = (codes, scale, zero, book, out, geo.rows, geo.row_len, out.stride(0), geo.col_offset)
    meta = dict(BITS=part.bits, MODE=mode, ROWS=rows_per, BLOCK_K=block_k)
    return grid, args, meta


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _launch_decode(part, out: torch.Tensor, geo: PartGeometry) -> None:
    grid, args, meta = _decode_args(part, out, geo)
    _jit(_interpret())[grid](*args, **meta, num_warps=4)


# ------------------------------------------------------------------------------------------- scratch
class _Scratch:
    """One dense buffer per (device, dtype), as large as the largest layer seen: layers decode into it in
    turn. ``generation`` changes when it grows, so cached views of the old buffer are refreshed."""

    def __init__(self):
        self.buffers: dict[tuple, torch.Tensor] = {}
        self.generation = 0
        self.plans: "weakref.WeakSet[_Plan]" = weakref.WeakSet()  # their cached views pin a buffer

    def get(self, device: torch.device, dtype: torch.dtype, numel: int) -> torch.Tensor:
        key = (device, dtype)
        buf = self.buffers.get(key)
        if buf is None or buf.numel() < numel:
            self.buffers.pop(key, None)
            del buf
            self._drop_views()  # free the old buffer before allocating the larger one
            buf = torch.empty(numel, device=device, dtype=dtype)
            self.buffers[key] = buf
            self.generation += 1
        return buf

    def release(self) -> None:
        """Free every scratch buffer (e.g. before measuring memory of something else)."""
        self.buffers.clear()
        self._drop_views()

    def _drop_views(self) -> None:
        for plan in list(self.plans):
            plan.drop_views()
        self.generation += 1


SCRATCH = _Scratch()


class _Plan:
    """Everything one layer's fast forward needs, computed once per (device, dtype, buffers): the Triton
    launches and the scratch view the GEMM reads."""

    def __init__(self, layer, device: torch.device, dtype: torch.dtype):
        self.device, self.dtype = device, dtype
        self.tensors = tuple((p, name, t) for p in layer.parts for name, t in p._buffers.items())
        shape = tuple(layer.weight_shape)
        rows = shape[0]
        total = sum(p.numel // rows for p in layer.parts)
        self.numel = rows * total
        self.shape = shape
        self.generation = -1
        self.layer_parts = tuple(layer.parts)
        self.rows, self.total = rows, total
        self.drop_views()
        SCRATCH.plans.add(self)

    def drop_views(self) -> None:
        self.weight = self.flat = None
        self.launches = []

    def valid_for(self, layer, device, dtype) -> bool:
        """Same device, dtype and buffer objects (a reloaded or moved layer gets a new plan)."""
        if device != self.device or dtype != self.dtype:
            return False
        if len(layer.parts) != len(self.layer_parts) or any(a is not b for a, b in zip(layer.parts, self.layer_parts)):
            return False
        return all(part._buffers.get(name) is t for part, name, t in self.tensors)

    def __call__(self) -> torch.Tensor:
        if self.generation != SCRATCH.generation or self.weight is None:
            buf = SCRATCH.get(self.device, self.dtype, self.numel)
            self.flat = buf[:self.numel].view(self.rows, self.total)
            self.weight = self.flat.view(self.shape)
            self.launches = []
            offset = 0
            for part in self.layer_parts:
                width = part.numel // self.rows
                if part.method == "dense":
                    self.launches.append(("copy", part, offset, width))
                else:
                    grid, args, meta = _decode_args(part, self.flat, PartGeometry(self.rows, width, offset))
                    self.launches.append(("decode", grid, args, meta, None))
                offset += width
            self.generation = SCRATCH.generation
        for i, launch in enumerate(self.launches):
            if launch[0] == "decode":
                _, grid, args, meta, direct = launch
                if direct is not None:
                    try:
                        direct(torch._C._cuda_getCurrentRawStream(self.device.index))
                        continue
                    except (TypeError, ValueError, SystemError):  # launcher of another signature: plain calls
                        DIRECT_LAUNCH[0] = False
                        self.launches[i] = launch[:4] + (None,)
                compiled = _jit(_interpret())[grid](*args, **meta, num_warps=4)
                if direct is None and DIRECT_LAUNCH[0] and self.device.type == "cuda":
                    direct = _direct_launcher(compiled, grid, args + tuple(meta.values()))
                    self.launches[i] = launch[:4] + (direct,)
            else:
                _, part, offset, width = launch
                self.flat[:, offset:offset + width].copy_(part.dense.reshape(self.rows, width))
        return self.weight


# Triton's ``kernel[grid](...)`` binds and specializes its arguments, builds launch metadata and calls the
# (empty) launch hooks on every call: tens of microseconds of Python per launch, and a batch-2 forward is bound
# by launch time. After the first launch a layer calls the compiled kernel's launcher itself with the same
# arguments, as Triton's own ``CompiledKernel[grid](...)`` runner does, minus the metadata and hooks while no
# hook is registered (Triton 3.4+: hooks are HookChain objects; with a hook, the full path runs).
DIRECT_LAUNCH = [os.environ.get("QUA2SEDIMO_DIRECT_LAUNCH", "1") != "0"]


def _direct_launcher(compiled, grid: tuple, args: tuple):
    """``launch(stream)`` for a compiled Triton kernel and fixed arguments (all of the kernel's parameters, in
    signature order, constexprs included), or None where this Triton's launcher is not the expected one."""
    try:
        from triton import knobs

        enter, exit_ = knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook
        run, function, packed = compiled.run, compiled.function, compiled.packed_metadata
    except (ImportError, AttributeError):
        return None
    if not (hasattr(enter, "calls") and hasattr(exit_, "calls")):
        return None  # hooks of another kind (older Triton): keep the full path
    g0, g1, g2 = (tuple(grid) + (1, 1))[:3]

    def launch(stream: int) -> None:
        if enter.calls or exit_.calls:  # a profiler registered hooks: give them their metadata
            run(g0, g1, g2, stream, function, packed, compiled.launch_metadata(grid, stream, *args), enter, exit_,
                *args)
        else:
            run(g0, g1, g2, stream, function, packed, None, None, None, *args)

    return launch


def fast_weight(layer, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The dense weight of a packed layer on CUDA in ``dtype``: a view of the shared scratch buffer (eager),
    valid until the next packed layer runs, or a fresh tensor (under torch.compile)."""
    if torch.compiler.is_compiling():
        return _compiled_weight(layer, dtype)
    plan = layer.__dict__.get("_fast_plan")
    if plan is None or not plan.valid_for(layer, device, dtype):
        if _numel(layer.weight_shape) >= MAX_NUMEL:
            return layer.dequantize_weight(dtype)
        plan = _Plan(layer, device, dtype)
        layer.__dict__["_fast_plan"] = plan  # not a submodule / buffer: invisible to state_dict and .to()
    return plan()


def can_use_kernels(tensor: torch.Tensor) -> bool:
    return tensor.is_cuda and _ENABLED[0] and _triton() is not None


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


# ----------------------------------------------------------------------------------- torch.compile op
@torch.library.custom_op("qua2sedimo::decode_packed", mutates_args=())
def decode_packed(codes: torch.Tensor, scale: torch.Tensor | None, zero: torch.Tensor | None,
                  codebook: torch.Tensor | None, method: str, bits: int, rows: int, row_len: int,
                  dtype: torch.dtype) -> torch.Tensor:
    """Dense [rows, row_len] slice in ``dtype`` from packed codes: the Triton kernel on CUDA, the eager
    reference elsewhere. Opaque to torch.compile (a fresh output tensor, no shared scratch)."""
    from .packed import dequantize_packed

    params = {"scale": scale, "zero": zero} if method == "mse" else {"codebook": codebook}
    if not codes.is_cuda and not _interpret():
        return dequantize_packed(method, bits, codes, params, (rows, row_len), dtype)
    out = torch.empty(rows, row_len, device=codes.device, dtype=dtype)
    if rows * row_len == 0:
        return out
    part = _PartView(method, bits, (rows, row_len), codes, scale, zero, codebook)
    _launch_decode(part, out, PartGeometry(rows, row_len, 0))
    return out


@decode_packed.register_fake
def _(codes, scale, zero, codebook, method, bits, rows, row_len, dtype):
    return codes.new_empty((rows, row_len), dtype=dtype)


@dataclass
class _PartView:
    """The attributes of a PackedWeight the launcher reads, from loose tensors (the custom op's arguments)."""
    method: str
    bits: int
    shape: tuple
    codes: torch.Tensor
    scale: torch.Tensor | None
    zero: torch.Tensor | None
    codebook: torch.Tensor | None

    @property
    def numel(self) -> int:
        return _numel(self.shape)


def _compiled_weight(layer, dtype: torch.dtype) -> torch.Tensor:
    rows = layer.weight_shape[0]
    pieces = []
    for part in layer.parts:
        width = part.numel // rows
        if part.method == "dense":
            pieces.append(part.dense.reshape(rows, width).to(dtype))
        else:
            params = part.params()
            pieces.append(decode_packed(part.codes, params.get("scale"), params.get("zero"), params.get("codebook"),
                                        part.method, part.bits, rows, width, dtype))
    flat = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)
    return flat.view(tuple(layer.weight_shape))
