"""Stable Diffusion 1.x (``StableDiffusionPipeline``): one CLIP text encoder, a U-Net with cross-attention."""
from __future__ import annotations

from typing import Callable

from .base import DiffusersAdapter
from .loop import with_negative


class SDAdapter(DiffusersAdapter):
    kind = "sd"
    convolutional_denoiser = True  # a U-Net
    pipeline_classes = ("StableDiffusionPipeline",)
    tiny_schedule = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    prompt_fields = ("prompt_embeds",)

    def encode_chunk(self, pipe, prompts, settings, device, cfg):
        embeds, neg = pipe.encode_prompt(prompts, device, 1, cfg)
        return {"prompt_embeds": embeds, **({"negative_prompt_embeds": neg} if cfg else {})}

    def random_embeds(self, spec, pipe, config, rows, draws, seq_len):
        return {"prompt_embeds": draws.embeds(rows, seq_len, config.cross_attention_dim)}

    def predictor(self, pipe, cond, n, height, width, cfg) -> Callable:
        unet = pipe.unet
        embeds = with_negative(cond, "prompt_embeds", cfg)

        def predict(x, t):
            return unet(x, t, encoder_hidden_states=embeds, return_dict=False)[0]

        return predict

    def conditioned_inputs(self, spec, model, cfg, x, t, randn, size):
        return dict(sample=x, timestep=t, encoder_hidden_states=randn(x.shape[0], 8, cfg["cross_attention_dim"]))
