"""CLIP score: cosine similarity between CLIP image and text embeddings.

Scale convention: :func:`clip_score` returns the **raw cosine** per image (the Qua2SeDiMo paper's
plots, about 0.3); multiply by 100 and clip at 0 for the torchmetrics/SVDQuant convention (about 27-30).
Always report the model directory alongside the number. Weights are read from a local directory
(``model_dir`` or ``$QUA2SEDIMO_CLIP``); nothing is downloaded.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

__all__ = ["clip_score", "clip_cosine", "ClipScorer", "CLIP_ENV"]

CLIP_ENV = "QUA2SEDIMO_CLIP"


def clip_cosine(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine similarity of paired embeddings ``[N, D]`` x ``[N, D]`` -> float64 ``[N]``."""
    if image_embeds.shape != text_embeds.shape:
        raise ValueError(f"embedding shapes differ: {tuple(image_embeds.shape)} vs {tuple(text_embeds.shape)}")
    a = image_embeds.double()
    b = text_embeds.double()
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))


def _resolve_model_dir(model_dir: str | os.PathLike | None) -> Path:
    source = model_dir or os.environ.get(CLIP_ENV)
    if not source:
        raise FileNotFoundError(
            f"no CLIP weights given: pass model_dir=/path/to/clip (a transformers CLIPModel directory, e.g. a "
            f"local copy of openai/clip-vit-large-patch14) or set {CLIP_ENV}")
    path = Path(source).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"CLIP model directory {path} has no config.json: it must hold a transformers CLIPModel "
            f"(config.json, weights, tokenizer and preprocessor files), e.g. saved with save_pretrained()")
    return path


def _import_transformers():
    try:
        import transformers
    except ImportError as err:
        raise ImportError("CLIP score needs the `transformers` package: pip install transformers") from err
    return transformers


class ClipScorer:
    """A CLIP model loaded once from a local directory; call it with (images, prompts)."""

    def __init__(self, model_dir: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                 batch_size: int = 32):
        transformers = _import_transformers()
        self.model_dir = _resolve_model_dir(model_dir)
        self.name = f"clip:{self.model_dir.name}"
        self.device = torch.device(device)
        self.batch_size = batch_size
        try:
            self.model = transformers.CLIPModel.from_pretrained(str(self.model_dir), local_files_only=True)
            self.processor = transformers.CLIPProcessor.from_pretrained(str(self.model_dir), local_files_only=True)
        except OSError as err:
            raise FileNotFoundError(f"cannot load CLIP from {self.model_dir}: {err}") from err
        self.model = self.model.to(self.device).eval()

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor | Sequence[torch.Tensor], prompts: Sequence[str]) -> np.ndarray:
        images = list(images)
        prompts = list(prompts)
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        scores = []
        for start in range(0, len(images), self.batch_size):
            imgs = [img.permute(1, 2, 0).cpu().numpy() for img in images[start:start + self.batch_size]]
            inputs = self.processor(text=prompts[start:start + self.batch_size], images=imgs, return_tensors="pt",
                                    padding=True, truncation=True)
            inputs = {k: v.to(self.device) for k, v in inputs.items()}
            out = self.model(**inputs)
            scores.append(clip_cosine(out.image_embeds, out.text_embeds).cpu())
        return torch.cat(scores).numpy()


def clip_score(images: torch.Tensor | Sequence[torch.Tensor], prompts: Sequence[str],
               model_dir: str | os.PathLike | None = None, device: str | torch.device = "cpu",
               batch_size: int = 32) -> np.ndarray:
    """Raw CLIP cosine similarity per (uint8 ``[3, H, W]`` image, prompt) pair, float64 ``[N]``."""
    return ClipScorer(model_dir, device, batch_size)(images, prompts)
