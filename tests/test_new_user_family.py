"""A denoiser nobody on the team wrote (tests/shared_weights_family.py: unconditional RGB, a depthwise conv called
twice, Conv1d, matmul attention, Linear(1, C) / Linear(C, 1), its own sampler and callable metric) through every
command, and the mistakes a new user makes with it: each one line, exit code 2, no traceback."""
from __future__ import annotations

import json
import re
from pathlib import Path

from types import SimpleNamespace

import networkx as nx
import numpy as np
import pytest
import torch

import shared_weights_family as fam
from cli_every_command import every_command

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

FILE = Path(fam.__file__).resolve()
FAMILY = ["--family", f"{FILE}:FAMILY"]


def _error_line(capsys, argv) -> str:
    """Run the CLI; it must exit 2 with one ``error:`` line and no traceback. Returns the line."""
    from qua2sedimo.cli import main

    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_a_layer_called_twice_is_one_layer_node_and_its_later_call_a_reuse_node(tmp_path):
    from autobuild.dag import build_dag
    from autobuild.dag.render import render_dag
    from autobuild.dag.trace import REUSE_OP

    model = fam.FAMILY.build("tiny")
    graph = build_dag(model, fam.FAMILY)
    assert nx.is_directed_acyclic_graph(graph)
    layers = [n for n, a in graph.nodes(data=True) if a["kind"] == "layer"]
    assert sorted(layers) == sorted(f"model.{p}.weight_quantizer" for p in
                                    ("stem", "t_in", "t_hidden", "dw", "pw", "qkv", "attn_out", "seq", "gate", "head"))
    reuse = [n for n, a in graph.nodes(data=True) if a["op"] == REUSE_OP]
    assert len(reuse) == 1 and graph.nodes[reuse[0]]["path"] == "dw"
    dw = "model.dw.weight_quantizer"
    # the first call reads the normalised stem + time sum; the second call reads the residual add after pw, and
    # its output (not the first call's) feeds the attention
    preds = set(graph.predecessors(reuse[0]))
    assert dw in preds and len(preds) == 2
    (second_input,) = preds - {dw}
    assert graph.nodes[second_input]["op"] == "add" and "model.pw.weight_quantizer" in nx.ancestors(graph, second_input)
    assert nx.has_path(graph, reuse[0], "model.qkv.weight_quantizer")
    assert "model.qkv.weight_quantizer" not in set(graph.successors(dw))
    # reshape_as(z) / zeros_like(x) lend only a shape: the head reads the gated tokens alone, not z again
    (gated,) = graph.predecessors("model.head.weight_quantizer")
    assert set(graph.predecessors(gated)) == {"model.gate.weight_quantizer", "model:add2"}
    render_dag(graph, tmp_path / "dag.png")
    assert (tmp_path / "dag.png").stat().st_size > 0


def test_every_command_runs_on_a_shared_weights_rgb_family(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("QUA2SEDIMO_STATS_CACHE", str(tmp_path / "stats"))
    out = every_command(FAMILY, fam.FAMILY.name, tmp_path, cls_id=None, budget=8.0)
    captured = capsys.readouterr()
    printed = captured.out
    assert "warning: the target '-1*FID-GT-1k - avg_bits*150' ranks these configurations as avg_bits" in captured.err
    # the label is the family's metric, and the commands call it by its name (it is no FID)
    assert "avg_bits 32.000  colour-distance " in printed and " FID " not in printed
    assert "colour-distance increase over FP" in printed  # the one-layer sweep's measurement
    page = (out["report"] / "index.html").read_text()
    assert "<h2>Measured colour-distance vs average bits</h2>" in page
    records = out["records"]
    assert len(records) == 6 and all(np.isfinite(float(r["FID-GT-1k"])) for r in records)
    baselines = {r["name"]: r for r in out["baselines"]}
    # the label is the family's own metric, recomputed here from the FP images
    model = fam.FAMILY.build("tiny")
    from multiquant.seeds import seed_for

    images = fam.ddim(model, [None] * 8, [seed_for(42, i) for i in range(8)])
    assert float(baselines["fp16"]["FID-GT-1k"]) == pytest.approx(fam.colour_distance(images), rel=1e-6)
    dag = json.loads(out["dag"][0].read_text())
    assert sum(n["op"] == "reuse" for n in dag["nodes"]) == 1
    assert len(list(out["samples"].rglob("*.png"))) >= 4 and (out["report"] / "index.html").exists()
    # a front without --budgets: the paper's 3.3-4.2 priced with this model's tables (all of it costs 6+ bits)
    from autobuild.configs import DEFAULT_PARETO_BUDGETS, default_budgets
    from qua2sedimo.cli import main

    mq = tmp_path / "mq" / f"{fam.FAMILY.name}_tiny_mq.safetensors"
    assert main([str(a) for a in ["build-config", *FAMILY, "--predictor", tmp_path / "predictor", "--mq", mq,
                                  "--size", "tiny", "--pareto", "--out", tmp_path / "front"]]) == 0
    front = json.loads((tmp_path / "front" / f"{fam.FAMILY.name}_pareto_block.json").read_text())["front"]
    expected = default_budgets(mq, DEFAULT_PARETO_BUDGETS)[0]
    assert [p["budget"] for p in front] == expected and expected[0] > 6 and len(expected) == 10
    assert "budgets 7.4, 7.79, " in capsys.readouterr().out


def test_a_model_without_quantizable_layers_is_one_clear_error(capsys, tmp_path):
    from multiquant.errors import UserError
    from multiquant.layers import quantizable_layers

    with pytest.raises(UserError, match="no quantizable layer"):
        quantizable_layers(fam.NO_LAYERS.build("tiny"), fam.NO_LAYERS)
    bare = ["--family", f"{FILE}:NO_LAYERS", "--tiny", "--device", "cpu"]
    for argv in (["multiquantizer", *bare, "--out", tmp_path / "mq.safetensors"],
                 ["eval-random", *bare, "--build_mq", "--mq", tmp_path / "mq2.safetensors", "--outdir", tmp_path / "r",
                  "--num_archs", 1], ["dag", *bare[:2], "--out", tmp_path / "dag"]):
        assert "no quantizable layer" in _error_line(capsys, argv)
    assert not (tmp_path / "mq.safetensors").exists()


def test_infer_refuses_what_a_module_family_cannot_take(capsys, tmp_path):
    """Its sampler fixes steps / resolution / guidance, and it has no classes: those flags were silently dropped."""
    tiny = ["infer", *FAMILY, "--tiny", "--device", "cpu", "--n_imgs", 1, "--outdir", tmp_path]
    assert "--steps 9 does not apply" in _error_line(capsys, [*tiny, "--steps", 9])
    assert "--res 16, --guidance 2.0 does not apply" in _error_line(capsys, [*tiny, "--res", 16, "--guidance", 2])
    assert "has no classes" in _error_line(capsys, [*tiny, "--cls_id", 1])
    import module_family

    toy = ["infer", "--family", f"{Path(module_family.__file__).resolve()}:FAMILY", "--tiny", "--device", "cpu"]
    assert "has classes 0..3" in _error_line(capsys, [*toy, "--cls_id", 4, "--outdir", tmp_path])


def test_a_missing_multiquantizer_names_the_family_as_the_user_did(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no multiquantizers/ here
    line = _error_line(capsys, ["eval-random", *FAMILY, "--tiny", "--outdir", tmp_path / "r", "--num_archs", 1])
    assert f"`qua2sedimo multiquantizer --family {FILE}:FAMILY --tiny`" in line  # not --model, which cannot find it


def test_family_spec_mistakes_name_what_the_file_defines(capsys, tmp_path):
    assert "name the attribute" in (line := _error_line(capsys, ["inspect", "--family", str(FILE)]))
    assert f"{FILE}:FAMILY" in line and "it defines FAMILY, LOADER_FAMILY, NO_LAYERS" in line
    line = _error_line(capsys, ["inspect", "--family", f"{FILE}:FAMILYY"])
    assert "no attribute 'FAMILYY'" in line and "it defines FAMILY, LOADER_FAMILY, NO_LAYERS" in line
    assert "no file" in _error_line(capsys, ["inspect", "--family", f"{tmp_path / 'nope.py'}:FAMILY"])


def test_the_allocator_on_a_user_family_says_how_to_name_it(capsys, tmp_path):
    """optimize-mixed-precision reads the family from the sensitivity file; a user family is only known in a
    process that imported it: without --family (a fresh shell) one clear line, with it the allocation."""
    from multiquant.families import _REGISTRY
    from qua2sedimo.cli import main

    tiny = [*FAMILY, "--tiny", "--device", "cpu"]
    assert main([str(a) for a in ["sensitivity", *tiny, "--sensitivity_bits", 3, "--num_prompts", 4, "--max_layers",
                                  3, "--outdir", tmp_path / "sens", "--method", "mse,kmeans"]]) == 0
    # the follow-up command it suggests names the family, as a fresh shell needs it
    assert f"optimize-mixed-precision --family {FILE}:FAMILY --sensitivity_file" in capsys.readouterr().out
    sens = tmp_path / "sens" / f"sensitivity_analysis_{fam.FAMILY.name}_tiny_3bit.json"
    assert json.loads(sens.read_text())["metrics"]["fid"]["name"].startswith("colour-distance increase over FP")
    capsys.readouterr()
    _REGISTRY.pop(fam.FAMILY.name)  # what a new process knows about the user's family: nothing
    argv = ["optimize-mixed-precision", "--sensitivity_file", sens, "--budget_multiplier", 0.9, "--unmeasured",
            "lowest", "--out", tmp_path / "alloc"]
    line = _error_line(capsys, argv)
    assert fam.FAMILY.name in line and "--family" in line and "--flops_file" in line
    assert main([str(a) for a in [*argv, *FAMILY]]) == 0
    assert list((tmp_path / "alloc").glob("quantization_config_*.json"))


def test_a_target_ranked_by_its_bits_term_alone_is_flagged_and_not_trusted_as_quality():
    """A user's metric of a few units under the default '-1*FID-GT-1k - avg_bits*150': the target ranks as avg_bits
    does, the predictor's 1.0 says nothing about quality; the report compares models on the learned part."""
    from autobuild.train import known_term_warning, learned_validation

    metrics = {"target": "-1*FID-GT-1k - avg_bits*150", "srcc_mean": 1.0,
               "learned": {"key": "FID-GT-1k", "known": ["avg_bits"], "learned": "log(FID-GT-1k)"},
               "folds": [{"learned_srcc": 0.3}, {"learned_srcc": 0.5}],
               "baselines": {"avg_bits": {"srcc_mean": 0.995}}}
    assert learned_validation(metrics) == (pytest.approx(0.4), "log(FID-GT-1k) (the target's learned part)")
    warning = known_term_warning(metrics)
    assert warning.startswith("warning: ") and "avg_bits baseline 0.995" in warning and "0.400" in warning
    assert "--target '-1*FID-GT-1k'" in warning
    assert known_term_warning(dict(metrics, baselines={"avg_bits": {"srcc_mean": 0.8}})) is None  # quality matters
    quality_only = dict(metrics, target="-1*FID-GT-1k", learned={"key": "FID-GT-1k", "known": [], "learned": "x"})
    assert learned_validation(quality_only) == (1.0, "-1*FID-GT-1k") and known_term_warning(quality_only) is None


def test_optimize_runs_on_the_family_and_a_fresh_run_resumes_nothing(tmp_path, capsys):
    from qua2sedimo.cli import main

    argv = ["optimize", *FAMILY, "--tiny", "--device", "cpu", "--budgets", "7,9", "--max_evaluations", 40,
            "--per_budget", 1, "--sweep_images", 4, "--num_images", 8, "--out", tmp_path / "opt"]
    assert main([str(a) for a in argv]) == 0
    printed = capsys.readouterr().out
    assert "resuming" not in printed  # its own earlier batches are no resume
    result = json.loads((tmp_path / "opt" / "optimize.json").read_text())
    assert result["evaluations"] <= 40 and set(result["best"]) == {"7", "9"}
    for budget, best in result["best"].items():
        assert best["avg_bits"] <= float(budget) and np.isfinite(best["fid_confirm"])
        assert f"budget {budget}: colour-distance {best['fid']:.2f}" in printed
    assert main([str(a) for a in argv]) == 0  # a second call finds every measurement in the stores
    assert json.loads((tmp_path / "opt" / "optimize.json").read_text())["scored_this_run"] == {"main": 0, "confirm": 0}


def test_a_predicted_front_outside_the_training_bits_is_flagged():
    from autobuild.report import front_outside_training

    train = [{"avg_bits": b} for b in (7.07, 9.5, 30.86)]
    front = [{"avg_bits": 3.89}, {"avg_bits": 8.0}, {"avg_bits": 31.2}]
    warning = front_outside_training(front, train)
    assert warning.startswith("2 of 3 front point(s) (3.89, 31.20 avg bits)") and "7.07-30.86" in warning
    assert front_outside_training(front[1:2], train) == "" and front_outside_training(front, []) == ""


def test_a_loader_only_family_gets_its_structure_from_the_loader(tmp_path, capsys):
    """dag / flops / export + load-check build the architecture without a factory (they said "give it a factory or
    a loader" to a family that has a loader); --tiny, which needs a factory, is one clear error."""
    from qua2sedimo.cli import main

    family = ["--family", f"{FILE}:LOADER_FAMILY"]
    run = lambda argv: main([str(a) for a in argv])  # noqa: E731
    assert run(["dag", *family, "--out", tmp_path / "dag", "--no_render"]) == 0
    dag = json.loads((tmp_path / "dag" / "tests_shared_weights_loader.dag.json").read_text())
    assert sum(n["kind"] == "layer" for n in dag["nodes"]) == 10
    assert run(["flops", *family, "--out", tmp_path / "flops.json"]) == 0
    flops = json.loads((tmp_path / "flops.json").read_text())
    macs = {r["key"]: r["macs"] for r in flops["layers"]}
    assert macs["model.dw.weight_quantizer"] == 2 * 8 * 9 * fam.SIZE ** 2  # called twice: both calls count
    mq = tmp_path / "mq.safetensors"
    assert run(["multiquantizer", *family, "--out", mq]) == 0
    assert run(["export", *family, "--uniform", "kmeans_all-3", "--mq", mq, "--out", tmp_path / "exp"]) == 0
    assert run(["load-check", tmp_path / "exp", *family, "--compare", "--mq", mq, "--tolerance", 1e-6]) == 0
    assert "PASS" in capsys.readouterr().out
    line = _error_line(capsys, ["multiquantizer", *family, "--tiny", "--out", tmp_path / "t.safetensors"])
    assert "has a loader but no factory" in line


def _divide_by_zero(*args):  # user code that fails
    return 1 / 0


def test_the_users_own_code_failing_is_one_line_and_a_bug_of_ours_keeps_its_traceback(tmp_path):
    from dataclasses import replace

    from autobuild.dag import build_dag
    from multiquant.config import uniform_config
    from multiquant.errors import UserCodeError, UserError, user_code
    from multiquant.evaluate import setup_scorer
    from multiquant.metrics import CallableMetric
    from multiquant.metrics.bops import layer_macs
    from multiquant.sensitivity import band_of

    with pytest.raises(UserCodeError, match=r"^x: its sampler raised ZeroDivisionError: division by zero \(--debug"):
        with user_code("x: its sampler"):
            _divide_by_zero()
    with pytest.raises(ValueError, match="must be finite"):  # raised in the project's code: not the user's fault
        with user_code("x: its sampler"):
            band_of(float("nan"))

    def scorer_of(**changes):
        family = replace(fam.FAMILY, name=f"tests_bad_{len(changes)}_{sorted(changes)[0]}", **changes)
        scorer, _ = setup_scorer(family, tiny=True, device="cpu", mq_path=tmp_path / f"{family.name}.safetensors",
                                 build_mq=True, log=lambda *a: None)
        return scorer, uniform_config(scorer.mq.layers, "mse-4")

    cases = {"metric 'vec' must return one number for the whole batch, got Tensor of shape (8,)":
             dict(metric=CallableMetric(lambda im: im.float().mean((1, 2, 3)), name="vec")),
             "metric 'nan' returned NaN": dict(metric=CallableMetric(lambda im: float("nan"), name="nan")),
             "metric 'boom' raised ZeroDivisionError": dict(metric=CallableMetric(_divide_by_zero, name="boom")),
             "its sampler raised ZeroDivisionError": dict(sampler=_divide_by_zero)}
    for message, changes in cases.items():
        with pytest.raises(UserError, match=re.escape(message)):
            scorer, config = scorer_of(**changes)
            scorer.record(config, index=0)
    bad_inputs = replace(fam.FAMILY, example_inputs=lambda model, n: {"x": torch.zeros(n, 3, fam.SIZE, fam.SIZE)})
    model = bad_inputs.build("tiny")
    for call in (lambda: build_dag(model, bad_inputs), lambda: layer_macs(model, bad_inputs)):
        with pytest.raises(UserCodeError, match=r"forward on its example_inputs raised TypeError: .*missing 1 required"):
            call()


def test_block_boxes_name_a_plain_modules_derived_blocks():
    """A user's derived blocks are numbered by execution order: "1" alone says nothing, "1 dw" does; a diffusers
    block's scope already carries its number."""
    from types import SimpleNamespace as Unit

    from autobuild.insights import scores_by_block

    units = [Unit(name="stem/conv-in", block=-1, type="Conv In", ops=["Conv-In"], scores=np.array([0.1])),
             Unit(name="dw/other", block=1, type="Other", ops=["Conv"], scores=np.array([0.2, 0.3])),
             Unit(name="t_hidden/resblk", block=0, type="ResBlk", ops=["Res-tEmb"], scores=np.array([0.4])),
             Unit(name="transformer_blocks.2/self-attn", block=2, type="Self-Attn", ops=["SA-Q"], scores=np.array([0.5])),
             Unit(name="transformer_blocks.2/ff", block=2, type="FF", ops=["FF"], scores=np.array([0.6]))]
    groups = scores_by_block(SimpleNamespace(units=units))
    assert list(groups) == ["Conv In", "block 0 t_hidden", "block 1 dw", "block 2"]
    np.testing.assert_array_equal(groups["block 2"], [0.5, 0.6])


def test_a_resume_after_the_user_edited_their_sampler_or_metric_is_refused(tmp_path, capsys):
    """Same family name, same weights, other sampler / metric code: the old records' labels are of other numbers.
    The run records the sources' digest; a run written before the digest existed still resumes."""
    from qua2sedimo.cli import main

    edited = tmp_path / "edited_family.py"
    source = FILE.read_text()
    assert "torch.linspace(0.9999, 0.01, 1000) ** 1.5" in source
    edited.write_text(source.replace("torch.linspace(0.9999, 0.01, 1000) ** 1.5", "torch.linspace(0.9999, 0.01, 1000) ** 2"))
    mq = tmp_path / "mq.safetensors"
    run = ["eval-random", "--tiny", "--device", "cpu", "--mq", mq, "--build_mq", "--outdir", tmp_path / "run"]
    assert main([str(a) for a in [*run, *FAMILY, "--num_archs", 2]]) == 0
    meta = json.loads((tmp_path / "run" / "run_meta.json").read_text())
    assert len(meta["user_code"]) == 16
    line = _error_line(capsys, [*run, "--family", f"{edited}:FAMILY", "--num_archs", 3])
    assert "(user_code)" in line and "sampler or metric changed" in line
    del meta["user_code"]  # what a run written before the digest holds
    (tmp_path / "run" / "run_meta.json").write_text(json.dumps(meta))
    assert main([str(a) for a in [*run, *FAMILY, "--num_archs", 3]]) == 0


def test_default_budgets_are_priced_for_the_users_model_and_enter_the_run_identity(tmp_path, capsys):
    """Every configuration of the tiny model costs 6+ avg bits (per-channel tables on 8 channels): without
    --budgets the search's budgets are the paper's 3.3-3.9 priced with its tables, said in one line and recorded
    in the run, so the same budgets given explicitly resume it and others are refused."""
    from autobuild.configs import DEFAULT_SEARCH_BUDGETS, default_budgets
    from multiquant.options import OptionTable
    from qua2sedimo.cli import main

    out = tmp_path / "search"
    argv = ["search", *FAMILY, "--tiny", "--device", "cpu", "--num_random", 4, "--num_images", 4, "--rounds", 1,
            "--per_budget", 1, "--out", out]
    assert main([str(a) for a in argv]) == 0
    printed = capsys.readouterr().out
    table = OptionTable.from_source(out / f"{fam.FAMILY.name}_tiny_mq.safetensors")
    lo, three, four = table.min_avg_bits(), table.min_avg_bits(3), table.min_avg_bits(4)
    assert lo == three > 6 and four > three + 1
    expected = [round(three + (b - 3) * (four - three), 2) for b in DEFAULT_SEARCH_BUDGETS]
    assert default_budgets(table, DEFAULT_SEARCH_BUDGETS)[0] == expected
    result = json.loads((out / "search.json").read_text())
    assert result["settings"]["budgets"] == expected and set(result["best"]) == {f"{b:g}" for b in expected}
    assert all(best is not None and best["avg_bits"] <= float(b) for b, best in result["best"].items())
    line = next(line for line in printed.splitlines() if line.startswith("budgets "))
    assert line.startswith(f"budgets {', '.join(f'{b:g}' for b in expected)} avg bits (no --budgets given: this "
                           f"model's configurations cost {lo:.2f}-") and "all-4-bit" in line
    assert main([str(a) for a in [*argv, "--budgets", ",".join(map(str, expected))]]) == 0  # the same run
    assert json.loads((out / "search.json").read_text())["scored_this_run"] == 0
    assert "different settings (budgets)" in _error_line(capsys, [*argv, "--budgets", "3.3,3.5,3.7,3.9"])


def test_an_unconditional_family_says_none_and_its_runs_before_that_still_resume(tmp_path, capsys):
    """No conditions(n) and no classes: the sampler is given None per image, so the spec says conditioning 'none'
    (it said 'text', the default, in the run identity); a run recorded as 'text' then resumes, other labels do not.
    A spec whose conditioning cannot be told or contradicts it is one line naming the fix."""
    from multiquant.errors import UserError
    from multiquant.families import FamilySpec
    from multiquant.store import load_quant_cache
    from qua2sedimo.cli import main

    assert fam.FAMILY.conditioning == fam.LOADER_FAMILY.conditioning == "none"
    run = ["eval-random", *FAMILY, "--tiny", "--device", "cpu", "--mq", tmp_path / "mq.safetensors", "--build_mq",
           "--outdir", tmp_path / "run"]
    assert main([str(a) for a in [*run, "--num_archs", 2]]) == 0
    meta_path = tmp_path / "run" / "run_meta.json"
    meta = json.loads(meta_path.read_text())
    assert meta["sampler"]["conditioning"] == "none" and meta["sampler"]["pipeline"] is None
    meta["sampler"]["conditioning"] = "text"  # what the run of an earlier version recorded
    meta_path.write_text(json.dumps(meta))
    assert main([str(a) for a in [*run, "--num_archs", 3]]) == 0
    assert len(load_quant_cache(tmp_path / "run" / "quant_cache.pkl")) == 3
    meta["sampler"]["conditioning"] = "class"  # another label is another run
    meta_path.write_text(json.dumps(meta))
    assert "different settings (sampler)" in _error_line(capsys, [*run, "--num_archs", 4])

    base = dict(name="tests_conditioning", factory=fam.FAMILY.factory, sampler=fam.ddim)
    assert FamilySpec(**base, num_classes=3).conditioning == "class"
    assert FamilySpec(**base, pipeline_class="SomePipeline").conditioning == "text"  # a diffusers pipeline's default
    assert FamilySpec(**base, conditions=lambda n: ["a cat"] * n, conditioning="text").conditioning == "text"
    for spec, message in ((dict(conditions=lambda n: ["a cat"] * n), "gives conditions(n) but no conditioning: set "
                                                                     "FamilySpec(conditioning=...) to one of 'text'"),
                          (dict(conditioning="text"), "given None per image: set conditioning='none'"),
                          (dict(conditioning="none", num_classes=3), "num_classes=3, so its sampler is given class "
                                                                     "ids: set conditioning='class'"),
                          (dict(conditioning="none", conditions=lambda n: [0] * n), "set conditioning='text' or "),
                          (dict(conditioning="unconditional"), "conditioning 'unconditional' is unknown")):
        with pytest.raises(UserError, match=re.escape(message)):
            FamilySpec(**base, **spec)
    mine = tmp_path / "prompted_family.py"
    mine.write_text(f"import sys; sys.path.insert(0, {str(FILE.parent)!r})\nimport shared_weights_family as f\n"
                    "from multiquant.families import FamilySpec\nFAMILY = FamilySpec(name='tests_prompted', "
                    "factory=f.FAMILY.factory, sampler=f.ddim, conditions=lambda n: ['a cat'] * n)\n")
    line = _error_line(capsys, ["inspect", "--family", f"{mine}:FAMILY"])
    assert "gives conditions(n) but no conditioning" in line and "conditioning=..." in line


def test_a_text_module_family_sweeps_the_same_conditions_tiny_or_not():
    """The tiny flag takes the first rows only for a tiny diffusers text pipeline (random embeddings); a plain
    module's user conditions are the same seeded subset either way, and a diffusers pipeline's tiny rows stay in
    order."""
    from multiquant.adapters import adapter_for
    from multiquant.families import FamilySpec
    from multiquant.sensitivity import protocol_conditions, shuffled_subset

    spec = FamilySpec(name="tests_text_module", factory=fam.FAMILY.factory, sampler=fam.ddim, num_images=12,
                      conditions=lambda n: [f"prompt {i}" for i in range(n)], conditioning="text")
    adapter = adapter_for(spec)
    full = protocol_conditions(adapter, spec, 5, prompt_seed=3)
    assert protocol_conditions(adapter, spec, 5, prompt_seed=3, tiny=True) == full
    assert full == shuffled_subset([f"prompt {i}" for i in range(12)], 5, 3) and full != [f"prompt {i}" for i in range(5)]

    class Rows:  # a diffusers text adapter's tiny rows: taken in order, never shuffled
        def conditions(self, family, n, tiny=False, coco_path=None):
            return list(range(n)) if tiny else list(range(100, 100 + n))

    pipeline = FamilySpec(name="tests_text_pipeline", pipeline_class="SomePipeline", num_images=12)
    assert protocol_conditions(Rows(), pipeline, 5, prompt_seed=3, tiny=True) == [0, 1, 2, 3, 4]
    assert protocol_conditions(Rows(), pipeline, 5, prompt_seed=3) == shuffled_subset(list(range(100, 112)), 5, 3)
