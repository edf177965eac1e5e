"""Pictures people look at: sample grids (more plots live with the analyses that make them)."""
from __future__ import annotations

from pathlib import Path

import torch


def image_grid(images: torch.Tensor, nrow: int | None = None, pad: int = 2) -> torch.Tensor:
    """uint8 [N, C, H, W] -> one uint8 [C, H', W'] grid image (white padding)."""
    n, c, h, w = images.shape
    nrow = nrow or max(1, int(round(n ** 0.5)))
    rows = -(-n // nrow)
    grid = torch.full((c, rows * (h + pad) + pad, nrow * (w + pad) + pad), 255, dtype=torch.uint8)
    for i, img in enumerate(images):
        r, col = divmod(i, nrow)
        grid[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = img
    return grid


MIN_TILE_PX = 112  # small samples (28 px digits) are upscaled to at least this size so the grid is legible


def save_image_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None, scale: int | None = None,
                    pad: int = 2) -> Path:
    """Write a grid PNG (atomically); ``scale`` (nearest-neighbour) defaults to the smallest integer factor that
    makes each tile at least :data:`MIN_TILE_PX` pixels high; ``pad=0`` butts the tiles together."""
    from PIL import Image

    from .utils import atomic_path

    if scale is None:
        scale = max(1, -(-MIN_TILE_PX // max(1, int(images.shape[-2]))))

    grid = image_grid(images, nrow, pad)
    arr = grid.permute(1, 2, 0).numpy()
    img = Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, "sample grid") as tmp:
        img.save(tmp, format="PNG")
    return path
