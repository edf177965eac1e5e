"""How the rendering modules compute (eval-random / eval-configs --channels_last, --dtype): channels-last
convolutions keep their layout and values through the in-place weight swap (and a compiled denoiser does not
recompile for it), half precision casts the rendering modules after the checkpoint's check, and a run directory
never mixes results of different settings."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from torch import nn

import module_family as toy
from multiquant.adapters.base import channels_last_
from multiquant.checkpoint import MultiQuantizer
from multiquant.config import ConfigApplier, sample_random_config, uniform_config
from multiquant.errors import UserError
from multiquant.evaluate import setup_scorer
from multiquant.families import FamilySpec, get_family
from multiquant.metrics.metric import FeatureFID
from multiquant.store import load_quant_cache
from qua2sedimo.cli import main as cli_main

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

CL = torch.channels_last


class ConvShapes(nn.Module):
    """Every 2-D convolution shape: 3x3, 1x1, depthwise 3x3, a 3x3 whose input is split (a concat), and a Linear."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.pointwise = nn.Conv2d(6, 6, 1)
        self.depthwise = nn.Conv2d(6, 6, 3, padding=1, groups=6)
        self.split = nn.Conv2d(6, 5, 3, padding=1)
        self.head = nn.Linear(5, 4)

    def forward(self, x):
        h = self.pointwise(torch.relu(self.conv(x)))
        return self.head(self.split(h + self.depthwise(h)).mean((2, 3)))


SHAPES = FamilySpec(name="tests_conv_shapes", factory=lambda size: ConvShapes(), split_rule=lambda m: {"split": 2})


def _conv_shapes(dtype=torch.float32):
    torch.manual_seed(3)
    model = ConvShapes().to(dtype)
    return model, MultiQuantizer.build(model, SHAPES, methods=("mse", "kmeans"), bits=(3, 4), kmeans_iters=5,
                                       show_progress=False)


def test_copying_quantized_weights_into_channels_last_parameters_keeps_layout_and_values():
    model, mq = _conv_shapes()
    fp = {name: p.detach().clone() for name, p in model.named_parameters()}
    assert channels_last_(model) == 4  # the four conv weights (biases and the Linear are not 4-D)
    assert not fp["conv.weight"].is_contiguous(memory_format=CL)  # a 3x3 kernel really changed layout
    params = {name: (p, p.stride(), p.data_ptr()) for name, p in model.named_parameters()}
    applier = ConfigApplier(model, mq)
    for index, config in enumerate([uniform_config(mq.layers, "mse-3"), uniform_config(mq.layers, "kmeans-4"),
                                    sample_random_config(mq.layers, 0, 1, methods=("mse", "kmeans"))]):
        assert applier.apply(config) > 0
        for ref in mq.layers:
            param, stride, ptr = params[f"{ref.path}.weight"]
            assert param.stride() == stride and param.data_ptr() == ptr  # in place, layout kept
            assert param.dim() == 2 or param.is_contiguous(memory_format=CL)  # the Linear stays as it was
            assert torch.equal(ref.weight(model), mq.dequantize(ref.key, config[ref.key]))  # values (split halves too)
    applier.restore()
    for name, (param, stride, _) in params.items():
        assert torch.equal(param, fp[name]) and param.stride() == stride


def test_channels_last_forward_with_swapped_weights_matches_float64_contiguous_reference():
    """The quantized channels-last model computes what the same weights do contiguous (both in float64)."""
    model, mq = _conv_shapes(torch.float64)
    reference = ConvShapes().double()
    channels_last_(model)
    config = sample_random_config(mq.layers, 0, 2, methods=("mse", "kmeans"))
    ConfigApplier(model, mq).apply(config)
    reference.load_state_dict({k: v.contiguous() for k, v in model.state_dict().items()})
    assert all(p.is_contiguous() for p in reference.parameters())
    x = torch.randn(2, 3, 7, 7, dtype=torch.float64)
    torch.testing.assert_close(model(x), reference(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(model(x.contiguous(memory_format=CL)), reference(x), rtol=1e-12, atol=1e-12)


def test_compiled_channels_last_model_is_not_recompiled_by_the_weight_swap():
    model, mq = _conv_shapes()
    channels_last_(model)
    graphs = []

    def counting_backend(graph_module, example_inputs):  # Dynamo's graphs, run as traced (no Inductor)
        graphs.append(graph_module)
        return graph_module.forward

    model.compile(backend=counting_backend)
    applier = ConfigApplier(model, mq)
    x = torch.randn(2, 3, 7, 7)
    model(x)
    for option in ("mse-3", "kmeans-4", "fp16"):
        applier.apply(uniform_config(mq.layers, option))
        expected = model._orig_mod(x) if hasattr(model, "_orig_mod") else model.forward(x)
        assert torch.equal(model(x), expected)
    assert len(graphs) == 1


def _text_family(name: str):
    """The tiny family with 5 steps and a small injected feature network (fast on the CPU)."""
    torch.manual_seed(0)
    features = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(48, 6))
    reference = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (8, 3, 32, 32), dtype=np.uint8))
    return dataclasses.replace(get_family(name), steps=5, metric=FeatureFID(features, reference_images=reference))


@pytest.mark.parametrize("name", ["sdv15", "sdxl"])
def test_half_precision_channels_last_scorer_of_a_unet_family(tmp_path, name):
    """--dtype float16 --channels_last on a U-Net kind: the checkpoint is checked against the weights as loaded,
    then the denoiser and the VAE (SDXL: and its refiner; its VAEs stay float32, upcast as the protocol does)
    are cast and channels-last; the images stay those of the float32 contiguous run up to half-precision
    rounding, and the settings say what changed."""
    family = _text_family(name)
    kw = dict(tiny=True, device="cpu", num_images=2, batch_size=2, bops=False, build_mq=True,
              mq_path=tmp_path / "mq.safetensors", log=lambda m: None)
    plain, plain_settings = setup_scorer(family, **kw)
    scorer, settings = setup_scorer(family, dtype="float16", channels_last=True, **kw)
    assert "dtype" not in plain_settings and "channels_last" not in plain_settings
    assert settings["dtype"] == "float16" and settings["channels_last"] is True
    assert settings["sampler"]["dtype"] == "float16" and plain_settings["sampler"]["dtype"] == "float32"
    assert settings["multiquantizer_content_hash"] == plain_settings["multiquantizer_content_hash"]
    sampler = scorer.sampler
    modules = sampler.adapter.generation_modules(family, sampler.pipe, sampler.refiner)
    assert sorted(modules) == (["denoiser", "refiner.denoiser", "refiner.vae", "vae"] if name == "sdxl"
                               else ["denoiser", "vae"])
    for label, module in modules.items():
        expected = torch.float32 if name == "sdxl" and label.endswith("vae") else torch.float16
        assert {p.dtype for p in module.parameters()} == {expected}, label
        convs = [m.weight for m in module.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
        assert convs and all(w.is_contiguous(memory_format=CL) for w in convs), label
    fp = scorer.record(uniform_config(scorer.mq.layers, "fp16"), index=0)
    low = scorer.record(uniform_config(scorer.mq.layers, "mse-3"), index=1)
    assert fp["psnr_fp"] == 100.0 and low["psnr_fp"] < 100.0  # the FP weights come back exactly
    assert all(p.dtype == torch.float16 for p in scorer.denoiser.parameters())  # the swap kept the dtype
    plain.fp_reference()
    diff = (scorer.fp["images"].int() - plain.fp["images"].int()).abs()
    assert 0 < diff.max() <= 3  # float16 rounding, not another image


def test_bfloat16_user_conv_family_and_an_unsafe_precision_is_refused(tmp_path):
    kw = dict(tiny=True, device="cpu", build_mq=True, log=lambda m: None)
    scorer, settings = setup_scorer(toy.FAMILY, dtype="bfloat16", channels_last=True,
                                    mq_path=tmp_path / "toy.safetensors", **kw)
    assert settings["dtype"] == "bfloat16" and settings["channels_last"] is True
    assert all(p.dtype == torch.bfloat16 for p in scorer.denoiser.parameters())
    assert scorer.denoiser.conv_in.weight.is_contiguous(memory_format=CL)
    rec = scorer.record(uniform_config(scorer.mq.layers, "mse-4"), index=0)
    assert np.isfinite(float(rec["FID-GT-1k"]))
    # the family's own precision is no option: nothing recorded
    _, same = setup_scorer(toy.FAMILY, dtype="float32", mq_path=tmp_path / "toy.safetensors", **kw)
    assert "dtype" not in same and same["sampler"]["dtype"] == "float32"
    for dtype in ("float16", "bfloat16"):
        with pytest.raises(UserError, match=f"declares {dtype} unsafe") as refused:
            setup_scorer(toy.FP32_ONLY_FAMILY, dtype=dtype, mq_path=tmp_path / "fp32.safetensors", **kw)
        assert "\n" not in str(refused.value) and "float32" in str(refused.value)


def test_channels_last_without_a_convolution_is_refused(tmp_path):
    """The MNIST DiT renders with a transformer in pixel space: nothing is convolutional."""
    with pytest.raises(UserError, match="leave out --channels_last"):
        setup_scorer(get_family("mnist_dit"), tiny=True, device="cpu", num_images=2, build_mq=True,
                     mq_path=tmp_path / "mq.safetensors", channels_last=True, log=lambda m: None)


def test_a_run_directory_never_mixes_precision_or_layout(tmp_path, capsys):
    """eval-configs on a user's conv family: a plain run refuses channels-last and bfloat16 results, resumes under
    the family's own precision named explicitly; a channels-last bfloat16 run resumes only with both."""
    args = ["eval-configs", "--model", toy.FAMILY.name, "--tiny", "--device", "cpu", "--build_mq", "--fp16",
            "--uniform", "mse-4", "--mq", str(tmp_path / "toy_mq.safetensors")]
    plain, fast = ["--outdir", str(tmp_path / "plain")], ["--outdir", str(tmp_path / "fast")]
    assert cli_main([*args, *plain]) == 0
    capsys.readouterr()
    for flags, differing in ((["--channels_last"], "channels_last"), (["--dtype", "bfloat16"], "dtype, sampler")):
        assert cli_main([*args, *plain, *flags]) == 2
        err = capsys.readouterr().err
        assert f"different settings ({differing})" in err and len(err.strip().splitlines()) == 1
    assert cli_main([*args, *plain, "--dtype", "float32"]) == 0
    assert "resuming: 2 configuration(s) already scored, 0 to go" in capsys.readouterr().out
    assert cli_main([*args, *fast, "--channels_last", "--dtype", "bfloat16"]) == 0
    meta = json.loads((tmp_path / "fast" / "run_meta.json").read_text())
    assert meta["channels_last"] is True and meta["dtype"] == "bfloat16" and meta["sampler"]["dtype"] == "bfloat16"
    assert "channels_last" not in json.loads((tmp_path / "plain" / "run_meta.json").read_text())
    records = {r["name"]: r for r in load_quant_cache(tmp_path / "fast" / "quant_cache.pkl")}
    assert records["fp16"]["psnr_fp"] == 100.0 and records["uniform_mse-4"]["psnr_fp"] < 100.0
    capsys.readouterr()
    assert cli_main([*args, *fast, "--dtype", "bfloat16"]) == 2
    assert "different settings (channels_last)" in capsys.readouterr().err
    assert cli_main([*args, *fast, "--channels_last", "--dtype", "bfloat16"]) == 0
    assert "resuming: 2 configuration(s) already scored, 0 to go" in capsys.readouterr().out
    # a family that declares the precision unsafe: one line, exit 2
    assert cli_main(["eval-configs", "--model", toy.FP32_ONLY_FAMILY.name, "--tiny", "--device", "cpu", "--build_mq",
                     "--fp16", "--outdir", str(tmp_path / "x"), "--dtype", "float16"]) == 2
    err = capsys.readouterr().err
    assert "declares float16 unsafe" in err and len(err.strip().splitlines()) == 1
