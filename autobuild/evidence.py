"""Evidence for the claim checker (:mod:`autobuild.claims`), from what a run leaves behind.

* :func:`layer_roles`: each canonical layer's DAG op label and block scope (any family; a plain ``nn.Module``
  gets them from its module tree);
* :func:`dataset_model`: the better-validated of two models fit on scored random configurations (ridge on one-hot
  options; gradient-boosted trees on one-hot options + per-layer weight error; 5-fold SRCC of log FID), read as
  each layer's mean predicted change of log FID from 4 to 3 bits (its method kept) and, per layer and width, the
  mean predicted log FID under each method;
* :func:`load_sweeps`: one-layer sweeps from the files that hold them (``qua2sedimo sensitivity`` output, a
  benchmark's per-option rankings, or the ``sweeps`` section of ``benchmarks/results/pareto_<model>.json``);
* :func:`uniform_contests`, :func:`node_score_evidence`: measured uniform configurations and the predictor's
  node-level scores as claim evidence.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from multiquant.errors import InputError
from multiquant.options import Option

from .claims import LayerSource, MethodSource

__all__ = ["layer_roles", "dataset_model", "load_sweeps", "sweep_sources", "uniform_contests",
           "node_score_evidence", "FID_KEY"]

FID_KEY = "FID-GT-1k"


def layer_roles(graph) -> tuple[dict[str, str], dict[str, str]]:
    """``(ops, blocks)``: canonical layer key -> DAG op label and -> block scope (``down_blocks.0``,
    ``transformer_blocks.3``; global layers: their module, e.g. ``time_embed``)."""
    ops, blocks = {}, {}
    for _, attrs in graph.nodes(data=True):
        if attrs.get("kind") == "layer":
            key = attrs["key"]
            ops[key], blocks[key] = attrs["op"], attrs.get("scope") or ("global" if attrs["block"] < 0 else
                                                                        f"block {attrs['block']}")
    return ops, blocks


def _method_bits(option: str) -> tuple[str, int]:
    parsed = Option.parse(option)
    return ("fp16" if parsed.method is None else parsed.method), parsed.bits


# ------------------------------------------------------------------------------------------ dataset model
def dataset_model(space, records: Sequence[Mapping], key: str = FID_KEY, seed: int = 0, folds: int = 5) -> dict:
    """Fit both models, keep the one with the higher ``folds``-fold held-out SRCC of log ``key`` (seeded split),
    refit it on every record, and read it out. ``space``: :class:`autobuild.optimize.Space` of the option table.
    Returns ``{best_model, cv_srcc_log_fid, effects: {layer: Δ log FID 4->3}, method_contests:
    {"<layer> @<b>-bit": {method: mean predicted log FID}}, n, seed}``."""
    from scipy.stats import spearmanr
    from sklearn.ensemble import HistGradientBoostingRegressor
    from sklearn.linear_model import RidgeCV

    records = [r for r in records if r.get(key) is not None and np.isfinite(float(r[key])) and float(r[key]) > 0]
    if len(records) < 2 * folds:
        raise InputError(f"{len(records)} scored configurations with {key}: the dataset model needs at least "
                         f"{2 * folds}")
    choices = np.stack([space.choice_of(r) for r in records])
    y = np.log([float(r[key]) for r in records])
    rows = np.arange(len(space.layers))

    def design(c):
        return np.hstack([space.one_hot(c), np.log1p(100 * space.error[rows[None, :], np.atleast_2d(c)])])

    makers = {"ridge": lambda: RidgeCV(alphas=np.logspace(-3, 3, 13)),
              "gbm": lambda: HistGradientBoostingRegressor(max_iter=200, learning_rate=0.05, max_leaf_nodes=15,
                                                           min_samples_leaf=10, random_state=seed)}
    split = np.array_split(np.random.default_rng(seed).permutation(len(y)), folds)
    cv = {}
    for name, make in makers.items():
        pred = np.zeros(len(y))
        for chunk in split:
            train = np.setdiff1d(np.arange(len(y)), chunk)
            pred[chunk] = make().fit(design(choices[train]), y[train]).predict(design(choices[chunk]))
        cv[name] = float(spearmanr(pred, y).statistic)
    best = max(cv, key=cv.get)
    model = makers[best]().fit(design(choices), y)
    index = {_method_bits(o): k for k, o in enumerate(space.options)}
    methods = list(dict.fromkeys(m for m, _ in index))
    widths = sorted({b for _, b in index})
    effects, contests = {}, {}
    for layer in rows:
        name = space.layers[layer]
        low, high = choices.copy(), choices.copy()
        for i, k in enumerate(choices[:, layer]):
            method = _method_bits(space.options[k])[0]
            low[i, layer], high[i, layer] = index.get((method, widths[0]), k), index.get((method, widths[-1]), k)
        effects[name] = float(np.mean(model.predict(design(low)) - model.predict(design(high))))
        for bits in widths:
            figures = {}
            for method in methods:
                if (method, bits) not in index:
                    continue
                moved = choices.copy()
                moved[:, layer] = index[(method, bits)]
                figures[method] = float(np.mean(model.predict(design(moved))))
            contests[f"{name} @{bits}-bit"] = figures
    return {"best_model": best, "cv_srcc_log_fid": cv, "effects": effects, "method_contests": contests,
            "n": len(records), "seed": seed, "folds": folds}


def dataset_sources(fit: Mapping, primary: bool = True) -> tuple[LayerSource, MethodSource]:
    name = f"dataset model ({fit['best_model']}, 5-fold SRCC {fit['cv_srcc_log_fid'][fit['best_model']]:.3f} on log FID)"
    return (LayerSource(name, fit["effects"], "predicted Δ log FID, 4 -> 3 bits", primary,
                        f"{fit['folds']}-fold SRCC {fit['cv_srcc_log_fid'][fit['best_model']]:.3f} on log FID, "
                        f"{fit['n']} configurations"),
            MethodSource(name, fit["method_contests"], "mean predicted log FID with the layer set to the method",
                         primary))


# ------------------------------------------------------------------------------------------ sweeps
def load_sweeps(paths: Sequence[str | os.PathLike]) -> dict:
    """``{"worst": {layer: degradation}, "per_method": {method: {layer: degradation}}, "metric": str,
    "files": [...]}`` from sensitivity files (``qua2sedimo sensitivity``: ``layers[].fid_degradation`` of one
    method), per-option ranking files (``rankings: {"kmeans-3": [{key, fid_fp}]}``) or a pareto result
    (``sweeps.ranking`` / ``sweeps.per_method``). ``worst`` is the maximum over methods."""
    per_method: dict[str, dict[str, float]] = {}
    worst: dict[str, float] = {}
    metrics = []
    for path in paths:
        path = Path(path)
        try:
            doc = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise InputError(f"cannot read sweeps {path}: {err}; pass a sensitivity JSON or a pareto result") from err
        if isinstance(doc.get("layers"), list) and doc.get("settings", {}).get("method"):
            method = doc["settings"]["method"]
            if method == "fp16":  # 16-bit rounding, not a quantizer: no evidence about low bits
                continue
            per_method.setdefault(method, {}).update({l["key"]: float(l["fid_degradation"]) for l in doc["layers"]})
            metrics.append(doc.get("metrics", {}).get("fid", {}).get("name", "FID degradation"))
        elif isinstance(doc.get("rankings"), Mapping):
            for option, rows in doc["rankings"].items():
                method = _method_bits(option)[0]
                value = "fid_fp" if doc.get("settings", {}).get("fid_against", "fp") == "fp" else "fid_gt_increase"
                per_method.setdefault(method, {}).update({r["key"]: float(r[value]) for r in rows})
            settings = doc.get("settings", {})
            metrics.append(f"per method: {'FID-FP' if value == 'fid_fp' else 'FID-GT increase'} of the layer alone, "
                           f"{settings.get('num_prompts', '?')} images ({path.name})")
        elif isinstance(doc.get("sweeps"), Mapping) and doc["sweeps"].get("ranking"):
            sweeps = doc["sweeps"]
            for method, values in (sweeps.get("per_method") or {}).items():
                per_method.setdefault(method, {}).update({k: float(v) for k, v in values.items()})
            for row in sweeps["ranking"]:
                worst[row["layer"]] = max(worst.get(row["layer"], -np.inf), float(row["degradation"]))
            metrics.append(f"{sweeps.get('metric', 'one-layer degradation')}, {sweeps.get('images')} images ({path.name})")
        else:
            raise InputError(f"{path} holds no one-layer sweeps: pass `qua2sedimo sensitivity` output or "
                             f"benchmarks/results/pareto_<model>.json")
    for values in per_method.values():
        for k, v in values.items():
            worst[k] = max(worst.get(k, -np.inf), v)
    return {"worst": worst, "per_method": per_method, "metric": "; ".join(dict.fromkeys(metrics)),
            "files": [Path(p).name for p in paths]}


def sweep_sources(sweeps: Mapping, bits: int | None = None) -> tuple[LayerSource | None, MethodSource | None]:
    """The sweeps as claim evidence: worst degradation over methods per layer; per-method degradations as one
    contest per layer (where at least two methods were swept)."""
    if not sweeps.get("worst"):
        return None, None
    name = "one-layer sweeps"
    layer = LayerSource(name, sweeps["worst"], (sweeps.get("metric") or "degradation of the layer alone") +
                        "; max over methods", validation="measured")
    per = sweeps.get("per_method") or {}
    contests = {}
    for key in sweeps["worst"]:
        figures = {m: v[key] for m, v in per.items() if key in v}
        if len(figures) >= 2:
            contests[key + (f" @{bits}-bit" if bits else "")] = figures
    return layer, (MethodSource(name, contests, "degradation of the layer alone") if contests else None)


# ------------------------------------------------------------------------------------------ uniform / predictor
def uniform_contests(uniform: Mapping[str, Mapping], name: str = "uniform configurations (measured FID)"
                     ) -> MethodSource | None:
    """``{option: {"fid": ..., "fid_confirm": ..., "avg_bits": ...}}`` -> one contest per width (the mean of
    the two seeds where both exist)."""
    contests, details = {}, {}
    for option, row in uniform.items():
        method, bits = _method_bits(option)
        if method == "fp16" or row.get("fid") is None:
            continue
        seeds = [float(row[k]) for k in ("fid", "fid_confirm") if row.get(k) is not None]
        contests.setdefault(f"{bits}-bit", {})[method] = float(np.mean(seeds))
        details.setdefault(f"{bits}-bit", []).append(f"{Option.parse(option).label.split(' ')[0]} "
                                                     f"{float(row['avg_bits']):.2f} bits")
    if not contests:
        return None
    return MethodSource(name, dict(sorted(contests.items(), reverse=True)), "FID (lower = better)",
                        details={k: "avg " + ", ".join(v) for k, v in details.items()})


def node_score_evidence(node_scores, validation: str, primary: bool) -> tuple[LayerSource, MethodSource]:
    """The predictor's node-level scores: sensitivity per layer (``autobuild.insights.layer_sensitivity``) and one
    contest per layer and width (minus the score: lower = better)."""
    from .insights import layer_sensitivity

    name = f"GNN predictor node scores ({validation})"
    values = {r["key"]: r["sensitivity"] for r in layer_sensitivity(node_scores)}
    contests = {}
    for key, scores in node_scores.layer_scores().items():
        for option, score in zip(node_scores.options, scores):
            method, bits = _method_bits(option)
            if np.isfinite(score):
                contests.setdefault(f"{key} @{bits}-bit", {})[method] = -float(score)
    return (LayerSource(name, values, "unit-score drop, best 4-bit - worst 3-bit", primary, validation),
            MethodSource(name, contests, "minus the node-level unit score", primary))


# ------------------------------------------------------------------------------------------ one testbed
def testbed_insights(ops: Mapping[str, str], blocks: Mapping[str, str],
                     models: Sequence[tuple[LayerSource, MethodSource | None, float | None]] = (),
                     sweeps: Mapping | None = None, uniform: Mapping[str, Mapping] | None = None,
                     sweep_bits: int | None = None) -> dict:
    """Claims and sensitive parts of one testbed. ``models``: ``(layer evidence, method evidence, held-out
    SRCC)`` of each fitted model; the one with the highest SRCC is primary (the *best-validated model*), the
    others are shown beside it. ``sweeps``: :func:`load_sweeps` output (primary); ``uniform``: measured uniform
    configurations (primary method evidence)."""
    from dataclasses import replace

    from .claims import RULES, backbone_kind, check_claims, sensitive_parts

    scored = [m for m in models if m[2] is not None and np.isfinite(m[2])]
    best = max(scored, key=lambda m: m[2]) if scored else (models[0] if models else None)
    layer_sources, method_sources = [], []
    for layer, method, srcc in models:  # near-ties (RULES["srcc_tie"]) are primary too
        primary = best is not None and (layer is best[0] or (srcc is not None and best[2] is not None
                                                             and srcc >= best[2] - RULES["srcc_tie"]))
        layer_sources.append(replace(layer, primary=primary))
        if method is not None:
            method_sources.append(replace(method, primary=primary))
    sweep_layer, sweep_method = sweep_sources(sweeps or {}, sweep_bits)
    if sweep_layer is not None:
        layer_sources.append(sweep_layer)
    if sweep_method is not None:
        method_sources.append(sweep_method)
    measured = uniform_contests(uniform or {})
    if measured is not None:
        method_sources.insert(0, measured)
    claims = check_claims(ops, layer_sources, method_sources, blocks)
    primary_models = [s.name for s in layer_sources if s.primary and s.name != "one-layer sweeps"]
    return {"backbone": backbone_kind(ops), "best_validated_model": best[0].name if best else None,
            "primary_models": primary_models,
            "claims": [c.as_dict() for c in claims],
            "sensitive_parts": sensitive_parts(ops, blocks, layer_sources),
            "rules": "autobuild/claims.py (module docstring): top third = sensitive, bottom half = not; "
                     "differences >= 0.25 percentile; preference win rate >= 0.6; models within 0.01 SRCC of the "
                     "best count too; an inconclusive source does not veto, contradicting sources give inconclusive"}


def claims_lines(insights: Mapping) -> list[str]:
    """One line per claim: verdict, claim, and each primary source's figures."""
    lines = []
    for c in insights["claims"]:
        figures = " | ".join(f"{s['source']}: {s['verdict']}, {s['summary']}" for s in c["by_source"]
                             if s["primary"] and s["verdict"] != "not applicable")
        lines.append(f"[{c['verdict']}] {c['claim']} ({c['summary']})" + (f" -- {figures}" if figures else ""))
    return lines
