"""Score quantization configurations: apply in place, generate a fixed image set, compute FID and proxies.

The model, prompts (embeddings), per-image noise, feature network and reference statistics are set up
once (:class:`ConfigScorer`); each configuration then costs one weight swap, the denoiser's sampling of
the image set, and one feature pass. Under ``torchrun`` each rank renders its shard of the images and the
features are gathered, so G processes give the same numbers as one.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import constants

from . import distributed as dist
from .checkpoint import MultiQuantizer
from .config import ConfigApplier, config_record, sample_random_config, uniform_config, validate_config
from .families import FamilySpec
from .layers import fp_bytes
from .metrics.fid import feature_stats, frechet_distance
from .metrics.proxy import psnr, ssim
from .quantizers import FP_OPTION

FID_METHOD = "eigh"  # same trace as scipy sqrtm (to ~1e-8), several times faster on 2048-d features


class MissingReferenceError(FileNotFoundError):
    """A metric needs weights or a reference set that are not available here."""


# --------------------------------------------------------------------------------- feature network
def feature_net_for(family: FamilySpec, device, inception: str | None = None, random_features: bool = False):
    """The family's FID feature network: its own MNIST classifier for ``mnist_*``, clean-fid's Inception
    otherwise (``random_features`` only for timing benchmarks; its name says so)."""
    from .metrics.features import InceptionFeatures, ModuleFeatures, RandomInceptionFeatures

    if family.prompt_source == "mnist_classes":
        from .mnist.classifier import load_classifier

        clf = load_classifier(device=device)
        return ModuleFeatures(_Penultimate(clf), name="mnist-lenet", preprocess=lambda x: x[:, :1], device=device,
                              batch_size=1000)
    if random_features:
        return RandomInceptionFeatures(device=device)
    return InceptionFeatures(device=device, weights=inception)


class _Penultimate(torch.nn.Module):
    """The classifier's penultimate features as a module (MNIST-FID's feature network)."""

    def __init__(self, classifier):
        super().__init__()
        self.classifier = classifier

    def forward(self, x):
        return self.classifier.features(x)


def reference_stats_for(family: FamilySpec, feature_net, reference_dir: str | None = None) -> tuple[dict, str]:
    """(``{"mu", "sigma"}``, reference id) of the family's ground-truth set, computed once and cached."""
    if family.prompt_source == "mnist_classes":
        from .mnist.classifier import load_reference_stats

        stats = load_reference_stats()
        return stats, f"mnist-heldout-{stats['n']}"
    from .metrics.stats import iter_image_folder, reference_stats

    default = constants.IMAGENET_VAL_IMAGES if family.prompt_source == "imagenet_classes" else constants.COCO_2017_IMAGES
    folder = Path(reference_dir) if reference_dir else default
    name = "imagenet-val" if family.prompt_source == "imagenet_classes" else "coco2017-val"
    env = "QUA2SEDIMO_IMAGENET_VAL" if name == "imagenet-val" else "QUA2SEDIMO_COCO_IMAGES"
    if folder is None or not Path(folder).is_dir():
        raise MissingReferenceError(
            f"the {name} reference images for FID-GT are not available ({folder}). Fix: pass --reference_dir DIR "
            f"or set {env} to the image folder; its statistics are computed once and cached in {constants.STATS_CACHE_DIR}.")
    mu, sigma = reference_stats(f"{name}-{Path(folder).resolve().name}", feature_net,
                                lambda: iter_image_folder(folder))
    return {"mu": mu, "sigma": sigma}, name


# -------------------------------------------------------------------------------------------- scorer
@dataclass
class ConfigScorer:
    """Everything that stays fixed while configurations are scored."""

    family: FamilySpec
    denoiser: torch.nn.Module
    mq: MultiQuantizer
    sampler: object  # multiquant.pipelines.sampling.Sampler
    feature_net: object
    ref_stats: dict
    num_images: int
    macs: dict | None = None
    proxies: bool = True
    image_dir: Path | None = None  # save PNGs of every configuration here (--save_images)
    clip: object = None  # metrics.clip.ClipScorer for text families, when CLIP weights are given
    fp: dict = field(default_factory=dict)

    def __post_init__(self):
        self.applier = ConfigApplier(self.denoiser, self.mq)
        self.local = dist.shard(list(range(self.num_images)), dist.rank(), dist.world_size())
        self.fp_bytes = fp_bytes(self.mq.layers, self.mq.fp_prec)

    def _render(self, config: dict) -> tuple[torch.Tensor, dict]:
        t0 = time.perf_counter()
        self.applier.apply(config)
        t1 = time.perf_counter()
        images = self.sampler.generate(self.local) if self.local else torch.zeros(0, dtype=torch.uint8)
        t2 = time.perf_counter()
        return images, {"apply_s": t1 - t0, "generate_s": t2 - t1}

    def _features(self, images: torch.Tensor) -> np.ndarray:
        local = torch.from_numpy(np.asarray(self.feature_net(images), dtype=np.float64)) if len(images) else None
        return dist.gather_features(local if local is not None else torch.zeros(0, 1, dtype=torch.float64)).numpy()

    def fp_reference(self) -> dict:
        """FP images (for the proxies) and FP feature statistics (FID-FP), computed once."""
        if not self.fp:
            images, timing = self._render(uniform_config(self.mq.layers, FP_OPTION))
            feats = self._features(images)
            mu, sigma = feature_stats(feats)
            self.fp = {"images": images, "mu": mu, "sigma": sigma,
                       "fid_gt": frechet_distance(mu, sigma, self.ref_stats["mu"], self.ref_stats["sigma"], method=FID_METHOD),
                       "timing": timing}
        return self.fp

    def score(self, config: dict, tag: str | None = None) -> dict:
        """Metrics of one configuration (on every rank; identical on all ranks)."""
        images, timing = self._render(config)
        t2 = time.perf_counter()
        feats = self._features(images)
        mu, sigma = feature_stats(feats)
        out = {"FID-GT-1k": np.float64(frechet_distance(mu, sigma, self.ref_stats["mu"], self.ref_stats["sigma"],
                                                        method=FID_METHOD))}
        if self.proxies:
            fp = self.fp_reference()
            out["FID-FP-1k"] = float(frechet_distance(mu, sigma, fp["mu"], fp["sigma"], method=FID_METHOD))
            if len(images):
                local = torch.stack([psnr(images, fp["images"]), ssim(images, fp["images"])], dim=1)
            else:
                local = torch.zeros(0, 2, dtype=torch.float64)
            per_image = dist.gather_features(local.double())
            out["psnr_fp"] = float(per_image[:, 0].clamp_max(100).mean())
            out["ssim_fp"] = float(per_image[:, 1].mean())
        if self.clip is not None:
            prompts = [self.sampler.conditions[i] for i in self.local]
            local = torch.from_numpy(np.asarray(self.clip(images, prompts), dtype=np.float64)).reshape(-1, 1)
            out["clip_score"] = float(dist.gather_features(local).mean())
        timing["metrics_s"] = time.perf_counter() - t2
        out["timings"] = timing
        if self.image_dir is not None and tag is not None:
            save_pngs(images, self.local, self.image_dir / tag)
        return out

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
        return rec


def save_pngs(images: torch.Tensor, indices: list[int], folder: Path) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, img in zip(indices, images):
        arr = img.permute(1, 2, 0).numpy()
        Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr).save(folder / f"{i:05d}.png")


# ------------------------------------------------------------------------------------------ set-up
def setup_scorer(family: FamilySpec, *, pretrained=None, tiny: bool = False, device=None, mq_path=None,
                 num_images: int | None = None, image_seed: int = 42, batch_size: int | None = None,
                 coco_path=None, reference_dir=None, inception=None, random_features: bool = False,
                 proxies: bool = True, save_images: Path | None = None, embed_cache_dir=None,
                 bops: bool = True, clip_dir=None, log=print) -> tuple[ConfigScorer, dict]:
    """Load everything once; returns the scorer and the protocol settings to record with every result."""
    from .pipelines.sampling import denoiser_of, load_pipeline, make_sampler, tiny_pipeline
    from .pipelines.embeddings import random_prompt_embeds

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    num_images = num_images or family.num_images
    pipe = tiny_pipeline(family).to(device) if tiny else load_pipeline(family, pretrained, device=device)
    denoiser = denoiser_of(pipe)
    mq = load_or_build_multiquantizer(family, denoiser, mq_path, tiny=tiny, log=log)
    embeds = None
    if tiny and family.conditioning == "text":
        embeds = random_prompt_embeds(family, pipe, num_images, seed=image_seed)
    sampler = make_sampler(family, pipe, num_images=num_images, seed=image_seed, batch_size=batch_size,
                           coco_path=coco_path, embed_cache_dir=embed_cache_dir, prompt_embeds=embeds,
                           conditions=list(range(num_images)) if tiny and family.conditioning == "text" else None)
    feature_net = feature_net_for(family, device, inception=inception, random_features=random_features)
    ref_stats, ref_id = reference_stats_for(family, feature_net, reference_dir)
    macs = None
    if bops:
        from .metrics.bops import layer_macs

        macs = layer_macs(denoiser, family, resolution=None if tiny else family.resolution)
    clip = None
    if clip_dir and family.conditioning == "text":  # CLIP weights given: fail loudly if they do not load
        from .metrics.clip import ClipScorer

        clip = ClipScorer(clip_dir, device=device)
    scorer = ConfigScorer(family, denoiser, mq, sampler, feature_net, ref_stats, num_images, macs=macs,
                          proxies=proxies, image_dir=Path(save_images) if save_images else None, clip=clip)
    settings = {"model": family.name, "num_images": num_images, "image_seed": image_seed,
                "feature_net": feature_net.name, "reference": ref_id, "fid_method": FID_METHOD,
                "clip": clip.name if clip is not None else None,
                "multiquantizer_hash": mq.manifest.get("weight_hash"), "tiny": tiny,
                "sampler": {k: (v if isinstance(v, (int, float, str, bool, type(None))) else str(v))
                            for k, v in getattr(sampler, "settings", {}).items()},
                "world_size": dist.world_size()}
    return scorer, settings


def load_or_build_multiquantizer(family, denoiser, mq_path=None, tiny: bool = False, log=print) -> MultiQuantizer:
    """The family's checkpoint, checked against ``denoiser``; built (and saved) when there is none yet."""
    path = Path(mq_path) if mq_path else Path(constants.MULTIQUANTIZER_DIR) / (
        f"{family.name}{'_tiny' if tiny else ''}_mq.safetensors")
    device = next(denoiser.parameters()).device
    if path.exists():
        mq = MultiQuantizer.from_pretrained(path, device=device)
        mq.check_compatible(denoiser, family)
        return mq
    log(f"no multiquantizer at {path}: building it now (one time)")
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
    """Score ``(index, config)`` items not yet in ``store`` (resume); returns how many were scored."""
    done = store.done_indices() if store is not None else set()
    todo = [(i, c) for i, c in items if i not in done]
    if done and dist.is_main():
        log(f"resuming: {len(done)} configuration(s) already scored, {len(todo)} to go")
    from .utils import progress

    scored = 0
    for index, config in progress(todo, desc="scoring configurations", disable=not dist.is_main()):
        t0 = time.perf_counter()
        rec = scorer.record(config, index=index, **extra_of(index))
        rec["timings"]["total_s"] = time.perf_counter() - t0
        if dist.is_main():
            store.commit(index, rec)
            log(f"[{index}] avg_bits {rec['avg_bits']:.3f}  FID {float(rec['FID-GT-1k']):.3f}  "
                f"({rec['timings']['total_s']:.1f} s)")
        dist.barrier()
        scored += 1
    return scored
