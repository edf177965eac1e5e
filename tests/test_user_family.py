"""A plain nn.Module family with its own sampler and metric is scored like the built-in ones."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import module_family as toy
from multiquant.config import sample_random_config, uniform_config
from multiquant.errors import UserError
from multiquant.evaluate import random_configs, score_into_store, setup_scorer
from multiquant.metrics.fid import feature_stats, frechet_distance
from multiquant.seeds import seed_for
from multiquant.sensitivity import run_sensitivity, search_groups, setup_protocol
from multiquant.store import RecordStore, SCHEMA_KEYS


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _scorer(tmp_path, family=toy.FAMILY, **kw):
    return setup_scorer(family, tiny=True, device="cpu", mq_path=tmp_path / f"{family.name}_mq.safetensors",
                        build_mq=True, log=lambda *a: None, **kw)


def test_eval_random_scores_a_module_family_with_its_own_sampler_and_metric(tmp_path):
    scorer, settings = _scorer(tmp_path, batch_size=3)
    assert settings["feature_net"].startswith("PoolFeatures-") and settings["reference"].startswith("images-32-")
    assert settings["sampler"]["pipeline"] is None and settings["sampler"]["sampler"] == "sample"
    store = RecordStore(tmp_path / "run", dict(settings, kind="random"))
    assert score_into_store(scorer, store, random_configs(scorer.mq.layers, 0, 2), log=lambda *a: None) == 2
    records = store.records()
    assert all(k in rec for rec in records for k in SCHEMA_KEYS)
    assert np.isfinite(records[0]["bops"]) and records[0]["bops"] > 0  # MACs from example_inputs

    # the label by hand: the family's sampler at seed_for(42, i), condition i % 4, features, float64 FID
    config = records[1]["config"]
    scorer.applier.apply(config)
    images = toy.sample(scorer.denoiser, [i % 4 for i in range(8)], [seed_for(42, i) for i in range(8)])
    feats = toy.PoolFeatures()(images.float() / 255).double().numpy()
    ref = toy.PoolFeatures()(toy.REFERENCE.float() / 255).double().numpy()
    mu, sigma = feature_stats(feats)
    expected = frechet_distance(mu, sigma, *feature_stats(ref), method="sqrtm")
    assert float(records[1]["FID-GT-1k"]) == pytest.approx(expected, rel=1e-5)


def test_fp_configuration_scores_zero_against_itself_and_quantization_changes_images(tmp_path):
    scorer, _ = _scorer(tmp_path)
    fp = scorer.record(uniform_config(scorer.mq.layers, "fp16"), index=0)
    low = scorer.record(uniform_config(scorer.mq.layers, "mse-3"), index=1)
    assert fp["FID-FP-1k"] == pytest.approx(0.0, abs=1e-6) and fp["psnr_fp"] == 100.0
    assert low["FID-FP-1k"] > 1e-4 and low["psnr_fp"] < 100.0


def test_callable_metric_against_fp_images_is_the_label(tmp_path):
    scorer, settings = _scorer(tmp_path, family=toy.CALLABLE_FAMILY)
    assert settings["metric"] == "mean-abs-diff-vs-fp"
    fp = scorer.record(uniform_config(scorer.mq.layers, "fp16"), index=0)
    rec = scorer.record(uniform_config(scorer.mq.layers, "mse-3"), index=1)
    assert float(fp["FID-GT-1k"]) == 0.0 and "FID-FP-1k" not in rec
    images = scorer.sampler.generate(list(range(8)))  # mse-3 still applied
    expected = (images.double() - scorer.fp["images"].double()).abs().mean().item()
    assert float(rec["FID-GT-1k"]) == pytest.approx(expected, rel=1e-6) and expected > 0


def test_sensitivity_of_a_module_family(tmp_path):
    protocol, settings = setup_protocol(toy.FAMILY, tiny=True, device="cpu", num_prompts=6, log=lambda *a: None)
    report = run_sensitivity(protocol, settings, tmp_path, bits=2, max_layers=3, log=lambda *a: None)
    assert report["num_layers_analysed"] == 3 and settings["feature_net"].startswith("PoolFeatures-")
    assert any(l["raw"]["fid_fp"] > 0 for l in report["layers"])
    assert len(search_groups(protocol.layers)) == report["num_layers_total"]


def test_a_module_family_loads_its_state_dict_from_pt_and_safetensors(tmp_path):
    from safetensors.torch import save_file

    from multiquant.families import FamilySpec

    model = toy.FAMILY.build("full", seed=3)
    torch.save(model.state_dict(), tmp_path / "w.pt")
    save_file(model.state_dict(), str(tmp_path / "w.safetensors"))
    for name in ("w.pt", "w.safetensors"):
        loaded = toy.FAMILY.load(tmp_path / name)
        for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    spec = FamilySpec(name="x", factory=toy.FAMILY.factory, weights=tmp_path / "w.pt", fp_prec=32)
    assert torch.equal(spec.load().conv_in.weight, model.conv_in.weight)
    user = FamilySpec(name="y", fp_prec=32, loader=lambda src, device, dtype: toy.ToyDenoiser(12).to(device, dtype))
    assert isinstance(user.load("anything"), toy.ToyDenoiser)
    torch.save(toy.ToyDenoiser(6).state_dict(), tmp_path / "bad.pt")
    with pytest.raises(UserError, match="does not fit"):
        toy.FAMILY.load(tmp_path / "bad.pt")
    torch.save({"m": toy.ToyDenoiser(6)}, tmp_path / "module.pt")  # a pickled module, not a state dict
    with pytest.raises(UserError, match="weights_only"):
        toy.FAMILY.load(tmp_path / "module.pt")
    with pytest.raises(UserError, match="no default weights"):
        toy.FAMILY.load()


def test_a_module_family_without_a_metric_or_sampler_says_what_to_set(tmp_path):
    from multiquant.families import FamilySpec

    bare = FamilySpec(name="bare", factory=toy.FAMILY.factory, fp_prec=32, num_classes=4, num_images=4,
                      sampler=toy.sample)
    with pytest.raises(UserError, match="gives no metric"):
        _scorer(tmp_path, family=bare)
    nosampler = FamilySpec(name="nos", factory=toy.FAMILY.factory, fp_prec=32, num_classes=4, num_images=4,
                           metric=toy.FAMILY.metric)
    with pytest.raises(UserError, match="without a sampler"):
        _scorer(tmp_path, family=nosampler)


def test_a_module_family_export_loads_without_a_skeleton_and_infers(tmp_path, capsys):
    """export -> load_quantized (structure from the family's factory) == the simulated configuration;
    infer --export and load-check work on it."""
    from multiquant.checkpoint import MultiQuantizer
    from multiquant.config import quantize_
    from multiquant.export import export_quantized, load_quantized, read_export_info
    from qua2sedimo.cli import main

    family = toy.FAMILY
    model = family.build("tiny", seed=5)
    mq = MultiQuantizer.build(model, family, show_progress=False)
    mq.save_pretrained(tmp_path / "mq.safetensors")
    config = sample_random_config(mq.layers, 0, 0)
    out = export_quantized(model, family, config, mq, tmp_path / "export")
    assert read_export_info(out)["module_size"] == "tiny"
    packed = load_quantized(out)
    simulated = quantize_(family.build("tiny", seed=5), config, mq).model
    inputs = toy._example_inputs(simulated, 3)
    with torch.no_grad():
        torch.testing.assert_close(packed(**inputs), simulated(**inputs), rtol=0, atol=1e-6)
    assert main(["infer", "--export", str(out), "--n_imgs", "3", "--outdir", str(tmp_path / "samples"),
                 "--device", "cpu"]) == 0
    assert len(list((tmp_path / "samples" / "export_export").glob("0*.png"))) == 3
    assert main(["load-check", str(out), "--device", "cpu"]) == 0
    assert "PASS" in capsys.readouterr().out


def test_every_command_runs_on_a_module_family(tmp_path, monkeypatch):
    """The toy denoiser through inspect ... load-check, with its own sampler and FeatureFID."""
    from cli_every_command import every_command

    monkeypatch.setenv("QUA2SEDIMO_STATS_CACHE", str(tmp_path / "stats"))
    # tiny layers carry a large per-channel overhead: the smallest achievable average is about 5.4 bits
    family = ["--family", f"{Path(toy.__file__).resolve()}:FAMILY"]  # imported by the CLI from its file
    out = every_command(family, toy.FAMILY.name, tmp_path, budget=8.0)
    assert len(out["records"]) == 6 and {r["architecture"] for r in out["records"]} == {"tests_toy"}
    names = {r["name"]: r for r in out["baselines"]}
    assert names["fp16"]["FID-FP-1k"] == pytest.approx(0.0, abs=1e-6)
    assert names["uniform_kmeans-3"]["FID-FP-1k"] > 1e-6
    layers = out["sensitivity"]["layers"]
    assert len(layers) == 3 and max(l["sensitivity"] for l in layers) == pytest.approx(1.0)
    import json

    dag = json.loads(out["dag"][0].read_text())
    ops = {n["path"]: n["op"] for n in dag["nodes"] if n["kind"] == "layer"}
    assert ops["time_mlp.0"] == "t-Embed" and ops["conv_in"] == "Conv-In" and dag["graph"]["derived_labels"]
    assert (out["report"] / "index.html").exists() or any(out["report"].glob("*.html"))


def test_feature_fid_caches_reference_statistics_by_content(tmp_path):
    """Same features and images: one cached file, same numbers; edited features or images: new statistics."""
    from multiquant.metrics import FeatureFID

    images = torch.randint(0, 256, (20, 1, 8, 8), generator=torch.Generator().manual_seed(3), dtype=torch.uint8)

    def pooled(x):
        return torch.nn.functional.avg_pool2d(x.float() / 255, 2).flatten(1)

    def pooled_more(x):
        return torch.nn.functional.avg_pool2d(x.float() / 255, 4).flatten(1)

    first = FeatureFID(pooled, reference_images=images, cache_dir=tmp_path)
    ref = first.reference()
    feats = pooled(images).double().numpy()
    np.testing.assert_allclose(ref["mu"], feats.mean(0), rtol=1e-12)
    np.testing.assert_allclose(ref["sigma"], np.cov(feats, rowvar=False), rtol=1e-10)
    assert len(list(tmp_path.glob("*.npz"))) == 1
    again = FeatureFID(pooled, reference_images=images.clone(), cache_dir=tmp_path)
    assert again.reference_id == first.reference_id and again.feature_name == first.feature_name
    assert len(list(tmp_path.glob("*.npz"))) == 1  # read back, not recomputed
    other = FeatureFID(pooled_more, reference_images=images, cache_dir=tmp_path)
    assert other.feature_name != first.feature_name and other.reference()["mu"].shape == (4,)
    changed = images.clone()
    changed[0, 0, 0, 0] ^= 1
    assert FeatureFID(pooled, reference_images=changed, cache_dir=tmp_path).reference_id != first.reference_id
    generated = torch.randint(0, 256, (20, 1, 8, 8), generator=torch.Generator().manual_seed(4), dtype=torch.uint8)
    g = pooled(generated).double().numpy()
    from multiquant.metrics.fid import frechet_distance

    expected = frechet_distance(g.mean(0), np.cov(g, rowvar=False), feats.mean(0), np.cov(feats, rowvar=False))
    assert first(generated) == pytest.approx(expected, rel=1e-6)
