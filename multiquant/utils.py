"""Small shared helpers: the one atomic file writer, progress lines, JSON, figures, devices, images."""
from __future__ import annotations

import contextlib
import errno
import os
import socket
import sys
import threading
import time
from pathlib import Path

from .errors import UserError, WriteError

_HOST = socket.gethostname().replace(".", "_").replace("-", "_")
_STALE_AFTER_S = 86400  # a temp file this old is a leftover even if its pid was reused


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def default_file_mode() -> int:
    """0o666 minus the process umask: what ``open()`` would give (``mkstemp`` gives 0o600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _temp_path(path: Path) -> Path:
    # host and pid in the name let a later process tell a dead writer's leftovers from a live one's; a thread
    # other than the main one adds its id, so two threads writing one file never share a temp file
    tag = f"{_HOST}-{os.getpid()}"
    if threading.current_thread() is not threading.main_thread():
        tag += f".{threading.get_ident()}"
    return path.with_name(f".{path.name}.tmp-{tag}")


def _remove_dead_temps(candidates) -> list[Path]:
    removed = []
    for tmp in candidates:
        host, _, pid = tmp.name.rpartition(".tmp-")[2].rpartition("-")
        pid = pid.partition(".")[0]  # drop a thread id
        try:
            dead = (host in (_HOST, "") and pid.isdigit() and not pid_alive(int(pid))
                    or time.time() - tmp.stat().st_mtime > _STALE_AFTER_S)
            if dead and int(pid or 0) != os.getpid():
                if tmp.is_dir():
                    import shutil

                    shutil.rmtree(tmp)
                else:
                    tmp.unlink()
                removed.append(tmp)
        except (OSError, ValueError):
            pass
    return removed


def remove_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Delete temp files that :func:`atomic_path` left beside ``path`` when its writer was killed
    (same host and pid gone, or a day old). Returns what was removed."""
    path = Path(path)
    return _remove_dead_temps(path.parent.glob(f".{path.name}.tmp-*"))


def remove_stale_temps_in(directory: str | os.PathLike) -> list[Path]:
    """:func:`remove_stale_temps` for every file of ``directory`` (a result store's folders)."""
    return _remove_dead_temps(Path(directory).glob(".*.tmp-*"))


def check_writable_dir(directory: str | os.PathLike, what: str = "output directory") -> Path:
    """Create ``directory`` if needed and prove it writable with a real temp file, before any long work
    (loading a model) is spent on results that could not be saved."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise UserError(f"the {what} {directory} exists but is not a directory: choose another path")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        import tempfile

        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as err:
        raise UserError(f"the {what} {directory} is not writable ({err.strerror or err}): choose another path "
                        f"or fix its permissions") from None
    return directory


def write_error(err: OSError, path: Path, what: str = "file") -> WriteError | None:
    """The one-line :class:`WriteError` for a failed write the user can fix (disk full, quota, permission,
    read-only file system); ``None`` for other errors, which keep their own type."""
    fixes = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded"}
    if err.errno in fixes:
        message = (f"{fixes[err.errno]} while writing {what} {path}: nothing was replaced; free some space on that "
                   f"file system and run again (finished work is kept)")
    elif err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        message = (f"no permission to write {what} {path} ({err.strerror or err}): choose another path or fix "
                   f"its permissions")
    else:
        return None
    explained = WriteError(message)
    explained.errno, explained.filename = err.errno, str(path)
    return explained


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, what: str = "file", exclusive: bool = False):
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one rename, so readers
    never see a half-written file, not even after a crash or power loss (the file and then its directory are
    fsync'd). ``exclusive``: create ``path`` only if absent (a hard link, so a file another process put
    there first stays whole and wins). Leftovers of killed writers of the same file are removed first;
    a disk-full or permission failure raises a one-line :class:`WriteError` (``what`` names the file)."""
    path = Path(path)
    remove_stale_temps(path)
    tmp = _temp_path(path)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, default_file_mode())  # results are shared files: the umask's mode, not e.g. mkstemp's 0600
        if exclusive:
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass
        else:
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as err:
        explained = write_error(err, path, what)
        if explained is None:
            raise
        raise explained from err
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_bytes(path: str | os.PathLike, data: bytes, what: str = "file", exclusive: bool = False) -> None:
    """Write ``data`` through :func:`atomic_path`: readers see the old file or the complete new one."""
    with atomic_path(path, what, exclusive=exclusive) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, names: tuple[str, ...]):
    """Yield a temporary directory beside ``path``; on success its files ``names`` replace those of ``path``
    as one set (rename of the whole directory, files and directory fsync'd), so a crash never leaves new
    files beside old ones. Other entries of an existing ``path`` are moved over; leftovers of killed
    writers are removed first."""
    import shutil

    path = Path(path)
    remove_stale_temps(path)
    tmp = _temp_path(path)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        for name in names:
            with open(tmp / name, "rb") as f:
                os.fsync(f.fileno())
            os.chmod(tmp / name, default_file_mode())  # e.g. safetensors creates 0600
        _fsync_dir(tmp)
        if path.exists():
            old = path.with_name(f".{path.name}.old-{_HOST}-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            for entry in old.iterdir():  # what else the user kept there stays
                if entry.name not in names:
                    os.replace(entry, path / entry.name)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def file_sha256(path: str | os.PathLike) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(directory: Path) -> None:
    """fsync a directory so a rename in it survives a power loss; file systems that cannot open or sync a
    directory (EACCES on a write-only folder, EINVAL) are let be: the rename itself is still atomic."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def read_json(path: str | os.PathLike, what: str = "JSON file"):
    """Parse a JSON file the user gave: a missing file, invalid JSON or a key given twice in one object
    (which ``json`` would silently resolve to the last) raise a one-line :class:`UserError` each."""
    import json

    from .errors import InputError, MissingFileError

    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{what} {path} does not exist: check the path")

    def no_duplicates(pairs):
        seen = {}
        for key, value in pairs:
            if key in seen:
                raise InputError(f"{what} {path} gives key {key!r} twice in one object: keep one")
            seen[key] = value
        return seen

    try:
        return json.loads(path.read_text(), object_pairs_hook=no_duplicates)
    except UnicodeDecodeError as err:
        raise InputError(f"{what} {path} is not UTF-8 text ({err.reason}): pass the JSON file itself") from None
    except RecursionError:
        raise InputError(f"{what} {path} is nested too deeply to be a {what}") from None
    except json.JSONDecodeError as err:
        raise InputError(f"{what} {path} is not valid JSON (line {err.lineno}, column {err.colno}: {err.msg}): "
                         f"fix or regenerate it") from None


def _progress_off() -> bool:
    return os.environ.get("QUA2SEDIMO_PROGRESS") == "0"


def _progress_interval(interval: float | None) -> float:
    return float(os.environ.get("QUA2SEDIMO_PROGRESS_INTERVAL", "30")) if interval is None else interval


def progress(iterable, desc: str = "", disable: bool = False, total: int | None = None, unit: str = "it",
             interval: float | None = None):
    """Progress of a long loop, with rate and ETA: a tqdm bar on a terminal; elsewhere (piped, logged) one plain
    line on stderr at most every ``interval`` seconds (default 30; env ``QUA2SEDIMO_PROGRESS_INTERVAL``) and a
    last line when done. ``QUA2SEDIMO_PROGRESS=0`` silences both. :class:`Progress` counts work done in
    chunks (variants, images) instead of loop items."""
    if disable or _progress_off():
        return iterable
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    if sys.stderr.isatty():
        from tqdm.auto import tqdm

        return tqdm(iterable, desc=desc, total=total, unit=unit, mininterval=1.0)
    return _logged_progress(iterable, Progress(total, desc, unit, interval))


def progress_line(desc: str, done: int, total: int | None, elapsed: float, unit: str = "it") -> str:
    """``desc: 120/1000 (12%) 3.4 it/s, ETA 04:19`` (the plain, non-terminal progress line)."""
    rate = done / elapsed if elapsed > 0 else 0.0
    line = f"{desc}: {done}" + (f"/{total} ({100 * done / total:.0f}%)" if total else "")
    line += f" {rate:.2f} {unit}/s" if rate < 10 else f" {rate:.0f} {unit}/s"
    if total and rate > 0 and done < total:
        eta = (total - done) / rate
        line += f", ETA {int(eta // 3600):d}:{int(eta % 3600 // 60):02d}:{int(eta % 60):02d}"
    elif total and done >= total:
        line += f", done in {elapsed:.0f} s"
    return line


class Progress:
    """Progress of work counted in chunks (``update(n)``: n variants scored, n images made), with rate and ETA:
    a tqdm bar on a terminal, else a plain :func:`progress_line` on stderr at most every ``interval`` seconds
    and a last one at :meth:`close` (when any was printed or the work took that long). A context manager."""

    def __init__(self, total: int | None, desc: str = "", unit: str = "it", interval: float | None = None,
                 disable: bool = False):
        self.total, self.desc, self.unit = total, desc, unit
        self.interval = _progress_interval(interval)
        self.off = disable or _progress_off()
        self.bar = None
        if not self.off and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(desc=desc, total=total, unit=unit, mininterval=1.0)
        self.start = self.last = time.monotonic()
        self.done = self.shown = 0

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.monotonic()
        if not self.off and now - self.last >= self.interval:
            self.last, self.shown = now, self.done
            self._print(now)

    def drop(self, n: int = 1) -> None:
        """``n`` of the total will not be done here after all (another process did them)."""
        self.total = None if self.total is None else self.total - n
        if self.bar is not None:
            self.bar.total = self.total
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif not self.off and self.done and self.shown != self.done and time.monotonic() - self.start >= self.interval:
            self._print(time.monotonic())

    def _print(self, now: float) -> None:
        print(progress_line(self.desc, self.done, self.total, now - self.start, self.unit), file=sys.stderr, flush=True)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _logged_progress(iterable, counter: Progress):
    for item in iterable:
        yield item
        counter.update()
    counter.close()


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write a text file in one rename (parents created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return path


def save_figure(fig, path: str | os.PathLike, close: bool = True, **savefig_kwargs) -> Path:
    """Save a matplotlib figure atomically (format from the suffix, PNG by default; ``savefig_kwargs`` go to
    ``savefig``, tight bounding box unless given) and close it unless ``close`` is False (the one figure saver)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    savefig_kwargs.setdefault("bbox_inches", "tight")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".").lower() or "png", **savefig_kwargs)
    if close:
        import matplotlib.pyplot as plt

        plt.close(fig)
    return path


def from_pretrained_kwargs(dtype) -> dict:
    """Keyword arguments for a diffusers ``from_pretrained`` that load in ``dtype`` without library noise:
    the dtype under the name this diffusers wants (``dtype``; newer versions deprecate ``torch_dtype`` with a
    warning), and ``low_cpu_mem_usage=False`` when accelerate is absent (diffusers falls back to it anyway,
    after a five-line warning on every load)."""
    import importlib.util

    try:
        from diffusers.utils import deprecation_utils

        dtype_name = "dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype"
    except ImportError:  # older diffusers: only torch_dtype exists
        dtype_name = "torch_dtype"
    kwargs = {dtype_name: dtype}
    if importlib.util.find_spec("accelerate") is None:
        kwargs["low_cpu_mem_usage"] = False
    return kwargs


def cast_module(model, dtype):
    """``model.to(dtype)``; for a diffusers model that keeps no module in float32, through ``nn.Module.to``,
    which skips diffusers' warning about ``_keep_in_fp32_modules`` (it warns even when the list is empty)."""
    from torch import nn

    if isinstance(model, nn.Module) and not getattr(model, "_keep_in_fp32_modules", None):
        return nn.Module.to(model, dtype)
    return model.to(dtype)


def default_device(device=None):
    """``device`` as a ``torch.device``; when not given, CUDA if available, else the CPU (the one default)."""
    import torch

    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def json_default(o):
    """``json.dumps(..., default=json_default)``: numpy scalars / arrays and tensors as plain numbers / lists,
    paths as strings (the one encoder for every JSON file the project writes)."""
    import numpy as np

    if isinstance(o, (np.integer, np.floating, np.bool_)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if type(o).__module__.startswith("torch") and hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed); pair with :func:`save_figure`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def to_uint8(images, value_range: tuple[float, float] = (0.0, 1.0)):
    """Float images in ``value_range`` ((0, 1) for decoded pipelines, (-1, 1) for model space) -> uint8 on the
    CPU, clamped and rounded as diffusers does before saving a PNG (the one conversion)."""
    import torch

    low, high = value_range
    scaled = (images.float() - low) * (255.0 / (high - low))
    return scaled.round().clamp(0, 255).to(torch.uint8).cpu()
