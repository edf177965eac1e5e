"""Safe target expressions over scored-configuration records.

A target such as ``"-1*FID-GT-1k - avg_bits*150"`` is an arithmetic expression whose names are record
keys. Keys may contain '-' (``FID-GT-1k``), so the expression is first tokenized by matching known
record keys longest-first; each key is then replaced by a placeholder identifier and the result is
parsed with :mod:`ast` and checked against a whitelist (numbers, ``+ - * /``, unary sign,
parentheses). Evaluation walks the checked tree; nothing is ever passed to ``eval``.

Sign convention of the whole predictor: a higher target value is a better configuration.

:func:`learning_plan` splits a target into what must be learned and what is known: keys such as
``avg_bits`` follow from the configuration itself (:data:`CONFIG_KEYS`), so the predictor reads them
exactly and learns only the one measured key (e.g. FID), in log space when it is positive. On the
mnist_dit dataset log FID is close to additive over per-layer options (a ridge model ranks held-out
configurations at Spearman 0.99) while ``-FID - 150*avg_bits`` mixes a heavy-tailed FID with a linear bit
term that a network has to rediscover; the split lifts held-out Spearman of that target.
"""
from __future__ import annotations

import ast
import math
import re
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

from multiquant.errors import UserError

__all__ = ["DEFAULT_RECORD_KEYS", "CONFIG_KEYS", "Target", "TargetError", "LearningPlan", "learning_plan",
           "parse_target", "target_tag"]

# Keys a quant_cache.pkl record usually carries; records passed at parse time extend this list.
DEFAULT_RECORD_KEYS = ("FID-GT-1k", "FID-FP-1k", "avg_bits", "bops", "quantized_size", "quantized_error",
                       "psnr_fp", "seed", "index")
# Keys a record derives from its configuration alone (multiquant.config.config_record): known, not learned.
CONFIG_KEYS = ("avg_bits", "quantized_size", "quantized_error")

_NUMBER = re.compile(r"(?:\d+\.\d*|\.\d+|\d+)(?:[eE][+-]?\d+)?")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_OPERATORS = set("+-*/()")
_NAME_CHARS = re.compile(r"[A-Za-z0-9_]")

_BINARY = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b,
           ast.Mult: lambda a, b: a * b, ast.Div: lambda a, b: a / b}
_UNARY = {ast.USub: lambda a: -a, ast.UAdd: lambda a: a}


_MAX_DEPTH = 200  # nesting of the expression tree (parentheses, unary signs, chained operators)


class TargetError(UserError, ValueError):
    """The target expression is malformed, unsafe, or names an unknown record key."""


@dataclass(frozen=True)
class Target:
    """A parsed target: ``target(record) -> float``."""

    expr: str
    names: tuple[str, ...]  # record keys the expression reads, in order of first use
    _tree: ast.Expression = field(repr=False, compare=False)
    _placeholders: Mapping[str, str] = field(repr=False, compare=False)  # placeholder -> record key

    def __call__(self, record: Mapping) -> float:
        values = {}
        for placeholder, key in self._placeholders.items():
            if key not in record:
                raise KeyError(f"target {self.expr!r} needs record key {key!r}; the record has: "
                               f"{', '.join(sorted(map(str, record)))}")
            values[placeholder] = float(record[key])
        return float(_evaluate(self._tree.body, values))

    def values(self, records: Iterable[Mapping]) -> list[float]:
        return [self(r) for r in records]

    def evaluate(self, values: Mapping[str, object]):
        """The expression on ``{key: value}`` where values may be arrays or tensors (elementwise)."""
        missing = [key for key in self._placeholders.values() if key not in values]
        if missing:
            raise KeyError(f"target {self.expr!r} needs {', '.join(map(repr, missing))}")
        return _evaluate(self._tree.body, {p: values[key] for p, key in self._placeholders.items()})

    def available(self, record: Mapping) -> bool:
        """Whether the record has every key the target reads, with a finite value."""
        try:
            return math.isfinite(self(record))
        except (KeyError, TypeError, ValueError, ZeroDivisionError):
            return False

    @property
    def tag(self) -> str:
        return target_tag(self.expr)


@dataclass(frozen=True)
class LearningPlan:
    """What the predictor regresses for a target and how its output becomes the target again.

    ``key`` None: the network learns the target itself. Otherwise it learns ``key`` (``log(key)`` when
    ``log``) and :meth:`compose` evaluates the target with that prediction and the exact ``known`` keys.
    ``sign`` is +1 when the target grows with ``key`` (hop scores are ranked by ``sign * learned``)."""

    target: Target | Callable[[Mapping], float]  # a Target, or any callable on a record when key is None
    key: str | None = None
    log: bool = False
    sign: float = 1.0
    known: tuple[str, ...] = ()

    @property
    def expr(self) -> str:
        return getattr(self.target, "expr", getattr(self.target, "__name__", "custom"))

    @property
    def learned_name(self) -> str:
        if self.key is None:
            return self.expr
        return f"log({self.key})" if self.log else self.key

    def learned(self, records: Sequence[Mapping]) -> np.ndarray:
        """Per record, the value the network regresses."""
        if self.key is None:
            return np.array([self.target(r) for r in records], dtype=np.float64)
        values = np.array([float(r[self.key]) for r in records], dtype=np.float64)
        return np.log(values) if self.log else values

    def known_values(self, records: Sequence[Mapping]) -> np.ndarray:
        """[n, len(known)] exact values of the configuration-derived keys."""
        try:
            return np.array([[float(r[k]) for k in self.known] for r in records], dtype=np.float64).reshape(
                len(records), len(self.known))
        except KeyError as err:
            raise KeyError(f"the target {self.target.expr!r} reads {err.args[0]!r}, which every record must carry "
                           f"(multiquant.config.config_record computes it from the configuration)") from None

    def compose(self, learned, known):
        """Target values from learned values (array/tensor [n]) and ``known`` ([n, len(known)])."""
        if self.key is None:
            return learned
        value = learned.exp() if hasattr(learned, "exp") else np.exp(learned)
        values = {self.key: value if self.log else learned}
        values.update({k: known[:, i] for i, k in enumerate(self.known)})
        return self.target.evaluate(values)

    def to_json(self) -> dict:
        return {"target": self.expr, "key": self.key, "log": self.log, "sign": self.sign,
                "known": list(self.known), "learned": self.learned_name}

    @classmethod
    def from_json(cls, obj: Mapping) -> "LearningPlan":
        if obj.get("key") is None:  # the network's output is the target itself; the expression only names it
            return cls(_Named(obj["target"]))
        keys = [obj["key"], *obj.get("known", ())]
        return cls(parse_target(obj["target"], keys), obj.get("key"), bool(obj.get("log")), float(obj.get("sign", 1.0)),
                   tuple(obj.get("known", ())))


@dataclass(frozen=True)
class _Named:
    expr: str

    def __call__(self, record: Mapping) -> float:
        raise TypeError(f"the target {self.expr!r} was a custom callable; pass it again to evaluate records")


def learning_plan(target: Target, records: Sequence[Mapping], mode: str = "auto") -> LearningPlan:
    """``mode="target"``: learn the target as is. ``"auto"``: when the target reads exactly one key that is
    not a :data:`CONFIG_KEYS` key (e.g. ``FID-GT-1k``) and moves monotonically with it on every record,
    learn that key (in log space when it is positive everywhere) and read the configuration keys exactly."""
    if mode not in ("auto", "target"):
        raise ValueError(f"learn mode must be 'auto' or 'target', got {mode!r}")
    plain = LearningPlan(target)
    measured = [k for k in target.names if k not in CONFIG_KEYS]
    if mode == "target" or len(measured) != 1 or not records:
        return plain
    key = measured[0]
    values = np.array([float(r[key]) for r in records], dtype=np.float64)
    base = np.array([target(r) for r in records], dtype=np.float64)
    nudged = np.array([target({**r, key: float(r[key]) + 1e-3 * max(abs(float(r[key])), 1.0)}) for r in records])
    slope = np.sign(nudged - base)
    if not (np.all(slope > 0) or np.all(slope < 0)):  # e.g. FID * (avg_bits - 4): no single orientation
        return plain
    known = tuple(k for k in target.names if k in CONFIG_KEYS)
    return LearningPlan(target, key, bool(np.all(values > 0)), float(slope[0]), known)


def _tokenize(expr: str, keys: list[str]) -> list[tuple[str, str]]:
    """(kind, text) tokens; kind in {"key", "name", "number", "op"}. Keys are matched longest-first and
    only where they end at a name boundary (so ``avg_bits`` does not match inside ``avg_bits2``)."""
    by_length = sorted(set(keys), key=len, reverse=True)
    tokens, pos = [], 0
    while pos < len(expr):
        ch = expr[pos]
        if ch.isspace():
            pos += 1
            continue
        key = next((k for k in by_length if expr.startswith(k, pos)
                    and not (pos + len(k) < len(expr) and _NAME_CHARS.match(expr[pos + len(k)])
                             and _NAME_CHARS.match(k[-1]))), None)
        if key is not None:
            tokens.append(("key", key))
            pos += len(key)
            continue
        if (m := _NUMBER.match(expr, pos)) is not None:
            tokens.append(("number", m.group()))
            pos = m.end()
            continue
        if (m := _IDENTIFIER.match(expr, pos)) is not None:
            tokens.append(("name", m.group()))
            pos = m.end()
            continue
        if ch in _OPERATORS:
            tokens.append(("op", ch))
            pos += 1
            continue
        raise TargetError(f"unexpected character {ch!r} at position {pos} of target {expr!r}; "
                          f"only numbers, record keys, + - * / and parentheses are allowed")
    return tokens


def _check(node: ast.AST, placeholders: Mapping[str, str]) -> None:
    """Reject every AST node outside the arithmetic whitelist."""
    if isinstance(node, ast.Expression):
        return _check(node.body, placeholders)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        _check(node.left, placeholders)
        return _check(node.right, placeholders)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _check(node.operand, placeholders)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        try:
            ok = math.isfinite(float(node.value))
        except OverflowError:
            ok = False
        if not ok:
            raise TargetError(f"number {str(node.value)[:20]}... in the target expression is too large for a float; "
                              f"use a smaller constant")
        return None
    if isinstance(node, ast.Name) and node.id in placeholders:
        return None
    raise TargetError(f"disallowed construct {type(node).__name__} in target expression")


def _evaluate(node: ast.AST, values: Mapping[str, float]) -> float:
    if isinstance(node, ast.BinOp):
        return _BINARY[type(node.op)](_evaluate(node.left, values), _evaluate(node.right, values))
    if isinstance(node, ast.UnaryOp):
        return _UNARY[type(node.op)](_evaluate(node.operand, values))
    if isinstance(node, ast.Constant):
        return float(node.value)
    return values[node.id]  # a checked placeholder


def parse_target(expr: str, keys: Iterable[str] | None = None) -> Target:
    """Parse ``expr`` into a :class:`Target`.

    ``keys``: record keys the expression may use (e.g. the union of the cache's record keys); they
    are added to :data:`DEFAULT_RECORD_KEYS`. Any other name raises :class:`TargetError` listing the
    available keys."""
    if not isinstance(expr, str) or not expr.strip():
        raise TargetError("the target expression is empty")
    if len(expr) > 1000:
        raise TargetError("the target expression is too long (over 1000 characters)")
    known = [k for k in dict.fromkeys([*DEFAULT_RECORD_KEYS, *(keys or ())]) if isinstance(k, str) and k]
    tokens = _tokenize(expr, known)
    unknown = [text for kind, text in tokens if kind == "name"]
    if unknown:
        raise TargetError(f"unknown name(s) {', '.join(map(repr, dict.fromkeys(unknown)))} in target {expr!r}; "
                          f"available record keys: {', '.join(sorted(known))}")
    placeholders: dict[str, str] = {}
    key_to_placeholder: dict[str, str] = {}
    pieces = []
    for kind, text in tokens:
        if kind == "key":
            if text not in key_to_placeholder:
                key_to_placeholder[text] = f"_k{len(key_to_placeholder)}"
                placeholders[key_to_placeholder[text]] = text
            text = key_to_placeholder[text]
        pieces.append(text)
    try:
        tree = ast.parse(" ".join(pieces), mode="eval")
    except SyntaxError as err:
        raise TargetError(f"malformed target expression {expr!r}: {err.msg}") from None
    except (RecursionError, MemoryError):
        raise TargetError(f"the target expression is nested too deeply (at most {_MAX_DEPTH} levels)") from None
    if _depth(tree) > _MAX_DEPTH:
        raise TargetError(f"the target expression is nested too deeply (at most {_MAX_DEPTH} levels of "
                          f"parentheses, signs and operators): simplify it")
    _check(tree, placeholders)
    return Target(expr=expr, names=tuple(key_to_placeholder), _tree=tree, _placeholders=placeholders)


def _depth(tree: ast.AST) -> int:
    """Depth of the tree, walked without recursion (the checks and evaluation recurse only on shallow trees)."""
    deepest, stack = 0, [(tree, 1)]
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in ast.iter_child_nodes(node))
    return deepest


def target_tag(expr: str) -> str:
    """A file-name-safe tag for a target expression, e.g. ``-1*FID-GT-1k - avg_bits*150`` ->
    ``neg1xFID-GT-1k-avg_bitsx150``."""
    out = expr.replace(" ", "")
    for a, b in (("*", "x"), ("/", "div"), ("+", "plus"), ("(", ""), (")", "")):
        out = out.replace(a, b)
    out = re.sub(r"^-", "neg", out)
    out = re.sub(r"[^0-9A-Za-z_.\-]", "_", out)
    return out[:120] or "target"
