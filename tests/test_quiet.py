"""No library noise on an ordinary run: loading a model, casting one, importing the predictor half.
Each known message is silenced where it arises (see multiquant.utils.from_pretrained_kwargs, cast_module,
autobuild.pyg), so the check runs a fresh interpreter with every warning shown."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOISE = ("accelerate", "torch_dtype", "kept in float32", "torch.jit.script", "HiGHS", "torchao", "natively supported")

SCRIPT = """
import warnings
warnings.simplefilter("always")
import torch
from multiquant.families import get_family
family = get_family("mnist_dit")
family.load(dtype=torch.float16)                        # diffusers from_pretrained
get_family("pixart_alpha").build("tiny", dtype=torch.float16)   # a cast diffusers would warn about
from multiquant.adapters.diffusers.loading import load_pipeline
load_pipeline(family, device="cpu")
import autobuild.train, autobuild.gnn                   # torch_geometric
from multiquant.knapsack import solve_exact
solve_exact([[0.0, 1.0, 2.0]] * 20, [[1.0, 2.0, 3.0]] * 20, 45.0)
print("done")
"""


def test_an_ordinary_run_prints_no_library_warnings():
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, cwd=ROOT,
                         timeout=600)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "done"
    found = [n for n in NOISE if n in run.stderr]
    assert not found, f"library noise {found}:\n{run.stderr}"


def test_progress_off_a_terminal_is_plain_lines_with_rate_and_eta(capsys, monkeypatch):
    from multiquant.utils import progress, progress_line

    monkeypatch.delenv("QUA2SEDIMO_PROGRESS", raising=False)
    assert list(progress(range(4), desc="images", unit="batch", interval=0.0)) == [0, 1, 2, 3]
    lines = capsys.readouterr().err.strip().splitlines()  # stderr is captured: not a terminal
    assert len(lines) == 4 and lines[0].startswith("images: 1/4 (25%)") and "batch/s, ETA " in lines[0]
    assert "done in" in lines[-1]
    assert progress_line("x", 30, 120, 10.0) == "x: 30/120 (25%) 3.00 it/s, ETA 0:00:30"
    monkeypatch.setenv("QUA2SEDIMO_PROGRESS", "0")
    assert list(progress(range(3), interval=0.0)) == [0, 1, 2] and capsys.readouterr().err == ""
