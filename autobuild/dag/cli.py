"""``qua2sedimo dag --model M [--tiny] [--out DIR]``: trace a denoiser's DAG, report it, render it."""
from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

from multiquant.cli_flags import add_model_flags

from .counts import REFERENCE_NODE_COUNTS, count_nodes
from .io import save_dag
from .render import render_dag
from .trace import family_dag
from .units import units

__all__ = ["run_dag", "add_dag_arguments"]


def run_dag(model: str, full_size: bool = True, out: str | Path | None = None, render: bool = True,
            pretrained: str | None = None) -> dict:
    """Trace family ``model`` (the real, full-size architecture on the meta device; the architecture of the
    ``pretrained`` weights when given; or, with ``full_size=False``, the tiny random one on the CPU), print node
    and unit counts, and write ``<out>/<model>[_tiny].dag.json`` plus ``.png``/``.svg`` renders (the title says
    "tiny" for the tiny one). ``out`` defaults to ``constants.DAG_PLOT_DIR``. Returns a summary dict."""
    if out is None:
        from multiquant.paths import constants

        out = constants.DAG_PLOT_DIR
    out = Path(out)
    if pretrained is not None and full_size:
        import torch

        from multiquant.families import get_family

        from .trace import build_dag

        spec = get_family(model)
        graph = build_dag(spec.load(pretrained, dtype=torch.float32, device="cpu"), spec)
    else:
        graph = family_dag(model, "full" if full_size else "tiny", "meta" if full_size else "cpu")
    graph.graph["size"] = "full" if full_size else "tiny"
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
    """The ``dag`` flags (for a sub-parser of the ``qua2sedimo`` command)."""
    add_model_flags(parser, device=False, tiny_help="the tiny random architecture (tests) instead of the real one")
    parser.add_argument("--full-size", action="store_true",
                        help="the real, full-size architecture on the meta device (the default; kept for old scripts)")
    parser.add_argument("--out", default=None, help="output folder (default: constants.DAG_PLOT_DIR)")
    parser.add_argument("--no-render", action="store_true", help="skip the PNG/SVG renders")
    return parser
