"""The batched multiquantizer build: every quantization option of many layers per quantizer call.

The quantizers (quantizers.py) work row by row: UAQ and K-Means-C treat each output channel on its own,
K-Means-A each tensor. So the rows of all layers with the same row length K are stacked into one
``[rows, K]`` call (per K-Means-A call: the layers of one shape, one row each), and ``segments`` gives every
layer the seeded random draws it would get alone: the codes, tables and errors are those of a layer-by-layer
build, at a few hundred quantizer calls for a whole model instead of a few per layer. Layers are grouped by
row length and cut into chunks of at most ``chunk_elements`` weights (whole layers), which bounds device
memory whatever the model's size. Per chunk and option there is one transfer of packed codes, parameters
and errors to the host, all through :class:`HostCopies`; nothing waits on the device per layer, and from a
CUDA device nothing waits for a transfer until the build's end.
"""
from __future__ import annotations

import queue
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import numpy as np
import torch

from .options import Option
from .packing import pack_codes, packed_nbytes
from .quantizers import LP_NORM, ZERO_POINT_LIMIT, dequantize, quantize
from .utils import progress

DEFAULT_CHUNK_ELEMENTS = 1 << 27  # weights per chunk; K-Means-C seeding holds roughly 100 bytes of temporaries per weight
STORED_DTYPES = {"zero": torch.int16}  # every other parameter is stored as float32


@dataclass
class LayerOptions:
    """One layer's build result: per option the stored host tensors (packed codes and parameters), the Lp
    error (sum(|w - w_hat|^2.4) / K, float64) and the mean squared error, of the weight as stored."""

    tensors: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    error: dict[str, float] = field(default_factory=dict)
    mse: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class _Run:
    """Consecutive layers of one chunk with the same shape: ``count`` layers of ``channels`` rows from ``row``."""

    row: int
    count: int
    channels: int


def plan_chunks(shapes: list[tuple[int, int]], chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> list[list[int]]:
    """Indices of ``shapes`` ([C, K] per layer) grouped by row length K, layers of equal C next to each other,
    cut into chunks of at most ``chunk_elements`` weights (a larger layer is a chunk of its own)."""
    by_row: dict[int, list[int]] = {}
    for i, (_, k) in enumerate(shapes):
        by_row.setdefault(k, []).append(i)
    chunks = []
    for k in sorted(by_row):
        chunk, size = [], 0
        for i in sorted(by_row[k], key=lambda j: (shapes[j][0], j)):
            n = shapes[i][0] * k
            if chunk and size + n > chunk_elements:
                chunks.append(chunk)
                chunk, size = [], 0
            chunk.append(i)
            size += n
        chunks.append(chunk)
    return chunks


def _runs(channels: list[int]) -> list[_Run]:
    runs, row = [], 0
    for c in channels:
        if runs and runs[-1].channels == c:
            runs[-1] = _Run(runs[-1].row, runs[-1].count + 1, c)
        else:
            runs.append(_Run(row, 1, c))
        row += c
    return runs


def quantize_layers(weights: list[torch.Tensor], options: list[str], out_dtype: torch.dtype, device=None,
                    seed: int = 0, iters: int = 100, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
                    show_progress: bool = False, desc: str = "multiquantizer",
                    host: "HostCopies | None" = None) -> list[LayerOptions]:
    """Every option of every weight (``[C, ...]``, C output channels; any device: each chunk is copied to
    ``device``, default the first weight's, and reshaped to ``[C, K]`` there, so views stay views until then). ``out_dtype``: the precision the model holds a dequantized weight in (errors are of
    that weight). ``host``: how results reach the host (default ``HostCopies(device)``: staged through
    page-locked memory from a CUDA device, ``.cpu()`` elsewhere); it is finished here."""
    device = torch.device(device) if device is not None else (weights[0].device if weights else torch.device("cpu"))
    host = HostCopies(device) if host is None else host
    shapes = [(w.shape[0], w.numel() // max(1, w.shape[0])) for w in weights]
    results = [LayerOptions() for _ in weights]
    parsed = [(o, Option.parse(o)) for o in options]
    chunks = plan_chunks(shapes, chunk_elements)
    figures = []
    try:
        for chunk in progress(chunks, desc=desc, disable=not show_progress, unit="chunk"):
            figures += _quantize_chunk([weights[i] for i in chunk], [results[i] for i in chunk], parsed, out_dtype,
                                       device, seed, iters, host)
    finally:
        host.finish()  # every copy has landed: only now are the results read
    for fig in figures:
        fig.record()
    return results


@dataclass
class _Figures:
    """One chunk's errors under one option, on the host once :meth:`HostCopies.finish` returned: the Lp error
    per layer, the squared error per layer, then the largest |UAQ zero-point| (0 for the K-Means methods)."""

    option: str
    results: list[LayerOptions]
    channels: list[int]
    k: int
    values: torch.Tensor

    def record(self) -> None:
        values, n = self.values.tolist(), len(self.results)
        if values[-1] > ZERO_POINT_LIMIT:
            raise AssertionError(f"{self.option}: UAQ zero-point beyond int16 (quantizers.uaq_params)")
        for j, (res, c) in enumerate(zip(self.results, self.channels)):
            res.error[self.option] = values[j]
            res.mse[self.option] = values[n + j] / (c * self.k)


def _quantize_chunk(weights, results, options, out_dtype, device, seed, iters, host) -> list[_Figures]:
    channels = [w.shape[0] for w in weights]
    w2d = torch.cat([w.detach().to(device).reshape(w.shape[0], -1) for w in weights]).float()
    runs = _runs(channels)
    k = w2d.shape[1]
    figures = []
    for name, option in options:
        spec = option.spec
        if spec.per_channel or not spec.codebook:
            codes, params = quantize(w2d, option.method, option.bits, iters=iters, seed=seed, segments=channels)
            w_hat = dequantize(option.method, codes, _stored(params))
            rows_of = {name: "row" for name in params}
        else:  # K-Means-A: one codebook per layer, layers of one shape in one call
            parts = [quantize(w2d[r.row:r.row + r.count * r.channels], option.method, option.bits, iters=iters,
                              seed=seed, segments=[r.channels] * r.count) for r in runs]
            codes = torch.cat([c for c, _ in parts])
            params = {"codebook": torch.cat([p["codebook"] for _, p in parts])}  # [layers, 2^b]
            book = _stored(params)["codebook"]
            w_hat = torch.cat([book[i:i + r.count].gather(1, c.view(r.count, -1).long()).view(-1, k)
                               for i, r, (c, _) in zip(_layer_starts(runs), runs, parts)])
            rows_of = {"codebook": "layer"}
        # float64 difference; the weight as the model holds it is widened inside the subtraction (exact)
        diff = w2d.double().sub_(w_hat.to(out_dtype))
        row_err = diff.abs().pow_(LP_NORM).sum(dim=1)
        row_sq = diff.square_().sum(dim=1)
        del diff, w_hat
        layer_err = _per_layer(row_err, runs) / k
        layer_sq = _per_layer(row_sq, runs)
        zero = params["zero"].abs().amax().reshape(1) if "zero" in params else torch.zeros(1, device=device)
        packed = _pack(codes, option.bits, channels, k, host)
        stored = {pname: host.take(v) for pname, v in _stored(params).items()}
        figures.append(_Figures(name, results, channels, k, host.take(torch.cat([layer_err, layer_sq, zero.double()]))))
        row, offset = 0, 0
        for j, (res, c) in enumerate(zip(results, channels)):
            nbytes = packed_nbytes(c * k, option.bits)
            res.tensors.setdefault(name, {})["codes"] = packed[j] if isinstance(packed, list) else packed[offset:offset + nbytes]
            for pname, value in stored.items():
                res.tensors[name][pname] = value[row:row + c] if rows_of[pname] == "row" else value[j:j + 1]
            row, offset = row + c, offset + nbytes
    return figures


def _layer_starts(runs: list[_Run]) -> list[int]:
    starts, n = [], 0
    for r in runs:
        starts.append(n)
        n += r.count
    return starts


def _stored(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Parameters in the dtype the checkpoint stores them in (errors are of what is stored)."""
    return {name: v.to(STORED_DTYPES.get(name, torch.float32)) for name, v in params.items()}


def _per_layer(row_values: torch.Tensor, runs: list[_Run]) -> torch.Tensor:
    """Sum of per-row values over each layer's rows (one reduction per run of equal shapes)."""
    return torch.cat([row_values[r.row:r.row + r.count * r.channels].view(r.count, r.channels).sum(dim=1)
                      for r in runs])


def _pack(codes: torch.Tensor, bits: int, channels: list[int], k: int, host: "HostCopies"):
    """Packed codes of the chunk on the host: one buffer sliced per layer when every layer fills whole 8-code
    groups, else one packed tensor per layer."""
    if all(c * k % 8 == 0 for c in channels):
        return host.take(pack_codes(codes, bits))
    out, row = [], 0
    for c in channels:
        out.append(host.take(pack_codes(codes[row:row + c], bits)))
        row += c
    return out


# ------------------------------------------------------------------------------------------ host transfers
STAGING_SLOT_BYTES = 1 << 24  # 16 MiB per page-locked staging slot
STAGING_SLOTS = 4  # 64 MiB page-locked in all per build (torch's host allocator keeps it for the next build)


class HostCopies:
    """The build's one way to the host. ``take(t)`` returns a host tensor that holds ``t``'s values once
    :meth:`finish` has returned (and not necessarily before).

    Staged (the default from a CUDA device): every copy goes in pieces through a few page-locked staging slots.
    The device-to-host copy of a piece is queued on the device's current stream without blocking: into
    page-locked memory it is plain DMA at the link's rate, where into fresh pageable memory the driver copies
    through a buffer of its own while the host and the stream wait, at the speed of first-touch page faults
    (benchmarks/results/multiquantizer.json's profile: 467 such copies, 1.21 s, for 1.65 GB of results and
    the weight hash's 1.22 GB, about 2.4 GB/s). A worker thread waits for the piece's event and moves
    it into the tensor returned (ordinary memory; its page faults are the worker's), while the host goes on
    queuing device work; a slot is reused once the worker has emptied it, so the host only ever waits for a
    free slot. Not one page-locked destination for all results: page-locking GBs (cudaHostAlloc) is itself
    about as slow as those page faults, and the checkpoint's tensors would hold page-locked memory for life.

    Direct (CPU builds, or ``staged=False``): ``t.cpu()`` as it comes, today's path. ``staged=True`` on the CPU
    runs the staging machinery with ordinary memory and synchronous copies (tests exercise it that way)."""

    def __init__(self, device, staged: bool | None = None, slot_bytes: int = STAGING_SLOT_BYTES,
                 slots: int = STAGING_SLOTS):
        device = torch.device(device)
        on_cuda = device.type == "cuda" and torch.cuda.is_available()
        self.staged = on_cuda if staged is None else bool(staged)
        self.pinned = self.staged and on_cuda
        self._slot_bytes, self._jobs, self._closed = slot_bytes, [], False
        if self.staged:
            self._slots = torch.empty(slots, slot_bytes, dtype=torch.uint8, pin_memory=self.pinned)
            self._free: queue.SimpleQueue[int] = queue.SimpleQueue()
            for i in range(slots):
                self._free.put(i)
            self._worker = ThreadPoolExecutor(1, thread_name_prefix="host-copies")

    def take(self, t: torch.Tensor) -> torch.Tensor:
        if not self.staged:
            return t.cpu()
        if self._closed:
            raise RuntimeError("HostCopies.take after finish")
        t = t.detach().contiguous()
        out = torch.empty(t.shape, dtype=t.dtype)
        src, dst = t.reshape(-1).view(torch.uint8), out.reshape(-1).view(torch.uint8)
        stream = torch.cuda.current_stream(t.device) if t.device.type == "cuda" else None
        for start in range(0, src.numel(), self._slot_bytes):
            stop = min(src.numel(), start + self._slot_bytes)
            slot = self._free.get()  # waits only while the worker has every slot
            stage = self._slots[slot, :stop - start]
            stage.copy_(src[start:stop], non_blocking=stream is not None)
            landed = None
            if stream is not None:
                landed = torch.cuda.Event()
                landed.record(stream)
            self._jobs.append(self._worker.submit(self._unstage, landed, stage, dst[start:stop], slot))
        return out

    def _unstage(self, landed: "torch.cuda.Event | None", stage: torch.Tensor, dst: torch.Tensor, slot: int) -> None:
        try:
            if landed is not None:
                landed.synchronize()
            dst.copy_(stage)
        finally:
            self._free.put(slot)

    def finish(self) -> None:
        """Wait until every copy has landed (re-raising a failed one); ``take`` is refused afterwards."""
        if self.staged and not self._closed:
            self._closed = True
            self._worker.shutdown(wait=True)
            jobs, self._jobs = self._jobs, []
            for job in jobs:
                job.result()


def host_bytes(tensors: Iterable[torch.Tensor], dtype: torch.dtype,
               piece_bytes: int = STAGING_SLOT_BYTES) -> Iterator[tuple[int, np.ndarray]]:
    """``(i, piece)``: the bytes of every tensor converted to ``dtype`` (C order), in order, in pieces of at most
    ``piece_bytes`` (an empty tensor gives one empty piece), ``i`` the tensor's index; a piece is valid until
    the next one is asked for. From a CUDA device the pieces come through two page-locked slots on a side
    stream: the copy of the next piece overlaps the reading of this one, and the copies neither wait for work
    queued later on the current stream nor hold it up. Elsewhere from ``t.to("cpu", dtype)``. For reading
    weights on the host (hashing) beside a running build."""
    stream = slots = None
    pending = None  # (index, event, staged piece): copied but not yet handed out
    turn = 0
    for i, t in enumerate(tensors):
        if t.device.type != "cuda":
            if pending is not None:
                pending[1].synchronize()
                yield pending[0], pending[2].numpy()
                pending = None
            flat = t.detach().to("cpu", dtype).contiguous().reshape(-1).view(torch.uint8)
            for start in range(0, max(1, flat.numel()), piece_bytes):
                yield i, flat[start:start + piece_bytes].numpy()
            continue
        if stream is None:
            stream = torch.cuda.Stream(t.device)
            stream.wait_stream(torch.cuda.current_stream(t.device))  # the weights as they stand now
            slots = torch.empty(2, piece_bytes, dtype=torch.uint8, pin_memory=True)
        with torch.cuda.stream(stream):
            flat = t.detach().to(dtype).contiguous().reshape(-1).view(torch.uint8)
        for start in range(0, max(1, flat.numel()), piece_bytes):
            piece = flat[start:start + piece_bytes]
            stage = slots[turn % 2, :piece.numel()]  # this slot's last piece was handed out and read
            turn += 1
            with torch.cuda.stream(stream):
                stage.copy_(piece, non_blocking=True)
                copied = torch.cuda.Event()
                copied.record(stream)
            if pending is not None:
                pending[1].synchronize()
                yield pending[0], pending[2].numpy()
            pending = (i, copied, stage)
    if pending is not None:
        pending[1].synchronize()
        yield pending[0], pending[2].numpy()
