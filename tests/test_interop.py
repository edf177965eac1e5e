"""A configuration as other tools read it (multiquant/interop.py): the torchao per-module map quantizes exactly
the configuration's UAQ linears, at their bit-width, per output channel, and leaves the rest dense; the
``modules_to_not_convert`` list is the configuration's 16-bit layers; codebook layers are named as such. Loaded
in torchao itself (and through diffusers' TorchAoConfig where accelerate is installed)."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from multiquant.checkpoint import MultiQuantizer
from multiquant.config import sample_random_config
from multiquant.families import get_family
from multiquant.adapters import example_inputs
from multiquant.interop import INTEROP_NAME, interop_plan, torchao_config, write_interop


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(1)
    family = get_family("pixart_alpha")
    model = family.build("tiny", seed=0)
    mq = MultiQuantizer.build(model, family, kmeans_iters=2, show_progress=False)
    config = sample_random_config(mq.layers, seed=0, index=0)
    keys = [r.key for r in mq.layers]
    for i, key in enumerate(keys):  # every kind present: 16-bit, UAQ-3, UAQ-4, and the random mix's codebooks
        config[key] = {0: "fp16", 1: "mse-4", 2: "mse-3"}.get(i % 4, config[key])
    return family, model, mq, config


def test_plan_sorts_every_module_by_what_can_express_it(tiny):
    _, model, mq, config = tiny
    plan = interop_plan(config, mq.layers, model)
    assert set(plan.modules) == {r.path for r in mq.layers}
    by_path = {r.path: config[r.key] for r in mq.layers}  # tiny PixArt: no split layers
    assert plan.modules_to_not_convert == [p for p, o in by_path.items() if o == "fp16"]
    assert plan.codebook_layers == {p: [o] for p, o in by_path.items() if o.startswith("kmeans")}
    expected_uniform = {p: int(o.split("-")[1]) for p, o in by_path.items()
                        if o.startswith("mse") and isinstance(model.get_submodule(p), torch.nn.Linear)}
    assert plan.uniform_layers == expected_uniform and expected_uniform
    assert {3, 4} <= set(expected_uniform.values())
    for path, module_plan in plan.modules.items():
        if module_plan.torchao is None and by_path[path].startswith("kmeans"):
            assert "codebook" in module_plan.reason


def test_split_layers_with_different_slices_stay_dense():
    family = get_family("hunyuan")  # split linears
    model = family.build("tiny", seed=0)
    from multiquant.layers import quantizable_layers

    layers = quantizable_layers(model, family)
    split = [r for r in layers if r.cols is not None]
    assert split
    config = {r.key: "mse-4" for r in layers}
    config[split[0].key] = "mse-3"
    plan = interop_plan(config, layers, model)
    assert plan.modules[split[0].path].torchao is None
    assert "split layer" in plan.modules[split[0].path].reason


def test_interop_json_is_written_and_reads_back(tiny, tmp_path):
    _, model, mq, config = tiny
    plan = interop_plan(config, mq.layers, model)
    saved = json.loads(write_interop(plan, tmp_path).read_text())
    assert (tmp_path / INTEROP_NAME).is_file()
    assert saved["modules_to_not_convert"] == plan.modules_to_not_convert
    assert {p for p, v in saved["torchao"].items() if v} == set(plan.uniform_layers)
    assert set(saved["codebook_layers"]) == set(plan.codebook_layers)


def _check_torchao_model(quantized, model, plan):
    for path in plan.modules:
        weight = quantized.get_submodule(path).weight
        fp = model.get_submodule(path).weight
        if path in plan.uniform_layers:
            assert type(weight).__name__ != "Parameter" and hasattr(weight, "dequantize"), path
            deq = weight.dequantize().float()
            levels = 2 ** plan.uniform_layers[path]
            assert all(torch.unique(row).numel() <= levels for row in deq), path  # a b-bit grid per channel
            step = (fp.max(dim=1).values - fp.min(dim=1).values) / (levels - 1)
            assert ((deq - fp.float()).abs() <= step[:, None] * 0.51 + 1e-6).all(), path  # min-max rounding
        else:
            assert torch.equal(weight.detach(), fp.detach()), path  # dense: untouched


def test_torchao_quantizes_exactly_the_mapped_modules(tiny):
    pytest.importorskip("torchao")
    from torchao.quantization import quantize_

    family, model, mq, config = tiny
    plan = interop_plan(config, mq.layers, model)
    quantized = copy.deepcopy(model)
    quantize_(quantized, torchao_config(plan), filter_fn=None)
    _check_torchao_model(quantized, model, plan)
    inputs = example_inputs(family, model, batch=2, seed=3)
    with torch.no_grad():
        out, ref = quantized(**inputs).sample, model(**inputs).sample
    assert torch.isfinite(out).all() and not torch.equal(out, ref)


def test_diffusers_loads_the_fp16_checkpoint_with_the_map_and_skip_list(tiny, tmp_path):
    pytest.importorskip("torchao")
    pytest.importorskip("accelerate")  # diffusers quantizes while loading only with low_cpu_mem_usage
    from diffusers import TorchAoConfig

    _, model, mq, config = tiny
    plan = interop_plan(config, mq.layers, model)
    model.save_pretrained(tmp_path / "fp")
    quant = TorchAoConfig(torchao_config(plan), modules_to_not_convert=plan.modules_to_not_convert)
    loaded = type(model).from_pretrained(tmp_path / "fp", quantization_config=quant, torch_dtype=torch.float32)
    _check_torchao_model(loaded, model, plan)


def test_export_writes_the_interop_file(tiny, tmp_path):
    from multiquant.export import export_quantized

    family, model, mq, config = tiny
    out = export_quantized(model, family, config, mq, tmp_path / "export")
    saved = json.loads((out / INTEROP_NAME).read_text())
    assert saved == json.loads(json.dumps(interop_plan(config, mq.layers, model).to_json()))


def test_a_stock_pipeline_loads_the_packed_denoiser_with_from_pretrained(tmp_path):
    """``DiTPipeline.from_pretrained(dir, transformer=load_quantized(export))``: the packed denoiser goes in as
    a component and generates the same images as the pipeline holding the simulated configuration."""
    from multiquant.config import quantize_
    from multiquant.export import export_quantized, load_quantized
    from multiquant.adapters.diffusers.loading import tiny_pipeline

    family = get_family("dit")
    pipe = tiny_pipeline(family, seed=0)
    pipe.save_pretrained(tmp_path / "pipe")
    mq = MultiQuantizer.build(pipe.transformer, family, kmeans_iters=2, show_progress=False)
    config = sample_random_config(mq.layers, seed=1, index=0)
    export_quantized(pipe.transformer, family, config, mq, tmp_path / "export")
    loaded = type(pipe).from_pretrained(tmp_path / "pipe", transformer=load_quantized(tmp_path / "export"))
    assert any(type(m).__name__.startswith("Packed") for m in loaded.transformer.modules())
    quantize_(pipe.transformer, config, mq)

    def images(p):
        p.set_progress_bar_config(disable=True)
        # guidance 1: the tiny DiT has no null class for classifier-free guidance
        return p(class_labels=[1, 3], num_inference_steps=2, guidance_scale=1.0,
                 generator=torch.Generator().manual_seed(0), output_type="np").images

    assert (images(loaded) == images(pipe)).all()
