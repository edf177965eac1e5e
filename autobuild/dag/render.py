"""Matplotlib renders of a denoiser DAG (no graphviz needed).

Small graphs are drawn whole. Big ones (full-size denoisers) get a block-collapsed overview (one box per
block with its layer count, global layers drawn individually) next to detail panels of representative
blocks: one per distinct block structure, largest first, with their inputs from outside the block drawn
as dashed context nodes. Layout: layers by longest path, every node then pushed down to right above
its first consumer; long edges routed through one virtual node per layer; order within a layer and
positions by barycenter sweeps.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import networkx as nx

from multiquant.utils import save_figure

__all__ = ["render_dag", "layered_layout"]

_COLORS = {
    "SA": "#6baed6", "CA": "#b4a7d6", "FF": "#74c476", "t-Embed": "#fdae6b", "c-Embed": "#fdd0a2",
    "Patchify": "#f16913", "AdaLN": "#fa9fb5", "Res": "#c7e9c0", "Skip": "#e6ab02", "Proj": "#9ecae1",
    "Out": "#fb6a4a", "Conv": "#fb6a4a", "Down": "#bcbddc", "Up": "#bcbddc", "combine": "#eeeeee",
    "block": "#dadaeb", "other": "#d9d9d9",
}
_LEGEND = (("SA", "self-attention"), ("CA", "cross-attention"), ("FF", "feed-forward"), ("AdaLN", "AdaLN linear"),
           ("t-Embed", "time embedding"), ("c-Embed", "condition embedding"), ("Patchify", "patchify"),
           ("Res", "resblock"), ("Proj", "proj in/out"), ("Skip", "skip"), ("Down", "down/upsample"),
           ("Out", "conv, in/out, output"), ("combine", "combine op"), ("block", "collapsed block"))


def _color(attrs: dict) -> str:
    if attrs.get("kind") == "combine":
        return _COLORS["combine"]
    if attrs.get("kind") == "block":
        return _COLORS["block"]
    op = attrs.get("op", "")
    for key in ("t-Embed", "c-Embed", "Patchify", "AdaLN", "Skip", "Down", "Up", "Out"):
        if op == key:
            return _COLORS[key]
    prefix = op.split("-")[0]
    if prefix in _COLORS:
        return _COLORS[prefix]
    if op.startswith("FF"):
        return _COLORS["FF"]
    return _COLORS["other"]


# ---------------------------------------------------------------------------------------------------------
# Layout: layered (Sugiyama-style) with long edges routed through virtual nodes
# ---------------------------------------------------------------------------------------------------------
_ROW_IN = 0.42  # inches per layer
_CHAR_IN = 0.062  # inches per label character at the default font size
_GAP_IN = 0.25  # between neighbouring boxes
_LANE_IN = 0.18  # width of a routed edge passing through a layer


def _layers(graph: nx.DiGraph) -> dict:
    layer = {}
    order = list(nx.topological_sort(graph))
    for n in order:
        preds = list(graph.predecessors(n))
        layer[n] = 1 + max(layer[p] for p in preds) if preds else 0
    for n in reversed(order):  # push nodes down to right above their first consumer
        succ = list(graph.successors(n))
        if succ:
            layer[n] = max(layer[n], min(layer[s] for s in succ) - 1)
    return layer


def layered_layout(graph: nx.DiGraph, widths: dict | None = None, sweeps: int = 9) -> tuple[dict, dict]:
    """Layout of a DAG: (node -> (x inches, layer), edge -> route [(x, layer), ...]); layer 0 at the top.

    Edges spanning several layers pass through virtual nodes, one per layer, which take part in the
    ordering (barycenter sweeps) and take a narrow lane in each row, so they run beside the boxes, not
    through them. Rows are packed in that order and centred."""
    widths = widths or {}
    layer = _layers(graph)
    aug = nx.DiGraph()
    aug.add_nodes_from(graph.nodes)
    chains = {}
    for u, v in graph.edges:
        chain = [u] + [("virtual", u, v, k) for k in range(layer[u] + 1, layer[v])] + [v]
        for k, node in enumerate(chain[1:-1], start=layer[u] + 1):
            layer[node] = k
        nx.add_path(aug, chain)
        chains[(u, v)] = chain
    rows = defaultdict(list)
    for n in aug.nodes:
        rows[layer[n]].append(n)
    depth = max(rows) if rows else 0
    rank = {n: float(i) for r in rows.values() for i, n in enumerate(r)}
    for sweep in range(sweeps):  # ordering: barycenters of the previous (next) layer
        down = sweep % 2 == 0
        nbrs = aug.predecessors if down else aug.successors
        for r in (range(1, depth + 1) if down else range(depth - 1, -1, -1)):
            bary = {n: (sum(rank[m] for m in nbrs(n)) / len(list(nbrs(n)))) if list(nbrs(n)) else rank[n]
                    for n in rows[r]}
            rows[r].sort(key=bary.__getitem__)
            rank.update({n: float(i) for i, n in enumerate(rows[r])})

    def width(n):
        return _LANE_IN if isinstance(n, tuple) and n[:1] == ("virtual",) else widths.get(n, 1.0)

    x = {}
    for r in range(depth + 1):  # placement: packed rows, centred
        cursor = 0.0
        for n in rows[r]:
            x[n] = cursor + width(n) / 2
            cursor += width(n) + _GAP_IN
        shift = cursor / 2
        for n in rows[r]:
            x[n] -= shift
    pos = {n: (x[n], layer[n]) for n in graph.nodes}
    routes = {e: [(x[n], layer[n]) for n in chain] for e, chain in chains.items()}
    return pos, routes


def _label_widths(labels: dict) -> dict:
    return {n: _CHAR_IN * max(len(line) for line in text.split("\n")) + 0.2 for n, text in labels.items()}


def _panel_size(graph: nx.DiGraph, labels: dict) -> tuple[float, float]:
    """(width, height) in inches that fit the panel's layout."""
    widths = _label_widths(labels)
    pos, routes = layered_layout(graph, widths)
    if not pos:
        return 2.0, 1.0
    left = min(min(x - widths[n] / 2 for n, (x, _) in pos.items()),
               min((x for r in routes.values() for x, _ in r), default=0))
    right = max(max(x + widths[n] / 2 for n, (x, _) in pos.items()),
                max((x for r in routes.values() for x, _ in r), default=0))
    depth = max(y for _, y in pos.values())
    return max(2.5, right - left + 0.6), _ROW_IN * (depth + 1.6)


def _draw(ax, graph: nx.DiGraph, labels: dict, title: str, context: set = frozenset(), fontsize: float = 7.0):
    widths = _label_widths(labels)
    pos, routes = layered_layout(graph, widths)
    arrow = dict(arrowstyle="-|>", lw=0.6, color="#666666", mutation_scale=7, shrinkB=8)
    for (u, v), route in routes.items():
        pts = [(px, -py * _ROW_IN) for px, py in route]
        if len(pts) > 2:
            ax.plot([p[0] for p in pts[:-1]], [p[1] for p in pts[:-1]], lw=0.6, color="#666666", zorder=1)
        ax.annotate("", xy=pts[-1], xytext=pts[-2], arrowprops=dict(arrow, shrinkA=8 if len(pts) == 2 else 0))
    for n, (px, py) in pos.items():
        attrs = graph.nodes[n]
        dashed = n in context
        is_combine = attrs.get("kind") == "combine"
        ax.text(px, -py * _ROW_IN, labels[n], ha="center", va="center",
                fontsize=fontsize * (0.85 if is_combine else 1.0), zorder=3,
                bbox=dict(boxstyle="round,pad=0.25" if not is_combine else "round4,pad=0.2",
                          fc="white" if dashed else _color(attrs), ec="#999999" if dashed else "#333333",
                          lw=0.6, ls="--" if dashed else "-"))
    xs = [px for r in routes.values() for px, _ in r] + [px + s * widths[n] / 2 for n, (px, _) in pos.items()
                                                          for s in (-1, 1)]
    depth = max((py for _, py in pos.values()), default=0)
    ax.set_xlim(min(xs, default=0) - 0.3, max(xs, default=0) + 0.3)
    ax.set_ylim(-(depth + 0.8) * _ROW_IN, 0.8 * _ROW_IN)
    ax.set_title(title, fontsize=fontsize + 2)
    ax.axis("off")


# ---------------------------------------------------------------------------------------------------------
# Views
# ---------------------------------------------------------------------------------------------------------
def _short(graph: nx.DiGraph, n) -> str:
    attrs = graph.nodes[n]
    if attrs.get("kind") == "combine":
        return attrs["op"]
    half = attrs.get("half", -1)
    return attrs.get("op", "") + (f" ({half + 1}/2)" if half >= 0 else "")


def _global_label(graph: nx.DiGraph, n) -> str:
    attrs = graph.nodes[n]
    if attrs.get("kind") == "combine":
        return attrs["op"]
    path = attrs.get("path", "")
    tail = ".".join(path.split(".")[-2:])
    if len(tail) > 28:
        tail = "…" + tail[-27:]
    return f"{attrs.get('op', '')}\n{tail}"


def _block_name(graph: nx.DiGraph, nodes: list) -> str:
    paths = [graph.nodes[n].get("path", "") for n in nodes]
    first = paths[0].split(".")
    prefix = ".".join(first[:2]) if len(first) > 1 and first[1].isdigit() else first[0]
    return prefix


def _overview(graph: nx.DiGraph):
    """Blocks collapsed to one node each; global nodes kept."""
    members = defaultdict(list)
    for n, attrs in graph.nodes(data=True):
        b = attrs.get("block", -1)
        members[("block", b) if b >= 0 else n].append(n)
    view = nx.DiGraph()
    labels = {}
    for key, nodes in members.items():
        if isinstance(key, tuple):
            layers = sum(graph.nodes[n]["kind"] == "layer" for n in nodes)
            name = _block_name(graph, nodes)
            view.add_node(key, kind="block")
            labels[key] = f"{name}\n{layers} layers, {len(nodes) - layers} comb."
        else:
            view.add_node(key, **graph.nodes[key])
            labels[key] = _global_label(graph, key)
    owner = {n: key for key, nodes in members.items() for n in nodes}
    targets = defaultdict(list)
    for u, v in graph.edges:
        a, b = owner[u], owner[v]
        if a != b and b not in targets[a]:
            targets[a].append(b)
    for a, bs in targets.items():
        blocks = [b for b in bs if isinstance(b, tuple)]
        if not isinstance(a, tuple) and len(blocks) > 3:
            # a global feeding every block: one edge to the first, the count in the label
            bs = [b for b in bs if not isinstance(b, tuple)] + blocks[:1]
            labels[a] += f"\n(→ {len(blocks)} blocks)"
        view.add_edges_from((a, b) for b in bs)
    return view, labels


def _signature(graph: nx.DiGraph, nodes: list) -> str:
    inner = set(nodes)
    ops = [graph.nodes[n]["op"] for n in nodes]
    edges = sorted((graph.nodes[u]["op"], graph.nodes[v]["op"]) for u, v in graph.edges(nodes) if v in inner)
    return repr((sorted(ops), edges))


def _representative_scopes(graph: nx.DiGraph, max_panels: int) -> list:
    scopes = defaultdict(list)
    for n, attrs in graph.nodes(data=True):
        if attrs.get("block", -1) >= 0:
            scopes[attrs.get("scope", "")].append(n)
    seen, picks = set(), []
    for scope, nodes in scopes.items():
        sig = _signature(graph, nodes)
        if sig not in seen:
            seen.add(sig)
            picks.append((scope, nodes))
    picks.sort(key=lambda item: -len(item[1]))  # stable: first occurrence wins among equals
    return picks[:max_panels]


def _wrap(text: str, width: int = 34) -> str:
    lines, line = [], ""
    for part in text.split("."):
        piece = part if not line else "." + part
        if line and len(line) + len(piece) > width:
            lines.append(line)
            line = piece
        else:
            line += piece
    return "\n".join(lines + [line])


def _detail(graph: nx.DiGraph, nodes: list):
    inner = set(nodes)
    context = {p for n in nodes for p in graph.predecessors(n) if p not in inner}
    view = nx.DiGraph()
    for n in [m for m in graph.nodes if m in inner or m in context]:
        view.add_node(n, **graph.nodes[n])
    for u, v in graph.edges:
        if v in inner and (u in inner or u in context):
            view.add_edge(u, v)
    labels = {}
    for n in view.nodes:
        if n in context:
            attrs = graph.nodes[n]
            where = (f"blk {attrs['block']}" if attrs.get("block", -1) >= 0
                     else attrs.get("scope", "").split(".")[-1] or attrs.get("path", "").split(".")[0])
            labels[n] = f"{_short(graph, n)}\n({where or 'model'})"
        else:
            labels[n] = _short(graph, n)
    return view, labels, context


def render_dag(graph: nx.DiGraph, path_png: str | Path | None, path_svg: str | Path | None = None,
               collapse_blocks: bool | None = None, max_panels: int = 3, max_full_nodes: int = 60):
    """Draw ``graph`` to PNG and/or SVG. ``collapse_blocks``: None = collapse when the graph has more than
    ``max_full_nodes`` nodes. Returns the matplotlib figure."""
    # matplotlib here, not at the top: importing autobuild.dag (every CLI start) must not pay for it
    from matplotlib import rc_context
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state
    from matplotlib.patches import Patch

    family = graph.graph.get("family", "")
    if graph.graph.get("size") == "tiny":  # never a tiny random architecture under the real model's name alone
        family = f"{family} (tiny random architecture)"
    n_layers = sum(1 for _, a in graph.nodes(data=True) if a.get("kind") == "layer")
    header = (f"{family}: {graph.number_of_nodes()} nodes ({n_layers} layers, "
              f"{graph.number_of_nodes() - n_layers} combine)")
    collapse = graph.number_of_nodes() > max_full_nodes if collapse_blocks is None else collapse_blocks
    if not collapse:
        # every node drawn: each layer names its module (op labels alone repeat: "Conv", "Conv", ...)
        labels = {n: _global_label(graph, n) for n in graph.nodes}
        panels = [(header, graph, labels, set())]
    else:
        view, labels = _overview(graph)
        panels = [("overview: one box per block", view, labels, set())]
        for scope, nodes in _representative_scopes(graph, max_panels):
            view, labels, context = _detail(graph, nodes)
            panels.append((_wrap(f"detail: {scope}"), view, labels, context))
    sizes = [_panel_size(view, labels) for _, view, labels, _ in panels]
    widths = [w for w, _ in sizes]
    height = max(h for _, h in sizes) + 1.2
    fig = Figure(figsize=(max(sum(widths), 6.0), max(height, 4.0)))
    axes = fig.subplots(1, len(panels), gridspec_kw=dict(width_ratios=widths), squeeze=False)[0]
    for ax, (title, view, labels, context) in zip(axes, panels):
        _draw(ax, view, labels, title, context)
    if collapse:
        fig.suptitle(header, fontsize=12)
    used = {"white"} | {_color(view.nodes[n]) for _, view, _, context in panels for n in view.nodes if n not in context}
    handles = [Patch(fc=_COLORS[k], ec="#333333", label=text) for k, text in _LEGEND if _COLORS[k] in used]
    ncol = max(2, min(len(handles), 7, int(fig.get_figwidth() / 1.45)))
    fig.legend(handles=handles, loc="lower center", ncol=ncol, fontsize=7, frameon=False)
    legend_in = 0.2 * (-(-len(handles) // ncol)) + 0.2
    fig.tight_layout(rect=(0, legend_in / fig.get_figheight(), 1, 0.97))
    for path in (path_png, path_svg):
        if path:
            svg = str(path).endswith(".svg")
            with rc_context({"svg.hashsalt": "qua2sedimo"}):  # reproducible files: fixed ids, no date
                save_figure(fig, path, close=False, bbox_inches=None, dpi=None if svg else 110,
                            metadata={"Date": None} if svg else None)
    return fig
