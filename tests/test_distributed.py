"""torchrun helpers: sharding, and a 2-process gloo feature gather equal to the single-process result."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from multiquant.distributed import gather_features, init_from_env, is_main, shard, world_size

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("n,world", [(10, 3), (3, 4), (0, 2), (7, 1), (1000, 8)])
def test_shard_partitions_in_order(n, world):
    items = list(range(100, 100 + n))
    parts = [shard(items, r, world) for r in range(world)]
    assert sum(parts, []) == items
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError):
        shard(items, world, world)


def test_single_process_is_a_no_op(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    info = init_from_env()
    assert (info.rank, info.world_size, info.backend) == (0, 1, None)
    assert is_main() and world_size() == 1
    x = torch.randn(3, 4, dtype=torch.float64)
    assert gather_features(x) is x


# Features of a fixed random network over a fixed image set, computed on this rank's shard only.
_WORKER = textwrap.dedent("""
    import sys
    sys.path.insert(0, {repo!r})
    import numpy as np, torch
    from torch import nn
    from multiquant.distributed import barrier, cleanup, gather_features, init_from_env, is_main, shard
    from multiquant.metrics.features import ModuleFeatures

    torch.manual_seed(0)
    images = torch.randint(0, 256, (11, 3, 8, 8), dtype=torch.uint8)
    # batch_size=1: per-image forwards are bitwise identical however the images are sharded
    net = ModuleFeatures(nn.Sequential(nn.Flatten(), nn.Linear(192, 6), nn.Tanh()), name="toy", batch_size=1)
    info = init_from_env()
    mine = shard(list(range(len(images))), info.rank, info.world_size)
    local = torch.from_numpy(net(images[mine]))
    everything = gather_features(local)
    barrier()
    np.save({out!r} + f".rank{{info.rank}}.npy", everything.numpy())
    print("rank", info.rank, "of", info.world_size, info.backend, "main" if is_main() else "", len(mine))
    cleanup()
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gloo_gather_equals_single_process(tmp_path):
    scripts = {}
    for name in ("single", "pair"):  # the single process runs beside the pair (process starts cost seconds)
        scripts[name] = tmp_path / f"{name}.py"
        scripts[name].write_text(_WORKER.format(repo=str(REPO), out=str(tmp_path / name)))
    base_env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    base_env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")  # CPU processes: gloo

    single = subprocess.Popen([sys.executable, str(scripts["single"])], env=base_env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    port = str(_free_port())
    procs = []
    for rank in range(2):  # what torchrun would set
        env = dict(base_env, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(subprocess.Popen([sys.executable, str(scripts["pair"])], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    stderr = single.communicate(timeout=120)[1]
    assert single.returncode == 0, stderr
    expected = np.load(tmp_path / "single.rank0.npy")
    assert expected.shape == (11, 6) and expected.dtype == np.float64

    outputs = [p.communicate(timeout=120) for p in procs]
    for p, (stdout, stderr) in zip(procs, outputs):
        assert p.returncode == 0, stderr
    assert "rank 0 of 2 gloo main 6" in outputs[0][0]
    assert "rank 1 of 2 gloo  5" in outputs[1][0]
    for rank in range(2):
        np.testing.assert_array_equal(np.load(tmp_path / f"pair.rank{rank}.npy"), expected)
