"""The one scorer: fixed image set, the family's metric, and every way of changing the weights in between.

The model, conditions, per-image noise and the metric (with its reference statistics) are set up once
through the family's adapter (:mod:`multiquant.adapters`); the FP images are rendered once. Then

* :meth:`Scorer.record` scores a quantization configuration (eval-random, eval-configs, search, report):
  one weight swap from the multiquantizer, the image set, one metric pass -> a ``quant_cache.pkl`` entry;
* :meth:`Scorer.measure` scores fake-quantized layers with all others FP (sensitivity).

With ``act_bits`` (``eval-configs --quant_act --act_bit 8``) a configuration's images are rendered with the
inputs of every quantizable layer (Linear / Conv) fake-quantized online, token-wise
(:mod:`multiquant.activations`); the attention matmuls (Q K^T, softmax x V) and everything outside those layers
stay FP. The FP reference images of the proxies stay fully FP (weights and activations).

Under ``torchrun`` each rank renders its shard of the images and the features (or, for a callable metric,
the images) are gathered, so G processes give the same numbers as one.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .paths import multiquantizer_path

from . import distributed as dist
from .adapters import MissingReferenceError, SamplerOptions, adapter_for  # noqa: F401
from .checkpoint import MultiQuantizer
from .config import ConfigApplier, config_record, sample_random_config, uniform_config, validate_config
from .errors import MissingFileError, UserError
from .families import FamilySpec
from .layers import LayerRef, fp_bytes
from .metrics.fid import feature_stats
from .metrics.metric import FID_METHOD, is_feature_metric, metric_label  # noqa: F401
from .metrics.proxy import psnr, ssim
from .activations import SCHEME as ACT_QUANT_SCHEME
from .options import FP_OPTION
from .utils import default_device

ACT_FP_BITS = 16  # what a record's act_bits says when the activations were not quantized
# --random_features without a reference image set: what the label is measured against, and what it means
SMOKE_REFERENCE = "fp16 images of this run (smoke run: random features, no reference set)"
SMOKE_NOTE = ("smoke run (--random_features, no reference images): FID-GT-1k in these records is the FID of each "
              "configuration's images against this run's FP16 images under random-weight Inception features, in "
              "arbitrary units (0 = the FP16 images; larger = further from them). It checks the pipeline end to end "
              "and orders configurations by how much quantization changes the images; it is not an image-quality "
              "figure. psnr_fp / ssim_fp: per-image PSNR (dB) / SSIM against the FP16 images.")


# -------------------------------------------------------------------------------------------- scorer
@dataclass
class Scorer:
    """Everything that stays fixed while configurations (or single layers) are scored."""

    family: FamilySpec
    denoiser: torch.nn.Module
    sampler: object  # renders images `indices` with the denoiser's current weights (see multiquant.adapters)
    metric: object  # multiquant.metrics.FeatureFID / CallableMetric (the label, lower is better)
    mq: MultiQuantizer | None = None  # configurations (record); None for sensitivity-only scorers
    layers: list[LayerRef] | None = None  # the quantizable layers (default: the multiquantizer's)
    macs: dict | None = None
    proxies: bool = True  # FID-FP / PSNR / SSIM against the FP images
    with_reference: bool = True  # the label against the metric's reference set (FID-GT)
    label_vs_fp: bool = False  # the label is the FID against the FP images instead (data-free smoke runs)
    image_dir: Path | None = None  # save PNGs of every configuration here (--save_images)
    clip: object = None  # metrics.clip.ClipScorer for text families, when CLIP weights are given
    prompts: list | None = None  # what CLIP compares with (default: the sampler's conditions)
    quant_seed: int = 0  # measure(): fake-quantization seed / K-Means iterations
    kmeans_iters: int = 100
    weight_cache: dict | None = None  # measure(): (key, method, bits) -> (w_hat, error); None: no caching
    act_bits: int | None = None  # record()/score(): quantize the layers' input activations (None: FP)
    fp: dict = field(default_factory=dict)

    def __post_init__(self):
        self.num_images = self.sampler.num_images
        self.local = dist.shard(list(range(self.num_images)), dist.rank(), dist.world_size())
        if self.layers is None and self.mq is not None:
            self.layers = self.mq.layers
        self.applier = ConfigApplier(self.denoiser, self.mq) if self.mq is not None else None
        self.fp_bytes = fp_bytes(self.mq.layers, self.mq.fp_prec) if self.mq is not None else None

    # -- rendering and metrics -------------------------------------------------------------------------
    @property
    def indices(self) -> list[int]:
        return list(range(self.num_images))

    def _generate(self, timings: dict | None = None) -> tuple[torch.Tensor, np.ndarray | None]:
        """This rank's images, and their metric features when they could be computed while rendering
        (``timings`` then receives the feature pass's tail, see features_while_rendering)."""
        if not self.local:
            return torch.zeros(0, dtype=torch.uint8), None
        chunk = feature_chunk(self.metric)
        if chunk is None or not hasattr(self.sampler, "batches"):
            return self.sampler.generate(self.local), None
        return features_while_rendering(self.sampler.batches(self.local), self.metric.features, chunk, timings)

    @contextmanager
    def activations_quantized(self):
        """Inputs of every quantizable layer fake-quantized to ``act_bits`` inside the block (nothing if None)."""
        if self.act_bits is None:
            yield
            return
        from .activations import enable_activation_quant

        handles = enable_activation_quant(self.denoiser, self.act_bits)
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _render(self, config: dict) -> tuple[torch.Tensor, np.ndarray | None, dict]:
        t0 = time.perf_counter()
        self.applier.apply(config)
        t1 = time.perf_counter()
        overlap = {}
        with self.activations_quantized():
            images, feats = self._generate(overlap)
        return images, feats, {"apply_s": t1 - t0, "generate_s": time.perf_counter() - t1, **overlap}

    def _gather(self, local: torch.Tensor) -> torch.Tensor:
        return dist.gather_features(local)

    def evaluate(self, images: torch.Tensor, fp: dict | None = None, feats: np.ndarray | None = None) -> dict:
        """Metrics of this rank's ``images`` (identical on all ranks): ``label`` (against the reference, when
        asked), feature ``mu``/``sigma`` (feature metrics), ``vs_fp`` (against ``fp``), ``clip``. ``feats``: the
        images' features when already computed (:meth:`_generate`)."""
        out = {}
        if is_feature_metric(self.metric):
            if feats is None and len(images):
                feats = self.metric.features(images)
            local = torch.from_numpy(feats) if feats is not None else None
            feats = self._gather(local if local is not None else torch.zeros(0, 1, dtype=torch.float64)).numpy()
            out["mu"], out["sigma"] = feature_stats(feats)
            if self.with_reference:
                out["label"] = self.metric.distance(out["mu"], out["sigma"])
            if fp is not None:
                out["vs_fp"] = self.metric.distance(out["mu"], out["sigma"], fp)
        else:
            all_images = self._gather(images)
            fp_images = fp["all_images"] if fp is not None else all_images
            out["all_images"] = all_images
            if self.with_reference:
                out["label"] = self.metric(all_images, fp_images) if self.metric.needs_fp else self.metric(all_images)
            if fp is not None:
                if self.metric.needs_fp:
                    out["vs_fp"] = out["label"] if "label" in out else self.metric(all_images, fp_images)
                else:
                    value = out["label"] if "label" in out else self.metric(all_images)
                    out["vs_fp"] = value - fp["value"]
            out["value"] = out.get("label")
        if self.clip is not None:
            prompts = self.prompts if self.prompts is not None else self.sampler.conditions
            scores = np.asarray(self.clip(images, [prompts[i] for i in self.local]), dtype=np.float64)
            out["clip"] = float(self._gather(torch.from_numpy(scores).reshape(-1, 1)).mean())
        return out

    def fp_reference(self) -> dict:
        """FP images (for the proxies) and their metrics, computed once."""
        if not self.fp:
            t0 = time.perf_counter()
            if self.applier is not None:
                self.applier.apply(uniform_config(self.mq.layers, FP_OPTION))
            images, feats = self._generate()
            timing = {"generate_s": time.perf_counter() - t0}
            m = self.evaluate(images, feats=feats)
            if not is_feature_metric(self.metric) and m.get("value") is None:
                m["value"] = self.metric(m["all_images"], m["all_images"]) if self.metric.needs_fp \
                    else self.metric(m["all_images"])
            self.fp = dict(m, images=images, timing=timing)
            if "label" in m:
                self.fp["fid_gt"] = m["label"]
        return self.fp

    # -- configurations (eval-random, eval-configs, search) ---------------------------------------------
    def score(self, config: dict, tag: str | None = None) -> dict:
        """Metrics of one configuration (on every rank; identical on all ranks)."""
        images, feats, timing = self._render(config)
        t2 = time.perf_counter()
        fp = self.fp_reference() if self.proxies or self.label_vs_fp else None
        m = self.evaluate(images, fp, feats)
        out = {"FID-GT-1k": np.float64(m["vs_fp"] if self.label_vs_fp else m["label"])}
        if self.proxies:
            if is_feature_metric(self.metric):
                out["FID-FP-1k"] = float(m["vs_fp"])
            out.update(self._pixel_proxies(images, fp))
        if "clip" in m:
            out["clip_score"] = m["clip"]
        timing["metrics_s"] = time.perf_counter() - t2
        out["timings"] = timing
        if self.image_dir is not None and tag is not None:
            save_pngs(images, self.local, self.image_dir / tag)
        return out

    def _pixel_proxies(self, images: torch.Tensor, fp: dict) -> dict:
        if len(images):
            local = torch.stack([psnr(images, fp["images"]), ssim(images, fp["images"])], dim=1)
        else:
            local = torch.zeros(0, 2, dtype=torch.float64)
        per_image = self._gather(local.double())
        return {"psnr_fp": float(per_image[:, 0].clamp_max(100).mean()), "ssim_fp": float(per_image[:, 1].mean())}

    def record(self, config: dict, **extra) -> dict:
        """A quant_cache.pkl entry: the reference's statistics, metrics, BOPs and provenance."""
        from .metrics.bops import config_bops

        config = validate_config(config, self.mq.layers, options=self.mq.options)
        rec = config_record(config, self.mq.table, self.mq.fp_prec, self.fp_bytes)
        metrics = self.score(config, tag=extra.get("name") or (f"{extra['index']:06d}" if "index" in extra else None))
        rec["FID-GT-1k"] = metrics.pop("FID-GT-1k")
        rec["bops"] = config_bops(config, self.mq.layers, self.macs) if self.macs else float("nan")
        rec["architecture"] = self.family.architecture or self.family.name
        rec.update(extra)
        rec.update(metrics)
        rec["num_images"] = self.num_images
        rec["act_bits"] = int(self.act_bits or ACT_FP_BITS)
        return rec

    # -- single layers (sensitivity) ------------------------------------------------------------------
    @property
    def second_metric(self) -> str:
        return "clip_drop" if self.clip is not None else "one_minus_ssim"

    @property
    def second_metric_name(self) -> str:
        from .sensitivity import PROXY_NAME

        return f"CLIP drop ({self.clip.name}, raw cosine)" if self.clip is not None else PROXY_NAME

    def _replacement(self, ref: LayerRef, method: str, bits: int) -> tuple[torch.Tensor, float]:
        from .sensitivity import fake_quantize

        key = (ref.tied_to or ref.key, method, bits)
        if self.weight_cache is not None and key in self.weight_cache:
            return self.weight_cache[key]
        out = fake_quantize(ref.weight(self.denoiser), method, bits, seed=self.quant_seed, iters=self.kmeans_iters)
        if self.weight_cache is not None:
            self.weight_cache[key] = out
        return out

    def measure(self, assignment: dict[str, tuple[str, int]]) -> dict:
        """Raw metrics with the layers of ``assignment`` ({key: (method, bits)}) fake-quantized, all others FP.

        A tied copy follows its canonical layer's entry; the canonical weight is quantized once."""
        from .sensitivity import quantized_weights

        fp = self.fp_reference()
        t0 = time.perf_counter()
        replacements, error = [], 0.0
        for ref in self.layers:
            choice = assignment.get(ref.key) or (assignment.get(ref.tied_to) if ref.tied_to else None)
            if choice is None:
                continue
            w_hat, err = self._replacement(ref, *choice)
            replacements.append((ref, w_hat))
            error += err
        with quantized_weights(self.denoiser, replacements):
            images, feats = self._generate()
        m = self.evaluate(images, fp, feats)
        proxies = self._pixel_proxies(images, fp)
        out = {"fid_fp": float(m["vs_fp"]), "psnr_fp": proxies["psnr_fp"], "ssim_fp": proxies["ssim_fp"],
               "one_minus_ssim": 1.0 - proxies["ssim_fp"], "weight_error": error}
        if "label" in m:
            out["fid_gt"] = float(m["label"])
            out["fid_gt_increase"] = float(m["label"]) - fp["fid_gt"]
        if "clip" in m:
            out["clip"] = m["clip"]
            out["clip_drop"] = fp["clip"] - m["clip"]
        out["seconds"] = time.perf_counter() - t0
        return out


ConfigScorer = Scorer  # the names the two former engines had
ImageProtocol = Scorer


def feature_chunk(metric) -> int | None:
    """How many images the metric's feature network takes per forward, when it declares it (a
    :class:`~multiquant.metrics.features.FeatureNet`); None for other metrics and plain callables."""
    if not is_feature_metric(metric):
        return None
    size = getattr(metric.feature_net, "batch_size", None)
    return size if isinstance(size, int) and size > 0 else None


def features_while_rendering(batches, features, chunk: int,
                             timings: dict | None = None) -> tuple[torch.Tensor, np.ndarray]:
    """All images of the iterator ``batches`` and ``features`` of them, computed on a worker thread in chunks of
    ``chunk`` images while the next batches render.

    Why: the feature pass (a CPU resize per image, then the feature network) otherwise waits until the last
    image exists; here it hides behind generation. The chunks are the ones a single call on all images makes
    (``FeatureNet`` splits into ``chunk``-sized pieces from the start), so the features are the same numbers.
    Between two batches the GPU waits for this thread, so it only hands each chunk's images to the worker (which
    stacks them). ``timings``, when given, receives ``features_tail_s`` (from the last rendered batch until the
    last features) and ``feature_chunks_overlapped`` (chunks handed over while more batches were to come)."""
    images, pending, futures = [], [], []
    overlapped = 0
    with ThreadPoolExecutor(max_workers=1) as pool:
        for batch in batches:
            overlapped = len(futures)  # handed over before this batch: more batches were to come
            images.append(batch)
            pending.extend(batch)
            while len(pending) >= chunk:
                futures.append(pool.submit(_features_of_stack, features, pending[:chunk]))
                pending = pending[chunk:]
        rendered = time.perf_counter()
        if pending:
            futures.append(pool.submit(_features_of_stack, features, pending))
        feats = [future.result() for future in futures]
    if timings is not None:
        timings.update(features_tail_s=time.perf_counter() - rendered, feature_chunks_overlapped=overlapped)
    return torch.cat(images), np.concatenate(feats)


def _features_of_stack(features, images: list[torch.Tensor]) -> np.ndarray:
    return features(torch.stack(images))


def save_pngs(images: torch.Tensor, indices: list[int], folder: Path) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, img in zip(indices, images):
        arr = img.permute(1, 2, 0).numpy()
        Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr).save(folder / f"{i:05d}.png")


# ------------------------------------------------------------------------------------------ set-up
@dataclass
class Loaded:
    """A family's generation object, its denoiser and the adapter that serves it."""

    family: FamilySpec
    adapter: object
    pipe: object
    denoiser: torch.nn.Module
    device: torch.device


def load_for_scoring(family: FamilySpec, pretrained=None, tiny: bool = False, device=None) -> Loaded:
    """Load (or build tiny) the family's pipeline / module through its adapter."""
    adapter = adapter_for(family)
    device = default_device(device)
    pipe = adapter.tiny(family, device) if tiny else adapter.load(family, pretrained, device)
    return Loaded(family, adapter, pipe, adapter.denoiser(pipe), device)


def _settings_of(sampler) -> dict:
    return {k: (v if isinstance(v, (int, float, str, bool, type(None))) else str(v))
            for k, v in getattr(sampler, "settings", {}).items()}


def metric_settings(metric, with_reference: bool = True) -> dict:
    """The metric's run_meta fields: feature network and reference (as earlier runs recorded them), plus the
    metric's name for metrics that are not a feature FID."""
    if not with_reference and is_feature_metric(metric):  # its settings would load the reference set
        settings = {"feature_net": metric.feature_name, "reference": None}
    else:
        settings = dict(metric.settings)
    if not with_reference:
        settings["reference"] = None
    out = {"feature_net": settings["feature_net"], "reference": settings["reference"]}
    if not is_feature_metric(metric):
        out["metric"] = metric.name
        out["feature_net"] = metric.name
    return out


def setup_scorer(family: FamilySpec, *, pretrained=None, tiny: bool = False, device=None, mq_path=None,
                 num_images: int | None = None, image_seed: int = 42, batch_size: int | None = None,
                 coco_path=None, reference_dir=None, inception=None, random_features: bool = False,
                 proxies: bool = True, save_images: Path | None = None, embed_cache_dir=None,
                 bops: bool = True, clip_dir=None, refiner=None, build_mq: bool = False,
                 act_bits: int | None = None, compile_mode: str | None = None, dtype: str | None = None,
                 channels_last: bool = False, log=print) -> tuple[Scorer, dict]:
    """Load everything once; returns the scorer and the protocol settings to record with every result.

    ``refiner``: None = the family's protocol (SDXL: its FP refiner finishes the schedule), False = none,
    a directory / hub id = that refiner. The settings name the multiquantizer by its content hash: a run
    directory only ever holds records of one checkpoint. ``build_mq``: build the checkpoint when there is
    none at ``mq_path`` / the default. ``act_bits``: quantize the layers' input activations of every scored
    configuration (recorded in the settings, so a run directory never mixes them with FP-activation results).
    ``compile_mode``: ``torch.compile`` the denoiser in place with this mode; configurations copy their weights
    into its parameters, so it compiles once per batch shape (recorded: compiled kernels round differently).
    ``dtype`` (float32 / float16 / bfloat16): render in this precision instead of the family's (refused where the
    family declares it unsafe); the multiquantizer is checked against the weights as loaded, then the rendering
    modules are cast (:func:`apply_generation_options`). ``channels_last``: the convolutional rendering modules
    (U-Net denoisers, VAEs, a plain module family's convolutions) in channels-last memory format. Each is recorded
    in the settings when it changes what runs (the numbers change with it), never otherwise."""
    from .activations import check_act_bits

    act_bits = check_act_bits(act_bits)
    target_dtype = family.scoring_dtype(dtype) if dtype else None  # an unsafe precision fails before loading
    loaded = load_for_scoring(family, pretrained, tiny, device)
    adapter, denoiser = loaded.adapter, loaded.denoiser
    num_images = num_images or family.num_images
    conditions = adapter.conditions(family, num_images, tiny=tiny, coco_path=coco_path)
    options = SamplerOptions(seed=image_seed, batch_size=batch_size, coco_path=coco_path,
                             embed_cache_dir=embed_cache_dir, embed_seed=image_seed,
                             refiner=adapter.refiner(family, refiner, loaded.device, tiny))
    sampler = adapter.sampler(family, loaded.pipe, conditions, options, tiny=tiny)
    metric = adapter.metric(family, loaded.device, inception=inception, random_features=random_features,
                            reference_dir=reference_dir)
    smoke = False
    if is_feature_metric(metric):
        try:
            metric.reference()  # fail now, not after the first configuration, when the reference set is missing
        except MissingReferenceError:
            # random features mean nothing against real images anyway: a data-free smoke run compares with FP16
            if not random_features:
                raise
            smoke = True
            log(SMOKE_NOTE)
    mq = load_or_build_multiquantizer(family, denoiser, mq_path, tiny=tiny, build=build_mq, log=log)
    macs = None
    if bops and adapter.counts_macs(family):
        from .metrics.bops import layer_macs

        macs = layer_macs(denoiser, family, resolution=None if tiny else family.resolution)
    # after the checkpoint's check (against the weights as loaded) and the MACs' forward (never compiled for it)
    generation = apply_generation_options(loaded, options.refiner, dtype=target_dtype, channels_last=channels_last,
                                          compile_mode=compile_mode)
    clip = None
    if clip_dir and family.conditioning == "text":  # CLIP weights given: fail loudly if they do not load
        from .metrics.clip import ClipScorer

        clip = ClipScorer(clip_dir, device=loaded.device)
    scorer = Scorer(family, denoiser, sampler, metric, mq=mq, macs=macs, proxies=proxies,
                    image_dir=Path(save_images) if save_images else None, clip=clip, act_bits=act_bits,
                    with_reference=not smoke, label_vs_fp=smoke)
    from .adapters.module import user_code_settings

    m = metric_settings(metric, with_reference=not smoke)
    if smoke:
        m["reference"] = SMOKE_REFERENCE
    settings = {"model": family.name, "num_images": num_images, "image_seed": image_seed,
                "feature_net": m["feature_net"], "reference": m["reference"], "fid_method": FID_METHOD,
                **({"metric": m["metric"]} if "metric" in m else {}),
                "clip": clip.name if clip is not None else None,
                "multiquantizer_content_hash": mq.content_hash, "weights_hash": mq.manifest.get("weight_hash"),
                "tiny": tiny, "sampler": _settings_of(sampler), "act_bits": act_bits,  # None: FP activations
                **user_code_settings(family)}
    # only when set: the settings (and content keys) of runs without them stay as they were (store.ADDED_RUN_KEYS)
    settings.update(generation)
    if act_bits is not None:
        settings["act_quant"] = ACT_QUANT_SCHEME
    # not the number of processes: G ranks give the same numbers as one, so a run resumes under any G
    return scorer, settings


def apply_generation_options(loaded: Loaded, refiner=None, dtype: torch.dtype | None = None,
                             channels_last: bool = False, compile_mode: str | None = None) -> dict:
    """How the rendering modules compute, through the family's adapter, in this order: cast to ``dtype`` (a
    no-op when the denoiser already is in it), channels-last memory format, then ``torch.compile`` of the
    denoiser in place (it compiles the final layout; configurations copy their weights into its parameters,
    which keeps their dtype and strides, so it never recompiles for a configuration). Returns the run settings
    of what changed: ``dtype``, ``channels_last``, ``compile`` (none of them when nothing was asked)."""
    adapter, family, pipe = loaded.adapter, loaded.family, loaded.pipe
    settings = {}
    if dtype is not None and next(loaded.denoiser.parameters()).dtype != dtype:
        adapter.cast_generation(family, pipe, dtype, refiner)
        settings["dtype"] = str(dtype).replace("torch.", "")
    if channels_last:
        converted = adapter.to_channels_last(family, pipe, refiner)
        if not sum(converted.values()):
            raise UserError(f"--channels_last: family {family.name!r} renders with no 2-D convolution "
                            f"({', '.join(converted) or 'no module'}): leave out --channels_last")
        settings["channels_last"] = True
    if compile_mode:
        loaded.denoiser.compile(mode=compile_mode)
        settings["compile"] = compile_mode
    return settings


def default_multiquantizer_path(family, tiny: bool = False) -> Path:
    """``<MULTIQUANTIZER_DIR>/<family>[_tiny]_mq.safetensors``, or the shipped checkpoint of that name when the
    user has none (multiquant.paths.multiquantizer_path)."""
    return multiquantizer_path(f"{family.name}{'_tiny' if tiny else ''}_mq.safetensors")


def load_or_build_multiquantizer(family, denoiser, mq_path=None, tiny: bool = False, build: bool = False,
                                 log=print) -> MultiQuantizer:
    """The checkpoint at ``mq_path`` (default: the family's), checked against ``denoiser``. A missing file is
    an error (a mistyped path never silently becomes a new checkpoint) unless ``build`` asks to build and
    save it there."""
    path = Path(mq_path) if mq_path else default_multiquantizer_path(family, tiny)
    device = next(denoiser.parameters()).device
    if path.exists():
        mq = MultiQuantizer.from_pretrained(path, device=device)
        mq.check_compatible(denoiser, family)
        return mq
    if not build:
        from .families import family_flag

        where = "--mq path" if mq_path else "default multiquantizer"
        raise MissingFileError(
            f"the {where} {path} does not exist: check the path, build it with `qua2sedimo multiquantizer "
            f"{family_flag(family)}{' --tiny' if tiny else ''}`{f' --out {path}' if mq_path else ''}, "
            f"or pass --build_mq to build it now")
    from .utils import check_writable_dir

    check_writable_dir(path.parent, what="multiquantizer directory")
    log(f"no multiquantizer at {path}: building it now (--build_mq)")
    mq = MultiQuantizer.build(denoiser, family)
    if dist.is_main():
        mq.save_pretrained(path)
    dist.barrier()
    return mq.to(device)


# ------------------------------------------------------------------------------------------- loops
def random_configs(layers, seed: int, num: int, a_l: float = 0.0, a_u: float = 1.0):
    for index in range(num):
        yield index, sample_random_config(layers, seed, index, a_l, a_u)


def score_into_store(scorer: ConfigScorer, store, items, extra_of=lambda index: {}, log=print) -> int:
    """Score ``(index, config)`` items not yet in ``store`` (resume); returns how many were scored.

    Each index is claimed in the store just before it is scored, so other processes on the same directory
    (a second eval-random, say) share the work: what one committed or is scoring, the other skips."""
    from .store import DuplicateRecordError
    from .utils import Progress

    items = list(items)  # every rank walks the same list; rank 0 decides each index (claims are its)
    done = store.done_indices() if dist.is_main() else set()
    todo = [(i, c) for i, c in items if i not in done]
    if done and dist.is_main():
        log(f"resuming: {len(done)} configuration(s) already scored, {len(todo)} to go")
    scored = elsewhere = 0
    label = metric_label(getattr(scorer, "metric", None))
    # counts what is scored now (a resumed run's committed configurations would make the rate and ETA lie)
    counter = Progress(len(todo), desc="scoring configurations", unit="config", disable=not dist.is_main())
    for index, config in items:
        # every rank takes part in every decision (a broadcast); rank 0 refuses what is committed already
        mine = index not in done and (store.claim(index) if hasattr(store, "claim") else True) if dist.is_main() else None
        if not dist.main_decides(mine):
            elsewhere += index not in done  # committed or being scored by another process sharing the directory
            counter.drop(index not in done)
            continue
        t0 = time.perf_counter()
        rec = scorer.record(config, index=index, **extra_of(index))
        rec["timings"]["total_s"] = time.perf_counter() - t0
        if dist.is_main():
            try:
                store.commit(index, rec)
            except DuplicateRecordError:  # a writer that does not claim got there first: same numbers, kept
                log(f"[{index}] was committed meanwhile by another process; kept that record")
                getattr(store, "release", lambda i: None)(index)
            else:
                log(f"[{index}] avg_bits {rec['avg_bits']:.3f}  {label} {float(rec['FID-GT-1k']):.3f}  "
                    f"({rec['timings']['total_s']:.1f} s)")
        dist.barrier()
        scored += 1
        counter.update()
    counter.close()
    if elsewhere and dist.is_main():
        log(f"{elsewhere} configuration(s) were committed or are being scored by another process on "
            f"{getattr(store, 'outdir', 'the store')}")
    return scored
