"""Data and output paths. Each one is overridable by an environment variable and by a CLI flag.

Resolution order for every path: CLI flag > environment variable > default below.
"""
import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent


def _path(env: str, default: Path | str | None) -> Path | None:
    value = os.environ.get(env)
    if value:
        return Path(value).expanduser()
    return Path(default) if default is not None else None


# Real data shipped beside the repository (../shared/data); see the README for the layout.
DATA_DIR = _path("QUA2SEDIMO_DATA", REPO_ROOT.parent / "shared" / "data")
COCO_2017_PROMPTS = _path("QUA2SEDIMO_COCO_CAPTIONS", DATA_DIR / "coco" / "captions_val2017.json")
COCO_2017_IMAGES = _path("QUA2SEDIMO_COCO_IMAGES", None)  # folder of val2017 JPEGs (FID reference set)
IMAGENET_VAL_IMAGES = _path("QUA2SEDIMO_IMAGENET_VAL", None)  # ImageNet val folder (DiT reference set)
PARTI_PROMPTS = _path("QUA2SEDIMO_PARTI_PROMPTS", DATA_DIR / "prompts" / "PartiPrompts.tsv")
MNIST_DIR = _path("QUA2SEDIMO_MNIST", DATA_DIR / "mnist")

# Outputs and caches.
MULTIQUANTIZER_DIR = _path("QUA2SEDIMO_MULTIQUANTIZERS", REPO_ROOT / "multiquantizers")
QUANT_CONFIG_DIR = _path("QUA2SEDIMO_QUANT_CONFIGS", REPO_ROOT / "quant_configs")
DAG_PLOT_DIR = _path("QUA2SEDIMO_DAG_PLOTS", REPO_ROOT / "dag_plots")
RESULTS_DIR = _path("QUA2SEDIMO_RESULTS", REPO_ROOT / "results")
STATS_CACHE_DIR = _path("QUA2SEDIMO_STATS_CACHE", Path.home() / ".cache" / "qua2sedimo" / "stats")
