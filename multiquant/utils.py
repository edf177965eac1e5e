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
