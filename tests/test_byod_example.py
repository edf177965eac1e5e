"""The README's bring-your-own-denoiser example is the file it shows, and every command runs on it."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cli_every_command import every_command

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "my_denoiser.py"


def test_readme_shows_the_example_file_verbatim_in_at_most_40_lines():
    readme = (REPO / "README.md").read_text()
    block = re.search(r"<!-- example: examples/my_denoiser.py -->\n```python\n(.*?)```\n<!-- end example -->",
                      readme, re.S)
    assert block is not None, "README lost the example block"
    assert block.group(1) == EXAMPLE.read_text()
    code = [line for line in EXAMPLE.read_text().splitlines() if line.strip()]
    assert len(code) <= 40


def test_every_command_runs_on_the_readme_example(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    monkeypatch.chdir(tmp_path)  # the user's working directory: their weights and real images
    monkeypatch.syspath_prepend(str(REPO))
    monkeypatch.setenv("QUA2SEDIMO_STATS_CACHE", str(tmp_path / "stats"))
    real = torch.randint(0, 256, (40, 1, 16, 16), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    torch.save(real, tmp_path / "real_digits.pt")
    sys.modules.pop("examples.my_denoiser", None)
    from examples import my_denoiser

    torch.save(my_denoiser.MyDenoiser(32).state_dict(), tmp_path / "my_denoiser.pt")
    assert my_denoiser.FAMILY.load().conv_in.weight.shape == (32, 1, 3, 3)  # the weights field, weights_only
    out = every_command(["--family", "examples.my_denoiser:FAMILY"], "my_denoiser", tmp_path / "work")
    records = out["records"]
    assert len(records) == 6 and all(np.isfinite(float(r["FID-GT-1k"])) for r in records)
    by_name = {r["name"]: r for r in out["baselines"]}
    assert by_name["fp16"]["FID-FP-1k"] == pytest.approx(0.0, abs=1e-6)
    assert by_name["uniform_kmeans-3"]["FID-FP-1k"] > 0
    assert len(list(out["samples"].rglob("*.png"))) >= 4
