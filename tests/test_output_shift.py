"""Output shifts (autobuild.output_shift): the per-(layer, option) signed mean output change, and its sum over a
configuration's layers as tabular features."""
from __future__ import annotations

import json
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


def test_signature_keeps_groups_of_inputs_and_a_pooled_grid_by_hand():
    """buckets=2, grid=2: per entry [group, channel, 2, 2] = the mean change of each half of the examples,
    averaged over 2 x 2 blocks of pixels (a float64 recomputation); the per-channel mean is its average."""
    from multiquant.adapters import example_inputs
    from multiquant.checkpoint import MultiQuantizer
    from multiquant.config import ConfigApplier
    from multiquant.export import denoiser_output
    from multiquant.families import get_family
    from multiquant.options import FP_OPTION

    family = get_family("mnist_unet")
    model = family.build("tiny", device="cpu", dtype=torch.float64, seed=5).eval()
    for p in model.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    mq = MultiQuantizer.build(model, family, methods=("mse",), bits=(3,), kmeans_iters=2, show_progress=False)
    signature = output_shifts(model, mq, family, batch=4, seed=2, buckets=2, grid=2)
    per_channel = output_shifts(model, mq, family, batch=4, seed=2)
    key = mq.layers[-1].key
    inputs = example_inputs(family, model, batch=4, seed=2)
    base = denoiser_output(model, inputs)
    applier = ConfigApplier(model, mq)
    applier.apply({**{ref.key: FP_OPTION for ref in mq.layers}, key: "mse-3"})
    change = (denoiser_output(model, inputs) - base).detach()
    applier.restore()
    b, c, h, w = change.shape
    assert h % 2 == 0 and w % 2 == 0
    blocks = torch.stack([change[:2].mean(0), change[2:].mean(0)]).reshape(2, c, 2, h // 2, 2, w // 2).mean(dim=(3, 5))
    assert len(signature[key]["mse-3"]) == 2 * c * 4
    np.testing.assert_allclose(signature[key]["mse-3"], blocks.reshape(-1).numpy(), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(np.asarray(signature[key]["mse-3"]).reshape(2, c, 4).mean(axis=(0, 2)),
                               per_channel[key]["mse-3"], rtol=1e-9, atol=1e-12)
    assert np.abs(blocks.numpy()).max() > 1e-9
    with pytest.raises(ValueError, match="buckets"):
        output_shifts(model, mq, family, batch=4, buckets=5)


def test_quadratic_shift_features_by_hand():
    """Rows (3, 0) and (0, 4) are already orthogonal: the basis is the two axes (up to sign), scale = the RMS of
    the entries' norms = sqrt((9 + 16 + 0 + 0) / 4) = 2.5; a configuration's features are its summed coordinates
    z and z_i z_j (i <= j)."""
    from autobuild.output_shift import ShiftBasis, quadratic_shift_features, shift_basis

    table = {"a": {"mse-3": [3.0, 0.0], "mse-4": [0.0, 0.0]}, "b": {"mse-3": [0.0, 4.0], "mse-4": [0.0, 0.0]}}
    basis = shift_basis(table, components=5)
    assert basis.components == 2 and basis.scale == pytest.approx(2.5)
    assert ShiftBasis.from_json(json.loads(json.dumps(basis.to_json()))) == basis
    records = [{"config": {"a": ["mse-3", 9, 3, 0.1], "b": ["mse-3", 9, 3, 0.1]}},
               {"config": {"a": "mse-3", "b": "fp16"}},                 # FP: no entry, adds nothing
               {"config": {"a": "mse-4", "b": "mse-4"}}]
    x = quadratic_shift_features(records, basis)
    assert x.shape == (3, 2 + 3)
    z = x[:, :2]
    # first component = the larger singular direction (b's axis, 4 / 2.5), then a's (3 / 2.5), signs free
    np.testing.assert_allclose(np.abs(z), [[1.6, 1.2], [0.0, 1.2], [0.0, 0.0]], atol=1e-12)
    np.testing.assert_allclose(x[:, 2:], np.stack([z[:, 0] ** 2, z[:, 0] * z[:, 1], z[:, 1] ** 2], axis=1), atol=1e-12)
    np.testing.assert_allclose(x[:, 2] + x[:, 4], [(9 + 16) / 6.25, 9 / 6.25, 0.0], atol=1e-12)  # |sum|^2 / scale^2
    with pytest.raises(ValueError, match="zero"):
        shift_basis({"a": {"mse-3": [0.0, 0.0]}})
