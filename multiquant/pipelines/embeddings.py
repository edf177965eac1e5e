"""Prompt embeddings, computed once per run with the pipeline's own ``encode_prompt`` and cached on disk.

The reference re-encoded the same 1,000 prompts with T5-XXL / CLIP / mT5 for every configuration. Here the
embeddings (and the negative, i.e. empty-prompt, embeddings the pipelines use for classifier-free guidance)
are computed once, stored as safetensors keyed by family + prompts + encoder identity, and sliced per batch.

Layout: a dict named after the pipeline keywords. Per-prompt tensors have a leading dim of N prompts;
``negative_*`` tensors have a leading dim of 1 (the negative prompt is the same for every image) or N.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from ..errors import SetupError
from ..utils import atomic_path
from .loading import denoiser_of, family_spec, pipeline_kind

# Per-prompt fields of each pipeline family; each has a "negative_" twin.
PROMPT_FIELDS = {
    "pixart": ("prompt_embeds", "prompt_attention_mask"),
    "hunyuan": ("prompt_embeds", "prompt_attention_mask", "prompt_embeds_2", "prompt_attention_mask_2"),
    "sdxl": ("prompt_embeds", "pooled_prompt_embeds"),
    "sd": ("prompt_embeds",),
}
REFINER_PREFIX = "refiner_"
CACHE_FORMAT = 1


def embedding_fields(kind: str) -> tuple[str, ...]:
    fields = PROMPT_FIELDS[kind]
    return fields + tuple("negative_" + name for name in fields)


def encode_settings(family) -> dict:
    """The ``encode_prompt`` options of the protocol (the stock pipelines' ``__call__`` defaults)."""
    spec = family_spec(family)
    kind = pipeline_kind(spec)
    if kind == "pixart":
        return {"clean_caption": True, "negative_prompt": "",
                "max_sequence_length": spec.pipeline_kwargs.get("max_sequence_length", 120)}
    if kind == "hunyuan":
        return {"max_sequence_length": 77, "max_sequence_length_2": 256}
    return {}


def _encode_chunk(kind: str, pipe, prompts: list[str], settings: dict, device, cfg: bool) -> dict:
    """One ``encode_prompt`` call (two for Hunyuan's two encoders) -> tensors named as the pipeline's kwargs."""
    if kind == "pixart":
        embeds, mask, neg, neg_mask = pipe.encode_prompt(
            prompts, do_classifier_free_guidance=cfg, negative_prompt=settings["negative_prompt"], device=device,
            clean_caption=settings["clean_caption"], max_sequence_length=settings["max_sequence_length"])
        out = {"prompt_embeds": embeds, "prompt_attention_mask": mask}
        if cfg:
            out.update(negative_prompt_embeds=neg, negative_prompt_attention_mask=neg_mask)
        return out
    if kind == "hunyuan":
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
    if kind == "sdxl":
        embeds, neg, pooled, neg_pooled = pipe.encode_prompt(
            prompt=prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=cfg)
        out = {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
        if cfg:
            out.update(negative_prompt_embeds=neg, negative_pooled_prompt_embeds=neg_pooled)
        return out
    if kind == "sd":
        embeds, neg = pipe.encode_prompt(prompts, device, 1, cfg)
        return {"prompt_embeds": embeds, **({"negative_prompt_embeds": neg} if cfg else {})}
    raise ValueError(f"pipeline kind {kind!r} is not text-conditioned")


@torch.no_grad()
def encode_prompts(family, pipe, prompts: list[str], chunk_size: int = 32, device=None,
                   kind: str | None = None) -> dict:
    """Encode every prompt with the pipeline's ``encode_prompt`` (in chunks), plus the negative embeddings once.

    Returns CPU tensors: per-prompt fields [N, ...] and ``negative_*`` fields [1, ...]."""
    kind = kind or pipeline_kind(family)
    if all(getattr(pipe, name, None) is None for name in ("text_encoder", "text_encoder_2")):
        raise SetupError(f"{type(pipe).__name__} has no text encoder to encode the prompts with: load the full "
                           "pipeline (load_pipeline) or pass prompt embeddings (make_sampler(prompt_embeds=...), "
                           "layout as random_prompt_embeds())")
    settings = encode_settings(family)
    device = device or denoiser_of(pipe).device
    chunks = [_encode_chunk(kind, pipe, prompts[i:i + chunk_size], settings, device, cfg=False)
              for i in range(0, len(prompts), chunk_size)]
    out = {name: torch.cat([chunk[name] for chunk in chunks]).cpu() for name in chunks[0]}
    # The negative prompt is the same for every image: encode it once (with the first prompt as the positive).
    with_negative = _encode_chunk(kind, pipe, prompts[:1], settings, device, cfg=True)
    out.update({name: value.cpu() for name, value in with_negative.items() if name.startswith("negative_")})
    return out


def _encoder_identity(pipe) -> list[str]:
    """What identifies the text encoders: class, checkpoint path / hub id, dtype (the cache key part)."""
    ids = []
    for name in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
        obj = getattr(pipe, name, None)
        if obj is None:
            continue
        source = getattr(getattr(obj, "config", None), "_name_or_path", None) or getattr(obj, "name_or_path", None)
        dtype = str(getattr(obj, "dtype", ""))
        ids.append(f"{name}={type(obj).__name__}:{source}:{dtype}")
    return ids


def embedding_cache_key(family, pipe, prompts: list[str], extra: dict | None = None) -> str:
    spec = family_spec(family)
    payload = {"format": CACHE_FORMAT, "family": spec.name, "prompts": list(prompts),
               "encoders": _encoder_identity(pipe), "settings": encode_settings(spec), "extra": extra or {}}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def cached_prompt_embeds(family, pipe, prompts: list[str], cache_dir: str | Path | None = None, refiner=None,
                         chunk_size: int = 32) -> dict:
    """Prompt embeddings from ``cache_dir`` if present, else encoded now (and written there atomically).

    With an SDXL ``refiner``, its own embeddings (its encoder differs) are added with a ``refiner_`` prefix."""
    spec = family_spec(family)
    path = None
    if cache_dir is not None:
        extra = {"refiner": _encoder_identity(refiner)} if refiner is not None else None
        key = embedding_cache_key(spec, pipe, prompts, extra)
        path = Path(cache_dir).expanduser() / f"{spec.name}-{key[:20]}.safetensors"
        if path.is_file():
            from safetensors.torch import load_file

            return load_file(str(path))
    embeds = encode_prompts(spec, pipe, prompts, chunk_size=chunk_size)
    if refiner is not None:
        refined = encode_prompts(spec, refiner, prompts, chunk_size=chunk_size, kind="sdxl")
        embeds.update({REFINER_PREFIX + name: value for name, value in refined.items()})
    if path is not None:
        from safetensors.torch import save_file

        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            save_file({k: v.contiguous() for k, v in embeds.items()}, str(tmp),
                      metadata={"family": spec.name, "num_prompts": str(len(prompts)), "format": str(CACHE_FORMAT)})
    return embeds


def offload_text_encoders(*pipes) -> None:
    """Move the text encoders to the CPU once the embeddings exist: their GPU memory goes to the denoiser."""
    moved = False
    for pipe in pipes:
        for name in ("text_encoder", "text_encoder_2"):
            module = getattr(pipe, name, None) if pipe is not None else None
            if isinstance(module, torch.nn.Module) and next(module.parameters()).device.type != "cpu":
                module.to("cpu")
                moved = True
    if moved and torch.cuda.is_available():
        torch.cuda.empty_cache()


def random_prompt_embeds(family, pipe, n: int, seed: int = 0, seq_len: int = 8) -> dict:
    """Random prompt embeddings with the shapes the pipeline's denoiser expects (tests, tiny pipelines, smoke
    runs without text encoders). Attention masks keep a random number (>= 1) of leading tokens."""
    kind = pipeline_kind(family)
    config = denoiser_of(pipe).config
    g = torch.Generator().manual_seed(seed)

    def embeds(rows, length, dim):
        return torch.randn(rows, length, dim, generator=g)

    def mask(rows, length):
        keep = torch.randint(1, length + 1, (rows, 1), generator=g)
        return (torch.arange(length)[None] < keep).long()

    out = {}
    for rows, prefix in ((n, ""), (1, "negative_")):
        if kind == "pixart":
            out[prefix + "prompt_embeds"] = embeds(rows, seq_len, config.caption_channels)
            out[prefix + "prompt_attention_mask"] = mask(rows, seq_len)
        elif kind == "hunyuan":
            out[prefix + "prompt_embeds"] = embeds(rows, config.text_len, config.cross_attention_dim)
            out[prefix + "prompt_attention_mask"] = mask(rows, config.text_len)
            out[prefix + "prompt_embeds_2"] = embeds(rows, config.text_len_t5, config.cross_attention_dim_t5)
            out[prefix + "prompt_attention_mask_2"] = mask(rows, config.text_len_t5)
        elif kind in ("sd", "sdxl"):
            out[prefix + "prompt_embeds"] = embeds(rows, seq_len, config.cross_attention_dim)
            if kind == "sdxl":
                # 6 micro-conditioning ids (5 for a refiner, which conditions on an aesthetic score instead)
                n_ids = 5 if getattr(getattr(pipe, "config", None), "requires_aesthetics_score", False) else 6
                pooled = config.projection_class_embeddings_input_dim - n_ids * config.addition_time_embed_dim
                out[prefix + "pooled_prompt_embeds"] = torch.randn(rows, pooled, generator=g)
        else:
            raise ValueError(f"family {family_spec(family).name!r} is not text-conditioned: no prompt embeddings")
    return out
