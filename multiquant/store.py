"""Crash-safe, resumable storage of scored quantization configurations.

Layout of a run directory::

    outdir/
      run_meta.json        what the run measures (model, seed, number of images, metric, ...)
      records/000042.pkl   one committed record per configuration index (pickle protocol 4)
      quant_cache.pkl      every committed record, in index order, in the reference schema

Every file is written to a temporary name, fsync'd and renamed over its final name (the project's one
atomic writer, :func:`multiquant.utils.atomic_path`), so a crash or SIGKILL at any moment leaves either the old or the new
complete file, never a torn one. A record is *committed* once its ``records/`` file exists;
``quant_cache.pkl`` is rebuilt from the committed records after each commit (and on reopening, in
case the process died between the two steps), so it always is a complete, readable list.
Several processes (e.g. torchrun ranks scoring different indices) may share one directory: the
rebuild runs under a file lock and re-reads records written by the others.
A directory that holds only ``quant_cache.pkl`` and its ``run_meta.json`` (a dataset shipped as one file) is
continued: its records become the committed ones. A ``quant_cache.pkl`` without ``run_meta.json`` is never
added to (nothing says which settings scored it).
"""
from __future__ import annotations

import fcntl
import json
import math
import os
import pickle
import re
import socket
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .errors import UserError, WriteError
from .safe_pickle import safe_load, safe_loads
from .utils import atomic_write_bytes, json_default, pid_alive, remove_stale_temps_in

__all__ = ["RecordStore", "StoreError", "RunMetaMismatchError", "DuplicateRecordError",
           "SCHEMA_KEYS", "load_quant_cache", "check_records", "to_reference_record"]

PICKLE_PROTOCOL = 4  # the reference's quant_cache.pkl protocol; AutoBuild reads it
# Keys of a quant_cache.pkl entry, in the reference's insertion order. `architecture` and extras follow.
SCHEMA_KEYS = ("config", "quantized_size", "quantized_error", "FID-GT-1k", "avg_bits", "bops")
_RECORD_NAME = re.compile(r"^(\d{6,})\.pkl$")
_FID_NOISE = 1e-3  # |FID| below this may come out negative from the matrix square root
# Settings that do not change a single number (runs written before this list may still carry them).
NOT_RUN_IDENTITY = ("world_size",)
# Nested settings of the same kind: the sampler's batch size only bounds memory (every image's noise comes from
# its own seed, multiquant.seeds), so a run resumes at another batch size (the shipped datasets were scored at
# 1000 images per call).
NOT_RUN_IDENTITY_NESTED = {"sampler": ("batch_size",)}
# Settings that later versions added to run_meta.json, with the value that a run written before them had
# without saying so (the setting did not exist yet): a stored run that lacks the key compares as that value,
# so it resumes; a run that records another value does not. clip: older versions never scored CLIP; act_bits:
# nor quantized activations; compile: nor compiled the denoiser (whose kernels round differently from eager);
# dtype: nor rendered in another precision than the family's; channels_last: nor in channels-last memory format
# (other convolution kernels, other rounding).
# user_code (a plain-module family's sampler/metric sources, adapters.module.user_code_settings): what a run written
# before it used is unknown, so its absence compares equal to any value (ANY_VALUE).
ANY_VALUE = object()
ADDED_RUN_KEYS = {"clip": None, "act_bits": None, "compile": None, "dtype": None, "channels_last": None,
                  "user_code": ANY_VALUE}
# A plain-module family's sampler settings said conditioning "text" (the spec's old default) also where nothing
# conditioned its images; such a family now says "none" (FamilySpec: only without conditions(n) and classes), and
# its images are the same ones (its sampler was and is given None per image): a stored module run's "text" compares
# as the "none" given (as_written_now).
_MODULE_CONDITIONING_RENAMED = ("text", "none")
_HOST = socket.gethostname().replace(".", "_")  # in claim files (their written format)


class StoreError(UserError, RuntimeError):
    """A result store cannot be opened or written (bad path, disk full, corrupt file...)."""


class RunMetaMismatchError(StoreError):
    """The directory holds a run with different settings."""


class DuplicateRecordError(StoreError):
    """The index has already been committed."""


# ----------------------------------------------------------------------------------------------------
# atomic files
def _write(path: Path, data: bytes, what: str, exclusive: bool = False) -> None:
    """:func:`multiquant.utils.atomic_write_bytes`, every failure as a :class:`StoreError` (nothing replaced)."""
    try:
        atomic_write_bytes(path, data, what=what, exclusive=exclusive)
    except WriteError as err:
        raise StoreError(str(err)) from err
    except OSError as err:
        raise StoreError(f"could not write {what} to {path}: {err}") from err


# ----------------------------------------------------------------------------------------------------
# records
def to_reference_record(record: dict, index: int | None = None) -> dict:
    """A copy of ``record`` with the reference key order and types.

    Schema keys first (those present), then ``architecture``, then the rest in their order;
    ``FID-GT-1k`` becomes numpy.float64, ``quantized_size`` int, the other numbers float."""
    out: dict[str, Any] = {}
    for key in SCHEMA_KEYS:
        if key in record:
            out[key] = record[key]
    if "architecture" in record:
        out["architecture"] = record["architecture"]
    for key, value in record.items():
        if key not in out:
            out[key] = value
    if index is not None:
        if "index" in out and out["index"] != index:
            raise ValueError(f"record carries index {out['index']!r} but is committed as index {index}")
        out["index"] = index
    if "FID-GT-1k" in out:
        out["FID-GT-1k"] = np.float64(out["FID-GT-1k"])
    if "quantized_size" in out:
        out["quantized_size"] = int(out["quantized_size"])
    for key in ("quantized_error", "avg_bits", "bops"):
        if key in out:
            out[key] = float(out[key])
    return out


def _normalise_meta(meta: dict) -> dict:
    """JSON round trip, so that tuples/lists and numpy numbers compare as they will be stored."""
    return json.loads(json.dumps(meta, default=json_default, sort_keys=True))


def load_quant_cache(path: str | os.PathLike, allow_arrays: bool = False, require_config: bool = False) -> list[dict]:
    """Read a ``quant_cache.pkl`` (ours or the reference's) through the restricted unpickler and check
    its records (:func:`check_records`). ``{"records": [...]}`` is accepted too."""
    data = safe_load(path, allow_arrays=allow_arrays)
    if isinstance(data, dict) and "records" in data:
        data = data["records"]
    return check_records(data, str(path), require_config=require_config)


def check_records(records, source: str = "records", require_config: bool = False) -> list[dict]:
    """Refuse what would be silently wrong downstream: a non-list, non-dict records, a 'config' that is
    not a layer -> entry dict, a FID that is a string, a bool or negative, an index given twice.
    Non-finite FIDs stay (a diverged configuration is data; the predictor skips them)."""
    fix = "re-create the file with `qua2sedimo eval-random` or fix the record"
    if not isinstance(records, list):
        raise StoreError(f"{source} is not a quant_cache list of records (got {type(records).__name__}): {fix}")
    seen: dict[int, int] = {}
    for i, r in enumerate(records):
        if not isinstance(r, dict):
            raise StoreError(f"{source}: record {i} is a {type(r).__name__}, not a dict: {fix}")
        config = r.get("config")
        if config is None and require_config:
            raise StoreError(f"{source}: record {i} has no 'config' (layer -> option): {fix}")
        if config is not None and not (isinstance(config, dict) and all(
                isinstance(v, str) or isinstance(v, (list, tuple)) and v and isinstance(v[0], str)
                for v in config.values())):
            raise StoreError(f"{source}: record {i} 'config' must map layers to 'method-bits' entries: {fix}")
        for key in ("FID-GT-1k", "FID-FP-1k"):
            if key in r:
                fid = r[key]
                if isinstance(fid, (bool, np.bool_)) or not isinstance(fid, (int, float, np.integer, np.floating)):
                    raise StoreError(f"{source}: record {i} {key} is {fid!r:.40} ({type(fid).__name__}), not a number: {fix}")
                if float(fid) < -_FID_NOISE:  # eigh gives ~ -1e-5 for identical sets; that is a zero
                    raise StoreError(f"{source}: record {i} {key} is negative ({float(fid)}); a FID is >= 0: {fix}")
        if "index" in r:
            index = r["index"]
            if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
                raise StoreError(f"{source}: record {i} index is {index!r:.40}, not an integer: {fix}")
            if int(index) in seen:
                raise StoreError(f"{source}: records {seen[int(index)]} and {i} both carry index {int(index)} "
                                 f"(duplicate configuration): keep one")
            seen[int(index)] = i
    return records


class RecordStore:
    """Crash-safe, resumable store of scored configurations (see module doc).

    >>> store = RecordStore("results/run1", {"model": "pixart_alpha", "seed": 42, "num_images": 1000})
    >>> for i in range(500):
    ...     if i in store.done_indices(): continue
    ...     store.commit(i, score(i))
    """

    META_FILE = "run_meta.json"
    RECORD_DIR = "records"
    CLAIM_DIR = "claims"  # claims/000042.claim: a live process is scoring configuration 42
    CACHE_FILE = "quant_cache.pkl"
    LOCK_FILE = ".lock"

    def __init__(self, outdir: str | os.PathLike, run_meta: dict, required_keys: tuple[str, ...] = SCHEMA_KEYS,
                 allow_arrays: bool = False):
        self.outdir = Path(outdir)
        self.required_keys = tuple(required_keys)
        self.allow_arrays = allow_arrays
        self._records: dict[int, dict] = {}
        if not isinstance(run_meta, dict):
            raise TypeError(f"run_meta must be a dict, got {type(run_meta).__name__}")
        self.run_meta = _normalise_meta(run_meta)
        self._open_dirs()
        self._check_or_write_meta()
        self._remove_stale_temps()
        with self._locked():
            if not self._scan() and self.cache_path.exists():
                self._adopt_cache()
            self._refresh()
            self._write_cache()  # the previous process may have died between record and cache

    # -- paths ---------------------------------------------------------------------------------------
    @property
    def record_dir(self) -> Path:
        return self.outdir / self.RECORD_DIR

    @property
    def cache_path(self) -> Path:
        return self.outdir / self.CACHE_FILE

    def record_path(self, index: int) -> Path:
        return self.record_dir / f"{index:06d}.pkl"

    def claim_path(self, index: int) -> Path:
        return self.outdir / self.CLAIM_DIR / f"{index:06d}.claim"

    # -- opening ---------------------------------------------------------------------------------------
    def _open_dirs(self) -> None:
        if self.outdir.exists() and not self.outdir.is_dir():
            raise StoreError(f"result directory {self.outdir} exists but is not a directory")
        try:
            self.record_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise StoreError(f"cannot create result directory {self.record_dir}: {err.strerror or err}") from err
        if not os.access(self.record_dir, os.W_OK | os.X_OK):
            raise StoreError(f"result directory {self.record_dir} is not writable")

    def _check_or_write_meta(self) -> None:
        meta_path = self.outdir / self.META_FILE
        if not meta_path.exists():
            if self.cache_path.exists() and not self._scan():
                raise StoreError(f"{self.outdir} holds {self.CACHE_FILE} but no {self.META_FILE}: nothing says which "
                                 f"settings scored it, so no run may add to it. Use another output directory.")
            data = (json.dumps(self.run_meta, indent=2, sort_keys=True) + "\n").encode()
            # Create-if-absent atomically: losing the race to another rank is fine (its file is the same).
            _write(meta_path, data, "run metadata", exclusive=True)
        try:
            stored = json.loads(meta_path.read_text())
        except (OSError, ValueError) as err:
            raise StoreError(f"cannot read run metadata {meta_path}: {err}") from err
        def value(meta, key):
            found = meta.get(key, ADDED_RUN_KEYS.get(key, _MISSING))
            if isinstance(found, dict) and key in NOT_RUN_IDENTITY_NESTED:
                found = {k: v for k, v in found.items() if k not in NOT_RUN_IDENTITY_NESTED[key]}
            return found

        def as_written_now(key, old, new):
            if key == "sampler" and isinstance(old, dict) and isinstance(new, dict) and old.get("pipeline") is None \
                    and (old.get("conditioning"), new.get("conditioning")) == _MODULE_CONDITIONING_RENAMED:
                return dict(old, conditioning=new["conditioning"])
            return old

        differing = sorted(k for k in (set(stored) | set(self.run_meta)) - set(NOT_RUN_IDENTITY)
                           if value(stored, k) is not ANY_VALUE and value(self.run_meta, k) is not ANY_VALUE
                           and as_written_now(k, value(stored, k), value(self.run_meta, k)) != value(self.run_meta, k))
        if differing:
            def short(v):
                text = repr(v)
                return text if len(text) <= 70 else text[:67] + "..."

            details = "; ".join(f"{k}: stored {short(stored.get(k, '<absent>'))}, given "
                                f"{short(self.run_meta.get(k, '<absent>'))}" for k in differing)
            hint = (" (records of another multiquantizer checkpoint never mix: pass the checkpoint this run used "
                    "with --mq)" if any(k.startswith("multiquantizer") for k in differing) else "")
            if "user_code" in differing:
                hint += (" (the source files of the family's sampler or metric changed since this run: its records "
                         "were scored by the old code)")
            raise RunMetaMismatchError(
                f"{self.outdir} holds a run with different settings ({', '.join(differing)}){hint}: {details}. "
                f"Use another output directory, or the same settings to resume.")

    def _adopt_cache(self) -> None:
        """A run directory that holds only ``quant_cache.pkl`` (a dataset shipped as one file): its records become
        the committed ones, so a resumed run scores only what is missing and never writes a shorter cache over
        it. Its run_meta.json has been checked against this run's settings already."""
        written: set[int] = set()
        for position, record in enumerate(load_quant_cache(self.cache_path, allow_arrays=self.allow_arrays)):
            index = int(record.get("index", position))  # the reference's caches are in index order, unindexed
            if index in written:
                raise StoreError(f"{self.cache_path}: two records would be configuration {index}: keep one")
            written.add(index)
            _write(self.record_path(index), pickle.dumps(record, protocol=PICKLE_PROTOCOL), f"record {index}")

    def _remove_stale_temps(self) -> None:
        """Delete temp files of writers that died mid-write (same host, pid gone; or a day old)."""
        for directory in (self.outdir, self.record_dir):
            remove_stale_temps_in(directory)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(self.outdir / self.LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    # -- reading ---------------------------------------------------------------------------------------
    def _scan(self) -> set[int]:
        return {int(m.group(1)) for p in self.record_dir.iterdir() if (m := _RECORD_NAME.match(p.name))}

    def _refresh(self) -> None:
        """Load records committed (by any process) since the last look."""
        for index in sorted(self._scan() - set(self._records)):
            path = self.record_path(index)
            try:
                record = safe_load(path, allow_arrays=self.allow_arrays)
            except Exception as err:  # a committed file is complete by construction; anything else is foreign
                raise StoreError(f"cannot read committed record {path}: {err}") from err
            self._records[index] = record

    def done_indices(self) -> set[int]:
        """Indices committed so far (by this or any other process sharing the directory)."""
        return self._scan()

    def records(self) -> list[dict]:
        """All committed records in index order (the content of ``quant_cache.pkl``)."""
        with self._locked():
            self._refresh()
        return [self._records[i] for i in sorted(self._records)]

    def __len__(self) -> int:
        return len(self.done_indices())

    # -- writing ---------------------------------------------------------------------------------------
    def commit(self, index: int, record: dict, overwrite: bool = False) -> Path:
        """Atomically store the scored configuration ``index``, then rebuild ``quant_cache.pkl``.

        Returns the record's path. Raises :class:`DuplicateRecordError` if ``index`` is already
        committed (unless ``overwrite``)."""
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or index < 0:
            raise ValueError(f"index must be a non-negative int, got {index!r}")
        index = int(index)
        missing = [k for k in self.required_keys if k not in record]
        if missing:
            raise ValueError(f"record {index} lacks required keys {missing}")
        for key in ("quantized_error", "avg_bits", "bops", "FID-GT-1k"):
            value = record.get(key)
            if isinstance(value, (int, float, np.number)) and not math.isfinite(float(value)):
                # Stored as-is (a diverged config is data), but say so early.
                warnings.warn(f"record {index}: {key} is {record[key]}", RuntimeWarning, stacklevel=2)
        record = to_reference_record(record, index)
        data = pickle.dumps(record, protocol=PICKLE_PROTOCOL)
        try:  # what is committed must be readable by the restricted loader, so check before writing
            safe_loads(data, allow_arrays=self.allow_arrays)
        except pickle.UnpicklingError as err:
            raise TypeError(f"record {index} holds a value the result files do not allow: {err}") from err
        path = self.record_path(index)
        with self._locked():
            if path.exists() and not overwrite:
                raise DuplicateRecordError(f"configuration {index} is already committed in {path}")
            _write(path, data, f"record {index}")
            self._records[index] = record
            self._refresh()
            self._write_cache()
        self.release(index)
        return path

    # -- sharing one directory between processes ------------------------------------------------------
    def claim(self, index: int) -> bool:
        """Reserve configuration ``index`` for this process. False when it is committed already or another
        live process holds it (a dead process's claim, same host, is taken over; any claim a day old too),
        so several processes on one directory share the work and never score one index twice."""
        path = self.claim_path(int(index))
        with self._locked():
            if self.record_path(int(index)).exists():
                return False
            try:
                holder = path.read_text().split()
            except (FileNotFoundError, ValueError):
                holder = None
            if holder and not self._mine(holder):
                host, pid, since = (holder + ["", "0", "0"])[:3]
                stale = (host == _HOST and pid.isdigit() and not pid_alive(int(pid))) or \
                    time.time() - float(since or 0) > 86400
                if not stale:
                    return False
            path.parent.mkdir(exist_ok=True)
            _write(path, f"{_HOST} {os.getpid()} {time.time():.0f}".encode(), f"claim {index}")
            return True

    def release(self, index: int) -> None:
        """Drop this process's claim on ``index`` (commit does it too)."""
        path = self.claim_path(int(index))
        try:
            if self._mine(path.read_text().split()):
                path.unlink()
        except (FileNotFoundError, ValueError):
            pass

    @staticmethod
    def _mine(holder: list[str]) -> bool:
        return holder[:2] == [_HOST, str(os.getpid())]

    def _write_cache(self) -> None:
        records = [self._records[i] for i in sorted(self._records)]
        _write(self.cache_path, pickle.dumps(records, protocol=PICKLE_PROTOCOL), "quant_cache")


_MISSING = object()
