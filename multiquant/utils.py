"""Small shared helpers: atomic file writes and progress bars."""
from __future__ import annotations

import contextlib
import errno
import os
import sys
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one rename, so readers
    never see a half-written file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise OSError(err.errno, f"disk full while writing {path}: free space and re-run (finished work is kept)") from err
        raise
    finally:
        if tmp.exists():
            tmp.unlink()


def progress(iterable, desc: str = "", disable: bool = False, total: int | None = None):
    """A tqdm progress bar on stderr (quiet when not a terminal unless QUA2SEDIMO_PROGRESS=1)."""
    from tqdm.auto import tqdm

    show = not disable and (sys.stderr.isatty() or os.environ.get("QUA2SEDIMO_PROGRESS") == "1")
    return tqdm(iterable, desc=desc, disable=not show, total=total, mininterval=1.0)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write a text file in one rename (parents created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return path


def save_figure(fig, path: str | os.PathLike) -> Path:
    """Save a matplotlib figure as PNG atomically and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")
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
