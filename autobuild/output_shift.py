"""Signed output shift of every (layer, option): how far the denoiser's mean output moves with that layer alone
quantized, per output channel.

Why: a uniform grid's rounding does not keep a weight row's sum (K-Means keeps it: its centroids are cluster
means), so a layer's error can have a mean that moves the noise prediction by a near-constant amount; the sampler
integrates it over every step, and the shifts of different layers add and cancel. That is an interaction no
additive model of log FID can express: on mnist_unet, UAQ-4 on ``conv_out`` is much worse than UAQ-3 unless
``up_blocks.2.skip`` is also UAQ-4. Summed over a configuration's layers, these shifts are tabular features for
the predictor's baselines (``TrainOptions.output_shifts``; figures in benchmarks/results/predictor_<model>.json).

    table = output_shifts(model, mq, family)            # {layer key: {option: [shift per output channel]}}
    features = shift_features(records, table)           # [records, 1 + C]: |sum of shifts|, summed shift per channel

A scalar per channel is a coarse summary: the damage depends on where (which pixels) and when (which timesteps)
the mean output moves. With ``buckets`` and ``grid`` the table keeps that: per group of example inputs (the
family's examples in order, e.g. timesteps from 0 to T-1) the mean change per channel, average-pooled to a grid over
the trailing (spatial or token) dimensions. :func:`shift_basis` projects such a table onto its leading singular
vectors, and :func:`quadratic_shift_features` makes a quadratic form of the configuration's summed projection
available to linear models (the predictor's prior, ``autobuild.train.fit_prior``; the optimiser's surrogate): a
second-order expansion of log FID in the summed signed output change, whose cross terms are the interactions.

    signature = output_shifts(model, mq, family, **SIGNATURE)    # [buckets, channels, grid, grid] per entry
    basis = shift_basis(signature, components=24)                 # {"key=option": [24 coordinates]} + a scale
    x = quadratic_shift_features(records, basis)                  # [records, 24 + 24 * 25 / 2]
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from .data import config_of, option_name

__all__ = ["output_shifts", "family_shift_tables", "shift_features", "SIGNATURE", "ShiftBasis", "shift_basis",
           "quadratic_shift_features", "summed_shift_coords"]

# The signature the predictor's shift prior is measured with (benchmarks/predictor.py, train-predictor and optimize
# --output_shifts): 16 example inputs in 4 groups, each channel pooled to 14 x 14 (chosen on mnist_unet's quality
# target, on the predictor benchmark's folds, over 7 x 7, the full map, one group and the per-channel mean).
SIGNATURE = {"batch": 16, "buckets": 4, "grid": 14}


@torch.no_grad()
def output_shifts(model: nn.Module, mq, family, batch: int = 16, seed: int = 0,
                  log: Callable[[str], None] | None = None, buckets: int = 1,
                  grid: int | None = None) -> dict[str, dict[str, list[float]]]:
    """One forward per (layer, option) on the family's example inputs (seeded); the model's weights are left as
    they were. Shift = mean over every dimension but the channel (dim 1) of ``output(quantized) - output(FP)``.

    ``buckets`` > 1: the examples in that many contiguous groups (their order), one mean per group; ``grid``: the
    trailing dimensions average-pooled to ``grid`` per dimension instead of averaged away. An entry is then
    ``[buckets, channels, grid, ...]`` flattened (row-major); the defaults give one value per channel."""
    if buckets < 1 or buckets > batch:
        raise ValueError(f"buckets must be in [1, batch={batch}], got {buckets}")
    from multiquant.adapters import example_inputs
    from multiquant.config import ConfigApplier
    from multiquant.export import denoiser_output
    from multiquant.options import FP_OPTION

    applier = ConfigApplier(model, mq)
    inputs = example_inputs(family, model, batch=batch, seed=seed)
    base = denoiser_output(model, inputs).double()
    groups = [torch.as_tensor(g) for g in np.array_split(np.arange(base.shape[0]), buckets)]
    fp = {ref.key: FP_OPTION for ref in applier.layers}
    table: dict[str, dict[str, list[float]]] = {}
    try:
        for i, ref in enumerate(r for r in applier.layers if not r.tied_to):
            tied = [r.key for r in applier.layers if r.tied_to == ref.key]
            table[ref.key] = {}
            for option in mq.options:
                applier.apply({**fp, **{k: option for k in (ref.key, *tied)}})
                shift = _signature(denoiser_output(model, inputs).double() - base, groups, grid)
                table[ref.key][option] = [float(v) for v in shift]
            for k in tied:
                table[k] = {o: [0.0] * len(shift) for o in mq.options}  # counted once, at the layer it follows
            if log and (i + 1) % 20 == 0:
                log(f"  output shifts: {i + 1} layers")
    finally:
        applier.restore()
    return table


def family_shift_tables(family, pretrained: str | None = None, mq_path=None, tiny: bool = False, seed: int = 0,
                        per_channel: bool = True,
                        log: Callable[[str], None] | None = None) -> tuple[dict | None, dict, dict]:
    """(per-channel shift table or None without ``per_channel``, :data:`SIGNATURE` table, how they were measured)
    of the family's trained denoiser (or the tiny random one) and its multiquantizer (``mq_path``, default the
    family's), fp32 on the CPU: what ``train-predictor --output_shifts`` and benchmarks/predictor.py measure
    before training (one forward of 16 inputs per table, layer and option)."""
    from multiquant.evaluate import default_multiquantizer_path, load_for_scoring, load_or_build_multiquantizer

    started = time.perf_counter()
    model = (load_for_scoring(family, tiny=True, device="cpu").denoiser.float() if tiny else
             family.load(pretrained, dtype=torch.float32, device="cpu")).eval()
    mq = load_or_build_multiquantizer(family, model, mq_path, tiny=tiny)
    loaded = time.perf_counter()
    shifts, signature, seconds = shift_tables(model, mq, family, seed=seed, per_channel=per_channel, log=log)
    path = mq_path or default_multiquantizer_path(family, tiny)
    return shifts, signature, {"multiquantizer": str(path), "multiquantizer_content_hash": mq.content_hash,
                               "dtype": "float32", "device": "cpu", "seed": seed, "tiny": tiny,
                               "inputs": f"the family's example inputs, batch {SIGNATURE['batch']}, seed {seed}",
                               "signature": SIGNATURE, "load_seconds": loaded - started, **seconds}


def shift_tables(model: nn.Module, mq, family, seed: int = 0, per_channel: bool = True,
                 log: Callable[[str], None] | None = None) -> tuple[dict | None, dict, dict]:
    """(per-channel shift table or None without ``per_channel``, :data:`SIGNATURE` table, their ``seconds`` and
    ``signature_seconds``) of ``model`` under ``mq``'s options: what the optimiser's shift features, its
    ridge_shift surrogate and the predictor's ridge_shift prior read."""
    started = time.perf_counter()
    shifts = output_shifts(model, mq, family, batch=SIGNATURE["batch"], seed=seed, log=log) if per_channel else None
    measured = time.perf_counter()
    signature = output_shifts(model, mq, family, seed=seed, log=log, **SIGNATURE)
    return shifts, signature, {"seconds": measured - started, "signature_seconds": time.perf_counter() - measured}


def _signature(change: torch.Tensor, groups: Sequence[torch.Tensor], grid: int | None) -> torch.Tensor:
    """``[batch, C, *rest]`` output change -> flat ``[groups, C, *pooled rest]`` group means."""
    means = torch.stack([change[g].mean(dim=0) for g in groups])  # [G, C, *rest]
    rest = means.shape[2:]
    if grid is None or not rest:
        return means.reshape(len(groups), means.shape[1], -1).mean(dim=-1).reshape(-1)
    pool = {1: nn.functional.adaptive_avg_pool1d, 2: nn.functional.adaptive_avg_pool2d,
            3: nn.functional.adaptive_avg_pool3d}.get(len(rest))
    if pool is None:  # more trailing dims than a pooling op has: flatten them into one
        means, pool = means.reshape(*means.shape[:2], -1), nn.functional.adaptive_avg_pool1d
    return pool(means, tuple(min(grid, n) for n in means.shape[2:])).reshape(-1)  # never finer than the output


def shift_features(records: Sequence[Mapping], table: Mapping[str, Mapping[str, Sequence[float]]]) -> np.ndarray:
    """``[records, 1 + C]``: the L2 norm of the configuration's summed shift, then the summed shift per channel
    (a layer at FP, or absent from the table, adds nothing)."""
    width = len(next(iter(next(iter(table.values())).values())))
    rows = []
    for r in records:
        total = np.zeros(width)
        for key, entry in config_of(r).items():
            shift = table.get(key, {}).get(option_name(entry))
            if shift is not None:
                total += np.asarray(shift, dtype=np.float64)
        rows.append(np.concatenate([[np.linalg.norm(total)], total]))
    return np.array(rows)


@dataclass
class ShiftBasis:
    """Each (layer, option)'s output change projected on the table's leading right singular vectors (uncentred:
    zero change is the FP layer), in units of ``scale`` (the root mean square of those coordinates over the
    table's entries, so that quadratic terms are of order one for a handful of layers). JSON-ready."""

    coords: dict[str, list[float]]  # "key=option" -> [components]
    scale: float

    @property
    def components(self) -> int:
        return len(next(iter(self.coords.values()))) if self.coords else 0

    def to_json(self) -> dict:
        return {"coords": self.coords, "scale": self.scale}

    @classmethod
    def from_json(cls, obj: Mapping) -> "ShiftBasis":
        return cls({str(k): [float(v) for v in c] for k, c in obj["coords"].items()}, float(obj["scale"]))


def shift_basis(table: Mapping[str, Mapping[str, Sequence[float]]], components: int = 24) -> ShiftBasis:
    """:class:`ShiftBasis` of a shift table (any entry width): ``components`` at most the table's rank."""
    names = [f"{key}={option}" for key, entry in table.items() for option in entry]
    rows = np.array([np.asarray(entry[o], dtype=np.float64) for entry in table.values() for o in entry])
    if rows.ndim != 2 or not len(rows):
        raise ValueError("the shift table is empty or its entries differ in length")
    _, singular, vt = np.linalg.svd(rows, full_matrices=False)
    k = int(min(components, int((singular > singular[0] * 1e-9).sum()) if singular[0] > 0 else 0))
    if k == 0:
        raise ValueError("every output change in the shift table is zero: nothing to project")
    coords = rows @ vt[:k].T
    scale = float(np.sqrt((coords ** 2).sum(axis=1).mean()))
    return ShiftBasis({n: [float(v) for v in c / scale] for n, c in zip(names, coords)}, scale)


def summed_shift_coords(records: Sequence[Mapping], basis: ShiftBasis) -> np.ndarray:
    """``[records, k]``: the configuration's summed coordinates (a layer at FP, or absent from the basis, adds
    nothing)."""
    z = np.zeros((len(records), basis.components))
    for i, r in enumerate(records):
        for key, entry in config_of(r).items():
            c = basis.coords.get(f"{key}={option_name(entry)}")
            if c is not None:
                z[i] += c
    return z


def quadratic_shift_features(records: Sequence[Mapping], basis: ShiftBasis) -> np.ndarray:
    """``[records, k + k(k+1)/2]``: the configuration's summed coordinates ``z`` (a layer at FP, or absent from
    the basis, adds nothing), then the products ``z_i z_j`` for ``i <= j`` (row-major upper triangle)."""
    k = basis.components
    z = summed_shift_coords(records, basis)
    upper = np.triu_indices(k)
    return np.hstack([z, (z[:, :, None] * z[:, None, :])[:, upper[0], upper[1]]])
