"""Scored configurations -> PyG graphs over the denoiser DAG.

The DAG (``autobuild.dag.build_dag``) is fixed per denoiser; only the per-node quantization features
change from one configuration to the next. :class:`GraphTemplate` therefore encodes the static parts
once (node order, directed data-flow ``edge_index``, op and block codes, hop read-out masks) and turns
a configuration into two small per-node tensors:

``x_cat`` (long, [N, 4]) - categorical codes, fed to ``nn.Embedding``s by the model:
    0 quant code: combine 0, mse (UAQ) 1, kmeans (K-Means-C) 2, kmeans_all (K-Means-A) 3, fp16 4
    1 bit code:   combine / 16-bit 0, 4-bit 1, 3-bit 2, then 2, 5, 6, 7, 8 bits -> 3..7
    2 op code:    1 + index of the node's ``op`` in the sorted op vocabulary (0 = unknown op)
    3 block code: block index + 1 (global layers, block -1 -> 0)
``x_num`` (float, [N, 2 + k]) - numeric features (combine nodes 0):
    0 compression ratio fp_bytes / quant_bytes (the reference's 100*fp/quant, divided by 100)
    1 log1p(100 * error): the reference's 100*error, log-scaled because per-layer errors span orders
      of magnitude across layers and methods (K-Means-A errors carry an extra in/out factor).
    2.. with a template's ``shift_coords`` (k > 0): the layer's measured output change under its chosen option,
      projected on the k leading components of the output-change signature (autobuild/output_shift.py); FP
      layers and options the table lacks 0. Summed over a configuration's layers they are the signed change of
      the denoiser's output that several layers add and cancel (the interaction of mnist_unet).

Tied layers (``aliases`` of a node) are one node: it takes the canonical key's entry. Input records
are never modified.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Mapping, Sequence

import networkx as nx
import numpy as np
import torch

from multiquant.errors import UserError
from multiquant.options import FP_BITS, FP_OPTION, Option

if TYPE_CHECKING:  # torch_geometric is imported where a Data is built (it costs seconds at every CLI start)
    from .pyg import Data

__all__ = ["QUANT_CODES", "BIT_CODES", "NUM_QUANT_CODES", "NUM_BIT_CODES", "option_codes", "GraphTemplate",
           "ConfigDataset", "record_to_data", "cache_to_dataset", "option_name", "config_of", "Column", "as_column",
           "column_to_json", "option_columns", "pair_columns", "encode_options", "sequential_graph"]

# The codes are part of a trained predictor: a new method or width gets the next free code, none is renumbered.
QUANT_CODES = {"combine": 0, "mse": 1, "kmeans": 2, "kmeans_all": 3, FP_OPTION: 4}
BIT_CODES = {FP_BITS: 0, 4: 1, 3: 2, 2: 3, 5: 4, 6: 5, 7: 6, 8: 7}
NUM_QUANT_CODES = len(QUANT_CODES)
NUM_BIT_CODES = len(BIT_CODES)


def option_codes(option) -> tuple[int, int]:
    """``"kmeans_all-3"`` -> (quant code, bit code). ``"fp16"`` (unquantized) -> (4, 0). Lenient
    (:meth:`multiquant.options.Option.parse`): hand-written predictor inputs may spell FP differently."""
    parsed = Option.parse(option, lenient=True)
    if parsed.is_fp:
        return QUANT_CODES[FP_OPTION], BIT_CODES[FP_BITS]
    return QUANT_CODES[parsed.method], BIT_CODES[parsed.bits]


def numeric_features(entry: Sequence) -> tuple[float, float]:
    """(fp/quant compression ratio, log1p(100*error)) of one ``[option, fp_bytes, quant_bytes, error]``."""
    fp_bytes, quant_bytes, error = float(entry[1]), float(entry[2]), float(entry[3])
    ratio = fp_bytes / quant_bytes if quant_bytes > 0 else 1.0
    error = error if math.isfinite(error) and error > 0 else 0.0
    return ratio, math.log1p(100.0 * error)


class LayerMismatchError(UserError, KeyError):
    """A configuration lacks a layer of the DAG: records and DAG are of different models (a KeyError too)."""

    def __str__(self) -> str:  # KeyError's str() would quote the message
        return str(self.args[0])


@dataclass
class GraphTemplate:
    """Static, per-denoiser part of every configuration graph."""

    nodes: list  # networkx node ids, in graph order
    kinds: list[str]  # "layer" | "combine"
    keys: list[str | None]  # canonical quantizer key of layer nodes
    aliases: list[list[str]]  # tied keys sharing each layer node's choice
    ops: list[str]
    blocks: list[int]
    edge_index: torch.Tensor  # [2, E] long, directed along data flow
    op_vocab: list[str]  # sorted; op code = 1 + index
    hop_mask: torch.Tensor  # [N, num_hops + 1] bool: read-out nodes per hop level
    family: str | None = None
    # "key=option" -> k output-change coordinates (autobuild.output_shift.ShiftBasis.coords): x_num[:, 2:]
    shift_coords: dict[str, list[float]] | None = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_graph(cls, graph: nx.DiGraph, units: Iterable | None = None, num_hops: int = 4,
                   op_vocab: Sequence[str] | None = None,
                   shift_coords: Mapping[str, Sequence[float]] | None = None) -> "GraphTemplate":
        """``units``: objects with ``.output`` (node id) and ``.hops``; unit outputs with ``hops == k``
        form the read-out set of hop k (as the reference's S_k). Hop 0 always also reads every layer
        node; a hop no unit has reads the outputs of the deeper units (or of every unit when none is
        deeper); only without units does a hop read all nodes (global mean). ``shift_coords``: per-node
        output-change features (module docstring)."""
        nodes = list(graph.nodes)
        index = {n: i for i, n in enumerate(nodes)}
        attrs = [graph.nodes[n] for n in nodes]
        kinds = [a.get("kind", "layer") for a in attrs]
        for n, a, kind in zip(nodes, attrs, kinds):
            if kind not in ("layer", "combine"):
                raise ValueError(f"node {n!r} has kind {kind!r}; expected 'layer' or 'combine'")
            if kind == "layer" and not a.get("key"):
                raise ValueError(f"layer node {n!r} has no quantizer 'key'")
        ops = [str(a.get("op", a.get("kind", "layer"))) for a in attrs]
        blocks = [int(a.get("block", -1)) for a in attrs]
        vocab = sorted(set(ops)) if op_vocab is None else list(op_vocab)
        edges = [(index[u], index[v]) for u, v in graph.edges]
        edge_index = (torch.tensor(edges, dtype=torch.long).t().contiguous() if edges
                      else torch.zeros(2, 0, dtype=torch.long))
        hop_mask = torch.zeros(len(nodes), num_hops + 1, dtype=torch.bool)
        hop_mask[:, 0] = torch.tensor([k == "layer" for k in kinds])
        units = list(units or ())
        for unit in units:
            if 0 <= int(unit.hops) <= num_hops:
                hop_mask[index[unit.output], int(unit.hops)] = True
        outputs = torch.zeros(len(nodes), dtype=torch.bool)
        for unit in units:
            outputs[index[unit.output]] = True
        for hop in range(1, num_hops + 1):  # a depth no unit has reads the unit structure, not a global mean:
            if not hop_mask[:, hop].any() and units:  # the outputs of the deeper units (they see k hops), else all
                deeper = torch.zeros(len(nodes), dtype=torch.bool)
                for unit in units:
                    if int(unit.hops) > hop:
                        deeper[index[unit.output]] = True
                hop_mask[:, hop] = deeper if deeper.any() else outputs
        empty = ~hop_mask.any(dim=0)  # no units at all: global means
        hop_mask[:, empty] = True
        return cls(nodes=nodes, kinds=kinds, keys=[a.get("key") if k == "layer" else None for a, k in zip(attrs, kinds)],
                   aliases=[list(a.get("aliases", []) or []) for a in attrs], ops=ops, blocks=blocks,
                   edge_index=edge_index, op_vocab=vocab, hop_mask=hop_mask, family=graph.graph.get("family"),
                   shift_coords=_shift_coords(shift_coords))

    # ------------------------------------------------------------------ static codes
    @property
    def num_nodes(self) -> int:
        return len(self.nodes)

    @property
    def num_hops(self) -> int:
        return self.hop_mask.shape[1] - 1

    @property
    def num_ops(self) -> int:
        return len(self.op_vocab) + 1

    @property
    def num_blocks(self) -> int:
        return max(self.blocks, default=-1) + 2

    @property
    def shift_dim(self) -> int:
        """k, the number of output-change coordinates per node (0 without ``shift_coords``)."""
        return len(next(iter(self.shift_coords.values()))) if self.shift_coords else 0

    @property
    def num_numeric(self) -> int:
        return 2 + self.shift_dim

    @property
    def layer_index(self) -> list[int]:
        return [i for i, k in enumerate(self.kinds) if k == "layer"]

    def static_codes(self) -> torch.Tensor:
        """[N, 2] long: op code, block code."""
        code = {op: i + 1 for i, op in enumerate(self.op_vocab)}
        return torch.tensor([[code.get(op, 0), b + 1] for op, b in zip(self.ops, self.blocks)], dtype=torch.long)

    # ------------------------------------------------------------------ per-config features
    def entry(self, config: Mapping, i: int, missing: str = "error"):
        """The config entry of layer node ``i`` (canonical key first, then its aliases)."""
        for key in (self.keys[i], *self.aliases[i]):
            if key in config:
                return config[key]
        if missing == "fp16":
            return ("fp16", 1.0, 1.0, 0.0)
        raise LayerMismatchError(
            f"a configuration has no entry for layer {self.keys[i]!r} (node {self.nodes[i]!r}): the records are of "
            f"another model than the DAG's ({self.family or 'unnamed'}; check --model/--family and --tiny/--size); if layers "
            f"were left out on purpose, train-predictor --missing fp16 treats them as unquantized")

    def numeric_of(self, i: int, entry: Sequence) -> list[float]:
        """The ``x_num`` row ([2 + k]) of layer node ``i`` under ``entry`` (``[option, fp_bytes, quant_bytes,
        error]``): :func:`numeric_features`, then the output-change coordinates of the canonical key's option
        (a tied layer's change is measured with its followers, autobuild.output_shift.output_shifts)."""
        row = list(numeric_features(entry))
        if self.shift_coords:
            row += self.shift_coords.get(f"{self.keys[i]}={option_name(entry)}", [0.0] * self.shift_dim)
        return row

    def encode(self, config: Mapping, missing: str = "error") -> tuple[torch.Tensor, torch.Tensor]:
        """Per-config features: (quant/bit codes [N, 2] long, numeric [N, 2 + k] float)."""
        n = self.num_nodes
        codes = np.zeros((n, 2), dtype=np.int64)
        numeric = np.zeros((n, self.num_numeric), dtype=np.float32)
        for i in self.layer_index:
            entry = self.entry(config, i, missing)
            codes[i] = option_codes(entry[0])
            numeric[i] = self.numeric_of(i, entry)
        return torch.from_numpy(codes), torch.from_numpy(numeric)

    def to_data(self, config: Mapping, y: float | None = None, missing: str = "error") -> Data:
        from .pyg import Data

        codes, numeric = self.encode(config, missing)
        data = Data(x_cat=torch.cat([codes, self.static_codes()], dim=1), x_num=numeric,
                    edge_index=self.edge_index.clone(), hop_mask=self.hop_mask.clone(), num_nodes=self.num_nodes)
        if y is not None:
            data.y = torch.tensor([float(y)], dtype=torch.float32)
        return data

    # ------------------------------------------------------------------ (de)serialisation, JSON-safe
    def to_json(self) -> dict:
        return {"nodes": [str(n) for n in self.nodes], "kinds": self.kinds, "keys": self.keys,
                "aliases": self.aliases, "ops": self.ops, "blocks": self.blocks,
                "edge_index": self.edge_index.tolist(), "op_vocab": self.op_vocab,
                "hop_mask": self.hop_mask.to(torch.int8).tolist(), "family": self.family,
                "shift_coords": self.shift_coords}

    @classmethod
    def from_json(cls, obj: Mapping) -> "GraphTemplate":
        edge_index = torch.tensor(obj["edge_index"], dtype=torch.long).reshape(2, -1)
        return cls(nodes=list(obj["nodes"]), kinds=list(obj["kinds"]), keys=list(obj["keys"]),
                   aliases=[list(a) for a in obj["aliases"]], ops=list(obj["ops"]), blocks=[int(b) for b in obj["blocks"]],
                   edge_index=edge_index, op_vocab=list(obj["op_vocab"]),
                   hop_mask=torch.tensor(obj["hop_mask"], dtype=torch.bool), family=obj.get("family"),
                   shift_coords=_shift_coords(obj.get("shift_coords")))


def _shift_coords(coords: Mapping[str, Sequence[float]] | None) -> dict[str, list[float]] | None:
    """JSON-ready copy of per-option output-change coordinates, all of one width (None: no such features)."""
    if not coords:
        return None
    out = {str(name): [float(v) for v in c] for name, c in coords.items()}
    if len({len(c) for c in out.values()}) != 1 or not next(iter(out.values())):
        raise ValueError("shift_coords entries must all have the same, non-zero length")
    return out


class ConfigDataset:
    """All configurations of one denoiser as stacked feature tensors over a shared template.

    ``dataset[i]`` is a PyG ``Data``; :meth:`collate` builds a batch of many configs directly from the
    stacked tensors (no per-graph Python work), which is what keeps CV training fast on CPU."""

    def __init__(self, template: GraphTemplate, codes: torch.Tensor, numeric: torch.Tensor, y: torch.Tensor | None):
        self.template = template
        self.codes = codes  # [M, N, 2] long
        self.numeric = numeric  # [M, N, 2 + k] float
        self.y = y  # [M] float or None
        self._static = template.static_codes()
        self._edge_cache: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return self.codes.shape[0]

    def __getitem__(self, i: int) -> Data:
        from .pyg import Data

        data = Data(x_cat=torch.cat([self.codes[i], self._static], dim=1), x_num=self.numeric[i],
                    edge_index=self.template.edge_index, hop_mask=self.template.hop_mask,
                    num_nodes=self.template.num_nodes)
        if self.y is not None:
            data.y = self.y[i:i + 1]
        return data

    def subset(self, index: Sequence[int] | torch.Tensor) -> "ConfigDataset":
        index = torch.as_tensor(index, dtype=torch.long)
        return ConfigDataset(self.template, self.codes[index], self.numeric[index],
                             None if self.y is None else self.y[index])

    def _batched_edges(self, num_graphs: int) -> torch.Tensor:
        if num_graphs not in self._edge_cache:
            n, e = self.template.num_nodes, self.template.edge_index
            offsets = torch.arange(num_graphs, dtype=torch.long).repeat_interleave(e.shape[1]) * n
            if len(self._edge_cache) >= 8:  # batch sizes seen in training: full, last partial, validation
                self._edge_cache.clear()
            self._edge_cache[num_graphs] = e.repeat(1, num_graphs) + offsets
        return self._edge_cache[num_graphs]

    def collate(self, index: Sequence[int] | torch.Tensor | None = None) -> Data:
        """One disjoint-union batch (PyG layout: ``batch``, ``ptr``, ``num_graphs``) of the given configs."""
        from .pyg import Data

        index = torch.arange(len(self)) if index is None else torch.as_tensor(index, dtype=torch.long)
        b, n = len(index), self.template.num_nodes
        x_cat = torch.cat([self.codes[index], self._static.expand(b, n, 2)], dim=2).reshape(b * n, 4)
        batch = Data(x_cat=x_cat, x_num=self.numeric[index].reshape(b * n, -1), edge_index=self._batched_edges(b),
                     hop_mask=self.template.hop_mask.repeat(b, 1), batch=torch.arange(b).repeat_interleave(n),
                     ptr=torch.arange(b + 1) * n, num_nodes=b * n)
        batch.num_graphs = b
        if self.y is not None:
            batch.y = self.y[index]
        return batch


def record_to_data(record: Mapping, graph: nx.DiGraph | GraphTemplate, target=None, units: Iterable | None = None,
                   missing: str = "error") -> Data:
    """One scored configuration -> ``Data(x_cat, x_num, edge_index, hop_mask[, y])``.

    ``target``: a callable on the record (see :func:`autobuild.target.parse_target`) giving ``y``."""
    template = graph if isinstance(graph, GraphTemplate) else GraphTemplate.from_graph(graph, units)
    return template.to_data(record["config"], None if target is None else target(record), missing)


def cache_to_dataset(records: Sequence[Mapping], graph: nx.DiGraph | GraphTemplate, target=None,
                     units: Iterable | None = None, missing: str = "error") -> ConfigDataset:
    """All records -> a :class:`ConfigDataset` (static graph parts encoded once)."""
    template = graph if isinstance(graph, GraphTemplate) else GraphTemplate.from_graph(graph, units)
    codes, numeric = [], []
    for record in records:
        c, x = template.encode(record["config"], missing)
        codes.append(c)
        numeric.append(x)
    n = template.num_nodes
    codes_t = torch.stack(codes) if codes else torch.zeros(0, n, 2, dtype=torch.long)
    numeric_t = torch.stack(numeric) if numeric else torch.zeros(0, n, template.num_numeric)
    y = None if target is None else torch.tensor([target(r) for r in records], dtype=torch.float32)
    return ConfigDataset(template, codes_t, numeric_t, y)


def option_name(entry) -> str:
    """The option of a configuration entry: ``[option, fp_bytes, quant_bytes, error]`` or a plain option string."""
    return str(entry[0]) if isinstance(entry, (list, tuple)) else str(entry)


def config_of(item: Mapping) -> Mapping:
    """A record's ``config`` or a plain ``{key: option}`` configuration."""
    return item["config"] if isinstance(item.get("config"), Mapping) else item


Term = tuple[str, str]  # (layer key, option)
Column = tuple[Term, ...]  # the product of one term (a one-hot option) or of two (a pair of layers' options)


def as_column(column) -> Column:
    """``("key", "option")`` or ``"key=option"`` (one term), or a sequence of such terms -> a :data:`Column`."""
    if isinstance(column, str):
        key, _, option = column.rpartition("=")
        return ((key, option),)
    if len(column) == 2 and all(isinstance(c, str) for c in column):
        return ((str(column[0]), str(column[1])),)
    return tuple(term for part in column for term in as_column(part))


def column_to_json(column) -> str | list:
    """A single term as ``"key=option"`` (the form saved predictors use), a product as ``[[key, option], ...]``."""
    column = as_column(column)
    return f"{column[0][0]}={column[0][1]}" if len(column) == 1 else [list(term) for term in column]


def option_columns(items: Sequence[Mapping], keys: Sequence[str] | None = None) -> list[Column]:
    """One-term columns of every (layer, option) the items use, layer-major over ``keys`` (default: every
    key, sorted), options in order of first use."""
    if keys is None:
        keys = sorted({k for item in items for k in config_of(item)})
    seen: dict[Column, None] = {}
    for key in keys:
        for item in items:
            entry = config_of(item).get(key)
            if entry is not None:
                seen.setdefault(((key, option_name(entry)),), None)
    return list(seen)


def pair_columns(items: Sequence[Mapping], keys: Sequence[str]) -> list[Column]:
    """Two-term columns for every pair of the given layers and every option combination the items use."""
    seen: dict[Column, None] = {}
    for i, a in enumerate(keys):
        for b in keys[i + 1:]:
            for item in items:
                config = config_of(item)
                if a in config and b in config:
                    seen.setdefault(((a, option_name(config[a])), (b, option_name(config[b]))), None)
    return list(seen)


def encode_options(items: Sequence[Mapping], columns: Sequence, strict: bool = False) -> np.ndarray:
    """The one encoder of configurations for linear models: ``[len(items), len(columns)]`` rows of records or
    plain configurations, 1 where every term of the column is the item's choice (see :data:`Column`).

    ``strict``: an item without an entry for a column's layer, or with an option that has no one-term column
    of its layer, is an error (a search space's columns cover all its options); otherwise such choices just
    light no column (e.g. a saved model's columns on new configurations)."""
    columns = [as_column(c) for c in columns]
    x = np.zeros((len(items), len(columns)), dtype=np.float64)
    singles = {c[0]: j for j, c in enumerate(columns) if len(c) == 1}
    products = [(j, c) for j, c in enumerate(columns) if len(c) > 1]
    layers = list(dict.fromkeys(term[0] for c in columns for term in c))
    for i, item in enumerate(items):
        config = config_of(item)
        chosen = {}
        for key in layers:
            if key in config:
                chosen[key] = option_name(config[key])
            elif strict:
                raise ValueError(f"configuration {i} has no entry for layer {key!r}: it belongs to another model")
        for key, option in chosen.items():
            j = singles.get((key, option))
            if j is not None:
                x[i, j] = 1.0
            elif strict:
                raise ValueError(f"configuration {i}: layer {key!r} uses {option!r}, which is not an option of the "
                                 f"table (the search space is the table's options)")
        for j, column in products:
            x[i, j] = float(all(chosen.get(key) == option for key, option in column))
    return x


# --------------------------------------------------------------------------------------------------------
# Structural fallback (tests, or families autobuild.dag does not cover yet)
# --------------------------------------------------------------------------------------------------------
_BLOCK = re.compile(r"(?:^|\.)(?:transformer_blocks|blocks|single_transformer_blocks)\.(\d+)\.")


def sequential_graph(model, family) -> nx.DiGraph:
    """A crude DAG following the ``build_dag`` contract: layer nodes chained in module order, each block
    closed by an ``add`` combine node. It ignores the real topology; use ``autobuild.dag.build_dag``."""
    from multiquant.layers import quantizable_layers

    graph = nx.DiGraph(family=getattr(family, "name", str(family)))
    canonical = {}
    for ref in quantizable_layers(model, family):
        if ref.tied_to:
            canonical.setdefault(ref.tied_to, []).append(ref.key)
    previous, current_block = None, None
    for ref in quantizable_layers(model, family):
        if ref.tied_to:
            continue
        m = _BLOCK.search("." + ref.path + ".")
        block = int(m.group(1)) if m else -1
        if current_block is not None and block != current_block and current_block >= 0:
            add = f"add_{current_block}"
            graph.add_node(add, kind="combine", op="add", block=current_block)
            graph.add_edge(previous, add)
            previous = add
        parts = ref.path.split(".")
        graph.add_node(ref.key, kind="layer", key=ref.key, op=".".join(parts[-2:]) + ("_0" if ref.key.endswith("_0") else ""),
                       block=block, aliases=canonical.get(ref.key, []))
        if previous is not None:
            graph.add_edge(previous, ref.key)
        previous, current_block = ref.key, block
    return graph
