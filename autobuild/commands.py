"""The autobuild half's subcommands of ``qua2sedimo`` (``register`` adds them; ``qua2sedimo.cli`` collects)."""
from __future__ import annotations

import argparse

from multiquant.errors import UserError


def cmd_dag(args) -> int:
    from .dag.cli import run_dag

    if args.tiny and args.full_size:
        raise UserError("dag: --tiny and --full-size contradict each other: pass one")
    run_dag(args.model, full_size=not args.tiny, out=args.out, render=not args.no_render, pretrained=args.pretrained)
    return 0


def cmd_train_predictor(args) -> int:
    from .train_predictor import run_train_predictor

    return run_train_predictor(args)


def cmd_build_config(args) -> int:
    from .configs import run_build_config

    return run_build_config(args)


def cmd_report(args) -> int:
    from .report import run_report

    return run_report(args)


def cmd_search(args) -> int:
    from .search import run_search

    return run_search(args)


def cmd_optimize(args) -> int:
    from .optimize import run_optimize

    run_optimize(args)
    return 0


def register(sub) -> None:
    """Add this half's subcommands to the ``qua2sedimo`` sub-parsers (each with ``func`` set)."""
    from .configs import add_build_config_arguments
    from .dag.cli import add_dag_arguments
    from .report import add_report_arguments
    from .search import add_search_arguments
    from .train_predictor import add_train_predictor_arguments

    p = add_dag_arguments(sub.add_parser("dag", help="trace a denoiser into a DAG and render it (dag_plots/)"))
    p.set_defaults(func=cmd_dag)

    p = sub.add_parser("train-predictor", help="train the GNN predictor (5-fold ensemble) on a quant_cache.pkl",
                       description="Train the GNN predictor on a scored-configuration cache (K-fold CV + fold "
                                   "ensemble).", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_train_predictor_arguments(p).set_defaults(func=cmd_train_predictor)

    p = sub.add_parser("build-config", help="best predicted configuration under an average-bits budget (exact "
                                            "knapsack); --pareto sweeps budgets",
                       description="Best predicted quantization configuration under an average-bit budget (exact "
                                   "multiple-choice knapsack over the predictor's unit scores).")
    add_build_config_arguments(p).set_defaults(func=cmd_build_config)

    p = sub.add_parser("report", help="one HTML page: predictor quality, Pareto fronts, sensitivity insights, samples",
                       description="One HTML page: predictor quality, Pareto fronts (predicted and measured), "
                                   "sensitivity insights, sample grids.")
    add_report_arguments(p).set_defaults(func=cmd_report)

    p = sub.add_parser("search", help="measured budgeted search: Thompson sampling over a Bayesian linear model of "
                                      "log FID, exact knapsack per proposal, resumable",
                       description="Closed-loop, measured search for budgeted configurations: Thompson sampling "
                                   "over a Bayesian linear model.")
    add_search_arguments(p).set_defaults(func=cmd_search)

    from .optimize import add_optimize_arguments

    p = sub.add_parser("optimize", help="robust budgeted optimiser: uniform anchors, one-layer sweeps, exact knapsack "
                                        "per method, surrogate rounds (best-validated model), fresh-seed confirmation",
                       description="One robust optimiser for budgeted configurations, measured with the dataset "
                                   "protocol; returns per budget the best confirmed configuration.")
    add_optimize_arguments(p).set_defaults(func=cmd_optimize)
