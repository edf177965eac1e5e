"""The embedded MNIST family: data split, classifier, shipped weights, pipeline and training code."""
from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch

from multiquant.families import get_family
from multiquant.layers import quantizable_layers
from multiquant.mnist import data
from multiquant.mnist.classifier import (MNISTClassifier, classifier_outputs, load_classifier, load_reference_stats,
                                         save_classifier)
from multiquant.mnist.quality import evaluation_plan, score_digits
from multiquant.mnist.pipeline import MNISTDiTPipeline, build_scheduler
from multiquant.utils import to_uint8

from mnist_data import needs_mnist  # tests/mnist_data.py


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def spec():
    return get_family("mnist_dit")


@pytest.fixture(scope="module")
def tiny_pipe(spec):
    return MNISTDiTPipeline(transformer=spec.build("tiny", seed=1), scheduler=build_scheduler(spec, pretrained="/nonexistent"))


# --- data ------------------------------------------------------------------------------------------
def test_split_is_fixed_disjoint_and_covers_the_test_set():
    parts = {name: set(data.split_indices(name).tolist()) for name in ("train", "reference", "eval")}
    assert [len(parts[n]) for n in ("train", "reference", "eval")] == [7000, 2000, 1000]
    assert not (parts["train"] & parts["reference"]) and not (parts["train"] & parts["eval"])
    assert not (parts["reference"] & parts["eval"])
    assert set(data.split_indices("heldout").tolist()) == parts["reference"] | parts["eval"]
    assert len(set().union(*parts.values())) == data.NUM_DIGITS
    with pytest.raises(KeyError, match="unknown MNIST split"):
        data.split_indices("validation")


def test_missing_files_name_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="QUA2SEDIMO_MNIST"):
        data.load_mnist_test(tmp_path)


@needs_mnist
def test_real_digits_load():
    images, labels = data.load_split("eval")
    assert images.shape == (1000, 28, 28) and images.dtype == np.uint8
    assert set(np.unique(labels).tolist()) == set(range(10))
    x = data.to_model_range(images[:8])
    assert x.shape == (8, 1, 28, 28) and x.min() >= -1 and x.max() <= 1
    assert torch.equal(to_uint8(x, data.MODEL_RANGE)[:, 0], torch.from_numpy(images[:8]))


# --- classifier and reference statistics ---------------------------------------------------------------
def test_classifier_save_load_roundtrip(tmp_path):
    torch.manual_seed(0)
    model = MNISTClassifier(channels=(4, 8), hidden=16).eval()
    save_classifier(model, tmp_path)
    loaded = load_classifier(tmp_path)
    x = torch.randint(0, 256, (5, 28, 28), dtype=torch.uint8)
    assert torch.allclose(model.features(x), loaded.features(x))
    assert loaded.logits(x).shape == (5, 10)
    with pytest.raises(FileNotFoundError, match="train_classifier"):
        load_classifier(tmp_path / "missing")


def test_shipped_reference_stats_are_the_reference_split():
    ref = load_reference_stats()
    assert ref["n"] == 2000 and ref["split"] == "reference"
    np.testing.assert_array_equal(ref["indices"], data.split_indices("reference"))
    d = ref["mu"].shape[0]
    assert ref["sigma"].shape == (d, d) and np.allclose(ref["sigma"], ref["sigma"].T)
    assert d == load_classifier().fc1.out_features


@needs_mnist
def test_shipped_classifier_is_accurate_on_heldout_digits():
    images, labels = data.load_split("heldout")
    _, preds = classifier_outputs(load_classifier(), images[::5])  # 600 of the 3,000, all digits
    assert np.mean(preds == labels[::5]) >= 0.98


@needs_mnist
def test_mnist_fid_separates_real_digits_from_noise():
    images, labels = data.load_split("eval")
    real = score_digits(images[:300], labels[:300])
    gen = torch.Generator().manual_seed(0)
    noise = torch.randint(0, 256, (300, 28, 28), generator=gen, dtype=torch.uint8)
    assert real["accuracy"] >= 0.97
    assert score_digits(noise)["fid"] > 10 * real["fid"] > 0


def test_evaluation_plan_is_class_balanced_with_fixed_seeds():
    labels, seeds = evaluation_plan(1000, seed=5)
    assert np.bincount(labels).tolist() == [100] * 10
    assert seeds[0] == 5 and seeds[-1] == 1004 and len(set(seeds.tolist())) == 1000
    np.testing.assert_array_equal(evaluation_plan(30)[0], np.arange(30) % 10)


# --- family and pipeline ---------------------------------------------------------------------------------
def test_family_entry(spec):
    assert spec.model_class == "DiTTransformer2DModel" and spec.num_classes == 10 and spec.resolution == 28
    assert (spec.default_pretrained / "config.json").is_file()
    model = spec.build("full", device="meta")
    layers = quantizable_layers(model, spec)
    n_blocks = spec.full_config["num_layers"]
    assert len(layers) == 9 * n_blocks + 3  # attn 4, ff 2, adaLN 1, timestep MLP 2 per block; patch embed, 2 outputs
    tied = [ref for ref in layers if ref.tied_to]
    assert len(tied) == 2 * (n_blocks - 1)
    assert all(".transformer_blocks.0.norm1.emb.timestep_embedder." in ref.tied_to for ref in tied)


def test_pipeline_image_depends_only_on_its_seed(tiny_pipe):
    labels, seeds = [3, 1, 4, 1, 5], [11, 22, 33, 44, 55]
    full = tiny_pipe(labels, seeds, num_inference_steps=3, guidance_scale=2.0)
    assert full.shape == (5, 1, 28, 28) and full.dtype == torch.uint8
    assert full.float().std() > 0
    one_by_one = tiny_pipe(labels, seeds, num_inference_steps=3, guidance_scale=2.0, batch_size=1)
    reordered = tiny_pipe([5, 4, 3], [55, 33, 11], num_inference_steps=3, guidance_scale=2.0)
    assert (full.int() - one_by_one.int()).abs().max() <= 1
    assert (full[[4, 2, 0]].int() - reordered.int()).abs().max() <= 1
    other_seed = tiny_pipe([3], [12], num_inference_steps=3, guidance_scale=2.0)
    assert (other_seed[0].int() - full[0].int()).abs().max() > 10


def test_pipeline_guidance_and_argument_checks(tiny_pipe):
    a = tiny_pipe([7, 7], [1, 2], num_inference_steps=2, guidance_scale=1.0, output_type="pt")
    b = tiny_pipe([7, 7], [1, 2], num_inference_steps=2, guidance_scale=4.0, output_type="pt")
    assert a.dtype == torch.float32 and not torch.allclose(a, b)
    with pytest.raises(ValueError, match="one seed per image"):
        tiny_pipe([1, 2], [1])
    with pytest.raises(ValueError, match="class labels"):
        tiny_pipe([10], [0])


def test_pipeline_save_and_from_pretrained(tiny_pipe, tmp_path):
    tiny_pipe.save_pretrained(tmp_path)
    loaded = MNISTDiTPipeline.from_pretrained(tmp_path)
    kwargs = dict(class_labels=[0, 9], seeds=[3, 4], num_inference_steps=3)
    assert torch.equal(tiny_pipe(**kwargs), loaded(**kwargs))


def test_shipped_denoiser_draws_the_requested_digits(spec):
    pipe = MNISTDiTPipeline.from_family(device="cpu")
    blocks = pipe.transformer.transformer_blocks
    for name in ("linear_1", "linear_2"):  # the tie rule holds: every block's timestep MLP is block 0's
        w0 = getattr(blocks[0].norm1.emb.timestep_embedder, name).weight
        assert all(torch.equal(w0, getattr(b.norm1.emb.timestep_embedder, name).weight) for b in blocks[1:])
    labels = list(range(10))
    images = pipe(labels, seeds=[100 + i for i in labels], num_inference_steps=8, guidance_scale=spec.guidance)
    _, preds = classifier_outputs(load_classifier(), images)
    assert np.mean(preds == np.array(labels)) >= 0.8


# --- training code (tiny, a few steps) -------------------------------------------------------------------------
def test_tie_untie_and_loss(spec):
    from diffusers import DDPMScheduler

    from multiquant.families.mnist_dit import NOISE_SCHEDULE
    from multiquant.mnist import train_dit

    model = train_dit.init_dit_weights(spec.build("tiny", seed=0))
    train_dit.tie_block_embedders(model)
    blocks = model.transformer_blocks
    assert blocks[1].norm1.emb is blocks[0].norm1.emb
    train_dit.disable_builtin_label_dropout(model)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 1, 28, 28, generator=gen) * 2 - 1
    loss = train_dit.diffusion_loss(model.train(), x0, torch.tensor([0, 1, 2, 3]),
                                    DDPMScheduler(**NOISE_SCHEDULE).alphas_cumprod, gen, 0.5, 10)
    loss.backward()
    assert torch.isfinite(loss) and blocks[0].norm1.emb.timestep_embedder.linear_1.weight.grad is not None
    train_dit.untie_block_embedders(model)
    assert blocks[1].norm1.emb is not blocks[0].norm1.emb
    assert torch.equal(blocks[1].norm1.emb.class_embedder.embedding_table.weight,
                       blocks[0].norm1.emb.class_embedder.embedding_table.weight)


@needs_mnist
def test_train_dit_few_steps_saves_loadable_weights(tmp_path, spec):
    from multiquant.mnist import train_dit

    args = argparse.Namespace(device="cpu", seed=0, mnist_dir=None, size="tiny", lr=1e-3, ema=0.99, batch_size=8,
                              p_uncond=0.1, warmup=2, steps=3, time_budget_s=0, log_every=1)
    ema, info = train_dit.train(args, log=lambda *_: None)
    assert info["steps"] == 3 and len(info["loss_history"]) == 3
    train_dit.save_denoiser(ema, tmp_path)
    loaded = spec.load(tmp_path, dtype=torch.float32)
    assert next(loaded.parameters()).dtype == torch.float32
    assert (tmp_path / "scheduler_config.json").is_file()


def test_random_affine_keeps_background():
    from multiquant.mnist.train_classifier import random_affine

    x = torch.full((3, 1, 28, 28), -1.0)
    x[:, :, 10:18, 12:16] = 1.0
    y = random_affine(x, torch.Generator().manual_seed(0))
    assert y.shape == x.shape and torch.allclose(y[:, :, 0, :], torch.full_like(y[:, :, 0, :], -1.0))
    assert not torch.allclose(y, x) and y.max() > 0
