"""benchmarks/eval_random.py's per-family measurement on a tiny family, on the CPU: every figure is there and the
figures agree with each other and with the family's protocol."""
from __future__ import annotations


import numpy as np
import pytest
import torch
from torch import nn

from multiquant.families import get_family
from multiquant.flops import flops_table
from multiquant.metrics import FeatureFID
from multiquant.metrics.fid import feature_stats
from benchmark_script import load_benchmark



def _benchmark():
    return load_benchmark("eval_random")


def _small_metric() -> FeatureFID:
    """A small feature network (3 channels x 2 x 2 pooled, chunks of 2 images) against fresh random reference
    statistics."""
    from multiquant.metrics.features import ModuleFeatures

    features = ModuleFeatures(nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten()), name="pool2", batch_size=2)
    return FeatureFID(features, reference_stats=feature_stats(np.random.default_rng(7).standard_normal((50, 12))))


def test_measure_family_tiny_pixart_alpha(one_thread):
    bench = _benchmark()
    metric = _small_metric()
    args = bench.parse_args(["--num_images", "3", "--batch_size", "2", "--ref_images", "2", "--peak_tflops", "2.5"])
    entry = bench.measure_family("pixart_alpha", args, metric, torch.device("cpu"))
    spec = get_family("pixart_alpha")

    assert entry["architecture"] == "tiny" and entry["images_per_config"] == 3 and entry["batch_size"] == 2
    settings = entry["settings"]
    assert (settings["steps"], settings["guidance"]) == (spec.steps, spec.guidance)
    assert entry["text_tokens"] == {"prompt_embeds": spec.text_tokens} and entry["protocol_images"] == spec.num_images
    ours, floor = entry["seconds_per_config"], entry["floor_seconds_per_config"]
    assert floor > 0 and ours > 0  # wall times: only their arithmetic below is checked, never their order
    assert entry["overhead_fraction"] == pytest.approx((ours - floor) / ours)
    sampling = entry["sampling_seconds_per_config"]
    assert entry["overhead_fraction_vs_sampling"] == pytest.approx((ours - sampling) / ours)
    # 3 images x 20 DPM-Solver timesteps x 2 (classifier-free guidance), at the tiny model's MACs
    assert entry["forwards_per_config"] == 3 * 20 * 2
    table = flops_table("pixart_alpha", tiny=True, resolution=settings["resolution"])
    macs = table["total_layer_macs"] + table["total_other_macs"]
    assert entry["macs_per_forward"] == macs > 0
    assert entry["achieved_tflops"] == pytest.approx(2 * macs * 120 / floor / 1e12)
    assert entry["floor_peak_fraction"] == pytest.approx(entry["achieved_tflops"] / 2.5)
    # 3 images in batches of 2 and the feature chunk of 2: the first chunk went to the worker before the last batch,
    # so the feature pass's tail after it is a fixed cost beside the weight swap and the distance
    assert entry["feature_chunks_overlapped"] == 1 and entry["features_tail_s"] == entry["ours"]["features_tail_s"]
    fixed = entry["ours"]["apply_s"] + entry["fid_distance_s"] + entry["features_tail_s"]
    assert entry["fixed_seconds_per_config"] == pytest.approx(fixed)
    assert entry["seconds_per_config_at_protocol"] == pytest.approx(fixed + (ours - fixed) * spec.num_images / 3)
    assert entry["generate_overhead_s"] == pytest.approx(entry["generate_s"] - sampling)
    assert entry["generate_s"] == entry["ours"]["generate_s"] and entry["metrics_s"] == entry["ours"]["metrics_s"]
    assert entry["configs_per_hour"] == pytest.approx(3600 / entry["seconds_per_config_at_protocol"])
    assert entry["reference_loop"]["measured_images"] == 2 and entry["speedup"] > 0


def test_a_run_of_some_families_keeps_the_others_already_in_the_file(tmp_path, one_thread):
    import json

    bench = _benchmark()
    earlier = {"families": {"pixart_alpha": {"measured": "earlier"}, "sdv15": {"measured": "earlier"}},
               "fid_distance_s": -1.0, "fid_seconds_per_config": 0.4}
    (tmp_path / "eval_random.json").write_text(json.dumps(earlier))
    bench.main(["--families", "sdv15", "--num_images", "2", "--batch_size", "2", "--reference_loop", "",
                "--out", str(tmp_path)], metric=_small_metric())
    families = json.loads((tmp_path / "eval_random.json").read_text())["families"]
    result = json.loads((tmp_path / "eval_random.json").read_text())
    assert families["pixart_alpha"] == {"measured": "earlier"} and families["sdv15"]["measured"] != "earlier"
    assert families["sdv15"]["images_per_config"] == 2
    assert families["sdv15"]["previous_run"] == {"measured": "earlier"}  # the entry it replaced, beside it
    # merged by other runs: kept; written by this run (the headline family's, absent here): not the stale one
    assert result["fid_seconds_per_config"] == 0.4 and result["fid_distance_s"] is None


def test_kernel_breakdown_shares_and_rates_hand_computed():
    bench = _benchmark()
    kernels = [("nvjet_hsh_256x128_2x1_v_bz_coopA_NNT", 300.0), ("sm90_xmma_gemm_f16f16_f16f32", 100.0),
               ("pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<96, 128>>", 150.0),
               ("fmha_cutlassF_f16_aligned_64x64_rf_sm80", 50.0), ("triton_poi_fused_add_mul_0", 250.0),
               ("triton_red_fused_native_layer_norm_1", 100.0), ("Memcpy HtoD (Pageable -> Device)", 50.0),
               ("nvjet_hsh_256x128_2x1_v_bz_coopA_NNT", 100.0)]
    got = bench.kernel_breakdown(kernels, gemm_flops=5e8, attention_flops=2e8)
    kinds = {name: bench.kernel_kind(name) for name in (
        "triton_poi_fused__scaled_dot_product_flash_attention_clone_2", "triton_tem_fused_addmm_gelu_3",
        "cudnn_generated_fort_native_sdpa_sm90_knob_7_64x128x64", "sm90_xmma_fprop_implicit_gemm_f16f16",
        "void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>", "gemv2T_kernel_val")}
    assert list(kinds.values()) == ["other", "gemm", "attention", "gemm", "other", "gemm"]
    assert got["gpu_seconds"] == pytest.approx(1.1e-3)
    assert (got["gemm_seconds"], got["attention_seconds"], got["other_seconds"]) == pytest.approx((5e-4, 2e-4, 4e-4))
    assert got["gemm_share"] == pytest.approx(5 / 11) and got["attention_share"] == pytest.approx(2 / 11)
    assert got["gemm_tflops"] == pytest.approx(5e8 / 5e-4 / 1e12) and got["attention_tflops"] == pytest.approx(1.0)
    assert got["top_kernels"][0] == {"name": "nvjet_hsh_256x128_2x1_v_bz_coopA_NNT", "seconds": pytest.approx(4e-4),
                                     "share": pytest.approx(4 / 11)}


def test_generation_options_per_family_floor_stages_side_by_side(one_thread, monkeypatch):
    """--dtype / --channels_last per family: the eager floor in the family's precision first, then one stage per
    option, applied through the scoring path; the last stage is the floor of every other figure (tiny SD1.5 at
    3 steps)."""
    import dataclasses

    bench = _benchmark()
    registered = bench.get_family
    monkeypatch.setattr(bench, "get_family", lambda name: dataclasses.replace(registered(name), steps=3))
    args = bench.parse_args(["--num_images", "2", "--batch_size", "sdv15=2,pixart_alpha=3", "--dtype", "sdv15=float16",
                             "--channels_last", "sdv15,sdxl", "--peak_tflops", "2.5", "--reference_loop", ""])
    assert not bench.options_of(args, "pixart_alpha") and bench.family_value(args.batch_size, "pixart_alpha", int) == 3
    assert bench.options_of(args, "sdxl") == bench.GenerationOptions(channels_last=True)
    entry = bench.measure_family("sdv15", args, _small_metric(), torch.device("cpu"))
    assert (entry["dtype"], entry["channels_last"], entry["compile"]) == ("float16", True, None)
    assert entry["settings"]["dtype"] == "float16" and entry["batch_size"] == 2
    assert entry["generation_settings"] == {"dtype": "float16", "channels_last": True}
    stages = entry["floor_stages"]
    assert [s["options"] for s in stages] == [{}, {"dtype": "float16"}, {"dtype": "float16", "channels_last": True}]
    assert entry["floor_seconds_per_config_eager"] == stages[0]["floor_seconds"]
    assert stages[-1]["floor_seconds"] == entry["floor_seconds_per_config"]
    macs, forwards = entry["macs_per_forward"], entry["forwards_per_config"]
    from multiquant.adapters.diffusers.loading import tiny_scheduler

    timesteps = bench.timesteps_for(tiny_scheduler("sdv15"), 3, "cpu")  # PNDM's PLMS: 4 timesteps for 3 steps
    assert forwards == 2 * len(timesteps) * 2  # images x timesteps x classifier-free guidance
    for stage in stages:
        assert stage["achieved_tflops"] == pytest.approx(2 * macs * forwards / stage["floor_seconds"] / 1e12)
        assert stage["floor_peak_fraction"] == pytest.approx(stage["achieved_tflops"] / 2.5)
    assert entry["floor_speedup_vs_eager"] == pytest.approx(stages[0]["floor_seconds"] / stages[-1]["floor_seconds"])
    assert entry["achieved_tflops_eager"] == stages[0]["achieved_tflops"]


@pytest.mark.parametrize("flags", [["--dtype", "sdv15=float8"], ["--compile", "fast"], ["--batch_size", "sdv15=0"],
                                   ["--dtype", "sdv15=float16,bfloat16"], ["--scaling_only", "--channels_last"]])
def test_malformed_generation_options_are_refused_before_measuring(flags):
    with pytest.raises(SystemExit) as refused:
        _benchmark().parse_args(flags)
    assert refused.value.code == 2


def test_summary_headline_overhead_is_beside_the_sampling_floor():
    """The top-level overhead_fraction the issue's check reads is the headline family's overhead beside the
    sampling floor at the protocol; the one beside the bare denoiser stays under its own name."""
    bench = _benchmark()
    args = bench.parse_args([])
    head = {"overhead_fraction": 0.146, "overhead_fraction_vs_sampling_at_protocol": 0.0089, "floor_peak_fraction": 0.457}
    summary = bench.summarize(args, [bench.HEADLINE], {bench.HEADLINE: head}, {})
    assert summary["overhead_fraction"] == 0.0089 and summary["overhead_fraction_vs_denoiser"] == 0.146
    assert summary["floor_peak_fraction"] == 0.457 and summary["headline_family"] == bench.HEADLINE
