"""The command line: one front door above both halves."""
from __future__ import annotations

import ast
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
