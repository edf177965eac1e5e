"""Reference statistics (mu, sigma) computed once per (reference set, feature network) and cached on disk.

The reference set of a protocol (COCO val2017, ImageNet val, MNIST test...) never changes between
configurations, so its Inception statistics are computed once and stored as
``<STATS_CACHE_DIR>/<ref_id>__<feature name>.npz`` (atomic write). The generated images of each
configuration then only cost their own features.
"""
from __future__ import annotations

import hashlib
import io
import os
import re
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from .fid import feature_stats

__all__ = ["reference_stats", "stats_cache_path", "load_cached_stats", "extract_features", "iter_image_folder",
           "IMAGE_EXTENSIONS"]

IMAGE_EXTENSIONS = ("bmp", "jpg", "jpeg", "pgm", "png", "ppm", "tif", "tiff", "webp")  # clean-fid's list, lowercase


def _safe_name(text: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "x"
    if cleaned != text:  # keep distinct ids distinct after cleaning
        cleaned += "-" + hashlib.sha1(text.encode()).hexdigest()[:8]
    return cleaned


def stats_cache_path(ref_id: str, feature_name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the statistics of (reference set ``ref_id``, feature network ``feature_name``) live."""
    if cache_dir is None:
        from multiquant.paths import constants

        cache_dir = constants.STATS_CACHE_DIR
    return Path(cache_dir) / f"{_safe_name(ref_id)}__{_safe_name(feature_name)}.npz"


def load_cached_stats(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray] | None:
    """(mu, sigma) from a stats file, or None when it does not exist."""
    path = Path(path)
    if not path.exists():
        return None
    with np.load(path, allow_pickle=False) as data:
        return data["mu"].astype(np.float64), data["sigma"].astype(np.float64)


def extract_features(feature_net, images) -> np.ndarray:
    """Features of ``images``: a uint8 tensor / list of uint8 tensors, or an iterable of such batches."""
    if isinstance(images, torch.Tensor) or (isinstance(images, list) and images and isinstance(images[0], torch.Tensor)
                                            and images[0].ndim == 3):
        return feature_net(images)
    chunks = [feature_net(batch) for batch in images]
    if not chunks:
        raise ValueError("the reference image source yielded no images")
    return np.concatenate(chunks)


def reference_stats(ref_id: str, feature_net, images_fn: Callable[[], object],
                    cache_dir: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of the reference set ``ref_id`` under ``feature_net``, computed at most once.

    ``images_fn()`` is only called on a cache miss; it returns the reference images (see
    :func:`extract_features`), e.g. ``lambda: iter_image_folder(constants.COCO_2017_IMAGES)``.
    The cache key is (``ref_id``, ``feature_net.name``): give different reference sets different ids."""
    from ..utils import atomic_write_bytes

    path = stats_cache_path(ref_id, feature_net.name, cache_dir)
    cached = load_cached_stats(path)
    if cached is not None:
        return cached
    feats = extract_features(feature_net, images_fn())
    mu, sigma = feature_stats(feats)
    buf = io.BytesIO()
    np.savez(buf, mu=mu, sigma=sigma, num_images=np.int64(feats.shape[0]), ref_id=np.str_(ref_id),
             feature_net=np.str_(feature_net.name))
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buf.getvalue(), what="reference statistics")
    return mu, sigma


def iter_image_folder(folder: str | os.PathLike, batch_size: int = 64,
                      limit: int | None = None) -> Iterator[list[torch.Tensor]]:
    """Images of a folder (recursive, sorted paths, as clean-fid lists them) as batches of uint8 RGB
    ``[3, H, W]`` tensors of their original sizes."""
    from PIL import Image

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"reference image folder {folder} does not exist")
    files = sorted(str(p) for p in folder.rglob("*") if p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS)
    if limit is not None:
        files = files[:limit]
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {folder}")
    batch = []
    for f in files:
        with Image.open(f) as img:
            batch.append(torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1).contiguous())
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch

