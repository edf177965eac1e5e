"""Drive every qua2sedimo command over one family with tiny settings (CPU): the shared body of the
bring-your-own-denoiser tests. ``family`` is the flag list that names the family."""
from __future__ import annotations

import json
from pathlib import Path

from multiquant.store import load_quant_cache


def run(argv: list[str]) -> None:
    from qua2sedimo.cli import main

    rc = main([str(a) for a in argv])
    assert rc == 0, f"qua2sedimo {' '.join(map(str, argv))} exited {rc}"


def every_command(family: list[str], name: str, work: Path, cls_id: int | None = 1, budget: float = 3.5) -> dict:
    """inspect ... load-check on ``family`` (tiny random weights); returns what the checks need."""
    mq = work / "mq" / f"{name}_tiny_mq.safetensors"
    tiny = [*family, "--tiny", "--device", "cpu"]
    run(["inspect", *tiny, "--json"])
    run(["multiquantizer", *tiny, "--out", mq])
    run(["eval-random", *tiny, "--mq", mq, "--outdir", work / "random", "--num_archs", 6, "--num_images", 8])
    run(["eval-configs", *tiny, "--mq", mq, "--outdir", work / "baselines", "--uniform", "mse-4,kmeans-3", "--fp16",
         "--num_images", 8])
    run(["sensitivity", *tiny, "--sensitivity_bits", 3, "--num_prompts", 6, "--max_layers", 3, "--outdir", work / "sens"])
    sens = work / "sens" / f"sensitivity_analysis_{name}_tiny_3bit.json"
    run(["flops", *family, "--tiny", "--out", work / "flops.json"])
    run(["optimize-mixed-precision", "--sensitivity_file", sens, "--budget_multiplier", 0.9, "--unmeasured", "lowest",
         "--out", work / "allocation"])
    run(["dag", *family, "--out", work / "dag"])
    run(["train-predictor", *family, "--cache", work / "random" / "quant_cache.pkl", "--out", work / "predictor",
         "--size", "tiny", "--epochs", 3, "--folds", 2, "--hidden", 8])
    run(["build-config", *family, "--predictor", work / "predictor", "--mq", mq, "--size", "tiny", "--avg_bits", budget,
         "--out", work / "configs", "--name", "mine"])
    config = next((work / "configs").glob("*.json"))
    run(["search", *tiny, "--cache", work / "random" / "quant_cache.pkl", "--mq", mq, "--budgets", budget,
         "--rounds", 1, "--per_budget", 1, "--num_images", 8, "--out", work / "search"])
    run(["report", *family, "--predictor", work / "predictor", "--cache", work / "random" / "quant_cache.pkl",
         "--mq", mq, "--size", "tiny", "--budgets", budget, "--samples", 2, "--tiny", "--device", "cpu",
         "--out", work / "report"])
    classes = [] if cls_id is None else ["--cls_id", cls_id]  # None: an unconditional family
    run(["infer", *tiny, "--q_config", config, "--mq", mq, *classes, "--n_imgs", 2,
         "--outdir", work / "samples"])
    run(["export", *tiny, "--q_config", config, "--mq", mq, "--out", work / "export"])
    run(["load-check", work / "export", *family, "--tiny", "--device", "cpu", "--compare", "--mq", mq,
         "--tolerance", 1e-5])
    run(["infer", *family, "--export", work / "export", "--device", "cpu", "--n_imgs", 2, "--outdir", work / "samples"])
    return {"records": load_quant_cache(work / "random" / "quant_cache.pkl"),
            "baselines": load_quant_cache(work / "baselines" / "quant_cache.pkl"),
            "sensitivity": json.loads(sens.read_text()), "dag": sorted((work / "dag").glob("*.dag.json")),
            "search": work / "search", "report": work / "report", "samples": work / "samples"}
