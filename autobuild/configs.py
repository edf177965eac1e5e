"""Quantization configurations under an explicit bit budget, from the predictor's unit scores.

The reference has no budget: its configurations take every unit's top-1 variant and their bit width just
happens (docs/design.md §6). Here a target average precision ``B`` is a constraint:

    maximise  sum over units u of score(u, v_u)      (v_u: the variant chosen for unit u)
    subject to  avg_bits = fp_prec * sum(quant_bytes) / fp_bytes <= B

with ``quant_bytes`` of a variant = the bytes of its layers' chosen options, tied copies included (they
follow their canonical layer, and ``avg_bits`` counts every copy, as everywhere else). At block level the
choices are the units' variants, at node level the layers' options. This is a multiple-choice knapsack;
it is solved exactly by ``scipy.optimize.milp`` (HiGHS, relative gap 0) after dropping dominated variants
(another variant of the same unit is no larger and scores at least as well), which cannot change the
optimum and leaves a few hundred choices per unit at most.

``build_config`` writes ``quant_configs/<model>_<round(10*B)>.pkl`` (the reference form ``{layer:
"method-bits"}``) and ``.json``; ``pareto_front`` sweeps budgets into a front (predicted score vs avg_bits).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

from multiquant import knapsack
from multiquant.cli_flags import add_model_flags
from multiquant.errors import InputError, MissingFileError
from multiquant.knapsack import BudgetError, pareto_prune
from multiquant.options import OptionTable, avg_bits_of, option_of, size_budget
from multiquant.utils import progress_line

from .scores import UnitScoreSet

__all__ = ["BudgetError", "Knapsack", "KnapsackSolution", "BuiltConfig", "knapsack_from_scores", "solve_knapsack",
           "pareto_prune", "config_for_budget", "score_config", "solution_config", "predictor_scores", "build_config",
           "pareto_front", "plot_pareto", "config_name",
           "add_build_config_arguments", "predictor_family", "run_build_config",
           "default_table_source", "DEFAULT_PARETO_BUDGETS", "DEFAULT_SEARCH_BUDGETS", "budgets_help",
           "default_budgets", "parse_budgets", "budgets_or_default"]

DEFAULT_PARETO_BUDGETS = tuple(round(3.3 + 0.1 * i, 1) for i in range(10))  # 3.3 .. 4.2: report, build-config
DEFAULT_SEARCH_BUDGETS = (3.3, 3.5, 3.7, 3.9)  # optimize, search


def budgets_help(paper: Sequence[float]) -> str:
    """The ``--budgets`` help of a command whose default budgets are ``paper`` (the rule of :func:`default_budgets`)."""
    return (f"comma list of average-bit budgets. Default: the paper's {','.join(f'{b:g}' for b in paper)} when this "
            "model reaches all of them (between its cheapest and its dearest configuration); else those bits per "
            "weight priced with this model's tables: b bits lies between its cheapest all-floor(b)-bit and "
            "all-ceil(b)-bit configurations as b lies between the two widths (a small model's per-channel tables "
            "cost far more than 3-4 bits). The line 'budgets ...' says which were chosen and why")


def default_budgets(table, paper: Sequence[float]) -> tuple[list[float], str]:
    """The budgets of a command given none (the rule :func:`budgets_help` states) and why, in a few words.

    The paper's budgets are bits per weight on models whose quantization tables cost a fraction of a bit; a small
    model's per-channel codebooks can cost more than its weights, so there every configuration lies far above them.
    Each paper budget b is then priced on this model: linear between its cheapest configurations with every layer at
    floor(b) and at ceil(b) bits (past the widths along the nearest pair), within its cheapest..dearest one."""
    table = OptionTable.from_source(table)
    lo, hi = table.min_avg_bits(), table.max_avg_bits()
    if lo <= min(paper) + 1e-9 and max(paper) <= hi + 1e-9:  # the testbeds: today's budgets, unchanged
        return [float(b) for b in paper], f"the paper's, all within this model's {lo:.2f}-{hi:.2f} avg bits"
    widths = table.widths
    anchors = [table.min_avg_bits(w) for w in widths]

    def priced(bits: float) -> float:
        if len(widths) == 1:
            return bits * anchors[0] / widths[0]
        i = int(np.clip(np.searchsorted(widths, bits) - 1, 0, len(widths) - 2))
        return anchors[i] + (bits - widths[i]) * (anchors[i + 1] - anchors[i]) / (widths[i + 1] - widths[i])

    at_least = math.ceil(lo * 100 - 1e-6) / 100  # two decimals, never below the cheapest configuration
    budgets = sorted({max(round(min(max(priced(b), lo), hi), 2), at_least) for b in paper})
    cheapest = ", ".join(f"all-{w}-bit {a:.2f}" for w, a in zip(widths, anchors))
    return budgets, (f"this model's configurations cost {lo:.2f}-{hi:.2f} avg bits, which the paper's "
                     f"{min(paper):g}-{max(paper):g} do not fit: those bits per weight priced with its tables "
                     f"(cheapest {cheapest})")


def parse_budgets(text: str | None) -> list[float] | None:
    """``--budgets`` as a list of floats; None when the flag was not given (:func:`budgets_or_default`)."""
    if text is None:
        return None
    try:
        budgets = [float(b) for b in str(text).split(",") if b.strip()]
    except ValueError:
        budgets = []
    if not budgets:
        raise InputError(f"--budgets {text!r}: expected a comma list of average bits, e.g. --budgets 3.5,3.9")
    return budgets


def budgets_or_default(budgets: Sequence[float] | None, table, paper: Sequence[float],
                       log: Callable[[str], None] | None = print) -> list[float]:
    """``budgets`` exactly as given, or (None) :func:`default_budgets` of ``table``, said in one line."""
    if budgets is not None:
        return [float(b) for b in budgets]
    chosen, why = default_budgets(table, paper)
    if log:
        log(f"budgets {', '.join(f'{b:g}' for b in chosen)} avg bits (no --budgets given: {why})")
    return chosen




# ------------------------------------------------------------------------------------------ the problem
@dataclass
class Knapsack:
    """One group per unit: its variants' costs (bytes) and values (predicted scores)."""

    costs: list[np.ndarray]  # int64 [M_u] bytes, tied copies included
    values: list[np.ndarray]  # float64 [M_u]
    fp_bytes: int
    fp_prec: int

    def capacity(self, avg_bits: float) -> int:
        """Largest total size (bytes) with ``fp_prec * size / fp_bytes <= avg_bits``."""
        return size_budget(avg_bits, self.fp_bytes, self.fp_prec)

    def avg_bits(self, size: int) -> float:
        return avg_bits_of(size, self.fp_bytes, self.fp_prec)

    @property
    def min_bytes(self) -> int:
        return int(sum(int(c.min()) for c in self.costs))

    @property
    def max_score_bytes(self) -> int:
        """Size of the unconstrained optimum (every unit's top variant, the smallest on ties)."""
        return int(sum(int(c[_best_index(c, v)]) for c, v in zip(self.costs, self.values)))


@dataclass
class KnapsackSolution:
    choice: list[int]  # chosen variant row per unit
    size: int  # bytes
    avg_bits: float
    score: float
    budget: float
    status: str


def _best_index(costs: np.ndarray, values: np.ndarray) -> int:
    top = np.flatnonzero(values == values.max())
    return int(top[np.argmin(costs[top])])


def solve_knapsack(problem: Knapsack, avg_bits: float, time_limit: float | None = None) -> KnapsackSolution:
    """Exact multiple-choice knapsack (:func:`multiquant.knapsack.solve_exact`). Raises :class:`BudgetError`
    when ``avg_bits`` is below the all-minimum."""
    capacity = problem.capacity(avg_bits)
    if capacity < problem.min_bytes:
        lowest = problem.avg_bits(problem.min_bytes)
        raise BudgetError(f"a budget of {avg_bits:.4f} average bits is below the smallest achievable "
                          f"{lowest:.4f} (every layer at its cheapest option, overhead included): "
                          f"ask for at least {math.ceil(lowest * 1000) / 1000:.3f}")
    solution = knapsack.solve_exact(problem.values, problem.costs, float(capacity), time_limit=time_limit)
    return _solution(problem, solution.choice, avg_bits, solution.status)


def _solution(problem: Knapsack, choice: list[int], budget: float, status: str) -> KnapsackSolution:
    size = int(sum(int(c[i]) for c, i in zip(problem.costs, choice)))
    score = float(sum(float(v[i]) for v, i in zip(problem.values, choice)))
    return KnapsackSolution(choice=choice, size=size, avg_bits=problem.avg_bits(size), score=score, budget=budget,
                            status=str(status))


# ------------------------------------------------------------------------------------------ scores -> problem
def _layer_cost_lookup(table: OptionTable, key: str, aliases: Sequence[str], options: Sequence[str]) -> np.ndarray:
    """Bytes of each option for a layer and its tied copies (each copy is stored and counted)."""
    return np.array([sum(table.quant_bytes(k, o) for k in (key, *aliases)) for o in options], dtype=np.int64)


def _check_coverage(scores: UnitScoreSet, table: OptionTable) -> None:
    covered = {k for u in scores.units for key, al in zip(u.keys, u.aliases) for k in (key, *al)}
    missing = [k for k in table.keys if k not in covered]
    extra = [k for k in covered if k not in table.table]
    if missing or extra:
        raise ValueError(f"unit scores and option table disagree: {len(missing)} table layer(s) in no unit "
                         f"(e.g. {missing[:1]}), {len(extra)} unit layer(s) not in the table (e.g. {extra[:1]}): "
                         f"score the units of this model's graph with this model's multiquantizer")


def knapsack_from_scores(scores: UnitScoreSet, table) -> Knapsack:
    """Costs and values of every variant of every unit (node or block level)."""
    table = OptionTable.from_source(table)
    _check_coverage(scores, table)
    costs, values = [], []
    for unit in scores.units:
        per_layer = [_layer_cost_lookup(table, k, a, scores.options) for k, a in zip(unit.keys, unit.aliases)]
        rows = unit.variants.astype(np.int64)
        cost = np.zeros(len(rows), dtype=np.int64)
        for column, lookup in enumerate(per_layer):
            cost += lookup[rows[:, column]]
        costs.append(cost)
        values.append(unit.scores.astype(np.float64))
    return Knapsack(costs, values, table.fp_bytes, table.fp_prec)


def solution_config(scores: UnitScoreSet, table: OptionTable, choice: Sequence[int]) -> dict[str, str]:
    """``{layer: "method-bits"}`` in the table's layer order; tied copies take their canonical layer's option."""
    chosen = {}
    for unit, row in zip(scores.units, choice):
        for key, aliases, index in zip(unit.keys, unit.aliases, unit.variants[row]):
            for k in (key, *aliases):
                chosen[k] = scores.options[int(index)]
    return {k: chosen[k] for k in table.keys}


def score_config(scores: UnitScoreSet, config: Mapping[str, str]) -> float:
    """Predicted score of any full configuration: the sum of its units' variant scores (every variant of
    every unit is stored, in ``itertools.product`` order). ``config`` values: options or cache entries."""
    index = {o: i for i, o in enumerate(scores.options)}
    k = len(scores.options)
    total = 0.0
    for unit in scores.units:
        row = 0
        for key in unit.keys:
            option = option_of(config[key])
            if option not in index:
                raise ValueError(f"layer {key!r} uses {option!r}, which the unit scores do not cover")
            row = row * k + index[option]
        if len(unit.scores) != k ** len(unit.keys):
            raise ValueError(f"unit {unit.name} does not store every variant; cannot score arbitrary configs")
        total += float(unit.scores[row])
    return total


def config_for_budget(scores: UnitScoreSet, table, avg_bits: float) -> tuple[dict[str, str], KnapsackSolution]:
    """The best-scoring configuration with average precision <= ``avg_bits`` (no files written)."""
    table = OptionTable.from_source(table)
    solution = solve_knapsack(knapsack_from_scores(scores, table), avg_bits)
    config = solution_config(scores, table, solution.choice)
    assert abs(table.avg_bits(config) - solution.avg_bits) < 1e-9, "knapsack sizes disagree with the table"
    return config, solution


# ------------------------------------------------------------------------------------------ files
def config_name(model: str, avg_bits: float) -> str:
    """``pixart_alpha_35`` for 3.5 bits (the released names: bits x 10, rounded)."""
    return f"{model}_{int(round(avg_bits * 10))}"


@dataclass
class BuiltConfig:
    config: dict  # {layer: "method-bits"}, tied copies included
    budget: float
    avg_bits: float
    predicted_score: float
    level: str
    path: Path | None = None
    info: dict = field(default_factory=dict)

    def summary(self) -> dict:
        return {"budget": self.budget, "avg_bits": self.avg_bits, "predicted_score": self.predicted_score,
                "level": self.level, "config_path": str(self.path) if self.path else None, **self.info}


def _resolve_family(family, ensemble_template_family: str | None):
    from multiquant.families import FamilySpec, get_family

    if isinstance(family, FamilySpec):
        return family
    name = family or ensemble_template_family
    if not name:
        raise InputError("the model family is unknown: pass --model")
    return get_family(name)


def predictor_family(predictor_dir: Path) -> str | None:
    from .ensemble import ENSEMBLE_CONFIG

    path = predictor_dir / ENSEMBLE_CONFIG
    if not path.exists():
        raise MissingFileError(f"{predictor_dir} holds no trained predictor ({ENSEMBLE_CONFIG} missing): train "
                                f"one with `qua2sedimo train-predictor --cache ... --out {predictor_dir}`")
    from multiquant.utils import read_json

    config = read_json(path, "predictor file")
    template = config.get("template") if isinstance(config, dict) else None
    if not isinstance(template, dict):
        raise InputError(f"{path} is not a predictor ensemble file (no 'template'): train one with "
                         f"`qua2sedimo train-predictor --cache ... --out {predictor_dir}`")
    return template.get("family")


def predictor_scores(predictor_dir, table, family=None, level: str = "block", size: str = "full",
                     log: Callable[[str], None] | None = None, graph=None) -> tuple[UnitScoreSet, OptionTable, object]:
    """(unit scores, option table, family) of a trained predictor (scores cached beside it). ``graph``: the
    family's DAG when the caller has it already (else traced: ``family_dag(family, size)``)."""
    from .dag import family_dag
    from .scores import unit_scores_for

    predictor_dir = Path(predictor_dir)
    spec = _resolve_family(family, predictor_family(predictor_dir))
    table = OptionTable.from_source(table, fp_prec=spec.fp_prec)
    if graph is None:
        graph = family_dag(spec, size=size, device="meta" if size == "full" else "cpu")
    return unit_scores_for(predictor_dir, graph, table, level, log=log), table, spec


def build_config(predictor_dir, table, family=None, avg_bits: float = 3.5, level: str = "block",
                 out_dir: str | os.PathLike | None = None, name: str | None = None, size: str = "full",
                 scores: UnitScoreSet | None = None, log: Callable[[str], None] | None = None) -> BuiltConfig:
    """Build and write the best predicted configuration at ``avg_bits`` (overhead included).

    ``table``: a ``MultiQuantizer``, its path, an exported option table, or the scored records.
    Writes ``<out_dir>/<name>.pkl`` (reference form) and ``.json``; ``out_dir`` defaults to
    ``constants.QUANT_CONFIG_DIR`` (``quant_configs/``), ``name`` to ``<model>_<round(10*avg_bits)>``."""
    from multiquant.config import save_config

    if scores is None:
        scores, table, spec = predictor_scores(predictor_dir, table, family, level, size, log)
    else:
        spec = _resolve_family(family, scores.meta.get("family"))
        table = OptionTable.from_source(table, fp_prec=spec.fp_prec)
    config, solution = config_for_budget(scores, table, avg_bits)
    path = Path(out_dir or _default_config_dir()) / f"{name or config_name(spec.name, avg_bits)}.pkl"
    save_config(config, path, origin=config_origin("built", spec.name, avg_bits, solution.avg_bits,
                                                   predictor=str(predictor_dir) if predictor_dir else None,
                                                   level=scores.level, target=scores.meta.get("target"),
                                                   predicted_score=solution.score))
    if log:
        log(f"{path}: {solution.avg_bits:.4f} avg bits (budget {avg_bits}), predicted score {solution.score:.3f}")
    return BuiltConfig(config=config, budget=float(avg_bits), avg_bits=solution.avg_bits,
                       predicted_score=solution.score, level=scores.level, path=path,
                       info={"solver": solution.status, "model": spec.name})


def config_origin(kind: str, model: str, budget: float | None, avg_bits: float | None, **details) -> dict:
    """What a configuration file records about where it came from (``kind``: ``built`` = predictor + knapsack,
    ``search``, ``greedy``, ...); ``report --scored`` classifies by it."""
    return {"kind": kind, "model": model, "budget": None if budget is None else float(budget),
            "avg_bits": None if avg_bits is None else float(avg_bits), "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            **details}


def _default_config_dir() -> Path:
    from multiquant.paths import constants

    return Path(constants.QUANT_CONFIG_DIR)


# ------------------------------------------------------------------------------------------ Pareto front
def pareto_front(scores: UnitScoreSet, table, budgets: Iterable[float] | None = None,
                 model: str | None = None, out_dir: str | os.PathLike | None = None,
                 log: Callable[[str], None] | None = None) -> list[dict]:
    """Solve every budget (None: :func:`default_budgets` of the table); with ``out_dir`` and ``model`` also write
    each configuration. Budgets below the all-minimum are skipped (logged). Returns ``[{budget, avg_bits,
    predicted_score, config_path}]``."""
    from multiquant.config import save_config

    table = OptionTable.from_source(table)
    budgets = budgets_or_default(None if budgets is None else list(budgets), table, DEFAULT_PARETO_BUDGETS, log)
    problem = knapsack_from_scores(scores, table)
    front, previous, started = [], None, time.perf_counter()
    budgets = sorted(float(b) for b in budgets)
    for done, budget in enumerate(budgets, 1):
        try:
            solution = solve_knapsack(problem, budget)
        except BudgetError as err:
            if log:
                log(f"  skipped {budget}: {err}")
            continue
        if previous is not None and solution.score < previous.score:  # a larger budget keeps the smaller's choice
            solution = KnapsackSolution(previous.choice, previous.size, previous.avg_bits, previous.score, budget,
                                        f"kept the {previous.budget:g}-bit choice ({solution.status} scored lower)")
        previous = solution
        path = None
        if out_dir is not None and model:
            config = solution_config(scores, table, solution.choice)
            path = save_config(config, Path(out_dir) / f"{config_name(model, budget)}.pkl",
                               origin=config_origin("built", model, budget, solution.avg_bits, level=scores.level,
                                                    target=scores.meta.get("target"),
                                                    predicted_score=solution.score))
        front.append({"budget": budget, "avg_bits": solution.avg_bits, "predicted_score": solution.score,
                      "config_path": str(path) if path else None, "level": scores.level})
        if log:
            log(f"  budget {budget:.2f}: {solution.avg_bits:.4f} avg bits, predicted score {solution.score:.3f} "
                f"({progress_line('budgets', done, len(budgets), time.perf_counter() - started, 'budget')})")
    return front


def _point_labels(front: Sequence[Mapping]) -> list[tuple[str, tuple[float, float]]]:
    """One label per distinct point: budgets that give the same configuration (the budget no longer binds)
    share it, e.g. ``B=4.1-4.2``."""
    groups: list[list[Mapping]] = []
    for p in sorted(front, key=lambda p: p["budget"]):
        if groups and (groups[-1][0]["avg_bits"], groups[-1][0]["predicted_score"]) == (p["avg_bits"],
                                                                                      p["predicted_score"]):
            groups[-1].append(p)
        else:
            groups.append([p])
    labels = []
    for g in groups:
        text = f"B={g[0]['budget']:g}" + (f"-{g[-1]['budget']:g}" if len(g) > 1 else "")
        labels.append((text, (g[0]["avg_bits"], g[0]["predicted_score"])))
    return labels


def plot_pareto(front: Sequence[Mapping], path: str | os.PathLike, title: str = "Predicted Pareto front") -> Path:
    """Predicted score vs avg_bits of a swept front (PNG)."""
    from multiquant.utils import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    x = [p["avg_bits"] for p in front]
    y = [p["predicted_score"] for p in front]
    ax.plot(x, y, "o-", color="tab:blue", label="knapsack optimum")
    for i, (label, (bits, score)) in enumerate(_point_labels(front)):  # alternate sides: neighbours may be close
        above = i % 2 == 0
        ax.annotate(label, (bits, score), textcoords="offset points", xytext=(-8, 7) if above else (7, -12),
                    ha="right" if above else "left", fontsize=8, color="0.35")
    ax.set_xlabel("average bits (overhead included)")
    ax.set_ylabel("predicted score (higher = better)")
    ax.margins(x=0.08, y=0.12)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    return save_figure(fig, path)


# ------------------------------------------------------------------------------------------ CLI
def add_build_config_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``build-config`` flags (for a sub-parser of the ``qua2sedimo`` command)."""
    p.add_argument("--predictor", required=True, help="trained predictor directory (train-predictor --out)")
    p.add_argument("--mq", default=None, help="multiquantizer checkpoint or exported option table "
                                              "(default multiquantizers/<model>_mq.safetensors)")
    p.add_argument("--cache", default=None, help="quant_cache.pkl to take the option table from when there is "
                                                 "no multiquantizer")
    add_model_flags(p, required=False, weights=False, device=False, model_help="model family (default: the "
                    "predictor's)", tiny_help="= --size tiny")
    p.add_argument("--avg_bits", type=float, default=None, help="budget: average bits incl. overhead, e.g. 3.5")
    p.add_argument("--pareto", action="store_true", help="sweep --budgets into a front (JSON + PNG + configs)")
    p.add_argument("--budgets", default=None, help="with --pareto: " + budgets_help(DEFAULT_PARETO_BUDGETS))
    p.add_argument("--level", choices=("block", "node"), default="block",
                   help="unit level of the scores: block (default) or node (one unit per layer)")
    p.add_argument("--size", choices=("full", "tiny"), default="full", help="denoiser size the predictor's DAG "
                                                                          "was traced from")
    p.add_argument("--out", default=None, help="output directory (default quant_configs/)")
    p.add_argument("--name", default=None, help="file stem (default <model>_<round(10*avg_bits)>)")
    return p


def default_table_source(model: str, mq: str | None, cache: str | None):
    """--mq, else the family's multiquantizer, else the table collected from --cache."""
    if mq:
        return mq
    from multiquant.paths import multiquantizer_path

    path = multiquantizer_path(f"{model}_mq.safetensors")
    if path.exists():
        return path
    if cache:
        from multiquant.store import load_quant_cache

        return load_quant_cache(cache)
    raise MissingFileError(f"no option table: {path} does not exist. Pass --mq (the multiquantizer) or --cache "
                            f"(a quant_cache.pkl whose records use every option of every layer)")


def run_build_config(args) -> int:
    if args.avg_bits is None and not args.pareto:
        raise InputError("give a budget (--avg_bits 3.5) or --pareto")
    requested = parse_budgets(args.budgets)  # a typo fails before the scores are computed
    model = args.model or predictor_family(Path(args.predictor))
    source = default_table_source(model, args.mq, args.cache)
    target = json.loads((Path(args.predictor) / "ensemble.json").read_text()).get("target")
    print(f"build-config: {args.level}-level unit scores of the predictor in {args.predictor} (target {target!r}); "
          f"the other level: --level {'node' if args.level == 'block' else 'block'}")
    size = "tiny" if args.tiny else args.size
    scores, table, spec = predictor_scores(args.predictor, source, model, args.level, size, log=print)
    out_dir = Path(args.out) if args.out else _default_config_dir()
    if args.avg_bits is not None:
        build_config(args.predictor, table, spec, args.avg_bits, args.level, out_dir, args.name, scores=scores,
                     log=print)
    if args.pareto:
        budgets = budgets_or_default(requested, table, DEFAULT_PARETO_BUDGETS)
        front = pareto_front(scores, table, budgets, model=spec.name, out_dir=out_dir, log=print)
        stem = out_dir / f"{spec.name}_pareto_{args.level}"
        from multiquant.utils import atomic_path

        with atomic_path(stem.with_suffix(".json")) as tmp:
            tmp.write_text(json.dumps({"model": spec.name, "level": args.level, "predictor": str(args.predictor),
                                       "front": front}, indent=1))
        plot_pareto(front, stem.with_suffix(".png"), title=f"{spec.name}: predicted Pareto front ({args.level} level)")
        print(f"wrote {stem}.json and {stem}.png")
    return 0
