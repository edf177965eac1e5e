"""PixArt-alpha and PixArt-sigma (``PixArtAlphaPipeline`` / ``PixArtSigmaPipeline``): T5 prompt embeddings with
attention masks, the transformer's resolution / aspect-ratio conditioning (PixArt-alpha 1024 only)."""
from __future__ import annotations

from typing import Callable

import torch

from .base import DiffusersAdapter
from .loop import expand_timestep, with_negative


class PixArtAdapter(DiffusersAdapter):
    kind = "pixart"
    pipeline_classes = ("PixArtAlphaPipeline", "PixArtSigmaPipeline")
    tiny_schedule = dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02)
    prompt_fields = ("prompt_embeds", "prompt_attention_mask")

    def encode_settings(self, spec) -> dict:
        return {"clean_caption": True, "negative_prompt": "",
                "max_sequence_length": spec.pipeline_kwargs.get("max_sequence_length", 120)}

    def encode_chunk(self, pipe, prompts, settings, device, cfg):
        embeds, mask, neg, neg_mask = pipe.encode_prompt(
            prompts, do_classifier_free_guidance=cfg, negative_prompt=settings["negative_prompt"], device=device,
            clean_caption=settings["clean_caption"], max_sequence_length=settings["max_sequence_length"])
        out = {"prompt_embeds": embeds, "prompt_attention_mask": mask}
        if cfg:
            out.update(negative_prompt_embeds=neg, negative_prompt_attention_mask=neg_mask)
        return out

    def random_embeds(self, spec, pipe, config, rows, draws, seq_len):
        return {"prompt_embeds": draws.embeds(rows, seq_len, config.caption_channels),
                "prompt_attention_mask": draws.mask(rows, seq_len)}

    def predictor(self, pipe, cond, n, height, width, cfg) -> Callable:
        denoiser = pipe.transformer
        embeds = with_negative(cond, "prompt_embeds", cfg)
        mask = with_negative(cond, "prompt_attention_mask", cfg)
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

    def conditioned_inputs(self, spec, model, cfg, x, t, randn, size):
        batch, n_tokens = x.shape[0], 8
        kwargs = dict(hidden_states=x, encoder_hidden_states=randn(batch, n_tokens, cfg["caption_channels"]),
                      timestep=t, added_cond_kwargs={"resolution": None, "aspect_ratio": None})
        if cfg.get("use_additional_conditions"):
            kwargs["added_cond_kwargs"] = {"resolution": randn(batch, 2).abs() + 1,
                                           "aspect_ratio": randn(batch, 1).abs() + 1}
        return kwargs
