"""Full-reference proxy metrics: quantized-model images vs the FP model's images for the same seeds.

Cheap to compute and low-variance at small N (common random numbers), so they rank configurations
with far fewer images than FID. All functions take two image batches ``[N, C, H, W]`` of equal
shape (uint8 with data range 255, or float with ``data_range``, default 1.0) and return one value
per image as a float64 CPU tensor ``[N]``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["mse", "psnr", "ssim", "gaussian_window"]


def _check_pair(a: torch.Tensor, b: torch.Tensor, data_range: float | None) -> float:
    if a.shape != b.shape:
        raise ValueError(f"image batches differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.ndim != 4:
        raise ValueError(f"images must be [N, C, H, W], got {tuple(a.shape)}")
    if data_range is None:
        return 255.0 if a.dtype == torch.uint8 else 1.0
    return float(data_range)


def _chunks(n: int, batch_size: int):
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


def mse(a: torch.Tensor, b: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Mean squared error per image, in the images' own units (0..255 for uint8)."""
    _check_pair(a, b, 1.0)
    out = [(a[s].double() - b[s].double()).pow(2).flatten(1).mean(1).cpu() for s in _chunks(a.shape[0], batch_size)]
    return torch.cat(out)


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float | None = None, batch_size: int = 64) -> torch.Tensor:
    """Peak signal-to-noise ratio per image in dB (``inf`` for identical images)."""
    peak = _check_pair(a, b, data_range)
    err = mse(a, b, batch_size)
    return 10.0 * torch.log10(peak * peak / err)


def gaussian_window(size: int = 11, sigma: float = 1.5, dtype=torch.float64) -> torch.Tensor:
    """Normalised 1-D Gaussian window (SSIM uses its outer product)."""
    x = torch.arange(size, dtype=dtype) - (size - 1) / 2
    w = torch.exp(-x * x / (2 * sigma * sigma))
    return w / w.sum()


def _blur(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    # Separable 'valid' Gaussian filter per channel: rows, then columns.
    c = x.shape[1]
    k = w.numel()
    x = F.conv2d(x, w.view(1, 1, 1, k).expand(c, 1, 1, k), groups=c)
    return F.conv2d(x, w.view(1, 1, k, 1).expand(c, 1, k, 1), groups=c)


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float | None = None, window: int = 11, sigma: float = 1.5,
         k1: float = 0.01, k2: float = 0.03, batch_size: int = 32, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Structural similarity per image (Wang et al. 2004): Gaussian window 11 / sigma 1.5, 'valid'
    filtering (no padding), mean over channels and positions."""
    peak = _check_pair(a, b, data_range)
    if min(a.shape[-2:]) < window:  # small images: the largest odd window that fits (sigma scaled along)
        fitted = min(a.shape[-2:]) - (1 - min(a.shape[-2:]) % 2)
        if fitted < 3:
            raise ValueError(f"images of {tuple(a.shape[-2:])} are too small for SSIM (need at least 3x3)")
        window, sigma = fitted, sigma * fitted / window
    c1 = (k1 * peak) ** 2
    c2 = (k2 * peak) ** 2
    w = gaussian_window(window, sigma, dtype).to(a.device)
    out = []
    for s in _chunks(a.shape[0], batch_size):
        x = a[s].to(dtype)
        y = b[s].to(dtype)
        mu_x, mu_y = _blur(x, w), _blur(y, w)
        var_x = _blur(x * x, w) - mu_x * mu_x
        var_y = _blur(y * y, w) - mu_y * mu_y
        cov = _blur(x * y, w) - mu_x * mu_y
        ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2))
        out.append(ssim_map.flatten(1).mean(1).double().cpu())
    return torch.cat(out)

