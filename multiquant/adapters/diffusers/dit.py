"""DiT-XL/2 (``DiTPipeline``): class-conditional on ImageNet ids, generating at its trained latent size; under
guidance the conditional half comes first and the null class is the label embedding's last row."""
from __future__ import annotations

from typing import Callable

import torch

from .base import DiffusersAdapter
from .loading import denoiser_of
from .loop import expand_timestep


class DiTAdapter(DiffusersAdapter):
    kind = "dit"
    pipeline_classes = ("DiTPipeline",)
    tiny_schedule = dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02)
    uncond_first = False  # DiT puts the conditional half first

    def batch_conditioning(self, sampler, indices, prefix=""):
        return {"class_labels": torch.tensor([sampler.conditions[i] for i in indices],
                                             device=sampler.denoiser_device())}

    def latent_shape(self, pipe, n, height, width):
        config = denoiser_of(pipe).config  # DiT generates at its trained size
        return (n, config.in_channels, config.sample_size, config.sample_size)

    def predictor(self, pipe, cond, n, height, width, cfg) -> Callable:
        denoiser = pipe.transformer
        labels = cond["class_labels"]
        if cfg:  # the null class is the last embedding row (1000 for ImageNet)
            null = torch.full_like(labels, denoiser.config.num_embeds_ada_norm)
            labels = torch.cat([labels, null])

        def predict(x, t):
            return denoiser(x, timestep=expand_timestep(t, x.shape[0], x.device), class_labels=labels).sample

        return predict

    def conditioned_inputs(self, spec, model, cfg, x, t, randn, size):
        n_classes = cfg.get("num_embeds_ada_norm") or 1000
        labels = torch.arange(x.shape[0], device=x.device) % n_classes
        return dict(hidden_states=x, timestep=t, class_labels=labels)
