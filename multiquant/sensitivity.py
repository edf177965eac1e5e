"""Per-layer quantization sensitivity: quantize ONE layer at a time (all others FP), measure the damage.

Protocol (``qua2sedimo sensitivity``):

* a fixed image set: ``--num_prompts`` conditions drawn reproducibly from the family's protocol set (the
  first 1,000 COCO captions, or the class ids) by a permutation seeded with ``--prompt_seed``; image ``i``
  starts from the noise of ``seed_for(image_seed, i)`` (the samplers of :mod:`multiquant.adapters`),
  so every layer is judged on exactly the same prompts and noise (common random numbers);
* the FP images once, then for every search layer (a canonical layer with its tied copies, which share one
  quantizer): write its fake-quantized weight (:func:`multiquant.quantizers.quantize` / ``dequantize``,
  any width 2..8; 16 = FP16 rounding), render the set, restore the FP weight;
* metrics per layer: FID of the quantized images against the FP images (``FID-FP``; with
  ``--fid_against gt``: the increase of FID against the reference set), and CLIP score drop where local
  CLIP weights exist (``--clip_dir`` / ``$QUA2SEDIMO_CLIP``), otherwise the FP-reference proxy
  ``1-SSIM(FP)`` -- the output names which one was used;
* each degradation is min-max normalised over the analysed layers and combined
  ``0.6 x FID + 0.4 x CLIP-or-proxy`` into a sensitivity in [0, 1], banded low (< 0.2, safe at 4 bits),
  medium (< 0.5, consider 8), high (< 0.8, keep 8 or 16), critical (>= 0.8, keep 16). Min-max makes the
  score *relative*: the least damaging layer scores 0 and the most damaging about 1, whatever their
  absolute effect (the raw metrics are kept for that).

One layer = one record in a :class:`multiquant.store.RecordStore` (crash-safe, resumable); the report is
rebuilt from the records, so a killed run continues where it stopped.
"""
from __future__ import annotations

import json
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from .cli_flags import add_model_flags, add_refiner_args
from .errors import InputError
from .layers import LayerRef
from .options import DEFAULT_METHOD, FP_BITS, MAX_BITS, METHODS, MIN_BITS
from .quantizers import dequantize, lp_error, quantize

__all__ = ["FID_WEIGHT", "BANDS", "PROXY_NAME", "band_of", "min_max_normalise", "combine_sensitivity",
           "fake_quantize", "search_groups", "shuffled_subset", "ImageProtocol", "setup_protocol",
           "score_layers", "build_report", "report_path", "run_sensitivity", "add_parsers"]

FID_WEIGHT = 0.6  # the rest (0.4) goes to CLIP drop or the proxy
PROXY_NAME = "1-SSIM(FP)"
# (name, upper bound (exclusive), advice)
BANDS = (("low", 0.2, "safe at 4 bits"), ("medium", 0.5, "consider 8 bits"),
         ("high", 0.8, "keep 8 or 16 bits"), ("critical", float("inf"), "keep 16 bits"))
RECORD_KEYS = ("key", "method", "bits", "fid_fp", "psnr_fp", "ssim_fp")


# ------------------------------------------------------------------------------------ pure: scoring
def band_of(score: float) -> str:
    """Band of a sensitivity: [0, 0.2) low, [0.2, 0.5) medium, [0.5, 0.8) high, [0.8, 1] critical."""
    if not np.isfinite(score):
        raise ValueError(f"sensitivity must be finite, got {score}")
    return next(name for name, upper, _ in BANDS if score < upper)


def min_max_normalise(values) -> np.ndarray:
    """Scale to [0, 1] over the layers: (v - min) / (max - min). All equal -> all 0 (no layer stands out)."""
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or v.size == 0:
        raise ValueError("need a non-empty 1-D list of degradations")
    if not np.isfinite(v).all():
        bad = int(np.flatnonzero(~np.isfinite(v))[0])
        raise ValueError(f"degradation of layer #{bad} is {v[bad]}: a quantized layer broke the images "
                         f"(NaN/inf); check that layer, or exclude it from the search space")
    span = v.max() - v.min()
    return np.zeros_like(v) if span <= 0 else (v - v.min()) / span


def combine_sensitivity(fid_degradation, second_degradation, fid_weight: float = FID_WEIGHT) -> np.ndarray:
    """``fid_weight x norm(FID) + (1 - fid_weight) x norm(CLIP drop or proxy)``, in [0, 1]."""
    if not 0.0 <= fid_weight <= 1.0:
        raise ValueError(f"fid_weight must be in [0, 1], got {fid_weight}")
    return fid_weight * min_max_normalise(fid_degradation) + (1 - fid_weight) * min_max_normalise(second_degradation)


def shuffled_subset(pool: list, n: int, seed: int) -> list:
    """The first ``n`` items of a ``seed``-permuted ``pool`` (reproducible, without repetition)."""
    if n < 2:
        raise InputError(f"need at least 2 prompts for FID statistics, got {n}")
    if n > len(pool):
        raise InputError(f"asked for {n} prompts but the pool holds only {len(pool)}")
    order = np.random.default_rng(seed).permutation(len(pool))[:n]
    return [pool[i] for i in order]


def search_groups(layers: list[LayerRef]) -> list[list[LayerRef]]:
    """Search layers in model order: each canonical layer followed by its tied copies (one choice for all)."""
    groups: dict[str, list[LayerRef]] = OrderedDict()
    for ref in layers:
        groups.setdefault(ref.tied_to or ref.key, []).append(ref)
    return [sorted(g, key=lambda r: r.tied_to is not None) for g in groups.values()]


@torch.no_grad()
def fake_quantize(weight: torch.Tensor, method: str, bits: int, seed: int = 0, iters: int = 100
                  ) -> tuple[torch.Tensor, float]:
    """(dequantized weight in the weight's shape and dtype, Lp error). ``bits=16``: FP16 rounding."""
    w2d = weight.detach().reshape(weight.shape[0], -1).float()
    if bits == FP_BITS:
        w_hat = w2d.half().float()
    else:
        if method not in METHODS:
            raise InputError(f"unknown method {method!r}; expected one of {METHODS}")
        codes, params = quantize(w2d, method, bits, iters=iters, seed=seed)
        w_hat = dequantize(method, codes, params)
    return w_hat.to(weight.dtype).reshape(weight.shape), lp_error(w2d, w_hat)


@contextmanager
def quantized_weights(model: torch.nn.Module, replacements: list[tuple[LayerRef, torch.Tensor]]):
    """Write the replacement weights into ``model``; the FP weights come back on exit (also on errors)."""
    saved = []
    try:
        with torch.no_grad():
            for ref, w_hat in replacements:
                target = ref.weight(model)
                saved.append((target, target.detach().clone()))
                target.copy_(w_hat.to(target.device, target.dtype))
        yield
    finally:
        with torch.no_grad():
            for target, original in reversed(saved):
                target.copy_(original)


# ------------------------------------------------------------------------------------- the protocol
# The image set, metric and FP reference are the one scorer of multiquant.evaluate (Scorer.measure).
from .evaluate import ImageProtocol  # noqa: E402


class PixelFeatures:
    """Average-pooled pixels as FID features: for smoke runs where no trained feature network exists.
    Its ``name`` says what it is, so its numbers are never mistaken for Inception/classifier FIDs."""

    def __init__(self, size: int = 7):
        self.size = size
        self.name = f"pixels-avgpool{size}x{size} (smoke runs only)"

    def __call__(self, images: torch.Tensor) -> np.ndarray:
        x = torch.nn.functional.adaptive_avg_pool2d(images.double() / 255.0, self.size)
        return x.flatten(1).numpy()


def _clip_scorer(family, clip_dir, device, log):
    import os

    from .metrics.clip import CLIP_ENV, ClipScorer

    if family.conditioning != "text":
        return None
    if not (clip_dir or os.environ.get(CLIP_ENV)):
        log(f"no CLIP weights (--clip_dir / ${CLIP_ENV}): using the proxy {PROXY_NAME} instead of CLIP drop")
        return None
    return ClipScorer(clip_dir, device=device)  # weights named explicitly: a failure is an error


def _random_embedding_rows(family, tiny: bool) -> bool:
    """A tiny diffusers text pipeline: no text encoder, its conditions are rows of random embeddings."""
    return tiny and family.conditioning == "text" and not family.is_module


def protocol_conditions(adapter, family, num_prompts: int, prompt_seed: int, tiny: bool = False, coco_path=None) -> list:
    """What the sweep's images are conditioned on: a seeded subset of the family's pool (prompts, class ids, the
    user's conditions(n)); rows of random embeddings are taken in order (nothing to shuffle). A plain module's
    conditions never depend on ``tiny``: the same subset as its full runs."""
    if _random_embedding_rows(family, tiny):
        return adapter.conditions(family, num_prompts, tiny=True)
    pool = adapter.conditions(family, max(num_prompts, family.num_images), tiny=tiny, coco_path=coco_path)
    return shuffled_subset(pool, num_prompts, prompt_seed)


def setup_protocol(family, *, pretrained=None, tiny: bool = False, device=None, num_prompts: int = 100,
                   prompt_seed: int = 42, image_seed: int = 42, batch_size: int | None = None, coco_path=None,
                   embed_cache_dir=None, fid_against: str = "fp", reference_dir=None, inception=None,
                   random_features: bool = False, pixel_features: bool = False, clip_dir=None,
                   quant_seed: int = 0, kmeans_iters: int = 100, cache_weights: bool = False,
                   with_reference: bool | None = None, refiner=None, log=print) -> tuple[ImageProtocol, dict]:
    """Load the pipeline and fix the image set; returns the protocol and its settings (for the records).

    ``with_reference`` also records FID-GT (default: only when ``fid_against="gt"`` needs it)."""
    from .adapters import SamplerOptions
    from .checkpoint import weight_hash
    from .evaluate import Scorer, load_for_scoring, metric_settings
    from .adapters.module import user_code_settings
    from .layers import quantizable_layers
    from .metrics.metric import FeatureFID

    if fid_against not in ("fp", "gt"):
        raise InputError(f"fid_against must be 'fp' (quantized vs FP images) or 'gt' (reference set), not {fid_against!r}")
    loaded = load_for_scoring(family, pretrained, tiny, device)
    adapter, denoiser = loaded.adapter, loaded.denoiser
    conditions = protocol_conditions(adapter, family, num_prompts, prompt_seed, tiny, coco_path)
    options = SamplerOptions(seed=image_seed, batch_size=batch_size, coco_path=coco_path,
                             embed_cache_dir=embed_cache_dir, embed_seed=prompt_seed,
                             refiner=adapter.refiner(family, refiner, loaded.device, tiny))
    sampler = adapter.sampler(family, loaded.pipe, conditions, options, tiny=tiny)
    with_reference = fid_against == "gt" or bool(with_reference)
    if pixel_features:  # named on the command line: the smoke-run features replace the family's metric
        metric = FeatureFID(PixelFeatures())
        if with_reference:
            raise InputError("--pixel_features has no reference set: use it with --fid_against fp")
    else:
        metric = adapter.metric(family, loaded.device, inception=inception, random_features=random_features,
                                reference_dir=reference_dir)
    if with_reference:
        metric.reference()
    prompts = conditions if conditions and isinstance(conditions[0], str) else None
    clip = _clip_scorer(family, clip_dir, loaded.device, log) if prompts is not None else None
    layers = quantizable_layers(denoiser, family)
    protocol = Scorer(family, denoiser, sampler, metric, layers=layers, with_reference=with_reference,
                      prompts=prompts, clip=clip, quant_seed=quant_seed, kmeans_iters=kmeans_iters,
                      weight_cache={} if cache_weights else None)
    m = metric_settings(metric, with_reference)
    settings = {"model": family.name, "tiny": tiny, "pretrained": str(pretrained) if pretrained else None,
                "weight_hash": weight_hash(denoiser, layers),  # a resume never mixes records of other weights
                "num_prompts": num_prompts, "prompt_seed": prompt_seed, "image_seed": image_seed,
                "prompt_pool": "random embeddings" if _random_embedding_rows(family, tiny) else (
                    f"first {max(num_prompts, family.num_images)} of the family's protocol set, shuffled"),
                "feature_net": m["feature_net"], "fid_against": fid_against, "reference": m["reference"],
                **({"metric": m["metric"]} if "metric" in m else {}),
                "second_metric": protocol.second_metric_name, "quant_seed": quant_seed, "kmeans_iters": kmeans_iters,
                "dtype": str(next(denoiser.parameters()).dtype).replace("torch.", ""), **user_code_settings(family),
                # batch size left out: any batch size renders the same images, so a resume may change it
                "sampler": {k: (v if isinstance(v, (int, float, str, bool, type(None))) else str(v))
                            for k, v in getattr(sampler, "settings", {}).items() if k != "batch_size"}}
    return protocol, settings


# --------------------------------------------------------------------------------- analysis + report
def score_layers(protocol: ImageProtocol, store, groups: list[list[LayerRef]], method: str, bits: int,
                 log=print) -> int:
    """Measure every group not yet in ``store`` (record index = position in ``groups``); returns how many."""
    from .utils import progress

    from .metrics.metric import vs_fp_label

    label = vs_fp_label(getattr(protocol, "metric", None))
    done = store.done_indices()
    todo = [(i, g) for i, g in enumerate(groups) if i not in done]
    if done:
        log(f"resuming: {len(groups) - len(todo)} of {len(groups)} layer(s) already measured")
    for index, group in progress(todo, desc=f"sensitivity {method}-{bits}"):
        head = group[0]
        metrics = protocol.measure({head.key: (method, bits)})
        record = {"key": head.key, "tied_keys": [r.key for r in group[1:]], "path": head.path,
                  "shape": list(head.shape), "numel": sum(r.numel for r in group), "method": method, "bits": bits}
        record.update(metrics)
        store.commit(index, record)
        log(f"[{index + 1}/{len(groups)}] {head.key}: {label} {metrics['fid_fp']:.4g}  "
            f"SSIM {metrics['ssim_fp']:.4f}  ({metrics['seconds']:.1f} s)")
    return len(todo)


def _degradations(records: list[dict], settings: dict) -> tuple[np.ndarray, np.ndarray, str, str]:
    fid_key = "fid_gt_increase" if settings.get("fid_against") == "gt" else "fid_fp"
    second_key = "clip_drop" if all("clip_drop" in r for r in records) and \
        settings.get("second_metric", "").startswith("CLIP") else "one_minus_ssim"
    return (np.array([r[fid_key] for r in records], dtype=np.float64),
            np.array([r[second_key] for r in records], dtype=np.float64), fid_key, second_key)


def build_report(records: list[dict], settings: dict, num_layers_total: int | None = None) -> dict:
    """The sensitivity file: settings, metric definitions, and per layer raw metrics, scores, band, rank."""
    if not records:
        raise ValueError("no layer has been measured yet")
    fid_deg, second_deg, fid_key, second_key = _degradations(records, settings)
    fid_norm, second_norm = min_max_normalise(fid_deg), min_max_normalise(second_deg)
    scores = FID_WEIGHT * fid_norm + (1 - FID_WEIGHT) * second_norm
    order = np.argsort(-scores, kind="stable")
    rank = np.empty(len(records), dtype=int)
    rank[order] = np.arange(1, len(records) + 1)
    skip = {"index", "timings"}
    layers = []
    for i, rec in enumerate(records):
        raw = {k: v for k, v in rec.items() if k not in skip | {"key", "tied_keys", "path", "shape", "numel"}}
        layers.append({"rank": int(rank[i]), "key": rec["key"], "tied_keys": rec.get("tied_keys", []),
                       "path": rec.get("path"), "shape": rec.get("shape"), "numel": rec.get("numel"),
                       "raw": raw, "fid_degradation": float(fid_deg[i]), "second_degradation": float(second_deg[i]),
                       "fid_normalised": float(fid_norm[i]), "second_normalised": float(second_norm[i]),
                       "sensitivity": float(scores[i]), "band": band_of(float(scores[i]))})
    metric = settings.get("metric")  # the family's own callable metric (metric_settings records its name)
    if fid_key == "fid_gt_increase":
        fid_name = (f"{metric} increase (quantized minus FP)" if metric
                    else "FID-GT increase (quantized minus FP, vs the reference set)")
    else:  # run_sensitivity names what the measurement is for a callable metric (vs_fp_label)
        fid_name = (f"{settings['fid_fp_name']} (the quantized against the FP model)" if settings.get("fid_fp_name")
                    else "FID-FP (quantized vs FP images)")
    return {
        "settings": settings,
        "metrics": {"fid": {"key": fid_key, "name": fid_name, "feature_net": settings.get("feature_net"),
                            "weight": FID_WEIGHT},
                    "second": {"key": second_key,
                               "name": settings.get("second_metric") if second_key == "clip_drop" else PROXY_NAME,
                               "is_proxy": second_key != "clip_drop", "weight": round(1 - FID_WEIGHT, 10)},
                    "normalisation": "min-max over the analysed layers (relative: least damaging 0, most ~1)",
                    # the absolute scale min-max hides: a tiny range means the ranking is mostly noise
                    "raw_range": {"fid": [float(fid_deg.min()), float(fid_deg.max())],
                                  "second": [float(second_deg.min()), float(second_deg.max())]}},
        "bands": [{"band": name, "below": None if not np.isfinite(upper) else upper, "advice": advice}
                  for name, upper, advice in BANDS],
        "num_layers_analysed": len(records), "num_layers_total": num_layers_total,
        "band_counts": {name: sum(1 for l in layers if l["band"] == name) for name, _, _ in BANDS},
        "ranking": [records[i]["key"] for i in order],
        "layers": layers,
    }


def format_summary(report: dict, top: int = 10) -> str:
    s, m = report["settings"], report["metrics"]
    lines = [f"sensitivity of {s['model']}{' (tiny)' if s.get('tiny') else ''}: {s['method']} {s['bits']}-bit, "
             f"{s['num_prompts']} prompts (seed {s['prompt_seed']}), {report['num_layers_analysed']}"
             f"{'/' + str(report['num_layers_total']) if report.get('num_layers_total') else ''} layers analysed",
             f"score = {m['fid']['weight']:g} x norm[{m['fid']['name']}] + {m['second']['weight']:g} x "
             f"norm[{m['second']['name']}]" + ("   (proxy: no CLIP weights)" if m["second"]["is_proxy"] else ""),
             f"{'rank':>4}  {'sensitivity':>11}  {'band':<8}  layer"]
    by_rank = sorted(report["layers"], key=lambda l: l["rank"])
    for layer in by_rank[:top]:
        lines.append(f"{layer['rank']:>4}  {layer['sensitivity']:>11.3f}  {layer['band']:<8}  {layer['key']}")
    lines.append("bands: " + ", ".join(f"{k} {v}" for k, v in report["band_counts"].items()))
    return "\n".join(lines)


def model_tag(model: str, tiny: bool) -> str:
    return f"{model}_tiny" if tiny else model


def report_path(outdir, model: str, bits: int, method: str = DEFAULT_METHOD, tiny: bool = False) -> Path:
    """``<outdir>/sensitivity_analysis_<model>_<bits>bit.json`` (``_<method>`` appended unless mse;
    ``<model>_tiny`` for tiny models, so smoke runs never overwrite real results)."""
    suffix = "" if method == DEFAULT_METHOD or bits == FP_BITS else f"_{method}"
    return Path(outdir) / f"sensitivity_analysis_{model_tag(model, tiny)}_{bits}bit{suffix}.json"


def run_sensitivity(protocol: ImageProtocol, settings: dict, outdir, bits: int, method: str = DEFAULT_METHOD,
                    max_layers: int | None = None, log=print) -> dict:
    """Measure (resumably), build and write the report; returns it (with ``path``)."""
    from .store import RecordStore
    from .utils import atomic_path

    if not (MIN_BITS <= bits <= MAX_BITS or bits == FP_BITS):
        raise InputError(f"--sensitivity_bits must be 2..8 or 16 (FP16 rounding), got {bits}")
    groups = search_groups(protocol.layers)
    if max_layers is not None:
        if max_layers < 1:
            raise InputError(f"--max_layers must be >= 1, got {max_layers}")
        groups = groups[:max_layers]
    if bits == FP_BITS:
        method = "fp16"
        if next(protocol.denoiser.parameters()).dtype == torch.float16:
            log("note: the model already runs in float16, so 16-bit rounding changes nothing: every layer scores 0")
    settings = dict(settings, bits=bits, method=method)
    run_dir = Path(outdir) / "sensitivity_runs" / f"{model_tag(settings['model'], settings['tiny'])}_{bits}bit_{method}"
    # --max_layers is left out of the run identity: a later run with more layers extends the same records
    store = RecordStore(run_dir, settings, required_keys=RECORD_KEYS)
    score_layers(protocol, store, groups, method, bits, log=log)
    wanted = {g[0].key for g in groups}
    records = [r for r in store.records() if r["key"] in wanted]
    from .metrics.metric import is_feature_metric, vs_fp_label

    metric = getattr(protocol, "metric", None)
    named = {} if metric is None or is_feature_metric(metric) else {"fid_fp_name": vs_fp_label(metric)}
    report = build_report(records, dict(settings, records_dir=str(run_dir), **named),
                          len(search_groups(protocol.layers)))
    path = report_path(outdir, settings["model"], bits, method, settings["tiny"])
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(report, indent=1))
    log(format_summary(report))
    log(f"wrote {path}")
    report["path"] = str(path)
    return report


# ---------------------------------------------------------------------------------------------- CLI
def cmd_sensitivity(args) -> int:
    from .cli_flags import refiner_arg
    from .families import get_family

    family = get_family(args.model)
    protocol, settings = setup_protocol(
        family, pretrained=args.pretrained, tiny=args.tiny, device=args.device, num_prompts=args.num_prompts,
        prompt_seed=args.prompt_seed, image_seed=args.image_seed, batch_size=args.batch_size,
        coco_path=args.coco_path, fid_against=args.fid_against, reference_dir=args.reference_dir,
        inception=args.inception, random_features=args.random_features, pixel_features=args.pixel_features,
        clip_dir=args.clip_dir, refiner=refiner_arg(args))
    methods = parse_methods(args.method)
    paths = [run_sensitivity(protocol, settings, args.outdir, args.sensitivity_bits, m, args.max_layers)["path"]
             for m in methods]
    if len(paths) > 1:
        from .families import family_flag

        flag = family_flag(family)  # a --family family is unknown to a fresh process: the command names it
        print("each layer's method and width from these measurements: qua2sedimo optimize-mixed-precision "
              + ("" if flag.startswith("--model") else flag + " ") + "--sensitivity_file " + " ".join(paths))
    return 0


def parse_methods(text: str) -> list[str]:
    """``--method``: one method, a comma list, or ``all`` (every method, one report each)."""
    names = list(METHODS) if text.strip() == "all" else [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in names if m not in METHODS]
    if not names or bad:
        raise InputError(f"--method must be one of {', '.join(METHODS)}, a comma list of them, or all; got {text!r}")
    return list(dict.fromkeys(names))


def add_sensitivity_parser(subparsers):
    from multiquant.paths import constants

    p = subparsers.add_parser("sensitivity", help="per-layer quantization sensitivity: one layer quantized at a time")
    add_model_flags(p)
    add_refiner_args(p)
    p.add_argument("--sensitivity_bits", type=int, default=4,
                   help="bit width of the quantized layer: 2..8, or 16 for FP16 rounding (default 4)")
    p.add_argument("--method", default=DEFAULT_METHOD,
                   help="quantizer: mse = UAQ, kmeans = K-Means-C, kmeans_all = K-Means-A (default mse); a comma "
                        "list or 'all' measures each (one report per method, the FP images rendered once), from "
                        "which optimize-mixed-precision picks each layer's method")
    p.add_argument("--max_layers", type=int, default=None, help="analyse only the first N search layers")
    p.add_argument("--num_prompts", type=int, default=100, help="images per layer (default 100)")
    p.add_argument("--prompt_seed", type=int, default=42, help="seed of the prompt subset / order")
    p.add_argument("--image_seed", type=int, default=42, help="base seed of the per-image noise")
    p.add_argument("--batch_size", type=int, default=None, help="images per denoiser batch (default: the family's)")
    p.add_argument("--coco_path", default=None, help="captions_val2017.json (default: QUA2SEDIMO_COCO_CAPTIONS)")
    p.add_argument("--fid_against", default="fp", choices=["fp", "gt"],
                   help="fp: FID of quantized vs FP images (default, no reference set needed); "
                        "gt: increase of FID against the reference set (--reference_dir)")
    p.add_argument("--reference_dir", default=None, help="FID reference image folder (with --fid_against gt)")
    p.add_argument("--inception", default=None, help="clean-fid Inception torchscript (or QUA2SEDIMO_INCEPTION)")
    p.add_argument("--random_features", action="store_true", help="random-weight Inception: smoke/timing runs only")
    p.add_argument("--pixel_features", action="store_true",
                   help="pooled pixels as FID features (no feature network needed): smoke runs only")
    p.add_argument("--clip_dir", default=None, help="local CLIP model directory (or QUA2SEDIMO_CLIP); "
                                                    "without one the proxy 1-SSIM(FP) replaces CLIP drop")
    p.add_argument("--outdir", default=str(constants.RESULTS_DIR),
                   help="results directory (report + resumable sensitivity_runs/)")
    p.set_defaults(func=cmd_sensitivity)
    return p


def add_parsers(subparsers) -> None:
    """Register ``sensitivity``, ``flops`` and ``optimize-mixed-precision`` (each with ``func`` set)."""
    from .allocation import add_optimize_parser
    from .flops import add_flops_parser

    add_sensitivity_parser(subparsers)
    add_flops_parser(subparsers)
    add_optimize_parser(subparsers)
