"""Scoring configurations end to end on the tiny MNIST DiT: records, resume, torchrun equivalence."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import pytest

from qua2sedimo.cli import main as cli_main
from multiquant.store import load_quant_cache

REPO = Path(__file__).resolve().parents[1]
ARGS = ["--build_mq", "--model", "mnist_dit", "--tiny", "--device", "cpu", "--num_images", "6", "--batch_size", "3"]


@pytest.fixture()
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("QUA2SEDIMO_MULTIQUANTIZERS", str(tmp_path / "mq"))
    from multiquant.paths import constants

    monkeypatch.setattr(constants, "MULTIQUANTIZER_DIR", tmp_path / "mq")
    return tmp_path


def test_eval_random_writes_reference_schema_and_resumes(env, capsys):
    out = env / "run"
    assert cli_main(["eval-random", *ARGS, "--outdir", str(out), "--num_archs", "2"]) == 0
    records = load_quant_cache(out / "quant_cache.pkl")
    assert [r["index"] for r in records] == [0, 1]
    rec = records[0]
    assert list(rec)[:6] == ["config", "quantized_size", "quantized_error", "FID-GT-1k", "avg_bits", "bops"]
    assert isinstance(rec["FID-GT-1k"], np.float64) and np.isfinite(rec["FID-GT-1k"])
    assert rec["architecture"] == "mnist_dit" and rec["seed"] == 42
    option, fp_b, q_b, err = next(iter(rec["config"].values()))
    assert isinstance(option, str) and fp_b > q_b > 0 and err > 0
    assert rec["quantized_size"] == sum(v[2] for v in rec["config"].values())
    assert 0 < rec["psnr_fp"] and 0 < rec["ssim_fp"] <= 1
    # run again with one more configuration: the first two are kept, only the third is scored
    capsys.readouterr()
    assert cli_main(["eval-random", *ARGS, "--outdir", str(out), "--num_archs", "3"]) == 0
    assert "resuming: 2 configuration(s) already scored, 1 to go" in capsys.readouterr().out
    again = load_quant_cache(out / "quant_cache.pkl")
    assert [r["index"] for r in again] == [0, 1, 2]
    assert again[0]["FID-GT-1k"] == rec["FID-GT-1k"]
    # different protocol in the same directory: refused, nothing lost
    capsys.readouterr()
    assert cli_main(["eval-random", *ARGS[:-4], "--num_images", "4", "--outdir", str(out), "--num_archs", "3"]) == 2
    err = capsys.readouterr().err
    assert "different settings (num_images" in err and "Use another output directory" in err
    assert len(err.strip().splitlines()) == 1  # one line naming the problem and the fix
    assert len(load_quant_cache(out / "quant_cache.pkl")) == 3


def test_eval_random_off_a_terminal_prints_per_batch_and_per_configuration_progress(env, capsys, monkeypatch):
    """Piped output (capsys: not a terminal): plain lines with rate and ETA for the image batches of each
    configuration and for the configurations; a resumed run counts only what it scores."""
    monkeypatch.setenv("QUA2SEDIMO_PROGRESS_INTERVAL", "0")
    monkeypatch.delenv("QUA2SEDIMO_PROGRESS", raising=False)
    out = env / "run"
    assert cli_main(["eval-random", *ARGS, "--outdir", str(out), "--num_archs", "2"]) == 0
    err = capsys.readouterr().err.splitlines()
    batches = [line for line in err if line.startswith("  images (6): ")]  # 6 images in batches of 3
    assert any(line.startswith("  images (6): 1/2 (50%)") and " batch/s, ETA " in line for line in batches)
    configs = [line for line in err if line.startswith("scoring configurations: ")]
    assert configs[0].startswith("scoring configurations: 1/2 (50%)") and " config/s, ETA " in configs[0]
    assert configs[-1].startswith("scoring configurations: 2/2 (100%)") and "done in" in configs[-1]
    assert cli_main(["eval-random", *ARGS, "--outdir", str(out), "--num_archs", "3"]) == 0
    configs = [line for line in capsys.readouterr().err.splitlines() if line.startswith("scoring configurations: ")]
    assert configs and all(line.startswith("scoring configurations: 1/1 (100%)") for line in configs)


def test_a_run_shaped_like_the_shipped_dataset_resumes(env, capsys):
    """quant_caches/mnist_dit was written by an older version: its run_meta.json lacks `clip` and it ships only
    quant_cache.pkl (no records/). A tiny run given that shape resumes: only the missing configuration is
    scored, the others are kept as they were; another protocol is still refused."""
    shipped = json.loads((REPO / "quant_caches" / "mnist_dit" / "run_meta.json").read_text())
    out = env / "run"
    assert cli_main(["eval-random", *ARGS, "--outdir", str(out), "--num_archs", "2"]) == 0
    meta = json.loads((out / "run_meta.json").read_text())
    # today's version records every key of the shipped metadata, and two more: clip (None, class-conditioned)
    # and act_bits (None, FP activations)
    assert set(meta) - set(shipped) == {"clip", "act_bits"} and set(shipped) <= set(meta)
    assert meta["clip"] is None and meta["act_bits"] is None
    del meta["clip"], meta["act_bits"]
    (out / "run_meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    shutil.rmtree(out / "records")
    before = load_quant_cache(out / "quant_cache.pkl")
    capsys.readouterr()
    assert cli_main(["eval-random", *ARGS, "--outdir", str(out), "--num_archs", "3"]) == 0
    assert "resuming: 2 configuration(s) already scored, 1 to go" in capsys.readouterr().out
    after = load_quant_cache(out / "quant_cache.pkl")
    assert [r["index"] for r in after] == [0, 1, 2] and after[:2] == before  # timings too: not scored again
    assert json.loads((out / "run_meta.json").read_text()) == meta
    capsys.readouterr()
    assert cli_main(["eval-random", *ARGS, "--image_seed", "7", "--outdir", str(out), "--num_archs", "4"]) == 2
    assert "different settings (image_seed, sampler)" in capsys.readouterr().err
    assert load_quant_cache(out / "quant_cache.pkl") == after


@pytest.mark.slow
def test_a_data_free_smoke_run_of_a_text_family_scores_against_its_fp16_images(env, capsys, monkeypatch):
    """--random_features and no reference images: no error; the label is the FID against this run's FP16 images
    (random features, arbitrary units, not degenerate), the output and run_meta say so."""
    from multiquant.evaluate import SMOKE_REFERENCE
    from multiquant.paths import constants

    monkeypatch.setattr(constants, "COCO_2017_IMAGES", None)
    monkeypatch.delenv("QUA2SEDIMO_COCO_IMAGES", raising=False)
    out = env / "smoke"
    assert cli_main(["eval-configs", "--build_mq", "--model", "pixart_alpha", "--tiny", "--device", "cpu",
                     "--random_features", "--num_images", "2", "--batch_size", "2", "--uniform", "mse-3", "--fp16",
                     "--outdir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "smoke run (--random_features, no reference images)" in printed and "not an image-quality figure" in printed
    records = {r["name"]: r for r in load_quant_cache(out / "quant_cache.pkl")}
    quantized, fp16 = records["uniform_mse-3"], records["fp16"]
    assert quantized["FID-GT-1k"] == quantized["FID-FP-1k"] and fp16["FID-GT-1k"] == pytest.approx(0.0, abs=1e-4)  # eigh noise
    assert quantized["FID-GT-1k"] > 1e-3  # the raw random features gave about 1e-15 for everything
    assert quantized["psnr_fp"] < 100.0 and quantized["ssim_fp"] < 1.0
    meta = json.loads((out / "run_meta.json").read_text())
    assert meta["reference"] == SMOKE_REFERENCE and "random" in meta["feature_net"]


def test_eval_configs_uniform_baselines(env):
    out = env / "given"
    assert cli_main(["eval-configs", *ARGS, "--outdir", str(out), "--uniform", "mse-4,kmeans_all-3", "--fp16"]) == 0
    records = {r["name"]: r for r in load_quant_cache(out / "quant_cache.pkl")}
    assert set(records) == {"uniform_mse-4", "uniform_kmeans_all-3", "fp16"}
    assert records["fp16"]["avg_bits"] == 16.0
    assert records["fp16"]["FID-FP-1k"] == pytest.approx(0.0, abs=1e-3)  # same images; eigh noise only
    assert records["fp16"]["psnr_fp"] == 100.0 and records["fp16"]["ssim_fp"] == pytest.approx(1.0)
    assert records["uniform_kmeans_all-3"]["avg_bits"] < records["uniform_mse-4"]["avg_bits"]


def test_torchrun_two_processes_match_one(env, capsys):
    """The same command under 2 gloo processes gives the same numbers as 1 process, and a 1-process run resumes
    under 2 (world_size is not the run's identity): one process scores configurations 0 and 1; a copy of its
    directory is resumed under torchrun with configuration 2 added, the original in one process; configuration
    2's numbers agree (one torchrun: each extra process start costs seconds of imports on a 2-core CI host)."""
    one, two = env / "run1", env / "run2"
    assert cli_main(["eval-random", *ARGS, "--outdir", str(one), "--num_archs", "2"]) == 0
    shutil.copytree(one, two)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "qua2sedimo.cli", "eval-random", *ARGS, "--outdir", str(two), "--num_archs", "3"]
    environ = dict(os.environ, OMP_NUM_THREADS="1", QUA2SEDIMO_MULTIQUANTIZERS=str(env / "mq"))
    proc = subprocess.run(cmd, cwd=REPO, env=environ, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming: 2 configuration(s) already scored, 1 to go" in proc.stdout, proc.stdout[-2000:]
    capsys.readouterr()
    assert cli_main(["eval-random", *ARGS, "--outdir", str(one), "--num_archs", "3"]) == 0
    assert "resuming: 2 configuration(s) already scored, 1 to go" in capsys.readouterr().out
    results = {n: load_quant_cache(out / "quant_cache.pkl") for n, out in ((1, one), (2, two))}
    assert [r["index"] for r in results[1]] == [r["index"] for r in results[2]] == [0, 1, 2]
    a, b = results[1][2], results[2][2]  # scored by 1 and by 2 processes
    assert a["config"] == b["config"]
    assert float(a["FID-GT-1k"]) == pytest.approx(float(b["FID-GT-1k"]), rel=1e-5)
    assert a["psnr_fp"] == pytest.approx(b["psnr_fp"], rel=1e-6)
    meta = json.loads((two / "run_meta.json").read_text())
    assert meta == json.loads((one / "run_meta.json").read_text())


def test_text_family_records_clip_score_when_a_scorer_is_given(env):
    """Tiny PixArt, a small injected feature network for FID (the CLIP plumbing is what is tested, not Inception)
    and a stand-in CLIP scorer."""
    import dataclasses

    from multiquant.config import sample_random_config
    from multiquant.evaluate import setup_scorer
    from multiquant.families import get_family
    from multiquant.metrics.metric import FeatureFID

    torch.manual_seed(0)
    features = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten(), torch.nn.Linear(48, 6))
    reference = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (8, 3, 32, 32), dtype=np.uint8))
    family = dataclasses.replace(get_family("pixart_alpha"), metric=FeatureFID(features, reference_images=reference))
    scorer, settings = setup_scorer(family, tiny=True, device="cpu", num_images=3, bops=False, build_mq=True,
                                    log=lambda m: None)
    seen = []

    def fake_clip(images, prompts):  # records what the scorer passes; cosine = 0.1 * (condition index + 1)
        seen.append((images.shape, list(prompts)))
        return np.array([0.1 * (p + 1) for p in prompts])

    scorer.clip = fake_clip
    rec = scorer.record(sample_random_config(scorer.mq.layers, 0, 0), index=0)
    assert seen[0][0][0] == 3 and seen[0][1] == [0, 1, 2]
    assert rec["clip_score"] == pytest.approx(0.2)
    assert np.isfinite(rec["FID-GT-1k"])


def test_eval_configs_scores_token_wise_activation_quantization_through_the_scorer(env, capsys):
    """--quant_act --act_bit: the same scorer renders with quantized Linear/Conv inputs; records and the run
    directory say the activation bits, and a directory of A8 results refuses A16 ones."""
    runs = {}
    for act in (None, 8, 6):
        out = env / f"a{act or 16}"
        flags = [] if act is None else ["--quant_act", "--act_bit", str(act)]
        assert cli_main(["eval-configs", *ARGS, "--outdir", str(out), "--uniform", "mse-4", "--fp16", *flags]) == 0
        runs[act] = {r["name"]: r for r in load_quant_cache(out / "quant_cache.pkl")}
        meta = json.loads((out / "run_meta.json").read_text())
        assert meta.get("act_bits") == act and ("act_quant" in meta) == (act is not None)
    assert {r["act_bits"] for act, recs in runs.items() for r in recs.values()} == {16, 8, 6}
    assert all(r["act_bits"] == (act or 16) for act, recs in runs.items() for r in recs.values())
    # FP weights: A16 reproduces the FP reference images exactly; quantized activations change them, 6 bits
    # more than 8 (the proxies compare with fully FP images)
    psnr = {act: runs[act]["fp16"]["psnr_fp"] for act in runs}
    assert psnr[None] == 100.0 and psnr[8] < 100.0 and psnr[6] < psnr[8]
    assert runs[8]["fp16"]["avg_bits"] == 16.0 and runs[8]["uniform_mse-4"]["config"] == runs[None]["uniform_mse-4"]["config"]
    assert "A8" in capsys.readouterr().out
    # one directory never mixes activation settings of one configuration
    assert cli_main(["eval-configs", *ARGS, "--outdir", str(env / "a8"), "--uniform", "mse-4", "--fp16"]) == 2
    assert "different settings (act_bits" in capsys.readouterr().err
    # a run written before act_bits was recorded had FP activations: it resumes as A16, not as A8
    meta_path = env / "a16" / "run_meta.json"
    meta_path.write_text(json.dumps({k: v for k, v in json.loads(meta_path.read_text()).items() if k != "act_bits"}))
    assert cli_main(["eval-configs", *ARGS, "--outdir", str(env / "a16"), "--uniform", "mse-4", "--fp16"]) == 0
    assert "resuming: 2 configuration(s) already scored, 0 to go" in capsys.readouterr().out
    assert cli_main(["eval-configs", *ARGS, "--outdir", str(env / "a16"), "--uniform", "mse-4", "--fp16",
                     "--quant_act"]) == 2


def test_compile_mode_compiles_the_denoiser_in_place_and_is_recorded(env):
    """--compile MODE: the scorer's denoiser is compiled in place (the weight swap copies into its parameters)
    and the run's settings say so, so a directory of compiled results never takes eager ones (compile is lazy:
    nothing is scored here; an eager and a compiled tiny run gave the same FIDs when checked by hand)."""
    from multiquant.evaluate import setup_scorer
    from multiquant.families import get_family

    family = get_family("mnist_dit")
    scorer, settings = setup_scorer(family, tiny=True, device="cpu", num_images=4, build_mq=True,
                                    compile_mode="default", log=lambda msg: None)
    assert settings["compile"] == "default" and scorer.denoiser._compiled_call_impl is not None
    eager, eager_settings = setup_scorer(family, tiny=True, device="cpu", num_images=4, log=lambda msg: None)
    assert "compile" not in eager_settings and eager.denoiser._compiled_call_impl is None
    # an unknown mode is refused by the CLI in one line
    with pytest.raises(SystemExit) as refused:
        cli_main(["eval-configs", *ARGS, "--outdir", str(env / "x"), "--fp16", "--compile", "fast"])
    assert refused.value.code == 2
