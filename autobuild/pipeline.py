"""The predictor half of ``qua2sedimo demo``: train on a scored dataset, build budgeted configurations,
write the insights and the report.

``demo_predictor_stage(cache, outdir, quick, log)`` is what ``qua2sedimo.demo`` calls with the shipped
MNIST-DiT dataset; :func:`predictor_stage` is the same for any family and settings.

Layout under ``outdir``: ``predictor/`` (fold ensemble, metrics, cached unit scores), ``quant_configs/``
(``<model>_<bits x 10>.pkl/.json`` per budget), ``report/`` (``index.html`` and its pictures).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

__all__ = ["StageSettings", "QUICK", "FULL", "DEMO_BUDGETS", "DEMO_TARGET", "predictor_stage",
           "demo_predictor_stage"]

DEMO_TARGET = "-1*FID-GT-1k"  # quality only: the bit budget is a constraint of the knapsack, not a penalty
DEMO_BUDGETS = (3.5, 3.7)  # where the model reaches them (configs.default_budgets); the report's: its own default


@dataclass(frozen=True)
class StageSettings:
    folds: int
    epochs: int
    patience: int
    hidden: int
    batch_size: int
    lr: float
    workers: int  # folds trained in parallel processes
    samples: int  # FP16 vs quantized images per grid in the report (0: none)


# quick: 1-2 minutes of training on 2 CPU cores; full: 5 folds, more epochs (several minutes)
QUICK = StageSettings(folds=3, epochs=100, patience=25, hidden=32, batch_size=128, lr=1e-3, workers=2, samples=8)
FULL = StageSettings(folds=5, epochs=300, patience=40, hidden=64, batch_size=128, lr=1e-3, workers=2, samples=16)


def _table_for(records, outdir: Path, model: str, fp_prec: int):
    """The option table the dataset was scored with (its records carry every option of every layer after a
    few hundred configurations); the demo's multiquantizer when the records miss an option."""
    from multiquant.options import OptionTable

    try:
        return OptionTable.from_records(records, fp_prec)
    except ValueError:
        mq = outdir / f"{model}_mq.safetensors"
        if not mq.exists():
            raise
        return OptionTable.from_source(mq)


def predictor_stage(cache_path: str | Path, outdir: str | Path, model: str = "mnist_dit",
                    settings: StageSettings = QUICK, target: str = DEMO_TARGET,
                    budgets: Sequence[float] | None = None, size: str = "full", loss: str = "srcc",
                    seed: int = 12345, log: Callable[[str], None] | None = print) -> dict:
    """Train -> unit scores -> configurations at ``budgets`` (None: DEMO_BUDGETS where the model reaches them,
    configs.default_budgets) -> report. Returns the summary dict."""
    from multiquant.families import get_family
    from multiquant.store import load_quant_cache

    from .configs import BudgetError, budgets_or_default, build_config
    from .dag import family_dag, units
    from .report import build_report
    from .scores import unit_scores_for
    from .train import TrainOptions, train_predictor

    say = log or (lambda msg: None)
    started = time.perf_counter()
    outdir = Path(outdir)
    spec = get_family(model)
    records = load_quant_cache(cache_path)
    graph = family_dag(spec, size=size, device="meta" if size == "full" else "cpu")
    table = _table_for(records, outdir, spec.name, spec.fp_prec)
    predictor_dir = outdir / "predictor"

    say(f"    training the predictor on {len(records)} scored configurations ({settings.folds} folds, "
        f"<= {settings.epochs} epochs, target {target})")
    options = TrainOptions(hidden=settings.hidden, patience=settings.patience, lr=settings.lr,
                           workers=settings.workers)
    metrics = train_predictor(records, graph, target, loss=loss, folds=settings.folds, epochs=settings.epochs,
                              batch_size=settings.batch_size, seed=seed, out_dir=predictor_dir,
                              units=units(graph, "block"), options=options, log=None)
    say(f"    held-out SRCC {metrics['srcc_mean']:.3f}, NDCG@10 {metrics['ndcg10_mean']:.3f} "
        f"({metrics['timings']['wall_seconds']:.0f} s)")

    t0 = time.perf_counter()
    block = unit_scores_for(predictor_dir, graph, table, "block")
    unit_scores_for(predictor_dir, graph, table, "node")
    say(f"    unit scores: {block.num_variants:,} block-level variants in {time.perf_counter() - t0:.1f} s")

    pareto = []
    for budget in budgets_or_default(budgets, table, DEMO_BUDGETS, say):
        try:
            built = build_config(predictor_dir, table, spec, budget, "block", out_dir=outdir / "quant_configs",
                                 size=size, scores=block)
        except BudgetError as err:
            say(f"    budget {budget}: {err}")
            continue
        pareto.append({"budget": budget, "avg_bits": built.avg_bits, "predicted_score": built.predicted_score,
                       "config_path": str(built.path)})
        say(f"    {built.path.name}: {built.avg_bits:.3f} avg bits (budget {budget})")

    mq_path = outdir / f"{spec.name}_mq.safetensors"
    if not mq_path.exists():  # the demo's --quick uses the shipped checkpoint
        from multiquant.paths import multiquantizer_path

        mq_path = multiquantizer_path(f"{spec.name}_mq.safetensors")
    report = build_report(predictor_dir, cache_path, outdir / "report", table=table, model=spec.name, size=size,
                          budgets=None, samples=settings.samples if mq_path.exists() else 0,
                          mq=mq_path if mq_path.exists() else None, log=None)
    say(f"    report: {report}")
    return {"predictor": {"srcc_mean": metrics["srcc_mean"], "ndcg10_mean": metrics["ndcg10_mean"],
                          "target": target, "folds": settings.folds, "dir": str(predictor_dir),
                          "baselines": {k: v["srcc_mean"] for k, v in metrics["baselines"].items()}},
            "pareto": pareto, "report": str(report), "predictor_stage_seconds": time.perf_counter() - started}


def demo_predictor_stage(cache_path: str | Path, outdir: str | Path, quick: bool = False,
                         log: Callable[[str], None] | None = print, model: str = "mnist_dit") -> dict:
    """``qua2sedimo demo``'s stage 4 on an embedded testbed's shipped dataset (``quick``: lighter training)."""
    return predictor_stage(cache_path, outdir, model, QUICK if quick else FULL, log=log)
