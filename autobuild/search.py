"""Closed-loop, measured search for budgeted configurations: Thompson sampling over a Bayesian linear model of
log FID, an exact knapsack per proposal, every proposal measured (why and how: docs/design.md §8).

The result reports, per budget, the best *measured* configuration within the budget (the input records count
too); the best of many noisy measurements is biased low, so re-score picks with other image seeds.

    qua2sedimo search --cache quant_caches/mnist_dit/quant_cache.pkl --model mnist_dit \\
        --budgets 3.3,3.5,3.7,3.9 --rounds 4 --per_budget 3 --out runs/search --device cuda
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, NamedTuple, Sequence

import numpy as np

from multiquant.cli_flags import act_bits_arg, add_activation_args, add_model_flags
from multiquant.errors import InputError
from multiquant.options import OptionTable

from .configs import (DEFAULT_SEARCH_BUDGETS, Knapsack, budgets_help, budgets_or_default, config_name, config_origin,
                      parse_budgets, solve_knapsack)
from .data import config_of as _plain, encode_options, option_name as _option
from multiquant.utils import default_device

__all__ = ["DEFAULT_KEY", "option_design", "encode", "signature", "Surrogate", "fit_surrogate", "Proposal",
           "propose", "search", "best_within", "StoreMeasure", "measured_search", "add_search_arguments", "run_search"]

DEFAULT_KEY = "FID-GT-1k"
DRAWS_PER_SLOT = 4  # Thompson draws allowed per wanted proposal before giving up on duplicates


# ------------------------------------------------------------------------------------------ features
def _canonical_keys(table: OptionTable, ties: Mapping[str, str] | None) -> list[str]:
    ties = ties or {}
    unknown = [c for c, k in ties.items() if c not in table.table or k not in table.table]
    if unknown:
        raise ValueError(f"tied layer {unknown[0]!r} (or its canonical layer) is not in the option table")
    return [k for k in table.keys if k not in ties]


def option_design(table: OptionTable, ties: Mapping[str, str] | None = None) -> list[tuple[str, str]]:
    """Feature columns ``[(layer_key, option), ...]``: every option of every table layer, layer-major in the
    table's order. ``ties`` (``{copy: canonical}``) drops tied copies: they always follow their canonical
    layer, so their columns would only duplicate it."""
    return [(k, o) for k in _canonical_keys(table, ties) for o in table.options]


def encode(items: Sequence[Mapping], columns: Sequence[tuple[str, str]]) -> np.ndarray:
    """One-hot rows ``[len(items), len(columns)]`` of records or plain configurations over a search space's
    columns (:func:`autobuild.data.encode_options`, strict: every layer and option must be in the space)."""
    return encode_options(items, columns, strict=True)


def signature(item: Mapping, keys: Sequence[str]) -> tuple[str, ...]:
    """Hashable identity of a configuration over ``keys`` (records and plain configurations alike)."""
    config = _plain(item)
    return tuple(_option(config[k]) for k in keys)


# ------------------------------------------------------------------------------------------ surrogate
@dataclass
class Surrogate:
    """A fitted ``sklearn.linear_model.BayesianRidge`` of log(metric) over ``columns``."""

    model: object
    columns: list[tuple[str, str]]
    ties: dict[str, str]
    n: int
    _factor: np.ndarray | None = field(default=None, repr=False)

    @property
    def mean(self) -> np.ndarray:
        return np.asarray(self.model.coef_, dtype=np.float64)

    def draw(self, rng: np.random.Generator) -> np.ndarray:
        """One posterior sample of the coefficients. ``sigma_`` of a one-hot design is near singular (the
        options of a layer sum to the intercept), so sample through ``eigh`` with negative round-off clipped
        rather than Cholesky."""
        if self._factor is None:  # once per fit: every draw of a round shares it
            cov = np.asarray(self.model.sigma_, dtype=np.float64)
            values, vectors = np.linalg.eigh((cov + cov.T) / 2)
            self._factor = vectors * np.sqrt(np.clip(values, 0.0, None))
        return self.mean + self._factor @ rng.standard_normal(self._factor.shape[1])

    def predict_log(self, items: Sequence[Mapping]) -> np.ndarray:
        """Posterior-mean log(metric) of records or configurations."""
        return self.model.predict(encode(items, self.columns)) if len(items) else np.zeros(0)


def _log_targets(records: Sequence[Mapping], key: str) -> np.ndarray:
    values = np.array([float(r[key]) if key in r else np.nan for r in records], dtype=np.float64)
    bad = np.flatnonzero(~(np.isfinite(values) & (values > 0)))
    if len(bad):
        raise InputError(f"{len(bad)} record(s) have no finite positive {key!r} (first: record {bad[0]}, value "
                         f"{values[bad[0]]}): the surrogate models log({key}); drop or re-score those records")
    return np.log(values)


def fit_surrogate(records: Sequence[Mapping], columns: Sequence[tuple[str, str]], key: str = DEFAULT_KEY,
                  ties: Mapping[str, str] | None = None) -> Surrogate:
    """BayesianRidge on one-hot features, target ``log(record[key])`` (FID is multiplicative in practice)."""
    from sklearn.linear_model import BayesianRidge

    if len(records) < 2:
        raise InputError("the surrogate needs at least 2 measured configurations to start from")
    model = BayesianRidge().fit(encode(records, columns), _log_targets(records, key))
    return Surrogate(model, list(columns), dict(ties or {}), len(records))


# ------------------------------------------------------------------------------------------ proposals
class Proposal(NamedTuple):
    """A configuration to measure: ``budget``, full ``config`` ``{key: option}`` (table order, tied copies
    included), ``kind`` (``"mean"`` or ``"thompson"``) and the Thompson draw's seed (None for the mean)."""

    budget: float
    config: dict
    kind: str
    draw_seed: int | None


class _Problem:
    """The knapsack skeleton of a table: one group per canonical layer, bytes of its tied copies added."""

    def __init__(self, table: OptionTable, columns: Sequence[tuple[str, str]], ties: Mapping[str, str]):
        self.table, self.ties = table, dict(ties)
        self.layers = list(dict.fromkeys(k for k, _ in columns))
        copies = {k: [c for c, t in self.ties.items() if t == k] for k in self.layers}
        position = {c: j for j, c in enumerate(columns)}
        self.rows = [np.array([position[(k, o)] for o in table.options]) for k in self.layers]
        self.costs = [np.array([sum(table.quant_bytes(c, o) for c in (k, *copies[k])) for o in table.options],
                               dtype=np.int64) for k in self.layers]

    def solve(self, coef: np.ndarray, budget: float) -> dict:
        values = [-coef[rows] for rows in self.rows]  # maximise -log FID
        solution = solve_knapsack(Knapsack(self.costs, values, self.table.fp_bytes, self.table.fp_prec), budget)
        chosen = {k: self.table.options[i] for k, i in zip(self.layers, solution.choice)}
        return {k: chosen[self.ties.get(k, k)] for k in self.table.keys}


def propose(surrogate: Surrogate, table: OptionTable, budgets: Sequence[float], per_budget: int,
            rng: np.random.Generator, exclude: set | None = None) -> list[Proposal]:
    """Up to ``per_budget`` new configurations per budget: the posterior-mean knapsack solution, then
    Thompson-draw solutions. Duplicates and signatures in ``exclude`` (already measured) are dropped;
    ``exclude`` is not modified."""
    problem = _Problem(OptionTable.from_source(table), surrogate.columns, surrogate.ties)
    seen = set(exclude or ())
    out = []
    for budget in budgets:
        found, draws = 0, 0
        candidates = [("mean", None)]
        while found < per_budget and draws < DRAWS_PER_SLOT * per_budget:
            kind, draw_seed = candidates.pop() if candidates else ("thompson", int(rng.integers(2**63)))
            if kind == "thompson":  # each draw has its own seed: any proposal can be reproduced from the record
                draws += 1
                coef = surrogate.draw(np.random.default_rng(draw_seed))
            else:
                coef = surrogate.mean
            config = problem.solve(coef, float(budget))
            sig = signature(config, problem.layers)
            if sig in seen:
                continue
            seen.add(sig)
            out.append(Proposal(float(budget), config, kind, draw_seed))
            found += 1
    return out


# ------------------------------------------------------------------------------------------ the loop
def best_within(records: Sequence[Mapping], budget: float, key: str = DEFAULT_KEY) -> Mapping | None:
    """The record with the lowest ``key`` among those with ``avg_bits <= budget`` (None if there is none)."""
    eligible = [r for r in records if float(r["avg_bits"]) <= budget + 1e-12]
    return min(eligible, key=lambda r: float(r[key])) if eligible else None


def search(records: Sequence[Mapping], table, budgets: Sequence[float], measure: Callable[[list], list],
           rounds: int = 4, per_budget: int = 3, seed: int = 0, key: str = DEFAULT_KEY,
           log: Callable[[str], None] | None = print, ties: Mapping[str, str] | None = None) -> dict:
    """Run the closed loop (module doc). ``records``: the measured dataset to start from (``config`` in
    record form, ``key``, ``avg_bits``); ``measure(configs) -> records`` scores plain ``{key: option}``
    configurations in order; ``ties``: ``{tied copy: canonical layer}``. Returns a JSON-serialisable result:
    ``rounds`` (per round the proposals with budget, kind, Thompson seed, predicted and measured value, avg_bits,
    options in ``keys`` order), ``best`` (per budget the best measured configuration within it, from the input
    or the search) and ``settings``."""
    table = OptionTable.from_source(table)
    ties = dict(ties or {})
    columns = option_design(table, ties)
    layers = _canonical_keys(table, ties)
    budgets = [float(b) for b in budgets]
    log = log or (lambda msg: None)
    data = list(records)
    _log_targets(data, key)  # fail before anything is measured
    measured = {signature(r, layers) for r in data}
    n_input = len(data)
    history = []
    for round_index in range(rounds):
        surrogate = fit_surrogate(data, columns, key, ties)
        proposals = propose(surrogate, table, budgets, per_budget, np.random.default_rng([seed, round_index]),
                            exclude=measured)
        predicted = np.exp(surrogate.predict_log([p.config for p in proposals]))
        new = list(measure([p.config for p in proposals])) if proposals else []
        if len(new) != len(proposals):
            raise RuntimeError(f"measure returned {len(new)} records for {len(proposals)} configurations")
        entries = []
        for p, rec, pred in zip(proposals, new, predicted):
            if signature(rec, layers) != signature(p.config, layers):
                raise RuntimeError("measure returned a record of another configuration than the one proposed")
            measured.add(signature(rec, layers))
            entries.append({"budget": p.budget, "kind": p.kind, "thompson_seed": p.draw_seed,
                            "predicted_fid": float(pred), "fid": float(rec[key]), "avg_bits": float(rec["avg_bits"]),
                            "config": [p.config[k] for k in table.keys]})
        data.extend(new)
        history.append({"round": round_index, "rng_seed": [seed, round_index], "fit_on": surrogate.n,
                        "noise_precision": float(surrogate.model.alpha_),
                        "weight_precision": float(surrogate.model.lambda_), "proposals": entries})
        log(f"round {round_index + 1}/{rounds}: fit on {surrogate.n}, measured {len(entries)} new: "
            + ", ".join(f"{e['budget']:g}b {e['kind'][0]} {e['fid']:.1f} (pred {e['predicted_fid']:.1f})"
                        for e in entries))
        if not entries:
            log("  no new configuration proposed: the posterior has concentrated; stopping")
            break
    best = {}
    for budget in budgets:
        pick = best_within(data, budget, key)
        position = next((i for i, r in enumerate(data) if r is pick), None)
        best[f"{budget:g}"] = None if pick is None else {
            "budget": budget, "fid": float(pick[key]), "avg_bits": float(pick["avg_bits"]),
            "source": "search" if position >= n_input else "input",
            "index": position - n_input if position >= n_input else position,  # in the input or the search
            "config": {k: _option(_plain(pick)[k]) for k in table.keys},
            "best_input_fid": _fid_or_none(best_within(data[:n_input], budget, key), key),
            "best_search_fid": _fid_or_none(best_within(data[n_input:], budget, key), key)}
    return {"rounds": history, "best": best, "keys": table.keys,
            "settings": {"seed": seed, "rounds": rounds, "rounds_run": len(history), "per_budget": per_budget,
                         "budgets": budgets, "key": key, "n_input": n_input, "n_search": len(data) - n_input,
                         "surrogate": f"sklearn BayesianRidge on one-hot (layer, option), target log({key})",
                         "acquisition": "posterior mean + Thompson draws, exact knapsack (scipy milp) per budget",
                         "draws_per_slot": DRAWS_PER_SLOT, "columns": len(columns), "tied_copies": len(ties),
                         "table_digest": table.digest()}}


def _fid_or_none(record, key):
    return None if record is None else float(record[key])


# ------------------------------------------------------------------------------------------ I/O edge
class StoreMeasure:
    """``measure`` through a crash-safe :class:`multiquant.store.RecordStore`: the i-th configuration this
    object is asked for is store index i. The search's proposals are deterministic, so a re-run asks for
    the same configurations in the same order and finds the committed ones instead of re-scoring them.
    ``scorer``: anything with ``record(config, index=i, **extra) -> record`` (``ConfigScorer``)."""

    def __init__(self, store, scorer, log: Callable[[str], None] = print):
        self.store, self.scorer, self.log = store, scorer, log
        self.next_index = 0
        self.scored = 0  # configurations actually scored by this process (not found in the store)

    def __call__(self, configs: list[dict]) -> list[dict]:
        from multiquant.evaluate import score_into_store
        from multiquant.store import StoreError

        indices = list(range(self.next_index, self.next_index + len(configs)))
        self.next_index += len(configs)
        if set(indices) <= self.store.done_indices():
            self.log(f"  {len(indices)} configuration(s) already scored in {self.store.outdir} (resumed)")
        else:  # the window makes score_into_store's "resuming" note count this batch only
            self.scored += score_into_store(self.scorer, _Window(self.store, indices), list(zip(indices, configs)),
                                            log=self.log)
        stored = {int(r["index"]): r for r in self.store.records()}
        out = [stored[i] for i in indices]
        for i, config, rec in zip(indices, configs, out):
            if any(_option(rec["config"][k]) != _option(v) for k, v in config.items()):
                raise StoreError(f"{self.store.outdir}: stored configuration {i} is not the one the search proposes "
                                 f"now (another seed, dataset or code version): use a new --out directory")
        return out


class _Window:
    """The store as seen by one batch: only the batch's indices count as done."""

    def __init__(self, store, indices):
        self.store, self.indices = store, set(indices)

    def done_indices(self) -> set[int]:
        return self.store.done_indices() & self.indices

    def commit(self, index: int, record: dict):
        return self.store.commit(index, record)

    def claim(self, index: int) -> bool:
        return index in self.indices and self.store.claim(index)

    def release(self, index: int) -> None:
        self.store.release(index)

    @property
    def outdir(self):
        return self.store.outdir


def _digest_records(records: Sequence[Mapping], key: str) -> str:
    """Identity of the input dataset (its configurations and values), for the store's run metadata."""
    import hashlib

    h = hashlib.sha256()
    for r in records:
        h.update(repr((sorted((k, _option(v)) for k, v in r["config"].items()), float(r[key]))).encode())
    return h.hexdigest()[:16]


def measured_search(scorer, settings: dict, records: Sequence[Mapping], budgets: Sequence[float], out,
                    rounds: int = 4, per_budget: int = 3, seed: int = 0, key: str = DEFAULT_KEY,
                    log: Callable[[str], None] = print) -> dict:
    """:func:`search` with a real ``ConfigScorer`` (``setup_scorer``) measuring into a resumable
    ``RecordStore`` at ``out``; returns the result plus ``scored_this_run`` and the store directory."""
    from multiquant.store import RecordStore

    table = OptionTable.from_source(scorer.mq)
    ties = {r.key: r.tied_to for r in scorer.mq.layers if r.tied_to}
    budgets = [float(b) for b in budgets]
    # everything that changes the proposal sequence is in the run metadata; the number of rounds is not,
    # so a run can be extended by asking for more rounds
    meta = dict(settings, kind="search", seed=seed, budgets=budgets, per_budget=per_budget, key=key,
                dataset=_digest_records(records, key), n_input=len(records))
    measure = StoreMeasure(RecordStore(out, meta), scorer, log=log)
    result = search(records, table, budgets, measure, rounds, per_budget, seed, key, log, ties)
    result.update(scored_this_run=measure.scored, store=str(out))
    return result


def add_search_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``search`` flags (for a sub-parser of the ``qua2sedimo`` command)."""
    p.add_argument("--cache", default=None, help="quant_cache.pkl of scored configurations to start from "
                                                 "(same protocol as this scorer)")
    p.add_argument("--num_random", type=int, default=0, help="also score this many random configurations (seed 0) "
                                                             "as starting data, e.g. without --cache (--tiny)")
    add_model_flags(p, model_help="model family, e.g. mnist_dit", tiny_help="tiny random denoiser (smoke runs)")
    p.add_argument("--budgets", default=None, help=budgets_help(DEFAULT_SEARCH_BUDGETS))
    p.add_argument("--rounds", type=int, default=4, help="rounds of fit, propose, measure")
    p.add_argument("--per_budget", type=int, default=3, help="new configurations per budget per round")
    p.add_argument("--seed", type=int, default=0, help="seed of every random choice of the search")
    p.add_argument("--key", default=DEFAULT_KEY, help="metric to minimise (modelled as log(key); must be > 0)")
    p.add_argument("--out", required=True, help="run directory: scored records (resumable), search.json")
    p.add_argument("--config_dir", default=None, help="where the best configurations go (default OUT/configs)")
    p.add_argument("--num_images", type=int, default=None, help="images per configuration (default: the family's, "
                                                                "the dataset's protocol)")
    p.add_argument("--image_seed", type=int, default=42, help="base seed of the per-image noise")
    p.add_argument("--mq", default=None, help="multiquantizer (default multiquantizers/<model>_mq.safetensors; "
                                              "--tiny: OUT/<model>_tiny_mq.safetensors)")
    add_activation_args(p)  # the dataset must have been scored with the same activation bits
    return p


def _input_records(args, scorer, settings, out: Path, table: OptionTable, log) -> list[dict]:
    from multiquant.evaluate import ACT_FP_BITS, random_configs, score_into_store
    from multiquant.store import RecordStore, load_quant_cache

    records = load_quant_cache(args.cache) if args.cache else []
    if args.num_random:
        store = RecordStore(out / "random", dict(settings, kind="random", seed=0, num_archs=args.num_random))
        score_into_store(scorer, store, random_configs(scorer.mq.layers, 0, args.num_random), log=log)
        records += store.records()
    if not records:
        raise InputError("no configurations to start from: pass --cache (the scored dataset) or --num_random N")
    wrong = next((r for r in records if set(r["config"]) != set(table.keys)), None)
    if wrong is not None:
        raise InputError(f"{args.cache}: its configurations have other layers ({len(wrong['config'])}) than the "
                         f"{'tiny ' if args.tiny else ''}{args.model} multiquantizer ({len(table.keys)}): use the "
                         f"cache of this model")
    acts = {int(r.get("act_bits") or ACT_FP_BITS) for r in records}
    act = int(settings.get("act_bits") or ACT_FP_BITS)
    if acts != {act}:
        raise InputError(f"the dataset was scored with activations at {'/'.join(f'A{a}' for a in sorted(acts))}, this "
                         f"search at A{act}: pass a dataset scored with the same --quant_act --act_bit "
                         f"(eval-random), or {'drop --quant_act' if act != ACT_FP_BITS else 'add them'}")
    counts = {r.get("num_images") for r in records} - {None}
    if counts and counts != {settings["num_images"]}:
        log(f"warning: the dataset was scored on {sorted(counts)} images, this search on {settings['num_images']}: "
            f"their FIDs are not comparable (pass --num_images)")
    return records


def run_search(args, log: Callable[[str], None] = print) -> int:
    import torch

    from multiquant.config import save_config
    from multiquant.evaluate import setup_scorer
    from multiquant.families import get_family
    from multiquant.metrics.metric import metric_label
    from multiquant.utils import write_text_atomic

    started = time.perf_counter()
    out = Path(args.out)
    requested = parse_budgets(args.budgets)
    family = get_family(args.model)
    device = args.device or str(default_device())
    mq_path = Path(args.mq) if args.mq else (out / f"{family.name}_tiny_mq.safetensors" if args.tiny else None)
    scorer, settings = setup_scorer(family, pretrained=args.pretrained, tiny=args.tiny, device=device,
                                    mq_path=mq_path, num_images=args.num_images, image_seed=args.image_seed,
                                    build_mq=bool(args.tiny and not args.mq), act_bits=act_bits_arg(args), log=log)
    table = OptionTable.from_source(scorer.mq)
    records = _input_records(args, scorer, settings, out, table, log)
    # the run's store records its budgets (measured_search): a resume at other budgets is refused, never mixed
    budgets = budgets_or_default(requested, table, DEFAULT_SEARCH_BUDGETS, log)
    result = measured_search(scorer, settings, records, budgets, out, args.rounds, args.per_budget, args.seed,
                             args.key, log)

    config_dir = Path(args.config_dir) if args.config_dir else out / "configs"
    for budget, best in result["best"].items():
        if best is not None:
            origin = config_origin("search", family.name, float(budget), best["avg_bits"], fid=best["fid"],
                                   source=best["source"], seed=args.seed, cache=args.cache)
            path = save_config(best["config"], config_dir / f"{config_name(family.name, float(budget))}_search.pkl",
                               origin=origin)
            best["config_path"] = str(path)
            log(f"budget {budget}: {metric_label(scorer.metric, args.key)} {best['fid']:.2f} at {best['avg_bits']:.3f} bits ({best['source']}) -> {path}")
        else:
            log(f"budget {budget}: no measured configuration within the budget")
    result.update(model=family.name, cache=args.cache, out=str(out), protocol=settings, device=device,
                  seconds=time.perf_counter() - started)
    path = write_text_atomic(out / "search.json", json.dumps(result, indent=1))
    log(f"wrote {path} ({result['scored_this_run']} configuration(s) scored in this run)")
    return 0

