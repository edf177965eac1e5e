"""Every way of building a budgeted configuration, side by side, on one testbed (any family).

    python benchmarks/pareto.py --model mnist_dit --cache quant_caches/mnist_dit/quant_cache.pkl --device cuda
    python benchmarks/pareto.py --model mnist_dit --tiny --num_images 16 --sweep_images 8   # CPU smoke check

All rows are scored by one scorer (the dataset's protocol: images, seeds, feature network, reference) into
one resumable store keyed by configuration content, and re-scored with a fresh image seed
(``--confirm_seed``) into a second one: ``fid`` / ``fid_confirm``. Rows (``budgets[].methods``):

* ``uniform_<option>``: every uniform configuration of the option table that fits the budget;
* ``greedy_<m>`` / ``exact_<m>``: greedy bang-for-buck and the exact MILP knapsack on the measured one-layer
  sensitivities (``--sweep_images`` images per layer, FID-FP) of method ``m``, and ``_best`` over every
  method per layer (:mod:`multiquant.knapsack`);
* ``build_config_node`` / ``build_config_block``: the predictor's one-shot configurations (trained on the
  dataset, quality target), at node and block level;
* ``search``: the measured Thompson search from the dataset (``autobuild.search``);
* ``random_best``: the best dataset configuration within the budget (no new scoring);
* ``optimize``: :mod:`autobuild.optimize` from an empty dataset (its own measurements only).

``evaluations`` counts full-protocol evaluations a row consumed: dataset configurations, one-layer
measurements (at their image fraction) and proposals. ``predictor``: 5-fold held-out SRCC of the predictor on
the dataset for the default and the quality-only target, with every baseline (``benchmarks/predictor.py``).
Writes ``benchmarks/results/pareto_<model>.json`` and ``.png``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import RESULTS, environment, write_result  # noqa: E402
from multiquant.utils import json_default, write_text_atomic  # noqa: E402

KEY = "FID-GT-1k"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="family, e.g. mnist_dit or mnist_unet")
    p.add_argument("--cache", default=None, help="the scored random dataset (default quant_caches/<model>/"
                                                 "quant_cache.pkl; --tiny: scored here)")
    p.add_argument("--budgets", default=None, help="default: the paper's 3.3,3.5,3.7,3.9 where the model reaches "
                                                   "them, else priced with its tables (autobuild.configs.budgets_help)")
    p.add_argument("--num_images", type=int, default=None, help="images per configuration (default: the family's)")
    p.add_argument("--image_seed", type=int, default=42)
    p.add_argument("--confirm_seed", type=int, default=43)
    p.add_argument("--sweep_images", type=int, default=100, help="images of each one-layer measurement")
    p.add_argument("--max_evaluations", type=float, default=150, help="the optimiser's total")
    p.add_argument("--optimize_seconds", type=float, default=None, help="no new optimiser round after this")
    p.add_argument("--deadline_s", type=float, default=None, help="no new row scored after this many seconds "
                                                                  "from the start (rows left are listed)")
    p.add_argument("--search_rounds", type=int, default=2, help="measured search from the dataset (0: off)")
    p.add_argument("--search_per_budget", type=int, default=3)
    p.add_argument("--predictor_json", default=None, help="benchmarks/predictor.py's result to merge (default "
                                                          "benchmarks/results/predictor_<model>.json if present)")
    p.add_argument("--predictor_dir", default=None, help="trained predictor (quality target) for build-config "
                                                         "(default: the one predictor.py saved, else none)")
    p.add_argument("--wait_predictor", type=float, default=0, help="seconds to wait for --predictor_json (it may be "
                                                                   "trained beside this run)")
    p.add_argument("--num_random", type=int, default=24, help="--tiny without --cache: random configurations")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--device", default=None)
    p.add_argument("--mq", default=None)
    p.add_argument("--workdir", default=None)
    p.add_argument("--output_shifts", action="store_true", help="the optimiser's trees also read output shifts, "
                                                                "and its ridge_shift surrogate the output-change "
                                                                "signature (qua2sedimo optimize --output_shifts)")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    return p.parse_args(argv)


def _row(record, confirm, evaluations: float, **extra) -> dict:
    return {"avg_bits": float(record["avg_bits"]), "fid": float(record[KEY]),
            "fid_confirm": None if confirm is None else float(confirm[KEY]), "evaluations": float(evaluations),
            **extra}


def knapsack_rows(space, sweeps, budget: float, sweep_cost: dict) -> dict:
    """{name: choice} of greedy and exact knapsack on the one-layer sweeps, each method and the best per layer."""
    import numpy as np

    from multiquant import knapsack
    from multiquant.knapsack import BudgetError

    out = {}
    value = -np.nan_to_num(sweeps.degradation, nan=0.0)
    for method in [None, *space.methods]:
        allowed = sweeps.allowed(method, space)
        keep = [np.flatnonzero(allowed[r]) for r in range(len(space.layers))]
        values = [value[r, k] for r, k in enumerate(keep)]
        costs = [space.cost[r, k] for r, k in enumerate(keep)]
        cost = sum(sweep_cost.values()) if method is None else sweep_cost[method]
        for solver in ("greedy", "exact"):
            try:
                fn = knapsack.solve_greedy if solver == "greedy" else knapsack.solve_exact
                sol = fn(values, costs, space.capacity(budget))
            except BudgetError:
                continue
            out[f"{solver}_{method or 'best'}"] = (np.array([k[c] for k, c in zip(keep, sol.choice)]), cost + 1)
    return out


def main(argv=None) -> dict:
    import numpy as np

    from autobuild.configs import DEFAULT_SEARCH_BUDGETS, budgets_or_default, parse_budgets
    from autobuild.optimize import Sweeps, measured_setup, optimize, sweep_measure
    from multiquant.evaluate import random_configs, score_into_store
    from multiquant.families import get_family
    from multiquant.sensitivity import setup_protocol
    from multiquant.store import RecordStore, load_quant_cache

    args = parse_args(argv)
    started = time.perf_counter()
    log = print
    family = get_family(args.model)
    tag = f"pareto_{family.name}{'_tiny' if args.tiny else ''}"
    out_dir = Path(args.out) if args.out else RESULTS
    workdir = Path(args.workdir) if args.workdir else RESULTS / f"{tag}_work"
    setup = measured_setup(family, workdir, tiny=args.tiny, device=args.device, mq=args.mq,
                           num_images=args.num_images, image_seed=args.image_seed, confirm_seed=args.confirm_seed,
                           log=log)
    scorer, settings, ties, space, measure, device = (setup.scorer, setup.settings, setup.ties, setup.space,
                                                      setup.measure, setup.device)
    # the tiny model's per-layer overhead puts it far above 3-4 bits: its default budgets are priced with its tables
    budgets = budgets_or_default(parse_budgets(args.budgets), scorer.mq, DEFAULT_SEARCH_BUDGETS, log)
    timings = {"setup_s": time.perf_counter() - started}

    # the dataset (for build-config, search, random_best)
    cache = args.cache or (None if args.tiny else f"quant_caches/{family.name}/quant_cache.pkl")
    if cache:
        records = load_quant_cache(cache)
    else:
        store = RecordStore(workdir / "random", dict(settings, kind="random", seed=0, num_archs=args.num_random))
        score_into_store(scorer, store, random_configs(scorer.mq.layers, 0, args.num_random), log=log)
        records, cache = store.records(), str(store.cache_path)

    # one-layer sweeps, shared by the knapsack rows and the optimiser
    protocol, psettings = setup_protocol(family, tiny=args.tiny, device=device, num_prompts=args.sweep_images,
                                         image_seed=args.image_seed, pixel_features=args.tiny, fid_against="fp",
                                         log=log)
    sweep_fn = sweep_measure(protocol, psettings, workdir / "sweeps", space, settings["num_images"], log)
    sweep_results = {m: sweep_fn(m) for m in space.methods}
    sweep_cost = {m: c for m, (_, c) in sweep_results.items()}
    sweeps = Sweeps.of(space, {m: r for m, (r, _) in sweep_results.items()})
    timings["sweeps_s"] = time.perf_counter() - started - sum(timings.values())

    # the optimiser, from an empty dataset (its sweeps are the ones above: the store returns them)
    shifts = signature = None
    if args.output_shifts:
        from autobuild.output_shift import shift_tables

        shifts, signature, _ = shift_tables(scorer.denoiser, scorer.mq, family, seed=0, log=log)
    opt = optimize(scorer.mq, budgets, measure, sweep_fn, ties, args.max_evaluations, seed=0, key=KEY,
                   max_seconds=args.optimize_seconds, shifts=shifts, signature=signature, log=log)
    timings["optimize_s"] = time.perf_counter() - started - sum(timings.values())
    partial = workdir / "optimize_history.json"
    partial.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(partial, json.dumps(opt, indent=1, default=json_default))  # kept even if the rows run out of time

    # the rows
    named: dict[tuple[float, str], tuple[dict, float, dict]] = {}  # (budget, name) -> (config, evaluations, extra)
    uniform = {o: space.config(np.full(len(space.layers), k)) for k, o in enumerate(space.options)}
    for budget in budgets:
        for o, config in uniform.items():
            named[(budget, f"uniform_{o}")] = (config, 1, {})
        for name, (choice, cost) in knapsack_rows(space, sweeps, budget, sweep_cost).items():
            named[(budget, name)] = (space.config(choice), cost, {})
    pred = _predictor_result(args, family)
    pred_dir = Path(args.predictor_dir) if args.predictor_dir else (Path(pred["quality_dir"]) if pred.get("quality_dir")
                                                                    else None)
    if pred_dir is not None and pred_dir.exists():
        try:
            _build_rows(named, pred_dir, scorer, family, budgets, workdir, args, len(records))
        except Exception as err:  # noqa: BLE001 - one failed row family must not lose the measured others
            log(f"build-config rows failed: {type(err).__name__}: {err}")
    search = None
    if args.search_rounds > 0:
        try:
            search = _search_rows(named, scorer, settings, records, budgets, workdir, args, log)
        except Exception as err:  # noqa: BLE001
            log(f"search rows failed: {type(err).__name__}: {err}")
    timings["rows_s"] = time.perf_counter() - started - sum(timings.values())

    # score in order of importance, in chunks, until the deadline (what is left is listed, not guessed)
    items = sorted(named.items(), key=lambda kv: (_priority(kv[0][1]), kv[0][0]))
    scored, confirmed = [None] * len(items), [None] * len(items)
    deadline = started + args.deadline_s if args.deadline_s else float("inf")
    for start in range(0, len(items), 6):
        if time.perf_counter() > deadline:
            log(f"deadline reached: {len(items) - start} row(s) not scored")
            break
        chunk = [c for _, (c, _, _) in items[start:start + 6]]
        scored[start:start + 6] = measure(chunk, "main")
        confirmed[start:start + 6] = measure(chunk, "confirm")
    not_scored = sorted({f"{b:g}:{n}" for ((b, n), _), r in zip(items, scored) if r is None})
    timings["scoring_s"] = time.perf_counter() - started - sum(timings.values())

    rows = []
    for budget in budgets:
        methods = {}
        for ((b, name), (config, cost, extra)), rec, conf in zip(items, scored, confirmed):
            if rec is None or b != budget or float(rec["avg_bits"]) > budget + 1e-9:
                continue
            methods[name] = _row(rec, conf, cost, **extra)
        within = [r for r in records if float(r["avg_bits"]) <= budget + 1e-9]
        if within:
            best = min(within, key=lambda r: float(r[KEY]))
            methods["random_best"] = _row(best, None, len(records), note="best dataset configuration within the "
                                                                         "budget (not re-scored)")
        pick = opt["best"].get(f"{budget:g}")
        if pick is not None:
            methods["optimize"] = {"avg_bits": pick["avg_bits"], "fid": pick["fid"], "fid_confirm": pick["fid_confirm"],
                                   "evaluations": opt["evaluations"], "source": pick["source"]}
        rows.append({"budget": budget, "methods": methods})
    uniform4 = {n: m for n, m in zip([n for (_, n), _ in items], zip(scored, confirmed))
                if n.startswith("uniform_") and n.endswith("-4") and m[0] is not None}
    uniform_fid = {n[len("uniform_"):]: {"fid": float(r[KEY]), "fid_confirm": float(c[KEY]),
                                         "avg_bits": float(r["avg_bits"])}
                   for (b, n), r, c in zip([k for k, _ in items], scored, confirmed)
                   if n.startswith("uniform_") and r is not None}
    fp16 = (measure([{k: "fp16" for k in space.table.keys}], "main")[0]
            if not args.tiny and time.perf_counter() < deadline else None)
    result = {
        "model": family.name, "optimizer": "autobuild.optimize", "optimizer_evaluations": opt["evaluations"],
        "optimizer_detail": {k: opt[k] for k in ("full_evaluations", "sweep_evaluations", "confirm_evaluations",
                                                 "rounds", "settings")},
        "uniform4_best_confirm": min(c[KEY] for _, c in uniform4.values()) if uniform4 else None,
        "uniform": uniform_fid, "fp16_fid": float(fp16[KEY]) if fp16 else None,
        "budgets": rows, "goals": _goals(rows, uniform4), "not_scored": not_scored,
        "predictor": {k: v for k, v in pred.items() if k not in ("quality_dir",)},
        "sweeps": {"images": args.sweep_images, "metric": "FID-FP of the layer alone at the method's lowest width",
                   "cost_evaluations": sweep_cost, "ranking": _sweep_ranking(space, sweeps),
                   "per_method": _sweeps_doc(space, sweeps)["per_method"]},
        "dataset": {"n": len(records), "cache": str(cache)},
        "settings": {"tiny": args.tiny, "num_images": settings["num_images"], "image_seed": args.image_seed,
                     "confirm_seed": args.confirm_seed, "feature_net": settings.get("feature_net"),
                     "device": device, "search_rounds": args.search_rounds},
        "environment": environment(), "timings": timings, "seconds": time.perf_counter() - started,
    }
    fill_from_history(result, opt)
    try:
        result["insights"] = dataset_insights(space, records, _sweeps_doc(space, sweeps), family, result.get("uniform"))
    except Exception as err:  # noqa: BLE001 - the figures above stand without it
        log(f"insights failed: {type(err).__name__}: {err}")
    history_path = workdir / "optimize_history.json"
    history_path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(history_path, json.dumps(opt, indent=1, default=json_default))
    result["optimizer_history"] = str(history_path)
    result["plot"] = str(plot(result, records if not args.tiny else [], out_dir / f"{tag}.png"))
    write_result(tag, result, out_dir)
    return result


PRIORITY = ("uniform_", "exact_best", "greedy_best", "build_config", "search", "exact_", "greedy_")


def _priority(name: str) -> int:
    return next((i for i, p in enumerate(PRIORITY) if name.startswith(p)), len(PRIORITY))


def _build_rows(named, pred_dir, scorer, family, budgets, workdir, args, n_records) -> None:
    """build-config at node and block level from the dataset-trained predictor (the paper's one-shot path)."""
    from autobuild.configs import BudgetError, build_config, predictor_scores

    for level in ("node", "block"):
        scores, table, _ = predictor_scores(pred_dir, scorer.mq, family, level, "tiny" if args.tiny else "full")
        for budget in budgets:
            try:
                built = build_config(pred_dir, table, family, budget, level, out_dir=workdir / "configs",
                                     name=f"build_{level}_{int(round(budget * 10))}", scores=scores)
            except BudgetError:
                continue
            named[(budget, f"build_config_{level}")] = (built.config, n_records + 1,
                                                         {"predicted_score": built.predicted_score})


def _search_rows(named, scorer, settings, records, budgets, workdir, args, log) -> dict:
    """The measured Thompson search (autobuild.search) from the dataset records."""
    from autobuild.search import measured_search

    search = measured_search(scorer, settings, records, budgets, workdir / "search", args.search_rounds,
                             args.search_per_budget, seed=0, log=log)
    for b, best in search["best"].items():
        if best is not None:
            named[(float(b), "search")] = (best["config"], len(records) + search["settings"]["n_search"],
                                           {"source": best["source"]})
    return search


def fill_from_history(result: dict, history: dict) -> dict:
    """Rows the deadline left unscored whose configuration the optimiser measured itself (its uniform anchors
    are the ``uniform_*`` rows, its knapsack seeds the ``exact_*`` rows: the same solver on the same sweeps):
    their seed FID from the optimiser's record (same scorer, same protocol), ``fid_confirm`` only where the
    optimiser confirmed them. Marked ``from_optimizer_history``."""
    sweep_cost = result["sweeps"]["cost_evaluations"]
    for row in result["budgets"]:
        budget = row["budget"]
        for entry in history["history"]:
            source = entry["source"]
            if source.startswith("uniform_") and entry["avg_bits"] <= budget + 1e-9:
                name, cost = source, 1.0
            elif source.startswith("knapsack_") and entry["budget"] == budget:
                method = source[len("knapsack_"):]
                name = f"exact_{method}"
                cost = (sum(sweep_cost.values()) if method == "best" else sweep_cost.get(method, 0.0)) + 1
            else:
                continue
            if name not in row["methods"]:
                row["methods"][name] = {"avg_bits": entry["avg_bits"], "fid": entry["fid"],
                                        "fid_confirm": entry.get("fid_confirm"), "evaluations": cost,
                                        "from_optimizer_history": True}
    for entry in history["history"]:
        if entry["source"].startswith("uniform_"):
            result.setdefault("uniform", {}).setdefault(entry["source"][len("uniform_"):], {
                "fid": entry["fid"], "fid_confirm": entry.get("fid_confirm"), "avg_bits": entry["avg_bits"],
                "from_optimizer_history": True})
    seeds = [u["fid"] for o, u in result.get("uniform", {}).items() if o.endswith("-4")]
    result["uniform4_best_seed"] = min(seeds) if seeds else None
    return result


def _predictor_result(args, family) -> dict:
    path = Path(args.predictor_json) if args.predictor_json else RESULTS / f"predictor_{family.name}.json"
    deadline = time.perf_counter() + args.wait_predictor
    while not path.exists() and time.perf_counter() < deadline:
        time.sleep(2)
    if not path.exists():
        print(f"no predictor result at {path}: the build-config rows and the predictor figures are left out")
        return {}
    data = json.loads(path.read_text())
    return data.get("predictor", data)


def dataset_insights(space, records, sweeps: dict, family, uniform: dict | None = None, seed: int = 0) -> dict:
    """Which layers matter and where the paper's qualitative claims hold (``autobuild.claims``), from the
    better-validated of two models of the dataset's log FID (``autobuild.evidence.dataset_model``: per layer the
    mean predicted change of log FID from 4 to 3 bits, its method kept) and the one-layer sweeps
    (``autobuild.evidence.load_sweeps`` form), and the measured uniform configurations."""
    from scipy.stats import spearmanr

    from autobuild.dag import family_dag
    from autobuild.evidence import dataset_model, dataset_sources, layer_roles, testbed_insights

    fit = dataset_model(space, records, KEY, seed=seed)
    layer, method = dataset_sources(fit)
    ops, blocks = layer_roles(family_dag(family, "full", device="meta"))
    checked = testbed_insights(ops, blocks, [(layer, method, fit["cv_srcc_log_fid"][fit["best_model"]])], sweeps,
                               uniform, sweep_bits=3)
    effects, worst = fit["effects"], sweeps.get("worst", {})
    order = sorted(effects, key=lambda k: -effects[k])
    block_effect: dict = {}
    for name, key in zip(space.block_names(), space.layers):
        block_effect[name] = block_effect.get(name, 0.0) + effects[key]
    shared = [k for k in space.layers if k in worst]
    return {"best_model": fit["best_model"], "cv_srcc_log_fid": fit["cv_srcc_log_fid"],
            "layers_by_model": [{"layer": k, "effect_4_to_3_log_fid": effects[k], "sweep_degradation": worst.get(k)}
                                for k in order],
            "blocks_by_model": dict(sorted(block_effect.items(), key=lambda kv: -kv[1])),
            "model_vs_sweeps_srcc": (float(spearmanr([effects[k] for k in shared], [worst[k] for k in shared]).statistic)
                                     if len(shared) > 2 else None),
            **checked}


def _sweeps_doc(space, sweeps) -> dict:
    """The sweeps as ``autobuild.evidence.load_sweeps`` returns them (raw per-method degradations)."""
    import numpy as np

    worst = np.nanmax(sweeps.degradation, axis=1)
    return {"worst": {k: float(w) for k, w in zip(space.layers, worst)},
            "per_method": {m: {k: float(v) for k, v in d.items()} for m, d in sweeps.measured.items()},
            "metric": "FID-FP of the layer alone at the method's lowest width"}


def recompute_insights(models, results: Path = RESULTS) -> dict:
    """``python benchmarks/pareto.py --insights mnist_dit mnist_unet``: recompute ``insights`` of each
    ``pareto_<model>.json`` on the CPU from what is shipped (the scored dataset, the multiquantizer, the sweeps
    stored in the result and ``sensitivity_<model>.json`` where present), without scoring anything, and compare
    the testbeds. Records what was recomputed, where and when in ``insights.recomputed``."""
    import hashlib
    import platform

    from autobuild.claims import compare_testbeds
    from autobuild.optimize import Space
    from multiquant.checkpoint import MultiQuantizer
    from multiquant.families import get_family
    from multiquant.paths import multiquantizer_path
    from multiquant.store import load_quant_cache

    def digest(path):
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]

    done = {}
    for model in models:
        path = results / f"pareto_{model}.json"
        result = json.loads(path.read_text())
        family = get_family(model)
        mq_path = multiquantizer_path(f"{family.name}_mq.safetensors")
        mq = MultiQuantizer.from_pretrained(mq_path)
        space = Space.of(mq, {r.key: r.tied_to for r in mq.layers if r.tied_to})
        cache = Path(result["dataset"]["cache"])
        records = load_quant_cache(cache)
        from autobuild.evidence import load_sweeps

        files = [path] + [p for p in [results / f"sensitivity_{family.name}.json"] if p.exists()]
        sweeps = load_sweeps(files)
        started = time.perf_counter()
        insights = dataset_insights(space, records, sweeps, family, result.get("uniform"))
        insights["recomputed"] = {
            "where": f"CPU ({platform.machine()}, {os.cpu_count()} cores), no scoring", "when":
                time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "seconds": time.perf_counter() - started,
            "how": "python benchmarks/pareto.py --insights " + " ".join(models),
            "inputs": {str(cache): digest(cache), str(mq_path.relative_to(Path(__file__).resolve().parents[1])
                                                      if mq_path.is_absolute() else mq_path): digest(mq_path),
                       **{str(p.relative_to(Path(__file__).resolve().parents[1]) if p.is_absolute() else p):
                          "sweeps" + (" and uniform FIDs (measured on the GPU run)" if p == path else "")
                          for p in files}},
            "sweeps_from": sweeps["files"], "sweep_methods": sorted(sweeps["per_method"])}
        result["insights"] = insights
        done[model] = (path, result)
    cross = compare_testbeds({m: r["insights"] for m, (_, r) in done.items()})
    for model, (path, result) in done.items():
        result["insights"]["across_testbeds"] = {**cross, "testbeds": sorted(done)}
        write_text_atomic(path, json.dumps(result, indent=1, default=json_default))
        print(f"wrote insights of {path}")
    return {m: r["insights"] for m, (_, r) in done.items()}


def _sweep_ranking(space, sweeps) -> list:
    """Layers by their worst one-layer degradation over methods (most sensitive first)."""
    import numpy as np

    worst = np.nanmax(sweeps.degradation, axis=1)
    order = np.argsort(-worst)
    return [{"layer": space.layers[i], "degradation": float(worst[i])} for i in order]


def _goals(rows, uniform4) -> dict:
    """Issue goal: at every budget the optimiser's confirmed FID <= best uniform 4-bit and <= every other row."""
    best_u4 = min((float(c[KEY]) for _, c in uniform4.values()), default=None)
    out = {}
    for row in rows:
        opt = row["methods"].get("optimize")
        others = [m["fid_confirm"] for n, m in row["methods"].items()
                  if n not in ("optimize", "random_best") and m.get("fid_confirm") is not None]
        if opt is None:
            out[f"{row['budget']:g}"] = None
            continue
        out[f"{row['budget']:g}"] = {"optimize_confirm": opt["fid_confirm"], "best_uniform4_confirm": best_u4,
                                     "best_other_confirm": min(others) if others else None,
                                     "beats_uniform4": best_u4 is None or opt["fid_confirm"] <= best_u4,
                                     "beats_every_other": not others or opt["fid_confirm"] <= min(others)}
    return out


def plot(result: dict, records, path: Path) -> Path:
    """Confirmed FID vs average bits of every row at every budget, the dataset cloud behind them."""
    from multiquant.utils import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=120)
    if records:
        ax.scatter([float(r["avg_bits"]) for r in records], [float(r[KEY]) for r in records], s=6, c="0.8",
                   label=f"dataset ({len(records)} random)", zorder=1)
    groups: dict[str, list] = {}
    for row in result["budgets"]:
        for name, m in row["methods"].items():
            if name == "random_best":
                continue
            family = name.split("_")[0] if not name.startswith("build_config") else name
            confirmed = m.get("fid_confirm") is not None
            groups.setdefault(family, []).append((m["avg_bits"], m["fid_confirm"] if confirmed else m["fid"],
                                                  confirmed))
    styles = {"optimize": ("*", "tab:red", 14), "exact": ("s", "tab:blue", 6), "greedy": ("v", "tab:cyan", 6),
              "uniform": ("o", "tab:gray", 6), "search": ("D", "tab:green", 6),
              "build_config_node": ("^", "tab:purple", 6), "build_config_block": ("<", "tab:pink", 6)}
    for name, points in groups.items():
        marker, color, size = styles.get(name, ("x", "k", 6))
        points = sorted(set(points))
        xs, ys, confirmed = zip(*points)
        ax.plot(xs, ys, color=color, linestyle="-" if name == "optimize" else "none", zorder=3 if name == "optimize" else 2)
        for fill in (True, False):  # filled: confirmation-seed FID; open: the main seed only
            sel = [(x, y) for x, y, c in points if c == fill]
            if sel:
                ax.plot(*zip(*sel), marker, color=color, ms=size, linestyle="none",
                        markerfacecolor=color if fill else "none", zorder=3 if name == "optimize" else 2,
                        label=name if fill or not any(confirmed) else None)
    u4 = result.get("uniform4_best_confirm") or result.get("uniform4_best_seed")
    if u4:
        ax.axhline(u4, color="tab:gray", ls="--", lw=1, label="best uniform 4-bit" + (
            "" if result.get("uniform4_best_confirm") else " (main seed)"))
    if result.get("fp16_fid"):
        ax.axhline(result["fp16_fid"], color="k", ls=":", lw=1, label="FP16")
    ax.set_yscale("log")
    ax.set_xlabel("average bits (overhead included)")
    ax.set_ylabel(f"{KEY} (filled: confirmation seed; open: main seed only; log scale)")
    budgets = ", ".join(f"{r['budget']:g}" for r in result["budgets"])
    ax.set_title(f"{result['model']}: budgeted configurations at {budgets} bits")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="upper right", ncol=2)
    fig.tight_layout()
    return save_figure(fig, path, bbox_inches=None)


def refill(result_path: str, history_path: str) -> dict:
    """``python benchmarks/pareto.py --refill RESULT.json HISTORY.json``: apply :func:`fill_from_history` to a
    result written before it existed (the rows are marked; nothing is re-scored)."""
    from multiquant.store import load_quant_cache

    result = json.loads(Path(result_path).read_text())
    fill_from_history(result, json.loads(Path(history_path).read_text()))
    write_text_atomic(Path(result_path), json.dumps(result, indent=1, default=json_default))
    cache = result["dataset"]["cache"]
    records = load_quant_cache(cache) if Path(cache).exists() and not result["settings"]["tiny"] else []
    plot(result, records, Path(result_path).with_suffix(".png"))
    return result


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--refill":
        refill(sys.argv[2], sys.argv[3])
    elif len(sys.argv) >= 3 and sys.argv[1] == "--insights":
        recompute_insights(sys.argv[2:])
    else:
        main()
