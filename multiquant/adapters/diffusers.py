"""Adapters of the diffusers pipeline kinds (PixArt, Hunyuan, SDXL, SD 1.x, DiT) and the embedded MNIST DiT.

Loading, prompt embeddings and the denoising loops live in :mod:`multiquant.pipelines`; these adapters are
what the scorer sees of them. The default metric of a diffusers kind is clean-fid's Inception FID against
the family's reference images (COCO 2017 val or ImageNet val), unless the family declares its own metric.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from .base import Adapter, SamplerOptions


class MissingReferenceError(UserError, FileNotFoundError):
    """A metric needs weights or a reference set that are not available here."""


class DiffusersAdapter(Adapter):
    """One diffusers pipeline kind (``kind`` names its denoising loop in :mod:`multiquant.pipelines.loops`)."""

    def __init__(self, kind: str):
        self.kind = kind

    def load(self, spec, pretrained, device, dtype=None):
        from ..pipelines.loading import load_pipeline

        return load_pipeline(spec, pretrained, device=device, dtype=dtype)

    def tiny(self, spec, device, seed: int = 0):
        from ..pipelines.loading import tiny_pipeline

        return tiny_pipeline(spec, seed=seed).to(device)

    def denoiser(self, pipe):
        from ..pipelines.loading import denoiser_of

        return denoiser_of(pipe)

    def refiner(self, spec, source=None, device=None, tiny: bool = False):
        if source is False or (not source and spec.refiner_hub_id is None):
            return None
        if self.kind != "sdxl":
            return super().refiner(spec, source, device, tiny)
        from ..pipelines.loading import load_refiner, tiny_refiner

        return tiny_refiner(spec).to(device) if tiny else load_refiner(spec, source or None, device=device)

    def with_denoiser(self, pipe, denoiser):
        from ..export import swap_denoiser

        swap_denoiser(pipe, denoiser)
        return pipe

    def conditions(self, spec, n: int, tiny: bool = False, coco_path=None) -> list:
        if tiny and spec.conditioning == "text":  # tiny pipelines have no text encoder: rows of random embeddings
            return list(range(n))
        if spec.conditions is not None:
            return spec.default_conditions(n)
        from ..pipelines.prompts import conditions_for

        return conditions_for(spec, n, coco_path)

    def sampler(self, spec, pipe, conditions, options: SamplerOptions, tiny: bool = False):
        from ..pipelines.sampling import make_sampler

        embeds = None
        if tiny and spec.conditioning == "text":
            from ..pipelines.embeddings import random_prompt_embeds

            embeds = random_prompt_embeds(spec, pipe, len(conditions), seed=options.embed_seed)
            if options.refiner is not None:
                from ..pipelines.embeddings import REFINER_PREFIX

                embeds.update({REFINER_PREFIX + k: v for k, v in random_prompt_embeds(
                    spec, options.refiner, len(conditions), seed=options.embed_seed + 1).items()})
        return make_sampler(spec, pipe, num_images=len(conditions), seed=options.seed,
                            batch_size=options.batch_size, coco_path=options.coco_path,
                            embed_cache_dir=options.embed_cache_dir, prompt_embeds=embeds, conditions=conditions,
                            steps=options.steps, guidance=options.guidance, resolution=options.resolution,
                            refiner=options.refiner)

    def default_metric(self, spec, device, inception=None, random_features: bool = False, reference_dir=None):
        from multiquant.paths import constants

        from ..metrics.features import InceptionFeatures, RandomInceptionFeatures
        from ..metrics.metric import FeatureFID

        features = RandomInceptionFeatures(device=device) if random_features else \
            InceptionFeatures(device=device, weights=inception)
        imagenet = spec.prompt_source == "imagenet_classes"
        name = "imagenet-val" if imagenet else "coco2017-val"
        env = "QUA2SEDIMO_IMAGENET_VAL" if imagenet else "QUA2SEDIMO_COCO_IMAGES"
        default = constants.IMAGENET_VAL_IMAGES if imagenet else constants.COCO_2017_IMAGES
        folder = Path(reference_dir) if reference_dir else default
        return FeatureFID(features, reference_stats=lambda: _folder_stats(features, folder, name, env),
                          reference_name=name)


def _folder_stats(features, folder, name: str, env: str) -> dict:
    """Statistics of a reference image folder, cached under ``<name>-<folder name>`` (the key earlier runs used)."""
    from multiquant.paths import constants

    from ..metrics.stats import iter_image_folder, reference_stats

    if folder is None or not Path(folder).is_dir():
        raise MissingReferenceError(
            f"the {name} reference images for FID-GT are not available ({folder}). Fix: pass --reference_dir DIR "
            f"or set {env} to the image folder; its statistics are computed once and cached in "
            f"{constants.STATS_CACHE_DIR}.")
    mu, sigma = reference_stats(f"{name}-{Path(folder).resolve().name}", features, lambda: iter_image_folder(folder))
    return {"mu": mu, "sigma": sigma}
