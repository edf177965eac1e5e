"""The project's paths module and the lookups that fall back to what the project ships.

``constants.py`` sits at the repository top level (the design card); a non-editable install puts it at
``multiquant/_top/constants.py``, so that no generic top-level ``constants`` module is installed. Import it as
``from multiquant.paths import constants`` in both layouts (one module object: monkeypatching it works).
"""
from __future__ import annotations

from pathlib import Path

try:  # installed
    from ._top import constants
except ImportError:  # a source checkout: the repository root is on sys.path
    import constants

__all__ = ["constants", "multiquantizer_path", "shipped_cache"]


def multiquantizer_path(name: str) -> Path:
    """``<MULTIQUANTIZER_DIR>/<name>`` if it exists there (the user's own build), else the shipped checkpoint of
    that name if the project ships one, else the user's path (where a build will write it)."""
    own = Path(constants.MULTIQUANTIZER_DIR) / name
    shipped = Path(constants.SHIPPED_MULTIQUANTIZER_DIR) / name
    return own if own.exists() or not shipped.exists() else shipped


def shipped_cache(model: str) -> Path:
    """The shipped pre-scored dataset of ``model`` (``quant_caches/<model>/quant_cache.pkl``)."""
    return Path(constants.SHIPPED_CACHE_DIR) / model / "quant_cache.pkl"
