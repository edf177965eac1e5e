"""Restricted unpickling for result files (``quant_cache.pkl``, per-record files).

Pickles can run arbitrary code on load. Result files are exchanged between machines and people,
so they are read with an allow-list: plain containers and scalars, ``OrderedDict``, numpy scalars
and dtypes, and numpy arrays only when the caller asks for them. Anything else raises
:class:`UnsafePickleError` naming the refused global.
"""
from __future__ import annotations

import importlib
import io
import os
import pickle
from typing import IO, Any

__all__ = ["UnsafePickleError", "safe_load", "safe_loads"]


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle references a global outside the allow-list."""


# Immutable values and containers only: none of these can call out of the unpickler.
_BUILTINS = frozenset({"set", "frozenset", "complex", "bytearray", "bytes", "slice", "range", "list", "dict",
                       "tuple", "int", "float", "str", "bool"})

# numpy globals as (submodule, name); numpy 1.x pickles "numpy.core.<sub>", numpy 2.x "numpy._core.<sub>".
# Both spellings are accepted and resolved on the installed numpy.
_NUMPY_SCALARS = frozenset({("multiarray", "scalar"), ("", "dtype")})
_NUMPY_ARRAYS = frozenset({("multiarray", "_reconstruct"), ("", "ndarray"), ("numeric", "_frombuffer")})


def _numpy_parts(module: str, name: str) -> tuple[str, str] | None:
    if module == "numpy":
        return "", name
    for prefix in ("numpy.core.", "numpy._core."):
        if module.startswith(prefix):
            return module[len(prefix):], name
    return None


def _resolve_numpy(module: str, name: str, allow_arrays: bool) -> Any:
    parts = _numpy_parts(module, name)
    allowed = _NUMPY_SCALARS | (_NUMPY_ARRAYS if allow_arrays else frozenset())
    if parts is None or parts not in allowed:
        return None
    sub, attr = parts
    import numpy as np

    if not sub:
        return getattr(np, attr)
    try:
        return getattr(importlib.import_module(f"numpy._core.{sub}"), attr)
    except ImportError:  # numpy < 1.26 has no numpy._core
        return getattr(importlib.import_module(f"numpy.core.{sub}"), attr)


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: IO[bytes], allow_arrays: bool):
        super().__init__(file)
        self.allow_arrays = allow_arrays

    def find_class(self, module: str, name: str) -> Any:
        if module == "__builtin__":  # protocol <= 2 uses the Python 2 module name
            module = "builtins"
        if module == "builtins" and name in _BUILTINS:
            import builtins

            return getattr(builtins, name)
        if module == "collections" and name == "OrderedDict":
            import collections

            return collections.OrderedDict
        if module == "_codecs" and name == "encode":  # protocol <= 2 spells bytes as encode(str, "latin1")
            import _codecs

            return _codecs.encode
        resolved = _resolve_numpy(module, name, self.allow_arrays)
        if resolved is not None:
            return resolved
        hint = ""
        if not self.allow_arrays and _numpy_parts(module, name) in _NUMPY_ARRAYS:
            hint = " (numpy arrays are refused unless allow_arrays=True)"
        raise UnsafePickleError(f"refusing to unpickle global '{module}.{name}': not in the allow-list{hint}")

    def persistent_load(self, pid):
        raise UnsafePickleError(f"refusing to unpickle persistent id {pid!r}")


def safe_loads(data: bytes, allow_arrays: bool = False) -> Any:
    """Unpickle ``data`` allowing only plain data (see module doc)."""
    return _RestrictedUnpickler(io.BytesIO(data), allow_arrays).load()


def safe_load(path_or_file: str | os.PathLike | IO[bytes], allow_arrays: bool = False) -> Any:
    """Unpickle a file (path or binary file object) allowing only plain data (see module doc)."""
    if hasattr(path_or_file, "read"):
        return _RestrictedUnpickler(path_or_file, allow_arrays).load()
    with open(path_or_file, "rb") as f:
        return _RestrictedUnpickler(f, allow_arrays).load()
