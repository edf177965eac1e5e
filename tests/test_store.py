"""Result store (crash safety, resume, schema) and the restricted unpickler."""
from __future__ import annotations

import errno
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest

from multiquant.safe_pickle import UnsafePickleError, safe_load, safe_loads
from multiquant.store import (SCHEMA_KEYS, DuplicateRecordError, RecordStore, RunMetaMismatchError, StoreError,
                              load_quant_cache)

REPO = Path(__file__).resolve().parents[1]
META = {"model": "pixart_alpha", "seed": 42, "num_images": 1000, "metric": "FID-GT-1k", "resolution": 512}


def make_record(i: int, n_layers: int = 20) -> dict:
    """A reference-like record, deterministic in i (extras deliberately before the schema keys)."""
    rng = np.random.default_rng(i)
    options = ["mse-3", "mse-4", "kmeans-3", "kmeans-4", "kmeans_all-3", "kmeans_all-4"]
    config = {f"model.transformer_blocks.{j}.attn1.to_q.weight_quantizer":
              [options[int(rng.integers(6))], 2 * 1152 * 1152, int(rng.integers(400_000, 700_000)), float(rng.random())]
              for j in range(n_layers)}
    size = sum(v[2] for v in config.values())
    return {"seed": 42, "architecture": "alpha", "bops": float(rng.random() * 100),
            "avg_bits": 16.0 * size / (n_layers * 2 * 1152 * 1152),
            "FID-GT-1k": float(100 + rng.random()), "quantized_error": float(sum(v[3] for v in config.values())),
            "quantized_size": size, "config": config, "timings": {"generate_s": 1.5}}


# ----------------------------------------------------------------------------------------------------
# safe_pickle
class _Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED_BY_PICKLE",))


def test_safe_pickle_refuses_code_execution(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    evil = pickle.dumps([{"config": {}, "x": _Evil()}], protocol=4)
    with pytest.raises(UnsafePickleError, match="system"):
        safe_loads(evil)
    (tmp_path / "quant_cache.pkl").write_bytes(evil)
    with pytest.raises(UnsafePickleError):
        load_quant_cache(tmp_path / "quant_cache.pkl")
    assert not (tmp_path / "PWNED_BY_PICKLE").exists()
    for payload in (pickle.dumps(Path("x")), pickle.dumps(np.load), pickle.dumps(pickle.loads), pickle.dumps(eval)):
        with pytest.raises(UnsafePickleError):
            safe_loads(payload)
    assert safe_loads(pickle.dumps(OrderedDict(a=1))) == OrderedDict(a=1)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_safe_pickle_loads_reference_like_data(protocol, tmp_path):
    data = [make_record(i) for i in range(3)]
    for r in data:
        r["FID-GT-1k"] = np.float64(r["FID-GT-1k"])
        r["extras"] = OrderedDict(a={1, 2}, b=frozenset({3}), c=(1j, b"raw", None, True), d=np.int64(7),
                                  e=np.float32(0.5))
    blob = pickle.dumps(data, protocol=protocol)
    loaded = safe_loads(blob)
    assert loaded == data
    assert type(loaded[0]["FID-GT-1k"]) is np.float64
    (tmp_path / "f.pkl").write_bytes(blob)
    with open(tmp_path / "f.pkl", "rb") as f:
        assert safe_load(f) == data
    arr = np.arange(12.0).reshape(3, 4)
    with pytest.raises(UnsafePickleError, match="allow_arrays"):
        safe_loads(pickle.dumps(arr, protocol=protocol))
    np.testing.assert_array_equal(safe_loads(pickle.dumps(arr, protocol=protocol), allow_arrays=True), arr)


def test_safe_pickle_reads_numpy1_spelling(tmp_path):
    """Reference files written under numpy 1.x name numpy.core.multiarray.scalar (numpy 2: numpy._core)."""
    blob = pickle.dumps([{"FID-GT-1k": np.float64(12.5)}], protocol=4)
    new, old = b"numpy._core.multiarray", b"numpy.core.multiarray"
    if new in blob:
        blob = blob.replace(b"\x8c" + bytes([len(new)]) + new, b"\x8c" + bytes([len(old)]) + old)
        assert blob[2] == pickle.FRAME[0]  # the frame got one byte shorter
        frame_len = int.from_bytes(blob[3:11], "little") - (len(new) - len(old))
        blob = blob[:3] + frame_len.to_bytes(8, "little") + blob[11:]
    assert old in blob and new not in blob
    (tmp_path / "quant_cache.pkl").write_bytes(blob)
    loaded = load_quant_cache(tmp_path / "quant_cache.pkl")
    assert loaded == [{"FID-GT-1k": 12.5}] and type(loaded[0]["FID-GT-1k"]) is np.float64


# ----------------------------------------------------------------------------------------------------
# RecordStore basics
def test_commit_schema_order_types_and_resume(tmp_path):
    store = RecordStore(tmp_path / "run", META)
    assert store.done_indices() == set()
    store.commit(2, make_record(2))
    store.commit(0, make_record(0))
    raw = (tmp_path / "run" / "quant_cache.pkl").read_bytes()
    assert raw[:2] == b"\x80\x04"  # pickle protocol 4, as the reference
    cache = load_quant_cache(tmp_path / "run" / "quant_cache.pkl")
    assert [r["index"] for r in cache] == [0, 2]
    for r in cache:
        assert tuple(r)[:7] == SCHEMA_KEYS + ("architecture",)
        assert type(r["FID-GT-1k"]) is np.float64 and type(r["quantized_size"]) is int
        assert type(r["bops"]) is float
    assert cache[1]["config"] == make_record(2)["config"]
    assert cache[1]["FID-GT-1k"] == make_record(2)["FID-GT-1k"]

    with pytest.raises(DuplicateRecordError):
        store.commit(2, make_record(2))
    reopened = RecordStore(tmp_path / "run", dict(META))
    assert reopened.done_indices() == {0, 2}
    reopened.commit(1, make_record(1))
    assert [r["index"] for r in store.records()] == [0, 1, 2]  # sees the other handle's commit
    with pytest.raises(ValueError, match="lacks required keys"):
        reopened.commit(5, {"config": {}})
    with pytest.raises(TypeError, match="allow"):
        reopened.commit(5, dict(make_record(5), extra=Path("not plain data")))
    assert reopened.done_indices() == {0, 1, 2}


def test_run_meta_mismatch_names_the_key(tmp_path):
    RecordStore(tmp_path, META)
    with pytest.raises(RunMetaMismatchError, match="num_images") as info:
        RecordStore(tmp_path, dict(META, num_images=500))
    assert "1000" in str(info.value) and "500" in str(info.value)
    with pytest.raises(RunMetaMismatchError, match="steps"):
        RecordStore(tmp_path, dict(META, steps=20))


def test_a_run_resumes_at_another_sampler_batch_size_but_not_other_sampler_settings(tmp_path):
    """The batch size bounds memory only (each image's noise comes from its own seed): it never splits a run."""
    sampler = {"batch_size": 64, "steps": 50, "seed": 42}
    RecordStore(tmp_path, dict(META, sampler=sampler)).commit(0, make_record(0))
    resumed = RecordStore(tmp_path, dict(META, sampler=dict(sampler, batch_size=1000)))
    assert resumed.done_indices() == {0}
    with pytest.raises(RunMetaMismatchError, match=r"settings \(sampler\)"):
        RecordStore(tmp_path, dict(META, sampler=dict(sampler, steps=20)))


def test_the_shipped_dataset_opens_for_resuming_with_every_record(tmp_path):
    """quant_caches/mnist_dit ships one quant_cache.pkl (no records/) and a run_meta.json written before the `clip`
    key: opened with the settings today's version records for that protocol (clip None: a class-conditioned
    family), every configuration counts as scored and the cache keeps all of them."""
    import json
    import shutil

    shipped = Path(__file__).resolve().parents[1] / "quant_caches" / "mnist_dit"
    for name in ("run_meta.json", "quant_cache.pkl"):
        shutil.copy(shipped / name, tmp_path / name)
    meta = json.loads((shipped / "run_meta.json").read_text())
    assert "clip" not in meta
    records = load_quant_cache(shipped / "quant_cache.pkl")
    store = RecordStore(tmp_path, dict(meta, clip=None))
    assert store.done_indices() == {r["index"] for r in records} and len(records) == 500
    assert store.records() == records and load_quant_cache(tmp_path / "quant_cache.pkl") == records
    assert json.loads((tmp_path / "run_meta.json").read_text()) == meta  # the stored identity is not rewritten
    with pytest.raises(RunMetaMismatchError, match=r"settings \(clip\)"):  # a CLIP-scored run is another protocol
        RecordStore(tmp_path, dict(meta, clip="clip-vit-large-patch14"))


def test_a_cache_without_run_meta_is_never_added_to(tmp_path):
    """Nothing says which settings scored a bare quant_cache.pkl: refused, and the file is left as it was."""
    pickle_bytes = pickle.dumps([make_record(0)], protocol=4)
    (tmp_path / "quant_cache.pkl").write_bytes(pickle_bytes)
    with pytest.raises(StoreError, match="no run_meta.json"):
        RecordStore(tmp_path, META)
    assert (tmp_path / "quant_cache.pkl").read_bytes() == pickle_bytes and not (tmp_path / "run_meta.json").exists()


def test_bad_paths_are_clear_errors(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(StoreError, match="not a directory"):
        RecordStore(tmp_path / "afile", META)
    with pytest.raises(StoreError, match="cannot create"):
        RecordStore(tmp_path / "afile" / "sub", META)


def test_disk_full_keeps_previous_state(tmp_path, monkeypatch):
    import multiquant.store as store_mod

    store = RecordStore(tmp_path, META)
    store.commit(0, make_record(0))
    before = (tmp_path / "quant_cache.pkl").read_bytes()
    real_write = os.write

    def full_disk(fd, data):
        real_write(fd, bytes(data[: len(data) // 2]))  # a partial write, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store_mod.os, "write", full_disk)
    with pytest.raises(StoreError, match="disk full"):
        store.commit(1, make_record(1))
    monkeypatch.setattr(store_mod.os, "write", real_write)
    assert store.done_indices() == {0}
    assert (tmp_path / "quant_cache.pkl").read_bytes() == before
    assert not list(tmp_path.rglob("*.tmp-*"))
    store.commit(1, make_record(1))  # space is back: resume works
    assert [r["index"] for r in load_quant_cache(tmp_path / "quant_cache.pkl")] == [0, 1]


# ----------------------------------------------------------------------------------------------------
# SIGKILL at random moments, then resume
# records of 500 layers (~40 kB): each commit writes a file and rewrites the cache, so kills land mid-write; larger
# ones only slow the checks (the restricted unpickler is pure Python)
WRITER_LAYERS = 500
_WRITER = textwrap.dedent("""
    import sys
    sys.path.insert(0, {repo!r})
    sys.path.insert(0, {tests!r})
    from test_store import META, make_record
    from multiquant.store import RecordStore

    store = RecordStore({outdir!r}, META)
    for i in range({total}):
        if i in store.done_indices():
            continue
        store.commit(i, make_record(i, n_layers={layers}))
        print(i, flush=True)
""")


def _check_consistent(outdir: Path, total: int) -> set[int]:
    """Every committed record is complete and correct; quant_cache.pkl is readable and a subset."""
    committed = set()
    for p in (outdir / "records").glob("*.pkl"):
        rec = safe_load(p)
        i = int(p.stem)
        assert rec["index"] == i and rec["config"] == make_record(i, n_layers=WRITER_LAYERS)["config"]
        committed.add(i)
    cache = load_quant_cache(outdir / "quant_cache.pkl") if (outdir / "quant_cache.pkl").exists() else []
    cache_idx = [r["index"] for r in cache]
    assert len(cache_idx) == len(set(cache_idx)) and set(cache_idx) <= committed
    assert committed <= set(range(total))
    return committed


def test_sigkill_mid_run_then_resume(tmp_path):
    total = 40
    outdir = tmp_path / "run"
    script = tmp_path / "writer.py"
    script.write_text(_WRITER.format(repo=str(REPO), tests=str(REPO / "tests"), outdir=str(outdir), total=total,
                                      layers=WRITER_LAYERS))
    seen_before_kill = set()
    for delay in (0.15, 0.45, 0.3):
        proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
        # wait for a few commits, then kill at an arbitrary moment
        got = proc.stdout.readline()
        if got:
            seen_before_kill.add(int(got))
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate()
        seen_before_kill |= {int(x) for x in out.split()}
        committed = _check_consistent(outdir, total)
        assert seen_before_kill <= committed  # nothing acknowledged is lost
    # resume to the end
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert _check_consistent(outdir, total) == set(range(total))
    cache = load_quant_cache(outdir / "quant_cache.pkl")
    assert [r["index"] for r in cache] == list(range(total))  # no loss, no duplicates
    assert not list(outdir.rglob("*.tmp-*"))  # temp files of killed writers are cleaned on reopening
    assert all(r["FID-GT-1k"] == make_record(r["index"], n_layers=WRITER_LAYERS)["FID-GT-1k"] for r in cache)


def test_scored_records_as_a_dataframe_and_csv(tmp_path):
    """pandas' job: the shipped dataset as one table, exported as CSV with the same numbers."""
    import pandas as pd

    from multiquant.paths import shipped_cache
    from multiquant.tables import records_frame, write_table
    from qua2sedimo.cli import main as cli_main

    records = load_quant_cache(shipped_cache("mnist_dit"))
    frame = records_frame(shipped_cache("mnist_dit"), layer_options=True)
    assert len(frame) == len(records) == 500
    assert frame["FID-GT-1k"].tolist() == [float(r["FID-GT-1k"]) for r in records]
    option_counts = frame[[c for c in frame.columns if c.startswith("n_")]].sum(axis=1)
    assert (option_counts == len(records[0]["config"])).all()
    key = next(iter(records[7]["config"]))
    assert frame.loc[7, key] == records[7]["config"][key][0]
    assert cli_main(["scores-table", "--cache", str(shipped_cache("mnist_dit")), "--out", str(tmp_path / "s.csv")]) == 0
    back = pd.read_csv(tmp_path / "s.csv")
    assert back["avg_bits"].tolist() == pytest.approx(frame["avg_bits"].tolist(), rel=1e-12)
    from multiquant.errors import UserError

    with pytest.raises(UserError, match=".csv or .parquet"):
        write_table(frame, tmp_path / "t.xlsx")
