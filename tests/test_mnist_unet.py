"""The second embedded testbed: the plain-module U-Net DDPM, its sampler, its training and its shipped assets."""
from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch

from multiquant.families import get_family
from multiquant.mnist.classifier import classifier_outputs, load_classifier
from multiquant.mnist.unet import (NOISE_SCHEDULE, DDPMSampler, MNISTUNet, example_inputs, strided_timesteps)

from mnist_data import needs_mnist  # tests/mnist_data.py


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def spec():
    return get_family("mnist_unet")


@pytest.fixture(scope="module")
def tiny(spec):
    """Tiny U-Net with *random* output weights (the trained init zeroes conv_out, which would make eps = 0)."""
    model = spec.build("tiny", seed=3)
    torch.nn.init.normal_(model.conv_out.weight, std=0.3)
    torch.nn.init.normal_(model.conv_out.bias, std=0.1)
    return model.eval()


def test_forward_shapes_and_sizes(spec, tiny):
    for batch in (1, 3):
        kwargs = example_inputs(tiny, batch)
        out = tiny(**kwargs)
        assert out.shape == (batch, 1, 28, 28) and out.dtype == torch.float32 and out.abs().sum() > 0
    full = spec.build("full")
    assert 500_000 <= sum(p.numel() for p in full.parameters()) <= 1_000_000
    names = [n for n, _ in full.named_modules()]
    # the parts the DAG and insights look for: time/label projections in every ResBlock, concat skips up the path
    assert "down_blocks.0.time_proj" in names and "up_blocks.0.label_proj" in names and "time_embed.0" in names
    assert full.up_blocks[0].conv1.in_channels == 2 * full.mid_block.conv2.out_channels


def test_timesteps_are_strided_and_end_at_T_minus_1():
    assert strided_timesteps(5) == [999, 799, 599, 399, 199]
    assert strided_timesteps(50)[:2] == [999, 979] and strided_timesteps(50)[-1] == 19
    with pytest.raises(ValueError):
        strided_timesteps(0)


def test_image_depends_only_on_its_seed(tiny):
    sampler = DDPMSampler(steps=4)
    both = sampler(tiny, [3, 7, 1], [11, 12, 13])
    assert both.dtype == torch.uint8 and both.shape == (3, 1, 28, 28)
    alone = DDPMSampler(steps=4)(tiny, [1], [13])  # fresh sampler: no cached noise
    swapped = DDPMSampler(steps=4, batch_size=1)(tiny, [7, 3], [12, 11])
    assert torch.equal(both[2], alone[0])
    assert torch.equal(both[0], swapped[1]) and torch.equal(both[1], swapped[0])
    assert not torch.equal(sampler(tiny, [3], [99])[0], both[0])  # another seed, another image
    assert not torch.equal(sampler(tiny, [4], [11])[0], both[0])  # another label, another image
    with pytest.raises(ValueError, match="one seed per image"):
        sampler(tiny, [1, 2], [5])


def test_sampler_matches_a_float64_ddpm_reference(tiny):
    """Every step against DDPM's formulas written out in numpy float64 (respaced betas, posterior mean, x0 clip)."""
    steps, seeds, labels = 5, [5, 6], [2, 8]
    model = tiny.double()
    try:
        for variance in ("small", "large"):
            got = DDPMSampler(steps=steps, variance=variance)(model, labels, seeds).numpy().astype(int)
            betas = np.linspace(NOISE_SCHEDULE["beta_start"], NOISE_SCHEDULE["beta_end"], 1000)
            abar = np.cumprod(1 - betas)
            ts = [999 - 1000 // steps * k for k in range(steps)]  # 999, 799, ..., 199
            noise = np.stack([torch.randn((steps + 1, 1, 28, 28), generator=torch.Generator().manual_seed(s))
                              .double().numpy() for s in seeds], axis=1)
            x = noise[0]
            for i, t in enumerate(ts):
                a_t, a_prev = abar[t], (abar[ts[i + 1]] if i + 1 < steps else 1.0)
                beta = 1 - a_t / a_prev
                with torch.no_grad():
                    eps = model(torch.from_numpy(x), torch.full((2,), float(t), dtype=torch.float64),
                                torch.tensor(labels)).numpy()
                x0 = np.clip((x - np.sqrt(1 - a_t) * eps) / np.sqrt(a_t), -1, 1)
                x = (np.sqrt(a_prev) * beta * x0 + np.sqrt(1 - beta) * (1 - a_prev) * x) / (1 - a_t)
                if i + 1 < steps:
                    var = beta * (1 - a_prev) / (1 - a_t) if variance == "small" else beta
                    x = x + np.sqrt(var) * noise[i + 1]
            want = np.round((np.clip(x, -1, 1) + 1) * 127.5).astype(int)
            assert np.abs(got - want).max() <= 1, variance
    finally:
        model.float()


def test_few_training_steps_reduce_the_loss(spec):
    """Adam on a fixed batch of blob images: the loss at fixed (t, noise) draws falls."""
    from multiquant.mnist.train_unet import diffusion_loss
    from multiquant.mnist.unet import alphas_cumprod

    model = spec.build("tiny", seed=0).train()
    gen = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    centres = torch.randint(8, 20, (16, 2), generator=gen).float()
    x0 = (torch.exp(-((yy - centres[:, 0, None, None]) ** 2 + (xx - centres[:, 1, None, None]) ** 2) / 18) * 2 - 1)[:, None]
    labels = torch.arange(16) % 10
    ab = alphas_cumprod(**NOISE_SCHEDULE).float()

    def fixed_loss():
        with torch.no_grad():
            return diffusion_loss(model.eval(), x0, labels, ab, torch.Generator().manual_seed(123)).item()

    before = fixed_loss()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(25):
        loss = diffusion_loss(model, x0, labels, ab, gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = fixed_loss()
    assert after < 0.7 * before, (before, after)


@needs_mnist
def test_train_script_saves_weights_the_family_loads(tmp_path, spec):
    from multiquant.mnist import train_unet

    args = argparse.Namespace(device="cpu", seed=0, mnist_dir=None, size="tiny", lr=1e-3, ema=0.99, batch_size=8,
                              warmup=2, steps=3, time_budget_s=0, log_every=1)
    ema, info = train_unet.train(args, log=lambda *_: None)
    assert info["steps"] == 3 and len(info["loss_history"]) == 3 and info["config"]["channels"] == [8, 16]
    path = train_unet.save_weights(ema, tmp_path / "model.safetensors")
    loaded = train_unet.load_weights(spec.build("tiny", seed=9), path)
    for (name, a), b in zip(ema.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a.half(), b.half()), name  # stored in fp16


def test_shipped_weights_load_through_the_protocol_and_sample_digits(spec):
    model = spec.load(dtype=torch.float32)  # factory("full") + the shipped .safetensors state dict
    assert isinstance(model, MNISTUNet) and next(model.parameters()).dtype == torch.float32
    assert spec.sampler.steps == spec.steps and spec.conditions(12)[10:] == [0, 1]
    labels = list(range(10))
    images = DDPMSampler(steps=5)(model, labels, [200 + i for i in labels])  # the family's sampler, fewer steps
    _, preds = classifier_outputs(load_classifier(), images)
    assert np.mean(preds == np.array(labels)) >= 0.8


def test_shipped_dataset_loads_with_500_records_of_the_schema(spec):
    """quant_caches/mnist_unet: 500 random configurations x 1,000 images through the project's loader."""
    from multiquant.layers import quantizable_layers
    from multiquant.mnist.train_unet import SCORED_DIR
    from multiquant.store import SCHEMA_KEYS, load_quant_cache

    records = load_quant_cache(SCORED_DIR / "quant_cache.pkl")
    assert len(records) == 500 and sorted(r["index"] for r in records) == list(range(500))
    keys = {r.key for r in quantizable_layers(spec.build("full"), spec)}
    options = {f"{m}-{b}" for m in ("mse", "kmeans", "kmeans_all") for b in (3, 4)}
    for r in records:
        assert tuple(r)[:len(SCHEMA_KEYS)] == SCHEMA_KEYS and r["architecture"] == "mnist_unet"
        assert set(r["config"]) == keys and {entry[0] for entry in r["config"].values()} <= options  # [option, ...]
        assert np.isfinite(r["FID-GT-1k"]) and r["FID-GT-1k"] > 0 and 3.0 <= r["avg_bits"] <= 4.8
        assert r["num_images"] == 1000 and r["seed"] == 0
    meta = json.loads((SCORED_DIR / "run_meta.json").read_text())
    assert (meta["model"], meta["num_images"], meta["image_seed"], meta["seed"]) == ("mnist_unet", 1000, 42, 0)
    # quantization hurts in order on the same protocol: FP16 < uniform 4-bit < uniform 3-bit, every method
    base = {r["name"]: float(r["FID-GT-1k"]) for r in load_quant_cache(SCORED_DIR / "baselines.pkl")}
    for method in ("mse", "kmeans", "kmeans_all"):
        assert base["fp16"] < base[f"uniform_{method}-4"] < base[f"uniform_{method}-3"], method


def test_demo_runs_on_either_testbed():
    from qua2sedimo.cli import build_parser
    from qua2sedimo.demo import shipped_cache

    assert build_parser().parse_args(["demo", "--model", "mnist_unet", "--quick"]).model == "mnist_unet"
    assert build_parser().parse_args(["demo"]).model == "mnist_dit"
    assert shipped_cache("mnist_unet").is_file() and shipped_cache("mnist_dit").is_file()
