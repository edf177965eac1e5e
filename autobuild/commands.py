"""The autobuild half's subcommands of ``qua2sedimo`` (``register`` adds them; ``qua2sedimo.cli`` collects)."""
from __future__ import annotations

import argparse
from typing import Callable

from multiquant.errors import UserError


def cmd_dag(args) -> int:
    from .dag.cli import run_dag

    if args.tiny and args.full_size:
        raise UserError("dag: --tiny and --full-size contradict each other: pass one")
    run_dag(args.model, full_size=not args.tiny, out=args.out, render=not args.no_render, pretrained=args.pretrained)
    return 0


def _exit_status(run: Callable) -> Callable[[argparse.Namespace], int]:
    """``run(args)`` as a command: an int it returns is the exit status; anything else (a summary) means 0."""
    def command(args) -> int:
        status = run(args)
        return status if isinstance(status, int) else 0

    return command


def _add(sub, name: str, add_arguments: Callable, run: Callable, help: str, description: str | None = None,
         show_defaults: bool = False) -> None:
    extra = {"formatter_class": argparse.ArgumentDefaultsHelpFormatter} if show_defaults else {}
    parser = sub.add_parser(name, help=help, description=description, **extra)
    add_arguments(parser)
    parser.set_defaults(func=_exit_status(run))


def register(sub) -> None:
    """Add this half's subcommands to the ``qua2sedimo`` sub-parsers (each with ``func`` set): a command is its
    flags (``add_*_arguments(parser)``) and its runner (``run_*(args)``), one ``_add`` line each."""
    from .configs import add_build_config_arguments, run_build_config
    from .dag.cli import add_dag_arguments
    from .optimize import add_optimize_arguments, run_optimize
    from .report import add_report_arguments, run_report
    from .search import add_search_arguments, run_search
    from .train_predictor import add_train_predictor_arguments, run_train_predictor

    _add(sub, "dag", add_dag_arguments, cmd_dag, "trace a denoiser into a DAG and render it (dag_plots/)")
    _add(sub, "train-predictor", add_train_predictor_arguments, run_train_predictor,
         "train the GNN predictor (5-fold ensemble) on a quant_cache.pkl",
         "Train the GNN predictor on a scored-configuration cache (K-fold CV + fold ensemble).", show_defaults=True)
    _add(sub, "build-config", add_build_config_arguments, run_build_config,
         "best predicted configuration under an average-bits budget (exact knapsack); --pareto sweeps budgets",
         "Best predicted quantization configuration under an average-bit budget (exact multiple-choice knapsack "
         "over the predictor's unit scores).")
    _add(sub, "report", add_report_arguments, run_report,
         "one HTML page: predictor quality, Pareto fronts, sensitivity insights, samples",
         "One HTML page: predictor quality, Pareto fronts (predicted and measured), sensitivity insights, "
         "sample grids.")
    _add(sub, "search", add_search_arguments, run_search,
         "measured budgeted search: Thompson sampling over a Bayesian linear model of log FID, exact knapsack per "
         "proposal, resumable",
         "Closed-loop, measured search for budgeted configurations: Thompson sampling over a Bayesian linear model.")
    _add(sub, "optimize", add_optimize_arguments, run_optimize,
         "robust budgeted optimiser: uniform anchors, one-layer sweeps, exact knapsack per method, surrogate rounds "
         "(best-validated model), fresh-seed confirmation",
         "One robust optimiser for budgeted configurations, measured with the dataset protocol; returns per budget "
         "the best confirmed configuration.")
