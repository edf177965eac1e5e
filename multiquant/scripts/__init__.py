"""Per-model entry points: ``python multiquant/scripts/<model>_<task>.py [flags]``.

Each script is the ``qua2sedimo <task>`` command with ``--model <model>`` preset; every flag of the
command works (``--help`` lists them)."""
import sys

TASKS = {"multiquantizer": "multiquantizer", "eval_random": "eval-random", "infer": "infer"}


def run(task: str, model: str) -> None:
    from qua2sedimo.cli import main

    sys.exit(main([TASKS[task], "--model", model, *sys.argv[1:]]))
