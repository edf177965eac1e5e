"""Integrity of what runs write and read: checkpoint digests and content hash, UAQ zero-points that fit
their storage, explicit paths, temp-file hygiene, result-store identity and concurrency."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from torch import nn

from multiquant.checkpoint import CheckpointCorruptError, MultiQuantizer
from multiquant.errors import UserError
from multiquant.families import FamilySpec
from multiquant.quantizers import ZERO_POINT_LIMIT, dequantize, lp_error, quantize

ROOT = Path(__file__).resolve().parents[1]


class _Toy(nn.Module):
    """Two linears and a 1x1 conv: enough layers for a checkpoint, built in milliseconds."""

    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.a = nn.Linear(24, 16, bias=False)
        self.b = nn.Linear(16, 8, bias=False)
        self.c = nn.Conv2d(8, 4, 1, bias=False)
        with torch.no_grad():
            for m in (self.a, self.b, self.c):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.1)


TOY = FamilySpec(name="_integrity_toy", factory=lambda size: _Toy(), fp_prec=16)


def _toy_mq(model=None, **kwargs) -> tuple[nn.Module, MultiQuantizer]:
    model = model or _Toy()
    return model, MultiQuantizer.build(model, TOY, show_progress=False, kmeans_iters=20, **kwargs)


# ------------------------------------------------------------------------------------- 5a zero-points
def _rows_that_broke_int16(k: int = 24) -> torch.Tensor:
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    return torch.stack([
        torch.full((k,), 0.05),  # constant, far from 0: the zero-point was ~ -4e36
        torch.zeros(k),  # dead channel
        100.0 + 1e-3 * torch.rand(k, generator=g),  # offset row: narrow range far from 0
        -7.0 + 1e-4 * torch.rand(k, generator=g),  # negative offset row
        torch.randn(k, generator=g) * 0.1,  # an ordinary row
    ])


@pytest.mark.parametrize("bits", [4, 3, 8])
def test_uaq_zero_points_fit_int16_and_reconstruct_degenerate_rows(bits):
    w = _rows_that_broke_int16()
    codes, params = quantize(w, "mse", bits)
    assert float(params["zero"].abs().max()) <= ZERO_POINT_LIMIT
    stored = {"scale": params["scale"].float(), "zero": params["zero"].to(torch.int16)}
    w_hat = dequantize("mse", codes, stored).double()
    w64 = w.double()
    # constant rows come back (the bug gave 0.0 for the 0.05 row); errors within half a floored step
    assert float((w_hat[0] - 0.05).abs().max()) < 0.05 / ZERO_POINT_LIMIT
    assert float(w_hat[1].abs().max()) == 0.0
    for row in (2, 3):
        step = float(params["scale"][row])
        assert float((w_hat[row] - w64[row]).abs().max()) <= step / 2 + 1e-6 * abs(float(w64[row, 0]))
    # an ordinary row is untouched by the floor: its step is (hi - lo) * shrink / levels
    # (float32 division: within a few float32 ulps of the float64 quotient)
    assert float(params["scale"][4]) <= float(w[4].max() - w[4].min()) / (2 ** bits - 1) * (1 + 1e-6)


def test_recorded_error_is_the_error_of_what_is_stored(tmp_path):
    model = _Toy()
    with torch.no_grad():
        model.a.weight[:5] = _rows_that_broke_int16(24)
    model, mq = _toy_mq(model)
    loaded = MultiQuantizer.from_pretrained(mq.save_pretrained(tmp_path / "toy_mq.safetensors"))
    w = model.a.weight.detach().float()
    key = next(r.key for r in loaded.layers if r.path == "a")
    for option in mq.options:
        w_hat = loaded.dequantize(key, option).reshape(w.shape).half()
        assert loaded.table[key][option][3] == pytest.approx(lp_error(w, w_hat), rel=1e-9, abs=1e-30)
    assert loaded.tensors[f"{key}|mse-4|zero"].dtype == torch.int16
    row = loaded.dequantize(key, "mse-4").reshape(w.shape)[0]
    assert float((row - 0.05).abs().max()) < 1e-4  # was 0.0 (int16 overflow) with a recorded error of 1e-7


# ------------------------------------------------------------------------------------- 2 digests
@pytest.fixture(scope="module")
def toy_file(tmp_path_factory):
    _, mq = _toy_mq()
    return mq.save_pretrained(tmp_path_factory.mktemp("mq") / "toy_mq.safetensors"), mq


def _header(path) -> tuple[int, dict]:
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return n, json.loads(raw[8:8 + n])


def test_checkpoint_load_verifies_digests_and_finiteness(toy_file, tmp_path):
    path, mq = toy_file
    loaded = MultiQuantizer.from_pretrained(path)
    assert loaded.content_hash == mq.content_hash == loaded.manifest["content_hash"]
    n, header = _header(path)
    raw = bytearray(path.read_bytes())
    key = next(k for k in header if k.endswith("|codes"))
    start = 8 + n + header[key]["data_offsets"][0]

    flipped = bytearray(raw)
    flipped[start] ^= 0x10  # one bit of packed codes
    (tmp_path / "flipped.safetensors").write_bytes(flipped)
    with pytest.raises(CheckpointCorruptError, match="do not match their stored sha256"):
        MultiQuantizer.from_pretrained(tmp_path / "flipped.safetensors")

    scale_key = next(k for k in header if k.endswith("|scale"))
    nan = bytearray(raw)
    s0 = 8 + n + header[scale_key]["data_offsets"][0]
    nan[s0:s0 + 4] = struct.pack("<f", float("nan"))
    (tmp_path / "nan.safetensors").write_bytes(nan)
    with pytest.raises(CheckpointCorruptError):
        MultiQuantizer.from_pretrained(tmp_path / "nan.safetensors")

    # an edited table entry: same length, so the file stays a valid safetensors file
    text = raw[8:8 + n].decode()
    table_key = text.index('\\"table\\"')
    digit = next(i for i in range(table_key, len(text)) if text[i] in "123456789")
    edited = bytearray(raw)
    edited[8 + digit] = ord("1" if text[digit] != "1" else "2")
    (tmp_path / "edited.safetensors").write_bytes(edited)
    with pytest.raises(CheckpointCorruptError, match="edited or damaged"):
        MultiQuantizer.from_pretrained(tmp_path / "edited.safetensors")

    for cut in (4, 100, len(raw) - 7):
        (tmp_path / "cut.safetensors").write_bytes(raw[:cut])
        with pytest.raises(CheckpointCorruptError, match="truncated or damaged"):
            MultiQuantizer.from_pretrained(tmp_path / "cut.safetensors")


def test_non_finite_parameter_without_digests_is_rejected(tmp_path):
    model, mq = _toy_mq()
    key = next(k for k in mq.tensors if k.endswith("|codebook"))
    mq.tensors[key] = mq.tensors[key].clone()
    mq.tensors[key][0, 0] = float("inf")
    mq._digests = None
    with pytest.raises(CheckpointCorruptError, match="NaN or inf"):
        MultiQuantizer.from_pretrained(mq.save_pretrained(tmp_path / "inf_mq.safetensors"))


def test_content_hash_tells_builds_apart_and_ignores_when_and_where(tmp_path):
    model = _Toy()
    _, a = _toy_mq(model)
    _, b = _toy_mq(model)
    assert a.content_hash == b.content_hash  # same weights, same settings: same computation
    b.manifest = dict(b.manifest, created="another day", device="cuda:7", build_seconds=99.0)
    assert a.content_hash == b.content_hash
    _, c = _toy_mq(model, seed=1)  # another K-Means seed: other codes, another identity
    assert c.content_hash != a.content_hash
    assert a.manifest["device"] == "cpu" and a.manifest["device_name"]


# ------------------------------------------------------------------------------------- 4 predictor set
def _tiny_training(out, seed: int):
    import numpy as np

    from autobuild.train import TrainOptions, train_predictor
    from test_predictor import _hand_graph, _random_hand_records

    g = _hand_graph()
    records = _random_hand_records(g, np.random.default_rng(seed), 16)
    for i, r in enumerate(records):
        r["FID-GT-1k"] = 10.0 + i + float(np.random.default_rng(seed + i).random())
    opts = TrainOptions(hidden=8, patience=2)
    return train_predictor(records, g, "-1*FID-GT-1k", loss="srcc", folds=2, epochs=2, batch_size=0, seed=seed,
                           out_dir=out, options=opts, log=None), records


def test_predictor_directory_is_written_as_one_set_and_checked(tmp_path):
    import os
    import shutil

    from autobuild.train import load_ensemble
    from multiquant.utils import default_file_mode

    out = tmp_path / "pred"
    stale = tmp_path / ".pred.tmp-somehost-1"  # a killed save of another host's format is left alone
    dead = tmp_path / f".pred.tmp-{__import__('multiquant.utils', fromlist=['_HOST'])._HOST}-999999999"
    dead.mkdir()
    (dead / "ensemble.safetensors").write_bytes(b"partial")
    stale.mkdir()
    _tiny_training(out, seed=1)
    assert not dead.exists() and stale.exists()  # the dead writer's leftover directory is removed
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".pred")) == [stale.name]
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    assert all(oct(p.stat().st_mode & 0o777) == oct(default_file_mode()) for p in out.iterdir())
    load_ensemble(out)
    (out / "notes.txt").write_text("mine")
    _tiny_training(out, seed=2)  # retrain into the same directory: the set is replaced, other files stay
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "ensemble.safetensors").read_bytes() != first["ensemble.safetensors"]
    load_ensemble(out)
    # a crash between files used to leave new weights beside old metadata: now that is refused at load
    mixed = tmp_path / "mixed"
    shutil.copytree(out, mixed)
    (mixed / "ensemble.safetensors").write_bytes(first["ensemble.safetensors"])
    with pytest.raises(UserError, match="not a consistent predictor ensemble.*another save"):
        load_ensemble(mixed)
    shutil.copytree(out, mixed, dirs_exist_ok=True)
    (mixed / "metrics.json").write_bytes(first["metrics.json"])
    with pytest.raises(UserError, match="metrics.json belongs to another save"):
        load_ensemble(mixed)
    with pytest.raises(UserError, match="not a predictor directory"):
        load_ensemble(tmp_path / "nothing")
    os.replace(out, tmp_path / f".pred.old-host-1")  # a save killed between its two renames
    with pytest.raises(UserError, match="rename it back"):
        load_ensemble(out)


# ------------------------------------------------------------------------------------- 8 temp files, outdir
def test_killed_writer_leaves_a_temp_that_the_next_start_removes(tmp_path):
    import os
    import subprocess
    import sys

    from multiquant.utils import atomic_path

    target = tmp_path / "model_mq.safetensors"
    code = ("import os, sys; from multiquant.utils import atomic_path\n"
            "with atomic_path(sys.argv[1]) as tmp:\n    tmp.write_bytes(b'x' * 4096)\n    os.kill(os.getpid(), 9)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(target)], env=dict(os.environ, PYTHONPATH=str(ROOT)),
                          timeout=300)
    assert proc.returncode == -9
    leftovers = list(tmp_path.glob(".model_mq.safetensors.tmp-*"))
    assert len(leftovers) == 1 and not target.exists()
    live = tmp_path / f".model_mq.safetensors.tmp-{leftovers[0].name.rsplit('-', 2)[1]}-{os.getppid()}"
    live.write_bytes(b"a live writer's")  # a live process (our parent): its temp file stays
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"complete")
    assert target.read_bytes() == b"complete"
    assert sorted(tmp_path.iterdir()) == sorted([target, live])


def test_the_one_atomic_writer_keeps_the_old_file_on_a_full_disk_and_creates_exclusively(tmp_path, monkeypatch):
    import errno
    import os

    from multiquant.errors import UserError
    from multiquant.utils import atomic_write_bytes

    target = tmp_path / "quant_cache.pkl"
    atomic_write_bytes(target, b"old complete file")
    real_write = os.write

    def full_disk(fd, data):
        real_write(fd, bytes(data[:3]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full_disk)
    with pytest.raises(UserError, match="disk full while writing scores .*quant_cache.pkl: nothing was replaced") as info:
        atomic_write_bytes(target, b"new bytes that do not fit", what="scores")
    monkeypatch.setattr(os, "write", real_write)
    assert isinstance(info.value, OSError) and info.value.errno == errno.ENOSPC and "[Errno" not in str(info.value)
    assert target.read_bytes() == b"old complete file" and sorted(tmp_path.iterdir()) == [target]
    # create-if-absent: the file another writer put there first stays whole
    atomic_write_bytes(tmp_path / "meta.json", b"first", exclusive=True)
    atomic_write_bytes(tmp_path / "meta.json", b"second", exclusive=True)
    assert (tmp_path / "meta.json").read_bytes() == b"first" and len(list(tmp_path.iterdir())) == 2


def test_multiquantizer_command_checks_the_outdir_before_loading(capsys, tmp_path):
    from qua2sedimo.cli import main as cli_main

    (tmp_path / "a_file").write_text("")
    code = cli_main(["multiquantizer", "--model", "mnist_dit", "--pretrained", str(tmp_path / "no_weights"),
                     "--out", str(tmp_path / "a_file" / "sub" / "mq.safetensors")])
    err = capsys.readouterr().err
    assert code == 2 and "not writable" in err and "no_weights" not in err  # refused before any loading
    # a dead build's temp file in the output folder is removed at the start of the next build
    out = tmp_path / "mq"
    out.mkdir()
    dead = out / ".mnist_dit_mq.safetensors.tmp-999999999"  # the earlier name form: pid only
    dead.write_bytes(b"partial")
    code = cli_main(["multiquantizer", "--model", "mnist_dit", "--pretrained", str(tmp_path / "no_weights"),
                     "--device", "cpu", "--out", str(out)])
    assert code == 2 and not dead.exists()


def test_a_mistyped_mq_path_is_an_error_and_builds_nothing(capsys, tmp_path, monkeypatch):
    from multiquant.paths import constants
    from qua2sedimo.cli import main as cli_main

    monkeypatch.setattr(constants, "MULTIQUANTIZER_DIR", tmp_path / "mq")
    typo = tmp_path / "mnist_dit_tiny_mq.safetensor"
    base = ["--model", "mnist_dit", "--tiny", "--device", "cpu", "--num_images", "2", "--batch_size", "2"]
    assert cli_main(["eval-random", *base, "--mq", str(typo), "--outdir", str(tmp_path / "run"),
                     "--num_archs", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "does not exist" in err and "--build_mq" in err and len(err.splitlines()) == 1
    assert not typo.exists() and not (tmp_path / "mq").exists()
    # the default path too: built only when asked
    assert cli_main(["eval-random", *base, "--outdir", str(tmp_path / "run"), "--num_archs", "1"]) == 2
    assert "qua2sedimo multiquantizer --model mnist_dit --tiny" in capsys.readouterr().err
    assert not (tmp_path / "mq").exists()


# ------------------------------------------------------------------------------------- 1, 6, 7 store identity
_META = {"model": "toy", "num_images": 4, "multiquantizer_content_hash": "a" * 64}


def _rec(i: int) -> dict:
    return {"config": {"a": ["mse-4", 10, 3, 0.5]}, "quantized_size": 3, "quantized_error": 0.5,
            "FID-GT-1k": 10.0 + i, "avg_bits": 4.8, "bops": 1.0}


def test_store_refuses_another_checkpoint_and_ignores_world_size(tmp_path):
    from multiquant.store import RecordStore, RunMetaMismatchError
    from multiquant.utils import default_file_mode

    store = RecordStore(tmp_path / "run", dict(_META, world_size=2))  # a run written before world_size left
    store.commit(0, _rec(0))
    assert oct((tmp_path / "run" / "records" / "000000.pkl").stat().st_mode & 0o777) == oct(default_file_mode())
    assert oct((tmp_path / "run" / "quant_cache.pkl").stat().st_mode & 0o777) == oct(default_file_mode())
    assert len(RecordStore(tmp_path / "run", _META)) == 1  # resumed with any number of processes
    with pytest.raises(RunMetaMismatchError, match="multiquantizer_content_hash.*another multiquantizer") as info:
        RecordStore(tmp_path / "run", dict(_META, multiquantizer_content_hash="b" * 64))
    assert "\n" not in str(info.value) and isinstance(info.value, UserError)


_CLAIMER = """
import json, sys, time
from multiquant.store import RecordStore
store = RecordStore(sys.argv[1], json.loads(sys.argv[2]))
mine = []
for i in range(int(sys.argv[3])):
    if store.claim(i):
        time.sleep(0.02)  # "scoring"
        rec = {"config": {"a": ["mse-4", 10, 3, 0.5]}, "quantized_size": 3, "quantized_error": 0.5,
               "FID-GT-1k": 10.0 + i, "avg_bits": 4.8, "bops": 1.0}
        store.commit(i, rec)
        mine.append(i)
print(json.dumps(mine))
"""


def test_two_processes_on_one_outdir_share_the_work(tmp_path):
    import os
    import subprocess
    import sys

    from multiquant.store import RecordStore

    n = 30
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-c", _CLAIMER, str(tmp_path / "run"), json.dumps(_META), str(n)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-1500:] for o in outs]
    a, b = (set(json.loads(o[0].strip().splitlines()[-1])) for o in outs)
    assert not a & b and a | b == set(range(n))  # every configuration scored exactly once
    assert RecordStore(tmp_path / "run", _META).done_indices() == set(range(n))
    assert not list((tmp_path / "run" / "claims").iterdir())  # claims are dropped at commit


def test_a_dead_processs_claim_is_taken_over(tmp_path):
    from multiquant.store import RecordStore
    from multiquant.utils import _HOST

    store = RecordStore(tmp_path / "run", _META)
    store.claim_path(3).parent.mkdir(exist_ok=True)
    store.claim_path(3).write_text(f"{_HOST} 999999999 {__import__('time').time():.0f}")  # dead pid
    store.claim_path(4).write_text(f"otherhost 1 {__import__('time').time():.0f}")  # alive elsewhere
    assert store.claim(3) and not store.claim(4)
    store.commit(3, _rec(3))
    assert not store.claim(3)  # committed
