"""SDXL follows the reference protocol: 32 quantized base steps, then 8 refiner steps kept FP16
(tiny random base and refiner pipelines, no downloads)."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from multiquant.config import uniform_config
from multiquant.evaluate import setup_scorer
from multiquant.families import get_family
from multiquant.metrics.metric import FeatureFID


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """Reference images and one multiquantizer for the module (building it is the slow part)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("sdxl")
    (root / "ref").mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(root / "ref" / f"{i}.png")
    return root


@pytest.fixture()
def reference_dir(shared):
    return shared / "ref"


def _scorer(tmp_path, reference_dir, **kw):
    """The SDXL family scored by FID in a small injected feature space (the sampler's protocol is under test, not
    Inception: its 2048-wide random features cost seconds per Frechet distance on one thread)."""
    torch.manual_seed(0)
    features = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten(), torch.nn.Linear(48, 6))
    family = dataclasses.replace(get_family("sdxl"), metric=FeatureFID(features, reference_images=reference_dir))
    return setup_scorer(family, tiny=True, device="cpu", num_images=2, batch_size=2, bops=False,
                        mq_path=reference_dir.parent / "sdxl_tiny_mq.safetensors", build_mq=True, log=lambda *a: None,
                        **kw)


def _timesteps_of(unet, seen):
    return unet.register_forward_pre_hook(lambda module, args: seen.append(float(args[1].flatten()[0])))


def test_base_runs_32_quantized_steps_and_the_fp_refiner_the_last_8(tmp_path, reference_dir):
    scorer, settings = _scorer(tmp_path, reference_dir)
    sampler = scorer.sampler
    assert settings["sampler"]["refiner"] is True and settings["sampler"]["denoising_split"] == 0.8
    assert sampler.steps == 40
    base_t, refiner_t = [], []
    hooks = [_timesteps_of(sampler.pipe.unet, base_t), _timesteps_of(sampler.refiner.unet, refiner_t)]
    refiner_before = {k: v.clone() for k, v in sampler.refiner.unet.state_dict().items()}
    rec = scorer.record(uniform_config(scorer.mq.layers, "mse-3"), index=0)
    for h in hooks:
        h.remove()
    # the FP reference and the configuration: two renders of one batch each
    assert len(base_t) == 2 * 32 and len(refiner_t) == 2 * 8
    schedule = sampler.pipe.scheduler
    schedule.set_timesteps(40)
    full = [float(t) for t in schedule.timesteps]
    assert base_t[:32] == full[:32] and refiner_t[:8] == full[32:]  # one schedule, split at 80%
    for k, v in sampler.refiner.unet.state_dict().items():  # the refiner is never quantized
        assert torch.equal(v, refiner_before[k]), k
    assert np.isfinite(float(rec["FID-GT-1k"])) and rec["psnr_fp"] < 100


def test_no_refiner_runs_the_base_alone_and_records_it(tmp_path, reference_dir):
    with_refiner, _ = _scorer(tmp_path, reference_dir)
    alone, settings = _scorer(tmp_path, reference_dir, refiner=False)
    assert settings["sampler"]["refiner"] is False and alone.sampler.refiner is None
    seen = []
    hook = _timesteps_of(alone.sampler.pipe.unet, seen)
    images = alone.sampler.generate([0, 1])
    hook.remove()
    assert len(seen) == 40
    assert not torch.equal(images, with_refiner.sampler.generate([0, 1]))


def test_refiner_flags_parse_and_families_without_a_refiner_refuse_one(tmp_path, reference_dir):
    from multiquant.errors import UserError
    from qua2sedimo.cli import build_parser

    args = build_parser().parse_args(["eval-random", "--model", "sdxl", "--tiny", "--outdir", "x", "--no_refiner"])
    from multiquant.commands import refiner_arg

    assert refiner_arg(args) is False
    args = build_parser().parse_args(["infer", "--model", "sdxl", "--refiner", "some/dir"])
    assert refiner_arg(args) == "some/dir"
    with pytest.raises(UserError, match="no refiner"):
        setup_scorer(get_family("dit"), tiny=True, device="cpu", num_images=2, refiner="some/dir",
                     random_features=True, reference_dir=reference_dir, bops=False,
                     mq_path=tmp_path / "dit_tiny_mq.safetensors", build_mq=True, log=lambda *a: None)
