"""``qua2sedimo demo``: the measured answer on an embedded testbed (the MNIST DiT by default, or ``--model
mnist_unet``), on a CPU, in about two minutes.

It scores, with one protocol (same digits, same per-image noise, MNIST-FID against held-out real digits):
FP16, the two uniform 4-bit baselines, and the best configuration at about 3.5 average bits: the shipped
measured search's pick (``quant_configs/<model>_35_search.pkl``; its ``.json`` records that origin) or, where
none is shipped, the best configuration of the shipped pre-scored dataset within 3.5 bits. It ends with a table
and a sample grid in ``<outdir>/report/index.html``. ``--full`` uses the dataset's 1,000 images and also trains
the predictor on the shipped dataset and builds its budgeted configurations (several minutes).
"""
from __future__ import annotations

import html
import json
import time
from pathlib import Path

from multiquant.config import load_config, load_config_origin, uniform_config
from multiquant.errors import UserError
from multiquant.evaluate import score_into_store, setup_scorer
from multiquant.families import get_family
from multiquant.paths import constants, multiquantizer_path, shipped_cache
from multiquant.store import RecordStore
from multiquant.utils import json_default, write_text_atomic

BUDGET = 3.5  # average bits of "the best configuration at about 3.5 bits"
UNIFORM_4BIT = ("kmeans-4", "mse-4")  # K-Means-C 4-bit: the best uniform 4-bit FID; UAQ 4-bit: the fewest bits
PRESETS = {"quick": 128, "default": 256, "full": 1000}  # images per configuration
SAMPLES = 8  # digits per configuration in the grid
# seed-to-seed spread of MNIST-FID at 1,000 images: uniform K-Means-C 4-bit scored 55.9, and 58.2 with fresh
# image seeds (benchmarks/results/pareto_mnist_dit.json); differences below this are noise
SEED_NOISE_FID_1K = 2.0


def _say(msg: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run_demo(outdir: Path, quick: bool = False, full: bool = False, device: str | None = None,
             num_images: int | None = None, mq: str | None = None, seed: int = 0, model: str = "mnist_dit") -> dict:
    """Score FP16, uniform 4-bit and the best ~3.5-bit configuration; write the report; return the summary."""
    import torch

    torch.manual_seed(seed)
    num_images = num_images or PRESETS["full" if full else "quick" if quick else "default"]
    outdir = Path(outdir)
    family = get_family(model)
    start = time.perf_counter()

    mq_path = Path(mq) if mq else multiquantizer_path(f"{model}_mq.safetensors")
    _say(f"1/3 loading {model} and its multiquantizer {mq_path} (checked against the weights; "
         f"build your own with `qua2sedimo multiquantizer --model {model}` and pass --mq)")
    scorer, settings = setup_scorer(family, device=device or "cpu", num_images=num_images, mq_path=mq_path,
                                    save_images=outdir / "images", log=_say)

    best_path, best, origin = best_shipped_config(model, BUDGET)
    items = [("fp16", uniform_config(scorer.mq.layers, "fp16"), {"kind": "fp16"})]
    items += [(f"uniform_{o}", uniform_config(scorer.mq.layers, o), {"kind": "uniform", "option": o})
              for o in UNIFORM_4BIT]
    items.append((f"best_{BUDGET}bit", best, origin))
    _say(f"2/3 scoring {len(items)} configurations x {num_images} digits (one protocol, per-image seeds) "
         f"-> {outdir / 'quant_cache.pkl'}")
    store = RecordStore(outdir, dict(settings, kind="demo", names=[n for n, _, _ in items]))
    score_into_store(scorer, store, [(i, c) for i, (_, c, _) in enumerate(items)],
                     extra_of=lambda i: {"name": items[i][0], "origin": items[i][2]}, log=lambda m: _say("    " + m))
    rows = [{"name": r["name"], "avg_bits": float(r["avg_bits"]), "fid": float(r["FID-GT-1k"]),
             "psnr_fp": r.get("psnr_fp")} for r in store.records()]

    summary = {"model": model, "num_images": num_images, "seed": seed, "image_seed": settings.get("image_seed"),
               "multiquantizer": str(mq_path), "best_config": str(best_path), "best_config_origin": origin,
               "rows": rows, "quant_cache": str(store.cache_path), "settings": settings,
               "seed_noise_fid_1k": SEED_NOISE_FID_1K}
    if full:
        from autobuild.pipeline import demo_predictor_stage

        _say("    predictor, Pareto configurations and report from the shipped pre-scored dataset")
        summary["predictor_stage"] = demo_predictor_stage(shipped_cache(model), outdir, quick=False, log=_say,
                                                          model=model)

    _say("3/3 report")
    report = write_demo_report(outdir / "report", rows, summary, outdir / "images")
    summary["report"] = str(report)
    summary["seconds"] = time.perf_counter() - start
    write_text_atomic(outdir / "summary.json", json.dumps(summary, indent=1, default=json_default))
    for line in answer_lines(rows, num_images):
        _say(line)
    _say(f"done in {summary['seconds']:.0f} s: {report}, {outdir / 'summary.json'}")
    return summary


def best_shipped_config(model: str, budget: float) -> tuple[Path, dict, dict]:
    """(file, configuration, origin) of the best configuration at about ``budget`` bits that the project ships
    for ``model``: the measured search's pick, else the lowest-FID record of the pre-scored dataset within it."""
    from multiquant.store import load_quant_cache

    search = Path(constants.SHIPPED_CONFIG_DIR) / f"{model}_{round(budget * 10)}_search.pkl"
    if search.is_file():
        return search, load_config(search), load_config_origin(search) or {"kind": "search", "budget": budget}
    cache = shipped_cache(model)
    if not cache.is_file():
        raise UserError(f"no shipped configurations for {model!r} ({search}, {cache}): the demo runs on the "
                        f"embedded testbeds (mnist_dit, mnist_unet)")
    within = [r for r in load_quant_cache(cache) if float(r["avg_bits"]) <= budget]
    if not within:
        raise UserError(f"the shipped dataset {cache} has no configuration within {budget} bits")
    top = min(within, key=lambda r: float(r["FID-GT-1k"]))
    origin = {"kind": "dataset_best", "budget": budget, "avg_bits": float(top["avg_bits"]), "cache": str(cache),
              "index": top.get("index"), "fid": float(top["FID-GT-1k"])}
    return cache, {k: v[0] if isinstance(v, (list, tuple)) else v for k, v in top["config"].items()}, origin


def answer_lines(rows: list[dict], num_images: int) -> list[str]:
    """The table and the verdict, in words that say what the numbers mean."""
    by_name = {r["name"]: r for r in rows}
    lines = [f"{'configuration':>20} {'avg bits':>9} {'MNIST-FID':>10}"]
    lines += [f"{r['name']:>20} {r['avg_bits']:9.2f} {r['fid']:10.1f}" for r in rows]
    best, fp = by_name.get(f"best_{BUDGET}bit"), by_name.get("fp16")
    uniform = [r for r in rows if r["name"].startswith("uniform_")]
    if best and uniform and fp:
        top = min(uniform, key=lambda r: r["fid"])
        lines.append(f"the {best['avg_bits']:.2f}-bit configuration: FID {best['fid']:.1f}, best uniform 4-bit "
                     f"({top['name'][8:]}, {top['avg_bits']:.2f} bits) {top['fid']:.1f}, FP16 {fp['fid']:.1f}")
    lines.append(bias_note(num_images))
    return lines


def bias_note(num_images: int) -> str:
    if num_images >= 1000:
        return (f"FID on {num_images} digits (the shipped dataset's protocol); differences below about "
                f"{SEED_NOISE_FID_1K:.0f} FID are seed noise (mnist_dit, fresh image seeds)")
    return (f"note: FID on {num_images} digits is biased upward against the 1,000-digit figures (the shipped dataset, "
            f"the README) and noisier (seed noise about {SEED_NOISE_FID_1K:.0f} FID at 1,000 on mnist_dit): compare "
            f"the rows with each other; --full uses 1,000")


def write_demo_report(out: Path, rows: list[dict], summary: dict, image_dir: Path) -> Path:
    """``index.html``: the measured table and one grid of the first digits of every configuration."""
    from autobuild.report import images_from_scored

    grids = images_from_scored([image_dir.parent], [r["name"] for r in rows], out, num=SAMPLES)
    body = [f"<h1>qua2sedimo demo: {html.escape(summary['model'])}</h1>",
            f"<p>{summary['num_images']} digits per configuration, one protocol (same digits and per-image noise; "
            f"MNIST-FID against held-out real digits). {html.escape(bias_note(summary['num_images']))}.</p>",
            "<table><tr><th>configuration</th><th>avg bits</th><th>MNIST-FID</th><th>PSNR vs FP16 (dB)</th>"
            "<th>samples</th></tr>"]
    for r in rows:
        grid = grids.get(r["name"])
        img = f'<img src="{grid.name}" alt="{r["name"]}">' if grid else ""
        psnr = f"{r['psnr_fp']:.1f}" if r.get("psnr_fp") is not None and r["name"] != "fp16" else ""
        body.append(f"<tr><td>{html.escape(r['name'])}</td><td>{r['avg_bits']:.2f}</td><td>{r['fid']:.1f}</td>"
                    f"<td>{psnr}</td><td>{img}</td></tr>")
    body.append("</table>")
    origin = summary.get("best_config_origin") or {}
    if origin:
        body.append(f"<p>best_{BUDGET}bit: {html.escape(Path(summary['best_config']).name)}, origin "
                    f"{html.escape(json.dumps(origin))}</p>")
    page = ("<!doctype html><meta charset='utf-8'><title>qua2sedimo demo</title><style>body{font-family:sans-serif;"
            "max-width:980px;margin:2em auto} td,th{padding:4px 10px;border-bottom:1px solid #ddd}"
            "img{image-rendering:pixelated}</style>" + "\n".join(body))
    return write_text_atomic(out / "index.html", page)
