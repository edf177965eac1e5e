"""Safe target expressions over scored-configuration records.

A target such as ``"-1*FID-GT-1k - avg_bits*150"`` is an arithmetic expression whose names are record
keys. Keys may contain '-' (``FID-GT-1k``), so the expression is first tokenized by matching known
record keys longest-first; each key is then replaced by a placeholder identifier and the result is
parsed with :mod:`ast` and checked against a whitelist (numbers, ``+ - * /``, unary sign,
parentheses). Evaluation walks the checked tree; nothing is ever passed to ``eval``.

Sign convention of the whole predictor: a higher target value is a better configuration.
"""
from __future__ import annotations

import ast
import math
import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping

__all__ = ["DEFAULT_RECORD_KEYS", "Target", "TargetError", "parse_target", "target_tag"]

# Keys a quant_cache.pkl record usually carries; records passed at parse time extend this list.
DEFAULT_RECORD_KEYS = ("FID-GT-1k", "FID-FP-1k", "avg_bits", "bops", "quantized_size", "quantized_error",
                       "psnr_fp", "seed", "index")

_NUMBER = re.compile(r"(?:\d+\.\d*|\.\d+|\d+)(?:[eE][+-]?\d+)?")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_OPERATORS = set("+-*/()")
_NAME_CHARS = re.compile(r"[A-Za-z0-9_]")

_BINARY = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b,
           ast.Mult: lambda a, b: a * b, ast.Div: lambda a, b: a / b}
_UNARY = {ast.USub: lambda a: -a, ast.UAdd: lambda a: a}


class TargetError(ValueError):
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

    def available(self, record: Mapping) -> bool:
        """Whether the record has every key the target reads, with a finite value."""
        try:
            return math.isfinite(self(record))
        except (KeyError, TypeError, ValueError, ZeroDivisionError):
            return False

    @property
    def tag(self) -> str:
        return target_tag(self.expr)


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
    _check(tree, placeholders)
    return Target(expr=expr, names=tuple(key_to_placeholder), _tree=tree, _placeholders=placeholders)


def target_tag(expr: str) -> str:
    """A file-name-safe tag for a target expression, e.g. ``-1*FID-GT-1k - avg_bits*150`` ->
    ``neg1xFID-GT-1k-avg_bitsx150``."""
    out = expr.replace(" ", "")
    for a, b in (("*", "x"), ("/", "div"), ("+", "plus"), ("(", ""), (")", "")):
        out = out.replace(a, b)
    out = re.sub(r"^-", "neg", out)
    out = re.sub(r"[^0-9A-Za-z_.\-]", "_", out)
    return out[:120] or "target"
