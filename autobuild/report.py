"""``qua2sedimo report``: one self-contained HTML page about a trained predictor and what it built.

    qua2sedimo report --predictor runs/pred --cache runs/random/quant_cache.pkl \\
        [--scored runs/baselines ...] [--samples 16] --out reports/mnist_dit

Sections: predictor quality (held-out SRCC / NDCG@10 against the training-free baselines), the predicted
Pareto front (exact knapsack per budget; the configurations are written to ``<out>/configs``), the measured
front where ``eval-configs`` results exist (FID vs avg_bits: random configurations as a cloud, the built
configurations, uniform 4-bit baselines, the greedy knapsack, FP16), sensitivity insights (box plots, method
x bits mixes, ranked tables), the paper's qualitative claims checked against this testbed's evidence
(``autobuild.claims``: holds / does not hold / inconclusive, with the figures behind each) and FP16 vs quantized
sample grids (optional). Images are PNGs beside the page
and embedded in it (base64), so ``index.html`` alone can be mailed around.

Scored configurations are classified by the ``origin`` their configuration file records (``build-config``,
``search``, ``optimize-mixed-precision`` write it; ``eval-configs`` copies it into the scores): predictor +
knapsack, measured search, greedy knapsack, uniform, FP16; anything without a known origin is "other".
"""
from __future__ import annotations

import argparse
import base64
import html
import json
import math
import os
import time
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

from multiquant.cli_flags import add_model_flags
from multiquant.errors import InputError, MissingFileError

from .configs import DEFAULT_PARETO_BUDGETS, budgets_help, budgets_or_default, plot_pareto, score_config

__all__ = ["classify_scored", "load_scored", "plot_measured", "render_samples", "images_from_scored",
           "build_report", "add_report_arguments", "run_report"]

GRID_BUDGETS = 2  # sample grids / mix bars for this many built configurations (lowest and highest budget)


# ------------------------------------------------------------------------------------------ scored results
SCORED_KINDS = ("fp16", "uniform", "greedy", "search", "built")


def classify_scored(record: Mapping) -> tuple[str, float | None]:
    """(kind, budget) of a scored configuration, from the ``origin`` it records (written by ``build-config``,
    ``search``, ``optimize-mixed-precision`` and ``eval-configs --uniform/--fp16``); never from its name.
    kind is one of :data:`SCORED_KINDS`, or ``other`` when the record states no (known) origin."""
    origin = record.get("origin") if isinstance(record.get("origin"), Mapping) else {}
    kind = origin.get("kind")
    if kind not in SCORED_KINDS:
        return "other", None
    budget = origin.get("budget")
    return kind, (float(budget) if budget is not None and kind not in ("fp16", "uniform") else None)


def load_scored(dirs: Iterable[str | os.PathLike], model: str) -> list[dict]:
    """Every scored configuration of the given eval-configs run directories (or quant_cache.pkl files):
    ``{name, kind, budget, avg_bits, fid, config, source}``."""
    from multiquant.store import load_quant_cache

    rows = []
    for source in dirs:
        path = Path(source)
        cache = path / "quant_cache.pkl" if path.is_dir() else path
        if not cache.exists():
            raise MissingFileError(f"{cache} does not exist: --scored takes eval-configs output directories")
        for record in load_quant_cache(cache):
            name = str(record.get("name", f"{path.name}_{record.get('index')}"))
            kind, budget = classify_scored(record)
            rows.append({"name": name, "kind": kind, "budget": budget, "origin": record.get("origin"), "record": record,
                         "avg_bits": float(record["avg_bits"]),
                         "fid": float(record["FID-GT-1k"]), "config": record.get("config"), "source": str(cache)})
    return rows


# ------------------------------------------------------------------------------------------ plots
def _pyplot():
    from multiquant.utils import pyplot

    return pyplot()


def _lower_envelope(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Best (lowest) FID achieved at or below each avg_bits: the random configurations' Pareto front."""
    order = np.argsort(x)
    best, xs, ys = np.inf, [], []
    for i in order:
        if y[i] < best:
            best = y[i]
            xs.append(x[i])
            ys.append(y[i])
    return np.array(xs), np.array(ys)


def plot_measured(random_records: Sequence[Mapping], scored: Sequence[Mapping], path: str | os.PathLike,
                  title: str, metric: str = "FID") -> Path:
    """FID (``metric``: the label's name, multiquant.metrics.metric.metric_label) vs avg_bits: random cloud (and
    its lower envelope), built configurations, uniform, greedy, FP16."""
    from .insights import option_label

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.0, 4.6), dpi=110)
    if random_records:
        x = np.array([float(r["avg_bits"]) for r in random_records])
        y = np.array([float(r["FID-GT-1k"]) for r in random_records])
        ax.scatter(x, y, s=9, color="0.65", alpha=0.6, label=f"random configurations ({len(x)})", zorder=1)
        ex, ey = _lower_envelope(x, y)
        ax.step(ex, ey, where="post", color="0.45", lw=1, ls="--", label="best random at <= bits", zorder=2)
    built = sorted((r for r in scored if r["kind"] == "built"), key=lambda r: r["avg_bits"])
    if built:
        ax.plot([r["avg_bits"] for r in built], [r["fid"] for r in built], "*-", color="tab:blue", ms=12,
                label="predictor + knapsack", zorder=5)
    search = sorted({r["avg_bits"]: r for r in scored if r["kind"] == "search"}.values(), key=lambda r: r["avg_bits"])
    if search:  # one point per distinct configuration (two budgets may pick the same one)
        ax.plot([r["avg_bits"] for r in search], [r["fid"] for r in search], "D-", color="tab:purple", ms=7,
                label="measured search (autobuild.search)", zorder=5)
    greedy = sorted((r for r in scored if r["kind"] == "greedy"), key=lambda r: r["avg_bits"])
    if greedy:
        ax.plot([r["avg_bits"] for r in greedy], [r["fid"] for r in greedy], "s--", color="tab:orange", ms=6,
                label="greedy knapsack", zorder=4)
    markers = iter(["^", "v", "D", "P", "X", "<", ">"])
    for r in (r for r in scored if r["kind"] == "uniform"):
        option = (r.get("origin") or {}).get("option") or r["name"].split("_", 1)[-1]
        ax.scatter([r["avg_bits"]], [r["fid"]], marker=next(markers, "^"), s=55, zorder=6,
                   label=f"uniform {option_label(option)}")
    others = [r for r in scored if r["kind"] == "other"]
    if others:
        ax.scatter([r["avg_bits"] for r in others], [r["fid"] for r in others], marker="x", color="k", s=30,
                   label="other given configurations", zorder=4)
    for r in (r for r in scored if r["kind"] == "fp16"):
        ax.axhline(r["fid"], color="tab:green", ls=":", lw=1.5, label=f"FP16 ({metric} {r['fid']:.2f})", zorder=3)
    clipped = _clip_y(ax, random_records, scored)
    if clipped:
        ax.text(0.99, 0.99, f"{clipped} point(s) above the top of the plot, not shown", transform=ax.transAxes,
                ha="right", va="top", fontsize=8, color="0.3")
    ax.set_xlabel("average bits (overhead included)")
    ax.set_ylabel(f"{metric} (lower = better)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, bbox_to_anchor=(1.01, 1), loc="upper left", frameon=False)
    return _save(fig, Path(path))


def _clip_y(ax, random_records, scored) -> int:
    """Keep the interesting range: a few catastrophic random configurations would flatten everything else.
    Returns how many points fall above the shown range (the plot says so)."""
    values = [float(r["FID-GT-1k"]) for r in random_records] + [r["fid"] for r in scored]
    values = [v for v in values if math.isfinite(v)]
    if len(values) < 5:
        return 0
    top = max(np.percentile(values, 95), max((r["fid"] for r in scored), default=0))
    low = min(values)
    upper = top + 0.08 * (top - low)
    ax.set_ylim(low - 0.05 * (top - low), upper)
    return sum(v > upper for v in values)


def _save(fig, path: Path) -> Path:
    from multiquant.utils import save_figure

    return save_figure(fig, path)


# ------------------------------------------------------------------------------------------ sample grids
def render_samples(family, configs: Mapping[str, Mapping[str, str]], out_dir: str | os.PathLike, num: int = 16,
                   mq=None, pretrained=None, tiny: bool = False, device: str | None = None, seed: int = 42,
                   log: Callable[[str], None] | None = None) -> dict[str, Path]:
    """FP16 and each configuration's images of the same ``num`` conditions and seeds, one grid each
    (``<out_dir>/<name>.png``). ``mq``: the multiquantizer (checked against the weights) or its path."""
    from multiquant.adapters import SamplerOptions
    from multiquant.checkpoint import MultiQuantizer
    from multiquant.config import ConfigApplier
    from multiquant.evaluate import load_for_scoring
    from multiquant.reporting import save_image_grid
    from multiquant.utils import default_device

    loaded = load_for_scoring(family, pretrained, tiny, default_device(device))  # any family, any kind
    pipe, denoiser = loaded.pipe, loaded.denoiser
    if mq is None or isinstance(mq, (str, os.PathLike)):
        mq = MultiQuantizer.from_pretrained(mq or _default_mq_path(family.name), device=loaded.device)
    mq.check_compatible(denoiser, family)
    conditions = loaded.adapter.conditions(family, num, tiny=tiny)
    sampler = loaded.adapter.sampler(family, pipe, conditions, SamplerOptions(seed=seed, embed_seed=seed), tiny=tiny)
    applier = ConfigApplier(denoiser, mq)
    out, grids = Path(out_dir), {}
    nrow = _grid_columns(num)
    for name, config in {"fp16": None, **configs}.items():
        if config is None:
            applier.restore()
        else:
            applier.apply(config)
        images = sampler.generate(list(range(num)))
        grids[name] = save_image_grid(images, out / f"{name}.png", nrow=nrow)
        if log:
            log(f"  samples: {grids[name]}")
    applier.restore()
    return grids


def _grid_columns(num: int) -> int:
    """4 columns up to 16 images (8 -> 4x2), a square beyond."""
    return min(num, 4) if num <= 16 else int(math.ceil(math.sqrt(num)))


def _default_mq_path(model: str) -> Path:
    from multiquant.paths import multiquantizer_path

    return multiquantizer_path(f"{model}_mq.safetensors")


def images_from_scored(scored_dirs: Iterable[str | os.PathLike], names: Iterable[str], out_dir: str | os.PathLike,
                       num: int = 16) -> dict[str, Path]:
    """Grids of images eval-configs saved (``--save_images``: ``<dir>/images/<name>/*.png``)."""
    import torch
    from PIL import Image

    from multiquant.reporting import save_image_grid

    grids = {}
    for name in names:
        for directory in scored_dirs:
            folder = Path(directory) / "images" / name
            files = sorted(folder.glob("*.png"))[:num] if folder.is_dir() else []
            if not files:
                continue
            arrays = [np.array(Image.open(f).convert("RGB")) for f in files]
            images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
            grids[name] = save_image_grid(images, Path(out_dir) / f"{name}.png", nrow=_grid_columns(len(files)))
            break
    return grids


# ------------------------------------------------------------------------------------------ HTML
_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1100px;margin:24px auto;padding:0 16px;
color:#222;line-height:1.45}
h1{font-size:1.6em;margin-bottom:0.2em} h2{border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:1.8em}
.meta{color:#666;font-size:0.9em} img{max-width:100%;height:auto;border:1px solid #eee}
table{border-collapse:collapse;font-size:0.85em;margin:8px 0 16px} th,td{border:1px solid #ddd;padding:3px 8px;
text-align:right} th{background:#f4f4f4} th.l{text-align:left} td.l{text-align:left;font-family:monospace;
font-size:0.95em}
.grid{display:flex;flex-wrap:wrap;gap:14px} .grid figure{margin:0;text-align:center;font-size:0.85em}
.grid img{width:230px;image-rendering:pixelated} .note{background:#f7f7f2;border-left:3px solid #cc9;
padding:6px 10px;font-size:0.9em} .pair{display:flex;flex-wrap:wrap;gap:10px} .pair img{max-width:540px}
"""


def _img(path: Path, alt: str, embed: bool | Path = True) -> str:
    """An embedded PNG (``embed=True``) or a link relative to the page's folder (``embed=<that folder>``)."""
    if embed is True:
        data = base64.b64encode(Path(path).read_bytes()).decode()
        return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'
    relative = os.path.relpath(Path(path), Path(embed)) if embed else Path(path).name
    return f'<img src="{html.escape(Path(relative).as_posix())}" alt="{html.escape(alt)}">'


def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return html.escape(str(value))


def _table(rows: Sequence[Mapping], columns: Sequence[tuple[str, str]], left: Iterable[str] = ()) -> str:
    left = set(left)
    head = "".join(f'<th class="{"l" if key in left else ""}">{html.escape(title)}</th>' for key, title in columns)
    body = "".join("<tr>" + "".join(f'<td class="{"l" if key in left else ""}">{_fmt(row.get(key))}</td>'
                                    for key, _ in columns) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _predictor_section(metrics: Mapping) -> str:
    rows = [{"name": "GNN predictor (this run)", "srcc": metrics.get("srcc_mean"),
             "ndcg": metrics.get("ndcg10_mean")}]
    rows += [{"name": f"baseline: {name}", "srcc": b.get("srcc_mean"), "ndcg": b.get("ndcg10_mean")}
             for name, b in sorted(metrics.get("baselines", {}).items(),
                                   key=lambda kv: -(kv[1].get("srcc_mean") or -9))]
    folds, n = metrics.get("folds_k"), metrics.get("n_valid")
    return (f"<h2>Predictor</h2><p>Target <code>{html.escape(str(metrics.get('target')))}</code>, loss "
            f"{html.escape(str(metrics.get('loss')))}, {folds}-fold cross-validation over {n} scored configurations. "
            f"Held-out rank correlation with the target (higher = better):</p>"
            + _table(rows, [("name", "ranker"), ("srcc", "SRCC"), ("ndcg", "NDCG@10")], left=["name"]))


def _page(title: str, sections: Sequence[str], subtitle: str) -> str:
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1><p class='meta'>{subtitle}</p>"
            + "".join(sections) + "</body></html>")


# ------------------------------------------------------------------------------------------ the report
def build_report(predictor_dir: str | os.PathLike, cache_path: str | os.PathLike | None, out_dir: str | os.PathLike,
                 scored_dirs: Sequence[str | os.PathLike] = (), table=None, model: str | None = None,
                 size: str = "full", budgets: Sequence[float] | None = None, samples: int = 0,
                 pretrained=None, tiny: bool = False, device: str | None = None, embed: bool = True,
                 mq=None, sweeps: Sequence[str | os.PathLike] = (), log: Callable[[str], None] | None = print) -> Path:
    """Write ``<out_dir>/index.html`` (and its PNGs, configurations and ``report.json``); returns the page.

    ``table``: the option table source (see ``OptionTable.from_source``; default: the family's
    multiquantizer, else the table seen in ``cache_path``). ``budgets``: those of the predicted front (None: the
    model's defaults, configs.default_budgets). ``samples``: render that many FP16 vs quantized
    images per grid with ``mq`` (default: ``table`` when it is a multiquantizer or its path)."""
    from multiquant.store import load_quant_cache

    from .configs import predictor_family, default_table_source, pareto_front, predictor_scores
    from .insights import SENSITIVITY_DEFINITION, percentile_plot, write_insights

    started = time.perf_counter()
    predictor_dir, out = Path(predictor_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    embed = True if embed else out  # images: inline, or linked relative to the page
    model = model or predictor_family(predictor_dir)
    records = load_quant_cache(cache_path) if cache_path else []
    source = table if table is not None else default_table_source(model, None, cache_path)
    from .dag import family_dag

    graph = family_dag(model, size=size, device="meta" if size == "full" else "cpu")
    block, table, spec = predictor_scores(predictor_dir, source, model, "block", size, log=log, graph=graph)
    node, _, _ = predictor_scores(predictor_dir, table, spec, "node", size, log=log, graph=graph)
    from multiquant.utils import read_json

    metrics = read_json(predictor_dir / "metrics.json", "predictor metrics file")

    if log:
        log("predicted Pareto front")
    budgets = budgets_or_default(budgets, table, DEFAULT_PARETO_BUDGETS, log)
    front = pareto_front(block, table, budgets, model=spec.name, out_dir=out / "configs", log=log)
    if not front:
        raise InputError(f"no budget in {list(budgets)} is achievable for {spec.name}: pass larger --budgets")
    for point in front:  # the page and report.json name the files relative to the report folder
        point["config_path"] = os.path.relpath(point["config_path"], out)
    front_warning = front_outside_training(front, records)
    if front_warning and log:
        log(f"  warning: {front_warning}")
    front_png = plot_pareto(front, out / "pareto_predicted.png",
                            title=f"{spec.name}: predicted Pareto front (block-level unit scores)")
    scored, learned_key = _with_predictions(_with_predicted_scores(load_scored(scored_dirs, spec.name), block),
                                            predictor_dir, records)
    from multiquant.metrics.metric import metric_label

    metric = metric_label(spec.metric)
    measured_png = (plot_measured(records, scored, out / "pareto_measured.png",
                                  f"{spec.name}: measured {metric} vs average bits", metric)
                    if records or scored else None)

    from multiquant.config import load_config

    chosen = [front[0], front[-1]] if len(front) > 1 else front[:1]
    chosen_configs = {Path(p["config_path"]).stem: load_config(out / p["config_path"]) for p in chosen[:GRID_BUDGETS]}
    bits_of = {Path(p["config_path"]).stem: p["avg_bits"] for p in front}
    insights = write_insights(out / "insights", node, block, chosen_configs, model=spec.name)
    claims = _claims(graph, node, table, records, scored, metrics, sweeps, log)
    claims_png = percentile_plot(claims["sensitive_parts"], out / "insights" / "percentile_by_op.png",
                                 f"{spec.name}: sensitivity by layer operation, per evidence source")

    grids = images_from_scored(scored_dirs, ["fp16", *chosen_configs], out / "samples")
    if samples and len(grids) < 1 + len(chosen_configs):
        try:
            grids = render_samples(spec, chosen_configs, out / "samples", num=samples,
                                   mq=mq or _mq_for_samples(source), pretrained=pretrained, tiny=tiny, device=device,
                                   log=log)
        except (FileNotFoundError, ValueError, OSError, RuntimeError) as err:  # optional part: say why, go on
            if log:
                log(f"  sample grids skipped: {err}")

    sections = [_predictor_section(metrics), _front_section(front, front_png, embed, front_warning)]
    if measured_png is not None:
        sections.append(_measured_section(scored, measured_png, embed, str(metrics.get("target") or ""), learned_key,
                                          metric))
    sections.append(_claims_section(claims, claims_png, embed))
    sections.append(_insights_section(insights, SENSITIVITY_DEFINITION, embed))
    if grids:
        sections.append(_samples_section(grids, bits_of, embed))
    subtitle = (f"model <b>{html.escape(spec.name)}</b> &middot; predictor "
                f"<code>{html.escape(str(predictor_dir))}</code>"
                f" &middot; {len(records)} random configurations &middot; generated "
                f"{time.strftime('%Y-%m-%d %H:%M')}")
    page = out / "index.html"
    from multiquant.utils import atomic_path

    with atomic_path(page) as tmp:
        tmp.write_text(_page(f"Quantization sensitivity report: {spec.name}", sections, subtitle))
    summary = {"model": spec.name, "predictor": {"srcc_mean": metrics.get("srcc_mean"),
                                                 "ndcg10_mean": metrics.get("ndcg10_mean")},
               "pareto": front, "pareto_warning": front_warning or None, "scored": [{k: v for k, v in r.items() if k != "config"} for r in scored],
               "top_layers": insights["layers"][:10], "ops": insights["ops"], "insights": claims,
               "seconds": time.perf_counter() - started}
    with atomic_path(out / "report.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=1, default=str))
    if log:
        log(f"wrote {page}")
    return page


def _claims(graph, node, table, records, scored, metrics, sweep_paths, log) -> dict:
    """The paper's claims against this testbed's evidence (``autobuild.claims``): the predictor's node scores and
    the dataset model (the better-validated one is primary), the one-layer sweeps and the measured uniform
    configurations."""
    from .evidence import (dataset_model, dataset_sources, layer_roles, load_sweeps, node_score_evidence,
                           testbed_insights)

    from .train import learned_validation

    ops, blocks = layer_roles(graph)
    # the node scores rank what the network learned (e.g. log FID): compared with the dataset model on that, not
    # on a target whose exactly-known bits term alone can rank at 1.0
    srcc, what = learned_validation(metrics)
    validation = (f"{metrics.get('folds_k') or '?'}-fold SRCC {srcc:.3f} on {what}" if srcc is not None
                  else "not validated")
    layer, method = node_score_evidence(node, validation, True)
    models = [(layer, method, srcc)]
    notes = []
    if records:
        from .optimize import Space

        ties = {alias: attrs["key"] for _, attrs in graph.nodes(data=True) if attrs.get("kind") == "layer"
                for alias in attrs.get("aliases", [])}
        try:
            fit = dataset_model(Space.of(table, ties), records)
            models.append((*dataset_sources(fit), fit["cv_srcc_log_fid"][fit["best_model"]]))
        except (InputError, KeyError, ValueError) as err:  # e.g. records of another table: say why, go on
            notes.append(f"dataset model left out: {err}")
    uniform = {}
    for row in scored:
        option = (row.get("origin") or {}).get("option")
        if option is None and row["kind"] == "uniform":  # the configuration says it: one option everywhere
            seen = {str(e[0] if isinstance(e, (list, tuple)) else e) for e in (row.get("config") or {}).values()}
            option = seen.pop() if len(seen) == 1 else None
        if row["kind"] == "uniform" and option:
            uniform[option] = {"fid": row["fid"], "avg_bits": row["avg_bits"]}
    if not uniform:
        notes.append("no measured uniform configurations given (--scored with eval-configs --uniform results): the "
                     "quantizer-preference verdict rests on the models and the sweeps")
    sweeps = load_sweeps(sweep_paths) if sweep_paths else None
    if not sweep_paths:
        notes.append("no one-layer sweeps given (--sweeps): the verdicts rest on the models and the uniform "
                     "configurations")
    if log:
        log("checking the paper's claims")
    return {**testbed_insights(ops, blocks, models, sweeps, uniform), "notes": notes}


_VERDICT_COLOR = {"holds": "#2e7d32", "does not hold": "#c62828", "inconclusive": "#8d6e00",
                  "not applicable": "#777"}


def _claims_section(claims: Mapping, png: Path, embed) -> str:
    parts = ["<h2>What is sensitive, and the paper's claims</h2>",
             f"<p>Backbone from the DAG's layer operations: <b>{html.escape(claims['backbone'])}</b>. Evidence: "
             f"the best-validated model(s) (<b>{html.escape('; '.join(claims.get('primary_models') or [str(claims['best_validated_model'])]))}</b>) "
             "and the one-layer sweeps decide; other models are shown beside them. A layer's percentile is the fraction of the other "
             "layers it out-ranks (1 = the most sensitive). Rules: "
             f"{html.escape(claims['rules'])}.</p>"]
    parts += [f"<p class='note'>{html.escape(n)}</p>" for n in claims.get("notes", [])]
    rows = []
    for c in claims["claims"]:
        color = _VERDICT_COLOR.get(c["verdict"], "#222")
        evidence = "<br>".join(f"{'<b>' if s['primary'] else '<i>'}{html.escape(s['source'])}"
                               f"{'</b>' if s['primary'] else ' (not used for the verdict)</i>'}: "
                               f"{html.escape(s['verdict'])}; {html.escape(s['summary'])}" for s in c["by_source"])
        rows.append(f"<tr><td class='l'>{html.escape(c['claim'])}</td><td class='l' style='color:{color}'>"
                    f"<b>{html.escape(c['verdict'])}</b><br><small>{html.escape(c['summary'])}</small></td>"
                    f"<td class='l' style='font-family:inherit'>{evidence}</td></tr>")
    parts.append("<table><tr><th class='l'>claim (paper)</th><th class='l'>verdict here</th>"
                 "<th class='l'>figures per source</th></tr>" + "".join(rows) + "</table>")
    parts.append("<h3>Most sensitive parts per source</h3>" + _img(png, "percentile by op", embed))
    table = []
    for name, p in claims["sensitive_parts"].items():
        table.append({"source": name + ("" if p["primary"] else " (shown)"),
                      "layers": ", ".join(f"{l['layer'].removeprefix('model.').removesuffix('.weight_quantizer')}"
                                          for l in p["layers"]),
                      "ops": ", ".join(f"{o['name']} {o['mean_percentile']:.2f}" for o in p["ops"][:4]),
                      "blocks": ", ".join(f"{b['name']} {b['mean_percentile']:.2f}" for b in p["blocks"][:4])})
    parts.append(_table(table, [("source", "source"), ("layers", "top layers"), ("ops", "top op types (mean pct)"),
                                ("blocks", "top blocks (mean pct)")], left=["source", "layers", "ops", "blocks"]))
    return "".join(parts)


def _with_predicted_scores(scored: list[dict], block) -> list[dict]:
    """Each scored configuration's predicted score (None for FP16 and options the scores do not cover)."""
    for row in scored:
        try:
            row["predicted_score"] = score_config(block, row["config"]) if row["config"] else None
        except (KeyError, ValueError):
            row["predicted_score"] = None
    return scored


def _with_predictions(scored: list[dict], predictor_dir, train_records: Sequence[Mapping]) -> tuple[list[dict], str | None]:
    """Each scored configuration's predicted target and predicted learned key (e.g. FID), in their units, and
    ``outside_training``: why the prediction is an extrapolation (avg_bits outside the training records' range,
    or per-layer options no training record used), empty when it is not."""
    from .train import load_ensemble

    if not scored:
        return scored, None
    ensemble = load_ensemble(predictor_dir)
    plan = ensemble.plan
    seen: dict[str, set] = {}
    for rec in train_records:
        for key, entry in (rec.get("config") or {}).items():
            seen.setdefault(key, set()).add(entry[0] if isinstance(entry, (list, tuple)) else entry)
    bits = [float(r["avg_bits"]) for r in train_records]
    predictable = [r for r in scored if r.get("config")]
    try:
        out = ensemble.predict([r["record"] for r in predictable]) if predictable else {}
    except (KeyError, ValueError):  # options or keys the predictor cannot encode
        out, predictable = {}, []
    for i, row in enumerate(predictable):
        row["predicted_target"] = float(out["pred"][i])
        if plan.key:
            row[f"predicted_{plan.key}"] = float(out["learned"][i])
    for row in scored:
        row.pop("record", None)
        reasons = []
        if bits and not min(bits) <= row["avg_bits"] <= max(bits):
            reasons.append(f"avg_bits {row['avg_bits']:.2f} outside the training range {min(bits):.2f}-{max(bits):.2f}")
        unseen = [k for k, e in (row.get("config") or {}).items()
                  if seen and (e[0] if isinstance(e, (list, tuple)) else e) not in seen.get(k, ())]
        if unseen:
            reasons.append(f"{len(unseen)} layer option(s) no training configuration used")
        row["outside_training"] = "; ".join(reasons)
    return scored, plan.key


def front_outside_training(front: Sequence[Mapping], train_records: Sequence[Mapping]) -> str:
    """A warning when front points lie outside the training configurations' avg_bits range (their scores are
    extrapolations: e.g. budgets 3.3-4.2 given on a small model whose random configurations all cost 7+ bits),
    else ""."""
    bits = [float(r["avg_bits"]) for r in train_records]
    if not bits:
        return ""
    lo, hi = min(bits), max(bits)
    outside = [p for p in front if not lo <= float(p["avg_bits"]) <= hi]
    if not outside:
        return ""
    shown = ", ".join(f"{float(p['avg_bits']):.2f}" for p in outside[:6])
    return (f"{len(outside)} of {len(front)} front point(s) ({shown} avg bits) lie outside the training configurations' {lo:.2f}-{hi:.2f} avg bits: their predicted scores "
            f"are extrapolations (measure them with eval-configs, or pass --budgets inside the range)")


def _front_section(front, png: Path, embed, warning: str = "") -> str:
    return ("<h2>Pareto front (predicted)</h2><p>For each budget B the configuration maximising the summed "
            "block-level unit scores subject to avg_bits &le; B (exact multiple-choice knapsack, "
            "<code>scipy.optimize.milp</code>). Configurations: <code>configs/</code>.</p>"
            + (f"<p class='note'><b>Warning:</b> {html.escape(warning)}.</p>" if warning else "")
            + _img(png, "predicted front", embed)
            + _table(front, [("budget", "budget"), ("avg_bits", "avg bits"), ("predicted_score", "predicted score"),
                             ("config_path", "file")], left=["config_path"]))


def _measured_section(scored, png: Path, embed, target: str = "", learned_key: str | None = None,
                      metric: str = "FID") -> str:
    note = ("" if scored else "<p class='note'>No eval-configs results given (--scored): only the random "
                              "configurations are shown. Score the configurations in <code>configs/</code> with "
                              "<code>qua2sedimo eval-configs</code>.</p>")
    rows = sorted(scored, key=lambda r: (r["kind"], r["avg_bits"]))
    columns = [("name", "configuration"), ("kind", "kind"), ("avg_bits", "avg bits"), ("fid", f"measured {metric}")]
    if learned_key:
        columns.append((f"predicted_{learned_key}", f"predicted {learned_key}"))
    columns += [("predicted_target", f"predicted target ({target})" if target else "predicted target"),
                ("predicted_score", "unit-score sum (no unit)"), ("outside_training", "warning")]
    far = [r["name"] for r in scored if r.get("outside_training")]
    if scored:
        note += ("<p class='note'>Predicted target and predicted " + html.escape(learned_key or "value") +
                 " are the trained ensemble's predictions, in the target's units; the unit-score sum is the "
                 "knapsack's objective (a sum of z-scores: it ranks configurations, it has no unit).</p>")
    if far:
        note += (f"<p class='note'><b>Warning:</b> {len(far)} configuration(s) lie outside the training data "
                 f"({html.escape(', '.join(far[:6]))}): their predictions are extrapolations.</p>")
    table = _table(rows, columns, left=["name", "kind", "outside_training"]) if scored else ""
    return f"<h2>Measured {html.escape(metric)} vs average bits</h2>" + note + _img(png, "measured front", embed) + table


def _samples_section(grids: Mapping[str, Path], bits_of: Mapping[str, float], embed) -> str:
    figures = "".join(f"<figure>{_img(p, name, embed)}<figcaption>{html.escape(name)}"
                      f"{f' ({bits_of[name]:.2f} bits)' if name in bits_of else ''}</figcaption></figure>"
                      for name, p in grids.items())
    return (f"<h2>Samples: FP16 vs quantized</h2><p>Same conditions and noise seeds for every configuration.</p>"
            f"<div class='grid'>{figures}</div>")


def _mq_for_samples(source):
    """The table source when it is a multiquantizer (object, .safetensors file or its folder), else None."""
    if hasattr(source, "check_compatible"):
        return source
    if isinstance(source, (str, os.PathLike)) and (Path(source).suffix == ".safetensors" or Path(source).is_dir()):
        return source
    return None


def _insights_section(insights: Mapping, definition: str, embed: bool) -> str:
    plots = insights["plots"]
    parts = ["<h2>Sensitivity insights</h2>"]
    boxes = [plots[k] for k in ("box_block", "box_unit_type") if k in plots]
    if boxes:
        parts.append("<p>Block-level unit scores, every variant of every unit pooled per block and per unit type. "
                     "Wide boxes and low whiskers: the choice of options there matters.</p><div class='pair'>"
                     + "".join(_img(p, p.stem, embed) for p in boxes) + "</div>")
    if "box_op" in plots:
        parts.append("<p>Node-level scores (each layer alone, all six options) per layer operation.</p>"
                     + _img(plots["box_op"], "per op", embed))
    mixes = [(k, p) for k, p in plots.items() if k.startswith("mix_")]
    if mixes:
        parts.append("<p>Method &times; bits chosen per layer operation in the built configurations "
                     "(fractions of the op's layers; the count is under each label).</p>"
                     + "".join(_img(p, k, embed) for k, p in mixes))
    if insights["ops"]:
        parts.append(f"<p class='note'>{html.escape(definition)}</p><h3>Operation types, most sensitive first</h3>"
                     + _table(insights["ops"], [("op", "op"), ("mean", "mean"), ("median", "median"), ("max", "max"),
                                                ("layers", "layers")], left=["op"]))
        layers = [{**row, "block": row["block"] if row["block"] >= 0 else "global"} for row in insights["layers"][:15]]
        parts.append("<h3>Most sensitive layers</h3>"
                     + _table(layers, [("key", "layer"), ("op", "op"), ("block", "block"),
                                                        ("sensitivity", "sensitivity"), ("bit_drop", "bit drop"),
                                                        ("method_spread", "method spread (low bits)"),
                                                        ("best_option", "best option")], left=["key", "op",
                                                                                               "best_option"]))
    return "".join(parts)


# ------------------------------------------------------------------------------------------ CLI
def add_report_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``report`` flags (for a sub-parser of the ``qua2sedimo`` command)."""
    p.add_argument("--predictor", required=True, help="trained predictor directory")
    p.add_argument("--cache", default=None, help="quant_cache.pkl of the random configurations (the cloud)")
    p.add_argument("--scored", nargs="*", default=[], help="eval-configs output directories (built configurations, "
                                                           "uniform baselines, greedy, FP16)")
    p.add_argument("--out", required=True, help="report directory (index.html)")
    p.add_argument("--mq", default=None, help="multiquantizer or option table (default multiquantizers/<model>_mq."
                                              "safetensors, else the table seen in --cache)")
    add_model_flags(p, required=False, model_help="model family (default: the predictor's)",
                    tiny_help="tiny random denoiser for the samples (smoke tests)")
    p.add_argument("--size", choices=("full", "tiny"), default="full", help="denoiser size of the predictor's DAG")
    p.add_argument("--budgets", default=None, help="the predicted Pareto front's " + budgets_help(DEFAULT_PARETO_BUDGETS))
    p.add_argument("--samples", type=int, default=0, help="render this many FP16 vs quantized samples (0: only use "
                                                          "images saved by eval-configs --save_images)")
    p.add_argument("--no_embed", action="store_true", help="link the PNGs instead of embedding them")
    p.add_argument("--sweeps", nargs="*", default=[], help="one-layer sweeps for the claim checks: `qua2sedimo "
                                                           "sensitivity` JSON files (one per method) or "
                                                           "benchmarks/results/pareto_<model>.json")
    return p


def run_report(args) -> int:
    from .configs import default_table_source, parse_budgets

    budgets = parse_budgets(args.budgets)
    model = args.model
    if model is None:
        from .configs import predictor_family

        model = predictor_family(Path(args.predictor))
    source = default_table_source(model, args.mq, args.cache)
    build_report(args.predictor, args.cache, args.out, args.scored, table=source, model=model, size=args.size,
                 budgets=budgets, samples=args.samples,
                 pretrained=args.pretrained, tiny=args.tiny, device=args.device, embed=not args.no_embed,
                 sweeps=args.sweeps)
    return 0
