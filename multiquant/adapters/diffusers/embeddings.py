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

from ...errors import SetupError
from ...utils import atomic_path
from ..registry import adapter_for
from .loading import denoiser_of, family_spec

REFINER_PREFIX = "refiner_"
CACHE_FORMAT = 1


def embedding_fields(adapter) -> tuple[str, ...]:
    """The kind's per-prompt embedding fields, then their ``negative_`` twins."""
    fields = adapter.prompt_fields
    return fields + tuple("negative_" + name for name in fields)


def encode_settings(family) -> dict:
    """The ``encode_prompt`` options of the protocol (the stock pipelines' ``__call__`` defaults)."""
    spec = family_spec(family)
    return adapter_for(spec).encode_settings(spec)


@torch.no_grad()
def encode_prompts(family, pipe, prompts: list[str], chunk_size: int = 32, device=None) -> dict:
    """Encode every prompt with the pipeline's ``encode_prompt`` (in chunks; the kind's adapter makes the call),
    plus the negative embeddings once.

    Returns CPU tensors: per-prompt fields [N, ...] and ``negative_*`` fields [1, ...]."""
    spec = family_spec(family)
    adapter = adapter_for(spec)
    if all(getattr(pipe, name, None) is None for name in ("text_encoder", "text_encoder_2")):
        raise SetupError(f"{type(pipe).__name__} has no text encoder to encode the prompts with: load the full "
                           "pipeline (load_pipeline) or pass prompt embeddings (make_sampler(prompt_embeds=...), "
                           "layout as random_prompt_embeds())")
    settings = adapter.encode_settings(spec)
    device = device or denoiser_of(pipe).device
    chunks = [adapter.encode_chunk(pipe, prompts[i:i + chunk_size], settings, device, cfg=False)
              for i in range(0, len(prompts), chunk_size)]
    out = {name: torch.cat([chunk[name] for chunk in chunks]).cpu() for name in chunks[0]}
    # The negative prompt is the same for every image: encode it once (with the first prompt as the positive).
    with_negative = adapter.encode_chunk(pipe, prompts[:1], settings, device, cfg=True)
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
        refined = encode_prompts(spec, refiner, prompts, chunk_size=chunk_size)
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


class RandomDraws:
    """The random tensors of :func:`random_prompt_embeds`, all from one generator (in the order they are asked)."""

    def __init__(self, seed: int):
        self.generator = torch.Generator().manual_seed(seed)

    def randn(self, *shape) -> torch.Tensor:
        return torch.randn(*shape, generator=self.generator)

    def embeds(self, rows: int, length: int, dim: int) -> torch.Tensor:
        return self.randn(rows, length, dim)

    def mask(self, rows: int, length: int) -> torch.Tensor:
        """Attention masks that keep a random number (>= 1) of leading tokens."""
        keep = torch.randint(1, length + 1, (rows, 1), generator=self.generator)
        return (torch.arange(length)[None] < keep).long()


def random_prompt_embeds(family, pipe, n: int, seed: int = 0, seq_len: int = 8) -> dict:
    """Random prompt embeddings with the shapes the pipeline's denoiser expects (tests, tiny pipelines, smoke
    runs without text encoders): the kind's adapter names the fields and their shapes."""
    spec = family_spec(family)
    adapter = adapter_for(spec)
    config = denoiser_of(pipe).config
    draws = RandomDraws(seed)
    out = {}
    for rows, prefix in ((n, ""), (1, "negative_")):
        fields = adapter.random_embeds(spec, pipe, config, rows, draws, seq_len)
        out.update({prefix + name: value for name, value in fields.items()})
    return out
