"""The restricted unpickler: crafted and fuzzed pickles never crash, never run code, never allocate much.

Crafted cases are the ones found against the previous allow-list: a numpy dtype BUILD state with a field
at an out-of-bounds offset (heap reads, segfault) and tiny pickles that allocate gigabytes. Fuzzed and
crafted inputs run in a subprocess, so a segfault fails the test instead of killing pytest.
"""
from __future__ import annotations

import os
import pickle
import struct
import subprocess
import sys
import textwrap
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest

from multiquant.errors import UserError
from multiquant.safe_pickle import CorruptPickleError, UnsafePickleError, safe_load, safe_loads

ROOT = Path(__file__).resolve().parents[1]


def _frame(body: bytes, protocol: int = 4) -> bytes:
    return bytes([pickle.PROTO[0], protocol]) + body + pickle.STOP


def _global(module: str, name: str) -> bytes:
    return (b"\x8c" + bytes([len(module)]) + module.encode() + b"\x8c" + bytes([len(name)]) + name.encode()
            + pickle.STACK_GLOBAL)


def _crafted_dtype_offsets() -> bytes:
    """np.dtype('V8') with BUILD state naming a float64 field at offset 2**30 (out of bounds)."""
    f8 = _global("numpy", "dtype") + b"\x8c\x02f8\x89\x88\x87R" + b"(K\x03\x8c\x01<NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
    fields = b"}\x8c\x01a" + f8 + b"J\x00\x00\x00\x40\x86s"  # {"a": (f8, 2**30)}
    state = b"(K\x03\x8c\x01|N\x8c\x01a\x85" + fields + b"K\x08K\x01K\x10tb"
    dtype = _global("numpy", "dtype") + b"\x8c\x02V8\x89\x88\x87R" + state
    return _frame(_global("numpy._core.multiarray", "scalar") + dtype + b"C\x08" + b"A" * 8 + b"\x86R")


def _crafted_plain_dtype_with_state(state: bytes) -> bytes:
    return _frame(_global("numpy", "dtype") + b"\x8c\x02f8\x89\x88\x87R" + state + b"b")


def _exponential_repr() -> bytes:
    """complex(L40) where L(k+1) = [Lk, Lk]: 2**40 elements by shared references in ~500 bytes; an error
    message that printed the argument's full repr would never finish (or fill the memory)."""
    nested = [None]
    for _ in range(40):
        nested = [nested, nested]
    body = pickle.dumps(nested, protocol=4)
    body = body[2:-1]  # strip PROTO and STOP
    if body[:1] == pickle.FRAME:
        body = body[9:]
    return _frame(_global("builtins", "complex") + body + pickle.TUPLE1 + pickle.REDUCE)


CRAFTED = {
    "exponential_repr_in_message": _exponential_repr(),
    "dtype_field_offset_out_of_bounds": _crafted_dtype_offsets(),
    "dtype_f8_with_fields_state": _crafted_plain_dtype_with_state(
        b"(K\x03\x8c\x01<N}\x8c\x01a" + b"N\x8a\x05\x00\x00\x00\x00\x01\x86s" + b"NJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00t"),
    "dtype_f8_with_itemsize_state": _crafted_plain_dtype_with_state(
        b"(K\x03\x8c\x01<NNNJ\x00\x00\x00\x40J\xff\xff\xff\xffK\x00t"),
    "object_dtype": _frame(_global("numpy", "dtype") + b"\x8c\x02O8\x89\x88\x87R."),
    "bytearray_2_4_GB": _frame(_global("builtins", "bytearray") + b"\x8a\x05\x00\x00\x10\x8f\x00\x85R"),
    "bytes_2_4_GB": _frame(_global("builtins", "bytes") + b"\x8a\x05\x00\x00\x10\x8f\x00\x85R"),
    "binbytes8_length_2_4_GB": _frame(b"\x8e" + struct.pack("<Q", 2_400_000_000) + b"xx"),
    "frame_length_2_4_GB": b"\x80\x04\x95" + struct.pack("<Q", 2_400_000_000) + b"N.",
    "list_copy_bomb": _frame(b"](" + b"N" * 1000 + b"e\x94" + b"]" + (_global("builtins", "list") + b"h\x00\x85Ra") * 2000),
    "scalar_short_data": _frame(_global("numpy._core.multiarray", "scalar") + _global("numpy", "dtype")
                                + b"\x8c\x02f8\x89\x88\x87R" + b"C\x02AA\x86R"),
    "ndarray_newobj_huge": _frame(_global("numpy", "ndarray") + b"\x8a\x05\x00\x00\x10\x8f\x00\x85\x85\x81"),
    "orderedict_build_state": _frame(_global("collections", "OrderedDict") + b")R}\x8c\x01ab"),
    "os_system": pickle.dumps(os.system),
}

# What a crafted case may do in a fresh interpreter: raise a UserError, with peak memory well below this.
_MAX_RSS_GROWTH_MB = 200

_RUNNER = textwrap.dedent("""
    import resource, sys, pickle
    import numpy as np
    from multiquant.errors import UserError
    from multiquant.safe_pickle import safe_loads
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    blobs = pickle.loads(sys.stdin.buffer.read())
    outcomes = {}
    for name, blob in blobs:
        try:
            safe_loads(blob, allow_arrays=True)
            outcomes[name] = "loaded"
        except UserError as err:
            outcomes[name] = "UserError"
        except BaseException as err:
            outcomes[name] = f"{type(err).__name__}: {err}"
    growth = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    print(repr((outcomes, growth)))
""")


def _run_isolated(blobs: list[tuple[str, bytes]]) -> tuple[dict, float]:
    """Unpickle each blob in a fresh interpreter; returns ({name: outcome}, peak RSS growth in MB)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", _RUNNER], input=pickle.dumps(blobs), capture_output=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, f"unpickler process died (rc {proc.returncode}): {proc.stderr.decode()[-2000:]}"
    return eval(proc.stdout.decode().strip().splitlines()[-1])  # our own repr of a dict and a float


def test_crafted_pickles_are_refused_without_crash_or_allocation():
    outcomes, growth = _run_isolated(list(CRAFTED.items()))
    # an over-long frame length is harmless (nothing is allocated for it): it loads the value it holds
    assert outcomes == {name: "loaded" if name == "frame_length_2_4_GB" else "UserError" for name in CRAFTED}, outcomes
    assert growth < _MAX_RSS_GROWTH_MB, f"peak memory grew by {growth:.0f} MB"


def test_crafted_cases_raise_the_right_error_in_process():
    with pytest.raises(UnsafePickleError, match="dtype"):
        safe_loads(CRAFTED["dtype_field_offset_out_of_bounds"])
    with pytest.raises(UnsafePickleError, match="dtype state"):
        safe_loads(CRAFTED["dtype_f8_with_itemsize_state"])
    with pytest.raises(UnsafePickleError, match="bytearray"):
        safe_loads(CRAFTED["bytearray_2_4_GB"])
    with pytest.raises(UnsafePickleError, match="bomb"):
        safe_loads(CRAFTED["list_copy_bomb"])
    with pytest.raises(CorruptPickleError, match="truncated"):
        safe_loads(CRAFTED["binbytes8_length_2_4_GB"])
    with pytest.raises(UnsafePickleError, match="limit"):
        safe_loads(b"\x80\x04N." + b" " * 100, max_bytes=50)


def test_empty_truncated_and_missing_files_are_user_errors(tmp_path):
    good = pickle.dumps([{"FID-GT-1k": np.float64(3.25), "config": OrderedDict(a=["mse-4", 10, 3, 0.5])}], protocol=4)
    (tmp_path / "empty.pkl").write_bytes(b"")
    with pytest.raises(CorruptPickleError, match="empty.pkl is empty"):
        safe_load(tmp_path / "empty.pkl")
    for cut in (1, 5, len(good) // 2, len(good) - 1):
        (tmp_path / "cut.pkl").write_bytes(good[:cut])
        with pytest.raises(CorruptPickleError, match="cut.pkl is not a complete pickle"):
            safe_load(tmp_path / "cut.pkl")
    with pytest.raises(UserError, match="does not exist"):
        safe_load(tmp_path / "missing.pkl")
    with pytest.raises(UserError, match="directory"):
        safe_load(tmp_path)


def test_plain_values_of_every_allowed_kind_round_trip():
    rng = np.random.default_rng()
    value = [OrderedDict(a=float(rng.random()), b=[1, -2**70, None, True, "x"], c=(b"raw", 2.5 + 1j)),
             {"s": {1, 2}, "f": frozenset({3})},
             {f"np_{t}": np.dtype(t).type(rng.integers(0, 100)) for t in ("f2", "f4", "f8", "i1", "i8", "u2", "?")},
             np.dtype(">f4").type(1.5)]
    for protocol in (2, 3, 4, 5):
        loaded = safe_loads(pickle.dumps(value, protocol=protocol))
        assert loaded == value and [type(v) for v in loaded[2].values()] == [type(v) for v in value[2].values()]
    arr = rng.standard_normal((3, 1, 4)).astype(np.float32)
    for protocol in (2, 4, 5):
        out = safe_loads(pickle.dumps({"a": arr, "f": np.asfortranarray(arr)}, protocol=protocol), allow_arrays=True)
        np.testing.assert_array_equal(out["a"], arr)
        np.testing.assert_array_equal(out["f"], arr)
    with pytest.raises(UnsafePickleError, match="dtype"):
        safe_loads(pickle.dumps(np.array(["text"])), allow_arrays=True)
    with pytest.raises(UnsafePickleError):
        safe_loads(pickle.dumps(np.array([{}], dtype=object)), allow_arrays=True)


@pytest.mark.parametrize("path", ["quant_caches/mnist_dit/quant_cache.pkl",
                                  "benchmarks/data/mnist_dit_proxy_100img_cache.pkl"])
def test_shipped_result_files_still_load(path):
    records = safe_load(ROOT / path)
    assert records == pickle.loads((ROOT / path).read_bytes())  # the shipped files are ours, trusted here
    assert all(type(r["FID-GT-1k"]) is np.float64 for r in records)


def _seed_pickles() -> list[bytes]:
    rng = np.random.default_rng(0)
    return [pickle.dumps(v, protocol=p) for p in (2, 4, 5) for v in (
        [{"config": OrderedDict(a=["mse-4", 10, 3, 0.5]), "FID-GT-1k": np.float64(12.5), "s": {1, 2}}],
        {"x": rng.standard_normal((2, 3)), "t": (1j, b"\x00\xff", None)}, np.int64(3), "text")]


def test_fuzzed_pickles_never_crash_or_allocate():
    """Mutations of real pickles (byte flips, insertions, splices, length fields) and random opcode soups."""
    from hypothesis import HealthCheck, given, settings, strategies as st

    seeds = _seed_pickles()
    opcodes = sorted({bytes([op.code.encode("latin1")[0]]) for op in __import__("pickletools").opcodes})
    cases: list[tuple[str, bytes]] = []

    mutation = st.tuples(st.sampled_from(seeds), st.lists(st.tuples(
        st.sampled_from(["flip", "insert", "delete", "len"]), st.integers(0, 10_000), st.integers(0, 255)),
        min_size=1, max_size=6))
    soup = st.lists(st.one_of(st.sampled_from(opcodes), st.binary(max_size=9)), max_size=40)

    @settings(max_examples=400, database=None, derandomize=True, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(mutation, soup)
    def collect(mut, ops):
        blob, edits = bytearray(mut[0]), mut[1]
        for kind, pos, byte in edits:
            pos %= len(blob) + 1
            if kind == "flip" and pos < len(blob):
                blob[pos] ^= byte or 1
            elif kind == "insert":
                blob[pos:pos] = bytes([byte])
            elif kind == "delete":
                del blob[pos:pos + 1]
            else:  # a huge length field where a length may be read
                blob[pos:pos + 4] = struct.pack("<I", 0xFFFF0000 | byte)
        cases.append((f"mutation{len(cases)}", bytes(blob)))
        cases.append((f"soup{len(cases)}", b"\x80\x04" + b"".join(ops) + b"."))

    collect()
    outcomes, growth = _run_isolated(cases)
    bad = {k: v for k, v in outcomes.items() if v not in ("UserError", "loaded")}
    assert not bad, f"{len(bad)} fuzzed pickles escaped as non-UserError exceptions, e.g. {list(bad.items())[:3]}"
    assert growth < _MAX_RSS_GROWTH_MB, f"peak memory grew by {growth:.0f} MB"
    assert sum(v == "UserError" for v in outcomes.values()) > len(cases) // 4  # the fuzzer does reach refusals
