"""A non-editable install ships the pre-scored dataset and the shipped multiquantizer, installs the paths module
under the project's namespace (no top-level ``constants``), and points outputs at the working directory."""
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _isolated_env(pythonpath: Path) -> dict:
    """This environment without the project's variables, importing only from ``pythonpath``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUA2SEDIMO_")}
    env["PYTHONPATH"] = str(pythonpath)
    return env


def _python(script: str, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def test_every_package_is_listed_for_the_install():
    from setuptools import find_packages

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = set(find_packages(str(ROOT), include=["qua2sedimo*", "multiquant*", "autobuild*"]))
    assert found <= listed, f"add {sorted(found - listed)} to [tool.setuptools] packages in pyproject.toml"


@pytest.mark.slow
def test_pip_install_target_ships_data_and_writes_nothing_into_site_packages(tmp_path):
    target, work = tmp_path / "site", tmp_path / "work"
    work.mkdir()
    build = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                            "--no-compile", "--target", str(target), str(ROOT)], capture_output=True, text=True,
                           cwd=tmp_path, timeout=600)
    assert build.returncode == 0, build.stderr
    top = sorted(p.name for p in target.iterdir() if not p.name.endswith(".dist-info"))
    assert top == ["autobuild", "bin", "multiquant", "qua2sedimo"] or top == ["autobuild", "multiquant", "qua2sedimo"]
    assert not (target / "constants.py").exists()
    shipped = target / "multiquant" / "_top"
    assert (shipped / "multiquantizers" / "mnist_dit_mq.safetensors").stat().st_size > 10e6
    assert (shipped / "quant_caches" / "mnist_dit" / "quant_cache.pkl").is_file()
    assert (shipped / "quant_configs" / "mnist_dit_35_search.pkl").is_file()
    assert (shipped / "multiquantizers" / "mnist_unet_mq.safetensors").is_file()
    assert (shipped / "quant_caches" / "mnist_unet" / "quant_cache.pkl").is_file()
    assert (target / "multiquant" / "assets" / "mnist_dit" / "diffusion_pytorch_model.safetensors").is_file()
    script = ("from pathlib import Path\n"
              "from multiquant.paths import constants, multiquantizer_path, shipped_cache\n"
              "from multiquant.store import load_quant_cache\n"
              "print(Path(constants.__file__).parent)\n"
              "print(multiquantizer_path('mnist_dit_mq.safetensors'))\n"
              "print(len(load_quant_cache(shipped_cache('mnist_dit'))))\n"
              "print(Path(constants.MULTIQUANTIZER_DIR).resolve(), Path(constants.RESULTS_DIR).resolve())\n")
    env = _isolated_env(target)
    # a command with default outputs writes into the working directory, nothing into the installed package; it
    # runs beside the paths script (each process spends seconds importing; CI has 2 cores)
    before = sorted(p for p in target.rglob("*") if "__pycache__" not in p.parts)
    command = subprocess.Popen([sys.executable, "-m", "qua2sedimo", "multiquantizer", "--model", "mnist_dit", "--tiny",
                                "--bits", "3", "--device", "cpu"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, cwd=work, env=env)
    run = _python(script, cwd=work, env=env)
    assert run.returncode == 0, run.stderr
    home, mq, records, outputs = run.stdout.strip().splitlines()
    assert Path(home) == shipped and Path(mq) == shipped / "multiquantizers" / "mnist_dit_mq.safetensors"
    assert int(records) == 500
    assert outputs.split() == [str(work / "multiquantizers"), str(work / "results")]
    stderr = command.communicate(timeout=300)[1]
    assert command.returncode == 0, stderr
    assert (work / "multiquantizers" / "mnist_dit_tiny_mq.safetensors").is_file()
    assert sorted(p for p in target.rglob("*") if "__pycache__" not in p.parts) == before


def test_code_reads_the_paths_module_through_multiquant_paths():
    """``import constants`` works only in a source checkout; installed, the module is multiquant._top.constants."""
    import re

    offenders = [str(p.relative_to(ROOT)) for folder in ("multiquant", "autobuild", "qua2sedimo", "benchmarks", "tests")
                 for p in (ROOT / folder).rglob("*.py") if p.name != "paths.py"
                 and re.search(r"^\s*(import constants|from constants import)", p.read_text(), re.M)]
    assert not offenders, f"use `from multiquant.paths import constants` in {offenders}"


def test_paths_module_is_found_when_only_the_packages_are_importable(tmp_path):
    """An editable install maps the package folders, not the repository root: constants.py is read from beside
    the multiquant folder, and no top-level ``constants`` is needed."""
    for name in ("multiquant", "autobuild", "qua2sedimo"):
        (tmp_path / name).symlink_to(ROOT / name)
    script = ("import sys\nfrom multiquant.paths import constants, shipped_cache\n"
              "print(constants.__file__)\nprint(shipped_cache('mnist_dit').is_file())\nprint('constants' in sys.modules)")
    run = _python(script, cwd=tmp_path, env=_isolated_env(tmp_path))
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == [str(ROOT / "constants.py"), "True", "False"]
