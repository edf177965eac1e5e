"""Budgeted configurations of the MNIST DiT against the baselines, all scored with the random dataset's protocol.

    python benchmarks/pareto_mnist_dit.py --cache quant_caches/mnist_dit/quant_cache.pkl --device cuda
    python benchmarks/pareto_mnist_dit.py --tiny --num_images 20          # CPU smoke check of the script

1. Predictor: ``--predictor DIR`` or trained here on ``--cache`` (the scored random dataset; ``--tiny``
   without a cache scores ``--num_random`` random configurations of the tiny model itself).
2. Knapsack configurations at ``--budgets`` (block-level unit scores, exact MILP): ``mnist_dit_<B x 10>.pkl``.
3. Greedy knapsack baseline at the same budgets (``multiquant.allocation``, bang for buck over {3, 4} bits of
   one method, from that method's per-layer 3-bit sensitivity: ``--sensitivity_file`` or measured here), for
   each of ``--greedy_methods``; ``greedy_fid`` is the best of them at the budget (``greedy`` lists each).
4. Everything scored in one scorer, exactly like ``eval-configs`` / ``eval-random`` (same images, seeds,
   feature network, reference): the built and greedy configurations, uniform 4-bit of every method, FP16.
5. Best random configuration of the dataset per budget: with at least that many bits (``best_random_fid``,
   a strong baseline: it may spend more bits) and within the budget (``best_random_fid_within_budget``).
6. Optional (``--search_rounds R``): the measured search (``autobuild.search``: Thompson sampling over a Bayesian
   linear model of log FID, exact knapsack per proposal) from the dataset records, with this scorer, at the same
   budgets: ``search_fid`` / ``search_avg_bits`` per budget. The best of many noisy measurements is biased low
   (winner's curse), so the search picks and every configuration above are re-scored with a second image seed
   (``--confirm_seed``): the ``*_fid_confirm`` fields.

Writes ``benchmarks/results/pareto_mnist_dit.json`` (``_tiny`` for --tiny) and the plot beside it.
"""
from __future__ import annotations

import argparse
import sys
import time
from argparse import Namespace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import RESULTS, environment, write_result  # noqa: E402
from multiquant.options import METHOD_NAMES as METHODS  # noqa: E402

MODEL = "mnist_dit"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", default=None, help="quant_cache.pkl of the scored random mnist_dit configurations")
    p.add_argument("--predictor", default=None, help="trained predictor directory (default: train one on --cache)")
    p.add_argument("--budgets", default=None, help="comma list of average-bit budgets (default 3.3,3.5,3.7,3.9; "
                                                   "--tiny: four budgets above the tiny model's minimum)")
    p.add_argument("--num_images", type=int, default=None, help="images per configuration (default 1000, the "
                                                                "dataset's protocol)")
    p.add_argument("--image_seed", type=int, default=42)
    p.add_argument("--target", default="-1*FID-GT-1k", help="predictor target (when training here)")
    p.add_argument("--quick", action="store_true", help="lighter predictor training (demo --quick settings)")
    p.add_argument("--greedy_methods", default="kmeans_all,mse",
                   help="methods of the greedy baseline, comma list; greedy_fid = the best of them at each budget "
                        "(K-Means-C is left out by default: its per-channel codebooks cost ~0.7 bits on 192-wide "
                        "layers, so it cannot meet 3.3-3.6 bits)")
    p.add_argument("--sensitivity_file", default=None, help="per-layer sensitivity JSON for the greedy baseline, "
                   "used for every greedy method (default: measured here at 3 bits with each method)")
    p.add_argument("--sensitivity_images", type=int, default=100, help="images per layer when measuring it here")
    p.add_argument("--no_greedy", action="store_true")
    p.add_argument("--num_random", type=int, default=24, help="--tiny without --cache: random configurations to score")
    p.add_argument("--tiny", action="store_true", help="tiny random mnist_dit (smoke check of this script)")
    p.add_argument("--device", default=None)
    p.add_argument("--mq", default=None, help="multiquantizer (default multiquantizers/mnist_dit_mq.safetensors)")
    p.add_argument("--workdir", default=None, help="predictor, configurations and scored runs "
                                                   "(default benchmarks/results/pareto_mnist_dit[_tiny]_work)")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    p.add_argument("--search_rounds", type=int, default=0, help="rounds of the measured search (0 = off)")
    p.add_argument("--search_per_budget", type=int, default=3, help="search: new configurations per budget per round")
    p.add_argument("--search_seed", type=int, default=0)
    p.add_argument("--confirm_seed", type=int, default=43, help="image seed of the re-scoring of every pick "
                                                                "(with --search_rounds)")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------- pure parts
def best_random(records, budget: float) -> dict:
    """Best (lowest) FID of the random configurations with avg_bits >= budget and with avg_bits <= budget."""
    above = [r for r in records if float(r["avg_bits"]) >= budget]
    within = [r for r in records if float(r["avg_bits"]) <= budget]

    def best(rows):
        return min(rows, key=lambda r: float(r["FID-GT-1k"])) if rows else None

    a, w = best(above), best(within)
    return {"best_random_fid": float(a["FID-GT-1k"]) if a else None,
            "best_random_avg_bits": float(a["avg_bits"]) if a else None, "n_random_at_least": len(above),
            "best_random_fid_within_budget": float(w["FID-GT-1k"]) if w else None,
            "best_random_within_avg_bits": float(w["avg_bits"]) if w else None, "n_random_within": len(within)}


def comparable(records, num_images: int) -> bool:
    """The dataset's FIDs were measured on as many images (FID depends strongly on the sample size)."""
    counts = {r.get("num_images") for r in records} - {None}
    return not counts or counts == {num_images}


def tiny_budgets(table) -> list[float]:
    """Four budgets above the tiny model's minimum (its per-layer overhead puts it far above 3-4 bits)."""
    import numpy as np

    low = table.min_avg_bits()
    return [round(float(b), 2) for b in np.ceil(low * 10) / 10 + np.array([0.1, 0.3, 0.5, 0.7])]


def budget_tag(budget: float) -> str:
    return str(int(round(budget * 10)))


def search_fields(search: dict, budget: float, confirmed: dict, name: str, greedy_method: str | None) -> dict:
    """The search's columns of one budget row (``autobuild.search`` result + confirmation FIDs)."""
    best = search["best"].get(f"{budget:g}")
    return {"search_fid": best["fid"] if best else None, "search_avg_bits": best["avg_bits"] if best else None,
            "search_source": best["source"] if best else None, "search_measured": search["settings"]["n_search"],
            "search_fid_confirm": confirmed.get(f"search_{budget_tag(budget)}"), "fid_confirm": confirmed.get(name),
            "greedy_fid_confirm": confirmed.get(f"greedy_{greedy_method}_{budget_tag(budget)}")}


# ---------------------------------------------------------------------------------------- steps
def score_named(scorer, settings: dict, items: list[tuple[str, dict]], outdir: Path, kind: str, log) -> dict:
    """Score ``(name, config)`` items with the eval-configs loop (resumable store); {name: record}."""
    import hashlib
    import json

    from multiquant.evaluate import score_into_store
    from multiquant.store import RecordStore

    names = [n for n, _ in items]
    # one resumable store per set of named configurations: a re-run with other budgets, baselines or a
    # retrained predictor (other built configurations) starts its own instead of reusing stale records
    digest = hashlib.sha256(json.dumps([[n, dict(c)] for n, c in items], sort_keys=True).encode()).hexdigest()
    outdir = outdir / digest[:10]
    store = RecordStore(outdir, dict(settings, kind=kind, names=names))
    score_into_store(scorer, store, [(i, c) for i, (_, c) in enumerate(items)],
                     extra_of=lambda i: {"name": items[i][0]}, log=log)
    return {r["name"]: r for r in store.records()}


def random_dataset(args, scorer, settings, workdir: Path, log) -> tuple[list[dict], str]:
    from multiquant.evaluate import random_configs, score_into_store
    from multiquant.store import RecordStore, load_quant_cache

    if args.cache:
        return load_quant_cache(args.cache), str(args.cache)
    if not args.tiny:
        raise SystemExit("pass --cache quant_caches/mnist_dit/quant_cache.pkl (the scored random dataset)")
    store = RecordStore(workdir / "random", dict(settings, kind="random", seed=0, num_archs=args.num_random))
    score_into_store(scorer, store, random_configs(scorer.mq.layers, 0, args.num_random), log=log)
    return store.records(), str(store.cache_path)


def predictor_dir(args, records, cache_path: str, workdir: Path, log) -> tuple[Path, dict]:
    import json

    if args.predictor:
        path = Path(args.predictor)
        return path, json.loads((path / "metrics.json").read_text())
    from autobuild.dag import family_dag, units
    from autobuild.pipeline import FULL, QUICK
    from autobuild.train import TrainOptions, train_predictor

    s = QUICK if (args.quick or args.tiny) else FULL
    graph = family_dag(MODEL, "tiny" if args.tiny else "full", "cpu" if args.tiny else "meta")
    out = workdir / "predictor"
    folds = min(s.folds, max(2, len(records) // 6))
    log(f"training the predictor on {len(records)} configurations ({folds} folds) -> {out}")
    metrics = train_predictor(records, graph, args.target, folds=folds, epochs=s.epochs, batch_size=s.batch_size,
                              out_dir=out, units=units(graph, "block"), log=None,
                              options=TrainOptions(hidden=s.hidden, lr=s.lr, patience=s.patience, workers=s.workers))
    log(f"  held-out SRCC {metrics['srcc_mean']:.3f}, NDCG@10 {metrics['ndcg10_mean']:.3f}")
    return out, metrics


def greedy_configs(args, budgets, workdir: Path, log) -> dict[str, dict]:
    """{name: config} of the greedy knapsack at every budget and method (multiquant.allocation)."""
    from multiquant import allocation, sensitivity
    from multiquant.config import load_config
    from multiquant.families import get_family

    from multiquant.flops import flops_path, flops_table, write_flops_file

    flops_file = flops_path(workdir / "flops", MODEL, args.tiny)
    if not flops_file.exists():  # once, not once per budget
        write_flops_file(flops_table(MODEL, tiny=args.tiny), flops_file)
    out = {}
    for method in [m.strip() for m in args.greedy_methods.split(",") if m.strip()]:
        sens_file = args.sensitivity_file
        if sens_file is None:
            log(f"measuring per-layer sensitivity ({method}, 3 bits, {args.sensitivity_images} images per layer)")
            protocol, settings = sensitivity.setup_protocol(
                get_family(MODEL), tiny=args.tiny, device=args.device, num_prompts=args.sensitivity_images,
                image_seed=args.image_seed, pixel_features=args.tiny, fid_against="fp", log=log)
            sens_file = sensitivity.run_sensitivity(protocol, settings, workdir / "sensitivity", 3, method,
                                                    log=log)["path"]
        for budget in budgets:
            ns = Namespace(sensitivity_file=sens_file, flops_file=str(flops_file), budget_bits=budget,
                           budget_multiplier=None,
                           bits="3,4", method=method, solver="greedy", unmeasured="highest", model=MODEL,
                           outdir=str(workdir / "greedy"))
            try:
                report = allocation.optimize(ns, log=lambda msg: None)
            except allocation.BudgetError as err:
                log(f"  greedy {method} at {budget}: {err}")
                continue
            out[f"greedy_{method}_{budget_tag(budget)}"] = dict(load_config(report["reference_config"]))
    return out


def measured_search(args, scorer, settings: dict, records, budgets, workdir: Path, log) -> dict:
    """The closed-loop search from the dataset records (resumable store; one per settings)."""
    import hashlib
    import json

    from autobuild.search import measured_search as run
    from multiquant.utils import write_text_atomic

    key = json.dumps([settings, budgets, args.search_per_budget, args.search_seed], sort_keys=True, default=str)
    store = workdir / "search" / hashlib.sha256(key.encode()).hexdigest()[:10]
    log(f"measured search: {args.search_rounds} rounds x {args.search_per_budget} per budget -> {store}")
    result = run(scorer, settings, records, budgets, store, args.search_rounds, args.search_per_budget,
                 args.search_seed, log=log)
    result["path"] = str(write_text_atomic(store / "search.json", json.dumps(result, indent=1)))  # every round
    return result


def confirm(args, family, device, mq_path, items: list[tuple[str, dict]], workdir: Path, log) -> dict:
    """Re-score ``(name, config)`` items with another image seed (else the same protocol): {name: FID}."""
    from multiquant.evaluate import setup_scorer

    scorer, settings = setup_scorer(family, tiny=args.tiny, device=device, mq_path=mq_path,
                                    num_images=args.num_images, image_seed=args.confirm_seed, log=log)
    scored = score_named(scorer, settings, items, workdir / "confirm", "confirm", log)
    return {name: float(r["FID-GT-1k"]) for name, r in scored.items()}


def plot(result: dict, records, scored: dict, path: Path, search: dict | None = None) -> Path:
    """FID vs avg_bits; the random cloud only when its FIDs are comparable (same number of images)."""
    from autobuild.report import classify_scored, plot_measured

    rows = [{"name": f"search_{budget_tag(float(b))}", "kind": "search", "budget": float(b),
             "avg_bits": float(p["avg_bits"]), "fid": float(p["fid"])}
            for b, p in (search or {}).get("best", {}).items() if p]
    for name, r in scored.items():
        kind, budget = classify_scored(name, MODEL)
        rows.append({"name": name, "kind": kind, "budget": budget, "avg_bits": float(r["avg_bits"]),
                     "fid": float(r["FID-GT-1k"])})
    title = f"{MODEL}{' (tiny)' if result['settings']['tiny'] else ''}: FID vs average bits, " \
            f"{result['settings']['num_images']} images"
    if not result["random"]["comparable"]:
        title += " (random dataset not shown: other image count)"
    return plot_measured(records if result["random"]["comparable"] else [], rows, path, title)


# ---------------------------------------------------------------------------------------- main
def main(argv=None) -> dict:
    import torch

    from autobuild.configs import BudgetError, build_config, predictor_scores
    from multiquant.options import OptionTable
    from multiquant.config import uniform_config
    from multiquant.evaluate import setup_scorer
    from multiquant.families import get_family

    args = parse_args(argv)
    started = time.perf_counter()
    log = print
    tag = f"pareto_{MODEL}{'_tiny' if args.tiny else ''}"
    out_dir = Path(args.out) if args.out else RESULTS
    workdir = Path(args.workdir) if args.workdir else RESULTS / f"{tag}_work"
    family = get_family(MODEL)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    mq_path = Path(args.mq) if args.mq else (workdir / "mnist_dit_tiny_mq.safetensors" if args.tiny else None)
    scorer, settings = setup_scorer(family, tiny=args.tiny, device=device, mq_path=mq_path,
                                    num_images=args.num_images, image_seed=args.image_seed, log=log)
    table = OptionTable.from_source(scorer.mq)
    timings = {"setup_s": time.perf_counter() - started}

    records, cache_path = random_dataset(args, scorer, settings, workdir, log)
    pred_dir, metrics = predictor_dir(args, records, cache_path, workdir, log)
    timings["predictor_s"] = time.perf_counter() - started - sum(timings.values())

    budgets = ([float(b) for b in args.budgets.split(",")] if args.budgets
               else tiny_budgets(table) if args.tiny else [3.3, 3.5, 3.7, 3.9])
    scores, _, _ = predictor_scores(pred_dir, table, family, "block", "tiny" if args.tiny else "full", log=None)
    built = {}
    for budget in budgets:
        try:
            b = build_config(pred_dir, table, family, budget, "block", out_dir=workdir / "configs", scores=scores)
        except BudgetError as err:
            log(f"budget {budget}: {err}")
            continue
        built[b.path.stem] = b
    timings["build_s"] = time.perf_counter() - started - sum(timings.values())

    greedy = {} if args.no_greedy else greedy_configs(args, budgets, workdir, log)
    timings["greedy_s"] = time.perf_counter() - started - sum(timings.values())

    items = [(name, b.config) for name, b in built.items()] + list(greedy.items())
    items += [(f"uniform_{m}-4", uniform_config(scorer.mq.layers, f"{m}-4")) for m in METHODS]
    items.append(("fp16", uniform_config(scorer.mq.layers, "fp16")))
    scored = score_named(scorer, settings, items, workdir / "scored", "given", log)
    timings["scoring_s"] = time.perf_counter() - started - sum(timings.values())

    search, confirmed = None, {}
    if args.search_rounds > 0:
        searched = [b for b in budgets if f"{MODEL}_{budget_tag(b)}" in built]  # those with a row
        search = measured_search(args, scorer, settings, records, searched, workdir, log)
        timings["search_s"] = time.perf_counter() - started - sum(timings.values())
        picks = [(f"search_{budget_tag(float(b))}", best["config"]) for b, best in search["best"].items() if best]
        confirmed = confirm(args, family, device, mq_path, picks + [(n, dict(c)) for n, c in items], workdir, log)
        timings["confirm_s"] = time.perf_counter() - started - sum(timings.values())

    if not comparable(records, settings["num_images"]):
        log(f"note: the dataset's FIDs use {sorted({r.get('num_images') for r in records} - {None})} images, these "
            f"{settings['num_images']}: best_random_* are not comparable (use the dataset's --num_images)")
    rows = []
    for budget in budgets:
        name = f"{MODEL}_{budget_tag(budget)}"
        if name not in scored:
            continue
        rec, b = scored[name], built[name]
        greedy_rows = {m: scored.get(f"greedy_{m}_{budget_tag(budget)}") for m in METHODS}
        greedy_rows = {m: {"fid": float(r["FID-GT-1k"]), "avg_bits": float(r["avg_bits"])}
                       for m, r in greedy_rows.items() if r is not None}
        first = min(greedy_rows.values(), key=lambda g: g["fid"]) if greedy_rows else None
        rows.append({"budget": budget, "avg_bits": float(rec["avg_bits"]), "fid": float(rec["FID-GT-1k"]),
                     "predicted_score": b.predicted_score, **best_random(records, budget),
                     "greedy_fid": first["fid"] if first else None,
                     "greedy_avg_bits": first["avg_bits"] if first else None,
                     "greedy_method": next((m for m, g in greedy_rows.items() if g is first), None),
                     "greedy": greedy_rows,
                     "config_path": str(b.path)})
        if search is not None:
            rows[-1].update(search_fields(search, budget, confirmed, name, rows[-1]["greedy_method"]))
            for m, g in greedy_rows.items():
                g["fid_confirm"] = confirmed.get(f"greedy_{m}_{budget_tag(budget)}")
    result = {
        "model": MODEL, "budgets": rows,
        "uniform4_fid": {m: float(scored[f"uniform_{m}-4"]["FID-GT-1k"]) for m in METHODS},
        "uniform4_avg_bits": {m: float(scored[f"uniform_{m}-4"]["avg_bits"]) for m in METHODS},
        "fp16_fid": float(scored["fp16"]["FID-GT-1k"]),
        "random": {"n": len(records), "cache": cache_path,
                   "comparable": comparable(records, settings["num_images"]),
                   "best_fid": min(float(r["FID-GT-1k"]) for r in records),
                   "avg_bits_range": [min(float(r["avg_bits"]) for r in records),
                                      max(float(r["avg_bits"]) for r in records)]},
        "predictor": {"dir": str(pred_dir), "target": metrics.get("target"), "srcc_mean": metrics.get("srcc_mean"),
                      "ndcg10_mean": metrics.get("ndcg10_mean"), "folds": metrics.get("folds_k")},
        "greedy": {"methods": args.greedy_methods, "solver": "multiquant.allocation.solve_greedy, bits {3, 4}",
                   "enabled": not args.no_greedy, "greedy_fid": "best over the methods at each budget"},
        "settings": {"tiny": args.tiny, "num_images": settings["num_images"], "image_seed": args.image_seed,
                     "feature_net": settings.get("feature_net"), "reference": settings.get("reference"),
                     "level": "block", "solver": "scipy.optimize.milp (exact)", "device": device},
        "environment": environment(), "timings": timings, "seconds": time.perf_counter() - started,
    }
    if search is not None:
        result["uniform4_fid_confirm"] = {m: confirmed[f"uniform_{m}-4"] for m in METHODS}
        result["fp16_fid_confirm"] = confirmed["fp16"]
        result["search"] = {**search["settings"], "store": search["store"], "result": search["path"],
                            "confirm_seed": args.confirm_seed,
                            "scored_this_run": search["scored_this_run"],
                            "picks": {b: None if p is None else {k: p[k] for k in ("fid", "avg_bits", "source")}
                                      for b, p in search["best"].items()}}
    png = plot(result, records, scored, out_dir / f"{tag}.png", search)
    result["plot"] = str(png)
    write_result(tag, result, out_dir)
    return result


if __name__ == "__main__":
    main()
