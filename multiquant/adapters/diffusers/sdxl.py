"""SDXL base + refiner (``StableDiffusionXLPipeline``), as the reference ran it: the quantized base denoises the
first 80% of the schedule (32 of the family's 40 steps), then the FP16 refiner
(``StableDiffusionXLImg2ImgPipeline``, never quantized) finishes it from the base's latents. Two text encoders
(embeddings + pooled embeddings) and micro-conditioning time ids; the VAE is upcast (it overflows in fp16)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from ...errors import InputError, SetupError
from .base import DiffusersAdapter
from .embeddings import REFINER_PREFIX
from .loading import (HUB_EXTRA_FIX, PipelineParts, device_and_dtype, diffusers_class, family_spec,
                      from_pretrained, tiny_scheduler, tiny_vae)
from .loop import with_negative

SDXL_REFINER_SPLIT = 0.8  # base denoises the first 80% of the schedule, the FP refiner the rest (reference)
REFINER_PIPELINE = "StableDiffusionXLImg2ImgPipeline"
REFINER_AESTHETIC_SCORE, REFINER_NEGATIVE_AESTHETIC_SCORE = 6.0, 2.5  # the img2img pipeline's defaults


def is_refiner(pipe) -> bool:
    """An SDXL refiner conditions on an aesthetic score instead of the target size."""
    return bool(getattr(getattr(pipe, "config", None), "requires_aesthetics_score", False))


def sdxl_time_ids(pipe, height: int, width: int, pooled_dim: int, negative: bool = False) -> list:
    """SDXL micro-conditioning: ``original_size + crops_coords_top_left + target_size`` (base model) or
    ``original_size + crops_coords_top_left + (aesthetic score,)`` (refiner; 2.5 for the negative half), checked
    against the U-Net's added-embedding width as the pipelines do."""
    if is_refiner(pipe):
        ids = [height, width, 0, 0, REFINER_NEGATIVE_AESTHETIC_SCORE if negative else REFINER_AESTHETIC_SCORE]
    else:
        ids = [height, width, 0, 0, height, width]
    unet = pipe.unet
    expected = unet.add_embedding.linear_1.in_features
    passed = unet.config.addition_time_embed_dim * len(ids) + pooled_dim
    if expected != passed:
        raise ValueError(f"the U-Net expects {expected} added-embedding features but gets {passed} "
                         f"({len(ids)} time ids x {unet.config.addition_time_embed_dim} + pooled {pooled_dim}): "
                         "the pooled prompt embeddings do not belong to this U-Net")
    return ids


def tiny_refiner(family, seed: int = 1):
    """A tiny random SDXL refiner (the family's tiny U-Net conditioned on an aesthetic score: 5 time ids), with a
    tiny VAE and the family's scheduler, as :class:`PipelineParts` (no text encoders: feed prompt embeddings)."""
    from types import SimpleNamespace

    import diffusers

    spec = family_spec(family)
    cfg = dict(spec.tiny_config)
    pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
    cfg["projection_class_embeddings_input_dim"] = pooled + 5 * cfg["addition_time_embed_dim"]
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(**cfg).eval()
    parts = PipelineParts(REFINER_PIPELINE, unet=unet, vae=tiny_vae(seed), scheduler=tiny_scheduler(spec))
    parts.config = SimpleNamespace(requires_aesthetics_score=True)
    return parts


def load_refiner(family, source: str | Path | None = None, device=None, dtype: torch.dtype | None = None):
    """The family's SDXL refiner pipeline (``refiner_hub_id`` or ``source``), kept FP16 (never quantized),
    with the family's scheduler; progress bars off."""
    spec = family_spec(family)
    source = source or spec.refiner_hub_id
    if source is None:
        raise InputError(f"family {spec.name!r} has no refiner (refiner_hub_id): pass --refiner DIR or --no_refiner")
    device, dtype = device_and_dtype(spec, device, dtype)
    cls = diffusers_class(REFINER_PIPELINE)
    if cls is None:
        raise SetupError(f"{REFINER_PIPELINE} needs transformers for its text encoder. {HUB_EXTRA_FIX}")
    return from_pretrained(spec, cls, source, Path(str(source)).expanduser(), {"torch_dtype": dtype}, device, dtype,
                           "refiner", f"download {spec.refiner_hub_id!r} and pass its local directory with --refiner "
                                      f"DIR, or run the base model alone with --no_refiner.")


def _upcast_vae_if_needed(pipe) -> None:
    """The SDXL VAE overflows in fp16; the pipeline upcasts it for every decode (force_upcast). Do it once."""
    from ...utils import cast_module

    vae = pipe.vae
    if vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
        cast_module(vae, torch.float32)  # without diffusers' warning about an empty _keep_in_fp32_modules


class SDXLAdapter(DiffusersAdapter):
    kind = "sdxl"
    convolutional_denoiser = True  # a U-Net
    pipeline_classes = ("StableDiffusionXLPipeline",)
    tiny_schedule = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    prompt_fields = ("prompt_embeds", "pooled_prompt_embeds")
    refines = True

    def refiner(self, spec, source=None, device=None, tiny: bool = False):
        if source is False or (not source and spec.refiner_hub_id is None):
            return None
        return tiny_refiner(spec).to(device) if tiny else load_refiner(spec, source or None, device=device)

    def encode_chunk(self, pipe, prompts, settings, device, cfg):
        embeds, neg, pooled, neg_pooled = pipe.encode_prompt(
            prompt=prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=cfg)
        out = {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
        if cfg:
            out.update(negative_prompt_embeds=neg, negative_pooled_prompt_embeds=neg_pooled)
        return out

    def random_embeds(self, spec, pipe, config, rows, draws, seq_len):
        embeds = draws.embeds(rows, seq_len, config.cross_attention_dim)
        # 6 micro-conditioning ids (5 for a refiner, which conditions on an aesthetic score instead)
        pooled = config.projection_class_embeddings_input_dim - (5 if is_refiner(pipe) else 6) * \
            config.addition_time_embed_dim
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": draws.randn(rows, pooled)}

    def prepare(self, pipe, refiner=None) -> None:
        _upcast_vae_if_needed(pipe)
        if refiner is not None:
            _upcast_vae_if_needed(refiner)

    def sampler_settings(self, sampler) -> dict:
        refined = sampler.refiner is not None
        return {"refiner": refined, "denoising_split": SDXL_REFINER_SPLIT if refined else None}

    def predictor(self, pipe, cond, n, height, width, cfg) -> Callable:
        unet = pipe.unet
        embeds = with_negative(cond, "prompt_embeds", cfg)
        pooled = with_negative(cond, "pooled_prompt_embeds", cfg)
        ids = torch.tensor([sdxl_time_ids(pipe, height, width, pooled.shape[-1])], dtype=embeds.dtype).repeat(n, 1)
        if cfg:
            negative = torch.tensor([sdxl_time_ids(pipe, height, width, pooled.shape[-1], negative=True)],
                                    dtype=embeds.dtype).repeat(n, 1)
            ids = torch.cat([negative, ids])
        time_ids = ids.to(embeds.device)
        added = {"text_embeds": pooled, "time_ids": time_ids}

        def predict(x, t):
            return unet(x, t, encoder_hidden_states=embeds, timestep_cond=None, added_cond_kwargs=added,
                        return_dict=False)[0]

        return predict

    def render(self, sampler, indices):
        """The reference's SDXL protocol: with a refiner, the base stops at 80% of the schedule and the
        (unquantized) refiner finishes it, continuing from the base's latents (no new noise), as
        StableDiffusionXLImg2ImgPipeline does."""
        if sampler.refiner is None:
            return super().render(sampler, indices)
        from ...seeds import image_generators
        from ...utils import to_uint8
        from .loop import decode, denoise

        generators = image_generators(sampler.seed, indices)
        height = width = sampler.resolution
        latents = denoise(self, sampler.pipe, sampler.batch_conditioning(indices), generators, sampler.steps,
                          sampler.guidance, height, width, denoising_end=SDXL_REFINER_SPLIT)
        cond = sampler.batch_conditioning(indices, prefix=REFINER_PREFIX)
        latents = denoise(self, sampler.refiner, cond, generators, sampler.steps, sampler.guidance, height, width,
                          denoising_start=SDXL_REFINER_SPLIT, latents=latents)
        return to_uint8(decode(sampler.refiner, latents))

    def conditioned_inputs(self, spec, model, cfg, x, t, randn, size):
        batch = x.shape[0]
        kwargs = dict(sample=x, timestep=t, encoder_hidden_states=randn(batch, 8, cfg["cross_attention_dim"]))
        if cfg.get("addition_embed_type") == "text_time":
            text_dim = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
            kwargs["added_cond_kwargs"] = {"text_embeds": randn(batch, text_dim),
                                           "time_ids": randn(batch, 6).abs() * 100}
        return kwargs
