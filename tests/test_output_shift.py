"""Output shifts (autobuild.output_shift): the per-(layer, option) signed mean output change, and its sum over a
configuration's layers as tabular features."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from autobuild.output_shift import output_shifts, shift_features


def test_shift_features_sum_each_configurations_layers_by_hand():
    table = {"a": {"mse-4": [0.3, -0.1], "kmeans-4": [0.05, 0.0]}, "b": {"mse-4": [-0.5, 0.2], "kmeans-4": [0.1, 0.1]}}
    records = [{"config": {"a": ["mse-4", 9, 36, 0.1], "b": ["mse-4", 9, 36, 0.2]}},   # shifts cancel in part
               {"config": {"a": ["kmeans-4", 9, 40, 0.1], "b": ["fp16", 9, 144, 0.0]}},  # FP: no table entry
               {"config": {"a": "mse-4", "b": "kmeans-4"}}]                               # plain option names
    features = shift_features(records, table)
    assert features.shape == (3, 3)
    np.testing.assert_allclose(features[:, 1:], [[-0.2, 0.1], [0.05, 0.0], [0.4, 0.0]], atol=1e-12)
    np.testing.assert_allclose(features[:, 0], [math.hypot(-0.2, 0.1), 0.05, 0.4], atol=1e-12)


def test_output_shifts_match_a_float64_recomputation_and_leave_the_weights_as_they_were():
    from multiquant.adapters import example_inputs
    from multiquant.checkpoint import MultiQuantizer
    from multiquant.config import ConfigApplier
    from multiquant.export import denoiser_output
    from multiquant.families import get_family
    from multiquant.options import FP_OPTION

    family = get_family("mnist_unet")
    model = family.build("tiny", device="cpu", dtype=torch.float64, seed=3).eval()
    for p in model.parameters():  # fresh random weights with a nonzero mean per row, so that UAQ rounding shifts
        p.data.add_(0.05 * torch.randn_like(p))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    mq = MultiQuantizer.build(model, family, methods=("mse", "kmeans"), bits=(3, 4), kmeans_iters=5,
                              show_progress=False)
    table = output_shifts(model, mq, family, batch=4, seed=1)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert set(table) == {ref.key for ref in mq.layers}
    key = mq.layers[len(mq.layers) // 2].key
    inputs = example_inputs(family, model, batch=4, seed=1)
    base = denoiser_output(model, inputs)
    applier = ConfigApplier(model, mq)
    applier.apply({**{ref.key: FP_OPTION for ref in mq.layers}, key: "mse-3"})
    expected = (denoiser_output(model, inputs) - base).mean(dim=(0, 2, 3)).detach()
    applier.restore()
    assert len(table[key]["mse-3"]) == base.shape[1]
    np.testing.assert_allclose(table[key]["mse-3"], expected.numpy(), rtol=1e-9, atol=1e-12)
    assert any(abs(v) > 1e-9 for entry in table.values() for v in entry["mse-3"])  # not a table of zeros
