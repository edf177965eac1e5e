"""Example denoiser inputs per model class: one forward pass for tracing, MAC counting and smoke tests.

Shapes follow the family's protocol resolution (latent = resolution / 8 for latent models), so the
same function serves full-size models on the meta device and tiny models on the CPU."""
from __future__ import annotations

import torch
from torch import nn

from ..errors import UserError
from . import FamilySpec


def _config(model: nn.Module) -> dict:
    return dict(getattr(model, "config", {}))


def example_inputs(family: FamilySpec, model: nn.Module, batch: int = 1, device=None, dtype=None,
                   resolution: int | None = None, seed: int = 0) -> dict:
    """Keyword arguments for ``model(**kwargs)`` with random, non-zero tensors."""
    p = next(model.parameters())
    device = device or p.device
    dtype = dtype or p.dtype
    if family.example_inputs is not None:  # the user's inputs, on the model's device and float dtype
        return _moved(family.example_inputs(model, batch), device, dtype)
    cfg = _config(model)
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        x = torch.randn(*shape, generator=g)
        return x.to(device=device, dtype=dtype)

    cls = type(model).__name__
    sample = cfg.get("sample_size", 8)
    if resolution is not None:
        sample = resolution if cfg.get("in_channels") in (1, 3) and family.name.startswith("mnist") else resolution // 8
    size = sample if isinstance(sample, int) else sample[0]
    x = randn(batch, cfg.get("in_channels", 4), size, size)
    t = torch.full((batch,), 500.0, dtype=dtype, device=device)
    if cls == "PixArtTransformer2DModel":
        n_tokens = 8
        kwargs = dict(hidden_states=x, encoder_hidden_states=randn(batch, n_tokens, cfg["caption_channels"]),
                      timestep=t, added_cond_kwargs={"resolution": None, "aspect_ratio": None})
        if cfg.get("use_additional_conditions"):
            kwargs["added_cond_kwargs"] = {"resolution": randn(batch, 2).abs() + 1, "aspect_ratio": randn(batch, 1).abs() + 1}
        return kwargs
    if cls == "HunyuanDiT2DModel":
        return dict(hidden_states=x, timestep=t,
                    encoder_hidden_states=randn(batch, cfg["text_len"], cfg["cross_attention_dim"]),
                    text_embedding_mask=torch.ones(batch, cfg["text_len"], dtype=torch.long, device=device),
                    encoder_hidden_states_t5=randn(batch, cfg["text_len_t5"], cfg["cross_attention_dim_t5"]),
                    text_embedding_mask_t5=torch.ones(batch, cfg["text_len_t5"], dtype=torch.long, device=device),
                    image_meta_size=randn(batch, 6).abs() * 100, style=torch.zeros(batch, dtype=torch.long, device=device),
                    image_rotary_emb=_hunyuan_rope(cfg, size, device, dtype))
    if cls == "UNet2DConditionModel":
        kwargs = dict(sample=x, timestep=t, encoder_hidden_states=randn(batch, 8, cfg["cross_attention_dim"]))
        if cfg.get("addition_embed_type") == "text_time":
            text_dim = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
            kwargs["added_cond_kwargs"] = {"text_embeds": randn(batch, text_dim), "time_ids": randn(batch, 6).abs() * 100}
        return kwargs
    if cls == "DiTTransformer2DModel":
        n_classes = cfg.get("num_embeds_ada_norm") or 1000
        labels = torch.arange(batch, device=device) % n_classes
        return dict(hidden_states=x, timestep=t, class_labels=labels)
    raise UserError(f"no example inputs for {cls}: give the family an example_inputs(model, batch) callable "
                    f"(FamilySpec(example_inputs=...))")


def _moved(value, device, dtype):
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=dtype) if value.is_floating_point() else value.to(device)
    if isinstance(value, dict):
        return {k: _moved(v, device, dtype) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_moved(v, device, dtype) for v in value)
    return value


def _hunyuan_rope(cfg: dict, size: int, device, dtype):
    from diffusers.models.embeddings import get_2d_rotary_pos_embed

    grid = size // cfg["patch_size"]
    head_dim = cfg["attention_head_dim"]
    cos, sin = get_2d_rotary_pos_embed(head_dim, ((0, 0), (grid, grid)), (grid, grid))
    return cos.to(device=device, dtype=dtype), sin.to(device=device, dtype=dtype)
