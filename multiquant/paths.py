"""The project's paths module and the lookups that fall back to what the project ships.

``constants.py`` sits at the repository top level (the design card); a non-editable install puts it at
``multiquant/_top/constants.py``, so that no generic top-level ``constants`` module is installed. Import it as
``from multiquant.paths import constants`` in both layouts (one module object: monkeypatching it works).
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

def _load_constants():
    try:  # a regular install: multiquant/_top/constants.py
        from ._top import constants as module

        return module
    except ImportError:
        pass
    # a source checkout or an editable install: constants.py beside the multiquant folder. Reuse it if it is
    # already imported under its top-level name (one module object), else load it from its file.
    source = Path(__file__).resolve().parent.parent / "constants.py"
    loaded = sys.modules.get("constants")
    if loaded is not None and Path(getattr(loaded, "__file__", "") or "").resolve() == source:
        return loaded
    spec = importlib.util.find_spec("constants") if loaded is None else None
    if spec is not None and spec.origin and Path(spec.origin).resolve() == source:
        return importlib.import_module("constants")
    spec = importlib.util.spec_from_file_location("multiquant._top.constants", source)
    if spec is None or not source.is_file():
        raise ImportError(f"qua2sedimo's constants.py is neither installed (multiquant/_top) nor at {source}: "
                          f"reinstall the package")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


constants = _load_constants()

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
