"""Sensitivity insights from unit scores (docs/design.md §7: explicit groupings, one definition).

* **Box plots** of unit scores: per block (block-level units; every variant of every unit of the block,
  global units by their type: t-Embed, c-Embed, Patchify, Out Proj...), per unit type (Self-Attn,
  Cross-Attn, Feedforward...) and per layer operation (node-level scores: the six options of every layer
  of that op: t-Embed, c-Embed, SA-Q/K/V/Out, CA-Q/K/V/Out, FF1/FF2, AdaLN, Out...). Wide boxes and low
  whiskers mean the predictor cares which option the layer gets.
* **Bar plots** of the method x bits mix per operation type in one configuration (fractions of that op's
  layers, tied copies counted once).
* **Ranked tables**. Sensitivity of a layer (node-level scores ``s(option)``)::

      sensitivity = max over high-bit options of s  -  min over low-bit options of s

  i.e. the drop from the layer's best 4-bit option to its worst 3-bit option in the 3/4-bit space (in
  general: best at the highest bit width present minus worst at the lowest). It splits into two parts that
  answer different questions: ``bit_drop`` = best high-bit minus best low-bit score (what dropping the bits
  costs with the layer's best method) and ``method_spread`` = best minus worst low-bit score (how much the
  choice of method matters at the low bit width); ``sensitivity = bit_drop + method_spread``. An operation
  type's sensitivity is the mean over its layers (also reported: median, max).

Scores are unit scores (docs/design.md §5) (sum over folds of SRCC-weighted z-scores), so units of different hop counts
are on one scale; the absolute numbers mean nothing outside one predictor.
"""
from __future__ import annotations

import os
from collections import Counter, OrderedDict
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from multiquant.options import Option, option_of

from .scores import UnitScoreSet

__all__ = ["OPTION_ORDER", "OPTION_COLORS", "option_label", "scores_by_block", "scores_by_unit_type",
           "scores_by_op", "layer_sensitivity", "op_sensitivity", "config_mix_by_op", "box_plot", "mix_bar_plot",
           "write_insights", "SENSITIVITY_DEFINITION", "percentile_plot"]

SENSITIVITY_DEFINITION = ("sensitivity = node-level score of the layer's best option at the highest bit width "
                          "(4-bit) minus that of its worst option at the lowest bit width (3-bit); higher = the "
                          "predictor loses more when the layer drops to low bits. Op type: mean over its layers.")
# Stacked-bar order and colours (the paper's: K-Means-C 4, K-Means-A 4, UAQ 4, then the 3-bit ones).
OPTION_ORDER = ("kmeans-4", "kmeans_all-4", "mse-4", "kmeans-3", "kmeans_all-3", "mse-3")
OPTION_COLORS = {"kmeans-4": "#1f5fa8", "kmeans_all-4": "#5b9bd5", "mse-4": "#a9cdee",
                 "kmeans-3": "#b5451b", "kmeans_all-3": "#e8823a", "mse-3": "#f6c28b", "fp16": "#777777"}
# global (block -1) groups before the blocks, the rest after them
_LEADING_GLOBALS = ("t-Embed", "c-Embed", "Patchify", "Conv In", "AdaLN")
_OP_ORDER = ("t-Embed", "c-Embed", "Patchify", "AdaLN", "SA-Q", "SA-K", "SA-V", "SA-Out", "CA-Q", "CA-K", "CA-V",
             "CA-Out", "FF1", "FF2", "Res-In", "Res-tEmb", "Res-cEmb", "Res-Out", "Res-Skip", "Proj-In", "Proj-Out", "Skip",
             "Down", "Up", "Conv-In", "Conv-Out", "Out", "Linear", "Conv")


def option_label(option: str) -> str:
    """``kmeans-3`` -> ``K-Means-C 3-bit``."""
    return Option.parse(option).label


# ------------------------------------------------------------------------------------------ groupings
def scores_by_block(scores: UnitScoreSet) -> "OrderedDict[str, np.ndarray]":
    """All variant scores pooled per block: leading global units by type, blocks 0..N-1, then the other
    global units (e.g. Out Proj) by type."""
    scopes: dict[int, set] = {}
    for unit in scores.units:  # a unit is named "<scope>/<kind>": a block's scope names it where its index does not
        if unit.block >= 0:
            scopes.setdefault(unit.block, set()).add(unit.name.split("/")[0])

    def block_label(block: int) -> str:
        names = scopes[block]
        name = next(iter(names)) if len(names) == 1 else ""
        # "transformer_blocks.3" already says 3; a plain module's derived block ("dw") says nothing without its name
        return f"block {block}" if not name or name.endswith(f".{block}") else f"block {block} {name}"

    groups: dict[str, list[np.ndarray]] = {}
    for unit in scores.units:
        label = block_label(unit.block) if unit.block >= 0 else (unit.type or unit.ops[0])
        groups.setdefault(label, []).append(unit.scores)
    blocks = sorted((k for k in groups if k.startswith("block ")), key=lambda k: int(k.split()[1]))
    leading = [k for k in _LEADING_GLOBALS if k in groups]
    trailing = sorted(k for k in groups if k not in blocks and k not in leading)
    return OrderedDict((k, np.concatenate(groups[k])) for k in [*leading, *blocks, *trailing])


def scores_by_unit_type(scores: UnitScoreSet) -> "OrderedDict[str, np.ndarray]":
    groups: dict[str, list[np.ndarray]] = {}
    for unit in scores.units:
        groups.setdefault(unit.type or "Other", []).append(unit.scores)
    return OrderedDict((k, np.concatenate(v)) for k, v in sorted(groups.items()))


def _op_rank(op: str) -> tuple:
    return (_OP_ORDER.index(op), op) if op in _OP_ORDER else (len(_OP_ORDER), op)


def scores_by_op(node_scores: UnitScoreSet) -> "OrderedDict[str, np.ndarray]":
    """Node level: every option score of every layer, pooled per layer operation type."""
    if node_scores.level != "node":
        raise ValueError("scores_by_op needs node-level scores")
    groups: dict[str, list[np.ndarray]] = {}
    for unit in node_scores.units:
        groups.setdefault(unit.ops[0], []).append(unit.scores)
    return OrderedDict((k, np.concatenate(groups[k])) for k in sorted(groups, key=_op_rank))


# ------------------------------------------------------------------------------------------ sensitivity
def layer_sensitivity(node_scores: UnitScoreSet) -> list[dict]:
    """Per layer (canonical key): best high-bit score, worst low-bit score, their difference (the
    sensitivity, see module doc) and its two parts (bit drop, method spread); sorted most sensitive first."""
    if node_scores.level != "node":
        raise ValueError("layer_sensitivity needs node-level scores")
    bits = np.array([Option.parse(o).bits for o in node_scores.options])
    high, low = bits == bits.max(), bits == bits.min()
    rows = []
    for unit in node_scores.units:
        per_option = np.full(len(node_scores.options), np.nan)
        per_option[unit.variants[:, 0].astype(int)] = unit.scores
        best_high, worst_low = float(np.nanmax(per_option[high])), float(np.nanmin(per_option[low]))
        best_low = float(np.nanmax(per_option[low]))
        best_option = node_scores.options[int(np.nanargmax(per_option))]
        rows.append({"key": unit.keys[0], "op": unit.ops[0], "block": unit.block, "best_high_bits": best_high,
                     "worst_low_bits": worst_low, "sensitivity": best_high - worst_low,
                     "bit_drop": best_high - best_low, "method_spread": best_low - worst_low,
                     "best_option": best_option,
                     "tied_copies": len(unit.aliases[0])})
    return sorted(rows, key=lambda r: -r["sensitivity"])


def op_sensitivity(layer_rows: Sequence[Mapping]) -> list[dict]:
    """Per operation type: mean / median / max layer sensitivity and the number of layers; most sensitive
    first (by mean)."""
    groups: dict[str, list[float]] = {}
    for row in layer_rows:
        groups.setdefault(row["op"], []).append(row["sensitivity"])
    out = [{"op": op, "mean": float(np.mean(v)), "median": float(np.median(v)), "max": float(np.max(v)),
            "layers": len(v)} for op, v in groups.items()]
    return sorted(out, key=lambda r: -r["mean"])


def config_mix_by_op(config: Mapping[str, str], op_of_key: Mapping[str, str]) -> "OrderedDict[str, Counter]":
    """Counts of each option per op type in ``config`` (layers in ``op_of_key`` only: tied copies, which
    follow their canonical layer, are not counted again)."""
    mix: dict[str, Counter] = {}
    for key, op in op_of_key.items():
        if key in config:
            option = option_of(config[key])
            mix.setdefault(op, Counter())[option] += 1
    return OrderedDict((op, mix[op]) for op in sorted(mix, key=_op_rank))


def op_of_keys(scores: UnitScoreSet) -> dict[str, str]:
    return {key: op for unit in scores.units for key, op in zip(unit.keys, unit.ops)}


# ------------------------------------------------------------------------------------------ plots
def _pyplot():
    from multiquant.utils import pyplot

    return pyplot()


def _save(fig, path: Path) -> Path:
    from multiquant.utils import save_figure

    return save_figure(fig, path)


def box_plot(groups: Mapping[str, np.ndarray], path: str | os.PathLike, title: str, xlabel: str) -> Path:
    """One box per group (whiskers 1.5 IQR, outliers as small dots), group sizes under the labels."""
    plt = _pyplot()
    labels = list(groups)
    width = max(6.0, 0.8 * len(labels) + 1.5)
    fig, ax = plt.subplots(figsize=(width, 4.2), dpi=110)
    ax.boxplot([np.asarray(groups[k], dtype=float) for k in labels], showfliers=True,
               flierprops={"markersize": 2, "alpha": 0.4}, medianprops={"color": "tab:red"})
    ax.set_xticks(range(1, len(labels) + 1))
    shown = [k.removeprefix("block ") for k in labels]  # the axis label says "block"
    ax.set_xticklabels([f"{s}\n(n={len(groups[k]):,})" if len(labels) <= 12 else s for s, k in zip(shown, labels)],
                       rotation=0 if len(labels) <= 8 else 45, ha="center" if len(labels) <= 8 else "right",
                       fontsize=8)
    ax.axhline(0, color="0.6", lw=0.8, ls=":")
    ax.set_ylabel("unit score (higher = better)")
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, Path(path))


def mix_bar_plot(mix: Mapping[str, Counter], path: str | os.PathLike, title: str) -> Path:
    """Stacked bars: fraction of each op type's layers per method x bits (paper colour order)."""
    plt = _pyplot()
    ops = list(mix)
    present = [o for o in OPTION_ORDER if any(mix[op][o] for op in ops)]
    present += sorted({o for op in ops for o in mix[op]} - set(present))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(ops) + 3), 3.4), dpi=110)
    bottom = np.zeros(len(ops))
    for option in present:
        frac = np.array([mix[op][option] / max(1, sum(mix[op].values())) for op in ops])
        ax.bar(range(len(ops)), frac, bottom=bottom, color=OPTION_COLORS.get(option, None),
               label=option_label(option), edgecolor="white", linewidth=0.5)
        bottom += frac
    ax.set_xticks(range(len(ops)))
    ax.set_xticklabels([f"{op}\n({sum(mix[op].values())})" for op in ops], fontsize=8,
                       rotation=0 if len(ops) <= 10 else 45, ha="center" if len(ops) <= 10 else "right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("fraction of the op's layers")
    ax.set_title(title)
    ax.legend(bbox_to_anchor=(1.01, 1), loc="upper left", fontsize=8, frameon=False)
    return _save(fig, Path(path))


def percentile_plot(parts: Mapping[str, Mapping], path: str | os.PathLike, title: str) -> Path:
    """Mean sensitivity percentile of each layer op type, one bar per evidence source (``parts``: the
    ``sensitive_parts`` of :mod:`autobuild.claims`); 1 = the most sensitive layers, 0.5 = the middle."""
    plt = _pyplot()
    sources = list(parts)
    ops = sorted({o["name"] for p in parts.values() for o in p["ops"]}, key=_op_rank)
    fig, ax = plt.subplots(figsize=(max(6.5, 0.3 * len(ops) * max(1, len(sources)) + 1.5), 3.8), dpi=110)
    width = 0.8 / max(1, len(sources))
    colors = ("tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:gray")
    for i, name in enumerate(sources):
        value = {o["name"]: o["mean_percentile"] for o in parts[name]["ops"]}
        xs = [j + (i - (len(sources) - 1) / 2) * width for j in range(len(ops))]
        label = name + ("" if parts[name].get("primary", True) else " (shown, not used for verdicts)")
        ax.bar(xs, [value.get(op, np.nan) for op in ops], width=width, color=colors[i % len(colors)], label=label)
    counts = {o["name"]: o["layers"] for o in next(iter(parts.values()))["ops"]} if parts else {}
    ax.set_xticks(range(len(ops)))
    ax.set_xticklabels([f"{op}\n({counts.get(op, '?')})" for op in ops], fontsize=8,
                       rotation=0 if len(ops) <= 10 else 45, ha="center" if len(ops) <= 10 else "right")
    ax.axhline(0.5, color="0.5", lw=0.8, ls=":")
    ax.axhline(2 / 3, color="tab:red", lw=0.8, ls="--", label="top third (claim rule: sensitive)")
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("mean sensitivity percentile\n(1 = most sensitive layer)")
    ax.set_xlabel("layer operation (layers in brackets)")
    ax.set_title(title)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), frameon=False, ncol=2)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, Path(path))


# ------------------------------------------------------------------------------------------ all at once
def write_insights(out_dir: str | os.PathLike, node_scores: UnitScoreSet | None = None,
                   block_scores: UnitScoreSet | None = None, configs: Mapping[str, Mapping[str, str]] | None = None,
                   model: str = "") -> dict:
    """Write every plot and the ranked tables (``sensitivity.json``) into ``out_dir``. ``configs``: named
    configurations to draw method x bits mixes of. Returns ``{"plots": {name: path}, "layers": rows,
    "ops": rows}``."""
    import json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prefix = f"{model}: " if model else ""
    plots: dict[str, Path] = {}
    if block_scores is not None:
        plots["box_block"] = box_plot(scores_by_block(block_scores), out / "box_block.png",
                                      f"{prefix}block-level unit scores per block",
                                      "block (global units by type); all variants of its units")
        plots["box_unit_type"] = box_plot(scores_by_unit_type(block_scores), out / "box_unit_type.png",
                                          f"{prefix}block-level unit scores per unit type", "unit type")
    result: dict = {"plots": plots, "layers": [], "ops": [], "definition": SENSITIVITY_DEFINITION}
    if node_scores is not None:
        plots["box_op"] = box_plot(scores_by_op(node_scores), out / "box_op.png",
                                   f"{prefix}node-level scores per layer operation (all options)",
                                   "layer operation")
        result["layers"] = layer_sensitivity(node_scores)
        result["ops"] = op_sensitivity(result["layers"])
    reference = node_scores or block_scores
    for name, config in (configs or {}).items():
        if reference is None:
            break
        mix = config_mix_by_op(config, op_of_keys(reference))
        plots[f"mix_{name}"] = mix_bar_plot(mix, out / f"mix_{name}.png", f"{prefix}method x bits per op type: {name}")
    from multiquant.utils import atomic_path

    with atomic_path(out / "sensitivity.json") as tmp:
        tmp.write_text(json.dumps({"definition": SENSITIVITY_DEFINITION, "layers": result["layers"],
                                   "ops": result["ops"]}, indent=1))
    return result
