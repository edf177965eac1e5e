"""The base of every diffusers pipeline kind's adapter: what the kinds share, and the hooks each kind fills.

A kind's adapter (one module each: :mod:`.pixart`, :mod:`.hunyuan`, :mod:`.sdxl`, :mod:`.sd`, :mod:`.dit`,
:mod:`.mnist_dit`) holds everything that kind needs: the pipeline classes it serves, its tiny noise schedule,
its prompt embeddings (fields, ``encode_prompt`` call, random stand-ins), its denoiser call inside the shared
loop, how a batch is conditioned and rendered, and its example denoiser inputs. The shared machinery is in
:mod:`.loading`, :mod:`.embeddings`, :mod:`.loop`, :mod:`.sampling` and :mod:`.prompts`. The default metric of
a diffusers kind is clean-fid's Inception FID against the family's reference images (COCO 2017 val or ImageNet
val), unless the family declares its own metric.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from ...errors import UserError
from ..base import Adapter, SamplerOptions, no_example_inputs


class MissingReferenceError(UserError, FileNotFoundError):
    """A metric needs weights or a reference set that are not available here."""


class DiffusersAdapter(Adapter):
    """One diffusers pipeline kind. Subclasses set the class attributes and override the hooks they need."""

    pipeline_classes: tuple[str, ...] = ()  # the diffusers pipeline classes this kind serves
    tiny_schedule: dict = {}  # noise schedule of the hub repos' scheduler configs, for tiny pipelines
    tiny_scheduler_class = "DDIMScheduler"  # tiny pipelines' scheduler when the family names none
    prompt_fields: tuple[str, ...] = ()  # text kinds: per-prompt embedding fields (each has a "negative_" twin)
    uncond_first = True  # order of the two classifier-free guidance halves in the denoiser batch
    refines = False  # an FP refiner may finish the schedule (SDXL)
    pixel_space = False  # the denoiser works on pixels (example inputs at the resolution, not resolution / 8)
    convolutional_denoiser = False  # a U-Net: --channels_last converts the denoiser too, not only the VAE

    # -- loading ---------------------------------------------------------------------------------------------
    def load(self, spec, pretrained, device, dtype=None):
        from .loading import load_stock_pipeline

        return load_stock_pipeline(spec, pretrained, device=device, dtype=dtype)

    def tiny_pipeline(self, spec, seed: int = 0):
        from .loading import tiny_stock_pipeline

        return tiny_stock_pipeline(spec, seed=seed)

    def tiny(self, spec, device, seed: int = 0):
        return self.tiny_pipeline(spec, seed=seed).to(device)

    def denoiser(self, pipe):
        from .loading import denoiser_of

        return denoiser_of(pipe)

    def with_denoiser(self, pipe, denoiser):
        from .loading import swap_denoiser

        swap_denoiser(pipe, denoiser)
        return pipe

    def generation_modules(self, spec, pipe, refiner=None) -> dict:
        """The denoiser and the VAE (its decoder renders the images), and the refiner's (SDXL)."""
        from torch import nn

        out = {}
        for prefix, stage in (("", pipe), ("refiner.", refiner)):
            if stage is None:
                continue
            out[prefix + "denoiser"] = self.denoiser(stage)
            if isinstance(getattr(stage, "vae", None), nn.Module):
                out[prefix + "vae"] = stage.vae
        return out

    def convolutional_modules(self, spec, pipe, refiner=None) -> dict:
        """The VAE (a convolutional decoder in every kind), and the denoiser of the U-Net kinds."""
        return {name: module for name, module in self.generation_modules(spec, pipe, refiner).items()
                if self.convolutional_denoiser or not name.endswith("denoiser")}

    def cast_generation(self, spec, pipe, dtype, refiner=None) -> list[str]:
        names = super().cast_generation(spec, pipe, dtype, refiner)
        self.prepare(pipe, refiner)  # again: e.g. SDXL's VAE stays float32 whatever the denoiser computes in
        return names

    def refiner(self, spec, source=None, device=None, tiny: bool = False):
        if source is False or (not source and spec.refiner_hub_id is None):
            return None
        return super().refiner(spec, source, device, tiny)

    # -- conditioning ----------------------------------------------------------------------------------------
    def conditions(self, spec, n: int, tiny: bool = False, coco_path=None) -> list:
        if tiny and spec.conditioning == "text":  # tiny pipelines have no text encoder: rows of random embeddings
            return list(range(n))
        if spec.conditions is not None:
            return spec.default_conditions(n)
        from .prompts import conditions_for

        return conditions_for(spec, n, coco_path)

    def encode_settings(self, spec) -> dict:
        """The ``encode_prompt`` options of the protocol (the stock pipeline's ``__call__`` defaults)."""
        return {}

    def encode_chunk(self, pipe, prompts: list[str], settings: dict, device, cfg: bool) -> dict:
        """One ``encode_prompt`` call -> tensors named as the pipeline's keyword arguments."""
        raise ValueError(f"pipeline kind {self.kind!r} is not text-conditioned")

    def random_embeds(self, spec, pipe, config, rows: int, draws, seq_len: int) -> dict:
        """Random stand-ins of :attr:`prompt_fields` for ``rows`` prompts (``draws``: embeddings.RandomDraws)."""
        raise ValueError(f"family {spec.name!r} is not text-conditioned: no prompt embeddings")

    def batch_conditioning(self, sampler, indices: list[int], prefix: str = "") -> dict:
        """This batch's prompt embeddings on the denoiser's device and dtype (negatives expanded to the batch)."""
        from .embeddings import embedding_fields

        device, dtype = sampler.denoiser_device(), sampler.denoiser_dtype()
        rows = torch.tensor(indices)
        cond = {}
        for name in embedding_fields(self):
            value = sampler.prompt_embeds[prefix + name]
            value = value.expand(len(indices), *value.shape[1:]) if value.shape[0] == 1 else value[rows]
            value = value.to(device)
            cond[name] = value.to(dtype) if value.is_floating_point() else value
        return cond

    # -- sampling --------------------------------------------------------------------------------------------
    def sampler(self, spec, pipe, conditions, options: SamplerOptions, tiny: bool = False):
        from .embeddings import REFINER_PREFIX, random_prompt_embeds
        from .sampling import make_sampler

        embeds = None
        if tiny and spec.conditioning == "text":
            embeds = random_prompt_embeds(spec, pipe, len(conditions), seed=options.embed_seed)
            if options.refiner is not None:
                embeds.update({REFINER_PREFIX + k: v for k, v in random_prompt_embeds(
                    spec, options.refiner, len(conditions), seed=options.embed_seed + 1).items()})
        return make_sampler(spec, pipe, num_images=len(conditions), seed=options.seed,
                            batch_size=options.batch_size, coco_path=options.coco_path,
                            embed_cache_dir=options.embed_cache_dir, prompt_embeds=embeds, conditions=conditions,
                            steps=options.steps, guidance=options.guidance, resolution=options.resolution,
                            refiner=options.refiner)

    def prepare(self, pipe, refiner=None) -> None:
        """Once per run, before the first image (e.g. SDXL upcasts its VAE)."""

    def sampler_settings(self, sampler) -> dict:
        """What the kind adds to the recorded generation protocol."""
        return {}

    def latent_shape(self, pipe, n: int, height: int, width: int) -> tuple[int, int, int, int]:
        from .loading import denoiser_of, vae_scale_factor

        config = denoiser_of(pipe).config
        scale = vae_scale_factor(pipe.vae)
        return (n, config.in_channels, height // scale, width // scale)

    def predictor(self, pipe, cond: dict, n: int, height: int, width: int, cfg: bool) -> Callable:
        """``predict(x, t)``: the denoiser call of the kind's pipeline, its fixed inputs built once per batch."""
        raise NotImplementedError

    def render(self, sampler, indices: list[int]) -> torch.Tensor:
        """uint8 images of one batch: the shared denoising loop, then the VAE."""
        from ...seeds import image_generators
        from ...utils import to_uint8
        from .loop import decode, denoise

        generators = image_generators(sampler.seed, indices)
        cond = sampler.batch_conditioning(indices)
        height = width = sampler.resolution
        latents = denoise(self, sampler.pipe, cond, generators, sampler.steps, sampler.guidance, height, width)
        return to_uint8(decode(sampler.pipe, latents))

    # -- example inputs --------------------------------------------------------------------------------------
    def denoiser_inputs(self, spec, model, batch: int, device, dtype, resolution: int | None, seed: int) -> dict:
        """Random, non-zero forward inputs of the kind's denoiser: a latent (pixels where :attr:`pixel_space`) at
        ``resolution`` (default: the config's sample size), a timestep, and the kind's conditioning."""
        cfg = dict(getattr(model, "config", {}))
        g = torch.Generator().manual_seed(seed)

        def randn(*shape):
            return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

        sample = cfg.get("sample_size", 8)
        if resolution is not None:
            sample = resolution if self.pixel_space else resolution // 8
        size = sample if isinstance(sample, int) else sample[0]
        x = randn(batch, cfg.get("in_channels", 4), size, size)
        t = torch.full((batch,), 500.0, dtype=dtype, device=device)
        return self.conditioned_inputs(spec, model, cfg, x, t, randn, size)

    def conditioned_inputs(self, spec, model, cfg: dict, x, t, randn, size: int) -> dict:
        """The kind's forward keyword arguments around latent ``x`` and timestep ``t``."""
        raise no_example_inputs(model)

    # -- metric ----------------------------------------------------------------------------------------------
    def default_metric(self, spec, device, inception=None, random_features: bool = False, reference_dir=None):
        from multiquant.paths import constants

        from ...metrics.features import InceptionFeatures, RandomInceptionFeatures
        from ...metrics.metric import FeatureFID

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

    from ...metrics.stats import iter_image_folder, reference_stats

    if folder is None or not Path(folder).is_dir():
        raise MissingReferenceError(
            f"the {name} reference images for FID-GT are not available ({folder}). Fix: pass --reference_dir DIR "
            f"or set {env} to the image folder; its statistics are computed once and cached in "
            f"{constants.STATS_CACHE_DIR}.")
    mu, sigma = reference_stats(f"{name}-{Path(folder).resolve().name}", features, lambda: iter_image_folder(folder))
    return {"mu": mu, "sigma": sigma}
