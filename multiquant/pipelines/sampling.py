"""One sampling front for every family: built once per run, then called for every quantization configuration.

    pipe = load_pipeline("pixart_alpha")                      # or tiny_pipeline("pixart_alpha") in tests
    sampler = make_sampler("pixart_alpha", pipe, num_images=1000, embed_cache_dir="~/.cache/qua2sedimo/embeds")
    for config in configs:
        apply(config, denoiser_of(pipe))                      # the caller swaps the denoiser's weights in place
        images = sampler.generate(list(range(1000)))          # uint8 [1000, 3, H, W] on the CPU

Common random numbers: image ``i`` is conditioned on condition ``i`` and starts from noise drawn by its own
``torch.Generator`` seeded with ``seed_for(seed, i)``, so it is the same for every configuration and does not
depend on the batch size or on which other images share its batch. Prompt embeddings are computed once.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .embeddings import (REFINER_PREFIX, PROMPT_FIELDS, cached_prompt_embeds, embedding_fields,
                         offload_text_encoders)
from .loading import denoiser_of, family_spec, load_pipeline, pipeline_kind, tiny_pipeline  # noqa: F401
from .loops import decode, denoise, to_uint8
from .prompts import conditions_for
from ..seeds import SEED_RULE, checked_indices, image_generators, seed_for  # noqa: F401
from ..utils import progress

# Images per denoiser call when the family gives no batch_size (CFG doubles the denoiser batch); any value
# gives the same images.
DEFAULT_BATCH_SIZE = 8
SDXL_REFINER_SPLIT = 0.8  # base denoises the first 80% of the schedule, the FP refiner the rest (reference)
# (with the family's 40 steps: 32 quantized base steps, then 8 FP16 refiner steps)


class Sampler:
    """Renders images ``indices`` of a fixed protocol (conditions, noise, settings) with the pipeline's
    current denoiser weights. Build it with :func:`make_sampler`."""

    def __init__(self, family, pipe, conditions: list, seed: int, batch_size: int, steps: int, guidance: float,
                 resolution: int | None, prompt_embeds: dict | None = None, refiner=None, channels: str = "native"):
        self.family = family_spec(family)
        self.kind = pipeline_kind(self.family)
        self.pipe = pipe
        self.conditions = list(conditions)
        self.seed = seed
        self.batch_size = batch_size
        self.steps = steps
        self.guidance = guidance
        self.resolution = resolution
        self.prompt_embeds = prompt_embeds
        self.refiner = refiner
        self.channels = channels

    # -- public --------------------------------------------------------------------------------------------
    @property
    def num_images(self) -> int:
        return len(self.conditions)

    @property
    def settings(self) -> dict:
        """The generation protocol, JSON-serialisable: record it with every result."""
        scheduler = getattr(self.pipe, "scheduler", None)
        settings = {
            "family": self.family.name, "pipeline": self.family.pipeline_class, "steps": self.steps,
            "guidance": self.guidance, "scheduler": type(scheduler).__name__ if scheduler is not None else None,
            "resolution": self.resolution, "seed": self.seed, "seed_rule": SEED_RULE, "batch_size": self.batch_size,
            "num_images": self.num_images, "conditioning": self.family.conditioning,
            "prompt_source": self.family.prompt_source, "dtype": str(self._dtype()).replace("torch.", ""),
        }
        if self.kind == "sdxl":
            settings["refiner"] = self.refiner is not None
            settings["denoising_split"] = SDXL_REFINER_SPLIT if self.refiner is not None else None
        if self.kind == "mnist":
            settings["channels"] = self.channels
        return settings

    def generate(self, indices) -> torch.Tensor:
        """uint8 images [len(indices), C, H, W] on the CPU (C = 3; MNIST: 1 unless channels=3)."""
        indices = checked_indices(indices, self.num_images)
        batches = [indices[i:i + self.batch_size] for i in range(0, len(indices), self.batch_size)]
        # per-batch progress: one configuration of 1,000 images takes minutes (quiet for a single batch)
        return torch.cat([self._render(batch) for batch in progress(batches, desc=f"  images ({len(indices)})",
                                                                    unit="batch", disable=len(batches) < 2)])

    def __call__(self, indices) -> torch.Tensor:
        return self.generate(indices)

    # -- internals -----------------------------------------------------------------------------------------
    def _dtype(self) -> torch.dtype:
        try:
            return next(denoiser_of(self.pipe).parameters()).dtype
        except (ValueError, StopIteration):
            return torch.float32

    def _device(self) -> torch.device:
        return next(denoiser_of(self.pipe).parameters()).device

    def _render(self, indices: list[int]) -> torch.Tensor:
        if self.kind == "mnist":
            return self._render_mnist(indices)
        generators = image_generators(self.seed, indices)
        cond = self._batch_conditioning(indices)
        height = width = self.resolution
        if self.refiner is not None:
            latents = denoise(self.kind, self.pipe, cond, generators, self.steps, self.guidance, height, width,
                              denoising_end=SDXL_REFINER_SPLIT)
            return self._refine(latents, indices, generators)
        latents = denoise(self.kind, self.pipe, cond, generators, self.steps, self.guidance, height, width)
        return to_uint8(decode(self.pipe, latents))

    def _batch_conditioning(self, indices: list[int], prefix: str = "") -> dict:
        """This batch's conditioning on the denoiser's device and dtype (negatives expanded to the batch)."""
        device, dtype = self._device(), self._dtype()
        if self.kind == "dit":
            return {"class_labels": torch.tensor([self.conditions[i] for i in indices], device=device)}
        rows = torch.tensor(indices)
        cond = {}
        for name in embedding_fields(self.kind):
            value = self.prompt_embeds[prefix + name]
            value = value.expand(len(indices), *value.shape[1:]) if value.shape[0] == 1 else value[rows]
            value = value.to(device)
            cond[name] = value.to(dtype) if value.is_floating_point() else value
        return cond

    def _refine(self, latents: torch.Tensor, indices: list[int], generators) -> torch.Tensor:
        """The reference's SDXL protocol: the (unquantized) refiner finishes the last 20% of the schedule,
        continuing from the base's latents (no new noise), as StableDiffusionXLImg2ImgPipeline does."""
        cond = self._batch_conditioning(indices, prefix=REFINER_PREFIX)
        height = width = self.resolution
        latents = denoise(self.kind, self.refiner, cond, generators, self.steps, self.guidance, height, width,
                          denoising_start=SDXL_REFINER_SPLIT, latents=latents)
        return to_uint8(decode(self.refiner, latents))

    def _render_mnist(self, indices: list[int]) -> torch.Tensor:
        images = self.pipe(class_labels=[self.conditions[i] for i in indices],
                           seeds=[seed_for(self.seed, i) for i in indices],
                           num_inference_steps=self.steps, guidance_scale=self.guidance)
        images = images.cpu()
        return images.expand(-1, 3, -1, -1).contiguous() if self.channels == "3" else images


def _check_prompt_embeds(kind: str, embeds: dict, n: int, prefix: str = "") -> None:
    missing = [prefix + name for name in embedding_fields(kind) if prefix + name not in embeds]
    if missing:
        raise ValueError(f"prompt_embeds lacks {missing}; a {kind} pipeline needs {list(embedding_fields(kind))} "
                         "(see random_prompt_embeds() for the layout)")
    for name in PROMPT_FIELDS[kind]:
        rows = embeds[prefix + name].shape[0]
        if rows < n:
            raise ValueError(f"prompt_embeds[{prefix + name!r}] has {rows} rows but the sampler renders {n} images")
    for name in PROMPT_FIELDS[kind]:
        rows = embeds[prefix + "negative_" + name].shape[0]
        if rows not in (1, embeds[prefix + name].shape[0]):
            raise ValueError(f"prompt_embeds['{prefix}negative_{name}'] must have 1 row or one per prompt, not {rows}")


def make_sampler(family, pipe, num_images: int | None = None, seed: int = 42, batch_size: int | None = None,
                 coco_path: str | Path | None = None, embed_cache_dir: str | Path | None = None,
                 prompt_embeds: dict | None = None, conditions: list | None = None, steps: int | None = None,
                 guidance: float | None = None, resolution: int | None = None, refiner=None,
                 channels: str = "native") -> Sampler:
    """Build the sampler of a run: fixes conditions, seeds, settings, and (text families) the prompt embeddings.

    - ``conditions``: prompts / class ids; default: the family's protocol (first ``num_images`` COCO captions
      from ``coco_path``, or cycling class ids).
    - ``prompt_embeds``: precomputed embeddings (see :func:`random_prompt_embeds` for the layout); default:
      encoded once with the pipeline's ``encode_prompt``, cached in ``embed_cache_dir``. Either way the text
      encoders are then moved to the CPU.
    - ``steps``/``guidance``/``resolution``: the family's protocol unless given (a tiny pipeline's
      ``default_resolution`` wins over the family's resolution).
    - ``refiner``: SDXL only; a StableDiffusionXLImg2ImgPipeline that finishes the last 20% of the schedule
      unquantized, as the reference did. Without it the base model runs the whole schedule.
    - ``channels``: MNIST only; ``"native"`` (1 channel) or ``"3"`` (replicated for RGB feature extractors).
    """
    spec = family_spec(family)
    kind = pipeline_kind(spec)
    if conditions is None:
        conditions = conditions_for(spec, num_images or spec.num_images, coco_path)
    elif num_images is not None:
        if len(conditions) < num_images:
            raise ValueError(f"{len(conditions)} conditions given for num_images={num_images}")
        conditions = list(conditions)[:num_images]
    if str(channels) not in ("native", "3"):
        raise ValueError(f"channels must be 'native' or 3, not {channels!r}")
    if refiner is not None and kind != "sdxl":
        raise ValueError(f"a refiner is only used by SDXL, not by family {spec.name!r}")
    if resolution is None:
        resolution = getattr(pipe, "default_resolution", None) or spec.resolution
    if kind in ("pixart", "hunyuan", "sdxl", "sd"):
        if prompt_embeds is None:
            prompt_embeds = cached_prompt_embeds(spec, pipe, list(conditions), embed_cache_dir, refiner=refiner)
        offload_text_encoders(pipe, refiner)  # never needed again in this run
        _check_prompt_embeds(kind, prompt_embeds, len(conditions))
        if refiner is not None:
            _check_prompt_embeds("sdxl", prompt_embeds, len(conditions), prefix=REFINER_PREFIX)
    if kind == "sdxl":
        _upcast_vae_if_needed(pipe)
        if refiner is not None:
            _upcast_vae_if_needed(refiner)
    return Sampler(spec, pipe, conditions, seed=seed,
                   batch_size=batch_size or spec.batch_size or DEFAULT_BATCH_SIZE,
                   steps=steps or spec.steps, guidance=spec.guidance if guidance is None else guidance,
                   resolution=resolution, prompt_embeds=prompt_embeds, refiner=refiner, channels=str(channels))


def _upcast_vae_if_needed(pipe) -> None:
    """The SDXL VAE overflows in fp16; the pipeline upcasts it for every decode (force_upcast). Do it once."""
    vae = pipe.vae
    if vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
        vae.to(torch.float32)
