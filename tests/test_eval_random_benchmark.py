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
    """A small feature network (3 channels x 2 x 2 pooled) against fresh random reference statistics."""
    features = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten())
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
    fixed = entry["ours"]["apply_s"] + entry["fid_distance_s"]
    assert entry["seconds_per_config_at_protocol"] == pytest.approx(fixed + (ours - fixed) * spec.num_images / 3)
    assert entry["configs_per_hour"] == pytest.approx(3600 / entry["seconds_per_config_at_protocol"])
    assert entry["reference_loop"]["measured_images"] == 2 and entry["speedup"] > 0


def test_a_run_of_some_families_keeps_the_others_already_in_the_file(tmp_path, one_thread):
    import json

    bench = _benchmark()
    earlier = {"families": {"pixart_alpha": {"measured": "earlier"}, "sdv15": {"measured": "earlier"}}}
    (tmp_path / "eval_random.json").write_text(json.dumps(earlier))
    bench.main(["--families", "sdv15", "--num_images", "2", "--batch_size", "2", "--reference_loop", "",
                "--out", str(tmp_path)], metric=_small_metric())
    families = json.loads((tmp_path / "eval_random.json").read_text())["families"]
    assert families["pixart_alpha"] == {"measured": "earlier"} and families["sdv15"]["measured"] != "earlier"
    assert families["sdv15"]["images_per_config"] == 2
