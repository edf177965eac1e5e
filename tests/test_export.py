"""Packed export: the loaded packed denoiser equals the simulated configuration (weights bit for bit, forward
outputs, generated images), its file size is the hand-computed sum, tied copies are stored once, no dense copy
of a quantized weight is held, and broken directories fail with a message naming the fix."""
from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from safetensors import safe_open

from multiquant.checkpoint import MultiQuantizer, MultiQuantizerMismatch
from multiquant.config import ConfigError, quantize_, sample_random_config
from multiquant.export import (INFO_NAME, WEIGHTS_NAME, ExportError, denoiser_output, export_quantized,
                               load_quantized, pack_, read_export_info, safetensors_bytes, swap_denoiser,
                               tensor_bytes)
from multiquant.families import get_family
from multiquant.adapters import example_inputs
from multiquant.packed import PACKED_TYPES, PackedWeight, packed_layer, unpack_codes_lean
from multiquant.packing import pack_codes, packed_nbytes, unpack_codes
from multiquant.adapters.diffusers.embeddings import random_prompt_embeds
from multiquant.adapters.diffusers.loading import denoiser_of, tiny_pipeline
from multiquant.adapters.diffusers.sampling import make_sampler
from multiquant.quantizers import dequantize, quantize

FAMILIES = ["mnist_dit", "pixart_alpha", "dit", "sdxl", "hunyuan"]  # sdxl: split convs; hunyuan: split linears
N, STEPS = 2, 2


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def mixed_config(layers) -> "OrderedDict[str, str]":
    """A random configuration with some whole layers at fp16 and, where there are split layers, one split
    layer with its second half at fp16 (a packed module with a dense slice)."""
    config = sample_random_config(layers, seed=0, index=3)
    canonical = [r.key for r in layers if not r.tied_to and r.cols is None]
    fp_keys = set(canonical[::5])
    halves = [r for r in layers if r.cols is not None and r.cols[0] > 0]
    if halves:
        fp_keys.add(halves[0].key)
    for ref in layers:
        if (ref.tied_to or ref.key) in fp_keys:
            config[ref.key] = "fp16"
    return config


def _sampler(family, pipe):
    kwargs = {}
    if get_family(family).conditioning == "text":
        kwargs = {"prompt_embeds": random_prompt_embeds(family, pipe, N, seed=1),
                  "conditions": [f"prompt {i}" for i in range(N)]}
    return make_sampler(family, pipe, num_images=N, batch_size=N, steps=STEPS, **kwargs)


@pytest.fixture(scope="module", params=FAMILIES)
def exported(request, tmp_path_factory):
    """Export a mixed configuration of the tiny pipeline's denoiser, then render with the simulated and with
    the loaded packed denoiser."""
    name = request.param
    family = get_family(name)
    pipe = tiny_pipeline(name, seed=0)
    fp_model = denoiser_of(pipe)
    mq = MultiQuantizer.build(fp_model, family, kmeans_iters=10, show_progress=False)
    config = mixed_config(mq.layers)
    out = export_quantized(fp_model, family, config, mq, tmp_path_factory.mktemp(name))
    fp_state = {k: v.clone() for k, v in fp_model.state_dict().items()}  # for the size check
    sampler = _sampler(name, pipe)
    quantize_(fp_model, config, mq)  # fp_model is now the simulated configuration
    simulated_images = sampler.generate(range(N))
    packed = load_quantized(out)
    swap_denoiser(pipe, packed)
    packed_images = sampler.generate(range(N))
    swap_denoiser(pipe, fp_model)
    return dict(name=name, family=family, mq=mq, config=config, out=out, simulated=fp_model, packed=packed,
                fp_state=fp_state, simulated_images=simulated_images, packed_images=packed_images)


# -- kernels --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", range(2, 9))
def test_lean_unpack_equals_reference_unpack(bits):
    g = torch.Generator().manual_seed(bits)
    for numel in (1, 7, 8, 9, 1003):
        codes = torch.randint(0, 2 ** bits, (numel,), generator=g).to(torch.uint8)
        packed = pack_codes(codes, bits)
        assert torch.equal(unpack_codes_lean(packed, bits, numel).to(torch.uint8), unpack_codes(packed, bits, numel))


@pytest.mark.parametrize("layer", [torch.nn.Linear(12, 5), torch.nn.Conv1d(6, 5, 3, padding=1),
                                   torch.nn.Conv2d(4, 5, 3, stride=2, padding=1, padding_mode="reflect")],
                         ids=["linear", "conv1d", "conv2d"])
def test_packed_layers_equal_the_stock_layer_with_the_dequantized_weight(layer):
    """Every method, a split into two slices (one of them dense), against quantizers.dequantize."""
    weight = layer.weight.detach()
    cut = weight.shape[1] // 2
    for option in ("mse-3", "kmeans-4", "kmeans_all-2"):
        method, bits = option.rsplit("-", 1)
        first = weight[:, :cut]
        codes, params = quantize(first.reshape(first.shape[0], -1), method, int(bits), iters=5)
        part = PackedWeight(option, first.shape, device="cpu")
        part.codes.copy_(pack_codes(codes, int(bits)))
        for name, value in params.items():
            getattr(part, name).copy_(value)
        dense = PackedWeight("fp16", weight[:, cut:].shape, device="cpu")
        dense.dense.copy_(weight[:, cut:])
        packed = packed_layer(layer, [part, dense])
        reference = torch.cat([dequantize(method, codes, params).view(first.shape), weight[:, cut:]], dim=1)
        assert torch.equal(packed.weight, reference)
        spatial = {torch.nn.Linear: (), torch.nn.Conv1d: (9,), torch.nn.Conv2d: (9, 9)}[type(layer)]
        x = torch.randn(2, weight.shape[1], *spatial) if spatial else torch.randn(2, weight.shape[1])
        with torch.no_grad():
            if isinstance(layer, torch.nn.Linear):
                expected = torch.nn.functional.linear(x, reference, layer.bias)
            else:
                expected = layer._conv_forward(x, reference, layer.bias)
            assert torch.equal(packed(x), expected)


# -- equality with the simulated configuration ---------------------------------------------------------------

def test_every_packed_weight_equals_the_simulated_weight_bit_for_bit(exported):
    packed, simulated = exported["packed"], exported["simulated"]
    modules = [(n, m) for n, m in packed.named_modules() if isinstance(m, PACKED_TYPES)]
    assert modules
    for name, module in modules:
        assert torch.equal(module.weight, simulated.get_submodule(name).weight), name


def test_forward_matches_the_simulated_configuration(exported):
    family, packed, simulated = exported["family"], exported["packed"], exported["simulated"]
    inputs = example_inputs(family, simulated, batch=2)
    with torch.no_grad():
        expected, got = denoiser_output(simulated, inputs), denoiser_output(packed, inputs)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_generated_images_match_the_simulated_configuration(exported):
    a, b = exported["simulated_images"], exported["packed_images"]
    assert a.shape == b.shape and a.float().std() > 1
    assert (a.int() - b.int()).abs().max() <= 1  # identical here (bitwise-equal weights); 1 level of slack


def test_split_layers_hold_two_slices_and_fp16_layers_stay_dense(exported):
    packed, config, mq = exported["packed"], exported["config"], exported["mq"]
    halves = [r for r in mq.layers if r.cols is not None]
    if exported["name"] in ("sdxl", "hunyuan"):
        assert halves
    for ref in halves:
        module = packed.get_submodule(ref.path)
        options = [config[r.key] for r in halves if r.path == ref.path]
        if all(o == "fp16" for o in options):
            assert not isinstance(module, PACKED_TYPES)
        else:
            assert [p.option for p in module.parts] == options
    for ref in mq.layers:
        if ref.cols is None and config[ref.key] == "fp16":
            assert not isinstance(packed.get_submodule(ref.path), PACKED_TYPES)


# -- size -----------------------------------------------------------------------------------------------------

def hand_computed_bytes(mq, config, fp_state) -> int:
    """Packed codes + quantizer parameters + dense fp16 slices + every other tensor of the state dict."""
    total, quantized_weights = 0, set()
    for ref in mq.layers:
        weight = fp_state[f"{ref.path}.weight"]
        quantized_weights.add(f"{ref.path}.weight")
        option = config[ref.key]
        if option == "fp16":
            total += ref.numel * weight.element_size()
        elif not ref.tied_to:
            method, bits = option.rsplit("-", 1)
            bits, channels = int(bits), ref.channels
            params = {"mse": channels * (4 + 2), "kmeans": channels * 2 ** bits * weight.element_size(),
                      "kmeans_all": 2 ** bits * weight.element_size()}[method]
            total += packed_nbytes(ref.numel, bits) + params
    total += sum(t.numel() * t.element_size() for k, t in fp_state.items() if k not in quantized_weights)
    return total


def test_file_size_is_the_hand_computed_sum(exported):
    sizes = safetensors_bytes(exported["out"] / WEIGHTS_NAME)
    expected = hand_computed_bytes(exported["mq"], exported["config"], exported["fp_state"])
    assert sizes["tensor_data"] == expected
    assert sizes["file"] == sizes["header"] + expected
    info = read_export_info(exported["out"])
    assert info["bytes"]["total"] == expected
    names = sorted(p.name for p in exported["out"].iterdir())
    assert names == ["config.json", "interop.json", INFO_NAME, WEIGHTS_NAME]


def test_loaded_model_holds_no_dense_copy_of_a_quantized_weight(exported):
    packed = exported["packed"]
    info = read_export_info(exported["out"])
    non_persistent = sum(b.numel() * b.element_size() for name, b in packed.named_buffers()
                         if name not in packed.state_dict())
    assert tensor_bytes(packed) == info["bytes"]["total"] + non_persistent
    assert tensor_bytes(packed) < tensor_bytes(exported["simulated"])


# -- ties -----------------------------------------------------------------------------------------------------

def test_tied_copies_are_stored_once_and_share_their_codes(exported):
    if exported["name"] != "dit":
        pytest.skip("DiT holds the tied timestep MLPs")
    packed, config = exported["packed"], exported["config"]
    canonical = packed.transformer_blocks[0].norm1.emb.timestep_embedder
    copy = packed.transformer_blocks[1].norm1.emb.timestep_embedder
    for name in ("linear_1", "linear_2"):
        key = f"model.transformer_blocks.1.norm1.emb.timestep_embedder.{name}.weight_quantizer"
        if config[key] == "fp16":
            continue
        assert getattr(copy, name).parts[0] is getattr(canonical, name).parts[0]
        assert getattr(copy, name).bias is not getattr(canonical, name).bias  # biases stay their own
    with safe_open(str(exported["out"] / WEIGHTS_NAME), framework="pt") as f:
        keys = list(f.keys())
    assert any(k.startswith("transformer_blocks.0.norm1.emb.timestep_embedder.") and ".parts." in k for k in keys)
    assert not any(k.startswith("transformer_blocks.1.norm1.emb.timestep_embedder.") and ".parts." in k for k in keys)


# -- dtypes, in-memory packing ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_pixart_fp16():
    family = get_family("pixart_alpha")
    model = family.build("tiny", seed=2, dtype=torch.float16)
    mq = MultiQuantizer.build(model, family, kmeans_iters=10, show_progress=False)
    return family, model, mq


def test_fp16_export_is_exact_in_fp16_and_keeps_scales_float32(tmp_path, tiny_pixart_fp16):
    family, model, mq = tiny_pixart_fp16
    config = mixed_config(mq.layers)
    export_quantized(model, family, config, mq, tmp_path)
    packed = load_quantized(tmp_path)
    simulated = quantize_(family.build("tiny", seed=2, dtype=torch.float16), config, mq).model
    parts = [m for m in packed.modules() if isinstance(m, PackedWeight)]
    assert {p.method for p in parts} == {"mse", "kmeans", "kmeans_all"}
    for part in parts:
        if part.method == "mse":
            assert part.scale.dtype == torch.float32 and part.zero.dtype == torch.int16
        else:
            assert part.codebook.dtype == torch.float16
    for name, module in packed.named_modules():
        if isinstance(module, PACKED_TYPES):
            assert module.weight.dtype == torch.float16
            assert torch.equal(module.weight, simulated.get_submodule(name).weight), name
    packed.to(torch.float32)  # casting the model never rounds the quantizer parameters
    assert all(p.scale.dtype == torch.float32 for p in parts if p.method == "mse")
    assert all(m.weight.dtype == torch.float32 for m in packed.modules() if isinstance(m, PACKED_TYPES))


def test_batched_decode_switch_attaches_to_the_loaded_denoiser(tmp_path, tiny_pixart_fp16, monkeypatch):
    """kernels.BATCHED_DECODE (QUA2SEDIMO_BATCHED_DECODE, on unless "0"): load_quantized puts the batched decode's
    hooks on the denoiser it returns (=ahead: decoding ahead); off: none."""
    from multiquant import kernels

    family, model, mq = tiny_pixart_fp16
    export_quantized(model, family, sample_random_config(mq.layers, seed=3, index=0), mq, tmp_path)
    monkeypatch.setattr(kernels, "BATCHED_DECODE", False)  # QUA2SEDIMO_BATCHED_DECODE=0
    assert not hasattr(load_quantized(tmp_path), "qua2sedimo_batched_decode")
    monkeypatch.setattr(kernels, "BATCHED_DECODE", True)  # the default
    loaded = load_quantized(tmp_path)
    handle = loaded.qua2sedimo_batched_decode
    assert isinstance(handle, kernels.BatchedDecode) and len(loaded._forward_pre_hooks) == 1 and not handle.ahead
    handle.remove()
    assert not loaded._forward_pre_hooks
    monkeypatch.setattr(kernels, "BATCHED_DECODE_AHEAD", True)  # QUA2SEDIMO_BATCHED_DECODE=ahead
    assert load_quantized(tmp_path).qua2sedimo_batched_decode.ahead
    switches = {v: kernels.batched_decode_switch(v) for v in ("0", "", "1", "ahead", " Ahead ")}
    assert switches == {"0": (False, False), "": (False, False), "1": (True, False), "ahead": (True, True),
                        " Ahead ": (True, True)}


def test_pack_in_place_equals_the_loaded_export(tmp_path, tiny_pixart_fp16):
    family, model, mq = tiny_pixart_fp16
    config = sample_random_config(mq.layers, seed=1, index=0)
    export_quantized(model, family, config, mq, tmp_path)
    loaded = load_quantized(tmp_path)
    in_place = pack_(family.build("tiny", seed=2, dtype=torch.float16), family, config, mq)
    assert tensor_bytes(in_place) == tensor_bytes(loaded)
    inputs = example_inputs(family, loaded, batch=1)
    with torch.no_grad():
        assert torch.equal(denoiser_output(in_place, inputs), denoiser_output(loaded, inputs))


# -- errors ---------------------------------------------------------------------------------------------------

def test_broken_or_foreign_exports_fail_with_the_fix(tmp_path, tiny_pixart_fp16):
    family, model, mq = tiny_pixart_fp16
    with pytest.raises(FileNotFoundError, match="qua2sedimo export"):
        load_quantized(tmp_path / "missing")
    config = sample_random_config(mq.layers, seed=1, index=0)
    with pytest.raises(ConfigError, match="not in the multiquantizer"):
        export_quantized(model, family, dict(config, **{mq.layers[0].key: "mse-2"}), mq, tmp_path / "a")
    other = family.build("tiny", seed=3, dtype=torch.float16)
    with pytest.raises(MultiQuantizerMismatch, match="weights differ"):
        export_quantized(other, family, config, mq, tmp_path / "b")
    first = export_quantized(model, family, config, mq, tmp_path / "c")
    second = export_quantized(model, family, config, mq, tmp_path / "d")
    (first / INFO_NAME).write_text((second / INFO_NAME).read_text())  # weights of one export, info of another
    with pytest.raises(ExportError, match="different exports"):
        load_quantized(first)


def test_export_keeps_the_dtype_of_every_buffer_and_load_check_says_pass_or_fail(tmp_path, capsys):
    """diffusers loads an fp16 model with its non-persistent positional table in float32; the export must
    give back that very model (the scored one) and load-check must say PASS, or FAIL with the reason."""
    from qua2sedimo.cli import main as cli_main
    from multiquant.export import check_export

    family = get_family("mnist_dit")
    fp32 = family.build("tiny", seed=4)
    fp32.save_pretrained(tmp_path / "fp")
    model = type(fp32).from_pretrained(tmp_path / "fp", torch_dtype=torch.float16)
    assert model.pos_embed.pos_embed.dtype == torch.float32 and model.proj_out_2.weight.dtype == torch.float16
    mq = MultiQuantizer.build(model, family, kmeans_iters=5, show_progress=False)
    mq_path = mq.save_pretrained(tmp_path / "mq.safetensors")
    config = sample_random_config(mq.layers, seed=0, index=1)
    export_quantized(model, family, config, mq, tmp_path / "export")
    loaded = load_quantized(tmp_path / "export")
    assert loaded.pos_embed.pos_embed.dtype == torch.float32
    simulated = quantize_(type(fp32).from_pretrained(tmp_path / "fp", torch_dtype=torch.float16), config, mq).model
    report = check_export(tmp_path / "export", simulated=simulated, batch=1)
    assert report["passed"] and report["max_abs_diff_vs_simulated"] == 0.0 and report["dtype_differences"] == []
    # a simulated model whose table was cast differs: FAIL, naming the buffer
    simulated.pos_embed.pos_embed = simulated.pos_embed.pos_embed.half()
    report = check_export(tmp_path / "export", simulated=simulated, batch=1)
    assert not report["passed"] and "pos_embed.pos_embed float32 vs float16" in report["reason"]
    # the command prints the verdict and exits 0 on PASS
    code = cli_main(["load-check", str(tmp_path / "export"), "--compare", "--pretrained", str(tmp_path / "fp"),
                     "--mq", str(mq_path), "--device", "cpu", "--batch", "1"])
    out = capsys.readouterr().out
    assert code == 0 and "PASS: finite output equal to the simulated configuration" in out


def test_infer_renders_with_a_packed_export_of_a_diffusers_family(tmp_path):
    """`infer --export` on a diffusers kind: the adapter loads the pipeline's other parts around the packed
    denoiser (a plain module family is its own generator: tests/test_user_family.py)."""
    from PIL import Image

    from qua2sedimo.cli import main

    mq, export, samples = tmp_path / "mq.safetensors", tmp_path / "export", tmp_path / "samples"
    tiny = ["--model", "mnist_dit", "--tiny", "--device", "cpu"]
    assert main(["multiquantizer", *tiny, "--out", str(mq)]) == 0
    assert main(["export", *tiny, "--uniform", "mse-4", "--mq", str(mq), "--out", str(export)]) == 0
    assert main(["infer", "--export", str(export), "--tiny", "--device", "cpu", "--n_imgs", "2", "--cls_id", "3",
                 "--outdir", str(samples)]) == 0
    pngs = sorted((samples / "export_export").glob("0*.png"))
    assert len(pngs) == 2 and all(Image.open(p).size[0] > 0 for p in pngs)
