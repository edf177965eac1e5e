"""Batched denoising loops, one per pipeline family, fed precomputed conditioning.

Each loop follows its diffusers pipeline's ``__call__`` step for step (same latent shape and scaling, same
timesteps, same conditioning inputs, same guidance formula, same scheduler calls, same VAE decoding), so an
image matches the stock pipeline's output for the same embeddings and generators. What it leaves out:
prompt encoding (done once per run, see embeddings.py), the safety checker, resolution binning (the
protocol's square sizes are their own bins) and the SDXL invisible watermark.

Noise comes from one ``torch.Generator`` per image (``randn_tensor`` draws image ``i`` from generator ``i``),
used for the initial latents and by ancestral schedulers at every step, so an image does not depend on the
batch it is rendered in.
"""
from __future__ import annotations

import inspect
from typing import Callable

import torch

from .loading import denoiser_of, vae_scale_factor
from ..utils import to_uint8  # noqa: F401  (re-exported: the one conversion)

# Hunyuan-DiT's default micro-conditioning (HunyuanDiTPipeline: original_size=(1024, 1024), crops at (0, 0)).
HUNYUAN_ORIGINAL_SIZE = (1024, 1024)


def expand_timestep(t, batch: int, device) -> torch.Tensor:
    """A scheduler timestep as a [batch] tensor (the PixArt/DiT pipelines' broadcasting)."""
    if not torch.is_tensor(t):
        t = torch.tensor([t], dtype=torch.float64 if isinstance(t, float) else torch.int64)
    elif t.ndim == 0:
        t = t[None]
    return t.to(device).expand(batch)


def _with_negative(cond: dict, name: str, cfg: bool) -> torch.Tensor:
    """``cat([negative, positive])`` under classifier-free guidance (the pipelines' order), else positive."""
    return torch.cat([cond["negative_" + name], cond[name]]) if cfg else cond[name]


# -- per-family denoiser calls: build the fixed inputs once per batch, return predict(x, t) ----------------------

def _pixart_predictor(pipe, cond: dict, n: int, height: int, width: int, cfg: bool) -> Callable:
    denoiser = pipe.transformer
    embeds = _with_negative(cond, "prompt_embeds", cfg)
    mask = _with_negative(cond, "prompt_attention_mask", cfg)
    added = {"resolution": None, "aspect_ratio": None}
    if getattr(denoiser, "use_additional_conditions", False):  # PixArt-alpha 1024 only
        rows = embeds.shape[0]
        added = {"resolution": torch.tensor([height, width]).repeat(rows, 1).to(embeds),
                 "aspect_ratio": torch.tensor([float(height / width)]).repeat(rows, 1).to(embeds)}

    def predict(x, t):
        return denoiser(x, encoder_hidden_states=embeds, encoder_attention_mask=mask,
                        timestep=expand_timestep(t, x.shape[0], x.device), added_cond_kwargs=added,
                        return_dict=False)[0]

    return predict


def hunyuan_crop_region(grid: tuple[int, int], base: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Where a ``grid`` latent grid sits inside a ``base x base`` square after an aspect-keeping resize
    (Hunyuan-DiT's reference grid for its 2-D rotary embedding)."""
    h, w = grid
    if h / w > 1:
        resize_h, resize_w = base, int(round(base / h * w))
    else:
        resize_h, resize_w = int(round(base / w * h)), base
    top, left = int(round((base - resize_h) / 2.0)), int(round((base - resize_w) / 2.0))
    return (top, left), (top + resize_h, left + resize_w)


def _hunyuan_predictor(pipe, cond: dict, n: int, height: int, width: int, cfg: bool) -> Callable:
    from diffusers.models.embeddings import get_2d_rotary_pos_embed

    denoiser = pipe.transformer
    embeds = _with_negative(cond, "prompt_embeds", cfg)
    mask = _with_negative(cond, "prompt_attention_mask", cfg)
    embeds_t5 = _with_negative(cond, "prompt_embeds_2", cfg)
    mask_t5 = _with_negative(cond, "prompt_attention_mask_2", cfg)
    rows, device = embeds.shape[0], embeds.device
    patch, scale = denoiser.config.patch_size, vae_scale_factor(pipe.vae)
    grid = (height // scale // patch, width // scale // patch)
    rotary = get_2d_rotary_pos_embed(denoiser.inner_dim // denoiser.num_heads,
                                     hunyuan_crop_region(grid, 512 // scale // patch), grid, device=device,
                                     output_type="pt")
    meta = torch.tensor([list(HUNYUAN_ORIGINAL_SIZE) + [height, width, 0, 0]], dtype=embeds.dtype)
    meta = meta.to(device).repeat(rows, 1)
    style = torch.zeros(rows, dtype=torch.long, device=device)

    def predict(x, t):
        t_rows = t.to(device).reshape(1).repeat(x.shape[0]).to(x.dtype) if torch.is_tensor(t) else \
            torch.full((x.shape[0],), float(t), device=device, dtype=x.dtype)
        return denoiser(x, t_rows, encoder_hidden_states=embeds, text_embedding_mask=mask,
                        encoder_hidden_states_t5=embeds_t5, text_embedding_mask_t5=mask_t5, image_meta_size=meta,
                        style=style, image_rotary_emb=rotary, return_dict=False)[0]

    return predict


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


def _sdxl_predictor(pipe, cond: dict, n: int, height: int, width: int, cfg: bool) -> Callable:
    unet = pipe.unet
    embeds = _with_negative(cond, "prompt_embeds", cfg)
    pooled = _with_negative(cond, "pooled_prompt_embeds", cfg)
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


def _sd_predictor(pipe, cond: dict, n: int, height: int, width: int, cfg: bool) -> Callable:
    unet = pipe.unet
    embeds = _with_negative(cond, "prompt_embeds", cfg)

    def predict(x, t):
        return unet(x, t, encoder_hidden_states=embeds, return_dict=False)[0]

    return predict


def _dit_predictor(pipe, cond: dict, n: int, height: int, width: int, cfg: bool) -> Callable:
    denoiser = pipe.transformer
    labels = cond["class_labels"]
    if cfg:  # DiT puts the conditional half first; the null class is the last embedding row (1000 for ImageNet)
        null = torch.full_like(labels, denoiser.config.num_embeds_ada_norm)
        labels = torch.cat([labels, null])

    def predict(x, t):
        return denoiser(x, timestep=expand_timestep(t, x.shape[0], x.device), class_labels=labels).sample

    return predict


PREDICTORS = {"pixart": _pixart_predictor, "hunyuan": _hunyuan_predictor, "sdxl": _sdxl_predictor,
              "sd": _sd_predictor, "dit": _dit_predictor}
UNCOND_FIRST = {"dit": False}  # order of the two CFG halves in the denoiser batch


# -- the shared loop ------------------------------------------------------------------------------------------

def latent_shape(kind: str, pipe, n: int, height: int, width: int) -> tuple[int, int, int, int]:
    config = denoiser_of(pipe).config
    if kind == "dit":  # DiT generates at its trained size
        return (n, config.in_channels, config.sample_size, config.sample_size)
    scale = vae_scale_factor(pipe.vae)
    return (n, config.in_channels, height // scale, width // scale)


def _step_kwargs(scheduler, generators) -> dict:
    """``eta``/``generator`` where the scheduler's step takes them (the pipelines' prepare_extra_step_kwargs)."""
    params = inspect.signature(scheduler.step).parameters
    kwargs = {}
    if "eta" in params:
        kwargs["eta"] = 0.0
    if "generator" in params:
        kwargs["generator"] = generators
    return kwargs


def timesteps_for(scheduler, steps: int, device, denoising_end: float | None = None,
                  denoising_start: float | None = None) -> torch.Tensor:
    """Set the scheduler up for ``steps`` steps; with ``denoising_end`` keep only the timesteps before that
    fraction of the schedule (SDXL base handing over to the refiner), with ``denoising_start`` only those
    after it (the refiner), as the SDXL pipelines cut them."""
    scheduler.set_timesteps(steps, device=device)
    timesteps = scheduler.timesteps
    begin = 0
    train_steps = scheduler.config.num_train_timesteps
    if denoising_end is not None and 0 < denoising_end < 1:
        cutoff = int(round(train_steps - denoising_end * train_steps))
        timesteps = timesteps[:int((timesteps >= cutoff).sum())]
    if denoising_start is not None and 0 < denoising_start < 1:
        cutoff = int(round(train_steps - denoising_start * train_steps))
        count = int((timesteps < cutoff).sum())
        if getattr(scheduler, "order", 1) == 2 and count % 2 == 0:
            count += 1  # never stop between the two derivative evaluations of a 2nd-order step
        begin = len(timesteps) - count
        timesteps = timesteps[begin:]
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(begin)
    return timesteps


@torch.no_grad()
def denoise(kind: str, pipe, cond: dict, generators: list[torch.Generator], steps: int, guidance: float,
            height: int, width: int, denoising_end: float | None = None, denoising_start: float | None = None,
            latents: torch.Tensor | None = None) -> torch.Tensor:
    """Run the reverse diffusion for one batch; returns the final latents (on the denoiser's device).

    ``latents`` with ``denoising_start``: continue from a partly denoised batch (the SDXL refiner), no new noise.

    ``cond`` holds this batch's conditioning on the denoiser's device: the pipeline's keyword names
    (``prompt_embeds``, ``negative_prompt_embeds`` expanded to the batch, masks, pooled embeddings) or
    ``class_labels`` for DiT."""
    denoiser = denoiser_of(pipe)
    param = next(denoiser.parameters())
    n = len(generators)
    cfg = guidance > 1.0
    scheduler = pipe.scheduler
    shape = latent_shape(kind, pipe, n, height, width)

    from diffusers.utils.torch_utils import randn_tensor

    if latents is None:
        latents = randn_tensor(shape, generator=generators, device=param.device, dtype=param.dtype)
        latents = latents * scheduler.init_noise_sigma
    else:
        latents = latents.to(device=param.device, dtype=param.dtype)
    timesteps = timesteps_for(scheduler, steps, param.device, denoising_end, denoising_start)
    predict = PREDICTORS[kind](pipe, cond, n, height, width, cfg)
    uncond_first = UNCOND_FIRST.get(kind, True)
    step_kwargs = _step_kwargs(scheduler, generators)
    channels = shape[1]
    for t in timesteps:
        model_input = torch.cat([latents] * 2) if cfg else latents
        model_input = scheduler.scale_model_input(model_input, t)
        pred = predict(model_input, t)
        if pred.shape[1] == 2 * channels:  # learned variance: keep the noise prediction
            pred = pred[:, :channels]
        if cfg:
            first, second = pred.chunk(2)
            uncond, text = (first, second) if uncond_first else (second, first)
            pred = uncond + guidance * (text - uncond)
        latents = scheduler.step(pred, t, latents, **step_kwargs, return_dict=False)[0]
    return latents


@torch.no_grad()
def decode(pipe, latents: torch.Tensor) -> torch.Tensor:
    """Latents -> images in [0, 1] (float, on the VAE's device), as the pipelines decode and denormalise."""
    vae = pipe.vae
    config = vae.config
    latents = latents.to(vae.dtype)
    if getattr(config, "latents_mean", None) is not None and getattr(config, "latents_std", None) is not None:
        mean = torch.tensor(config.latents_mean).view(1, -1, 1, 1).to(latents)
        std = torch.tensor(config.latents_std).view(1, -1, 1, 1).to(latents)
        latents = latents * std / config.scaling_factor + mean
    else:
        latents = latents / config.scaling_factor
    images = vae.decode(latents, return_dict=False)[0]
    return (images / 2 + 0.5).clamp(0, 1)

