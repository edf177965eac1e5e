"""Restricted, memory-safe unpickling for result files (``quant_cache.pkl``, per-record files, configs).

Pickles can run arbitrary code on load, and even "harmless" globals are dangerous: ``numpy.dtype``
with a crafted BUILD state reads out of bounds, ``bytearray(2**31)`` allocates gigabytes from a few
bytes. Result files are exchanged between machines and people, so they are read with an allow-list of
exactly what the reference's files contain:

- plain containers and scalars (dict, list, tuple, str, bytes, int, float, bool, None; set, frozenset,
  complex and ``_codecs.encode`` as protocol 2 spells them), ``collections.OrderedDict``;
- numpy scalars of plain numeric dtypes (bool, int8..int64, uint8..uint64, float16..float64,
  complex64/128), whose dtype must carry numpy's own default state (no fields, offsets or metadata);
- numpy arrays of those dtypes, only when the caller asks for them (``allow_arrays=True``), built
  from exactly as many bytes as their shape needs.

Every other global, BUILD state or opcode that could call out raises :class:`UnsafePickleError`
(a :class:`~multiquant.errors.UserError`). Sizes are capped: the input (``max_bytes``) and everything
the allowed constructors create or copy (a budget proportional to the input), so memory stays linear
in the file size. A truncated, empty or corrupt file raises :class:`CorruptPickleError`.

The pure-Python unpickler is used because its opcodes can be checked one by one (the C one cannot).
"""
from __future__ import annotations

import io
import os
import pickle
from collections import OrderedDict
from pathlib import Path
from typing import IO, Any

from .errors import MissingFileError, UserError

__all__ = ["UnsafePickleError", "CorruptPickleError", "safe_load", "safe_loads", "MAX_PICKLE_BYTES"]

MAX_PICKLE_BYTES = 2 << 30  # 2 GiB: far above any result file (a 500-config PixArt cache is tens of MB)
_BUDGET_FACTOR = 4  # constructors may create at most this many bytes per input byte (plus _BUDGET_FLOOR)
_BUDGET_FLOOR = 1 << 20
_MAX_NDIM = 32


class UnsafePickleError(UserError, pickle.UnpicklingError):
    """The pickle references a global, state or size outside the allow-list."""


class CorruptPickleError(UserError, pickle.UnpicklingError):
    """The file is not a complete pickle (empty, truncated or corrupt)."""


# numpy dtypes a result file may hold: fixed-size numbers only (no object, void/structured, string,
# datetime dtypes: those carry state that numpy trusts).
_PLAIN_DTYPES = frozenset({"b1", "?", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "f2", "f4", "f8", "c8", "c16"})
_BYTEORDERS = frozenset({"<", ">", "|", "="})


class _NDArrayType:
    """Stands in for ``numpy.ndarray`` as an argument of ``_reconstruct`` (never instantiable)."""


_NDARRAY = _NDArrayType()


def _short(value) -> str:
    """A bounded repr for messages: values from a hostile pickle can share references so that their full
    repr is exponentially long (the f-string ``!r:.80`` would build it all before cutting)."""
    import reprlib

    r = reprlib.Repr()
    r.maxlevel, r.maxstring, r.maxother, r.maxlong = 2, 40, 40, 40
    r.maxlist = r.maxtuple = r.maxdict = r.maxset = r.maxfrozenset = 4
    return r.repr(value)[:120]


def _numpy_parts(module: str, name: str) -> tuple[str, str] | None:
    # numpy 1.x pickles "numpy.core.<sub>", numpy 2.x "numpy._core.<sub>"; both resolve here.
    if module == "numpy":
        return "", name
    for prefix in ("numpy.core.", "numpy._core."):
        if module.startswith(prefix):
            return module[len(prefix):], name
    return None


_NUMPY_SCALARS = frozenset({("multiarray", "scalar"), ("", "dtype")})
_NUMPY_ARRAYS = frozenset({("multiarray", "_reconstruct"), ("", "ndarray"), ("numeric", "_frombuffer")})


def _dtype_name(name: Any) -> str:
    if not isinstance(name, str) or name.lstrip("<>|=") not in _PLAIN_DTYPES:
        raise UnsafePickleError(f"refusing numpy dtype {_short(name)}: only plain numeric dtypes are allowed")
    return name


def _checked_dtype(dtype: Any):
    import numpy as np

    if not isinstance(dtype, np.dtype) or dtype.fields is not None or dtype.subdtype is not None \
            or dtype.metadata is not None or dtype.str.lstrip("<>|=") not in _PLAIN_DTYPES:
        raise UnsafePickleError(f"refusing numpy value of dtype {_short(dtype)}: only plain numeric dtypes are allowed")
    return dtype


def _checked_shape(shape: Any) -> tuple[int, ...]:
    if not isinstance(shape, tuple) or len(shape) > _MAX_NDIM or not all(
            type(d) is int and 0 <= d < 1 << 48 for d in shape):
        raise UnsafePickleError(f"refusing numpy array shape {_short(shape)}")
    return shape


class _RestrictedUnpickler(pickle._Unpickler):
    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, data: bytes, allow_arrays: bool):
        super().__init__(io.BytesIO(data))
        self.allow_arrays = allow_arrays
        self.budget = _BUDGET_FLOOR + _BUDGET_FACTOR * len(data)

    # ------------------------------------------------------------------------------------ budget
    def _spend(self, nbytes: int) -> None:
        self.budget -= nbytes
        if self.budget < 0:
            raise UnsafePickleError("refusing pickle: it builds far more data than it holds (a decompression bomb)")

    def _sized(self, value):
        try:
            self._spend(len(value) * 8 if isinstance(value, (list, tuple, set, frozenset, dict)) else len(value))
        except TypeError:
            self._spend(16)
        return value

    # ------------------------------------------------------------------------ allowed callables
    def _container(self, kind):
        def build(*args):
            if len(args) > 1 or (args and not isinstance(args[0], (list, tuple, set, frozenset, str, bytes))):
                raise UnsafePickleError(f"refusing {kind.__name__}{_short(args)}: only built from a list")
            if args:
                self._spend(len(args[0]) * 8)
            return self._sized(kind(*args))
        return build

    def _bytes(self, kind):
        def build(*args):
            # bytes(n) / bytearray(n) would allocate n zero bytes: only copies of data are allowed
            if len(args) > 2 or (args and not isinstance(args[0], (bytes, bytearray, str, list))):
                raise UnsafePickleError(f"refusing {kind.__name__}() of {type(args[0]).__name__ if args else ''}")
            if args:
                self._spend(len(args[0]))
            return self._sized(kind(*args))
        return build

    def _complex(self, *args):
        if len(args) > 2 or not all(type(a) in (int, float) for a in args):
            raise UnsafePickleError(f"refusing complex{_short(args)}")
        return complex(*args)

    def _encode(self, obj, encoding="utf-8", *rest):
        if rest or not isinstance(obj, str) or encoding not in ("latin1", "latin-1"):
            raise UnsafePickleError("refusing _codecs.encode other than (str, 'latin1') (protocol 2 bytes)")
        self._spend(len(obj))
        import _codecs

        return _codecs.encode(obj, encoding)

    def _dtype(self, name, align=False, copy=True):
        import numpy as np

        if type(align) is not bool or type(copy) is not bool:
            raise UnsafePickleError(f"refusing numpy dtype arguments {_short((name, align, copy))}")
        return np.dtype(_dtype_name(name))

    def _scalar(self, dtype, data=None):
        import numpy as np

        dtype = _checked_dtype(dtype)
        if not isinstance(data, bytes) or len(data) != dtype.itemsize:
            raise UnsafePickleError(f"refusing numpy scalar of {dtype}: needs exactly {dtype.itemsize} bytes")
        self._spend(dtype.itemsize)
        return np.frombuffer(data, dtype=dtype)[0]

    def _reconstruct(self, subtype, shape, typecode):
        import numpy as np

        if subtype is not _NDARRAY or shape != (0,) or typecode != b"b":
            raise UnsafePickleError(f"refusing numpy _reconstruct{_short((subtype, shape, typecode))}")
        return np.empty(0, dtype="b")  # an empty array whose content BUILD fills in (checked there)

    def _frombuffer(self, buf, dtype, shape, order):
        import numpy as np

        dtype, shape = _checked_dtype(dtype), _checked_shape(shape)
        n = 1
        for d in shape:
            n *= d
        if not isinstance(buf, (bytes, bytearray)) or len(buf) != n * dtype.itemsize or order not in ("C", "F"):
            raise UnsafePickleError(f"refusing numpy array: {len(buf) if hasattr(buf, '__len__') else '?'} bytes "
                                    f"for shape {shape} of {dtype}")
        self._spend(len(buf))
        return np.frombuffer(bytes(buf), dtype=dtype).reshape(shape, order=order).copy(order=order)

    def find_class(self, module: str, name: str) -> Any:
        if module in ("builtins", "__builtin__"):  # protocol <= 2 uses the Python 2 module name
            allowed = {"set": self._container(set), "frozenset": self._container(frozenset),
                       "list": self._container(list), "tuple": self._container(tuple),
                       "bytes": self._bytes(bytes), "bytearray": self._bytes(bytearray), "complex": self._complex}
            if name in allowed:
                return allowed[name]
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        if module == "_codecs" and name == "encode":
            return self._encode
        parts = _numpy_parts(module, name)
        if parts in _NUMPY_SCALARS:
            return self._scalar if parts[1] == "scalar" else self._dtype
        if parts in _NUMPY_ARRAYS and self.allow_arrays:
            return {"_reconstruct": self._reconstruct, "ndarray": _NDARRAY, "_frombuffer": self._frombuffer}[parts[1]]
        hint = " (numpy arrays are refused unless allow_arrays=True)" if parts in _NUMPY_ARRAYS else ""
        raise UnsafePickleError(f"refusing to unpickle global '{module}.{name}': not in the allow-list{hint}")

    def persistent_load(self, pid):
        raise UnsafePickleError(f"refusing to unpickle persistent id {_short(pid)}")

    # --------------------------------------------------------------------------- checked opcodes
    def load_reduce(self):
        func = self.stack[-2]
        if func is OrderedDict:  # OrderedDict() or OrderedDict(list of pairs)
            args = self.stack[-1]
            if not isinstance(args, tuple) or len(args) > 1 or (args and not isinstance(args[0], list)):
                raise UnsafePickleError("refusing OrderedDict built from anything but a list of pairs")
            if args:
                self._spend(len(args[0]) * 16)
        elif not callable(func) or func is _NDARRAY:
            raise UnsafePickleError(f"refusing to call {_short(func)}")
        super().load_reduce()

    dispatch[pickle.REDUCE[0]] = load_reduce

    def load_newobj(self):
        args = self.stack[-1]
        cls = self.stack[-2]
        if cls is not OrderedDict or args != ():
            raise UnsafePickleError(f"refusing to create {_short(cls)} (NEWOBJ)")
        super().load_newobj()

    dispatch[pickle.NEWOBJ[0]] = load_newobj

    def load_newobj_ex(self):
        raise UnsafePickleError("refusing NEWOBJ_EX: no allowed type needs keyword construction")

    dispatch[pickle.NEWOBJ_EX[0]] = load_newobj_ex

    def load_inst(self):
        raise UnsafePickleError("refusing INST: protocol 0 instances are not plain data")

    dispatch[pickle.INST[0]] = load_inst

    def load_obj(self):
        raise UnsafePickleError("refusing OBJ: protocol 1 instances are not plain data")

    dispatch[pickle.OBJ[0]] = load_obj

    def load_build(self):
        """BUILD only fills in numpy dtypes (their default state) and arrays (exact-size data)."""
        import numpy as np

        state, inst = self.stack[-1], self.stack[-2]
        if isinstance(inst, np.dtype):
            # numpy's own state of a plain dtype: (3, byteorder, None, None, None, -1, -1, 0). Anything else
            # (fields, offsets, sizes, flags) is attacker-controlled layout that numpy trusts.
            if not (isinstance(state, tuple) and len(state) == 8 and state[0] == 3 and state[1] in _BYTEORDERS
                    and state[2:5] == (None, None, None) and state[5:] == (-1, -1, 0)):
                raise UnsafePickleError(f"refusing numpy dtype state {_short(state)}")
        elif isinstance(inst, np.ndarray) and self.allow_arrays and inst.size == 0 and inst.dtype == np.int8:
            if not (isinstance(state, tuple) and len(state) == 5 and state[0] == 1):
                raise UnsafePickleError(f"refusing numpy array state {_short(state)}")
            _, shape, dtype, fortran, raw = state
            shape, dtype = _checked_shape(shape), _checked_dtype(dtype)
            n = 1
            for d in shape:
                n *= d
            if type(fortran) is not bool or not isinstance(raw, (bytes, bytearray)) or len(raw) != n * dtype.itemsize:
                raise UnsafePickleError(f"refusing numpy array: data does not match shape {shape} of {dtype}")
            self._spend(len(raw))
        else:
            raise UnsafePickleError(f"refusing BUILD (object state) on {type(inst).__name__}")
        super().load_build()

    dispatch[pickle.BUILD[0]] = load_build


def safe_loads(data: bytes, allow_arrays: bool = False, max_bytes: int = MAX_PICKLE_BYTES, source: str = "pickle") -> Any:
    """Unpickle ``data`` allowing only plain data (see module doc)."""
    if len(data) > max_bytes:
        raise UnsafePickleError(f"{source} is {len(data)} bytes, over the {max_bytes}-byte limit of result files")
    if not data:
        raise CorruptPickleError(f"{source} is empty: re-create it (an interrupted copy or write leaves empty files)")
    try:
        return _RestrictedUnpickler(data, allow_arrays).load()
    except UserError as err:
        if source != "pickle" and source not in str(err):
            raise type(err)(f"{source}: {err}") from None
        raise
    except MemoryError:
        raise UnsafePickleError(f"{source} needs more memory than the machine has: not a result file") from None
    except RecursionError:
        raise UnsafePickleError(f"{source} is nested too deeply to be a result file") from None
    except Exception as err:  # EOFError, struct.error, UnpicklingError, KeyError (bad memo), ... : a damaged file
        raise CorruptPickleError(f"{source} is not a complete pickle ({type(err).__name__}: {err}); it is truncated "
                                 f"or corrupt: re-create it or restore it from a copy") from None


def safe_load(path_or_file: str | os.PathLike | IO[bytes], allow_arrays: bool = False,
              max_bytes: int = MAX_PICKLE_BYTES) -> Any:
    """Unpickle a file (path or binary file object) allowing only plain data (see module doc).

    The whole file is read first (at most ``max_bytes``): a length field inside a pickle then can never
    make a reader allocate more than the file holds."""
    if hasattr(path_or_file, "read"):
        data = path_or_file.read(max_bytes + 1)
        source = str(getattr(path_or_file, "name", "pickle"))
    else:
        path = Path(path_or_file)
        source = str(path)
        try:
            size = path.stat().st_size
            if size > max_bytes:
                raise UnsafePickleError(f"{path} is {size} bytes, over the {max_bytes}-byte limit of result files")
            data = path.read_bytes()
        except FileNotFoundError:
            raise MissingFileError(f"{path} does not exist: check the path") from None
        except IsADirectoryError:
            raise UserError(f"{path} is a directory, not a pickle file: pass the file inside it") from None
        except PermissionError:
            raise UserError(f"{path} is not readable (permission denied): fix its permissions") from None
    return safe_loads(data, allow_arrays=allow_arrays, max_bytes=max_bytes, source=source)
