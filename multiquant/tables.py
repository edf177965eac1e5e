"""Scored configurations as a pandas DataFrame, for users' own analysis, and its CSV / Parquet export.

    frame = records_frame("quant_caches/mnist_dit/quant_cache.pkl")       # one row per configuration
    frame.sort_values("FID-GT-1k").head()
    write_table(frame, "scores.csv")                                     # or .parquet (needs pyarrow)

Columns: every scalar of the records (``index``, ``avg_bits``, ``FID-GT-1k``, proxies, ``name`` ...) plus
``n_<option>`` (how many layers use each option); ``layer_options=True`` adds one column per layer holding its
option string. The record files stay the reference's pickles; this is a view of them.
"""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Mapping, Sequence

from .errors import UserError

__all__ = ["records_frame", "write_table"]


def _option(entry) -> str:
    return entry[0] if isinstance(entry, (list, tuple)) else str(entry)


def records_frame(source: str | os.PathLike | Sequence[Mapping], layer_options: bool = False):
    """A DataFrame of scored records (a ``quant_cache.pkl`` path, read with the restricted loader, or records)."""
    import pandas as pd

    if isinstance(source, (str, os.PathLike)):
        from .store import load_quant_cache

        source = load_quant_cache(source)
    rows = []
    for record in source:
        row = {k: (v.item() if hasattr(v, "item") else v) for k, v in record.items()
               if isinstance(v, (int, float, str, bool)) or hasattr(v, "item")}
        config = record.get("config") or {}
        row.update({f"n_{option}": n for option, n in sorted(Counter(_option(e) for e in config.values()).items())})
        if layer_options:
            row.update({key: _option(entry) for key, entry in config.items()})
        rows.append(row)
    frame = pd.DataFrame(rows)
    counts = [c for c in frame.columns if c.startswith("n_")]
    frame[counts] = frame[counts].fillna(0).astype(int)
    return frame


def write_table(frame, path: str | os.PathLike) -> Path:
    """Write ``frame`` as ``.csv`` or ``.parquet`` (atomically)."""
    from .utils import atomic_path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix not in (".csv", ".parquet"):
        raise UserError(f"{path}: write the table as .csv or .parquet")
    with atomic_path(path) as tmp:
        if path.suffix == ".csv":
            frame.to_csv(tmp, index=False)
        else:
            try:
                frame.to_parquet(tmp, index=False)
            except ImportError as err:
                raise UserError(f"writing {path.name} needs a Parquet engine ({err}): pip install pyarrow, or "
                                f"write .csv") from None
    return path
