"""Data and output paths. Each one is overridable by an environment variable and by a CLI flag.

Resolution order for every path: CLI flag > environment variable > default below.

- Data (MNIST idx files, COCO captions and images, PartiPrompts, ImageNet val) has no default location: set
  ``QUA2SEDIMO_DATA`` (a folder with ``mnist/``, ``coco/captions_val2017.json``, ``prompts/PartiPrompts.tsv``) or
  the variable / flag of each file; a missing one fails with a message naming both.
- Outputs default to folders of the current working directory (run from the repository root, these are the
  repository's example-output folders), never to the installed package's folder.
- ``SHIPPED_*``: what the project ships, read-only (the pre-scored mnist_dit dataset, its multiquantizer and
  searched configurations); beside this file in the repository, and installed with the package.

Installed (``pip install .``), this module is ``multiquant._top.constants``; code reads it through
:mod:`multiquant.paths`, which also finds it in a source checkout.
"""
import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent  # the repository root; installed: the folder holding the shipped data


def _path(env: str, default: Path | str | None) -> Path | None:
    value = os.environ.get(env)
    if value:
        return Path(value).expanduser()
    return Path(default) if default is not None else None


# Real data: nothing is assumed beside the repository.
DATA_DIR = _path("QUA2SEDIMO_DATA", None)
COCO_2017_PROMPTS = _path("QUA2SEDIMO_COCO_CAPTIONS", DATA_DIR / "coco" / "captions_val2017.json" if DATA_DIR else None)
COCO_2017_IMAGES = _path("QUA2SEDIMO_COCO_IMAGES", None)  # folder of val2017 JPEGs (FID reference set)
IMAGENET_VAL_IMAGES = _path("QUA2SEDIMO_IMAGENET_VAL", None)  # ImageNet val folder (DiT reference set)
PARTI_PROMPTS = _path("QUA2SEDIMO_PARTI_PROMPTS", DATA_DIR / "prompts" / "PartiPrompts.tsv" if DATA_DIR else None)
MNIST_DIR = _path("QUA2SEDIMO_MNIST", DATA_DIR / "mnist" if DATA_DIR else None)

# Shipped with the project (read-only).
SHIPPED_MULTIQUANTIZER_DIR = REPO_ROOT / "multiquantizers"
SHIPPED_CACHE_DIR = REPO_ROOT / "quant_caches"
SHIPPED_CONFIG_DIR = REPO_ROOT / "quant_configs"

# Outputs and caches: relative to the current working directory.
MULTIQUANTIZER_DIR = _path("QUA2SEDIMO_MULTIQUANTIZERS", "multiquantizers")
QUANT_CONFIG_DIR = _path("QUA2SEDIMO_QUANT_CONFIGS", "quant_configs")
DAG_PLOT_DIR = _path("QUA2SEDIMO_DAG_PLOTS", "dag_plots")
RESULTS_DIR = _path("QUA2SEDIMO_RESULTS", "results")
STATS_CACHE_DIR = _path("QUA2SEDIMO_STATS_CACHE", Path.home() / ".cache" / "qua2sedimo" / "stats")
