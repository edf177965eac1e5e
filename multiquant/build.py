"""The batched multiquantizer build: every quantization option of many layers per quantizer call.

The quantizers (quantizers.py) work row by row: UAQ and K-Means-C treat each output channel on its own,
K-Means-A each tensor. So the rows of all layers with the same row length K are stacked into one
``[rows, K]`` call (per K-Means-A call: the layers of one shape, one row each), and ``segments`` gives every
layer the seeded random draws it would get alone: the codes, tables and errors are those of a layer-by-layer
build, at a few hundred quantizer calls for a whole model instead of a few per layer. Layers are grouped by
row length and cut into chunks of at most ``chunk_elements`` weights (whole layers), which bounds device
memory whatever the model's size. Per chunk and option there is one transfer of packed codes, parameters
and errors to the host; nothing waits on the device per layer.
"""
from __future__ import annotations

from dataclasses import dataclass, field

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
                    show_progress: bool = False, desc: str = "multiquantizer") -> list[LayerOptions]:
    """Every option of every weight (``[C, ...]``, C output channels; any device: each chunk is copied to
    ``device``, default the first weight's, and reshaped to ``[C, K]`` there, so views stay views until then). ``out_dtype``: the precision the model holds a dequantized weight in (errors are of
    that weight)."""
    device = torch.device(device) if device is not None else (weights[0].device if weights else torch.device("cpu"))
    shapes = [(w.shape[0], w.numel() // max(1, w.shape[0])) for w in weights]
    results = [LayerOptions() for _ in weights]
    parsed = [(o, Option.parse(o)) for o in options]
    chunks = plan_chunks(shapes, chunk_elements)
    for chunk in progress(chunks, desc=desc, disable=not show_progress, unit="chunk"):
        _quantize_chunk([weights[i] for i in chunk], [results[i] for i in chunk], parsed, out_dtype, device,
                        seed, iters)
    return results


def _quantize_chunk(weights, results, options, out_dtype, device, seed, iters) -> None:
    channels = [w.shape[0] for w in weights]
    w2d = torch.cat([w.detach().to(device).reshape(w.shape[0], -1) for w in weights]).float()
    runs = _runs(channels)
    k = w2d.shape[1]
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
        diff = w2d.double() - w_hat.to(out_dtype).double()
        row_err = diff.abs().pow_(LP_NORM).sum(dim=1)
        row_sq = diff.square_().sum(dim=1)
        del diff, w_hat
        layer_err = _per_layer(row_err, runs) / k
        layer_sq = _per_layer(row_sq, runs)
        zero = params["zero"].abs().amax().reshape(1) if "zero" in params else torch.zeros(1, device=device)
        packed = _pack(codes, option.bits, channels, k)
        host = {name: _stored({name: v})[name].cpu() for name, v in params.items()}
        figures = torch.cat([layer_err, layer_sq, zero.double()]).tolist()
        if figures[-1] > ZERO_POINT_LIMIT:
            raise AssertionError(f"{name}: UAQ zero-point beyond int16 (quantizers.uaq_params)")
        row, offset = 0, 0
        for j, (res, c) in enumerate(zip(results, channels)):
            nbytes = packed_nbytes(c * k, option.bits)
            res.tensors.setdefault(name, {})["codes"] = packed[j] if isinstance(packed, list) else packed[offset:offset + nbytes]
            for pname, value in host.items():
                res.tensors[name][pname] = value[row:row + c] if rows_of[pname] == "row" else value[j:j + 1]
            res.error[name] = figures[j]
            res.mse[name] = figures[len(results) + j] / (c * k)
            row, offset = row + c, offset + nbytes


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


def _pack(codes: torch.Tensor, bits: int, channels: list[int], k: int):
    """Packed codes of the chunk on the host: one buffer sliced per layer when every layer fills whole 8-code
    groups, else one packed tensor per layer."""
    if all(c * k % 8 == 0 for c in channels):
        return pack_codes(codes, bits).cpu()
    out, row = [], 0
    for c in channels:
        out.append(pack_codes(codes[row:row + c], bits).cpu())
        row += c
    return out
