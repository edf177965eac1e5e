"""Denoiser -> DAG tracing, units and renders (autobuild.dag)."""
from __future__ import annotations

import networkx as nx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from autobuild.dag import (COMBINE_OPS, LAYER_OPS, NODE_COUNTS, REFERENCE_NODE_COUNTS, build_dag, count_nodes,
                           family_dag, layer_op, load_dag, receptive_field, render_dag, save_dag, unit_subgraph,
                           units)
from multiquant.families import BUILTIN_FAMILIES, FamilySpec, get_family, register_family
from multiquant.layers import quantizable_layers

FAMILIES = sorted(BUILTIN_FAMILIES)  # not list_families(): other test modules register toy families on import
Q = ".weight_quantizer"


@pytest.fixture(scope="module")
def tiny():
    cache = {}

    def get(name):
        if name not in cache:
            spec = get_family(name)
            model = spec.build("tiny", device="cpu")
            cache[name] = (build_dag(model, spec), model, spec)
        return cache[name]

    return get


def key(path: str, half: int = 0) -> str:
    return f"model.{path}{Q}" + ("_0" if half else "")


def combine_between(graph, *preds, op=None):
    """The combine nodes fed by all of ``preds``."""
    common = set.intersection(*(set(graph.successors(p)) for p in preds))
    return [n for n in common if graph.nodes[n]["kind"] == "combine" and (op is None or graph.nodes[n]["op"] == op)]


# ------------------------------------------------------------------------------------------ every family
@pytest.mark.parametrize("name", FAMILIES)
def test_tiny_dag_contract(tiny, name):
    graph, model, spec = tiny(name)
    assert nx.is_directed_acyclic_graph(graph)
    order = list(graph.nodes)
    position = {n: i for i, n in enumerate(order)}
    assert all(position[u] < position[v] for u, v in graph.edges), "node order is not topological"
    assert graph.graph["family"] == name

    refs = quantizable_layers(model, spec)
    layer_nodes = [n for n, a in graph.nodes(data=True) if a["kind"] == "layer"]
    covered = [graph.nodes[n]["key"] for n in layer_nodes] + [k for n in layer_nodes for k in graph.nodes[n]["aliases"]]
    assert sorted(covered) == sorted(r.key for r in refs), "every quantizer key exactly once"
    assert sorted(layer_nodes) == sorted(r.key for r in refs if not r.tied_to)
    for n, attrs in graph.nodes(data=True):
        assert {"kind", "op", "block", "path", "scope", "aliases"} <= set(attrs)
        assert isinstance(attrs["block"], int)
        if attrs["kind"] == "layer":
            assert attrs["key"] == n and attrs["op"] in LAYER_OPS[:-2], (n, attrs["op"])  # no generic fallback
            assert graph.degree(n) > 0, f"{n} was never called"
        else:
            assert attrs["op"] in COMBINE_OPS
            assert graph.in_degree(n) >= (1 if attrs["op"] == "matmul" else 2), f"{n} joins nothing"
    # units: both levels partition the layer nodes; block units stay small and are receptive fields
    for level in ("node", "block"):
        found = units(graph, level)
        owned = [n for u in found for n in u.layers]
        assert sorted(owned) == sorted(layer_nodes)
        for u in found:
            assert u.nodes[-1] == u.output and len(u.layers) <= 6 and u.num_variants() <= 6 ** 6
            assert set(u.nodes) == set(receptive_field(graph, u.output, u.hops))
    assert len(units(graph, "node")) == len(layer_nodes)


# ------------------------------------------------------------------------------------------ hand-checked blocks
def test_pixart_block_edges(tiny):
    graph, _, _ = tiny("pixart_alpha")
    b = "transformer_blocks.0"
    q, k, v, out = (key(f"{b}.attn1.{p}") for p in ("to_q", "to_k", "to_v", "to_out.0"))
    adaln, x0 = key("adaln_single.linear"), key("pos_embed.proj")
    (qk,) = combine_between(graph, q, k, op="matmul")
    (av,) = combine_between(graph, qk, v, op="matmul")
    assert list(graph.successors(av)) == [out]
    (modulate,) = combine_between(graph, x0, adaln, op="norm")  # AdaLN: x*(1+scale)+shift
    assert {q, k, v} <= set(graph.successors(modulate))
    (residual,) = [s for s in graph.successors(out)]  # gate * attn + x: one fused add
    assert graph.nodes[residual]["op"] == "add" and set(graph.predecessors(residual)) == {out, x0, adaln}
    caption = key("caption_projection.linear_2")
    assert set(graph.predecessors(key(f"{b}.attn2.to_k"))) == {caption}
    assert set(graph.predecessors(key(f"{b}.attn2.to_q"))) == {residual}  # PixArt: no norm before CA
    assert list(graph.predecessors(key(f"{b}.ff.net.2"))) == [key(f"{b}.ff.net.0.proj")]
    assert list(graph.predecessors(key("adaln_single.linear"))) == [key("adaln_single.emb.timestep_embedder.linear_2")]
    assert graph.nodes[q]["op"] == "SA-Q" and graph.nodes[key(f"{b}.attn2.to_out.0")]["op"] == "CA-Out"
    assert graph.nodes[q]["block"] == 0 and graph.nodes[caption]["block"] == -1
    # the output head: last block's residual and the time embedding meet in the final AdaLN
    (head,) = graph.predecessors(key("proj_out"))
    assert graph.nodes[head]["op"] == "norm"
    assert key("adaln_single.emb.timestep_embedder.linear_2") in set(graph.predecessors(head))


def test_dit_ties_and_adaln(tiny):
    graph, _, _ = tiny("dit")
    t2 = key("transformer_blocks.0.norm1.emb.timestep_embedder.linear_2")
    assert graph.nodes[t2]["aliases"] == [key("transformer_blocks.1.norm1.emb.timestep_embedder.linear_2")]
    assert graph.nodes[t2]["block"] == -1 and graph.nodes[t2]["op"] == "t-Embed"
    for b in (0, 1):
        ada = key(f"transformer_blocks.{b}.norm1.linear")
        assert list(graph.predecessors(ada)) == [t2] and graph.nodes[ada]["op"] == "AdaLN"
        assert [graph.nodes[s]["op"] for s in graph.successors(ada)].count("norm") == 2  # SA and FF modulation
    assert set(graph.predecessors(key("proj_out_1"))) == {t2}


def test_split_layers_take_their_own_halves(tiny):
    graph, _, _ = tiny("hunyuan")  # 6 blocks: blocks 4, 5 concat [x, skip of block 5-b]
    for b, skip_from in ((4, 1), (5, 0)):
        first, second = key(f"blocks.{b}.skip_linear"), key(f"blocks.{b}.skip_linear", 1)
        assert list(graph.predecessors(first)) == [f"blocks.{b - 1}:add2"]
        assert list(graph.predecessors(second)) == [f"blocks.{skip_from}:add2"]
        (cat,) = combine_between(graph, first, second, op="cat")
        assert graph.nodes[first]["half"] == 0 and graph.nodes[second]["half"] == 1
        assert graph.nodes[first]["op"] == graph.nodes[second]["op"] == "Skip"
    graph, _, _ = tiny("sdv15")  # up-block resnet shortcut: cat([hidden, skip]) -> 1x1 conv split in two
    r = "up_blocks.0.resnets.0"
    first, second = key(f"{r}.conv_shortcut"), key(f"{r}.conv_shortcut", 1)
    assert list(graph.predecessors(first)) == ["mid_block.resnets.1:add0"]
    assert list(graph.predecessors(second)) == ["down_blocks.1.resnets.1:add0"]
    assert set(graph.predecessors(key(f"{r}.conv1"))) == {"mid_block.resnets.1:add0", "down_blocks.1.resnets.1:add0"}
    (cat,) = combine_between(graph, first, second, op="cat")
    (add,) = graph.successors(cat)
    assert set(graph.predecessors(add)) == {cat, key(f"{r}.conv2")}


# ------------------------------------------------------------------------------------------ units
def test_pixart_units_match_reference(tiny):
    graph, _, _ = tiny("pixart_alpha")
    found = {u.name: u for u in units(graph, "block")}
    sa = found["transformer_blocks.0/self-attn"]
    assert sa.hops == 3 and sa.output == key("transformer_blocks.0.attn1.to_out.0")
    assert [graph.nodes[n]["op"] for n in sa.nodes] == ["norm", "SA-Q", "SA-K", "SA-V", "matmul", "matmul", "SA-Out"]
    qk, vo = found["transformer_blocks.0/cross-attn"], found["transformer_blocks.0/cross-attn#2"]
    assert (qk.hops, [graph.nodes[n]["op"] for n in qk.layers]) == (1, ["CA-Q", "CA-K"])
    assert graph.nodes[qk.output]["op"] == "matmul" and qk.output in vo.nodes
    assert (vo.hops, [graph.nodes[n]["op"] for n in vo.layers]) == (2, ["CA-V", "CA-Out"])
    time = found["adaln_single/t-embed"]
    assert time.hops == 2 and time.output == key("adaln_single.linear") and len(time.layers) == 3
    sub = unit_subgraph(graph, sa)
    assert list(sub.nodes)[-1] == sa.output and sub.graph["hops"] == 3 and nx.is_directed_acyclic_graph(sub)


def test_unit_types_cover_families(tiny):
    graph, _, _ = tiny("sdxl")
    types = {u.type for u in units(graph, "block")}
    assert {"Self-Attn", "Cross-Attn", "Feedforward", "ResBlk", "t-Embed", "Conv In", "Conv Out"} <= types
    graph, _, _ = tiny("hunyuan")
    skip = [u for u in units(graph, "block") if u.type == "Skip"]
    assert len(skip) == 2 and all(graph.nodes[u.output]["op"] == "cat" and u.hops == 1 for u in skip)


# ------------------------------------------------------------------------------------------ full size (meta)
@pytest.mark.parametrize("name,variants", [("dit", 257_688), ("pixart_alpha", 39_576)])
def test_full_size_counts(name, variants):
    graph = family_dag(name)  # full size, meta device
    counts = count_nodes(graph)
    assert (counts["layers"], counts["combine"]) == NODE_COUNTS[name]
    # documented differences to the reference's hand-written graphs (autobuild/dag/counts.py)
    assert counts["nodes"] - REFERENCE_NODE_COUNTS[name] == {"dit": 1, "pixart_alpha": -28}[name]
    found = units(graph, "block")
    assert sum(u.num_variants() for u in found) == variants  # the reference's unit totals (docs/design.md §1)
    assert max(u.hops for u in found) == (4 if name == "dit" else 3)


# ------------------------------------------------------------------------------------------ custom denoisers
class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.gate, self.up = nn.Linear(8, 8), nn.Linear(8, 8)
        self.fuse = nn.Linear(16, 8)  # input is cat([h, x]): quantized as two halves
        self.out = nn.Linear(8, 4)

    def forward(self, x):
        x = self.embed(x)
        h = F.silu(self.gate(x)) * self.up(x)
        y = self.fuse(torch.cat([h, x], dim=-1))
        return self.out(y + x)


def test_registered_custom_denoiser_needs_no_new_code():
    spec = register_family(FamilySpec(name="_dag_test_toy", factory=lambda size: _Toy(),
                                      example_inputs=lambda model, batch: {"x": torch.randn(batch, 3, 4)},
                                      split_rule=lambda model: {"fuse": 8}), overwrite=True)
    graph = build_dag(spec.build("tiny"), spec)
    k = {p: key(p) for p in ("embed", "gate", "up", "fuse", "out")}
    (mul,) = combine_between(graph, k["gate"], k["up"], op="mul")
    assert list(graph.predecessors(k["fuse"])) == [mul]
    assert list(graph.predecessors(key("fuse", 1))) == [k["embed"]]
    (cat,) = combine_between(graph, k["fuse"], key("fuse", 1), op="cat")
    (add,) = combine_between(graph, cat, k["embed"], op="add")
    assert list(graph.successors(add)) == [k["out"]]
    assert graph.number_of_nodes() == 9 and layer_op("fuse") == "Linear"
    assert sorted(n for u in units(graph) for n in u.layers) == sorted(
        n for n, a in graph.nodes(data=True) if a["kind"] == "layer")


# ------------------------------------------------------------------------------------------ io and renders
def test_save_load_roundtrip(tiny, tmp_path):
    graph, _, _ = tiny("dit")
    again = load_dag(save_dag(graph, tmp_path / "dit.dag.json"))
    assert list(again.nodes(data=True)) == list(graph.nodes(data=True))
    assert list(again.edges) == list(graph.edges) and again.graph == graph.graph


def test_render_whole_and_collapsed(tiny, tmp_path):
    graph, _, _ = tiny("dit")
    render_dag(graph, tmp_path / "dit.png", tmp_path / "dit.svg")
    graph, _, _ = tiny("hunyuan")
    render_dag(graph, tmp_path / "hunyuan.png", None, collapse_blocks=True)
    for name in ("dit.png", "dit.svg", "hunyuan.png"):
        assert (tmp_path / name).stat().st_size > 5_000
    assert (tmp_path / "dit.png").read_bytes()[:4] == b"\x89PNG"
