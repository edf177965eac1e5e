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
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from .data import config_of, option_name

__all__ = ["output_shifts", "shift_features"]


@torch.no_grad()
def output_shifts(model: nn.Module, mq, family, batch: int = 16, seed: int = 0,
                  log: Callable[[str], None] | None = None) -> dict[str, dict[str, list[float]]]:
    """One forward per (layer, option) on the family's example inputs (seeded); the model's weights are left as
    they were. Shift = mean over every dimension but the channel (dim 1) of ``output(quantized) - output(FP)``."""
    from multiquant.adapters import example_inputs
    from multiquant.config import ConfigApplier
    from multiquant.export import denoiser_output
    from multiquant.options import FP_OPTION

    applier = ConfigApplier(model, mq)
    inputs = example_inputs(family, model, batch=batch, seed=seed)
    base = denoiser_output(model, inputs).double()
    dims = [d for d in range(base.ndim) if d != 1]
    fp = {ref.key: FP_OPTION for ref in applier.layers}
    table: dict[str, dict[str, list[float]]] = {}
    try:
        for i, ref in enumerate(r for r in applier.layers if not r.tied_to):
            tied = [r.key for r in applier.layers if r.tied_to == ref.key]
            table[ref.key] = {}
            for option in mq.options:
                applier.apply({**fp, **{k: option for k in (ref.key, *tied)}})
                shift = (denoiser_output(model, inputs).double() - base).mean(dim=dims)
                table[ref.key][option] = [float(v) for v in shift]
            for k in tied:
                table[k] = {o: [0.0] * base.shape[1] for o in mq.options}  # counted once, at the layer it follows
            if log and (i + 1) % 20 == 0:
                log(f"  output shifts: {i + 1} layers")
    finally:
        applier.restore()
    return table


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
