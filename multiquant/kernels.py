"""Fast packed layers on NVIDIA GPUs: one Triton kernel per layer decodes the packed codes through the layer's
table straight into a reused dense scratch buffer, then the stock cuBLAS GEMM (``F.linear`` / convolution) runs
on it; layers run on few rows take a fused table-lookup GEMM on the packed codes instead.

Why this shape: the eager path of :mod:`multiquant.packed` runs about ten PyTorch kernels per layer with
weight-sized int16/int32 temporaries. Here a layer costs one decode launch (reads b/8 bytes and writes 2 bytes
per weight, memory-bound) plus the same GEMM the FP16 model runs; no temporary but the scratch exists.

Exactness: the decoded weight equals the eager path's bit for bit (UAQ: ``(code - zero) * scale`` in float32,
one round-to-nearest-even to the compute dtype, as :func:`multiquant.packed.lookup_table`; K-Means: a gather
of the codebook, then the cast), and the GEMM is the same cuBLAS call on the same shapes, so a fast packed
model reproduces the eager one (and the simulated configuration) exactly, small-M layers aside (below).

    use_packed_kernels(False)      # context manager: force the eager path (reference, benchmarks)
    QUA2SEDIMO_PACKED_KERNELS=0    # environment: the same, process-wide
    use_group_decode(False)        # context manager: the per-weight decode kernel everywhere (benchmarks)
    QUA2SEDIMO_GROUP_DECODE=0      # environment: the same, process-wide
    decode_ahead(model)            # off by default: decode the next packed layer on a side stream during the
                                   # current layer's GEMM (two scratch slots; bit-identical; see _ForwardOrder)
    batched_decode(model)          # one decode launch per group of consecutive packed layers of the recorded
                                   # forward order (bit-identical; see BatchedDecode); load_quantized attaches it
    batched_decode(model, ahead=True)  # both: group g + 1 decodes on the side stream while group g computes
    QUA2SEDIMO_BATCHED_DECODE=0    # environment: load_quantized attaches no batched decode (one launch per layer)
    QUA2SEDIMO_BATCHED_DECODE=ahead  # ... attaches batched_decode(model, ahead=True)

Two decode kernels, same values bit for bit: slices whose rows hold whole groups of 8 codes (row length a
multiple of 8, the large layers of every family here) take the group decode, which assembles each group's b
bytes into one word and unpacks its 8 codes with constant shifts (about a handful of integer operations per
weight, 16-byte stores); every other slice (1 weight per channel, depthwise and small convolutions whose groups
span rows) takes the per-weight decode, which computes each code's byte and shift itself.

Small-M layers (a PackedLinear on few rows: text-token K/V, timestep and adaLN MLPs at M = batch) can skip the
dense weight: a fused table-lookup GEMM reads the packed codes, decodes tiles in registers and multiplies with
``tl.dot`` (split-K, one launch), so they read b/16 of the FP16 weight bytes. Its weight is the same, its float32
accumulation order is not cuBLAS's: results are within the bound stated in :func:`packed_linear`, not bit-exact.
Whether it pays depends on the layer (measured: benchmarks/results/export.json, small_m_microbench_v2), so by
default it is chosen per layer kind by measurement (the measured dispatch): the first eager forward that meets a
(method, bits, table kind, N, K, row bucket, dtype, bias, device) key on at most MEASURED_MAX_ROWS rows times both
paths on the GPU and a process-level table keeps the faster one. Under torch.compile's tracing and CUDA-graph
capture nothing is timed: the table's decision, else decode + cuBLAS. Warm the table first:

    tune_small_m(model, *inputs)   # one eager forward per input shape, before torch.compile / graph capture
    small_m_table()                # the decisions and their timings; clear_small_m_table() forgets them
    small_m_threshold(0)           # context manager: decode + cuBLAS everywhere (bit-exact with eager); N > 0:
                                   # the fused kernel on every layer of <= N rows; "measured": the default
    QUA2SEDIMO_SMALL_M_MAX=0       # environment: the same settings, process-wide (default "measured")

The fast path is taken automatically for CUDA inputs when Triton imports. It is single-stream: the scratch
buffer is shared by every layer of one (device, dtype), so two layers must not run concurrently on different
streams (the fused kernel's split-K counters likewise); decode ahead (``decode_ahead``, ``batched_decode(...,
ahead=True)``) is the exception, its side stream ordered against the main one by events. Under ``torch.compile``
the decode and the fused product are custom ops (``qua2sedimo::decode_packed``, ``qua2sedimo::packed_linear``)
returning fresh tensors, so Inductor plans their memory; CUDA-graph capture records the eager path as it is (warm up once first,
as capture always requires, so the scratch exists before capture).
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import os
import statistics
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .errors import InputError
from .options import METHODS

MODES = {"mse": 0, "kmeans": 1, "kmeans_all": 2}  # table kind: UAQ grid, per-channel codebook, one codebook
MAX_NUMEL = 2 ** 31 // 8  # int32 indexing inside the kernel (byte index = numel / 8 * bits)
_ENABLED = [os.environ.get("QUA2SEDIMO_PACKED_KERNELS", "1") != "0"]
_GROUP_DECODE = [os.environ.get("QUA2SEDIMO_GROUP_DECODE", "1") != "0"]


@contextlib.contextmanager
def _setting_within(cell: list, value):
    """Within the block, the one-element setting ``cell`` holds ``value``; the previous value after it."""
    previous = cell[0]
    cell[0] = value
    try:
        yield
    finally:
        cell[0] = previous


def use_packed_kernels(enabled: bool):
    """Within the block, CUDA packed layers take the fast path (True) or the eager reference path (False)."""
    return _setting_within(_ENABLED, bool(enabled))


def use_group_decode(enabled: bool):
    """Within the block, slices of whole 8-code groups per row take the group decode kernel (True, the default)
    or the per-weight one (False); both give the same weight bit for bit."""
    return _setting_within(_GROUP_DECODE, bool(enabled))


def group_decode_enabled() -> bool:
    return _GROUP_DECODE[0]


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
        # float casts: Triton rounds downcasts to nearest even by default (a rounding argument is refused on
        # upcasts, e.g. an fp16 codebook into float32)
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
        if 8 % BITS == 0:  # 2, 4, 8 bits: a code never spills into the next byte
            code = (lo >> shift) & ((1 << BITS) - 1)
        else:
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
                 value.to(tl.float32).to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def group_decode_kernel(codes_ptr, scale_ptr, zero_ptr, book_ptr, out_ptr, rows, row_groups, out_stride,
                            col_offset, col_blocks, BITS: tl.constexpr, MODE: tl.constexpr, ROWS: tl.constexpr,
                            GROUPS: tl.constexpr):
        # a [ROWS, GROUPS, 8] tile of the [rows, row_groups * 8] slice, rows holding whole groups of 8 codes: group
        # g of row r is group r * row_groups + g of the flat weight, its BITS bytes at (r * row_groups + g) * BITS
        # (multiquant/packing.py: code i of a group starts at bit i * BITS, little-endian). Per group: BITS byte
        # loads into one word (int32 up to 4 bits, int64 above), then 8 constant shifts; the values are computed
        # as in decode_kernel (same operations, same roundings: the same bits)
        pid = tl.program_id(0)
        r = (pid // col_blocks) * ROWS + tl.arange(0, ROWS)
        g = (pid % col_blocks) * GROUPS + tl.arange(0, GROUPS)
        row_ok = r < rows
        group_ok = row_ok[:, None] & (g < row_groups)[None, :]
        first = (r[:, None] * row_groups + g[None, :]) * BITS
        word = tl.load(codes_ptr + first, mask=group_ok, other=0)
        if BITS <= 4:
            word = word.to(tl.int32)
        else:
            word = word.to(tl.int64)
        for j in tl.static_range(1, BITS):
            word |= tl.load(codes_ptr + first + j, mask=group_ok, other=0).to(word.dtype) << (8 * j)
        shifts = tl.arange(0, 8) * BITS
        code = ((word[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1)).to(tl.int32)
        mask = group_ok[:, :, None]
        if MODE == 0:  # UAQ: the float32 grid value, as packed.lookup_table computes it
            scale = tl.load(scale_ptr + r, mask=row_ok, other=0.0)
            zero = tl.load(zero_ptr + r, mask=row_ok, other=0).to(tl.float32)
            # code - zero without an int-to-float conversion per weight (a quarter-rate instruction): the float
            # with bits 0x4B000000 | code is 2^23 + code, and 2^23 + zero is exact for an int16 zero, so the
            # difference is code - zero exactly, the same float as float(code) - float(zero): the same bits
            biased = (code | 0x4B000000).to(tl.float32, bitcast=True)
            value = (biased - (zero + 8388608.0)[:, None, None]) * scale[:, None, None]
        elif MODE == 1:  # K-Means-C: row r's codebook
            value = tl.load(book_ptr + r[:, None, None] * (1 << BITS) + code, mask=mask, other=0.0)
        else:  # K-Means-A: one codebook
            value = tl.load(book_ptr + code, mask=mask, other=0.0)
        column = col_offset + g * 8
        offsets = r[:, None, None] * out_stride + column[None, :, None] + tl.arange(0, 8)[None, None, :]
        tl.store(out_ptr + offsets, value.to(tl.float32).to(out_ptr.dtype.element_ty), mask=mask)

    # M and the split count are runtime values, not specialized (Triton would compile again for M == 1, for M
    # divisible by 16, for each split): one binary per tile shape serves every row count and split
    @triton.jit(do_not_specialize=["M", "split_k"])
    def packed_linear_kernel(x_ptr, codes_ptr, scale_ptr, zero_ptr, book_ptr, bias_ptr, out_ptr, partial_ptr,
                             counter_ptr, M, N, K, stride_xm, stride_om, k_per_split, split_k,
                             BITS: tl.constexpr, MODE: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                             IEEE: tl.constexpr, GROUPED: tl.constexpr):
        # out[M, N] = x[M, K] @ W^T (+ bias): one [BLOCK_M, BLOCK_N] tile, over this program's K range. The
        # [BLOCK_N, BLOCK_K] tile of W is decoded in registers (weight (n, k) is code n*K + k of the flat packed
        # weight, multiquant/packing.py), rounded to x's dtype, then tl.dot with W's transpose (fp32 accumulator)
        pid_n, pid_m, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_ok, n_ok = m < M, n < N
        LEVELS: tl.constexpr = 1 << BITS
        SMALL_TABLE: tl.constexpr = BITS <= 4  # codebooks of <= 16 values: loaded once, looked up on chip
        if MODE == 0:
            scale = tl.load(scale_ptr + n, mask=n_ok, other=0.0)
            zero = tl.load(zero_ptr + n, mask=n_ok, other=0).to(tl.float32)
        elif SMALL_TABLE:  # the tile's codebooks [BLOCK_N, LEVELS] (K-Means-A: its one codebook, broadcast)
            level = tl.arange(0, LEVELS)
            if MODE == 1:
                table = tl.load(book_ptr + n[:, None] * LEVELS + level[None, :], mask=n_ok[:, None], other=0.0)
            else:
                table = tl.broadcast_to(tl.load(book_ptr + level)[None, :], (BLOCK_N, LEVELS))
            table = table.to(tl.float32)
        # tl.full, not tl.zeros: a jit helper of triton.language, unusable by the interpreter when Triton was
        # imported before TRITON_INTERPRET=1 was set (the CPU tests)
        acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
        k_start = pid_k * k_per_split
        for k0 in range(k_start, k_start + k_per_split, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_ok = k < K
            x = tl.load(x_ptr + m[:, None] * stride_xm + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            w_ok = n_ok[:, None] & k_ok[None, :]
            if GROUPED:
                # rows start on a group of 8 codes (K % 8 == 0) and a group's BITS <= 4 bytes fit one int32:
                # BITS byte loads per 8 codes, then shifts (instead of one or two byte loads per code)
                group = k0 // 8 + tl.arange(0, BLOCK_K // 8)
                group_ok = n_ok[:, None] & (group < K // 8)[None, :]
                base = (n[:, None] * (K // 8) + group[None, :]) * BITS
                word = tl.full((BLOCK_N, BLOCK_K // 8), 0, tl.int32)
                for j in tl.static_range(BITS):
                    word |= tl.load(codes_ptr + base + j, mask=group_ok, other=0).to(tl.int32) << (8 * j)
                shifts = tl.arange(0, 8) * BITS
                code = tl.reshape((word[:, :, None] >> shifts[None, None, :]) & (LEVELS - 1), (BLOCK_N, BLOCK_K))
            else:  # any row length and width: code i starts at bit i*BITS of its group (as decode_kernel)
                flat = n[:, None] * K + k[None, :]
                bit = (flat & 7) * BITS
                byte = (flat >> 3) * BITS + (bit >> 3)
                shift = bit & 7
                lo = tl.load(codes_ptr + byte, mask=w_ok, other=0).to(tl.int32)
                if 8 % BITS == 0:
                    code = (lo >> shift) & (LEVELS - 1)
                else:
                    hi = tl.load(codes_ptr + byte + 1, mask=w_ok & (shift + BITS > 8), other=0).to(tl.int32)
                    code = ((lo | (hi << 8)) >> shift) & (LEVELS - 1)
            if MODE == 0:
                value = (code.to(tl.float32) - zero[:, None]) * scale[:, None]
            elif SMALL_TABLE:
                value = tl.gather(table, code, axis=1)
            elif MODE == 1:
                value = tl.load(book_ptr + n[:, None] * LEVELS + code, mask=w_ok, other=0.0)
            else:
                value = tl.load(book_ptr + code, mask=w_ok, other=0.0)
            # through float32: one round-to-nearest-even from the table's value, as torch's .to(dtype) (an fp16
            # codebook into bfloat16 included)
            w = tl.trans(tl.where(w_ok, value.to(tl.float32), 0.0).to(x_ptr.dtype.element_ty))
            if IEEE:  # float32 inputs: true fp32 products, not TF32
                acc = tl.dot(x, w, acc, input_precision="ieee")
            else:
                acc = tl.dot(x, w, acc)
        out_ok = m_ok[:, None] & n_ok[None, :]
        if not SPLIT:
            if HAS_BIAS:
                acc += tl.load(bias_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            tl.store(out_ptr + m[:, None] * stride_om + n[None, :],
                     acc.to(out_ptr.dtype.element_ty), mask=out_ok)
        else:
            # split K: every program stores its fp32 partial tile; the last of a tile's split_k programs to arrive
            # (one counter per tile) sums them in split order (deterministic), adds the bias, writes the output
            # and re-arms the counter, so a single launch does the whole product
            tl.store(partial_ptr + (pid_k * M + m[:, None]) * N + n[None, :], acc, mask=out_ok)
            tl.debug_barrier()  # every thread's partial is written before the (release) arrival below
            tile = pid_m * tl.num_programs(0) + pid_n
            arrived = tl.atomic_add(counter_ptr + tile, 1)
            if arrived == split_k - 1:
                total = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
                for s0 in range(0, split_k, 4):  # 4 partials in flight at a time (.cg: from L2), in split order
                    for j in tl.static_range(4):
                        total += tl.load(partial_ptr + ((s0 + j) * M + m[:, None]) * N + n[None, :],
                                         mask=out_ok & (s0 + j < split_k), other=0.0, cache_modifier=".cg")
                if HAS_BIAS:
                    total += tl.load(bias_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
                tl.store(out_ptr + m[:, None] * stride_om + n[None, :],
                         total.to(out_ptr.dtype.element_ty), mask=out_ok)
                tl.atomic_xchg(counter_ptr + tile, 0)

    @triton.jit
    def batched_decode_kernel(desc_ptr, out_ptr, scale_like, zero_like, book_like, parts, WIDE: tl.constexpr,
                              TILE: tl.constexpr, FIELDS: tl.constexpr):
        # the slices of several layers in one launch (see BatchedDecode), each with its own method and width: row p
        # of the int64 descriptor [parts, DESCRIPTOR_FIELDS] holds slice p's codes / scale / zero / codebook
        # addresses, rows, groups of 8 codes per row, where its [rows, row_groups * 8] block starts in out and out's
        # row stride, its first program, its bits and its table kind (MODES); after the rows, each program's slice
        # index. A program decodes TILE consecutive groups of its slice (one row each: rows hold whole groups) with
        # the operations of group_decode_kernel (the same bits); width and table kind are runtime values, the same
        # for all of a program's threads (no divergence). WIDE: some slice has more than 4 bits (int64 words)
        pid = tl.program_id(0)
        row = desc_ptr + tl.load(desc_ptr + parts * FIELDS + pid) * FIELDS
        codes_ptr = tl.load(row).to(tl.pointer_type(tl.uint8))
        scale_ptr = tl.load(row + 1).to(scale_like.dtype)  # pointers of the tables' dtypes (the group's key)
        zero_ptr = tl.load(row + 2).to(zero_like.dtype)
        book_ptr = tl.load(row + 3).to(book_like.dtype)
        rows = tl.load(row + 4).to(tl.int32)
        row_groups = tl.load(row + 5).to(tl.int32)
        out_offset = tl.load(row + 6).to(tl.int32)
        out_stride = tl.load(row + 7).to(tl.int32)
        bits = tl.load(row + 9).to(tl.int32)
        mode = tl.load(row + 10).to(tl.int32)
        gi = (pid - tl.load(row + 8).to(tl.int32)) * TILE + tl.arange(0, TILE)  # flat group index in the slice
        ok = gi < rows * row_groups
        r = gi // row_groups
        first = gi * bits
        if WIDE:
            word = tl.load(codes_ptr + first, mask=ok, other=0).to(tl.int64)
            for j in tl.static_range(1, 8):
                word |= tl.load(codes_ptr + first + j, mask=ok & (j < bits), other=0).to(tl.int64) << (8 * j)
        else:
            word = tl.load(codes_ptr + first, mask=ok, other=0).to(tl.int32)
            for j in tl.static_range(1, 4):
                word |= tl.load(codes_ptr + first + j, mask=ok & (j < bits), other=0).to(tl.int32) << (8 * j)
        shifts = tl.arange(0, 8) * bits
        code = ((word[:, None] >> shifts[None, :]) & ((1 << bits) - 1)).to(tl.int32)
        if mode == 0:
            scale = tl.load(scale_ptr + r, mask=ok, other=0.0)
            zero = tl.load(zero_ptr + r, mask=ok, other=0).to(tl.float32)
            biased = (code | 0x4B000000).to(tl.float32, bitcast=True)  # 2^23 + code: see group_decode_kernel
            value = (biased - (zero + 8388608.0)[:, None]) * scale[:, None]
        else:  # K-Means-C: row r's codebook; K-Means-A: the one codebook
            table = tl.where(mode == 1, r, 0) * (1 << bits)
            value = tl.load(book_ptr + table[:, None] + code, mask=ok[:, None], other=0.0).to(tl.float32)
        # offsets and strides are multiples of 8 (whole groups): 8 contiguous values per group, aligned
        start = tl.multiple_of(out_offset + r * out_stride + (gi - r * row_groups) * 8, 8)
        tl.store(out_ptr + start[:, None] + tl.arange(0, 8)[None, :], value.to(out_ptr.dtype.element_ty),
                 mask=ok[:, None])

    return decode_kernel, packed_linear_kernel, group_decode_kernel, batched_decode_kernel


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


GROUP_TILE = 512  # groups of 8 codes per group-decode program: 4096 weights, 4 groups (64 fp16 bytes) a thread
MAX_TILE_GROUPS = 64  # groups per tile row: 512 weights, 1 KiB of contiguous fp16 per row segment
MIN_TILE_GROUPS = 32  # a warp's 32 threads along one row: 256 weights, 512 contiguous fp16 bytes per store
DECODE_WARPS = 4
PER_WEIGHT_KERNEL, GROUP_KERNEL, BATCHED_KERNEL = 0, 2, 3  # the decode kernels' indices in _jit(...)


def group_blocks(rows: int, row_groups: int, tile: int = GROUP_TILE) -> tuple[int, int]:
    """Tile [ROWS, GROUPS] (x 8 codes) of the group decode for a slice of ``rows`` rows of ``row_groups`` groups.

    GROUPS: MIN_TILE_GROUPS or MAX_TILE_GROUPS, whichever overhangs the row's last group less (ties: the larger),
    so that a warp's threads lie along one row (fewer for rows of fewer groups: one block). Measured on one H200
    (benchmarks/results/decode.json, CUDA graphs): tiles of 64 groups on 4608- and 4096-long rows decoded in half
    the per-weight kernel's time, 32 groups on 256-long rows in 3/4 of it, while 16-group tiles on 1152-long rows
    (two rows per warp, no overhang) took 1.3-1.4x the per-weight kernel's time. ROWS fills about ``tile`` groups
    but no more rows than the slice has (a small layer: one or a few programs)."""
    if row_groups <= MIN_TILE_GROUPS:
        groups = _pow2(row_groups)
    else:
        groups = min((MAX_TILE_GROUPS, MIN_TILE_GROUPS), key=lambda g: triton_cdiv(row_groups, g) * g)
    fill = max(1, tile // groups)
    return min(_pow2(rows), 1 << (fill.bit_length() - 1)), groups  # powers of two (tl.arange)


def takes_group_decode(geo: PartGeometry) -> bool:
    """Whether a slice decodes with the group kernel: the switch is on and its rows hold whole groups."""
    return _GROUP_DECODE[0] and geo.row_len % 8 == 0


@dataclass(frozen=True)
class DecodeLaunch:
    kernel: int  # PER_WEIGHT_KERNEL, GROUP_KERNEL or BATCHED_KERNEL
    grid: tuple
    args: tuple
    meta: dict


def _decode_args(part, out: torch.Tensor, geo: PartGeometry, tile: int = GROUP_TILE,
                 blocks: tuple[int, int] | None = None) -> DecodeLaunch:
    """The launch decoding ``part`` into ``out`` at ``geo``; ``blocks`` (ROWS, GROUPS) overrides the group
    decode's tile (benchmarks/decode.py --sweep)."""
    mode = MODES[part.method]
    codes = part.codes
    scale = part.scale if mode == 0 else codes  # unused pointers: any tensor
    zero = part.zero if mode == 0 else codes
    book = part.codebook if mode != 0 else codes
    if takes_group_decode(geo):
        row_groups = geo.row_len // 8
        rows_per, groups = blocks or group_blocks(geo.rows, row_groups, tile)
        col_blocks = triton_cdiv(row_groups, groups)
        grid = (triton_cdiv(geo.rows, rows_per) * col_blocks,)
        args = (codes, scale, zero, book, out, geo.rows, row_groups, out.stride(0), geo.col_offset, col_blocks)
        return DecodeLaunch(GROUP_KERNEL, grid, args, dict(BITS=part.bits, MODE=mode, ROWS=rows_per, GROUPS=groups))
    rows_per, block_k = _blocks(geo.rows, geo.row_len)
    grid = (triton_cdiv(geo.rows, rows_per), triton_cdiv(geo.row_len, block_k))
    args = (codes, scale, zero, book, out, geo.rows, geo.row_len, out.stride(0), geo.col_offset)
    return DecodeLaunch(PER_WEIGHT_KERNEL, grid, args, dict(BITS=part.bits, MODE=mode, ROWS=rows_per,
                                                            BLOCK_K=block_k))


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _run_decode(launch: DecodeLaunch):
    """One decode launch through Triton's binder; returns the compiled kernel."""
    return _jit(_interpret())[launch.kernel][launch.grid](*launch.args, **launch.meta, num_warps=DECODE_WARPS)


def _launch_fast(launch: DecodeLaunch, direct, device: torch.device):
    """Run ``launch`` on the current stream through ``direct`` (its compiled kernel's launcher, see
    :func:`_direct_runner`) when there is one, else through Triton's binder; returns the launcher for the next
    call (None: keep the binder)."""
    if direct is not None:
        try:
            direct(torch._C._cuda_getCurrentRawStream(device.index))
            return direct
        except (TypeError, ValueError, SystemError):  # launcher of another signature: plain calls from now on
            DIRECT_LAUNCH[0] = False
    compiled = _run_decode(launch)
    if DIRECT_LAUNCH[0] and device.type == "cuda":
        return _direct_launcher(compiled, launch.grid, launch.args + tuple(launch.meta.values()))
    return None


def _launch_decode(part, out: torch.Tensor, geo: PartGeometry, tile: int = GROUP_TILE) -> None:
    _run_decode(_decode_args(part, out, geo, tile))


# ------------------------------------------------------------------------------------------- scratch
class _Scratch:
    """One dense buffer per (device, dtype), as large as the largest layer seen: layers decode into it in
    turn (slot 0; decode-ahead passes also use slot 1, a second buffer). ``generation`` changes when one grows,
    so cached views of the old buffer are refreshed."""

    def __init__(self):
        self.buffers: dict[tuple, torch.Tensor] = {}
        self.generation = 0
        self.plans: "weakref.WeakSet[_Plan]" = weakref.WeakSet()  # their cached views pin a buffer

    def get(self, device: torch.device, dtype: torch.dtype, numel: int, slot: int = 0) -> torch.Tensor:
        key = (device, dtype) if slot == 0 else (device, dtype, slot)
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


@dataclass
class _SlotViews:
    """A plan's views of one scratch buffer and the launches that decode into it."""
    flat: torch.Tensor  # [rows, total]
    weight: torch.Tensor  # the layer's weight shape
    launches: list
    generation: int
    group_decode: bool  # the decode switch the launches were planned with


# Moved by multiquant.packed whenever a packed layer's slices, or a slice's tensors, are replaced (never by in-place
# writes: plans hold the tensors, not their values). A plan compares the objects it depends on (_identity) only when
# this moved since its last comparison: every forward asks every layer's plan, and a batch-2 forward is bound by
# host time (the comparison took about as long as the rest of the call's bookkeeping).
STRUCTURE = [0]


def structure_changed() -> None:
    STRUCTURE[0] += 1


def _identity(layer) -> tuple:
    """The objects a plan depends on: the layer's slices and their buffers, by id (one pass, no tensor compares),
    read from the module dicts (attribute access through nn.Module.__getattr__ costs about a microsecond each)."""
    ids = []
    for part in layer._modules["parts"]._modules.values():
        ids.append(id(part))
        ids.extend(map(id, part._buffers.values()))
    return tuple(ids)


class _Plan:
    """Everything one layer's fast forward needs, computed once per (device, dtype, buffers): the Triton
    launches and the scratch view the GEMM reads (per scratch slot)."""

    def __init__(self, layer, device: torch.device, dtype: torch.dtype):
        self.device, self.dtype = device, dtype
        self.tensors = tuple((p, name, t) for p in layer.parts for name, t in p._buffers.items())
        self.identity = _identity(layer)  # held alive by self.tensors / layer_parts: no id is reused meanwhile
        self.checked = STRUCTURE[0]
        shape = tuple(layer.weight_shape)
        rows = shape[0]
        total = sum(p.numel // rows for p in layer.parts)
        self.numel = rows * total
        self.shape = shape
        self.layer_parts = tuple(layer.parts)
        self.rows, self.total = rows, total
        self.drop_views()
        SCRATCH.plans.add(self)

    def drop_views(self) -> None:
        self.slots: dict[int, _SlotViews] = {}

    # slot 0's views (the ordinary path)
    @property
    def weight(self) -> torch.Tensor | None:
        return self.slots[0].weight if 0 in self.slots else None

    @property
    def flat(self) -> torch.Tensor | None:
        return self.slots[0].flat if 0 in self.slots else None

    @property
    def launches(self) -> list:
        return self.slots[0].launches if 0 in self.slots else []

    def valid_for(self, layer, device, dtype) -> bool:
        """Same device, dtype, slices and buffer objects (a reloaded or moved layer gets a new plan); the objects
        compared only after some packed module's structure changed (STRUCTURE)."""
        if device != self.device or dtype != self.dtype:
            return False
        if self.checked != STRUCTURE[0]:
            if _identity(layer) != self.identity:
                return False
            self.checked = STRUCTURE[0]
        return True

    def views(self, slot: int = 0) -> _SlotViews:
        """This layer's views of scratch slot ``slot`` and its launches, planned anew when the buffer or the
        decode switch changed."""
        views = self.slots.get(slot)
        if views is not None and views.generation == SCRATCH.generation and views.group_decode == _GROUP_DECODE[0]:
            return views
        buf = SCRATCH.get(self.device, self.dtype, self.numel, slot)  # may drop every plan's views
        flat = buf[:self.numel].view(self.rows, self.total)
        launches = []
        offset = 0
        for part in self.layer_parts:
            width = part.numel // self.rows
            if part.method == "dense":
                launches.append(("copy", part, offset, width))
            else:
                launches.append(("decode", _decode_args(part, flat, PartGeometry(self.rows, width, offset)), None))
            offset += width
        views = self.slots[slot] = _SlotViews(flat, flat.view(self.shape), launches, SCRATCH.generation,
                                              _GROUP_DECODE[0])
        return views

    def __call__(self, slot: int = 0) -> torch.Tensor:
        """Decode the layer's weight into scratch slot ``slot`` on the current stream; its view."""
        views = self.views(slot)
        launches = views.launches
        for i, launch in enumerate(launches):
            if launch[0] == "decode":
                _, decode, direct = launch
                launches[i] = ("decode", decode, _launch_fast(decode, direct, self.device))
            else:
                _, part, offset, width = launch
                views.flat[:, offset:offset + width].copy_(part.dense.reshape(self.rows, width))
        return views.weight


# Triton's ``kernel[grid](...)`` binds and specializes its arguments, builds launch metadata and calls the
# (empty) launch hooks on every call: tens of microseconds of Python per launch, and a batch-2 forward is bound
# by launch time. After the first launch a layer calls the compiled kernel's launcher itself with the same
# arguments, as Triton's own ``CompiledKernel[grid](...)`` runner does, minus the metadata and hooks while no
# hook is registered (Triton 3.4+: hooks are HookChain objects; with a hook, the full path runs).
DIRECT_LAUNCH = [os.environ.get("QUA2SEDIMO_DIRECT_LAUNCH", "1") != "0"]


def _direct_runner(compiled):
    """``run(grid, stream, args)`` calling a compiled Triton kernel's launcher (``args``: all of the kernel's
    parameters, in signature order, constexprs included), or None where this Triton's launcher is not the
    expected one."""
    try:
        from triton import knobs

        enter, exit_ = knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook
        run, function, packed = compiled.run, compiled.function, compiled.packed_metadata
    except (ImportError, AttributeError):
        return None
    if not (hasattr(enter, "calls") and hasattr(exit_, "calls")):
        return None  # hooks of another kind (older Triton): keep the full path

    def launch(grid: tuple, stream: int, args: tuple) -> None:
        g0, g1, g2 = (tuple(grid) + (1, 1))[:3]
        if enter.calls or exit_.calls:  # a profiler registered hooks: give them their metadata
            run(g0, g1, g2, stream, function, packed, compiled.launch_metadata(grid, stream, *args), enter, exit_,
                *args)
        else:
            run(g0, g1, g2, stream, function, packed, None, None, None, *args)

    return launch


def _direct_launcher(compiled, grid: tuple, args: tuple):
    """``launch(stream)`` for a compiled Triton kernel and fixed grid and arguments (see :func:`_direct_runner`)."""
    runner = _direct_runner(compiled)
    if runner is None:
        return None
    return lambda stream: runner(grid, stream, args)


# ------------------------------------------------------------------------ small-M fused table-lookup GEMM
# Layers run on few rows (cross-attention K/V over the text tokens, timestep / adaLN MLPs at M = batch) are bound
# by reading their weight: decode + cuBLAS reads b/8 bytes, writes 2 and reads 2 bytes per weight, in two launches;
# the fused kernel reads b/8 bytes per weight in one launch. Above some rows the GEMM is compute-bound and cuBLAS
# on the decoded weight wins. Measured on one H200 (benchmarks/results/export.json, small_m_microbench_v2) the
# fused kernel wins up to M = 16 on K/V-like 1152 x 1152 layers (UAQ-4 7.4 vs 8.6 us, K-Means-C-3 6.4 vs 9.0) and on
# wide layers with codebooks, but loses with UAQ-4 on wide ones (adaLN 1152 -> 6912: 26.5 vs 19.5 us) and from
# M = 64 on almost every layer: no one row threshold wins everywhere, so by default each layer kind is timed once
# on the GPU (the measured dispatch, below) up to MEASURED_MAX_ROWS rows.
MEASURED = "measured"  # the small-M setting that times both paths per layer kind (the default)
MEASURED_MAX_ROWS = 16  # hard cap of the measured dispatch: more rows always decode + cuBLAS
MEASURED_MIN_GAIN = 0.03  # the fused kernel is chosen only if >= 3% faster: near-ties keep the bit-exact path
COUNTER_SLOTS = 4096  # split-K arrival counters per device (one per output tile); tilings with more tiles don't split
MAX_SPLIT_K = 16
PROGRAMS_PER_SM = 8  # fused-kernel programs per streaming multiprocessor that the K split aims for
GEMM_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_COUNTERS: dict[torch.device, torch.Tensor] = {}
_LINEAR_RUNNERS: dict[tuple, object] = {}  # compiled-kernel launchers by specialization


def small_m_setting(value) -> int | str:
    """A small-M setting from a value or its text: ``"measured"`` (also ``"auto"`` or empty) or a row count >= 0
    (0: never the fused kernel; N: always on at most N rows)."""
    text = str(value).strip().lower()
    if text in ("", "auto", MEASURED):
        return MEASURED
    if not text.isdigit():
        raise InputError(f"small-M setting {value!r} is not a row count: use 'measured' (the default: timed per "
                        f"layer), 0 (off: decode + cuBLAS everywhere) or a number of rows (QUA2SEDIMO_SMALL_M_MAX)")
    return int(text)


SMALL_M_MAX = small_m_setting(os.environ.get("QUA2SEDIMO_SMALL_M_MAX", MEASURED))  # process default
_SMALL_M = [SMALL_M_MAX]


def small_m_threshold(max_rows):
    """Within the block, CUDA PackedLinear forwards on at most ``max_rows`` rows (the product of the input's
    leading dimensions) take the fused kernel; 0: never (decode + cuBLAS everywhere, bit-exact with eager);
    ``"measured"``: the measured dispatch (the default). Benchmarks compare them side by side."""
    return _setting_within(_SMALL_M, small_m_setting(max_rows))


def small_m_max() -> int | str:
    """The current small-M setting: a row count, or ``"measured"``."""
    return _SMALL_M[0]


def _small_m_eligible(layer, input: torch.Tensor, max_rows: int) -> bool:
    """One packed slice, a float input of 1..max_rows rows, no autograd needed (the fused kernel has no backward)."""
    in_features = layer.in_features  # rows first: most forwards have many and stop here (host time per call)
    if in_features == 0 or not 0 < input.numel() // in_features <= max_rows or input.dtype not in GEMM_DTYPES:
        return False
    parts = layer.parts
    if len(parts) != 1:
        return False
    part = next(iter(parts))  # not parts[0]: ModuleList indexing costs microseconds
    if part.method == "dense" or part.numel >= MAX_NUMEL:
        return False
    bias = layer.bias
    return not (torch.is_grad_enabled() and (input.requires_grad or (bias is not None and bias.requires_grad)))


def takes_small_m_path(layer, input: torch.Tensor) -> bool:
    """Whether a PackedLinear forward on ``input`` (CUDA, fast path enabled) runs the fused kernel: one packed
    slice (a split layer with a dense half keeps decode + cuBLAS), a float input, no autograd needed, and rows
    within the setting: at most N rows for a row count N; under ``"measured"`` at most MEASURED_MAX_ROWS rows and
    the layer kind's measured decision (:func:`small_m_choice`; timed here the first time, outside compile and
    capture)."""
    setting = _SMALL_M[0]
    measured = setting == MEASURED
    if not _small_m_eligible(layer, input, MEASURED_MAX_ROWS if measured else setting):
        return False
    return small_m_choice(layer, input) if measured else True


# -- the measured dispatch ------------------------------------------------------------------------------------
# Per layer kind, both paths are timed once on the GPU, as Triton's autotune does (warm-up calls, then the median
# of a few reps, each behind an L2 flush and timed by CUDA events), the first time an eager forward meets it; the
# process-level table keeps the decision. Keys are content (method, bits, table kind, N, K, row bucket, dtype,
# bias, device), never module identity: every layer of that kind reuses it, across models and reloads.
SMALL_M_KEY_FIELDS = ("method", "bits", "per_channel_table", "out_features", "in_features", "rows_bucket",
                      "dtype", "bias", "device_type", "device_index")


@dataclass(frozen=True)
class SmallMDecision:
    fused: bool  # the fused kernel is the faster path for this key
    decode_cublas_us: float  # median GPU microseconds per call (decode + cuBLAS)
    fused_us: float  # the fused kernel's (inf where it failed)
    rows: int  # the row count it was measured at (the first call of the key)
    error: str = ""  # why the fused kernel could not run, if it failed


_SMALL_M_TABLE: dict[tuple, SmallMDecision] = {}


def _rows_bucket(rows: int) -> int:
    bucket = 1
    while bucket < rows:  # a loop, not bit_length: traceable for symbolic row counts
        bucket *= 2
    return bucket


def small_m_key(layer, input: torch.Tensor) -> tuple:
    """The measured dispatch's key of a PackedLinear forward on ``input`` (fields SMALL_M_KEY_FIELDS)."""
    part = next(iter(layer.parts))
    rows = input.numel() // layer.in_features
    return (part.method, part.bits, METHODS[part.method].per_channel, layer.out_features, layer.in_features,
            _rows_bucket(rows), input.dtype, layer.bias is not None, input.device.type, input.device.index)


def small_m_choice(layer, input: torch.Tensor) -> bool:
    """The measured decision for this forward's key: cached; else timed now where timing is allowed (an eager
    forward, not under torch.compile's tracing nor CUDA-graph capture); else decode + cuBLAS (False), uncached."""
    key = small_m_key(layer, input)
    decision = _SMALL_M_TABLE.get(key)
    if decision is not None:
        return decision.fused
    if not _may_measure(input):
        return False
    decision = _SMALL_M_TABLE[key] = measure_small_m(layer, input)
    return decision.fused


def _may_measure(input: torch.Tensor) -> bool:
    if torch.compiler.is_compiling():
        return False
    if input.is_cuda:
        return not torch.cuda.is_current_stream_capturing()
    return _interpret()  # CPU tensors: only Triton's interpreter runs the kernels (tests)


def measure_small_m(layer, input: torch.Tensor) -> SmallMDecision:
    """Time decode + cuBLAS and the fused kernel on this layer and input (the current timer, see
    :func:`small_m_timer`); the fused kernel is chosen if at least MEASURED_MIN_GAIN faster."""
    x = input.reshape(-1, input.shape[-1])
    timer = _TIMER[0]
    decode_s = timer(lambda: F.linear(x, fast_weight(layer, x.dtype, x.device), layer.bias), "decode_cublas",
                     x.device)
    try:
        fused_s, error = timer(lambda: packed_linear(layer, x), "fused", x.device), ""
    except Exception as e:  # a kernel this GPU / Triton cannot build or run: decode + cuBLAS for this key
        fused_s, error = float("inf"), f"{type(e).__name__}: {e}"[:300]
    return SmallMDecision(fused=fused_s < (1 - MEASURED_MIN_GAIN) * decode_s, decode_cublas_us=1e6 * decode_s,
                          fused_us=1e6 * fused_s, rows=x.shape[0], error=error)


TIMER_WARMUP, TIMER_REPS = 3, 10


def gpu_time(fn, path: str = "", device: torch.device | None = None) -> float:
    """Median seconds of one call of ``fn`` on the GPU, after TIMER_WARMUP calls: per rep, the L2 cache is flushed
    (as in a forward, where other layers ran since), then one call timed between two CUDA events; the flush keeps
    the GPU busy while the host queues the call, so the events time the GPU, not Python's launch overhead.
    Off CUDA (``device`` not a GPU: Triton's interpreter) host time. ``path`` names what is timed (for injected
    timers)."""
    for _ in range(TIMER_WARMUP):
        fn()
    if device is None or device.type != "cuda":
        import time

        samples = []
        for _ in range(TIMER_REPS):
            start = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - start)
        return statistics.median(samples)
    with torch.cuda.device(device):  # events record on the current device's stream
        flush = torch.empty(_l2_flush_bytes(device), dtype=torch.uint8, device=device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(TIMER_REPS)]
        for start, end in events:
            flush.zero_()
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
    return 1e-3 * statistics.median(start.elapsed_time(end) for start, end in events)


def _l2_flush_bytes(device: torch.device) -> int:
    size = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)
    return 2 * size if size else 256 << 20  # Triton's do_bench flushes 256 MB


_TIMER = [gpu_time]


def small_m_timer(timer):
    """Within the block, the measured dispatch times a path with ``timer(fn, path, device) -> seconds``
    (``path``: ``"decode_cublas"`` or ``"fused"``) instead of :func:`gpu_time`: a test seam (it should call
    ``fn``, which runs the path)."""
    return _setting_within(_TIMER, timer)


def small_m_table() -> list[dict]:
    """The measured decisions of this process: one dict per key (SMALL_M_KEY_FIELDS, then SmallMDecision's)."""
    return [small_m_entry(key) for key in _SMALL_M_TABLE]


def small_m_entry(key: tuple) -> dict | None:
    """The table's entry of one key (see :func:`small_m_table`), None if it was not measured."""
    decision = _SMALL_M_TABLE.get(key)
    if decision is None:
        return None
    entry = dict(zip(SMALL_M_KEY_FIELDS, key))
    entry["dtype"] = str(entry["dtype"]).replace("torch.", "")
    return entry | dataclasses.asdict(decision)


def clear_small_m_table() -> None:
    """Forget every measured decision (the next eager forwards time again)."""
    _SMALL_M_TABLE.clear()


@torch.no_grad()
def tune_small_m(model: nn.Module, *args, **kwargs) -> list[dict]:
    """Warm the measured dispatch's table for these inputs: one eager forward ``model(*args, **kwargs)`` with the
    measured setting, whatever the current one. Call it once per input shape (batch, tokens) before
    ``torch.compile`` or CUDA-graph capture, which never time (they use the table, else decode + cuBLAS). Returns
    the table entries of the keys this forward met (see :func:`small_m_table`)."""
    from .packed import PackedLinear  # packed imports this module

    keys = []

    def note_key(module, inputs):
        x = inputs[0] if inputs else None
        if torch.is_tensor(x) and can_use_kernels(x) and _small_m_eligible(module, x, MEASURED_MAX_ROWS):
            keys.append(small_m_key(module, x))

    handles = [m.register_forward_pre_hook(note_key) for m in model.modules() if isinstance(m, PackedLinear)]
    try:
        with small_m_threshold(MEASURED):
            model(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    met = [key for key in dict.fromkeys(keys) if key in _SMALL_M_TABLE]  # first-met order, once each
    return [small_m_entry(key) for key in met]


def packed_linear(layer, input: torch.Tensor) -> torch.Tensor:
    """``F.linear(input, W, layer.bias)`` of a single-slice PackedLinear, by the fused kernel straight from the
    packed codes (a custom op under torch.compile).

    Accuracy: the kernel's weight equals the eager dequantized weight W in the compute dtype bit for bit; the
    products are accumulated in float32 (tl.dot, IEEE fp32 products for float32 inputs), split-K partials summed
    in a fixed order (deterministic), the bias added in float32, one rounding to the output dtype. Not bit-exact
    with cuBLAS (another summation order); against the float64 product of the same x and W,
        |y - y64| <= u * (|y64| + e) + e + s,   e = (K + 2) * 2^-23 * (|x| @ |W|^T + |bias|),
    u the output dtype's unit roundoff (2^-11 fp16, 2^-8 bf16, 2^-24 fp32), s half its smallest subnormal; e
    allows one float32 unit (2^-23, not the 2^-24 of round-to-nearest) per addition and per fp32 product, as
    tensor-core accumulators may truncate (:func:`linear_error_bound`; tests/test_kernels.py checks it)."""
    part = next(iter(layer.parts))
    out_features = part.shape[0]
    x = input.reshape(-1, input.shape[-1])
    buffers = part._buffers
    sources = (buffers["codes"], buffers.get("scale"), buffers.get("zero"), buffers.get("codebook"), layer.bias)
    if torch.compiler.is_compiling():
        out = packed_linear_op(x, *sources, part.method, part.bits, out_features)
    else:  # one cached launch per input signature (not a buffer of the module: invisible to state_dict / .to())
        if x.stride(-1) != 1:
            x = x.contiguous()
        plans = layer.__dict__.setdefault("_small_m_plans", {})
        signature = (x.shape[0], x.dtype, x.stride(0), x.data_ptr() % 16 == 0, x.device)
        launch = plans.get(signature)
        if launch is None or not launch.reads(sources):
            if x.shape[0] == 0 or out_features == 0:
                return input.new_empty(*input.shape[:-1], out_features)
            launch = plans[signature] = _LinearLaunch(x, *sources, part.method, part.bits, out_features)
        out = launch(x)
    return out.view(*input.shape[:-1], out_features)


def linear_error_bound(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The float64 product ``x @ weight^T + bias`` and the fused kernel's error bound around it (see
    :func:`packed_linear`), elementwise, for an output in ``dtype``."""
    x64, w64 = x.detach().double().reshape(-1, x.shape[-1]), weight.detach().double()
    b64 = (bias.detach().double() if bias is not None
           else torch.zeros(w64.shape[0], dtype=torch.float64, device=x.device))
    exact = x64 @ w64.T + b64
    info = torch.finfo(dtype)
    unit = info.eps / 2
    half_subnormal = info.smallest_normal * info.eps / 2
    acc = (x64.shape[1] + 2) * 2.0 ** -23 * (x64.abs() @ w64.abs().T + b64.abs())
    return exact, unit * (exact.abs() + acc) + acc + half_subnormal


@dataclass(frozen=True)
class LinearTiling:
    block_m: int
    block_n: int
    block_k: int
    split_k: int
    k_per_split: int  # a multiple of block_k
    num_warps: int


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def linear_tiling(rows: int, out_features: int, in_features: int, processors: int,
                  split_k: int | None = None) -> LinearTiling:
    """Tiles of the fused kernel: tl.dot needs >= 16 in every dimension; up to 128 rows (every row tile decodes
    the weight again: few, tall tiles), 16 output channels at <= 16 rows and 32 above, 64-deep K steps; K split
    until about PROGRAMS_PER_SM programs per streaming multiprocessor run, at most MAX_SPLIT_K ways and never
    into empty splits. ``split_k`` forces a split (tests). Why many programs: each one's K loop is a chain of
    dependent loads, so the GPU hides their latency only with many programs in flight (the first tiling, about
    2 per SM, ran slower than decode + cuBLAS: benchmarks/results/export.json). Registers (ptxas -v on Triton
    3.8's sm_90 code of the PixArt shapes, 3/4 bits, grouped decode): 72-90 at 16 rows, 120-127 at 64 rows and
    8 warps, 213-232 at 128 rows and 8 warps; no spills."""
    block_m = min(128, max(16, _pow2(rows)))
    block_n = min(16 if block_m == 16 else 32, max(16, _pow2(out_features)))  # GEMV-like: narrower, more tiles
    block_k = min(64, max(16, _pow2(in_features)))
    k_blocks = triton_cdiv(in_features, block_k)
    tiles = triton_cdiv(rows, block_m) * triton_cdiv(out_features, block_n)
    if split_k is None:
        split_k = 1 if tiles > COUNTER_SLOTS else min(MAX_SPLIT_K, (PROGRAMS_PER_SM * processors) // tiles)
    per = triton_cdiv(k_blocks, max(1, min(split_k, k_blocks)))
    return LinearTiling(block_m, block_n, block_k, triton_cdiv(k_blocks, per), per * block_k, 8 if block_m >= 64 else 4)


@functools.lru_cache(maxsize=None)
def _processors(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: a few "SMs", so small test shapes exercise the split-K path
    return torch.cuda.get_device_properties(device).multi_processor_count


def _counters(device: torch.device) -> torch.Tensor:
    """Split-K arrival counters, zero between launches (every launch re-arms the ones it used). Allocated on the
    first split launch, so, as for the scratch buffer, warm up before CUDA-graph capture."""
    counters = _COUNTERS.get(device)
    if counters is None:
        counters = _COUNTERS[device] = torch.zeros(COUNTER_SLOTS, device=device, dtype=torch.int32)
    return counters


def _packed_linear(x: torch.Tensor, codes: torch.Tensor, scale, zero, codebook, bias, method: str, bits: int,
                   out_features: int, split_k: int | None = None) -> torch.Tensor:
    """out [M, N] = x [M, K] @ W^T (+ bias), W the [N, K] weight packed in ``codes`` (see :func:`packed_linear`)."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    if x.shape[0] == 0 or out_features == 0:
        return torch.empty(x.shape[0], out_features, device=x.device, dtype=x.dtype)
    return _LinearLaunch(x, codes, scale, zero, codebook, bias, method, bits, out_features, split_k)(x)


_LINEAR_CONSTEXPRS = ("BITS", "MODE", "HAS_BIAS", "SPLIT", "BLOCK_M", "BLOCK_N", "BLOCK_K", "IEEE", "GROUPED")


class _LinearLaunch:
    """The fixed part of the fused kernel's launch for one input signature (rows, dtype, row stride, alignment)
    and one set of weight tensors: tiling, grid, the arguments but x / out / partials, constexprs. On CUDA the
    compiled kernel is called through its launcher directly, as the decode plans do (Triton's binder costs more
    host time than these small kernels take on the GPU); the launcher is shared through ``_LINEAR_RUNNERS`` under
    a key holding every integer argument's value and every tensor's dtype and 16-byte alignment, a superset of
    what Triton specializes a binary on (out and the partials are fresh allocations, always aligned)."""

    def __init__(self, x: torch.Tensor, codes, scale, zero, codebook, bias, method: str, bits: int,
                 out_features: int, split_k: int | None = None):
        rows, in_features = x.shape
        self.device, self.dtype, self.rows, self.out_features = x.device, x.dtype, rows, out_features
        tiling = linear_tiling(rows, out_features, in_features, _processors(x.device), split_k)
        self.split = tiling.split_k
        mode = MODES[method]
        self.sources = (codes, scale, zero, codebook, bias)
        self.fixed = (codes, scale if mode == 0 else codes, zero if mode == 0 else codes,  # unused: any tensor
                      codebook if mode != 0 else codes, bias if bias is not None else codes)
        self.counters = _counters(x.device) if self.split > 1 else None
        self.ints = (rows, out_features, in_features, x.stride(0), out_features, tiling.k_per_split, self.split)
        self.constexprs = (bits, mode, bias is not None, self.split > 1, tiling.block_m, tiling.block_n,
                           tiling.block_k, x.dtype == torch.float32, bits <= 4 and in_features % 8 == 0)
        self.grid = (triton_cdiv(out_features, tiling.block_n), triton_cdiv(rows, tiling.block_m), self.split)
        self.num_warps = tiling.num_warps
        self.direct = x.is_cuda and not _interpret()
        tensors = (x,) + self.fixed
        self.key = (x.device, self.constexprs, self.ints, tuple(t.dtype for t in tensors),
                    tuple(t.data_ptr() % 16 == 0 for t in tensors))
        self.runner = None

    def reads(self, sources: tuple) -> bool:
        return all(a is b for a, b in zip(self.sources, sources))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.empty(self.rows, self.out_features, device=self.device, dtype=self.dtype)
        split = self.split
        partial = torch.empty(split * self.rows * self.out_features, device=self.device,
                              dtype=torch.float32) if split > 1 else out
        args = (x,) + self.fixed + (out, partial, self.counters if split > 1 else out) + self.ints
        if self.direct and DIRECT_LAUNCH[0]:
            runner = self.runner or _LINEAR_RUNNERS.get(self.key)
            if runner is not None:
                try:
                    runner(self.grid, torch._C._cuda_getCurrentRawStream(self.device.index), args + self.constexprs)
                    self.runner = runner
                    return out
                except (TypeError, ValueError, SystemError):  # launcher of another signature: plain calls
                    DIRECT_LAUNCH[0] = False
                    _LINEAR_RUNNERS.clear()
        compiled = _jit(_interpret())[1][self.grid](*args, **dict(zip(_LINEAR_CONSTEXPRS, self.constexprs)),
                                                    num_warps=self.num_warps, num_stages=2)
        if self.direct and DIRECT_LAUNCH[0]:
            runner = _direct_runner(compiled)
            if runner is not None:
                _LINEAR_RUNNERS[self.key] = self.runner = runner
        return out


def fast_weight(layer, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The dense weight of a packed layer on CUDA in ``dtype``: a view of the shared scratch buffer (eager),
    valid until the next packed layer runs, or a fresh tensor (under torch.compile)."""
    if torch.compiler.is_compiling():
        return _compiled_weight(layer, dtype)
    if device.type == "cuda" and device.index is None:  # the current GPU: launches need its index, plans compare it
        device = torch.device(device.type, torch.cuda.current_device())
    plan = layer.__dict__.get("_fast_plan")
    if plan is None or not plan.valid_for(layer, device, dtype):
        if _numel(layer.weight_shape) >= MAX_NUMEL:
            return layer.dequantize_weight(dtype)
        plan = _Plan(layer, device, dtype)
        layer.__dict__["_fast_plan"] = plan  # not a submodule / buffer: invisible to state_dict and .to()
    order = _AHEAD[0]  # decode ahead / batched decode on the model being run
    return plan() if order is None else order.weight(plan)


# ------------------------------------------------------------------------------------------ decode ahead
# Off unless ``decode_ahead(model)`` or ``batched_decode(model, ahead=True)`` is called. Each packed layer's decode
# and its GEMM run one after the other on one stream, and a decode of a 1152 x 1152 layer is too small to fill the
# GPU. Both levers follow the order in which the first forward of ``model`` called its packed layers (class
# _ForwardOrder), cut into units: runs of consecutive calls whose weights one decode writes (DecodeAhead: each call
# alone; BatchedDecode: its groups, below). With decode ahead, when unit u's first call gets its weight, the decode
# of unit u + 1 is launched on a side stream into the other of two scratch slots, where it overlaps unit u's
# compute (its GEMMs and, for a group, the attention / norm / elementwise kernels between them, which leave SMs
# free; a lone cuBLAS GEMM leaves hardly any). Ordering, by events: unit u + 1's decode waits for everything the
# main stream had queued when unit u started (the GEMMs of unit u - 1, the last readers of that slot), and the main
# stream waits for it before unit u + 1's first GEMM. A forward that leaves the recorded order (another branch, a
# moved layer) joins the side stream and decodes on the main stream layer by layer from there; the next forward
# records anew. The end of every forward joins the side stream, as CUDA-graph capture requires. Units, descriptors
# and scratch sizes are made outside capture, by the first forward that follows an order (warm up with two forwards
# before capture: one records, one builds and follows; a captured forward without them decodes layer by layer).
# Off CUDA (Triton's interpreter, tests) there is no side stream: the decode "ahead" runs at once, into the other
# slot all the same. Same kernels, same values: outputs are bit-identical. Costs a second scratch buffer as large
# as the largest unit.
_AHEAD: list = [None]  # the _ForwardOrder of the forward being run, if any


@functools.lru_cache(maxsize=None)
def _side_stream(device: torch.device) -> "torch.cuda.Stream":
    return torch.cuda.Stream(device=device)


RETIRED_ORDERS = 16  # dropped orders whose batched descriptors stay allocated (a few KB each): a graph captured on
# one of them replays correctly after eager forwards have recorded other orders


class _LayerUnit:
    """One packed-layer call decoded by its own launches (its _Plan) into a scratch slot."""
    batched = False

    def __init__(self, plan: _Plan):
        self.plans, self.numel = [plan], plan.numel

    def __call__(self, slot: int = 0) -> None:
        self.plans[0](slot)

    def weights(self, slot: int = 0) -> list:
        return [self.plans[0].views(slot).weight]


class _ForwardOrder:
    """The order of a model's packed-layer calls, recorded by its first forward (forward hooks on the model;
    ``remove()``, or leaving a ``with`` block, takes them off) and followed by the next ones: while a forward runs,
    fast_weight hands each packed layer's call to :meth:`weight`. The first forward that follows an order (outside
    CUDA-graph capture) cuts it into units (the subclass's :meth:`_units`) and sizes the scratch slots; from then a
    unit's first call decodes the unit into its slot, or waits for its decode queued ahead (``ahead``: see above),
    and its later calls take their slices. Calls in no unit, and the calls of a forward from where it left the
    recorded order, decode on their own (slot 0, main stream); the next forward records anew.

    ``recorded_calls``: the packed-layer calls of the order (None: the next forward records); ``ahead_decodes``
    counts decodes launched ahead, ``batched_launches`` the batched groups' launches, ``batched_calls`` the calls
    served from them; ``scratch_extra_bytes``: how much more scratch the units take than one buffer of the order's
    largest layer."""
    ahead = False  # decode the next unit on a side stream into the other scratch slot

    def __init__(self, model: nn.Module):
        self.order: list[_Plan] | None = None
        self.recording = False
        self.depth = 0
        self.call = 0  # index of the next packed-layer call of the forward being run
        self.diverged = False
        self.previous = None
        self.ahead_decodes = self.batched_launches = self.batched_calls = self.scratch_extra_bytes = 0
        self.pending = None  # (device, event or None, scratch generation) of the next unit's decode queued ahead
        self.serving = None  # (unit index, scratch generation) of the unit whose calls are being served
        self._events: dict[torch.device, tuple] = {}
        self._retired = collections.deque(maxlen=RETIRED_ORDERS)  # descriptors of dropped orders' units
        self._forget()
        self.handles = [model.register_forward_pre_hook(self._start),
                        model.register_forward_hook(self._end, always_call=True)]

    @property
    def recorded_calls(self) -> int | None:
        return None if self.order is None or self.recording else len(self.order)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()

    def _units(self) -> list[tuple[int, object]]:
        """(first call, unit) of the recorded order, in call order: a _LayerUnit or a _BatchedGroup each."""
        raise NotImplementedError

    def _forget(self) -> None:  # the recorded order was dropped
        if getattr(self, "units", None):  # a CUDA graph captured while they served may still read them
            self._retired.append([unit.descriptor for _, unit in self.units if unit.batched])
        self.units: list[tuple[int, object]] | None = None
        self._members: dict[int, tuple[int, int]] = {}  # call -> (its unit, its index there)
        self._slot_numel: dict[tuple, int] = {}  # (device, dtype) -> elements of each scratch slot the units use

    def _start(self, module, args) -> None:
        if torch.compiler.is_compiling():
            return
        self.depth += 1
        if self.depth > 1:  # the model called within its own forward: one pass
            return
        self.call, self.diverged = 0, False
        if self.order is None:
            self.recording, self.order = True, []
            self._forget()
        else:
            self._follow()
        self.previous, _AHEAD[0] = _AHEAD[0], self

    def _end(self, module, args, output) -> None:
        if torch.compiler.is_compiling():
            return
        self.depth -= 1
        if self.depth:
            return
        _AHEAD[0], self.previous = self.previous, None
        self._join()
        if self.recording:
            self.recording = False
        elif self.diverged or self.call != len(self.order):
            self.order = None  # the forward left the recorded order: record the next one
            self._forget()

    def _next_call(self, plan: _Plan) -> int | None:
        """This call's index in the recorded order, or None: recording (the call is appended), or the forward
        left the order (at the first such call, the side stream is joined)."""
        if self.recording:
            self.order.append(plan)
            return None
        k = self.call
        if self.diverged or k >= len(self.order) or self.order[k] is not plan:
            if not self.diverged:
                self._join()
                self.diverged = True
            return None
        self.call = k + 1
        return k

    def _follow(self) -> None:
        """A forward starts that follows the recorded order: its units built (once, not under capture), the
        scratch slots as large as the largest unit (a buffer never grows, is freed, while the side stream may
        write it)."""
        self.pending = self.serving = None
        if self.units is None:
            if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                return
            self._build()
        for (device, dtype), numel in self._slot_numel.items():
            for slot in range(2 if self.ahead else 1):
                SCRATCH.get(device, dtype, numel, slot)

    def _build(self) -> None:
        self.units = self._units()
        for u, (start, unit) in enumerate(self.units):
            for index in range(len(unit.plans)):
                self._members[start + index] = (u, index)
        layers: dict[tuple, int] = {}  # (device, dtype) -> the largest layer's elements
        for plan in self.order:
            layers[(plan.device, plan.dtype)] = max(layers.get((plan.device, plan.dtype), 0), plan.numel)
        self._slot_numel = dict(layers)  # ... and the largest unit's
        for _, unit in self.units:
            key = (unit.plans[0].device, unit.plans[0].dtype)
            self._slot_numel[key] = max(self._slot_numel[key], unit.numel)
        slots = 2 if self.ahead else 1
        self.scratch_extra_bytes = sum((slots * numel - layers[key]) * key[1].itemsize
                                       for key, numel in self._slot_numel.items())

    def weight(self, plan: _Plan) -> torch.Tensor:
        """The weight of this packed-layer call (fast_weight within a forward of the model)."""
        k = self._next_call(plan)
        member = self._members.get(k) if k is not None else None
        if member is None:
            return plan()  # slot 0 on the main stream, as without these levers
        u, index = member
        unit = self.units[u][1]
        slot = u % 2 if self.ahead else 0
        if index == 0:
            self._serve(u, slot, plan.device)
        elif self.serving != (u, SCRATCH.generation):  # a scratch buffer was replaced since the unit's decode
            self._join()
            return plan()
        if unit.batched:
            self.batched_calls += 1
        return unit.weights(slot)[index]

    def _serve(self, u: int, slot: int, device: torch.device) -> None:
        """Unit u's first call: its decode (queued ahead: the main stream waits for it; else here), and the next
        unit's decode queued ahead."""
        pending, self.pending = self.pending, None
        if pending is not None and pending[1] is not None:
            torch.cuda.current_stream(device).wait_event(pending[1])
        if pending is None or pending[2] != SCRATCH.generation:  # not decoded ahead (the forward's first unit, or
            self._decode(self.units[u][1], slot)  # the one before on another device), or a buffer was replaced since
        self.serving = (u, SCRATCH.generation)
        if self.ahead and u + 1 < len(self.units) and self.units[u + 1][1].plans[0].device == device:
            # (a Stream object costs microseconds to make: only where it is used)
            main = torch.cuda.current_stream(device) if device.type == "cuda" else None
            self._ahead(self.units[u + 1][1], 1 - slot, main)

    def _decode(self, unit, slot: int) -> None:
        unit(slot)
        if unit.batched:
            self.batched_launches += 1

    def _ahead(self, unit, slot: int, main) -> None:
        device, done = unit.plans[0].device, None
        if main is None:  # off CUDA: no streams, decoded now
            self._decode(unit, slot)
        else:
            progress, done = self._event_pair(device, slot)
            progress.record(main)  # the GEMMs of the unit before, the last readers of ``slot``, are queued before
            side = _side_stream(device)
            side.wait_event(progress)
            with torch.cuda.stream(side):
                self._decode(unit, slot)
            done.record(side)
        self.pending = (device, done, SCRATCH.generation)
        self.ahead_decodes += 1

    def _join(self) -> None:
        if self.pending is not None:
            device, done, _ = self.pending
            if done is not None:
                torch.cuda.current_stream(device).wait_event(done)
            self.pending = None

    def _event_pair(self, device: torch.device, slot: int) -> tuple:
        # reused: a wait is queued right after its record, and waits on the record made before it
        events = self._events.get(device)
        if events is None:
            events = self._events[device] = (torch.cuda.Event(), torch.cuda.Event(), torch.cuda.Event())
        return events[0], events[1 + slot]


class DecodeAhead(_ForwardOrder):
    """Decode ahead for the forwards of one model, call by call (see above)."""
    ahead = True

    def _units(self) -> list[tuple[int, object]]:
        return [(k, _LayerUnit(plan)) for k, plan in enumerate(self.order)]


def decode_ahead(model: nn.Module) -> DecodeAhead:
    """Overlap each packed layer's decode with the previous layer's GEMM in ``model``'s forwards (off unless called;
    see the comment above :class:`_ForwardOrder`). Returns the handle; ``.remove()`` turns it off."""
    return DecodeAhead(model)


# ------------------------------------------------------------------------------------------ batched decode
# On where ``batched_decode(model)`` is called; load_quantized calls it on the model it builds (QUA2SEDIMO_BATCHED_DECODE
# =0: not; =ahead: with ahead=True). Measured on one H200 at batch 2 / 512 px under CUDA graphs
# (benchmarks/results/export.json): 2-7% faster forwards than one decode launch per layer for about 5 MB more
# scratch; ahead=True gained nothing more (the side stream's decode hardly overlaps the main stream's work). Width
# and table kind are read per slice, so a mixed configuration batches as a uniform one does (random 3.5-bit mix
# of PixArt-alpha: 1.20 -> 1.13 of FP16 under CUDA graphs); a group decodes at about the speed of a zero-fill of
# the same bytes.
# Why: a decode launch of a 1152 x 1152 layer costs about the fixed cost of any kernel (4-6 us on an H200
# against 0.7 us of bandwidth: benchmarks/results/decode.json), so with batched decode, every forward of ``model``
# after the first follows the order in which the first one called its packed layers, and one launch of
# batched_decode_kernel decodes a group of consecutive calls into consecutive slices of a scratch buffer when the
# group's first call asks for its weight; the group's later calls take their slice, no launch. A group:
# consecutive calls whose slices share the compute dtype, the table dtypes and the word width (all up to 4 bits, or
# some above), any method and width each (a mixed configuration batches as a uniform one), and hold whole groups
# of 8 codes per row (no dense slice), up to max_bytes of decoded weights and MAX_BATCH_PARTS slices;
# other calls decode as without it. Safe on one stream: nothing else writes slot 0 between a group's decode and its
# last GEMM (the calls between are the group's), and the next decode into it is queued after them. With
# ``ahead=True`` the groups (and the calls between them, one by one) are the units of decode ahead (above): group
# g + 1 decodes on the side stream into the other slot while group g computes. The descriptors are built once per
# recorded order, outside CUDA-graph capture (see above). Same values as the per-layer decode bit for bit; the
# scratch grows to the largest group (two of them ahead).


def batched_decode_switch(value: str) -> tuple[bool, bool]:
    """QUA2SEDIMO_BATCHED_DECODE's value -> (batched decode on, ahead): "0" or "" off, "ahead" both, else on."""
    value = value.strip().lower()
    return value not in ("", "0"), value == "ahead"


# load_quantized attaches batched_decode(model, ahead=BATCHED_DECODE_AHEAD) where BATCHED_DECODE
BATCHED_DECODE, BATCHED_DECODE_AHEAD = batched_decode_switch(os.environ.get("QUA2SEDIMO_BATCHED_DECODE", "1"))
# decoded bytes per group, the scratch buffer's size at most: 16 MiB is just above the largest layer of PixArt-alpha
# and DiT-XL/2 (1152 -> 6912 adaLN, 15.9 MB in fp16), so their scratch hardly grows, and holds six 1152 x 1152 layers
BATCHED_DECODE_MAX_BYTES = 16 << 20
MAX_BATCH_PARTS = 64
DESCRIPTOR_FIELDS = 11  # per slice: codes, scale, zero, codebook (addresses), rows, row_groups, out_offset,
# out_stride, first program, bits, table kind (the kernel reads them by position); then one slice index per program


def _merged_tables(tables: tuple, pairs) -> tuple | None:
    """Sorted (table name, dtype) pairs of ``tables`` and ``pairs`` together; None where one name has two dtypes
    (the kernel has one pointer type per table)."""
    merged = dict(tables)
    for name, dtype in pairs:
        if merged.setdefault(name, dtype) != dtype:
            return None
    return tuple(sorted(merged.items(), key=lambda item: item[0]))


def batch_key(plan: _Plan) -> tuple | None:
    """What a layer call's decode shares with the others of its batched group: (device, compute dtype, whether
    some slice has more than 4 bits, its tables' dtypes as sorted (name, dtype) pairs); None if it cannot join
    one (a dense slice, rows not of whole groups of 8 codes, two slices with one table name in two dtypes)."""
    tables = ()
    for part in plan.layer_parts:
        if part.method == "dense" or (part.numel // plan.rows) % 8:
            return None
        tables = _merged_tables(tables, ((name, t.dtype) for name, t in part.params().items()))
        if tables is None:
            return None
    wide = any(part.bits > 4 for part in plan.layer_parts)
    return plan.device, plan.dtype, wide, tables


def _joins(group: tuple, key: tuple | None) -> tuple | None:
    """The group's key with ``key``'s call in it, None if it cannot join (another device, compute dtype or word
    width, or a table name both use in two dtypes)."""
    if key is None or key[:3] != group[:3]:
        return None
    tables = _merged_tables(group[3], key[3])
    return None if tables is None else group[:3] + (tables,)


def batch_groups(order: list, max_bytes: int) -> list[tuple[int, int]]:
    """The batched groups of a recorded order: [start, end) runs of consecutive calls that join (:func:`_joins`), at most
    ``max_bytes`` of decoded weights and MAX_BATCH_PARTS slices each; runs of one call are left out."""
    groups, start = [], 0
    while start < len(order):
        key = batch_key(order[start])
        end, size, parts = start, 0, 0
        while end < len(order) and key is not None:
            joined = _joins(key, batch_key(order[end]))
            if joined is None:
                break
            plan = order[end]
            grown = size + plan.numel * plan.dtype.itemsize
            if end > start and (grown > max_bytes or parts + len(plan.layer_parts) > MAX_BATCH_PARTS):
                break
            key, size, parts, end = joined, grown, parts + len(plan.layer_parts), end + 1
        if end - start > 1:
            groups.append((start, end))
        start = max(end, start + 1)
    return groups


@dataclass
class _GroupSlot:
    """A batched group's views of one scratch slot and its launch there."""
    weights: list
    launch: DecodeLaunch
    direct: object  # the launch's direct launcher (None: Triton's binder)
    generation: int


class _BatchedGroup:
    """One batched launch: the descriptor of the calls ``plans`` (on their device, built once) and, per scratch
    slot, the views of their slices and the launch (refreshed when the scratch buffer changes)."""
    batched = True

    def __init__(self, plans: list):
        self.plans = plans
        self.offsets = [0]
        for plan in plans:
            self.offsets.append(self.offsets[-1] + plan.numel)
        self.numel = self.offsets[-1]
        parts = [part for plan in plans for part in plan.layer_parts]
        templates = {}  # a tensor of each table's dtype (the kernel's pointer types); unused: the codes
        rows, slices = [], []  # DESCRIPTOR_FIELDS per slice; each program's slice
        for plan, offset in zip(plans, self.offsets):
            column = 0
            for part in plan.layer_parts:
                row_groups = part.numel // plan.rows // 8
                params = part.params()
                templates.update((name, t) for name, t in params.items() if name not in templates)
                tables = [params[name].data_ptr() if name in params else part.codes.data_ptr()
                          for name in ("scale", "zero", "codebook")]  # unused pointers: any address
                rows += [part.codes.data_ptr(), *tables, plan.rows, row_groups, offset + column, plan.total,
                         len(slices), part.bits, MODES[part.method]]
                slices += [len(rows) // DESCRIPTOR_FIELDS - 1] * triton_cdiv(plan.rows * row_groups, GROUP_TILE)
                column += row_groups * 8
        self.descriptor = torch.tensor(rows + slices, dtype=torch.int64).to(plans[0].device)
        self.parts = len(rows) // DESCRIPTOR_FIELDS
        self.templates = tuple(templates.get(name, parts[0].codes) for name in ("scale", "zero", "codebook"))
        self.grid = (len(slices),)
        self.meta = dict(WIDE=any(part.bits > 4 for part in parts), TILE=GROUP_TILE, FIELDS=DESCRIPTOR_FIELDS)
        self.slots: dict[int, _GroupSlot] = {}

    def _slot(self, slot: int) -> _GroupSlot:
        state = self.slots.get(slot)
        if state is None or state.generation != SCRATCH.generation:
            plans = self.plans
            buf = SCRATCH.get(plans[0].device, plans[0].dtype, self.numel, slot)  # (sized when the units were built)
            weights = [buf[a:a + plan.numel].view(plan.shape) for plan, a in zip(plans, self.offsets)]
            launch = DecodeLaunch(BATCHED_KERNEL, self.grid, (self.descriptor, buf) + self.templates + (self.parts,),
                                  self.meta)
            state = self.slots[slot] = _GroupSlot(weights, launch, None, SCRATCH.generation)
        return state

    def __call__(self, slot: int = 0) -> None:
        """Decode every call's weight into its slice of scratch slot ``slot`` (current stream)."""
        state = self._slot(slot)
        state.direct = _launch_fast(state.launch, state.direct, self.plans[0].device)

    def weights(self, slot: int = 0) -> list:
        return self._slot(slot).weights


class BatchedDecode(_ForwardOrder):
    """Batched decode for the forwards of one model (see above); ``ahead``: the groups, and the calls between them
    one by one, decoded ahead on a side stream (see :class:`_ForwardOrder`). ``groups``: the [start, end) call
    ranges decoded by one launch each (None until built)."""

    def __init__(self, model: nn.Module, max_bytes: int = BATCHED_DECODE_MAX_BYTES, ahead: bool = False):
        self.max_bytes, self.ahead = int(max_bytes), bool(ahead)
        super().__init__(model)

    @property
    def groups(self) -> list[tuple[int, int]] | None:
        if self.units is None:
            return None
        return [(start, start + len(unit.plans)) for start, unit in self.units if unit.batched]

    def _units(self) -> list[tuple[int, object]]:
        units = [(start, _BatchedGroup(self.order[start:end])) for start, end in batch_groups(self.order,
                                                                                                self.max_bytes)]
        if self.ahead:  # every call in a unit: those between groups decode ahead one by one
            grouped = {k for start, unit in units for k in range(start, start + len(unit.plans))}
            units += [(k, _LayerUnit(plan)) for k, plan in enumerate(self.order) if k not in grouped]
        return sorted(units, key=lambda item: item[0])


def batched_decode(model: nn.Module, max_bytes: int = BATCHED_DECODE_MAX_BYTES, ahead: bool = False) -> BatchedDecode:
    """Decode groups of consecutive packed layers in one launch each in ``model``'s forwards (off unless called;
    see the comment above :class:`BatchedDecode`); ``ahead``: each group's decode overlaps the previous group's
    compute on a side stream. Returns the handle; ``.remove()`` turns it off."""
    return BatchedDecode(model, max_bytes, ahead)


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


@torch.library.custom_op("qua2sedimo::packed_linear", mutates_args=())
def packed_linear_op(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor | None, zero: torch.Tensor | None,
                     codebook: torch.Tensor | None, bias: torch.Tensor | None, method: str, bits: int,
                     out_features: int) -> torch.Tensor:
    """[M, out_features] = x [M, K] @ W^T (+ bias) from the packed codes: the fused kernel on CUDA (see
    :func:`packed_linear` for its accuracy), the eager dequantized weight and ``F.linear`` elsewhere."""
    if not x.is_cuda and not _interpret():
        from .packed import dequantize_packed

        params = {"scale": scale, "zero": zero} if method == "mse" else {"codebook": codebook}
        weight = dequantize_packed(method, bits, codes, params, (out_features, x.shape[1]), x.dtype)
        return torch.nn.functional.linear(x, weight, bias)
    return _packed_linear(x, codes, scale, zero, codebook, bias, method, bits, out_features)


@packed_linear_op.register_fake
def _(x, codes, scale, zero, codebook, bias, method, bits, out_features):
    return x.new_empty((x.shape[0], out_features))


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
