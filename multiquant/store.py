"""Crash-safe, resumable storage of scored quantization configurations.

Layout of a run directory::

    outdir/
      run_meta.json        what the run measures (model, seed, number of images, metric, ...)
      records/000042.pkl   one committed record per configuration index (pickle protocol 4)
      quant_cache.pkl      every committed record, in index order, in the reference schema

Every file is written to a temporary name, fsync'd and renamed over its final name
(:func:`atomic_write_bytes`), so a crash or SIGKILL at any moment leaves either the old or the new
complete file, never a torn one. A record is *committed* once its ``records/`` file exists;
``quant_cache.pkl`` is rebuilt from the committed records after each commit (and on reopening, in
case the process died between the two steps), so it always is a complete, readable list.
Several processes (e.g. torchrun ranks scoring different indices) may share one directory: the
rebuild runs under a file lock and re-reads records written by the others.
"""
from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import pickle
import re
import socket
import tempfile
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .safe_pickle import safe_load, safe_loads

__all__ = ["RecordStore", "StoreError", "RunMetaMismatchError", "DuplicateRecordError",
           "SCHEMA_KEYS", "atomic_write_bytes", "load_quant_cache", "to_reference_record"]

PICKLE_PROTOCOL = 4  # the reference's quant_cache.pkl protocol; AutoBuild reads it
# Keys of a quant_cache.pkl entry, in the reference's insertion order. `architecture` and extras follow.
SCHEMA_KEYS = ("config", "quantized_size", "quantized_error", "FID-GT-1k", "avg_bits", "bops")
_RECORD_NAME = re.compile(r"^(\d{6,})\.pkl$")
_TMP_PREFIX = ".tmp-"
_HOST = socket.gethostname().replace(".", "_")


def _tmp_prefix(name: str) -> str:
    # Host and pid in the name let a later process tell a dead writer's leftovers from a live one's.
    return f"{_TMP_PREFIX}{name}.{_HOST}.{os.getpid()}."


class StoreError(RuntimeError):
    """A result store cannot be opened or written (bad path, disk full, corrupt file...)."""


class RunMetaMismatchError(StoreError):
    """The directory holds a run with different settings."""


class DuplicateRecordError(StoreError):
    """The index has already been committed."""


# ----------------------------------------------------------------------------------------------------
# atomic files
def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _explain_oserror(err: OSError, path: Path, what: str) -> StoreError:
    if err.errno == errno.ENOSPC:
        return StoreError(f"disk full while writing {what} to {path}: nothing was replaced; "
                          f"free some space on that file system and run again (committed records are kept)")
    if err.errno == errno.EDQUOT:
        return StoreError(f"disk quota exceeded while writing {what} to {path}; nothing was replaced")
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return StoreError(f"no permission to write {what} to {path}: {err.strerror}")
    return StoreError(f"could not write {what} to {path}: {err}")


def atomic_write_bytes(path: str | os.PathLike, data: bytes, what: str = "file") -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the complete new one.

    Temp file in the same directory, fsync, ``os.replace``, fsync of the directory (so the rename
    itself survives a power loss). Raises :class:`StoreError` with a clear message on failure
    (disk full, permission) after removing the temp file."""
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(path.name), dir=path.parent)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        tmp = None
        _fsync_dir(path.parent)
    except OSError as err:
        raise _explain_oserror(err, path, what) from err
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


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
    def default(obj):
        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, os.PathLike):
            return os.fspath(obj)
        raise TypeError(f"run_meta value {obj!r} of type {type(obj).__name__} is not JSON serialisable")

    return json.loads(json.dumps(meta, default=default, sort_keys=True))


def load_quant_cache(path: str | os.PathLike, allow_arrays: bool = False) -> list[dict]:
    """Read a ``quant_cache.pkl`` (ours or the reference's) through the restricted unpickler."""
    data = safe_load(path, allow_arrays=allow_arrays)
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise StoreError(f"{path} is not a quant_cache list of dicts (got {type(data).__name__})")
    return data


class RecordStore:
    """Crash-safe, resumable store of scored configurations (see module doc).

    >>> store = RecordStore("results/run1", {"model": "pixart_alpha", "seed": 42, "num_images": 1000})
    >>> for i in range(500):
    ...     if i in store.done_indices(): continue
    ...     store.commit(i, score(i))
    """

    META_FILE = "run_meta.json"
    RECORD_DIR = "records"
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
            data = (json.dumps(self.run_meta, indent=2, sort_keys=True) + "\n").encode()
            # Create-if-absent atomically: link a complete temp file; losing the race to another rank is fine.
            fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(self.META_FILE), dir=self.outdir)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                try:
                    os.link(tmp, meta_path)
                    _fsync_dir(self.outdir)
                except FileExistsError:
                    pass
            except OSError as err:
                raise _explain_oserror(err, meta_path, "run metadata") from err
            finally:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
        try:
            stored = json.loads(meta_path.read_text())
        except (OSError, ValueError) as err:
            raise StoreError(f"cannot read run metadata {meta_path}: {err}") from err
        differing = sorted(k for k in set(stored) | set(self.run_meta)
                           if stored.get(k, _MISSING) != self.run_meta.get(k, _MISSING))
        if differing:
            lines = [f"  {k}: stored {stored.get(k, '<absent>')!r}, given {self.run_meta.get(k, '<absent>')!r}"
                     for k in differing]
            raise RunMetaMismatchError(
                f"{self.outdir} holds a run with different settings ({', '.join(differing)}):\n" + "\n".join(lines)
                + "\nUse another output directory, or the same settings to resume.")

    def _remove_stale_temps(self) -> None:
        """Delete temp files of writers that died mid-write (same host, pid gone; or a day old)."""
        for directory in (self.outdir, self.record_dir):
            for p in directory.glob(_TMP_PREFIX + "*"):
                parts = p.name.rsplit(".", 3)  # [.tmp-<name>, host, pid, random]
                try:
                    dead = parts[1] == _HOST and not _pid_alive(int(parts[2]))
                except (IndexError, ValueError):
                    dead = False
                try:
                    if dead or time.time() - p.stat().st_mtime > 86400:
                        p.unlink()
                except OSError:
                    pass

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
            atomic_write_bytes(path, data, what=f"record {index}")
            self._records[index] = record
            self._refresh()
            self._write_cache()
        return path

    def _write_cache(self) -> None:
        records = [self._records[i] for i in sorted(self._records)]
        atomic_write_bytes(self.cache_path, pickle.dumps(records, protocol=PICKLE_PROTOCOL), what="quant_cache")


_MISSING = object()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
