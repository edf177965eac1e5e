"""The command line: one front door above both halves."""
from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from qua2sedimo.cli import build_parser, main

REPO = Path(__file__).resolve().parents[1]


def _subcommands() -> dict:
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return dict(action.choices)


def _imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) \
                == "import_module" and node.args and isinstance(node.args[0], ast.Constant):
            names.add(str(node.args[0].value))
    return names


def test_multiquant_never_imports_autobuild_or_the_front_door():
    """No arrow runs back up: multiquant is below autobuild, both below qua2sedimo. The per-model scripts
    (multiquant/scripts/) are entry points and may call the top-level command."""
    offenders = {}
    for path in sorted((REPO / "multiquant").rglob("*.py")):
        upward = {m for m in _imported_modules(path) if m.split(".")[0] == "autobuild"
                  or (m.split(".")[0] == "qua2sedimo" and "scripts" not in path.parts)}
        if upward:
            offenders[str(path.relative_to(REPO))] = sorted(upward)
    assert not offenders, offenders
    for path in sorted((REPO / "autobuild").rglob("*.py")):
        assert not {m for m in _imported_modules(path) if m.split(".")[0] == "qua2sedimo"}, path


def test_every_subcommand_has_help_under_its_full_name(capsys):
    commands = _subcommands()
    assert {"inspect", "multiquantizer", "eval-random", "eval-configs", "sensitivity", "flops",
            "optimize-mixed-precision", "dag", "train-predictor", "build-config", "search", "report", "infer",
            "export", "load-check", "demo", "families", "export-table"} <= set(commands)
    for name in commands:
        with pytest.raises(SystemExit) as stop:
            main([name, "--help"])
        assert stop.value.code == 0
        assert f"usage: qua2sedimo {name} " in capsys.readouterr().out, name


# each costs a second or more at import; only the commands that use them may import them (every CLI process
# otherwise pays for them before it parses a flag)
HEAVY_AT_START = ("torch_geometric", "diffusers", "matplotlib", "sklearn", "pandas", "scipy.linalg")

HELP_OF_EVERY_COMMAND = """
import contextlib, io, sys
from qua2sedimo.cli import build_parser, main
action = next(a for a in build_parser()._actions if a.dest == "command")
with contextlib.redirect_stdout(io.StringIO()) as out:
    for argv in (["--help"], *([name, "--help"] for name in action.choices)):
        try:
            main(argv)
        except SystemExit as stop:
            assert stop.code == 0, argv
    assert main(["families"]) == 0
assert out.getvalue().count("usage: qua2sedimo") == len(action.choices) + 1
print(" ".join(sorted(m for m in sys.modules)))
"""


def test_help_and_listing_families_import_no_heavy_library():
    """A fresh interpreter (this one has imported everything already): the entry point's parser, the help of
    every command and ``families`` leave torch_geometric, diffusers, matplotlib, ... unimported."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-c", HELP_OF_EVERY_COMMAND], capture_output=True, text=True, env=env,
                         cwd=REPO, timeout=300)
    assert run.returncode == 0, run.stderr
    imported = set(run.stdout.split())
    assert "qua2sedimo.cli" in imported and "autobuild.commands" in imported
    assert not [m for m in HEAVY_AT_START if m in imported], [m for m in imported if m.startswith(HEAVY_AT_START)]


def test_every_flag_has_help_and_both_spellings():
    for name, parser in _subcommands().items():
        for action in parser._actions:
            assert action.help, f"{name}: {action.option_strings or action.dest} has no help text"
            for flag in [f for f in action.option_strings if f.startswith("--")]:
                for other in ("--" + flag[2:].replace("_", "-"), "--" + flag[2:].replace("-", "_")):
                    assert parser._option_string_actions[other] is action, (name, flag, other)
    args = build_parser().parse_args(["eval-random", "--model", "mnist_dit", "--outdir", "x", "--num-images", "7",
                                      "--batch_size", "3"])
    assert (args.num_images, args.batch_size) == (7, 3)
    args = build_parser().parse_args(["dag", "--model", "mnist_dit", "--no_render"])
    assert args.no_render


# ------------------------------------------------------------------------------ --family: the user's own denoiser
USER_FAMILY = '''
from torch import nn
import torch
from multiquant.families import FamilySpec


class Denoiser(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.time = nn.Linear(1, width)
        self.inp = nn.Conv2d(1, width, 3, padding=1)
        self.out = nn.Conv2d(width, 1, 1)

    def forward(self, x, t):
        return self.out(self.inp(x).relu() + self.time(t[:, None])[:, :, None, None])


def make_family():
    return FamilySpec(name="{name}", factory=lambda size: Denoiser(4 if size == "tiny" else 6), fp_prec=32,
                      example_inputs=example_inputs)


def example_inputs(model, batch):
    device = next(model.parameters()).device  # the meta device when the DAG is traced from the full size
    return dict(x=torch.randn(batch, 1, 8, 8, device=device), t=torch.rand(batch, device=device))


FAMILY = make_family()
'''


def _inspect(argv, capsys) -> dict:
    assert main(["inspect", *argv, "--tiny", "--device", "cpu", "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_family_from_a_file_and_from_a_module(tmp_path, monkeypatch, capsys):
    (tmp_path / "fd_user_file.py").write_text(USER_FAMILY.replace("{name}", "fd_user_file"))
    info = _inspect(["--family", f"{tmp_path / 'fd_user_file.py'}:FAMILY"], capsys)
    assert info["model"] == "fd_user_file" and info["num_layers"] == 3
    assert info["num_weights"] == 4 + 1 * 4 * 9 + 4  # time Linear(1, 4), Conv(1, 4, 3x3), Conv(4, 1, 1x1)

    (tmp_path / "fd_user_pkg").mkdir()
    (tmp_path / "fd_user_pkg" / "__init__.py").write_text("")
    (tmp_path / "fd_user_pkg" / "fam.py").write_text(USER_FAMILY.replace("{name}", "fd_user_module"))
    monkeypatch.syspath_prepend(str(tmp_path))
    info = _inspect(["--family", "fd_user_pkg.fam:make_family"], capsys)  # a callable returning the spec
    assert info["model"] == "fd_user_module" and info["num_layers"] == 3
    # registered: --model finds it by name now, and so does every later lookup
    assert _inspect(["--model", "fd_user_module"], capsys)["model"] == "fd_user_module"

    # a structure command on the same family: the DAG of the user's module
    assert main(["dag", "--family", "fd_user_pkg.fam:FAMILY", "--out", str(tmp_path / "dag"), "--no-render"]) == 0
    graph = json.loads((tmp_path / "dag" / "fd_user_module.dag.json").read_text())
    assert "nodes" in graph or "graph" in graph


@pytest.mark.parametrize("spec, expected", [
    ("fd_no_such_module:FAMILY", "cannot import module 'fd_no_such_module'"),
    ("{tmp}/missing.py:FAMILY", "no file"),
    ("{tmp}/broken.py:FAMILY", "importing"),
    ("{tmp}/fine.py:NOPE", "has no attribute 'NOPE'"),
    ("{tmp}/fine.py:NUMBER", "is a int, not a FamilySpec"),
    ("fd_unknown_name", "unknown model family 'fd_unknown_name'"),
])
def test_a_family_that_cannot_be_imported_is_one_line_and_exit_2(tmp_path, capsys, spec, expected):
    (tmp_path / "broken.py").write_text("raise RuntimeError('boom')\n")
    (tmp_path / "fine.py").write_text("NUMBER = 3\n")
    assert main(["inspect", "--family", spec.replace("{tmp}", str(tmp_path)), "--tiny"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expected in err and err.count("\n") == 1, err


# ------------------------------------------------------------------------------------------ one error handling
def test_user_error_is_one_line_exit_2_and_debug_shows_the_traceback(tmp_path):
    import subprocess
    import sys

    argv = [sys.executable, "-m", "qua2sedimo", "inspect", "--model", "fd_no_such_family", "--tiny"]
    env = {**__import__("os").environ, "PYTHONPATH": str(REPO)}
    # both processes at once (each spends seconds importing; CI has 2 cores)
    plain, debug = (subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                                     env=env) for command in (argv, [*argv[:3], "--debug", *argv[3:]]))
    stderr = plain.communicate(timeout=300)[1]
    assert plain.returncode == 2, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("error: ") or "Traceback" in line]
    assert len(lines) == 1 and "unknown model family 'fd_no_such_family'" in lines[0], stderr
    stderr = debug.communicate(timeout=300)[1]
    assert debug.returncode == 1 and "Traceback" in stderr and "FamilyImportError" in stderr


def test_debug_reraises_and_bugs_keep_their_traceback():
    from multiquant.families.resolve import FamilyImportError

    with pytest.raises(FamilyImportError):
        main(["inspect", "--model", "fd_no_such_family", "--debug"])
    with pytest.raises(FamilyImportError):
        main(["--debug", "inspect", "--model", "fd_no_such_family"])


def test_library_errors_of_bad_input_map_to_one_line():
    from qua2sedimo.cli import user_error_message

    try:
        json.loads('{"a": ')
    except json.JSONDecodeError as err:
        assert "not valid JSON" in user_error_message(err)
    assert "x.pkl" in user_error_message(FileNotFoundError(2, "No such file or directory", "x.pkl"))
    assert "too deeply" in user_error_message(RecursionError("maximum recursion depth exceeded"))
    assert "too large" in user_error_message(OverflowError("int too large to convert to float"))
    import pickle

    assert "truncated" in user_error_message(EOFError("Ran out of input"))
    assert "truncated" in user_error_message(pickle.UnpicklingError("pickle data was truncated"))
    # bugs are not user errors: they keep their traceback
    assert user_error_message(ValueError("shape mismatch")) is None
    assert user_error_message(FileNotFoundError("no filename: a bug, not a path the user gave")) is None
    assert user_error_message(TypeError("unsupported operand")) is None


def test_safetensors_header_error_is_a_user_error(tmp_path):
    from safetensors.torch import load_file

    from qua2sedimo.cli import user_error_message

    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"\xff" * 16)
    with pytest.raises(Exception) as caught:
        load_file(path)
    assert "safetensors" in user_error_message(caught.value)


def test_the_error_classes_are_user_errors():
    from autobuild.data import LayerMismatchError
    from autobuild.target import TargetError
    from multiquant.adapters.diffusers import MissingReferenceError
    from multiquant.checkpoint import MultiQuantizerMismatch
    from multiquant.config import ConfigError
    from multiquant.errors import UserError
    from multiquant.export import ExportError
    from multiquant.families import UnknownFamilyError
    from multiquant.knapsack import BudgetError
    from multiquant.metrics.features import InceptionWeightsMissing
    from multiquant.safe_pickle import UnsafePickleError
    from multiquant.store import StoreError

    for cls in (ConfigError, ExportError, MultiQuantizerMismatch, StoreError, TargetError, BudgetError,
                MissingReferenceError, InceptionWeightsMissing, UnsafePickleError, UnknownFamilyError,
                LayerMismatchError):
        assert issubclass(cls, UserError), cls
    assert issubclass(UnknownFamilyError, KeyError) and issubclass(StoreError, RuntimeError)
    assert str(UnknownFamilyError("unknown model family 'x'")) == "unknown model family 'x'"  # no KeyError quotes


# ---------------------------------------------------------------------------------------------------------- dag
def test_dag_renders_the_real_architecture_and_says_tiny_when_tiny(tmp_path, capsys):
    from autobuild.dag.render import render_dag
    from autobuild.dag.trace import family_dag

    assert main(["dag", "--model", "mnist_dit", "--out", str(tmp_path), "--no-render"]) == 0
    out = capsys.readouterr().out
    assert "mnist_dit (full size)" in out and (tmp_path / "mnist_dit.dag.json").exists()
    full, tiny = family_dag("mnist_dit", "full", "meta"), family_dag("mnist_dit", "tiny", "cpu")
    assert full.number_of_nodes() != tiny.number_of_nodes()
    assert f"{full.number_of_nodes()} nodes" in out  # the real model's graph, not the tiny one's

    tiny.graph["size"] = "tiny"
    fig = render_dag(tiny, None)
    texts = [t.get_text() for t in fig.findobj(__import__("matplotlib").text.Text)]
    assert any("mnist_dit (tiny random architecture)" in t for t in texts), texts


def test_a_configuration_of_another_model_names_the_cli_cause():
    from autobuild.data import GraphTemplate, LayerMismatchError
    from autobuild.dag.trace import family_dag

    template = GraphTemplate.from_graph(family_dag("mnist_dit", "tiny", "cpu"))
    with pytest.raises(LayerMismatchError) as caught:
        template.encode({"not.a.layer": "mse-4"})
    message = str(caught.value)
    assert "--model" in message and "missing=" not in message and "--missing fp16" in message


def test_family_from_the_entry_point_group(tmp_path, monkeypatch, capsys):
    """A package that publishes its family in the ``qua2sedimo.families`` entry-point group is found by name."""
    (tmp_path / "fd_ep_family.py").write_text(USER_FAMILY.replace("{name}", "fd_entry_point"))
    dist = tmp_path / "fd_ep_family-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fd-ep-family\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[qua2sedimo.families]\nfd_entry_point = fd_ep_family:make_family\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert _inspect(["--model", "fd_entry_point"], capsys)["model"] == "fd_entry_point"


def test_train_predictor_finds_a_user_family(tmp_path, capsys):
    """train-predictor on records of a --family model (it used to stop with a raw KeyError)."""
    import pickle

    import numpy as np

    from multiquant.families import resolve_family
    from multiquant.layers import quantizable_layers

    path = tmp_path / "fd_user_train.py"
    path.write_text(USER_FAMILY.replace("{name}", "fd_user_train"))
    family = resolve_family(f"{path}:FAMILY")
    layers = quantizable_layers(family.build("tiny"), family)
    rng = np.random.default_rng(0)
    records = []
    for i in range(16):
        config = {ref.key: [f"{['mse', 'kmeans'][rng.integers(2)]}-{3 + rng.integers(2)}", ref.numel * 4,
                            ref.numel, float(rng.uniform(0.01, 0.1))] for ref in layers}
        records.append({"config": config, "FID-GT-1k": float(rng.uniform(5, 50)),
                        "avg_bits": float(rng.uniform(3, 4)), "index": i})
    (tmp_path / "cache.pkl").write_bytes(pickle.dumps(records))
    argv = ["train-predictor", "--cache", str(tmp_path / "cache.pkl"), "--family", f"{path}:FAMILY", "--tiny",
            "--target", "-1*FID-GT-1k", "--out", str(tmp_path / "pred"), "--epochs", "2", "--folds", "2",
            "--hidden", "8"]
    assert main(argv) == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "pred" / "metrics.json").read_text())["folds_k"] == 2


def test_every_command_that_takes_a_model_accepts_family():
    commands = _subcommands()
    takes_model = ["inspect", "multiquantizer", "eval-random", "eval-configs", "sensitivity", "flops",
                   "optimize-mixed-precision", "dag", "train-predictor", "build-config", "search", "report", "infer",
                   "export", "load-check", "optimize"]
    for name in takes_model:
        flags = commands[name]._option_string_actions
        assert "--family" in flags and "--model" in flags, name
        assert flags["--family"].help.startswith("your own family"), name
