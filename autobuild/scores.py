"""Unit scores (docs/design.md §5, batched): every option assignment of every unit, scored by the fold ensemble.

A *unit* is a subgraph of the denoiser DAG (``autobuild.dag.units``): at node level one layer, at block level
a small group of layers (at most 6, so at most 6^6 = 46,656 variants). A *variant* assigns one option
(e.g. ``"kmeans-3"``) to each of the unit's layers; its score is the unit score (docs/design.md §5): per fold, the L1 norm of
the unit output's hop-``hops`` embedding, z-scored by that fold's training moments and weighted by the
fold's test SRCC of that hop, summed over folds (``Ensemble.score_nodes``). Higher = better (the target's
orientation).

Speed: all variants of a unit share one structure, so their features are one ``[M, N, 2]`` tensor built by
table lookups and thousands of variants go through one forward (``ConfigDataset.collate``); the output
node of variant ``i`` is node ``i * N + out``. At node level the hop-0 embedding depends on the node's own
features only, so every layer's six options are six graphs of isolated layer nodes: one forward for all.

Storage (no pickle): ``<stem>.safetensors`` holds per unit ``u<i>.variants`` (uint8 ``[M, L]`` option
indices into ``options``, enumeration order: first layer slowest) and ``u<i>.scores`` (float32 ``[M]``);
``<stem>.json`` holds the options, the units (name, type, block, hops, output node, layer keys, ops, tied
aliases), what was scored with what (ensemble and option-table digests) and the timings.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import networkx as nx
import numpy as np
import torch

from multiquant.errors import InputError, MissingFileError
from multiquant.options import OptionTable

__all__ = ["UnitScores", "UnitScoreSet", "enumerate_variants", "score_units", "unit_scores_for",
           "scores_path", "check_graph_matches", "SCORES_FORMAT"]

SCORES_FORMAT = "qua2sedimo-unit-scores"
MAX_VARIANTS = 2_000_000  # per unit; 6 options x 6 layers = 46,656


# ------------------------------------------------------------------------------------------ containers
@dataclass
class UnitScores:
    """All scored variants of one unit."""

    name: str
    type: str
    block: int
    hops: int
    output: str
    keys: list[str]  # canonical quantizer key of each layer = variant matrix column
    ops: list[str]
    aliases: list[list[str]]  # tied copies that follow each layer
    variants: np.ndarray  # uint8 [M, L]: option index per layer
    scores: np.ndarray  # float32 [M]

    def ranked(self) -> np.ndarray:
        """Variant rows, best first (stable on ties)."""
        return np.argsort(-self.scores, kind="stable")

    def assignment(self, row: int, options: Sequence[str]) -> dict[str, str]:
        return {key: options[int(i)] for key, i in zip(self.keys, self.variants[row])}

    def meta(self) -> dict:
        return {"name": self.name, "type": self.type, "block": self.block, "hops": self.hops, "output": self.output,
                "keys": self.keys, "ops": self.ops, "aliases": self.aliases, "num_variants": int(len(self.scores))}


@dataclass
class UnitScoreSet:
    """Scores of every unit of one level (``"node"`` or ``"block"``) of one denoiser."""

    level: str
    options: list[str]
    units: list[UnitScores]
    meta: dict = field(default_factory=dict)

    @property
    def num_variants(self) -> int:
        return int(sum(len(u.scores) for u in self.units))

    def layer_scores(self) -> dict[str, np.ndarray]:
        """Node level: ``{key: [score of each option]}`` (option order of ``options``)."""
        if self.level != "node":
            raise ValueError("layer_scores needs node-level scores (level='node')")
        out = {}
        for unit in self.units:
            scores = np.full(len(self.options), np.nan, dtype=np.float64)
            scores[unit.variants[:, 0].astype(int)] = unit.scores
            out[unit.keys[0]] = scores
        return out

    def save(self, stem: str | os.PathLike) -> Path:
        """Write ``<stem>.safetensors`` (arrays) and ``<stem>.json`` (everything else), atomically."""
        from safetensors.numpy import save_file

        from multiquant.utils import atomic_path

        stem = Path(stem)
        stem.parent.mkdir(parents=True, exist_ok=True)
        arrays = {}
        for i, unit in enumerate(self.units):
            arrays[f"u{i}.variants"] = np.ascontiguousarray(unit.variants, dtype=np.uint8)
            arrays[f"u{i}.scores"] = np.ascontiguousarray(unit.scores, dtype=np.float32)
        tensors = stem.with_name(stem.name + ".safetensors")
        with atomic_path(tensors) as tmp:
            save_file(arrays, str(tmp), metadata={"format": SCORES_FORMAT})
        doc = {"format": SCORES_FORMAT, "version": 1, "level": self.level, "options": self.options,
               "units": [u.meta() for u in self.units], "meta": self.meta}
        with atomic_path(stem.with_name(stem.name + ".json")) as tmp:
            tmp.write_text(json.dumps(doc, indent=1, default=_json_default))
        return tensors

    @classmethod
    def load(cls, stem: str | os.PathLike) -> "UnitScoreSet":
        from safetensors.numpy import load_file

        stem = Path(str(stem).removesuffix(".json").removesuffix(".safetensors"))
        doc_path, arrays_path = stem.with_name(stem.name + ".json"), stem.with_name(stem.name + ".safetensors")
        if not doc_path.exists() or not arrays_path.exists():
            raise MissingFileError(f"unit scores {stem}.json/.safetensors not found: compute them with "
                                    f"autobuild.scores.unit_scores_for(predictor_dir, ...)")
        doc = json.loads(doc_path.read_text())
        if doc.get("format") != SCORES_FORMAT:
            raise InputError(f"{doc_path} is not a unit-score file (format {doc.get('format')!r})")
        arrays = load_file(str(arrays_path))
        units = [UnitScores(name=m["name"], type=m["type"], block=int(m["block"]), hops=int(m["hops"]),
                            output=m["output"], keys=list(m["keys"]), ops=list(m["ops"]),
                            aliases=[list(a) for a in m["aliases"]], variants=arrays[f"u{i}.variants"],
                            scores=arrays[f"u{i}.scores"]) for i, m in enumerate(doc["units"])]
        return cls(level=doc["level"], options=list(doc["options"]), units=units, meta=dict(doc.get("meta", {})))


from multiquant.utils import json_default as _json_default  # noqa: E402  (the one encoder)


# ------------------------------------------------------------------------------------------ features
def enumerate_variants(num_layers: int, num_options: int) -> np.ndarray:
    """Every assignment of ``num_options`` options to ``num_layers`` layers: uint8 ``[K^L, L]``, in
    ``itertools.product`` order (first layer slowest)."""
    if num_options > 255:
        raise ValueError("at most 255 options per layer (uint8 indices)")
    total = num_options ** num_layers
    if total > MAX_VARIANTS:
        raise ValueError(f"a unit of {num_layers} layers has {total:,} variants (> {MAX_VARIANTS:,}): "
                         f"use smaller units (units(graph, 'block', max_layers=...)) or node level")
    grids = np.meshgrid(*[np.arange(num_options, dtype=np.uint8)] * num_layers, indexing="ij")
    return np.stack([g.reshape(-1) for g in grids], axis=1) if num_layers else np.zeros((1, 0), np.uint8)


def _option_lookups(table: OptionTable, template, node: int, options: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per option of layer node ``node`` of ``template``: (quant/bit codes [K, 2] long, numeric features
    [K, 2 + k] float) -- the same encoding training used (``autobuild.data.GraphTemplate.numeric_of``)."""
    from .data import option_codes

    key = template.keys[node]
    if key not in table.table:
        raise InputError(f"layer {key!r} of the graph is not in the option table: the table belongs to another "
                       f"model (or the predictor to another family)")
    entries = [table.table[key][o] for o in options]
    codes = torch.tensor([option_codes(e[0]) for e in entries], dtype=torch.long)
    numeric = torch.tensor([template.numeric_of(node, e) for e in entries], dtype=torch.float32)
    return codes, numeric


def _variant_features(template, table: OptionTable, options, variants: np.ndarray):
    """Features of every variant of a unit over its template: codes [M, N, 2], numeric [M, N, 2 + k]."""
    m, n = len(variants), template.num_nodes
    codes = torch.zeros(m, n, 2, dtype=torch.long)
    numeric = torch.zeros(m, n, template.num_numeric, dtype=torch.float32)
    pick = torch.from_numpy(variants.astype(np.int64))
    for column, node in enumerate(template.layer_index):
        lut_codes, lut_numeric = _option_lookups(table, template, node, options)
        codes[:, node] = lut_codes[pick[:, column]]
        numeric[:, node] = lut_numeric[pick[:, column]]
    return codes, numeric


# ------------------------------------------------------------------------------------------ scoring
def _score_variants(ensemble, template, table, options, variants, out_pos: int, hops: int, batch_variants: int,
                    on_batch: Callable[[int], None] = lambda n: None):
    from .data import ConfigDataset

    codes, numeric = _variant_features(template, table, options, variants)
    dataset = ConfigDataset(template, codes, numeric, None)
    n = template.num_nodes
    scores = []
    for start in range(0, len(variants), batch_variants):
        index = torch.arange(start, min(start + batch_variants, len(variants)))
        batch = dataset.collate(index)
        outputs = torch.arange(len(index)) * n + out_pos
        scores.append(ensemble.score_nodes(batch, outputs, hops))
        on_batch(len(index))
    return np.concatenate(scores).astype(np.float32)


def _score_block_units(ensemble, graph, table, options, unit_list, batch_variants, log) -> list[UnitScores]:
    from .dag import unit_subgraph

    from multiquant.utils import Progress

    out = []
    # counted in variants, not units: one large block can hold most of the work (minutes on a CPU)
    counter = Progress(sum(len(options) ** len(unit.layers) for unit in unit_list),
                       desc=f"unit scores ({len(unit_list)} units)", unit="variant")
    for unit in unit_list:
        started = time.perf_counter()
        template = ensemble.template_for(unit_subgraph(graph, unit))
        if template.nodes[-1] != str(unit.output) and template.nodes[-1] != unit.output:
            raise AssertionError(f"unit {unit.name}: the output is not the last node of its subgraph")
        columns = template.layer_index
        variants = enumerate_variants(len(columns), len(options))
        scores = _score_variants(ensemble, template, table, options, variants, template.num_nodes - 1, unit.hops,
                                 batch_variants, counter.update)
        out.append(_unit_record(unit, [template.keys[i] for i in columns], [template.ops[i] for i in columns],
                                [template.aliases[i] for i in columns], variants, scores))
        if log:
            log(f"  {unit.name}: {len(variants):,} variants in {time.perf_counter() - started:.2f} s")
    counter.close()
    return out


def _unit_record(unit, keys, ops, aliases, variants, scores) -> UnitScores:
    return UnitScores(name=unit.name, type=unit.type, block=int(unit.block), hops=int(unit.hops),
                      output=str(unit.output), keys=list(keys), ops=list(ops), aliases=[list(a) for a in aliases],
                      variants=variants, scores=scores)


def _score_node_level(ensemble, graph, table, options, unit_list) -> list[UnitScores]:
    """Hop-0 scores of every layer under every option: K graphs of the isolated layer nodes, one pass."""
    layer_nodes = [u.output for u in unit_list]
    if any(u.hops != 0 for u in unit_list):
        raise ValueError("node-level units must have hops == 0")
    isolated = nx.DiGraph(**graph.graph)
    isolated.add_nodes_from((n, graph.nodes[n]) for n in layer_nodes)
    template = ensemble.template_for(isolated)
    k = len(options)
    variants = np.repeat(np.arange(k, dtype=np.uint8)[:, None], len(layer_nodes), axis=1)  # graph j: option j
    scores = _score_all_nodes(ensemble, template, table, options, variants)  # [K, N]
    column = np.arange(k, dtype=np.uint8)[:, None]
    return [_unit_record(unit, [template.keys[i]], [template.ops[i]], [template.aliases[i]], column,
                         scores[:, i].astype(np.float32)) for i, unit in enumerate(unit_list)]


def _score_all_nodes(ensemble, template, table, options, variants) -> np.ndarray:
    from .data import ConfigDataset

    codes, numeric = _variant_features(template, table, options, variants)
    dataset = ConfigDataset(template, codes, numeric, None)
    n = template.num_nodes
    batch = dataset.collate(torch.arange(len(variants)))
    scores = ensemble.score_nodes(batch, torch.arange(len(variants) * n), 0)
    return scores.reshape(len(variants), n)


def score_units(ensemble, graph: nx.DiGraph, table, level: str = "block", unit_list: Iterable | None = None,
                batch_variants: int = 4096, log: Callable[[str], None] | None = None) -> UnitScoreSet:
    """Score every variant of every unit of ``graph`` at ``level`` with ``ensemble`` (a loaded
    :class:`autobuild.ensemble.Ensemble`). ``table``: anything :meth:`OptionTable.from_source` reads.
    ``unit_list`` overrides ``autobuild.dag.units(graph, level)``."""
    from .dag import units as make_units

    table = OptionTable.from_source(table)
    options = table.options
    unit_list = list(unit_list) if unit_list is not None else make_units(graph, level)
    started = time.perf_counter()
    with torch.no_grad():
        if level == "node":
            scored = _score_node_level(ensemble, graph, table, options, unit_list)
        elif level == "block":
            scored = _score_block_units(ensemble, graph, table, options, unit_list, batch_variants, log)
        else:
            raise ValueError(f"level must be 'node' or 'block', got {level!r}")
    seconds = time.perf_counter() - started
    total = int(sum(len(u.scores) for u in scored))
    meta = {"family": graph.graph.get("family"), "target": ensemble.config.get("target"),
            "folds": len(ensemble.models), "table_digest": table.digest(), "fp_prec": table.fp_prec,
            "fp_bytes": table.fp_bytes, "seconds": seconds, "variants": total,
            "variants_per_second": total / seconds if seconds > 0 else None, "torch_threads": torch.get_num_threads(),
            "batch_variants": batch_variants, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if log:
        log(f"{level}-level unit scores: {len(scored)} units, {total:,} variants, {seconds:.1f} s")
    return UnitScoreSet(level=level, options=list(options), units=scored, meta=meta)


# ------------------------------------------------------------------------------------------ cached files
def scores_path(predictor_dir: str | os.PathLike, level: str) -> Path:
    """Default stem of a predictor's unit scores: ``<predictor_dir>/unit_scores_<level>``."""
    return Path(predictor_dir) / f"unit_scores_{level}"


def _ensemble_digest(predictor_dir: Path) -> str:
    from .ensemble import ENSEMBLE_WEIGHTS

    h = hashlib.sha256()
    with open(predictor_dir / ENSEMBLE_WEIGHTS, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def check_graph_matches(ensemble, graph: nx.DiGraph) -> None:
    """The predictor's training graph and ``graph`` must be the same DAG (node for node)."""
    nodes = [str(n) for n in graph.nodes]
    if nodes != list(ensemble.template.nodes):
        raise InputError(f"the predictor was trained on another graph ({ensemble.template.num_nodes} nodes, family "
                         f"{ensemble.template.family!r}) than the one given ({len(nodes)} nodes, family "
                         f"{graph.graph.get('family')!r}): use the same family and size (--size full|tiny)")


def _same_units(cached: UnitScoreSet, graph: nx.DiGraph, level: str) -> bool:
    """Cached scores belong to this graph: the same units, with the same layers."""
    from .dag import units as make_units

    current = make_units(graph, level)
    return [(u.name, str(u.output)) for u in current] == [(u.name, u.output) for u in cached.units]


def unit_scores_for(predictor_dir: str | os.PathLike, graph: nx.DiGraph, table, level: str = "block",
                    path: str | os.PathLike | None = None, recompute: bool = False, batch_variants: int = 4096,
                    log: Callable[[str], None] | None = None) -> UnitScoreSet:
    """The unit scores of a trained predictor, computed once and cached beside it (``scores_path``); a
    cached file is reused only if it was made from the same ensemble weights and option table."""
    from .ensemble import load_ensemble

    predictor_dir = Path(predictor_dir)
    table = OptionTable.from_source(table)
    stem = Path(path) if path else scores_path(predictor_dir, level)
    digest = _ensemble_digest(predictor_dir)
    if not recompute:
        try:
            cached = UnitScoreSet.load(stem)
        except FileNotFoundError:
            cached = None
        if (cached is not None and cached.level == level and cached.meta.get("ensemble_digest") == digest
                and cached.meta.get("table_digest") == table.digest() and _same_units(cached, graph, level)):
            return cached
    ensemble = load_ensemble(predictor_dir)
    check_graph_matches(ensemble, graph)
    result = score_units(ensemble, graph, table, level, batch_variants=batch_variants, log=log)
    result.meta.update(ensemble_digest=digest, predictor=str(predictor_dir))
    result.save(stem)
    return result
