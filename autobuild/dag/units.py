"""Units: the subgraphs whose quantization variants are scored (docs/design.md §1).

A unit is an output node and its ``hops``-deep upstream receptive field; the layer nodes inside are the
unit's own, and units partition the layer nodes. Residual ``add`` nodes (other than the output) bound
a field: they are included but not expanded, so a unit never reaches through the residual stream into
a neighbouring branch.

Block-level units are derived from the graph, not listed by hand. Layers are visited last-to-first; each
unvisited layer seeds a unit:

1. *Promote* the seed to its single consumer while that consumer only joins the seed with other
   unassigned layers of the same scope (or with a split layer's ``cat`` of such layers): the two halves
   of a split layer meet in their ``cat``, a resblock's conv path and shortcut meet in their ``add``,
   Q and K meet in Q·Kᵀ, the time and condition embedders meet in their ``embed`` sum.
2. *Grow* the field hop by hop (up to ``max_hops``) and keep the largest valid one. A field is valid
   when it holds at most ``max_layers`` layers, all unassigned, and every node but the output and the
   residual boundaries (and the combine nodes on its frontier, which pull nothing in) is private to the
   unit: all its consumers are inside the field or in the unit's
   scope (the repeated block; all global layers share one scope), and a layer's first consumer is
   inside the field. So an AdaLN linear joins
   the self-attention of its block (its first use), a caption projection shared by all blocks stays out.
3. Trim trailing hops that add no layer.

For the reference families this gives the reference's units where the graphs agree: e.g. PixArt
self-attention (adaln, q, k, v, matmuls, out; 3 hops), cross-attention split into (q, k → Q·Kᵀ) and
(v, Q·Kᵀ → attn·V → out), FF (2 layers), time embedding (lin1 → lin2 → adaln_single.linear); DiT
self-attention with the block's AdaLN linear (4 hops; block 0 also takes the patchify conv); U-Net
self-attention with proj_in for the first transformer block. Where a layer feeds several scopes (a U-Net
skip source, a downsampler output reused by the up path) the unit stops before it, so some U-Net
resblocks are two units.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import networkx as nx

__all__ = ["Unit", "units", "unit_subgraph", "receptive_field", "UNIT_TYPES"]

# (layer-op prefix, unit type), by priority: a unit's type is that of its highest-priority layer.
UNIT_TYPES = (("SA-", "Self-Attn"), ("CA-", "Cross-Attn"), ("FF", "Feedforward"), ("Res-", "ResBlk"),
              ("Skip", "Skip"), ("Out", "Out Proj"), ("Patchify", "Patchify"), ("t-Embed", "t-Embed"),
              ("c-Embed", "c-Embed"), ("Proj-In", "Proj In"), ("Proj-Out", "Proj Out"), ("Down", "Downsample"),
              ("Up", "Upsample"), ("Conv-In", "Conv In"), ("Conv-Out", "Conv Out"), ("AdaLN", "AdaLN"))
_GLOBAL = "<global>"


@dataclass
class Unit:
    name: str
    nodes: list  # the receptive field, in graph (topological) order; the output node is last
    output: str
    hops: int
    layers: list = field(default_factory=list)  # the unit's own layer nodes, graph order
    type: str = ""  # e.g. "Self-Attn" (UNIT_TYPES) or the layer op at node level
    block: int = -1

    def num_variants(self, options: int = 6) -> int:
        return options ** len(self.layers)


# ---------------------------------------------------------------------------------------------------------
def _is_layer(graph: nx.DiGraph, n) -> bool:
    return graph.nodes[n]["kind"] == "layer"


def _group(graph: nx.DiGraph, n) -> str:
    attrs = graph.nodes[n]
    return _GLOBAL if attrs.get("block", -1) == -1 else attrs.get("scope", "")


def _terminal(graph: nx.DiGraph, n) -> bool:
    attrs = graph.nodes[n]
    return attrs["kind"] == "combine" and attrs["op"] == "add"


def receptive_field(graph: nx.DiGraph, output, hops: int) -> dict:
    """Nodes within ``hops`` upstream steps of ``output`` -> their distance. Residual ``add`` nodes other
    than the output are included but not expanded."""
    dist = {output: 0}
    frontier = [output]
    for d in range(1, hops + 1):
        nxt = []
        for n in frontier:
            if n != output and _terminal(graph, n):
                continue
            for p in graph.predecessors(n):
                if p not in dist:
                    dist[p] = d
                    nxt.append(p)
        frontier = nxt
    return dist


def _layers_in(graph, nodes) -> set:
    return {n for n in nodes if _is_layer(graph, n)}


def _contained(graph, n, fld, group, pos) -> bool:
    """Node ``n`` of field ``fld`` is private to a unit of scope ``group``: all its consumers are in the
    field or in the scope, and, for a layer, its first consumer is in the field."""
    succ = list(graph.successors(n))
    if not all(s in fld or _group(graph, s) == group for s in succ):
        return False
    return not (succ and _is_layer(graph, n)) or min(succ, key=pos.__getitem__) in fld


def _valid(graph, fld, output, group, assigned, pos, max_layers) -> bool:
    layers = _layers_in(graph, fld)
    if len(layers) > max_layers or layers & assigned:
        return False
    hops = max(fld.values())
    # a combine node on the frontier pulls nothing in: it may be shared (e.g. the time embedding sum)
    return all(n == output or _terminal(graph, n) or (fld[n] == hops and not _is_layer(graph, n))
               or _contained(graph, n, fld, group, pos) for n in fld)


def _branch_of(graph, p, c, group, assigned) -> bool:
    """``p`` feeds only ``c`` and is an unassigned layer of ``group`` or a non-residual combine of only
    such layers (a split layer's ``cat``)."""
    if set(graph.successors(p)) != {c}:
        return False
    if _is_layer(graph, p):
        return p not in assigned and _group(graph, p) == group
    preds = list(graph.predecessors(p))
    return (not _terminal(graph, p) and bool(preds)
            and all(_is_layer(graph, q) and q not in assigned and _group(graph, q) == group for q in preds))


_EMBEDDING_OPS = ("t-Embed", "c-Embed")


def _mixes_embedding(graph, c) -> bool:
    """``c`` joins an embedding layer's output with a non-embedding layer's."""
    kinds = {graph.nodes[p]["op"] in _EMBEDDING_OPS for p in graph.predecessors(c) if _is_layer(graph, p)}
    return len(kinds) > 1


def _promote(graph, seed, assigned):
    out, group = seed, _group(graph, seed)
    while True:
        succ = list(graph.successors(out))
        if len(succ) != 1:
            return out
        c = succ[0]
        if _is_layer(graph, c) or _group(graph, c) != group:
            return out
        if not all(p == out or _branch_of(graph, p, c, group, assigned) for p in graph.predecessors(c)):
            return out
        if graph.graph.get("derived_labels") and _mixes_embedding(graph, c):
            return out  # the global time/condition MLP stays its own unit (no naming rules to say otherwise)
        out = c


def _grow(graph, output, assigned, pos, max_layers, max_hops) -> int:
    group = _group(graph, output)
    best, previous = 0, None
    for h in range(0, max_hops + 1):
        fld = receptive_field(graph, output, h)
        if previous is not None and len(fld) == len(previous):
            break  # the field stopped growing
        layers = _layers_in(graph, fld)
        if len(layers) > max_layers or layers & assigned:
            break  # only gets worse with more hops
        if _valid(graph, fld, output, group, assigned, pos, max_layers):
            best = h
        previous = fld
    # trim trailing hops that add no layer
    target = _layers_in(graph, receptive_field(graph, output, best))
    for h in range(best + 1):
        fld = receptive_field(graph, output, h)
        if _layers_in(graph, fld) == target and _valid(graph, fld, output, group, assigned, pos, max_layers):
            return h
    return best


def _unit_type(graph, layers) -> str:
    ops = [graph.nodes[n]["op"] for n in layers]
    for key, name in UNIT_TYPES:
        prefix = key.endswith("-") or key == "FF"
        if any(op.startswith(key) if prefix else op == key for op in ops):
            return name
    return "Other"


def units(graph: nx.DiGraph, level: str = "block", max_layers: int = 6, max_hops: int = 4) -> list[Unit]:
    """The scored subgraphs of ``graph``.

    ``level="node"``: every layer node alone (hops 0). ``level="block"``: units derived from the graph
    (module docstring), each with at most ``max_layers`` layers (6 options each: at most 6**6 variants)
    and ``max_hops`` hops. Units are ordered by their output's position and partition the layer nodes
    (asserted)."""
    order = list(graph.nodes)
    pos = {n: i for i, n in enumerate(order)}
    layer_nodes = [n for n in order if _is_layer(graph, n)]
    if level == "node":
        result = [Unit(name=n, nodes=[n], output=n, hops=0, layers=[n], type=graph.nodes[n]["op"],
                       block=graph.nodes[n].get("block", -1)) for n in layer_nodes]
    elif level == "block":
        result = _block_units(graph, layer_nodes, pos, max_layers, max_hops)
    else:
        raise ValueError(f"level must be 'node' or 'block', got {level!r}")
    _check_partition(graph, result, layer_nodes, max_layers)
    return result


def _block_units(graph, layer_nodes, pos, max_layers, max_hops) -> list[Unit]:
    assigned: set = set()
    found = []
    for seed in reversed(layer_nodes):
        if seed in assigned:
            continue
        output = _promote(graph, seed, assigned)
        hops = _grow(graph, output, assigned, pos, max_layers, max_hops)
        fld = receptive_field(graph, output, hops)
        layers = _layers_in(graph, fld)
        if seed not in layers:  # cannot happen (the seed is upstream of its promotion); keep it safe
            output, hops, fld, layers = seed, 0, {seed: 0}, {seed}
        assigned |= layers
        found.append((output, hops, fld, layers))
    found.sort(key=lambda item: pos[item[0]])
    result, seen = [], {}
    for output, hops, fld, layers in found:
        nodes = sorted(fld, key=pos.__getitem__)
        nodes.remove(output)
        nodes.append(output)
        layers = sorted(layers, key=pos.__getitem__)
        kind = _unit_type(graph, layers)
        attrs = graph.nodes[output]
        scope = attrs.get("scope") or "model"
        if attrs.get("block", -1) == -1 and len({graph.nodes[n].get("scope") for n in layers}) == 1:
            scope = graph.nodes[layers[0]].get("scope") or scope
        name = f"{scope}/{kind.lower().replace(' ', '-')}"
        if name in seen:
            seen[name] += 1
            name = f"{name}#{seen[name]}"
        else:
            seen[name] = 1
        block = max((graph.nodes[n].get("block", -1) for n in layers), default=-1)
        result.append(Unit(name=name, nodes=nodes, output=output, hops=hops, layers=layers, type=kind, block=block))
    return result


def _check_partition(graph, result, layer_nodes, max_layers) -> None:
    owner = {}
    for unit in result:
        assert unit.nodes[-1] == unit.output, f"unit {unit.name}: output is not the last node"
        assert len(unit.layers) <= max_layers, f"unit {unit.name} has {len(unit.layers)} layers"
        field_layers = _layers_in(graph, receptive_field(graph, unit.output, unit.hops))
        assert field_layers == set(unit.layers), f"unit {unit.name}: layers differ from its receptive field"
        for n in unit.layers:
            assert n not in owner, f"layer {n} is in units {owner[n]} and {unit.name}"
            owner[n] = unit.name
    missing = [n for n in layer_nodes if n not in owner]
    assert not missing, f"layers in no unit: {missing[:5]}"


def unit_subgraph(graph: nx.DiGraph, unit: Unit) -> nx.DiGraph:
    """The unit as its own graph (induced edges, unit node order: output last), with ``hops`` attached."""
    sub = nx.DiGraph(graph.subgraph(unit.nodes))
    ordered = nx.DiGraph(**graph.graph, hops=unit.hops, unit=unit.name)
    ordered.add_nodes_from((n, sub.nodes[n]) for n in unit.nodes)
    ordered.add_edges_from(sub.edges)
    return ordered
