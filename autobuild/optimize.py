"""One robust optimiser for budgeted configurations (``qua2sedimo optimize``): propose from several sources,
measure with the dataset protocol, return per budget the best *confirmed* configuration with its history.

Why: on one testbed log FID is nearly additive over per-layer options, on another it is not; a single fixed
model (a ridge prior, a linear surrogate, the GNN's unit scores) is right on one and wrong on the other.
So every proposal is measured, the surrogate is re-chosen every round by cross-validation among models of
growing capacity, and the answer is confirmed with a fresh image seed (the best of many noisy
measurements is biased low). Stages, all counted in full-protocol evaluations (``evaluations``):

1. anchors: every uniform configuration of the option table (e.g. UAQ/K-Means-C/K-Means-A at 3 and 4 bits);
2. one-layer sweeps (low fidelity, counted at their image fraction): every layer alone at each method's
   lowest width, the rest FP; ``degradation[l, option]`` is the measured damage at that width, scaled to the
   other widths of the method by the layer's weight-error ratio (the option table's errors);
3. exact knapsack on the sweeps for each method and for the best method per layer, at every budget;
4. optional one-shot proposals of another model (``extra_source``: e.g. the trained predictor's node- and
   block-level configurations);
5. surrogate rounds: each candidate model (``SURROGATES``) is fit as a bootstrap ensemble on every
   measured configuration; the one with the best K-fold held-out Spearman of log FID is used. Per budget it
   proposes its mean optimum and Thompson draws (one bootstrap member each); a model is optimised by
   sequential linearisation: effects of every single-layer change at the current point -> exact knapsack ->
   repeat while the model's prediction improves;
6. confirmation: per budget the best ``confirm_top`` measured configurations within it are re-scored with
   the confirmation seed; the pick is the lowest mean of the two measurements.

The loop is pure: ``measure(configs, seed_kind)`` (``"main"`` or ``"confirm"``) returns records with the
metric and ``avg_bits``, and ``measure_layers(method)`` returns ``({layer: degradation}, cost in
evaluations)``; :func:`run_optimize` wires them to the real scorer (resumable stores keyed by content).
Every random choice comes from ``numpy.random.default_rng([seed, stage, round])`` and is recorded.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from multiquant import knapsack
from multiquant.cli_flags import act_bits_arg, add_activation_args, add_model_flags
from multiquant.knapsack import BudgetError

from multiquant.options import Option, OptionTable, avg_bits_of, option_of, size_budget

__all__ = ["Space", "Sweeps", "SURROGATES", "fit_surrogate", "select_surrogate", "optimise_model", "optimize",
           "ContentMeasure", "run_optimize", "add_optimize_arguments", "DEFAULT_KEY"]

DEFAULT_KEY = "FID-GT-1k"
EPS = 1e-3  # floor of the summed degradation inside log()


# ------------------------------------------------------------------------------------------ the space
def _option(entry) -> str:
    return str(option_of(entry))


def _method_bits(option: str) -> tuple[str, int]:
    parsed = Option.parse(option)
    return ("fp16" if parsed.method is None else parsed.method), parsed.bits


@dataclass
class Space:
    """The searchable space of an option table: one group per canonical layer (tied copies follow it and add
    their bytes), ``cost[l, k]`` bytes and ``error[l, k]`` weight error of option ``k`` of layer ``l``."""

    table: OptionTable
    ties: dict
    layers: list
    options: list
    cost: np.ndarray
    error: np.ndarray
    shift: np.ndarray | None = None  # [layers, options, C] output shifts (autobuild.output_shift), if measured
    # [layers, options, k] leading components of the output-change signature (autobuild.output_shift.SIGNATURE)
    shift_coords: np.ndarray | None = None

    @classmethod
    def of(cls, table, ties: Mapping[str, str] | None = None) -> "Space":
        table = OptionTable.from_source(table)
        ties = dict(ties or {})
        layers = [k for k in table.keys if k not in ties]
        copies = {k: [k] + [c for c, t in ties.items() if t == k] for k in layers}
        options = table.options
        cost = np.array([[sum(table.quant_bytes(c, o) for c in copies[k]) for o in options] for k in layers],
                        dtype=np.float64)
        error = np.array([[sum(float(table.table[c][o][3]) for c in copies[k]) for o in options] for k in layers])
        return cls(table, ties, layers, options, cost, error)

    def with_shifts(self, table: Mapping[str, Mapping[str, Sequence[float]]]) -> "Space":
        """This space with each group's output shift per option (tied copies add theirs: zero by construction)."""
        shift = np.array([[np.asarray(table[k][o], dtype=np.float64) if o in table[k] else 0.0 for o in self.options]
                          for k in self.layers])
        return dataclasses.replace(self, shift=shift)

    def with_signature(self, table: Mapping[str, Mapping[str, Sequence[float]]], components: int = 32) -> "Space":
        """This space with each group's output-change signature projected on the table's leading components
        (:func:`autobuild.output_shift.shift_basis`), in units of the spread of their sum over 256 uniformly
        random configurations of the space (seeded; no labels), so that the ``ridge_shift`` surrogate's
        quadratic form is of order one whatever the model's output scale."""
        from .output_shift import shift_basis

        basis = shift_basis(table, components)
        zero = [0.0] * basis.components
        coords = np.array([[basis.coords.get(f"{k}={o}", zero) for o in self.options] for k in self.layers])
        random = np.random.default_rng(0).integers(0, len(self.options), (256, len(self.layers)))
        spread = float(coords[np.arange(len(self.layers))[None, :], random].sum(axis=1).std()) or 1.0
        return dataclasses.replace(self, shift_coords=coords / spread)

    @property
    def methods(self) -> list[str]:
        return list(dict.fromkeys(_method_bits(o)[0] for o in self.options))

    def avg_bits(self, choice) -> float:
        return avg_bits_of(int(self.cost[np.arange(len(self.layers)), choice].sum()), self.table.fp_bytes,
                           self.table.fp_prec)

    def capacity(self, budget: float) -> float:
        return float(size_budget(budget, self.table.fp_bytes, self.table.fp_prec))

    def config(self, choice) -> dict:
        chosen = {k: self.options[int(c)] for k, c in zip(self.layers, choice)}
        return {k: chosen[self.ties.get(k, k)] for k in self.table.keys}

    def choice_of(self, item: Mapping) -> np.ndarray:
        config = item["config"] if isinstance(item.get("config"), Mapping) else item
        index = {o: i for i, o in enumerate(self.options)}
        return np.array([index[_option(config[k])] for k in self.layers], dtype=np.int64)

    def one_hot(self, choices: np.ndarray) -> np.ndarray:
        """``[n, layers x options]`` one-hot (layer, option) rows of ``[n, layers]`` choice indices."""
        choices = np.atleast_2d(choices)
        n, k = len(choices), len(self.options)
        x = np.zeros((n, len(self.layers) * k))
        x[np.arange(n)[:, None], np.arange(len(self.layers))[None, :] * k + choices] = 1.0
        return x

    def block_names(self) -> list[str]:
        """Block of each layer: its module path up to the first numbered container (``model.down_blocks.0``,
        ``model.transformer_blocks.3``), else its parent module (``model.pos_embed``)."""
        names = []
        for key in self.layers:
            parts = key.split(".")[:-1]  # drop the quantizer's own name
            cut = next((i + 1 for i, p in enumerate(parts) if p.isdigit()), len(parts) - 1)
            names.append(".".join(parts[:max(cut, 1)]))
        return names

    def blocks(self) -> np.ndarray:
        """Block id per layer (:meth:`block_names`, numbered in order of appearance)."""
        names = self.block_names()
        ids = {p: i for i, p in enumerate(dict.fromkeys(names))}
        return np.array([ids[p] for p in names], dtype=np.int64)

    def solve(self, value: np.ndarray, budget: float, allowed: np.ndarray | None = None) -> np.ndarray | None:
        """Exact knapsack: maximise ``sum value[l, k_l]`` within ``budget``; ``allowed[l, k]`` masks options."""
        values, costs = [], []
        for row in range(len(self.layers)):
            keep = np.arange(len(self.options)) if allowed is None else np.flatnonzero(allowed[row])
            values.append(value[row, keep])
            costs.append(self.cost[row, keep])
        try:
            solution = knapsack.solve_exact(values, costs, self.capacity(budget))
        except BudgetError:
            return None
        keep_all = [np.arange(len(self.options)) if allowed is None else np.flatnonzero(allowed[r])
                    for r in range(len(self.layers))]
        return np.array([keep_all[r][c] for r, c in enumerate(solution.choice)], dtype=np.int64)


@dataclass
class Sweeps:
    """One-layer degradations ``[layers, options]`` (NaN where a method was not swept)."""

    degradation: np.ndarray
    measured: dict  # method -> {layer: raw degradation at its lowest width}

    @classmethod
    def of(cls, space: Space, measured: Mapping[str, Mapping[str, float]]) -> "Sweeps":
        d = np.full((len(space.layers), len(space.options)), np.nan)
        for method, per_layer in measured.items():
            columns = [k for k, o in enumerate(space.options) if _method_bits(o)[0] == method]
            if not columns:
                continue
            low = min(columns, key=lambda k: _method_bits(space.options[k])[1])
            for row, layer in enumerate(space.layers):
                base = max(float(per_layer[layer]), 0.0)
                for k in columns:  # other widths: scaled by the layer's weight-error ratio
                    ratio = space.error[row, k] / space.error[row, low] if space.error[row, low] > 0 else 1.0
                    d[row, k] = base * ratio
        return cls(d, {m: dict(v) for m, v in measured.items()})

    def allowed(self, method: str | None, space: Space) -> np.ndarray:
        ok = np.isfinite(self.degradation)
        if method is not None:
            ok &= np.array([_method_bits(o)[0] == method for o in space.options])[None, :]
        return ok

    def total(self, choices: np.ndarray) -> np.ndarray:
        d = np.nan_to_num(self.degradation, nan=np.nanmax(self.degradation) if np.isfinite(self.degradation).any()
                          else 0.0)
        choices = np.atleast_2d(choices)
        return d[np.arange(d.shape[0])[None, :], choices].sum(axis=1)


# ------------------------------------------------------------------------------------------ surrogates
def _features(kind: str, space: Space, sweeps: Sweeps | None, choices: np.ndarray) -> np.ndarray:
    choices = np.atleast_2d(choices)
    sens = np.log(EPS + sweeps.total(choices))[:, None] if sweeps is not None else np.zeros((len(choices), 1))
    if kind == "sens":
        return sens
    onehot = space.one_hot(choices)
    if kind == "ridge":
        return np.hstack([sens, onehot])
    if kind == "ridge_shift":  # + the quadratic form of the summed output-change signature (autobuild.output_shift)
        z = space.shift_coords[np.arange(len(space.layers))[None, :], choices].sum(axis=1)  # [n, k]
        upper = np.triu_indices(z.shape[1])
        return np.hstack([sens, onehot, z, (z[:, :, None] * z[:, None, :])[:, upper[0], upper[1]]])
    # nonlinear models: per-layer degradation and bits, the sums per block (interactions inside a block)
    if sweeps is not None:
        d = np.nan_to_num(sweeps.degradation, nan=0.0)[np.arange(len(space.layers))[None, :], choices]
    else:
        d = space.error[np.arange(len(space.layers))[None, :], choices]
    bits = np.array([_method_bits(o)[1] for o in space.options], dtype=np.float64)[choices]
    blocks = space.blocks()
    block_sum = np.stack([d[:, blocks == b].sum(axis=1) for b in range(blocks.max() + 1)], axis=1)
    if kind == "ridge_blocks":  # additive one-hot + squared block damage (pairwise terms inside a block)
        return np.hstack([sens, onehot, np.log(EPS + block_sum) ** 2, np.log(EPS + block_sum)])
    trees = [sens, np.log(EPS + d), bits, np.log(EPS + block_sum)]
    if space.shift is not None:  # the configuration's summed output shift: signed errors that add and cancel
        total = space.shift[np.arange(len(space.layers))[None, :], choices].sum(axis=1)  # [n, C]
        trees += [np.linalg.norm(total, axis=1, keepdims=True), total]
    return np.hstack(trees)  # "trees"


class _Fitted:
    """A bootstrap ensemble of one model kind; ``predict`` -> [members, n] log-metric predictions."""

    def __init__(self, kind: str, members: list, space: Space, sweeps: Sweeps | None):
        self.kind, self.members, self.space, self.sweeps = kind, members, space, sweeps

    def predict(self, choices: np.ndarray) -> np.ndarray:
        x = _features(self.kind, self.space, self.sweeps, choices)
        return np.stack([m.predict(x) for m in self.members])

    def mean(self, choices: np.ndarray) -> np.ndarray:
        return self.predict(choices).mean(axis=0)

    def member(self, index: int) -> Callable[[np.ndarray], np.ndarray]:
        """One bootstrap member's prediction function (a Thompson draw)."""
        model = self.members[index]
        return lambda choices: model.predict(_features(self.kind, self.space, self.sweeps, choices))


def _model(kind: str, seed: int):
    from sklearn.ensemble import ExtraTreesRegressor
    from sklearn.linear_model import LinearRegression, RidgeCV

    if kind == "sens":
        return LinearRegression()
    if kind in ("ridge", "ridge_blocks", "ridge_shift"):
        return RidgeCV(alphas=np.logspace(-2, 3, 11))
    return ExtraTreesRegressor(n_estimators=40, min_samples_leaf=2, max_features=0.5, random_state=seed)


SURROGATES = ("sens", "ridge", "ridge_blocks", "ridge_shift", "trees")  # by capacity; ties go to the simpler


def fit_surrogate(kind: str, space: Space, sweeps: Sweeps | None, choices: np.ndarray, y: np.ndarray,
                  members: int = 8, seed: int = 0) -> _Fitted:
    """A bootstrap ensemble of ``members`` models of ``kind`` on log-metric targets ``y``."""
    x = _features(kind, space, sweeps, choices)
    rng = np.random.default_rng(seed)
    fitted = []
    for m in range(members):
        rows = rng.integers(0, len(y), len(y)) if members > 1 else np.arange(len(y))
        fitted.append(_model(kind, seed + m).fit(x[rows], y[rows]))
    return _Fitted(kind, fitted, space, sweeps)


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(spearmanr(a, b).statistic)


def select_surrogate(space: Space, sweeps: Sweeps | None, choices: np.ndarray, y: np.ndarray, seed: int,
                     folds: int = 5, kinds: Sequence[str] = SURROGATES) -> tuple[str, dict]:
    """The kind with the best K-fold held-out Spearman of log metric (``{kind: srcc}`` beside it)."""
    n = len(y)
    kinds = [k for k in kinds if (sweeps is not None or k != "sens") and (space.shift_coords is not None
                                                                         or k != "ridge_shift")]
    if n < 2 * folds:
        return kinds[0], {}
    order = np.random.default_rng(seed).permutation(n)
    scores = {}
    for kind in kinds:
        pred = np.zeros(n)
        for chunk in np.array_split(order, folds):
            train = np.setdiff1d(order, chunk)
            pred[chunk] = fit_surrogate(kind, space, sweeps, choices[train], y[train], members=1,
                                        seed=seed).mean(choices[chunk])
        scores[kind] = _spearman(pred, y)
    valid = {k: v for k, v in scores.items() if math.isfinite(v)}
    if not valid:
        return kinds[0], scores
    best = max(valid.values())
    return next(k for k in kinds if k in valid and valid[k] >= best - 0.01), scores  # simpler within 0.01


def optimise_model(predict: Callable[[np.ndarray], np.ndarray], space: Space, budget: float,
                   starts: Sequence[np.ndarray], iterations: int = 4) -> np.ndarray | None:
    """Minimise ``predict`` (log metric of ``[n, layers]`` choices) within ``budget`` by sequential
    linearisation: the effect of every single-layer change at the current point -> exact knapsack -> repeat
    while the prediction improves. Returns the best choice found (from any start)."""
    layers, k = len(space.layers), len(space.options)
    starts = [np.asarray(s_, dtype=np.int64) for s_ in starts if s_ is not None]
    if not starts:
        return None
    values = predict(np.stack(starts))
    current, value = starts[int(np.argmin(values))], float(values.min())  # the better start only
    for _ in range(iterations):
        neighbours = np.repeat(current[None, :], layers * k, axis=0)
        neighbours[np.arange(layers * k), np.repeat(np.arange(layers), k)] = np.tile(np.arange(k), layers)
        effect = predict(neighbours).reshape(layers, k) - value
        proposal = space.solve(-effect, budget)
        if proposal is None or np.array_equal(proposal, current):
            break
        new_value = float(predict(proposal[None, :])[0])
        if new_value >= value - 1e-9:
            break
        current, value = proposal, new_value
    return current if space.avg_bits(current) <= budget + 1e-9 else None


# ------------------------------------------------------------------------------------------ the loop
@dataclass(eq=False)
class _Entry:
    choice: np.ndarray
    record: dict
    source: str
    budget: float | None
    round: int
    predicted: float | None = None


def _signature(choice) -> tuple:
    return tuple(int(c) for c in choice)


def optimize(table, budgets: Sequence[float], measure: Callable, measure_layers: Callable | None = None,
             ties: Mapping[str, str] | None = None, max_evaluations: float = 150, per_budget: int = 2,
             confirm_top: int = 2, seed: int = 0, key: str = DEFAULT_KEY, members: int = 8,
             extra_source: Callable | None = None, extra_after: int = 1, max_seconds: float | None = None,
             shifts: Mapping | None = None, signature: Mapping | None = None,
             log: Callable[[str], None] | None = print) -> dict:
    """The optimiser (module doc). ``measure(configs, seed_kind) -> records`` (``key`` and ``avg_bits`` per
    record); ``measure_layers(method) -> ({layer: degradation}, cost)`` or None (no sweeps);
    ``extra_source(records, budgets) -> [(name, budget, config)]``, called once after ``extra_after``
    surrogate rounds. ``max_seconds``: no new surrogate round starts after that (the confirmation still runs).
    ``shifts``: the output-shift table (:func:`autobuild.output_shift.output_shifts`), features of the trees;
    ``signature``: the output-change signature table (``SIGNATURE``), which adds the ``ridge_shift`` surrogate.
    Returns a JSON-serialisable result (``best`` per budget, ``history``, ``evaluations``)."""
    log = log or (lambda msg: None)
    started = time.perf_counter()
    stopped_by_time = False
    space = Space.of(table, ties)
    if shifts is not None:
        space = space.with_shifts(shifts)
    if signature is not None:
        space = space.with_signature(signature)
    budgets = sorted(float(b) for b in budgets)
    floor = space.avg_bits(space.cost.argmin(axis=1))
    budgets_ok = [b for b in budgets if b >= floor - 1e-9]
    if not budgets_ok:
        raise BudgetError(f"every budget is below the smallest achievable {floor:.4f} average bits: ask for more")
    reserve = confirm_top * len(budgets_ok)
    sweeps_cost = getattr(measure_layers, "cost_per_method", 0.0) * len(space.methods) if measure_layers else 0.0
    needed = len(space.options) + reserve + sweeps_cost  # the uniform anchors, the sweeps, the confirmations
    if max_evaluations < needed:
        sweeps = f", the one-layer sweeps ({sweeps_cost:g} evaluations: fewer --sweep_images cost less)" \
            if sweeps_cost else ""
        raise BudgetError(f"--max_evaluations {max_evaluations:g} cannot cover the {len(space.options)} uniform "
                          f"anchors{sweeps} and {reserve} confirmations ({confirm_top} per budget): give at least "
                          f"{needed:g}")
    entries: list[_Entry] = []
    seen: dict[tuple, _Entry] = {}
    spent = {"evaluations": 0.0, "full": 0, "sweep_cost": 0.0, "confirm": 0}
    rounds_log: list[dict] = []

    def measure_new(items: list[tuple[str, float | None, np.ndarray, float | None]], round_index: int) -> list:
        fresh, out = [], []
        for source, budget, choice, predicted in items:
            sig = _signature(choice)
            if sig in seen or sig in {_signature(c) for _, _, c, _ in fresh}:
                continue
            if spent["evaluations"] + len(fresh) + 1 > max_evaluations - reserve + 1e-9:
                break
            fresh.append((source, budget, choice, predicted))
        if not fresh:
            return out
        records = list(measure([space.config(c) for _, _, c, _ in fresh], "main"))
        for (source, budget, choice, predicted), rec in zip(fresh, records):
            entry = _Entry(choice, dict(rec), source, budget, round_index, predicted)
            entries.append(entry)
            seen[_signature(choice)] = entry
            out.append(entry)
        spent["evaluations"] += len(fresh)
        spent["full"] += len(fresh)
        return out

    # 1. anchors: every uniform configuration
    anchors = [(f"uniform_{o}", None, np.full(len(space.layers), k, dtype=np.int64), None)
               for k, o in enumerate(space.options)]
    measure_new(anchors, -1)
    log(f"anchors: {len(anchors)} uniform configurations, best {min(_fid(e, key) for e in entries):.2f}")

    # 2. one-layer sweeps
    sweeps = None
    if measure_layers is not None:
        measured = {}
        for method in space.methods:
            per_layer, cost = measure_layers(method)
            measured[method] = {k: float(per_layer[k]) for k in space.layers}
            spent["evaluations"] += float(cost)
            spent["sweep_cost"] += float(cost)
        sweeps = Sweeps.of(space, measured)
        log(f"sweeps: {len(measured)} methods x {len(space.layers)} layers ({spent['sweep_cost']:.1f} evaluations)")

        # 3. exact knapsack on the sweeps: each method and the best method per layer
        seeds = []
        for budget in budgets_ok:
            for method in [None, *space.methods]:
                choice = space.solve(-np.nan_to_num(sweeps.degradation, nan=0.0), budget,
                                     sweeps.allowed(method, space))
                if choice is not None:
                    seeds.append((f"knapsack_{method or 'best'}", budget, choice, None))
        measure_new(seeds, 0)
        log(f"knapsack seeds: {len(entries) - len(anchors)} new configurations")

    # 5. surrogate rounds (4. extra source once, after ``extra_after`` rounds)
    round_index, extra_done = 0, extra_source is None
    while spent["evaluations"] + 1 <= max_evaluations - reserve + 1e-9:
        if max_seconds is not None and time.perf_counter() - started > max_seconds:
            stopped_by_time = True
            log(f"time limit of {max_seconds:g} s reached: no further rounds")
            break
        round_index += 1
        if not extra_done and round_index > extra_after:
            extra_done = True
            try:
                extra = list(extra_source([e.record for e in entries], budgets_ok))
            except Exception as err:  # a failed one-shot source must not lose the measured history
                log(f"extra source failed ({type(err).__name__}: {err}); continuing without it")
                extra = []
            added = measure_new([(name, b, space.choice_of(c), None) for name, b, c in extra
                                 if space.avg_bits(space.choice_of(c)) <= b + 1e-9], round_index)
            log(f"extra source: {len(extra)} proposed, {len(added)} new measured")
        choices = np.stack([e.choice for e in entries])
        y = np.log(np.array([_fid(e, key) for e in entries]))
        kind, cv = select_surrogate(space, sweeps, choices, y, seed=seed + round_index)
        # the chosen model first; models next in CV rank, then mutations of the best, fill what it cannot
        fallbacks = sorted((k for k in cv if k != kind and math.isfinite(cv[k])), key=lambda k: -cv[k])
        models = {}
        rng = np.random.default_rng([seed, 5, round_index])
        proposals = []
        for budget in budgets_ok:
            within = [e for e in entries if float(e.record["avg_bits"]) <= budget + 1e-9]
            starts = [min(within, key=lambda e: _fid(e, key)).choice] if within else []
            starts.append(space.solve(-np.nan_to_num(sweeps.degradation, nan=0.0), budget) if sweeps is not None
                          else space.solve(-space.error, budget))
            wanted = 0
            for name in [kind, *fallbacks, "mutation"]:
                if wanted >= per_budget:
                    break
                if name == "mutation":
                    picks = [("mutation", _mutate(space, starts[0], budget, rng)) for _ in range(4 * per_budget)] \
                        if starts and starts[0] is not None else []
                else:
                    if name not in models:
                        models[name] = fit_surrogate(name, space, sweeps, choices, y, members=members,
                                                     seed=seed + 1000 * round_index)
                    model = models[name]
                    picks = [(f"{name}_mean", optimise_model(model.mean, space, budget, starts))]
                    for member in rng.permutation(len(model.members))[:per_budget]:
                        picks.append((f"{name}_draw{int(member)}",
                                      optimise_model(model.member(int(member)), space, budget, starts)))
                for source, pick in picks:
                    if wanted >= per_budget:
                        break
                    if pick is None or _signature(pick) in seen or \
                            any(_signature(pick) == _signature(p[2]) for p in proposals):
                        continue
                    predicted = models[kind].mean(pick[None, :])[0] if kind in models else math.nan
                    proposals.append((source, budget, pick, float(np.exp(predicted))))
                    wanted += 1
        new = measure_new(proposals, round_index)
        rounds_log.append({"round": round_index, "surrogate": kind, "cv_srcc": cv, "fit_on": len(entries) - len(new),
                           "rng_seed": [seed, 5, round_index], "proposed": len(proposals), "measured": len(new)})
        log(f"round {round_index}: surrogate {kind} (CV SRCC {cv.get(kind, float('nan')):.3f}), "
            f"measured {len(new)}: " + ", ".join(f"{e.budget:g}b {_fid(e, key):.1f} (pred {e.predicted:.1f})"
                                                  for e in new))
        if not new:
            log("  no new configuration proposed: stopping")
            break

    # 6. confirmation with the fresh image seed
    candidates = []
    for budget in budgets_ok:
        within = sorted((e for e in entries if float(e.record["avg_bits"]) <= budget + 1e-9), key=lambda e: _fid(e, key))
        candidates.extend(e for e in within[:confirm_top] if e not in candidates)
    confirmed = list(measure([space.config(e.choice) for e in candidates], "confirm")) if candidates else []
    spent["confirm"] = len(confirmed)
    spent["evaluations"] += len(confirmed)
    confirm_of = {_signature(e.choice): float(r[key]) for e, r in zip(candidates, confirmed)}
    best = {}
    for budget in budgets:
        pool = [e for e in candidates if float(e.record["avg_bits"]) <= budget + 1e-9]
        if not pool:
            best[f"{budget:g}"] = None
            continue
        pick = min(pool, key=lambda e: (_fid(e, key) + confirm_of[_signature(e.choice)]) / 2)
        best[f"{budget:g}"] = {"budget": budget, "fid": _fid(pick, key), "fid_confirm": confirm_of[_signature(pick.choice)],
                               "avg_bits": float(pick.record["avg_bits"]), "source": pick.source,
                               "round": pick.round, "config": space.config(pick.choice)}
    history = [{"source": e.source, "budget": e.budget, "round": e.round, "fid": _fid(e, key),
                "predicted_fid": e.predicted, "avg_bits": float(e.record["avg_bits"]),
                "fid_confirm": confirm_of.get(_signature(e.choice)),
                "config": [space.options[int(c)] for c in e.choice]} for e in entries]
    return {"best": best, "history": history, "rounds": rounds_log, "layers": space.layers,
            "evaluations": spent["evaluations"], "full_evaluations": spent["full"],
            "sweep_evaluations": spent["sweep_cost"], "confirm_evaluations": spent["confirm"],
            "settings": {"budgets": budgets, "max_evaluations": max_evaluations, "per_budget": per_budget,
                         "confirm_top": confirm_top, "seed": seed, "key": key, "members": members,
                         "surrogates": list(SURROGATES), "sweeps": measure_layers is not None,
                         "max_seconds": max_seconds, "stopped_by_time": stopped_by_time,
                         "output_shifts": shifts is not None, "output_signature": signature is not None,
                         "extra_source": extra_source is not None, "table_digest": space.table.digest()}}


def _mutate(space: Space, choice: np.ndarray, budget: float, rng: np.random.Generator) -> np.ndarray | None:
    """A random neighbour within the budget: one layer one width up (or another method), another down."""
    current = np.array(choice, dtype=np.int64)
    for _ in range(20):
        trial = current.copy()
        for layer in rng.choice(len(space.layers), size=2, replace=False):
            trial[layer] = rng.integers(len(space.options))
        if space.avg_bits(trial) <= budget + 1e-9:
            return trial
    return None


def _fid(entry: _Entry, key: str) -> float:
    value = float(entry.record[key])
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"a measured {key} of {value} cannot be modelled as log({key}): check the scorer")
    return value


# ------------------------------------------------------------------------------------------ I/O edge
class ContentMeasure:
    """``measure(configs, seed_kind)`` through resumable :class:`multiquant.store.RecordStore` s keyed by
    content: a configuration already in the store (this run's or an earlier one's) is read back, a new one is
    scored and committed at the next free index. ``scorers``: ``{seed_kind: (scorer, settings)}``."""

    def __init__(self, scorers: Mapping[str, tuple], out: Path, log: Callable[[str], None] = print):
        from multiquant.store import RecordStore

        self.scorers, self.log = dict(scorers), log
        self.stores = {kind: RecordStore(Path(out) / kind, dict(settings, kind=f"optimize-{kind}"))
                       for kind, (_, settings) in self.scorers.items()}
        self.scored = {kind: 0 for kind in self.scorers}

    @staticmethod
    def signature(config: Mapping) -> tuple:
        return tuple(sorted((k, _option(v)) for k, v in config.items()))

    def __call__(self, configs: Sequence[Mapping], seed_kind: str = "main") -> list[dict]:
        from multiquant.evaluate import score_into_store

        store = self.stores[seed_kind]
        known = {self.signature(r["config"]): r for r in store.records()}
        todo, nxt = [], max(store.done_indices(), default=-1) + 1
        for config in configs:
            sig = self.signature(config)
            if sig not in known and all(self.signature(c) != sig for _, c in todo):
                todo.append((nxt, dict(config)))
                nxt += 1
        if todo:  # the window: earlier batches of this run are no "resume" of this one
            from .search import _Window

            window = _Window(store, [i for i, _ in todo])
            self.scored[seed_kind] += score_into_store(self.scorers[seed_kind][0], window, todo, log=self.log)
            known = {self.signature(r["config"]): r for r in store.records()}
        return [known[self.signature(c)] for c in configs]


@dataclass
class MeasuredSetup:
    """What the optimiser measures with: the main-seed scorer and its protocol settings, the option space,
    the tied layers, and the two-seed measure (``main`` and ``confirm``) over resumable stores in ``workdir``."""
    scorer: object
    settings: dict
    ties: dict[str, str]
    space: Space
    measure: ContentMeasure
    device: str


def measured_setup(family, workdir: Path, *, pretrained: str | None = None, tiny: bool = False,
                   device: str | None = None, mq: str | None = None, num_images: int | None = None,
                   image_seed: int = 42, confirm_seed: int = 43, act_bits: int | None = None,
                   log: Callable[[str], None] = print) -> MeasuredSetup:
    """Scorers at the main and the confirmation image seeds (the tiny model builds its scratch multiquantizer
    in ``workdir`` unless ``mq`` names one) and the :class:`ContentMeasure` over them. ``act_bits``: every
    configuration is scored with its layers' input activations quantized (W-x A-y)."""
    from multiquant.evaluate import setup_scorer
    from multiquant.utils import default_device

    device = device or str(default_device())
    mq_path = Path(mq) if mq else (workdir / f"{family.name}_tiny_mq.safetensors" if tiny else None)
    common = dict(pretrained=pretrained, tiny=tiny, device=device, mq_path=mq_path, num_images=num_images, log=log,
                  build_mq=bool(tiny and not mq), act_bits=act_bits)
    main_scorer = setup_scorer(family, image_seed=image_seed, **common)
    confirm_scorer = setup_scorer(family, image_seed=confirm_seed, **common)
    scorer, settings = main_scorer
    ties = {r.key: r.tied_to for r in scorer.mq.layers if r.tied_to}
    measure = ContentMeasure({"main": main_scorer, "confirm": confirm_scorer}, workdir / "scored", log=log)
    return MeasuredSetup(scorer, settings, ties, Space.of(scorer.mq, ties), measure, device)


def sweep_measure(protocol, settings: dict, outdir: Path, space: Space, num_images_full: int,
                  log: Callable[[str], None] = print) -> Callable:
    """``measure_layers(method)`` over :func:`multiquant.sensitivity.run_sensitivity` (resumable): raw
    FID-FP of each layer alone at the method's lowest width; cost = layers x images / full-protocol images."""
    from multiquant.sensitivity import run_sensitivity

    def measure_layers(method: str):
        bits = min(_method_bits(o)[1] for o in space.options if _method_bits(o)[0] == method)
        report = run_sensitivity(protocol, settings, outdir, bits, method, log=lambda msg: None)
        per_layer = {e["key"]: float(e["fid_degradation"]) for e in report["layers"]}
        log(f"  sweep {method}-{bits}: {len(per_layer)} layers")
        return per_layer, len(per_layer) * protocol.sampler.num_images / num_images_full

    measure_layers.cost_per_method = len(space.layers) * protocol.sampler.num_images / num_images_full  # checked up front
    return measure_layers


def add_optimize_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``optimize`` flags (for a sub-parser of the ``qua2sedimo`` command)."""
    from .configs import DEFAULT_SEARCH_BUDGETS, budgets_help

    add_model_flags(p, model_help="model family, e.g. mnist_dit", tiny_help="tiny random denoiser (smoke runs)")
    p.add_argument("--budgets", default=None, help=budgets_help(DEFAULT_SEARCH_BUDGETS))
    p.add_argument("--max_evaluations", type=float, default=150, help="full-protocol evaluations in all "
                                                                     "(sweeps count at their image fraction)")
    p.add_argument("--per_budget", type=int, default=2, help="surrogate proposals per budget per round")
    p.add_argument("--confirm_top", type=int, default=2, help="configurations per budget re-scored with the "
                                                             "confirmation seed")
    p.add_argument("--sweep_images", type=int, default=100, help="images of each one-layer measurement (0: none)")
    p.add_argument("--predictor_source", action="store_true", help="also train the predictor on the measured "
                                                                   "configurations and measure its node- and "
                                                                   "block-level one-shot configurations")
    p.add_argument("--seed", type=int, default=0, help="seed of every random choice of the optimiser")
    p.add_argument("--image_seed", type=int, default=42, help="base seed of the per-image noise")
    p.add_argument("--confirm_seed", type=int, default=43, help="image seed of the confirmation re-scores")
    p.add_argument("--num_images", type=int, default=None, help="images per configuration (default: the family's)")
    p.add_argument("--key", default=DEFAULT_KEY, help="metric to minimise")
    p.add_argument("--out", required=True, help="run directory (resumable stores, optimize.json, configs/)")
    p.add_argument("--mq", default=None, help="multiquantizer (default multiquantizers/<model>_mq.safetensors)")
    add_activation_args(p)  # W-x A-y: the one-layer sweeps still measure weights alone (a ranking, not a score)
    p.add_argument("--output_shifts", action="store_true",
                   help="give the trees surrogate each configuration's summed output shift, and add the ridge_shift "
                        "surrogate (a quadratic form of the summed output-change signature; with --predictor_source "
                        "also a candidate of the predictor's prior): two forwards per layer "
                        "and option first (autobuild/output_shift.py); on mnist_unet's measured configurations the "
                        "trees' held-out SRCC rose from 0.77 to 0.85")
    return p


def predictor_source(family, size: str, workdir: Path, log: Callable[[str], None] = print,
                     signature: Mapping | None = None) -> Callable:
    """``extra_source`` of the trained predictor: trained (quick settings) on the configurations measured so
    far, its node- and block-level one-shot configurations at every budget. ``signature``: the output-change
    table, which lets its prior be ``ridge_shift`` (autobuild.train.fit_prior) where that validates better."""
    def source(records: Sequence[Mapping], budgets: Sequence[float]):
        from .configs import BudgetError as _BudgetError, build_config
        from .dag import family_dag, units
        from .pipeline import QUICK
        from .train import TrainOptions, train_predictor

        graph = family_dag(family, size, "cpu" if size == "tiny" else "meta")
        out = workdir / "predictor"
        metrics = train_predictor(list(records), graph, "-1*FID-GT-1k", folds=QUICK.folds, epochs=QUICK.epochs,
                                  batch_size=QUICK.batch_size, out_dir=out, units=units(graph, "block"), log=None,
                                  options=TrainOptions(hidden=QUICK.hidden, lr=QUICK.lr, patience=QUICK.patience,
                                                       shift_signature=signature))
        log(f"  predictor on {len(records)} configurations: held-out SRCC {metrics['srcc_mean']:.3f}")
        table = OptionTable.from_records(records, family.fp_prec)
        proposals = []
        for level in ("node", "block"):
            for budget in budgets:
                try:
                    built = build_config(out, table, family, budget, level, out_dir=workdir / "configs", size=size,
                                         name=f"predictor_{level}_{int(round(budget * 10))}")
                except _BudgetError:
                    continue
                proposals.append((f"predictor_{level}", budget, built.config))
        return proposals

    return source


def run_optimize(args, log: Callable[[str], None] = print) -> dict:
    from multiquant.config import save_config
    from multiquant.families import get_family
    from multiquant.metrics.metric import metric_label
    from multiquant.sensitivity import setup_protocol
    from multiquant.utils import json_default, write_text_atomic

    from .configs import DEFAULT_SEARCH_BUDGETS, budgets_or_default, config_name, parse_budgets

    started = time.perf_counter()
    out = Path(args.out)
    requested = parse_budgets(args.budgets)
    family = get_family(args.model)
    setup = measured_setup(family, out, pretrained=args.pretrained, tiny=args.tiny, device=args.device, mq=args.mq,
                           num_images=args.num_images, image_seed=args.image_seed, confirm_seed=args.confirm_seed,
                           act_bits=act_bits_arg(args), log=log)
    scorer, settings, ties, space, measure, device = (setup.scorer, setup.settings, setup.ties, setup.space,
                                                      setup.measure, setup.device)
    # the measurement stores are keyed by configuration, not by budget: a run at other budgets reuses them
    budgets = budgets_or_default(requested, scorer.mq, DEFAULT_SEARCH_BUDGETS, log)
    measure_layers = None
    if args.sweep_images:
        protocol, psettings = setup_protocol(family, pretrained=args.pretrained, tiny=args.tiny, device=device,
                                             num_prompts=args.sweep_images, image_seed=args.image_seed,
                                             pixel_features=args.tiny, fid_against="fp", log=log)
        measure_layers = sweep_measure(protocol, psettings, out / "sweeps", space, settings["num_images"], log)
    shifts = signature = None
    if args.output_shifts:
        from .output_shift import shift_tables

        shifts, signature, _ = shift_tables(scorer.denoiser, scorer.mq, family, seed=args.seed, log=log)
    extra = (predictor_source(family, "tiny" if args.tiny else "full", out, log, signature=signature)
             if args.predictor_source else None)
    result = optimize(scorer.mq, budgets, measure, measure_layers, ties, args.max_evaluations, args.per_budget,
                      args.confirm_top, args.seed, args.key, extra_source=extra, shifts=shifts, signature=signature,
                      log=log)
    for budget, best in result["best"].items():
        if best is not None:
            path = save_config(best["config"], out / "configs" / f"{config_name(family.name, float(budget))}_optimize.pkl")
            best["config_path"] = str(path)
            log(f"budget {budget}: {metric_label(scorer.metric, args.key)} {best['fid']:.2f} (confirm {best['fid_confirm']:.2f}) at "
                f"{best['avg_bits']:.3f} bits, from {best['source']} -> {path}")
    result.update(model=family.name, protocol=settings, device=device, seconds=time.perf_counter() - started,
                  scored_this_run=measure.scored)
    path = write_text_atomic(out / "optimize.json", json.dumps(result, indent=1, default=json_default))
    log(f"wrote {path}: {result['evaluations']:.1f} full-protocol evaluations")
    return result
