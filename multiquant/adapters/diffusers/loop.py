"""The denoising loop shared by the diffusers pipeline kinds, fed precomputed conditioning.

The loop is one; what differs per kind (the denoiser call with its conditioning inputs, the latent shape, the
order of the two guidance halves) is its adapter's ``predictor`` / ``latent_shape``. Together they follow
the kind's diffusers pipeline's ``__call__`` step for step (same latent shape and scaling, same timesteps, same
conditioning inputs, same guidance formula, same scheduler calls, same VAE decoding), so an image matches the
stock pipeline's output for the same embeddings and generators. What it leaves out: prompt encoding (done once
per run, see embeddings.py), the safety checker, resolution binning (the protocol's square sizes are their own
bins) and the SDXL invisible watermark.

Noise comes from one ``torch.Generator`` per image (``randn_tensor`` draws image ``i`` from generator ``i``),
used for the initial latents and by ancestral schedulers at every step, so an image does not depend on the
batch it is rendered in.
"""
from __future__ import annotations

import inspect

import torch

from .loading import denoiser_of


def expand_timestep(t, batch: int, device) -> torch.Tensor:
    """A scheduler timestep as a [batch] tensor (the PixArt/DiT pipelines' broadcasting)."""
    if not torch.is_tensor(t):
        t = torch.tensor([t], dtype=torch.float64 if isinstance(t, float) else torch.int64)
    elif t.ndim == 0:
        t = t[None]
    return t.to(device).expand(batch)


def with_negative(cond: dict, name: str, cfg: bool) -> torch.Tensor:
    """``cat([negative, positive])`` under classifier-free guidance (the pipelines' order), else positive."""
    return torch.cat([cond["negative_" + name], cond[name]]) if cfg else cond[name]


# -- the shared loop ------------------------------------------------------------------------------------------

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
def denoise(adapter, pipe, cond: dict, generators: list[torch.Generator], steps: int, guidance: float,
            height: int, width: int, denoising_end: float | None = None, denoising_start: float | None = None,
            latents: torch.Tensor | None = None) -> torch.Tensor:
    """Run the reverse diffusion for one batch; returns the final latents (on the denoiser's device).

    ``latents`` with ``denoising_start``: continue from a partly denoised batch (the SDXL refiner), no new noise.

    ``cond`` holds this batch's conditioning on the denoiser's device: the pipeline's keyword names
    (``prompt_embeds``, ``negative_prompt_embeds`` expanded to the batch, masks, pooled embeddings) or
    ``class_labels`` for DiT. ``adapter``: the pipeline kind's (its denoiser call and latent shape)."""
    denoiser = denoiser_of(pipe)
    param = next(denoiser.parameters())
    n = len(generators)
    cfg = guidance > 1.0
    scheduler = pipe.scheduler
    shape = adapter.latent_shape(pipe, n, height, width)

    from diffusers.utils.torch_utils import randn_tensor

    if latents is None:
        latents = randn_tensor(shape, generator=generators, device=param.device, dtype=param.dtype)
        latents = latents * scheduler.init_noise_sigma
    else:
        latents = latents.to(device=param.device, dtype=param.dtype)
    timesteps = timesteps_for(scheduler, steps, param.device, denoising_end, denoising_start)
    predict = adapter.predictor(pipe, cond, n, height, width, cfg)
    uncond_first = adapter.uncond_first
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

