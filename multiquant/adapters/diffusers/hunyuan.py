"""Hunyuan-DiT (``HunyuanDiTPipeline``): two text encoders (CLIP and mT5, each with a mask), image-size
micro-conditioning, a 2-D rotary embedding on a reference grid, and its repo's ancestral v-prediction DDPM."""
from __future__ import annotations

from typing import Callable

import torch

from .base import DiffusersAdapter
from .loading import denoiser_of, vae_scale_factor
from .loop import with_negative

# Hunyuan-DiT's default micro-conditioning (HunyuanDiTPipeline: original_size=(1024, 1024), crops at (0, 0)).
HUNYUAN_ORIGINAL_SIZE = (1024, 1024)


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


class HunyuanAdapter(DiffusersAdapter):
    kind = "hunyuan"
    pipeline_classes = ("HunyuanDiTPipeline",)
    # Hunyuan keeps its repo's DDPM scheduler: v-prediction, ancestral (it draws noise at every step).
    tiny_schedule = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.03,
                         prediction_type="v_prediction", clip_sample=False, steps_offset=1)
    tiny_scheduler_class = "DDPMScheduler"
    prompt_fields = ("prompt_embeds", "prompt_attention_mask", "prompt_embeds_2", "prompt_attention_mask_2")

    def encode_settings(self, spec) -> dict:
        return {"max_sequence_length": 77, "max_sequence_length_2": 256}

    def encode_chunk(self, pipe, prompts, settings, device, cfg):
        out = {}
        dtype = denoiser_of(pipe).dtype
        for index, suffix, length in ((0, "", settings["max_sequence_length"]),
                                      (1, "_2", settings["max_sequence_length_2"])):
            embeds, neg, mask, neg_mask = pipe.encode_prompt(
                prompts, device=device, dtype=dtype, do_classifier_free_guidance=cfg,
                max_sequence_length=length, text_encoder_index=index)
            out.update({"prompt_embeds" + suffix: embeds, "prompt_attention_mask" + suffix: mask})
            if cfg:
                out.update({"negative_prompt_embeds" + suffix: neg,
                            "negative_prompt_attention_mask" + suffix: neg_mask})
        return out

    def random_embeds(self, spec, pipe, config, rows, draws, seq_len):
        return {"prompt_embeds": draws.embeds(rows, config.text_len, config.cross_attention_dim),
                "prompt_attention_mask": draws.mask(rows, config.text_len),
                "prompt_embeds_2": draws.embeds(rows, config.text_len_t5, config.cross_attention_dim_t5),
                "prompt_attention_mask_2": draws.mask(rows, config.text_len_t5)}

    def predictor(self, pipe, cond, n, height, width, cfg) -> Callable:
        from diffusers.models.embeddings import get_2d_rotary_pos_embed

        denoiser = pipe.transformer
        embeds = with_negative(cond, "prompt_embeds", cfg)
        mask = with_negative(cond, "prompt_attention_mask", cfg)
        embeds_t5 = with_negative(cond, "prompt_embeds_2", cfg)
        mask_t5 = with_negative(cond, "prompt_attention_mask_2", cfg)
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
                            encoder_hidden_states_t5=embeds_t5, text_embedding_mask_t5=mask_t5,
                            image_meta_size=meta, style=style, image_rotary_emb=rotary, return_dict=False)[0]

        return predict

    def conditioned_inputs(self, spec, model, cfg, x, t, randn, size):
        batch, device, dtype = x.shape[0], x.device, x.dtype
        return dict(hidden_states=x, timestep=t,
                    encoder_hidden_states=randn(batch, cfg["text_len"], cfg["cross_attention_dim"]),
                    text_embedding_mask=torch.ones(batch, cfg["text_len"], dtype=torch.long, device=device),
                    encoder_hidden_states_t5=randn(batch, cfg["text_len_t5"], cfg["cross_attention_dim_t5"]),
                    text_embedding_mask_t5=torch.ones(batch, cfg["text_len_t5"], dtype=torch.long, device=device),
                    image_meta_size=randn(batch, 6).abs() * 100,
                    style=torch.zeros(batch, dtype=torch.long, device=device),
                    image_rotary_emb=_rope(cfg, size, device, dtype))


def _rope(cfg: dict, size: int, device, dtype):
    from diffusers.models.embeddings import get_2d_rotary_pos_embed

    grid = size // cfg["patch_size"]
    head_dim = cfg["attention_head_dim"]
    cos, sin = get_2d_rotary_pos_embed(head_dim, ((0, 0), (grid, grid)), (grid, grid))
    return cos.to(device=device, dtype=dtype), sin.to(device=device, dtype=dtype)
