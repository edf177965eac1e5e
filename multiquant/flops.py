"""Per-layer MACs of one denoiser forward, keyed by quantizable layer: the cost side of the bit allocator.

``qua2sedimo flops --model M`` builds the architecture on the meta device (no weights, no memory), runs one
forward at the family's protocol resolution through :func:`multiquant.metrics.bops.layer_macs` and writes
``results/flops_analysis/flops_analysis_<model>.json`` (``..._<model>_tiny.json`` for ``--tiny``):

* ``layers``: one entry per quantizable layer key (split halves priced by their share of the input
  channels; tied copies each with their own MACs) with shape, numel, channels and ``tied_to``;
* ``other_macs``: attention products (``::qk``/``::av``/``::matmul``) and weight work outside the search
  space (excluded layers, ``::linear``), which no weight bit width changes.
"""
from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path

from .cli_flags import add_model_flags

__all__ = ["flops_table", "layer_mac_rows", "flops_path", "write_flops_file", "cmd_flops", "add_flops_parser"]


def layer_mac_rows(layers, macs: dict[str, int]) -> list[dict]:
    """One row per quantizable layer: its MACs (a split half gets its share of the module's MACs)."""
    in_width: dict[str, int] = defaultdict(int)
    for ref in layers:
        in_width[ref.path] = max(in_width[ref.path], ref.cols[1] if ref.cols else ref.shape[1])
    rows = []
    for ref in layers:
        share = (ref.cols[1] - ref.cols[0]) / in_width[ref.path] if ref.cols else 1.0
        rows.append({"key": ref.key, "path": ref.path, "cols": list(ref.cols) if ref.cols else None,
                     "shape": list(ref.shape), "numel": ref.numel, "channels": ref.channels, "tied_to": ref.tied_to,
                     "macs": int(round(macs.get(ref.path, 0) * share))})
    return rows


def flops_table(model_name: str, tiny: bool = False, resolution: int | None = None) -> dict:
    """The FLOPs file content for a family (full size, or the tiny test model), measured on the meta device."""
    from .families import get_family
    from .layers import quantizable_layers
    from .metrics.bops import layer_macs

    family = get_family(model_name)
    model = family.build("tiny" if tiny else "full", device="meta")
    layers = quantizable_layers(model, family)
    resolution = resolution or family.resolution
    macs = layer_macs(model, family, resolution=resolution)
    rows = layer_mac_rows(layers, macs)
    paths = {ref.path for ref in layers}
    other = {k: int(v) for k, v in sorted(macs.items()) if k not in paths and v}
    return {"model": family.name, "tiny": tiny, "resolution": resolution, "fp_prec": family.fp_prec,
            "unit": "MACs of one denoiser forward at batch 1 (classifier-free guidance doubles it)",
            "total_layer_macs": sum(r["macs"] for r in rows), "total_other_macs": sum(other.values()),
            "num_layers": len(rows), "layers": rows, "other_macs": other,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S")}


def flops_path(results_dir: Path, model_name: str, tiny: bool = False) -> Path:
    return Path(results_dir) / "flops_analysis" / f"flops_analysis_{model_name}{'_tiny' if tiny else ''}.json"


def write_flops_file(table: dict, path: Path) -> Path:
    from .utils import atomic_path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(table, indent=1))
    return path


def cmd_flops(args) -> int:
    from multiquant.paths import constants

    table = flops_table(args.model, tiny=args.tiny, resolution=args.resolution)
    out = Path(args.out) if args.out else flops_path(Path(constants.RESULTS_DIR), table["model"], args.tiny)
    write_flops_file(table, out)
    top = sorted(table["layers"], key=lambda r: -r["macs"])[:5]
    print(f"{table['model']}{' (tiny)' if args.tiny else ''} at {table['resolution']} px: {table['num_layers']} layers, "
          f"{table['total_layer_macs'] / 1e9:.4g} GMACs in quantizable layers, "
          f"{table['total_other_macs'] / 1e9:.4g} GMACs elsewhere (attention products, excluded layers)")
    for r in top:
        print(f"  {r['macs'] / 1e9:10.4g} GMACs  {r['key']}")
    print(f"wrote {out}")
    return 0


def add_flops_parser(subparsers):
    p = subparsers.add_parser("flops", help="per-layer MACs at the family's resolution (meta device, no weights)")
    add_model_flags(p, weights=False, device=False, tiny_help="the tiny test architecture instead of the full-size one")
    p.add_argument("--resolution", type=int, default=None, help="image resolution (default: the family's)")
    p.add_argument("--out", default=None,
                   help="output file (default results/flops_analysis/flops_analysis_<model>[_tiny].json)")
    p.set_defaults(func=cmd_flops)
    return p
