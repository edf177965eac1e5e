"""``qua2sedimo dag --model M [--full-size] [--out DIR]``: trace a denoiser's DAG, report it, render it."""
from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

from .counts import REFERENCE_NODE_COUNTS, count_nodes
from .io import save_dag
from .render import render_dag
from .trace import family_dag
from .units import units

__all__ = ["run_dag", "add_dag_arguments"]


def run_dag(model: str, full_size: bool = False, out: str | Path | None = None, render: bool = True) -> dict:
    """Trace family ``model`` (tiny on the CPU, or ``full_size`` on the meta device), print node and unit
    counts, and write ``<out>/<model>[_tiny].dag.json`` plus ``.png``/``.svg`` renders. ``out`` defaults to
    ``constants.DAG_PLOT_DIR``. Returns a summary dict."""
    if out is None:
        from constants import DAG_PLOT_DIR as out
    out = Path(out)
    graph = family_dag(model, "full" if full_size else "tiny", "meta" if full_size else "cpu")
    counts = count_nodes(graph)
    block_units = units(graph, "block")
    stem = model if full_size else f"{model}_tiny"
    files = [str(save_dag(graph, out / f"{stem}.dag.json"))]
    if render:
        png, svg = out / f"{stem}.png", out / f"{stem}.svg"
        render_dag(graph, png, svg)
        files += [str(png), str(svg)]
    ops = Counter(a["op"] for _, a in graph.nodes(data=True) if a["kind"] == "combine")
    print(f"{model} ({'full size' if full_size else 'tiny'}): {counts['nodes']} nodes = {counts['layers']} layers "
          f"+ {counts['combine']} combine ({', '.join(f'{k} {v}' for k, v in sorted(ops.items()))})")
    if full_size and model in REFERENCE_NODE_COUNTS:
        print(f"  reference graph: {REFERENCE_NODE_COUNTS[model]} nodes (differences: autobuild/dag/counts.py)")
    variants = sum(u.num_variants() for u in block_units)
    print(f"  {len(block_units)} block-level units, {variants:,} variants; {counts['layers']} node-level units")
    for path in files:
        print(f"  wrote {path}")
    return {**counts, "units": len(block_units), "variants": variants, "files": files,
            "reference_nodes": REFERENCE_NODE_COUNTS.get(model) if full_size else None}


def add_dag_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--model", required=True, help="model family (qua2sedimo families)")
    parser.add_argument("--full-size", action="store_true", help="full-size denoiser on the meta device")
    parser.add_argument("--out", default=None, help="output folder (default: constants.DAG_PLOT_DIR)")
    parser.add_argument("--no-render", action="store_true", help="skip the PNG/SVG renders")
    return parser
