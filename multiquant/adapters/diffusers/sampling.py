"""The sampler of every diffusers pipeline kind: built once per run, then called for every quantization configuration.

    pipe = load_pipeline("pixart_alpha")                      # or tiny_pipeline("pixart_alpha") in tests
    sampler = make_sampler("pixart_alpha", pipe, num_images=1000, embed_cache_dir="~/.cache/qua2sedimo/embeds")
    for config in configs:
        apply(config, denoiser_of(pipe))                      # the caller swaps the denoiser's weights in place
        images = sampler.generate(list(range(1000)))          # uint8 [1000, 3, H, W] on the CPU

Common random numbers: image ``i`` is conditioned on condition ``i`` and starts from noise drawn by its own
``torch.Generator`` seeded with ``seed_for(seed, i)``, so it is the same for every configuration and does not
depend on the batch size or on which other images share its batch. Prompt embeddings are computed once.
What differs per kind (how a batch is conditioned and rendered, what else the settings record) is the kind's
adapter's (``batch_conditioning``, ``render``, ``sampler_settings``, ``prepare``).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ...families import FamilySpec
from ...seeds import SEED_RULE, checked_indices
from ...utils import progress
from ..registry import adapter_for
from .embeddings import REFINER_PREFIX, cached_prompt_embeds, embedding_fields, offload_text_encoders
from .loading import denoiser_of, family_spec
from .prompts import conditions_for

# Images per denoiser call when the family gives no batch_size (CFG doubles the denoiser batch); any value
# gives the same images.
DEFAULT_BATCH_SIZE = 8


@dataclass(eq=False)
class Sampler:
    """Renders images ``indices`` of a fixed protocol (conditions, noise, settings) with the pipeline's
    current denoiser weights. Build it with :func:`make_sampler`."""

    adapter: object  # the pipeline kind's DiffusersAdapter: how a batch is conditioned and rendered
    family: FamilySpec
    pipe: object
    conditions: list
    seed: int
    batch_size: int
    steps: int
    guidance: float
    resolution: int | None
    prompt_embeds: dict | None = None
    refiner: object = None
    channels: str = "native"

    def __post_init__(self):
        self.family = family_spec(self.family)
        self.conditions = list(self.conditions)

    @property
    def kind(self) -> str:
        return self.adapter.kind

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
            "prompt_source": self.family.prompt_source, "dtype": str(self.denoiser_dtype()).replace("torch.", ""),
        }
        settings.update(self.adapter.sampler_settings(self))
        return settings

    def generate(self, indices) -> torch.Tensor:
        """uint8 images [len(indices), C, H, W] on the CPU (C = 3; MNIST: 1 unless channels=3)."""
        return torch.cat(list(self.batches(indices)))

    def batches(self, indices):
        """The images of :meth:`generate`, one uint8 batch at a time as each is rendered."""
        indices = checked_indices(indices, self.num_images)
        batches = [indices[i:i + self.batch_size] for i in range(0, len(indices), self.batch_size)]
        # per-batch progress: one configuration of 1,000 images takes minutes (quiet for a single batch)
        for batch in progress(batches, desc=f"  images ({len(indices)})", unit="batch", disable=len(batches) < 2):
            yield self._render(batch)

    def __call__(self, indices) -> torch.Tensor:
        return self.generate(indices)

    # -- internals -----------------------------------------------------------------------------------------
    def denoiser_dtype(self) -> torch.dtype:
        try:
            return next(denoiser_of(self.pipe).parameters()).dtype
        except (ValueError, StopIteration):
            return torch.float32

    def denoiser_device(self) -> torch.device:
        return next(denoiser_of(self.pipe).parameters()).device

    def _render(self, indices: list[int]) -> torch.Tensor:
        return self.adapter.render(self, indices)

    def batch_conditioning(self, indices: list[int], prefix: str = "") -> dict:
        """This batch's conditioning on the denoiser's device and dtype (the kind's adapter builds it)."""
        return self.adapter.batch_conditioning(self, indices, prefix)


def _check_prompt_embeds(adapter, embeds: dict, n: int, prefix: str = "") -> None:
    fields = embedding_fields(adapter)
    missing = [prefix + name for name in fields if prefix + name not in embeds]
    if missing:
        raise ValueError(f"prompt_embeds lacks {missing}; a {adapter.kind} pipeline needs {list(fields)} "
                         "(see random_prompt_embeds() for the layout)")
    for name in adapter.prompt_fields:
        rows = embeds[prefix + name].shape[0]
        if rows < n:
            raise ValueError(f"prompt_embeds[{prefix + name!r}] has {rows} rows but the sampler renders {n} images")
    for name in adapter.prompt_fields:
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
    adapter = adapter_for(spec)
    if conditions is None:
        conditions = conditions_for(spec, num_images or spec.num_images, coco_path)
    elif num_images is not None:
        if len(conditions) < num_images:
            raise ValueError(f"{len(conditions)} conditions given for num_images={num_images}")
        conditions = list(conditions)[:num_images]
    if str(channels) not in ("native", "3"):
        raise ValueError(f"channels must be 'native' or 3, not {channels!r}")
    if refiner is not None and not adapter.refines:
        raise ValueError(f"a refiner is only used by SDXL, not by family {spec.name!r}")
    if resolution is None:
        resolution = getattr(pipe, "default_resolution", None) or spec.resolution
    if adapter.prompt_fields:  # a text kind
        if prompt_embeds is None:
            prompt_embeds = cached_prompt_embeds(spec, pipe, list(conditions), embed_cache_dir, refiner=refiner)
        offload_text_encoders(pipe, refiner)  # never needed again in this run
        _check_prompt_embeds(adapter, prompt_embeds, len(conditions))
        if refiner is not None:
            _check_prompt_embeds(adapter, prompt_embeds, len(conditions), prefix=REFINER_PREFIX)
    adapter.prepare(pipe, refiner)
    return Sampler(adapter, spec, pipe, conditions, seed=seed,
                   batch_size=batch_size or spec.batch_size or DEFAULT_BATCH_SIZE,
                   steps=steps or spec.steps, guidance=spec.guidance if guidance is None else guidance,
                   resolution=resolution, prompt_embeds=prompt_embeds, refiner=refiner, channels=str(channels))
