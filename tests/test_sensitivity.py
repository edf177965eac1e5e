"""Per-layer sensitivity: normalisation, bands, fake quantization, and a resumable run on a tiny model."""
from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch

from multiquant.families import get_family
from multiquant.layers import quantizable_layers
from multiquant.sensitivity import (PROXY_NAME, add_parsers, band_of, build_report, combine_sensitivity,
                                    fake_quantize, min_max_normalise, quantized_weights, report_path,
                                    run_sensitivity, search_groups, setup_protocol, shuffled_subset)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# ------------------------------------------------------------------------------ normalisation, bands
def test_min_max_normalise():
    np.testing.assert_allclose(min_max_normalise([2.0, 4.0, 3.0]), [0.0, 1.0, 0.5])
    np.testing.assert_allclose(min_max_normalise([-1.0, 1.0]), [0.0, 1.0])  # a CLIP score may even improve
    np.testing.assert_array_equal(min_max_normalise([0.3, 0.3, 0.3]), [0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="NaN"):
        min_max_normalise([1.0, float("nan")])


def test_combined_score_weights_fid_60_and_the_second_metric_40():
    scores = combine_sensitivity([0.0, 10.0, 5.0], [1.0, 0.0, 0.5])
    np.testing.assert_allclose(scores, [0.4, 0.6, 0.5])
    both_max = combine_sensitivity([0.0, 1.0], [0.0, 2.0])
    np.testing.assert_allclose(both_max, [0.0, 1.0])


@pytest.mark.parametrize("score, band", [(0.0, "low"), (0.1999, "low"), (0.2, "medium"), (0.4999, "medium"),
                                         (0.5, "high"), (0.7999, "high"), (0.8, "critical"), (1.0, "critical")])
def test_bands(score, band):
    assert band_of(score) == band


def test_shuffled_subset_is_reproducible_and_without_repeats():
    pool = list(range(1000))
    a, b, c = shuffled_subset(pool, 100, 42), shuffled_subset(pool, 100, 42), shuffled_subset(pool, 100, 7)
    assert a == b and a != c and len(set(a)) == 100
    with pytest.raises(ValueError):
        shuffled_subset(pool, 1, 0)
    with pytest.raises(ValueError):
        shuffled_subset(pool, 1001, 0)


def test_report_names_clip_or_the_proxy():
    recs = [{"key": f"k{i}", "fid_fp": f, "one_minus_ssim": p, "clip_drop": c}
            for i, (f, p, c) in enumerate([(1.0, 0.1, 0.0), (3.0, 0.3, 0.02), (2.0, 0.2, 0.01)])]
    proxy = build_report(recs, {"second_metric": PROXY_NAME})
    assert proxy["metrics"]["second"] == {"key": "one_minus_ssim", "name": PROXY_NAME, "is_proxy": True, "weight": 0.4}
    clip = build_report(recs, {"second_metric": "CLIP drop (clip:vit, raw cosine)"})
    assert clip["metrics"]["second"]["key"] == "clip_drop" and not clip["metrics"]["second"]["is_proxy"]
    assert [l["rank"] for l in clip["layers"]] == [3, 1, 2] and clip["ranking"] == ["k1", "k2", "k0"]
    assert [l["band"] for l in clip["layers"]] == ["low", "critical", "high"]


# ------------------------------------------------------------------------------------ fake quantization
def test_fake_quantize_keeps_shape_and_dtype_and_16_bits_is_fp16_rounding():
    w = torch.randn(8, 4, 3, 3)
    for bits in (2, 4, 8):
        w_hat, err = fake_quantize(w, "mse", bits)
        assert w_hat.shape == w.shape and w_hat.dtype == w.dtype
    errors = [fake_quantize(w, "mse", b)[1] for b in (2, 4, 8)]
    assert errors[0] > errors[1] > errors[2] > 0
    w16, err16 = fake_quantize(w, "anything", 16)
    torch.testing.assert_close(w16, w.half().float(), rtol=0, atol=0)
    assert 0 < err16 < errors[2]
    assert len(torch.unique(fake_quantize(w, "kmeans_all", 3)[0])) <= 8


def test_quantized_weights_restore_the_fp_weights_even_on_errors():
    family = get_family("mnist_dit")
    model = family.build("tiny")
    layers = quantizable_layers(model, family)
    before = {r.key: r.weight(model).clone() for r in layers}
    ref = layers[3]
    with pytest.raises(RuntimeError):
        with quantized_weights(model, [(ref, torch.zeros(ref.shape))]):
            assert float(ref.weight(model).detach().abs().sum()) == 0
            raise RuntimeError("boom")
    for r in layers:
        torch.testing.assert_close(r.weight(model), before[r.key], rtol=0, atol=0)


def test_search_groups_put_tied_copies_behind_their_canonical_layer():
    family = get_family("mnist_dit")
    layers = quantizable_layers(family.build("tiny"), family)
    groups = search_groups(layers)
    assert sum(len(g) for g in groups) == len(layers)
    tied = [g for g in groups if len(g) > 1]
    assert tied and all(g[0].tied_to is None and all(r.tied_to == g[0].key for r in g[1:]) for g in tied)


# ------------------------------------------------------------------------------- end to end, resumable
def _protocol(**kw):
    kw = {"tiny": True, "device": "cpu", "num_prompts": 6, "pixel_features": True, "log": lambda *a: None} | kw
    return setup_protocol(get_family("mnist_dit"), **kw)


def test_tiny_run_is_resumable_and_writes_the_report(tmp_path):
    protocol, settings = _protocol()
    first = run_sensitivity(protocol, settings, tmp_path, bits=3, max_layers=4, log=lambda *a: None)
    assert first["num_layers_analysed"] == 4

    measured = []
    original = protocol.measure
    protocol.measure = lambda assignment: measured.append(assignment) or original(assignment)
    report = run_sensitivity(protocol, settings, tmp_path, bits=3, log=lambda *a: None)
    groups = search_groups(protocol.layers)
    assert len(measured) == len(groups) - 4  # the first four came from the records
    assert report["num_layers_analysed"] == report["num_layers_total"] == len(groups)

    on_disk = json.loads(report_path(tmp_path, "mnist_dit", 3, tiny=True).read_text())
    assert on_disk["settings"]["method"] == "mse" and on_disk["settings"]["bits"] == 3
    assert on_disk["settings"]["prompt_seed"] == 42 and on_disk["metrics"]["second"]["name"] == PROXY_NAME
    scores = np.array([l["sensitivity"] for l in on_disk["layers"]])
    assert scores.min() >= 0 and scores.max() <= 1 and scores.max() > 0.6
    assert {l["band"] for l in on_disk["layers"]} <= {"low", "medium", "high", "critical"}
    assert all(l["raw"]["fid_fp"] >= 0 and 0 < l["raw"]["ssim_fp"] <= 1 for l in on_disk["layers"])
    assert any(l["raw"]["fid_fp"] > 0 for l in on_disk["layers"])  # one quantized layer does change images
    tied = [l for l in on_disk["layers"] if l["tied_keys"]]
    assert tied and all(l["numel"] == (1 + len(l["tied_keys"])) * np.prod(l["shape"]) for l in tied)


def test_same_seeds_give_the_same_measurement_and_a_new_prompt_seed_new_prompts():
    protocol, _ = _protocol()
    again, _ = _protocol()
    other, settings = _protocol(prompt_seed=3)
    key = search_groups(protocol.layers)[-1][0].key  # the output projection
    a, b = protocol.measure({key: ("mse", 3)}), again.measure({key: ("mse", 3)})
    assert a["fid_fp"] == b["fid_fp"] and a["ssim_fp"] == b["ssim_fp"]
    assert protocol.sampler.conditions != other.sampler.conditions and settings["prompt_seed"] == 3


def test_clip_drop_replaces_the_proxy_when_a_clip_scorer_exists():
    protocol, _ = _protocol(num_prompts=4)

    class FakeClip:  # scores an image by its mean brightness: enough to see the plumbing
        name = "clip:fake"

        def __call__(self, images, prompts):
            assert prompts == protocol.prompts and len(prompts) == len(images)
            return images.double().mean(dim=(1, 2, 3)).numpy() / 255

    protocol.prompts = [f"a photo of the digit {c}" for c in protocol.sampler.conditions]
    protocol.clip = FakeClip()
    key = search_groups(protocol.layers)[-1][0].key
    out = protocol.measure({key: ("mse", 2)})
    assert out["clip_drop"] == pytest.approx(protocol.fp["clip"] - out["clip"])
    assert protocol.second_metric == "clip_drop" and "clip:fake" in protocol.second_metric_name


def test_cli_parsers_register_the_three_commands():
    parser = argparse.ArgumentParser()
    add_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["sensitivity", "--model", "mnist_dit", "--tiny"])
    assert args.sensitivity_bits == 4 and args.num_prompts == 100 and args.prompt_seed == 42
    assert args.method == "mse" and callable(args.func)
    assert callable(parser.parse_args(["flops", "--model", "dit"]).func)
    args = parser.parse_args(["optimize-mixed-precision", "--sensitivity_file", "s.json", "--budget_multiplier", "0.5"])
    assert args.solver == "greedy" and callable(args.func)
    # no budget: the document's default multiplier 0.5 applies when the command runs; only one form of it
    assert parser.parse_args(["optimize-mixed-precision", "--sensitivity_file", "s.json"]).budget_multiplier is None
    with pytest.raises(SystemExit):
        parser.parse_args(["optimize-mixed-precision", "--sensitivity_file", "s.json", "--budget_multiplier", "0.5",
                           "--budget_bits", "4"])


def test_cli_measures_several_methods_and_the_allocator_picks_each_layers_method(tmp_path, capsys):
    from qua2sedimo.cli import main

    base = ["sensitivity", "--model", "mnist_dit", "--tiny", "--device", "cpu", "--pixel_features", "--num_prompts",
            "4", "--max_layers", "3", "--sensitivity_bits", "3", "--outdir", str(tmp_path)]
    assert main(base + ["--method", "mse,kmeans_all"]) == 0
    files = [report_path(tmp_path, "mnist_dit", 3, m, tiny=True) for m in ("mse", "kmeans_all")]
    assert all(f.is_file() for f in files)
    assert json.loads(files[1].read_text())["settings"]["method"] == "kmeans_all"
    assert "optimize-mixed-precision --sensitivity_file" in capsys.readouterr().out
    # told nothing else, the allocator chooses among the measured methods per layer (from the measurements)
    alloc = ["optimize-mixed-precision", "--sensitivity_file", *map(str, files), "--unmeasured", "lowest",
             "--outdir", str(tmp_path / "alloc"), "--quiet", "--budget_bits"]
    assert main(alloc + ["1"]) == 2  # tiny layers: the overhead alone is more than 1 bit
    assert "below the cheapest allocation" in (err := capsys.readouterr().err) and "avg bits" in err
    assert main(alloc + ["8"]) == 0
    report = json.loads((tmp_path / "alloc" / "quantization_config_8bits_per_layer_method.json").read_text())
    assert report["metadata"]["method"] == "per layer, from measurement"
    assert report["metadata"]["methods"] == ["mse", "kmeans_all"]
    assert set(report["method_allocation"].values()) <= {"mse", "kmeans_all"}
    assert main(base + ["--method", "mse,uaq"]) == 2
    assert "--method must be one of" in capsys.readouterr().err
