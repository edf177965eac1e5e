"""Denoiser -> DAG by tracing one forward pass.

Every tensor carries a *provenance*: the set of graph nodes it was computed from. Quantizable layers
(forward hooks) start a new provenance, and a :class:`~torch.overrides.TorchFunctionMode` sees every
other torch call:

* ops with one source provenance (activations, norms, reshapes, casts, chunks...) pass it on;
* ``scaled_dot_product_attention`` becomes two ``matmul`` nodes (Q·Kᵀ, then attn·V); ``matmul``,
  ``bmm``, ``baddbmm``, ``einsum`` between two traced operands become one ``matmul`` node;
* ``cat``/``stack`` join provenances without a node, but remember which channels came from where, so
  that the two halves of a split layer (its input is a channel concat) each get their own source;
  the halves' partial products then meet in a ``cat`` node;
* any other op joining different provenances becomes a combine node: ``norm`` (a normalized tensor
  modulated by a broadcast conditioning vector, AdaLN's ``x*(1+scale)+shift``), ``embed`` (sums of
  per-sample vectors, or such a vector broadcast onto features, like a U-Net's time-embedding add),
  ``add`` (residual joins of two full-size tensors), ``mul`` (a product of two full-size tensors).

A layer called again in the same forward on data that depends on its first call (one module used twice:
shared weights) keeps one node, that of its first call; each later call is a ``reuse`` combine node fed by
the layer node and by that call's inputs, so the graph stays acyclic and still says the option acts there.

Afterwards chains of elementwise combine ops are fused into one node where a link feeds its single
consumer directly (``x + gate*attn`` is one gated residual ``add``; ``norm(x)*(1+s)+b`` is one ``norm``).
An op that reads another tensor only for its shape (``reshape_as``, ``expand_as``, ``view_as``, ``type_as``)
passes on its first operand's provenance alone; ``*_like`` / ``new_*`` outputs carry none.
Tensors from the inputs, parameters and buffers have an empty provenance, so text/class conditions
and positional tables never create nodes; layers fed only by them are source nodes.

The result depends only on the module structure and the forward code, so a registered denoiser gets
a graph with no new code. Nothing is hand-wired.

Limits: data flow outside torch calls (numpy, Python scalars taken with ``.item()``) is invisible, and a
quantizable weight used without calling its module (e.g. ``F.linear(x, layer.weight)``) is not seen as
that layer: it shows up as an isolated node with a warning. Hunyuan's attention pooler is such a case;
the family excludes it from quantization, and its output carries no provenance.
"""
from __future__ import annotations

import warnings
from collections import defaultdict
from dataclasses import dataclass, field

import networkx as nx
import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakTensorKeyDictionary

from multiquant.errors import user_forward
from multiquant.families import FamilySpec, get_family
from multiquant.adapters import example_inputs
from multiquant.layers import LayerRef, quantizable_layers

from .ops import (block_lists, block_of, derived_block_of, derived_block_scopes, derived_layer_op, layer_op,
                  scope_of, unet_down_count)

__all__ = ["build_dag", "family_dag", "ELEMENTWISE_COMBINES", "REUSE_OP"]

_SDPA = {"scaled_dot_product_attention"}
_MATMUL = {"matmul", "bmm", "baddbmm", "einsum", "mm", "__matmul__", "__rmatmul__", "linear", "addmm"}
_CAT = {"cat", "concat", "concatenate"}
_STACK = {"stack", "hstack", "vstack", "dstack"}
_NORM = {"layer_norm", "group_norm", "rms_norm", "instance_norm", "batch_norm", "normalize"}
_MUL = {"mul", "mul_", "__mul__", "__rmul__", "__imul__", "div", "div_", "__truediv__", "__itruediv__"}
_SETITEM = {"__setitem__"}
# ops whose other tensor arguments give only a shape / dtype / device: the data flows from the first one alone
_SHAPE_OF = {"reshape_as", "view_as", "expand_as", "type_as"}
# ops whose output carries no data of their tensor arguments at all
_NO_DATA = {"zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like", "randint_like",
            "new_zeros", "new_ones", "new_empty", "new_full", "new_tensor"}

ELEMENTWISE_COMBINES = ("add", "embed", "norm", "mul")  # fusable combine labels
REUSE_OP = "reuse"  # a later call of a layer already called in this forward (shared weights)


@dataclass(frozen=True)
class _Prov:
    """Provenance of one tensor."""

    nodes: frozenset = frozenset()
    # channel origin after a concat: (dim, ((start, stop, nodes), ...)) along that (non-negative) dim
    segments: tuple | None = None
    normalized: bool = False  # produced by a norm op, no layer or join since
    fresh: int | None = None  # id of the combine node whose direct output this tensor is


_EMPTY = _Prov()


@dataclass
class _Node:
    kind: str  # "layer" | "combine"
    op: str
    path: str
    preds: list = field(default_factory=list)  # node ids, insertion order
    ref: LayerRef | None = None
    alive: bool = True
    direct: set = field(default_factory=set)  # preds whose output this node consumed directly

    def add_preds(self, nodes) -> None:
        for n in sorted(nodes):
            if n not in self.preds:
                self.preds.append(n)


class _Recorder:
    """Holds the trace: nodes, tensor provenances and the module stack."""

    def __init__(self, model: nn.Module, refs: list[LayerRef]):
        self.model = model
        self.refs_by_path: dict[str, list[LayerRef]] = defaultdict(list)
        for ref in refs:
            self.refs_by_path[ref.path].append(ref)
        self.refs = refs
        self.by_key = {ref.key: ref for ref in refs}
        self.nodes: list[_Node] = []
        self.layer_ids: dict[str, int] = {}  # canonical key -> node id
        self.prov = WeakTensorKeyDictionary()
        self.stack: list[str] = []
        self.inside_layer = 0
        self.pending: list[list[int]] = []
        self.called: set[int] = set()  # layer nodes whose forward has returned once

    # ------------------------------------------------------------------ nodes and provenance
    def new_node(self, kind: str, op: str, path: str, preds=(), ref: LayerRef | None = None) -> int:
        node = _Node(kind, op, path, ref=ref)
        node.add_preds(preds)
        self.nodes.append(node)
        return len(self.nodes) - 1

    def layer_node(self, ref: LayerRef) -> int:
        key = ref.tied_to or ref.key
        if key not in self.layer_ids:
            canonical = self.by_key.get(key, ref)
            self.layer_ids[key] = self.new_node("layer", "", canonical.path, ref=canonical)
        return self.layer_ids[key]

    def get(self, t) -> _Prov:
        return self.prov.get(t, _EMPTY) if isinstance(t, torch.Tensor) else _EMPTY

    def set(self, t: torch.Tensor, prov: _Prov) -> None:
        self.prov[t] = prov

    @property
    def here(self) -> str:
        return self.stack[-1] if self.stack else ""

    # ------------------------------------------------------------------ module hooks
    def attach(self) -> list:
        handles = []
        for path, module in self.model.named_modules():
            handles.append(module.register_forward_pre_hook(self._push(path)))
            handles.append(module.register_forward_hook(self._pop, always_call=True))
            if path in self.refs_by_path:
                handles.append(module.register_forward_pre_hook(self._layer_in(path), with_kwargs=True))
                handles.append(module.register_forward_hook(self._layer_out, always_call=True))
        return handles

    def _push(self, path):
        def hook(module, args):
            self.stack.append(path)
        return hook

    def _pop(self, module, args, output):
        self.stack.pop()

    def _layer_in(self, path):
        refs = self.refs_by_path[path]

        def hook(module, args, kwargs):
            x = args[0] if args else next(iter(kwargs.values()), None)
            source = self.get(x)
            dim = 1 if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) else (x.ndim - 1 if x is not None else -1)
            ids = []
            for ref in refs:
                node, sources = self.layer_node(ref), _channel_sources(source, dim, ref.cols)
                if node in self.called and sources and not sources <= set(self.nodes[node].preds):
                    # the layer is called again on data that depends on its first call (weight sharing): its
                    # node cannot take these inputs without a cycle, so the call is a `reuse` node fed by the
                    # layer (its weights, i.e. its quantization option) and by this call's inputs
                    node = self.new_node("combine", REUSE_OP, path, {node} | sources)
                else:
                    self.nodes[node].add_preds(sources)
                ids.append(node)
            self.pending.append(ids)
            self.inside_layer += 1
        return hook

    def _layer_out(self, module, args, output):
        self.inside_layer -= 1
        ids = self.pending.pop()
        self.called.update(i for i in ids if self.nodes[i].kind == "layer")
        if len(ids) > 1:  # split layer: the halves' partial products meet here
            out = self.new_node("combine", "cat", self.here, ids)  # the layer's own path is popped already
        else:
            out = ids[0]
        for t in tree_leaves(output):
            if isinstance(t, torch.Tensor):
                self.set(t, _Prov(frozenset([out])))

    # ------------------------------------------------------------------ torch calls
    def on_call(self, func, args, kwargs, out) -> None:
        if self.inside_layer:
            return
        name = getattr(func, "__name__", "")
        if name in _SETITEM:
            target, value = args[0], args[2] if len(args) > 2 else None
            joined = self.get(target).nodes | self.get(value).nodes
            self.set(target, _Prov(joined))
            return
        outs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        if not outs or name in _NO_DATA:
            return
        ins = [t for t in tree_leaves((args[:1] if name in _SHAPE_OF else args, kwargs)) if isinstance(t, torch.Tensor)]
        provs = [self.get(t) for t in ins]
        if name in _SDPA:
            self._attention(args, kwargs, outs)
        elif name in _MATMUL and sum(bool(p.nodes) for p in provs) >= 2:
            node = self.new_node("combine", "matmul", self.here, _union(provs))
            self._set_all(outs, _Prov(frozenset([node])))
        elif name in _CAT:
            self._concat(args, kwargs, outs)
        elif name in _STACK:
            self._set_all(outs, _Prov(_union(provs)))
        else:
            self._elementwise(name, ins, provs, outs)

    def _set_all(self, outs, prov: _Prov) -> None:
        for t in outs:
            self.set(t, prov)

    def _attention(self, args, kwargs, outs) -> None:
        names = ("query", "key", "value")
        q, k, v = (args[i] if len(args) > i else kwargs.get(n) for i, n in enumerate(names))
        pq, pk, pv = self.get(q).nodes, self.get(k).nodes, self.get(v).nodes
        scores = pq | pk
        if pq and pk:  # Q·Kᵀ
            scores = frozenset([self.new_node("combine", "matmul", self.here, pq | pk)])
        result = scores | pv
        if scores and pv:  # softmax(...)·V
            result = frozenset([self.new_node("combine", "matmul", self.here, scores | pv)])
        self._set_all(outs, _Prov(result))

    def _concat(self, args, kwargs, outs) -> None:
        tensors = args[0] if args else kwargs.get("tensors", ())
        dim = args[1] if len(args) > 1 else kwargs.get("dim", kwargs.get("axis", 0))
        out = outs[0]
        dim = dim % out.ndim if out.ndim else 0
        segments, start = [], 0
        for t in tensors:
            p = self.get(t)
            size = t.shape[dim] if t.ndim > dim else 0
            if p.segments is not None and p.segments[0] == dim:
                segments += [(start + a, start + b, nodes) for a, b, nodes in p.segments[1]]
            else:
                segments.append((start, start + size, p.nodes))
            start += size
        nodes = frozenset().union(*(s[2] for s in segments)) if segments else frozenset()
        self.set(out, _Prov(nodes, (dim, tuple(segments))))

    def _elementwise(self, name, ins, provs, outs) -> None:
        traced = [(t, p) for t, p in zip(ins, provs) if p.nodes]
        distinct = {p.nodes for _, p in traced}
        if len(distinct) <= 1:  # one source: pass it on
            src_t, src = traced[0] if traced else (None, _EMPTY)
            normalized = name in _NORM or src.normalized
            for t in outs:
                keep = src.segments is not None and src_t is not None and t.shape == src_t.shape
                self.set(t, _Prov(src.nodes, src.segments if keep else None, normalized))
            return
        out = outs[0]
        broadcast = any(t.numel() < out.numel() for t, _ in traced)
        if broadcast:
            op = "norm" if any(p.normalized for _, p in traced) else "embed"
        elif out.ndim <= 2:
            op = "embed"
        else:
            op = "mul" if name in _MUL else "add"
        node = self.new_node("combine", op, self.here, _union(provs))
        self.nodes[node].direct = {p.fresh for _, p in traced if p.fresh is not None}
        self._set_all(outs, _Prov(frozenset([node]), fresh=node))


def _union(provs) -> frozenset:
    return frozenset().union(*(p.nodes for p in provs)) if provs else frozenset()


def _channel_sources(prov: _Prov, dim: int, cols) -> frozenset:
    """Sources of input channels ``cols`` (a split half) along ``dim``; all sources without a split."""
    if cols is None or prov.segments is None or prov.segments[0] != dim:
        return prov.nodes
    a, b = cols
    return frozenset().union(*(nodes for s, e, nodes in prov.segments[1] if s < b and e > a))


class _TraceMode(TorchFunctionMode):
    def __init__(self, recorder: _Recorder):
        super().__init__()
        self.recorder = recorder

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.recorder.on_call(func, args, kwargs, out)
        return out


# ---------------------------------------------------------------------------------------------------------
# Post-processing
# ---------------------------------------------------------------------------------------------------------
def _fuse_elementwise(nodes: list[_Node]) -> None:
    """Fuse a chain of elementwise combine nodes when a link's output goes straight (no op between) into
    its only consumer: the chain is one operation (e.g. ``x + gate * attn``). A fused chain is ``norm`` if
    any link was, else takes the label of its last link."""
    succ: dict[int, set] = defaultdict(set)
    for i, node in enumerate(nodes):
        for p in node.preds:
            succ[p].add(i)
    for i, node in enumerate(nodes):
        if node.kind != "combine" or node.op not in ELEMENTWISE_COMBINES or len(succ[i]) != 1:
            continue
        j = next(iter(succ[i]))
        target = nodes[j]
        if target.kind != "combine" or target.op not in ELEMENTWISE_COMBINES or i not in target.direct:
            continue
        target.preds = [p for p in target.preds if p != i]
        target.add_preds(node.preds)
        target.direct = (target.direct - {i}) | node.direct
        if node.op == "norm":
            target.op = "norm"
        for p in node.preds:
            succ[p].discard(i)
            succ[p].add(j)
        node.alive = False


def _derived_blocks(rec: _Recorder, model: nn.Module) -> dict[str, int]:
    """Block scope -> index in execution order, for a model without naming rules (plain module family)."""
    scopes = derived_block_scopes(model)
    index: dict[str, int] = {}
    for node in rec.nodes:
        if node.kind == "layer" and node.alive:
            scope = derived_block_of(node.ref.path, scopes)
            if scope is not None and scope not in index:
                index[scope] = len(index)
    return {"__scopes__": scopes, **index}


def _to_graph(rec: _Recorder, family: str, model: nn.Module, derive: bool = False) -> nx.DiGraph:
    """``derive``: the family gives no naming rules: blocks and op labels come from the module tree."""
    _fuse_elementwise(rec.nodes)
    lists = block_lists(model)
    n_down = unet_down_count(model)
    derived = _derived_blocks(rec, model) if derive else None

    def block_and_op(path: str, layer: bool) -> tuple[int, str | None]:
        if derived is None:
            return block_of(path, lists, n_down), None
        scope = derived_block_of(path, derived["__scopes__"]) if path else None
        block = derived.get(scope, -1) if scope is not None else -1
        if not layer:
            return block, None
        op = layer_op(path, model.get_submodule(path))
        if op in ("Linear", "Conv") or (block >= 0 and op in ("t-Embed", "c-Embed")):
            op = derived_layer_op(path, model, in_block=block >= 0)
        return block, op
    aliases: dict[str, list[str]] = defaultdict(list)
    for ref in rec.refs:
        if ref.tied_to:
            aliases[ref.tied_to].append(ref.key)
    for ref in rec.refs:  # layers the forward never called: isolated nodes, so every key is present
        if (ref.tied_to or ref.key) not in rec.layer_ids:
            warnings.warn(f"layer {ref.path} was not called in the traced forward; it is an isolated node")
            rec.layer_node(ref)

    paths = {ref.key: ref.path for ref in rec.refs}
    graph = nx.DiGraph(family=family, model_class=type(model).__name__)
    if derive:
        graph.graph["derived_labels"] = True  # blocks and ops from the module tree (autobuild.dag.ops)
    names: dict[int, str] = {}
    counters: dict[tuple, int] = defaultdict(int)
    for i, node in enumerate(rec.nodes):
        if not node.alive:
            continue
        if node.kind == "layer":
            ref = node.ref
            name = ref.key
            alias = sorted(aliases.get(ref.key, []))
            (block, op), scope = block_and_op(ref.path, True), scope_of(ref.path, lists)
            if any(scope_of(paths[a], lists) != scope for a in alias):  # shared by several blocks
                scope, block = ref.path.rpartition(".")[0], -1
            half = -1 if ref.cols is None else int(ref.key.endswith("_0"))
            attrs = dict(kind="layer", op=op or layer_op(ref.path, rec.model.get_submodule(ref.path)), block=block,
                         path=ref.path, key=ref.key, aliases=alias, scope=scope, half=half)
        else:
            k = counters[(node.path, node.op)]
            counters[(node.path, node.op)] += 1
            name = f"{node.path or 'model'}:{node.op}{k}"
            attrs = dict(kind="combine", op=node.op, block=block_and_op(node.path, False)[0], path=node.path,
                         scope=scope_of(node.path, lists), aliases=[])
        names[i] = name
        graph.add_node(name, **attrs)
    for i, node in enumerate(rec.nodes):
        if node.alive:
            for p in node.preds:
                graph.add_edge(names[p], names[i])
    return graph


# ---------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------
def build_dag(model: nn.Module, family: FamilySpec | str, batch: int = 1, inputs: dict | None = None) -> nx.DiGraph:
    """The data-flow DAG of ``model``: quantizable layers and the combine ops between them.

    Nodes are in execution order (a topological order). Layer nodes are named by quantizer key (split
    halves are two nodes; a tied copy is folded into its canonical layer, listed in ``aliases``); combine
    nodes are named ``<module path>:<op><n>``. Node attributes: ``kind`` ("layer"/"combine"), ``op``,
    ``block`` (-1 = global), ``path``, ``scope`` (innermost repeated block, for units), ``key`` (layers),
    ``aliases`` (tied keys folded into the node), ``half`` (layers: 0/1 for the halves of a split layer,
    -1 otherwise). Graph attributes: ``family``, ``model_class``.

    Runs one forward pass: tiny models on the CPU, full-size ones on the meta device (seconds).
    ``inputs`` overrides the family's example inputs."""
    spec = get_family(family) if isinstance(family, str) else family
    refs = quantizable_layers(model, spec)
    kwargs = inputs if inputs is not None else example_inputs(spec, model, batch)
    rec = _Recorder(model, refs)
    handles = rec.attach()
    try:
        with torch.no_grad(), _TraceMode(rec), user_forward(spec, model):
            model(**kwargs)
    finally:
        for h in handles:
            h.remove()
    return _to_graph(rec, spec.name, model, derive=spec.is_module)


def family_dag(family: FamilySpec | str, size: str = "full", device: str = "meta", batch: int = 1) -> nx.DiGraph:
    """Build the family's denoiser (``"full"`` on the meta device by default) and trace its DAG."""
    spec = get_family(family) if isinstance(family, str) else family
    model = spec.build(size, device=device)
    return build_dag(model, spec, batch)
