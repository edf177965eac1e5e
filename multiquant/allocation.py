"""Budgeted mixed precision from per-layer sensitivities: a multiple-choice knapsack over bit widths.

Every *search layer* (a canonical layer together with its tied copies, which must share one choice) is an
item; its choices are bit widths. Picking ``b`` bits for layer ``l`` costs ``cost[l, b]`` and is worth
``value[l, b]``; the total cost must stay within the budget.

The noise model (``--allocator noise``; the value model of the rest of the system): a layer measured at sensitivity ``s`` in [0, 1] degrades the
output in proportion to its quantization-noise amplitude, which halves with every extra bit (step size
``~ 2^-b``). Relative to the lowest width ``b0`` on offer, the degradation *avoided* by ``b`` bits is

    value(l, b) = s_l * (1 - 2^(b0 - b))           (0 at b0; -> s_l as b grows; fp16 counts as 16 bits)

so maximising the total value minimises the predicted total degradation ``sum_l s_l * 2^(b0 - b_l)``.

The seed allocator as its document describes it (``--allocator documented``, the default of the BOPs form)
values an upgrade by the layer's sensitivity alone: every layer starts at 4 bits (the lowest width on offer),
the efficiency of an upgrade to the next width is ``s_l / cost added``, weighted x0.2 for 8 -> 16, and the most
efficient upgrade that fits is taken until none fits (:func:`solve_documented`). As a knapsack its values are
the weighted steps summed: ``v(4) = 0, v(8) = s, v(16) = 1.2 s``; ``--solver exact`` gives their optimum.

Costs (one unit per mode):

* ``bops``: ``MACs x weight bits x activation bits`` per layer (the weight GEMMs of one denoiser forward);
  budget = X x (every layer at 16 bits, W16A16). The activation bits of the cost follow ``--act_cost``:
  ``weight`` (A = W: all-4-bit costs 1/16 of the maximum, the numbers of the seed document; the documented
  allocator's default), ``plus4`` (A = min(W + 4, 16), the activations its ``quantization_config`` names:
  all-4-bit = 1/8) or ``a16`` (weight-only quantization, A16: all-4-bit = 1/4; the noise model's default).
* ``bytes``: the quantized bytes of :meth:`multiquant.options.Option.nbytes` (codes + overhead; fp16 =
  the FP bytes), reported as average bits ``fp_prec x bytes / fp_bytes``, the avg_bits the rest of the
  system uses; budget = B average bits.

Solvers (all of them :mod:`multiquant.knapsack`): :func:`solve_greedy` (bang for buck: start at the lowest
width everywhere, repeatedly take the upgrade with the largest value gained per unit of cost added that still
fits, stop when none fits; plus the single-upgrade safeguard), :func:`solve_documented` (the document's greedy:
one width at a time, no safeguard) and :func:`solve_exact` (the same problem as a MILP, scipy's HiGHS), the
yardstick for the greedy ones.
"""
from __future__ import annotations

import json
import math
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import knapsack
from .cli_flags import add_model_flags
from .errors import InputError
from .knapsack import BudgetError
from .options import DEFAULT_METHOD, FP_BITS, MAX_BITS, METHODS, MIN_BITS, Option
from .utils import read_json

__all__ = ["Knapsack", "Allocation", "BudgetError", "value_table", "documented_value_table", "act_bits_of",
           "bops_cost_table", "bytes_cost_table", "solve_greedy", "solve_documented", "solve_exact", "LayerItem",
           "load_sensitivity_file", "load_flops_file", "search_items", "quantization_config", "optimize",
           "cmd_optimize_mixed_precision", "add_optimize_parser", "ALLOCATORS", "ACT_COST_RULES"]

ACT_BITS = 16
VALUE_MODEL = "value(l, b) = s_l * (1 - 2^(b_min - b)): degradation avoided, noise amplitude ~ 2^-b"
DOCUMENTED_STEP_WEIGHTS = {(8, 16): 0.2}  # the seed document: 8 -> 16 upgrades count a fifth
DOCUMENTED_VALUE_MODEL = ("efficiency = s_l / cost added per upgrade to the next width, x0.2 for 8 -> 16 "
                          "(knapsack values v(b_k) = sum of s_l x step weight up to b_k)")
ALLOCATORS = ("documented", "noise")
ACT_COST_RULES = {"weight": "A = W: all-4-bit = 1/16 of W16A16", "plus4": "A = min(W + 4, 16)",
                  "a16": "A = 16: weight-only"}
DEFAULT_ACT_COST = {"documented": "weight", "noise": "a16"}
DEFAULT_BUDGET_MULTIPLIER = 0.5




# ------------------------------------------------------------------------------------------ problem
@dataclass(frozen=True)
class Knapsack:
    """A multiple-choice knapsack: pick exactly one choice per item, total cost <= budget, max value.

    ``value`` and ``cost`` are ``[items, choices]``; ``bits`` labels the choices (ascending)."""

    names: tuple[str, ...]
    bits: tuple[int, ...]
    value: np.ndarray
    cost: np.ndarray
    budget: float

    def __post_init__(self):
        shape = (len(self.names), len(self.bits))
        if np.shape(self.value) != shape or np.shape(self.cost) != shape:
            raise ValueError(f"value {np.shape(self.value)} and cost {np.shape(self.cost)} must both be {shape}")
        if list(self.bits) != sorted(set(self.bits)):
            raise ValueError(f"bit widths must be distinct and ascending, got {self.bits}")
        if not (np.isfinite(self.value).all() and np.isfinite(self.cost).all()):
            raise ValueError("value and cost must be finite")

    @property
    def min_cost(self) -> float:
        """Cheapest allocation (the lowest-cost choice of every item)."""
        return float(self.cost.min(axis=1).sum())

    @property
    def lowest_cost(self) -> float:
        """Cost of every item at its lowest bit width (the greedy start)."""
        return float(self.cost[:, 0].sum())

    @property
    def max_cost(self) -> float:
        """Cost of every item at its highest bit width."""
        return float(self.cost[:, -1].sum())

    def tolerance(self) -> float:
        # Costs are integers up to ~1e15; a relative slack absorbs float rounding of the budget product.
        return 1e-9 * max(abs(self.budget), 1.0)


@dataclass
class Allocation:
    """A solution: ``choice[l]`` indexes ``problem.bits``."""

    choice: np.ndarray
    value: float
    cost: float
    solver: str
    upgrades: list[dict] = field(default_factory=list)  # greedy trail, in order

    def bits_of(self, problem: Knapsack) -> dict[str, int]:
        return OrderedDict((name, problem.bits[k]) for name, k in zip(problem.names, self.choice))


def value_table(sensitivity, bits) -> np.ndarray:
    """``[items, choices]`` values ``s * (1 - 2^(b_min - b))`` (see the module doc)."""
    s = np.asarray(sensitivity, dtype=np.float64)
    if s.ndim != 1 or not np.isfinite(s).all() or (s < 0).any():
        raise ValueError("sensitivities must be a 1-D array of finite, non-negative numbers")
    b = np.asarray(bits, dtype=np.float64)
    return s[:, None] * (1.0 - np.exp2(b.min() - b))[None, :]


def documented_value_table(sensitivity, bits) -> np.ndarray:
    """``[items, choices]`` values of the documented allocator: the step to the next width gains ``s`` (x0.2
    for 8 -> 16), summed from the lowest width (0 there)."""
    s = np.asarray(sensitivity, dtype=np.float64)
    if s.ndim != 1 or not np.isfinite(s).all() or (s < 0).any():
        raise ValueError("sensitivities must be a 1-D array of finite, non-negative numbers")
    steps = [0.0] + [DOCUMENTED_STEP_WEIGHTS.get((a, b), 1.0) for a, b in zip(bits[:-1], bits[1:])]
    return s[:, None] * np.cumsum(steps)[None, :]


def act_bits_of(bits, rule: str | int = "a16") -> np.ndarray:
    """Activation bits that go with weight ``bits`` in the BOPs cost: ``weight`` (A = W), ``plus4``
    (min(W + 4, 16)), ``a16`` (16), or a fixed integer."""
    b = np.asarray(bits, dtype=np.int64)
    if isinstance(rule, (int, np.integer)) and not isinstance(rule, bool):
        return np.full_like(b, int(rule))
    if rule == "weight":
        return b.copy()
    if rule == "plus4":
        return np.minimum(b + 4, FP_BITS)
    if rule == "a16":
        return np.full_like(b, ACT_BITS)
    raise InputError(f"--act_cost must be one of {', '.join(ACT_COST_RULES)}, got {rule!r}")


def bops_cost_table(macs, bits, act_bits: int | str = ACT_BITS) -> np.ndarray:
    """``[items, choices]`` BOPs: MACs x weight bits x activation bits (``act_bits``: see :func:`act_bits_of`)."""
    m = np.asarray(macs, dtype=np.float64)
    return m[:, None] * (np.asarray(bits, dtype=np.float64) * act_bits_of(bits, act_bits))[None, :]


def quantization_config(bit_allocation: dict, method_of) -> dict:
    """``{layer: {method, weight_bits, act_bits}}`` with the document's ``act_bits = min(wbit + 4, 16)``;
    ``method_of(key)`` names the quantizer (16 bits: ``fp16``)."""
    return OrderedDict((key, {"method": "fp16" if b == FP_BITS else method_of(key), "weight_bits": int(b),
                              "act_bits": min(int(b) + 4, FP_BITS)}) for key, b in bit_allocation.items())


def bytes_cost_table(items: list["LayerItem"], bits, method: str, fp_prec: int) -> np.ndarray:
    """``[items, choices]`` quantized bytes (codes + overhead) summed over each item's copies; 16 = fp16."""
    rows = []
    for item in items:
        rows.append([sum(Option.of_bits(method, b).nbytes(numel, channels, fp_prec) for numel, channels in item.shapes)
                     for b in bits])
    return np.asarray(rows, dtype=np.float64).reshape(len(items), len(bits))


# ------------------------------------------------------------------------------------------- solvers
def _check_feasible(problem: Knapsack, start_cost: float, what: str) -> None:
    if problem.budget < 0 or not math.isfinite(problem.budget):
        raise BudgetError(f"budget must be a finite, non-negative number, got {problem.budget}")
    if start_cost > problem.budget + problem.tolerance():
        raise BudgetError(f"budget {problem.budget:.6g} is below {what} {start_cost:.6g}: no allocation fits. "
                          f"Fix: raise the budget to at least {start_cost:.6g} (or offer a lower bit width)")


def _allocation(problem: Knapsack, solution, solver: str | None = None) -> Allocation:
    rows = np.arange(len(problem.names))
    choice = np.asarray(solution.choice, dtype=np.int64)
    upgrades = []
    for step in solution.trail:
        entry = {"layer": step["group"], "from_bits": problem.bits[step["from"]], "to_bits": problem.bits[step["to"]],
                 "value_gain": step["value_gain"], "cost_added": step["cost_added"], "ratio": step["ratio"]}
        if "note" in step:
            entry["note"] = step["note"]
        upgrades.append(entry)
    return Allocation(choice, float(problem.value[rows, choice].sum()), float(problem.cost[rows, choice].sum()),
                      solver or solution.status, upgrades)


def solve_greedy(problem: Knapsack) -> Allocation:
    """Bang for buck (:func:`multiquant.knapsack.solve_greedy`): all items at the lowest width, then
    repeatedly the fitting upgrade with the highest value gained per cost added, plus the single-upgrade
    safeguard. Stops when no upgrade fits."""
    _check_feasible(problem, problem.lowest_cost, "the cost with every layer at the lowest bit width")
    return _allocation(problem, knapsack.solve_greedy(list(problem.value), list(problem.cost), problem.budget,
                                                      names=problem.names))


def solve_exact(problem: Knapsack, time_limit: float | None = 60.0) -> Allocation:
    """The optimum of the same knapsack (:func:`multiquant.knapsack.solve_exact`, scipy's HiGHS)."""
    _check_feasible(problem, problem.min_cost, "the cheapest allocation")
    solution = knapsack.solve_exact(list(problem.value), list(problem.cost), problem.budget, time_limit=time_limit)
    return _allocation(problem, solution, "exact" if solution.status == "unconstrained optimum" else None)


def solve_documented(problem: Knapsack) -> Allocation:
    """The seed document's greedy: every layer at the lowest width, then repeatedly the fitting upgrade to a
    layer's next width with the highest efficiency (value gained per cost added; the values of
    :func:`documented_value_table` carry the x0.2 of 8 -> 16), until none fits. No safeguard; an upgrade of a
    layer with sensitivity 0 is taken last, while the budget lasts (efficiency 0)."""
    _check_feasible(problem, problem.lowest_cost, "the cost with every layer at the lowest bit width")
    solution = knapsack.solve_greedy(list(problem.value), list(problem.cost), problem.budget, names=problem.names,
                                     safeguard=False, one_step=True, spend=True)
    return _allocation(problem, solution, "greedy (documented)")


SOLVERS = {"greedy": solve_greedy, "exact": solve_exact}


def solver_for(allocator: str, solver: str):
    """The solve function of ``--allocator`` x ``--solver`` (the exact MILP serves both value models)."""
    if allocator == "documented" and solver == "greedy":
        return solve_documented
    return SOLVERS[solver]


# ------------------------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class LayerItem:
    """One search layer: its key, the keys of its tied copies, and per copy (numel, channels) and MACs."""

    key: str
    copies: tuple[str, ...]  # every key sharing this choice, the canonical key first
    shapes: tuple[tuple[int, int], ...]  # (numel, channels) per copy
    macs: float  # summed over copies


def _read_json(path, what: str) -> dict:
    data = read_json(path, what)
    if not isinstance(data, dict):
        raise InputError(f"{what} {path} must hold a JSON object, not {type(data).__name__}")
    return data


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def load_sensitivity_file(path) -> dict:
    """A ``sensitivity_analysis_*.json`` from ``qua2sedimo sensitivity``: settings and per-layer scores."""
    data = _read_json(path, "sensitivity file")
    regenerate = "write one with `qua2sedimo sensitivity --model ...`"
    if not isinstance(data.get("settings"), dict) or not isinstance(data.get("layers"), list):
        raise InputError(f"{path} is not a sensitivity file (needs a 'settings' object and a 'layers' list): "
                         f"{regenerate}")
    if not isinstance(data["settings"].get("model"), str):
        raise InputError(f"{path}: settings.model must name the model family: {regenerate}")
    seen = set()
    for i, entry in enumerate(data["layers"]):
        if not isinstance(entry, dict) or not isinstance(entry.get("key"), str) or "sensitivity" not in entry:
            raise InputError(f"{path}: layers[{i}] needs a string 'key' and a 'sensitivity' "
                             f"(got {entry!r:.80}): {regenerate}")
        if not _is_number(entry["sensitivity"]):
            raise InputError(f"{path}: layer {entry['key']!r} has sensitivity {entry['sensitivity']!r}, not a finite "
                             f"number: re-run `qua2sedimo sensitivity` for it or remove the entry")
        if entry["key"] in seen:
            raise InputError(f"{path}: layer {entry['key']!r} is listed twice: keep one entry")
        seen.add(entry["key"])
    return data


def load_flops_file(path) -> dict:
    """A ``flops_analysis_*.json`` from ``qua2sedimo flops``: per-layer shapes and MACs."""
    data = _read_json(path, "FLOPs file")
    regenerate = "write one with `qua2sedimo flops --model ...`"
    if not isinstance(data.get("model"), str) or not isinstance(data.get("layers"), list):
        raise InputError(f"{path} is not a FLOPs file (needs 'model' and a 'layers' list): {regenerate}")
    seen = set()
    for i, entry in enumerate(data["layers"]):
        ok = (isinstance(entry, dict) and isinstance(entry.get("key"), str)
              and all(type(entry.get(k)) is int and entry[k] > 0 for k in ("numel", "channels"))
              and (entry.get("macs") is None or _is_number(entry["macs"]) and entry["macs"] >= 0)
              and (entry.get("tied_to") is None or isinstance(entry["tied_to"], str)))
        if not ok:
            raise InputError(f"{path}: layers[{i}] must have a string 'key', positive integer 'numel' and "
                             f"'channels', non-negative 'macs' (got {entry!r:.100}): {regenerate}")
        if entry["key"] in seen:
            raise InputError(f"{path}: layer {entry['key']!r} is listed twice: {regenerate}")
        seen.add(entry["key"])
    return data


def check_same_model(sens: dict, flops: dict, sens_path, flops_path, model: str | None = None) -> None:
    """Refuse a sensitivity file, FLOPs file and ``--model`` that describe different denoisers."""
    from .families import family_flag

    s_model, s_tiny = sens["settings"].get("model"), bool(sens["settings"].get("tiny", False))
    f_model, f_tiny = flops.get("model"), bool(flops.get("tiny", False))
    if model is not None and model != s_model:
        raise InputError(f"the sensitivity file {sens_path} is for model {s_model!r}, not {model!r}. "
                         f"Fix: pass that model's file (qua2sedimo sensitivity {family_flag(model)})")
    if (s_model, s_tiny) != (f_model, f_tiny):
        raise InputError(f"the sensitivity file {sens_path} is for {s_model!r}{' (tiny)' if s_tiny else ''} but the "
                         f"FLOPs file {flops_path} is for {f_model!r}{' (tiny)' if f_tiny else ''}. Fix: "
                         f"`qua2sedimo flops {family_flag(s_model)}{' --tiny' if s_tiny else ''}` and pass its file")
    flops_keys = {entry["key"] for entry in flops["layers"]}
    unknown = [e["key"] for e in sens["layers"] if e["key"] not in flops_keys]
    if unknown:
        raise InputError(f"{len(unknown)} layer(s) of the sensitivity file {sens_path} are not in the model of "
                         f"{flops_path} (e.g. {unknown[0]!r}): the files come from different architectures. "
                         f"Fix: regenerate one of them for the same model")


def search_items(flops: dict) -> list[LayerItem]:
    """Search layers (canonical + tied copies) in model order, from a FLOPs file's layer table."""
    groups: dict[str, list[dict]] = OrderedDict()
    for entry in flops["layers"]:
        groups.setdefault(entry.get("tied_to") or entry["key"], []).append(entry)
    items = []
    for key, entries in groups.items():
        entries.sort(key=lambda e: e["key"] != key)  # canonical first
        items.append(LayerItem(key, tuple(e["key"] for e in entries),
                               tuple((int(e["numel"]), int(e["channels"])) for e in entries),
                               float(sum(e.get("macs", 0) for e in entries))))
    return items


# ---------------------------------------------------------------------------------------- optimise
def parse_bits(text: str | None, default: tuple[int, ...]) -> tuple[int, ...]:
    if not text:
        return default
    try:
        bits = tuple(sorted({int(b) for b in str(text).split(",") if b.strip()}))
    except ValueError:
        raise InputError(f"--bits must be a comma list of integers like 4,8,16, got {text!r}") from None
    bad = [b for b in bits if not (MIN_BITS <= b <= MAX_BITS or b == FP_BITS)]
    if not bits or bad:
        raise InputError(f"--bits must list widths in 2..8 or 16 (fp16), got {text!r}")
    return bits


@dataclass
class Problem:
    """A knapsack together with how its numbers map to the report's unit."""

    knapsack: Knapsack
    items: list[LayerItem]
    fixed: list[LayerItem]  # unmeasured layers held at a fixed width (outside the knapsack)
    fixed_bits: int
    fixed_cost: float
    unit: str
    scale: float  # cost / scale = number in ``unit``
    reference_cost: float  # what the budget is relative to (every layer at 16 bits / the FP bytes)
    allocator: str = "noise"
    act_cost: str | None = None  # the BOPs cost's activation rule (None: the average-bits form)

    @property
    def min_cost(self) -> float:
        """Every search layer at its lowest width, the unmeasured ones at their fixed width."""
        return self.knapsack.lowest_cost + self.fixed_cost

    @property
    def max_cost(self) -> float:
        """Every layer of the model counted: the search layers at their highest width, the unmeasured ones at
        their fixed width."""
        return self.knapsack.max_cost + self.fixed_cost


def _unit_for(total: float) -> tuple[str, float]:
    for name, scale in (("TBOPs", 1e12), ("GBOPs", 1e9), ("MBOPs", 1e6), ("kBOPs", 1e3)):
        if total >= 10 * scale:
            return name, scale
    return "BOPs", 1.0


def build_problem(sens: dict, flops: dict, bits: tuple[int, ...], *, budget_multiplier: float | None = None,
                  budget_bits: float | None = None, method: str | None = None, unmeasured: str = "highest",
                  allocator: str = "noise", act_cost: str | None = None) -> Problem:
    """The knapsack of ``sens`` x ``flops`` for a BOPs budget (``budget_multiplier``) or an average-bits one;
    ``allocator``: ``noise`` (the noise-amplitude value model) or ``documented`` (the seed document's);
    ``act_cost``: the activation rule of the BOPs cost (default: the allocator's, see the module doc)."""
    if (budget_multiplier is None) == (budget_bits is None):
        raise InputError("give exactly one of --budget_multiplier X (BOPs) and --budget_bits B (average bits)")
    if allocator not in ALLOCATORS:
        raise InputError(f"--allocator must be one of {', '.join(ALLOCATORS)}, got {allocator!r}")
    if allocator == "documented" and budget_bits is not None:
        raise InputError("the documented allocator has a BOPs budget (--budget_multiplier X); for an average-bits "
                         "budget use --allocator noise")
    scores = {e["key"]: float(e["sensitivity"]) for e in sens["layers"]}
    all_items = search_items(flops)
    items = [it for it in all_items if it.key in scores]
    fixed = [it for it in all_items if it.key not in scores]
    if not items:
        raise InputError("no layer of the sensitivity file is a search layer of the model (are they tied copies?)")
    if unmeasured not in ("highest", "lowest"):
        raise InputError(f"unmeasured must be 'highest' or 'lowest', got {unmeasured!r}")
    fixed_bits = bits[-1] if unmeasured == "highest" else bits[0]
    values = (documented_value_table if allocator == "documented" else value_table)(
        [scores[it.key] for it in items], bits)
    if budget_multiplier is not None:
        if budget_multiplier < 0 or not math.isfinite(budget_multiplier):
            raise BudgetError(f"--budget_multiplier must be a finite number >= 0, got {budget_multiplier}")
        act_cost = act_cost or DEFAULT_ACT_COST[allocator]
        costs = bops_cost_table([it.macs for it in items], bits, act_cost)
        fixed_cost = float(bops_cost_table([it.macs for it in fixed], (fixed_bits,), act_cost).sum())
        reference = float(bops_cost_table([sum(it.macs for it in all_items)], (FP_BITS,), act_cost)[0, 0])
        if reference <= 0:
            raise InputError("the FLOPs file has no MACs for these layers: re-run `qua2sedimo flops`")
        budget = budget_multiplier * reference
        unit, scale = _unit_for(reference)
    else:
        if act_cost is not None:
            raise InputError("--act_cost sets the activation bits of the BOPs cost: it does not apply to "
                             "--budget_bits (the cost there is the weights' bytes)")
        method = method or sens["settings"].get("method", DEFAULT_METHOD)
        fp_prec = int(flops.get("fp_prec", 16))
        costs = bytes_cost_table(items, bits, method, fp_prec)
        fixed_cost = float(bytes_cost_table(fixed, (fixed_bits,), method, fp_prec).sum()) if fixed else 0.0
        reference = float(sum(int(n * fp_prec / 8) for it in all_items for n, _ in it.shapes))  # the FP bytes
        if not (budget_bits > 0 and math.isfinite(budget_bits)):
            raise BudgetError(f"--budget_bits must be a positive number of average bits, got {budget_bits}")
        budget = budget_bits * reference / fp_prec
        unit, scale = "avg bits", reference / fp_prec  # bytes / scale = average bits
    knapsack = Knapsack(tuple(it.key for it in items), bits, values, costs, budget - fixed_cost)
    return Problem(knapsack, items, fixed, fixed_bits, fixed_cost, unit, scale, reference, allocator, act_cost)


def check_budget(problem: Problem, solver: str = "greedy") -> None:
    """Refuse, in the report's unit, a budget below what the solver must start from."""
    ks = problem.knapsack
    floor = problem.min_cost if solver == "greedy" else ks.min_cost + problem.fixed_cost
    budget = ks.budget + problem.fixed_cost
    if floor > budget + ks.tolerance():
        held = (f" ({len(problem.fixed)} unmeasured layer(s) held at {problem.fixed_bits} bits included; "
                f"--unmeasured lowest lowers that)" if problem.fixed else "")
        raise BudgetError(f"budget {budget / problem.scale:.6g} {problem.unit} is below the cost with every layer at "
                          f"{ks.bits[0]} bits, {floor / problem.scale:.6g} {problem.unit}{held}: no allocation fits. "
                          f"Fix: raise the budget to at least that, or offer a lower bit width (--bits)")


def allocation_report(problem: Problem, alloc: Allocation, metadata: dict, method: str = DEFAULT_METHOD) -> dict:
    """The JSON written for an allocation: inputs, ``bit_allocation`` {layer key: bits}, ``quantization_config``
    {layer key: {method, weight_bits, act_bits}}, totals, trail."""
    ks, scale = problem.knapsack, problem.scale
    bits_by_key = OrderedDict()
    for item, k in zip(problem.items, alloc.choice):
        for key in item.copies:
            bits_by_key[key] = int(ks.bits[k])
    for item in problem.fixed:
        for key in item.copies:
            bits_by_key[key] = int(problem.fixed_bits)
    final = alloc.cost + problem.fixed_cost
    budget = ks.budget + problem.fixed_cost
    distribution = Counter(int(ks.bits[k]) for k in alloc.choice)
    distribution.update({int(problem.fixed_bits): len(problem.fixed)} if problem.fixed else {})
    totals = {
        "unit": problem.unit, "budget": budget / scale, "min_cost": problem.min_cost / scale,
        "max_cost": problem.max_cost / scale, "final_cost": final / scale,
        "reference_cost": problem.reference_cost / scale, "utilisation": final / budget if budget > 0 else None,
        "value": alloc.value, "max_value": float(ks.value[:, -1].sum()),
        "predicted_degradation": float(sum(ks.value[i, -1] - ks.value[i, k] for i, k in enumerate(alloc.choice))),
        "upgrades_taken": len(alloc.upgrades), "search_layers": len(problem.items),
        "unmeasured_layers": len(problem.fixed),
        "bit_distribution": {str(b): distribution.get(b, 0) for b in ks.bits},
        "raw_cost": {"budget": budget, "final_cost": final, "reference_cost": problem.reference_cost,
                     "min_cost": problem.min_cost, "max_cost": problem.max_cost},
    }
    # the trail in the report's unit: cost added in `unit`, ratio = value gained per `unit`
    upgrades = [dict(u, cost_added=u["cost_added"] / scale, ratio=None if u["ratio"] is None else u["ratio"] * scale)
                for u in alloc.upgrades]
    return {"metadata": metadata, "bit_allocation": bits_by_key,
            "quantization_config": quantization_config(bits_by_key, lambda key: method),
            "totals": totals, "upgrades": upgrades}


def reference_config(report: dict, method: str) -> dict[str, str]:
    """``{layer: "method-bits"}`` (``"fp16"`` for 16 bits): the form eval-configs / infer read."""
    return OrderedDict((key, str(Option.of_bits(method, b)))
                       for key, b in report["bit_allocation"].items())


def print_allocation(report: dict, log=print, max_upgrades: int = 20) -> None:
    t, meta = report["totals"], report["metadata"]
    u = t["unit"]
    log(f"mixed precision for {meta['model']}{' (tiny)' if meta.get('tiny') else ''}: bits {meta['bits']}, "
        f"cost = {meta['cost_model']}, solver {meta['solver']}")
    held = (f", the {t['unmeasured_layers']} unmeasured at {meta['unmeasured_bits']}" if t["unmeasured_layers"]
            else "")
    log(f"  budget     {t['budget']:.6g} {u}   ({meta['budget']})")
    log(f"  min cost   {t['min_cost']:.6g} {u}   (every layer of the model at {meta['bits'][0]} bits{held})")
    log(f"  max cost   {t['max_cost']:.6g} {u}   (every layer of the model at {meta['bits'][-1]} bits{held})")
    if t["unmeasured_layers"]:
        log(f"  {t['unmeasured_layers']} layer(s) without a sensitivity held at {meta['unmeasured_bits']} bits")
    ups = report["upgrades"]
    if ups:
        log(f"  upgrades taken: {len(ups)}" + (f" (first {max_upgrades})" if len(ups) > max_upgrades else ""))
        for up in ups[:max_upgrades]:
            ratio = "free" if up["ratio"] is None else f"{up['ratio']:.4g} per {u}"
            log(f"    {up['from_bits']:>2} -> {up['to_bits']:>2}  +{up['cost_added']:.4g} {u}  "
                f"gain {up['value_gain']:.4f}  ({ratio})  {up['layer']}" + (f"  [{up['note']}]" if "note" in up else ""))
    elif meta["solver"].startswith("exact"):
        log("  upgrades taken: n/a (exact MILP solution, no greedy sequence)")
    else:
        log("  upgrades taken: none")
    util = "n/a" if t["utilisation"] is None else f"{100 * t['utilisation']:.1f}%"
    log(f"  final cost {t['final_cost']:.6g} {u}   utilisation {util}   value {t['value']:.4f} of {t['max_value']:.4f}")
    log(f"  bit widths ({t['search_layers'] + t['unmeasured_layers']} layers, tied copies once): "
        + ", ".join(f"{b} bits x {n}" for b, n in t["bit_distribution"].items()))


# --------------------------------------------------------------------------------------------- CLI
def _default_flops_path(sens: dict) -> Path:
    from multiquant.paths import constants

    from .flops import flops_path

    return flops_path(Path(constants.RESULTS_DIR), sens["settings"]["model"], bool(sens["settings"].get("tiny")))


def _flops_for(args, sens: dict) -> tuple[dict, str]:
    if args.flops_file:
        return load_flops_file(args.flops_file), str(args.flops_file)
    default = _default_flops_path(sens)
    if default.is_file():
        return load_flops_file(default), str(default)
    from .families import UnknownFamilyError, list_families
    from .flops import flops_table

    settings = sens["settings"]
    if settings["model"] not in list_families():  # a user family: only its file or module can define it
        raise UnknownFamilyError(
            f"the sensitivity file was measured on family {settings['model']!r}, which is not registered here: "
            f"pass its definition (--family path/to/file.py:ATTR or pkg.module:ATTR) or --flops_file FILE "
            f"(written by `qua2sedimo flops`)")
    print(f"no --flops_file and no {default}: measuring MACs of {settings['model']} now (meta device)")
    return flops_table(settings["model"], tiny=bool(settings.get("tiny"))), "computed"


def _tag(x: float) -> str:
    return f"{x:g}"


def optimize_per_layer_method(args, paths: list, log=print) -> dict:
    """Several sensitivity files, one per method, and no ``--method``: each layer's method *and* width come
    from measurement. Choices per layer: every (method, width) on offer (fp16 once); predicted damage
    ``D = d_l,m x 2^(b_measured - b)`` (the documented noise-amplitude model on the raw FID degradation, which
    is comparable across methods: same images, same metric), cost as in the one-method form; the knapsack
    (:mod:`multiquant.knapsack`) minimises the summed damage within the budget."""
    from . import knapsack as ks
    from .config import save_config
    from .utils import atomic_path

    sens_list = [load_sensitivity_file(p) for p in paths]
    methods = [s["settings"].get("method", DEFAULT_METHOD) for s in sens_list]
    if len(set(methods)) != len(methods):
        raise BudgetError(f"the sensitivity files repeat a method ({methods}): pass one file per method")
    flops, flops_source = _flops_for(args, sens_list[0])
    for sens, path in zip(sens_list, paths):
        check_same_model(sens, flops, path, flops_source, getattr(args, "model", None))
    by_bits = args.budget_bits is not None
    bits = parse_bits(args.bits, (3, 4) if by_bits else (4, 8, 16))
    act_cost = getattr(args, "act_cost", None)
    if by_bits and act_cost is not None:
        raise InputError("--act_cost sets the activation bits of the BOPs cost: it does not apply to --budget_bits")
    act_cost = act_cost or DEFAULT_ACT_COST["noise"]
    raw = [{e["key"]: float(e.get("fid_degradation", e["sensitivity"])) for e in s["layers"]} for s in sens_list]
    measured_bits = [int(s["settings"].get("bits", bits[0])) for s in sens_list]
    all_items = search_items(flops)
    items = [it for it in all_items if all(it.key in r for r in raw)]
    fixed = [it for it in all_items if it not in items]
    fixed_bits = bits[-1] if getattr(args, "unmeasured", "highest") == "highest" else bits[0]
    fp_prec = int(flops.get("fp_prec", 16))
    choices = [("fp16", FP_BITS)] if FP_BITS in bits else []
    choices = [(m, b) for b in bits if b != FP_BITS for m in methods] + choices
    damage = np.array([[0.0 if b == FP_BITS else max(raw[methods.index(m)][it.key], 0.0) *
                        2.0 ** (measured_bits[methods.index(m)] - b) for m, b in choices] for it in items])
    if by_bits:
        cost = np.stack([bytes_cost_table(items, (b,), methods[0] if m == "fp16" else m, fp_prec)[:, 0]
                         for m, b in choices], axis=1)
        reference = float(sum(int(n * fp_prec / 8) for it in all_items for n, _ in it.shapes))
        fixed_cost = float(sum(bytes_cost_table([it], (fixed_bits,), methods[0], fp_prec)[0, 0] for it in fixed))
        budget, unit, scale = args.budget_bits * reference / fp_prec, "avg bits", reference / fp_prec
    else:
        cost = np.stack([bops_cost_table([it.macs for it in items], (b,), act_cost)[:, 0] for m, b in choices], axis=1)
        reference = float(bops_cost_table([sum(it.macs for it in all_items)], (FP_BITS,), act_cost)[0, 0])
        fixed_cost = float(bops_cost_table([it.macs for it in fixed], (fixed_bits,), act_cost).sum())
        budget = args.budget_multiplier * reference
        unit, scale = _unit_for(reference)
    solve = ks.solve_greedy if args.solver == "greedy" else ks.solve_exact
    min_cost = float(cost.min(axis=1).sum()) + fixed_cost
    max_cost = float(cost.max(axis=1).sum()) + fixed_cost  # every layer counted, the unmeasured at their width
    if min_cost > budget * (1 + 1e-9):  # in the report's unit, like the one-method form
        held = f" ({len(fixed)} unmeasured layer(s) at {fixed_bits} bits included)" if fixed else ""
        raise BudgetError(f"budget {budget / scale:.6g} {unit} is below the cheapest allocation "
                          f"{min_cost / scale:.6g} {unit}{held}: no allocation fits. Fix: raise the budget to at least "
                          f"that, or offer a lower bit width (--bits)")
    solution = solve(list(-damage), list(cost), budget - fixed_cost)
    picked = {it.key: choices[c] for it, c in zip(items, solution.choice)}
    allocation, per_method = OrderedDict(), OrderedDict()
    for it in all_items:
        m, b = picked.get(it.key, (methods[0], fixed_bits))
        for key in it.copies:
            allocation[key], per_method[key] = int(b), m
    quant = quantization_config(allocation, per_method.get)
    final = solution.cost + fixed_cost
    totals = {"unit": unit, "budget": budget / scale, "min_cost": min_cost / scale, "max_cost": max_cost / scale,
              "final_cost": final / scale, "reference_cost": reference / scale,
              "utilisation": final / budget if budget > 0 else None, "predicted_damage": float(-solution.value),
              "search_layers": len(items), "unmeasured_layers": len(fixed),
              "bit_distribution": dict(Counter(str(b) for m, b in picked.values())),
              "method_distribution": dict(Counter(m for m, b in picked.values()))}
    metadata = {"model": sens_list[0]["settings"].get("model"), "tiny": bool(sens_list[0]["settings"].get("tiny")),
                "sensitivity_files": [str(p) for p in paths], "flops_file": flops_source, "methods": methods,
                "method": "per layer, from measurement", "bits": list(bits), "solver": solution.status,
                "allocator": "noise",
                "value_model": "damage d_l,m x 2^(b_measured - b) on the raw FID degradation of each file",
                "cost_model": ("average bits (Option.nbytes, overhead included; 16 = fp16)" if by_bits else
                               f"BOPs = MACs x weight bits x activation bits, {ACT_COST_RULES[act_cost]}"),
                "act_cost": None if by_bits else act_cost,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    report = {"metadata": metadata, "bit_allocation": allocation, "method_allocation": per_method,
              "quantization_config": quant, "totals": totals, "upgrades": solution.trail}
    log(f"mixed precision for {metadata['model']}: method and width per layer from {len(paths)} sensitivity files "
        f"({', '.join(methods)}), solver {solution.status}")
    log(f"  budget {totals['budget']:.6g} {unit}, min cost {totals['min_cost']:.6g} {unit}, max cost "
        f"{totals['max_cost']:.6g} {unit} (every layer of the model), final {totals['final_cost']:.6g} {unit}, "
        f"utilisation {100 * (totals['utilisation'] or 0):.1f}%")
    log("  bit widths: " + ", ".join(f"{b} bits x {n}" for b, n in totals["bit_distribution"].items())
        + "; methods: " + ", ".join(f"{m} x {n}" for m, n in totals["method_distribution"].items()))
    if getattr(args, "no_save", False):
        return report
    outdir = Path(args.outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    tag = f"{_tag(args.budget_bits)}bits" if by_bits else _tag(args.budget_multiplier)
    path = outdir / f"quantization_config_{tag}_per_layer_method{'' if args.solver == 'greedy' else '_' + args.solver}.json"
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(report, indent=1, default=float))
    log(f"wrote {path}")
    if by_bits:
        ref_path = path.with_name(f"{metadata['model']}{'_tiny' if metadata['tiny'] else ''}_best_{tag}.pkl")
        config = OrderedDict((k, FP_OPTION if b == FP_BITS else f"{per_method[k]}-{b}") for k, b in allocation.items())
        save_config(config, ref_path, origin={"kind": "greedy" if args.solver == "greedy" else "sensitivity_exact",
                                              "model": metadata["model"], "budget": float(args.budget_bits),
                                              "solver": solution.status, "method": "per-layer"})
        report["reference_config"] = str(ref_path)
    report["path"] = str(path)
    return report


def resolve_allocator(args, several_files: bool) -> str:
    """``--allocator``, or its default: the seed document's for a BOPs budget on one method's sensitivities
    (what the document describes), the noise model for ``--budget_bits`` and for the method per layer from
    several files (neither is in the document; the noise model compares widths and methods on one scale)."""
    chosen = getattr(args, "allocator", None)
    per_layer = several_files and args.method is None
    if chosen is None:
        return "noise" if args.budget_bits is not None or per_layer else "documented"
    if chosen not in ALLOCATORS:
        raise InputError(f"--allocator must be one of {', '.join(ALLOCATORS)}, got {chosen!r}")
    if chosen == "documented" and args.budget_bits is not None:
        raise InputError("the documented allocator has a BOPs budget (--budget_multiplier X); for an average-bits "
                         "budget use --allocator noise")
    if chosen == "documented" and per_layer:
        raise InputError("the documented allocator reads one method's sensitivities: pass --method M to use that "
                         "file, or --allocator noise to choose the method per layer from all of them")
    return chosen


def optimize(args, log=print) -> dict:
    """Solve the knapsack the flags describe, print it and write the configuration file(s)."""
    from .config import save_config
    from .utils import atomic_path

    if args.budget_multiplier is None and args.budget_bits is None:
        args.budget_multiplier = DEFAULT_BUDGET_MULTIPLIER
    paths = args.sensitivity_file if isinstance(args.sensitivity_file, (list, tuple)) else [args.sensitivity_file]
    allocator = resolve_allocator(args, len(paths) > 1)
    if len(paths) > 1 and args.method is None:
        return optimize_per_layer_method(args, list(paths), log)
    if len(paths) > 1:  # --method given: use that method's file
        chosen = [p for p in paths if load_sensitivity_file(p)["settings"].get("method") == args.method]
        if not chosen:
            raise BudgetError(f"no sensitivity file measures --method {args.method}: pass its file or drop --method")
        paths = chosen[:1]
    args.sensitivity_file = paths[0]
    sens = load_sensitivity_file(args.sensitivity_file)
    flops, flops_source = _flops_for(args, sens)
    check_same_model(sens, flops, args.sensitivity_file, flops_source, getattr(args, "model", None))
    by_bits = args.budget_bits is not None
    bits = parse_bits(args.bits, (3, 4) if by_bits else (4, 8, 16))
    method = args.method or sens["settings"].get("method", DEFAULT_METHOD)
    problem = build_problem(sens, flops, bits, budget_multiplier=None if by_bits else args.budget_multiplier,
                            budget_bits=args.budget_bits, method=method, unmeasured=args.unmeasured,
                            allocator=allocator, act_cost=getattr(args, "act_cost", None))
    check_budget(problem, args.solver)
    alloc = solver_for(allocator, args.solver)(problem.knapsack)
    metadata = {
        "model": sens["settings"].get("model"), "tiny": bool(sens["settings"].get("tiny")),
        "sensitivity_file": str(args.sensitivity_file), "flops_file": flops_source,
        "sensitivity_settings": {k: sens["settings"].get(k) for k in ("bits", "method", "num_prompts", "prompt_seed")},
        "bits": list(bits), "solver": alloc.solver, "allocator": allocator,
        "value_model": DOCUMENTED_VALUE_MODEL if allocator == "documented" else VALUE_MODEL,
        "cost_model": (f"average bits (Option.nbytes with {method}, overhead included; 16 = fp16)" if by_bits
                       else f"BOPs = MACs x weight bits x activation bits, {ACT_COST_RULES[problem.act_cost]}"),
        "act_cost": problem.act_cost,
        "budget": (f"{args.budget_bits} average bits" if by_bits
                   else f"{args.budget_multiplier} x cost with every layer at 16 bits"),
        "budget_multiplier": None if by_bits else args.budget_multiplier,
        "budget_bits": args.budget_bits, "method": method,
        "unmeasured": args.unmeasured, "unmeasured_bits": problem.fixed_bits,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    report = allocation_report(problem, alloc, metadata, method)
    print_allocation(report, log=log)
    if getattr(args, "no_save", False):
        return report
    outdir = Path(args.outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    name = f"quantization_config_{_tag(args.budget_bits)}bits" if by_bits else f"quantization_config_{_tag(args.budget_multiplier)}"
    # every allocator's and solver's results can sit side by side; the defaults keep the document's name
    name += "" if by_bits or allocator == "documented" else f"_{allocator}"
    name += "" if args.solver == "greedy" else f"_{args.solver}"
    path = outdir / f"{name}.json"
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(report, indent=1))
    log(f"wrote {path}")
    if by_bits:
        ref_path = outdir / (f"{metadata['model']}{'_tiny' if metadata['tiny'] else ''}_{method}_{_tag(args.budget_bits)}bits"
                             f"{'' if args.solver == 'greedy' else '_' + args.solver}.pkl")
        origin = {"kind": "greedy" if alloc.solver == "greedy" else f"sensitivity_{alloc.solver}",
                  "model": metadata["model"], "budget": float(args.budget_bits), "solver": alloc.solver,
                  "method": method, "sensitivity_file": str(args.sensitivity_file), "created": metadata["created"]}
        save_config(reference_config(report, method), ref_path, origin=origin)
        log(f"wrote {ref_path} and {ref_path.with_suffix('.json')} (reference form, for eval-configs / infer)")
        report["reference_config"] = str(ref_path)
    report["path"] = str(path)
    return report


def cmd_optimize_mixed_precision(args) -> int:
    optimize(args, log=(lambda msg: None) if getattr(args, "quiet", False) else print)
    return 0


def add_optimize_parser(subparsers):
    from multiquant.paths import constants

    p = subparsers.add_parser(
        "optimize-mixed-precision",
        help="greedy bang-for-buck bit allocation under a BOPs or average-bits budget, from a sensitivity file",
        description="Bit widths per layer under a budget, from one-layer sensitivities. BOPs form "
                    "(--budget_multiplier X, default 0.5): budget = X x the cost with every layer at 16 bits; the "
                    "default allocator is the seed document's (every layer at 4 bits, then the most efficient "
                    "upgrade that fits, sensitivity per BOP added, 8 -> 16 weighted x0.2). Average-bits form "
                    "(--budget_bits B): the noise-model knapsack, which also writes the configuration.")
    p.add_argument("--sensitivity_file", required=True, nargs="+",
                   help="results/sensitivity_analysis_<model>_<bits>bit[_<method>].json; several files (one per "
                        "method) without --method: each layer's method and width are chosen from measurement")
    p.add_argument("--flops_file", default=None,
                   help="results/flops_analysis/flops_analysis_<model>.json (default: that file, else measured now)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--budget_multiplier", type=float, default=None,
                        help=f"BOPs budget as a fraction of the cost with every layer at 16 bits (W16A16); "
                             f"default {DEFAULT_BUDGET_MULTIPLIER} when --budget_bits is not given")
    budget.add_argument("--budget_bits", type=float, default=None,
                        help="average weight bits incl. overhead (e.g. 3.5), the Qua2SeDiMo space; also writes "
                             "the {layer: 'method-bits'} configuration (.pkl + .json)")
    p.add_argument("--bits", default=None, help="bit widths on offer, comma list; 16 = fp16 "
                                                "(default 4,8,16 for BOPs, 3,4 for --budget_bits)")
    p.add_argument("--method", default=None, choices=list(METHODS),
                   help="quantizer of the average-bits cost and of the written configuration (default: the "
                        "sensitivity file's; with several files: per layer, from measurement)")
    p.add_argument("--allocator", default=None, choices=ALLOCATORS,
                   help="documented: the seed document's allocator (value of an upgrade = the layer's sensitivity, "
                        "8 -> 16 x0.2; one width at a time; BOPs budgets only); noise: the noise-amplitude value "
                        "model s x (1 - 2^(b_min - b)) with the single-upgrade safeguard, which also takes "
                        "--budget_bits and chooses the method per layer from several files. Default: documented "
                        "for a BOPs budget on one method's file (it is what the document promises and reproduces "
                        "its numbers); noise otherwise (the document defines neither form)")
    p.add_argument("--act_cost", default=None, choices=list(ACT_COST_RULES),
                   help="activation bits of the BOPs cost: weight (A = W, all-4-bit = 1/16 of W16A16, the "
                        "document's numbers; default of documented), plus4 (A = min(W + 4, 16), the act_bits the "
                        "quantization_config names), a16 (weight-only; default of noise)")
    p.add_argument("--solver", default="greedy", choices=sorted(SOLVERS),
                   help="greedy bang-for-buck (default; for documented its own greedy) or the exact MILP optimum "
                        "of the same values (scipy HiGHS)")
    p.add_argument("--unmeasured", default="highest", choices=["highest", "lowest"],
                   help="bit width of layers the sensitivity file does not cover (e.g. after --max_layers)")
    add_model_flags(p, required=False, weights=False, tiny=False, device=False,
                    model_help="optional check: refuse a sensitivity file of another model")
    p.add_argument("--outdir", "--output_dir", dest="outdir", default=str(Path(constants.RESULTS_DIR) / "mixed_precision"),
                   help="output folder of the allocation JSON (and the configuration with --budget_bits)")
    p.add_argument("--no_save", action="store_true", help="print the allocation, write nothing")
    p.add_argument("--quiet", action="store_true", help="print nothing (the files are still written)")
    p.set_defaults(func=cmd_optimize_mixed_precision)
    return p
