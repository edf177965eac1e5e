"""No library noise on an ordinary run: loading a model, casting one, importing the predictor half.
Each known message is silenced where it arises (see multiquant.utils.from_pretrained_kwargs, cast_module,
autobuild.pyg), so the check runs a fresh interpreter with every warning shown."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOISE = ("accelerate", "torch_dtype", "kept in float32", "torch.jit.script", "HiGHS")

SCRIPT = """
import warnings
warnings.simplefilter("always")
import torch
from multiquant.families import get_family
family = get_family("mnist_dit")
family.load(dtype=torch.float16)                        # diffusers from_pretrained
get_family("pixart_alpha").build("tiny", dtype=torch.float16)   # a cast diffusers would warn about
from multiquant.pipelines.loading import load_pipeline
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
