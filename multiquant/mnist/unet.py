"""The embedded ``mnist_unet`` testbed: a plain PyTorch class-conditional U-Net DDPM on 28x28 digits.

Written the way a user brings their own denoiser: an ordinary ``nn.Module`` (no diffusers class), its own
noise schedule and its own ancestral DDPM sampler. The family (``multiquant/families/mnist_unet.py``)
registers it through the public family protocol only.

* :class:`MNISTUNet`: ResBlocks (GroupNorm-SiLU-conv, with a time projection and a label projection each),
  a down path 28 -> 14 -> 7, a middle block, an up path with channel-concatenated skips.
* :class:`DDPMSampler`: ``sampler(model, labels, seeds) -> uint8 [N, 1, 28, 28]``: ancestral DDPM on a
  strided subset of the 1,000 training timesteps. Every random number an image uses (its starting noise
  and the noise of each step) comes from ``torch.Generator("cpu").manual_seed(seed)`` of that image alone,
  so an image does not depend on the batch, its neighbours or the quantization configuration.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..utils import to_uint8
from .data import MODEL_RANGE

# Training noise process: the classic DDPM one (linear betas, epsilon prediction).
NOISE_SCHEDULE = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                      prediction_type="epsilon")


def alphas_cumprod(num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,
                   **_) -> torch.Tensor:
    """float64 cumulative products of (1 - beta_t) of the linear schedule, ``[T]``."""
    betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
    return torch.cumprod(1.0 - betas, dim=0)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal embedding ``[N, dim]`` of (float) timesteps ``[N]``."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv3x3, + time and label projections, GroupNorm-SiLU-dropout-conv3x3, residual."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, groups: int, dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(min(groups, in_ch), in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.time_proj = nn.Linear(emb_dim, out_ch)
        self.label_proj = nn.Linear(emb_dim, out_ch)
        self.norm2 = nn.GroupNorm(min(groups, out_ch), out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, t_emb: torch.Tensor, y_emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + (self.time_proj(t_emb) + self.label_proj(y_emb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return h + self.skip(x)


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MNISTUNet(nn.Module):
    """Class-conditional U-Net for 28x28 single-channel images: ``forward(x, timesteps, labels) -> epsilon``.

    ``channels[i]`` is the width at resolution ``28 / 2**i``; one ResBlock per level on the way down, one
    per level (fed with the matching skip) on the way up, one in the middle."""

    def __init__(self, channels: tuple[int, ...] = (32, 64, 64), emb_dim: int = 128, num_classes: int = 10,
                 in_channels: int = 1, groups: int = 8, dropout: float = 0.1, image_size: int = 28):
        super().__init__()
        self.config = dict(channels=list(channels), emb_dim=emb_dim, num_classes=num_classes,
                           in_channels=in_channels, groups=groups, dropout=dropout, image_size=image_size)
        self.in_channels, self.image_size, self.num_classes = in_channels, image_size, num_classes
        self.time_embed = nn.Sequential(nn.Linear(channels[0], emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label_embed = nn.Embedding(num_classes, emb_dim)
        self.conv_in = nn.Conv2d(in_channels, channels[0], 3, padding=1)
        self.down_blocks = nn.ModuleList()
        self.downsamples = nn.ModuleList()
        prev = channels[0]
        for level, ch in enumerate(channels):
            self.down_blocks.append(ResBlock(prev, ch, emb_dim, groups, dropout))
            prev = ch
            if level < len(channels) - 1:
                self.downsamples.append(Downsample(ch))
        self.mid_block = ResBlock(prev, prev, emb_dim, groups, dropout)
        self.up_blocks = nn.ModuleList()
        self.upsamples = nn.ModuleList()
        for level in reversed(range(len(channels))):
            ch = channels[level]
            self.up_blocks.append(ResBlock(prev + ch, ch, emb_dim, groups, dropout))
            prev = ch
            if level > 0:
                self.upsamples.append(Upsample(ch))
        self.norm_out = nn.GroupNorm(min(groups, prev), prev)
        self.conv_out = nn.Conv2d(prev, in_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)  # start as "predict zero noise": a stable first step
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        dtype = self.conv_in.weight.dtype
        t_emb = F.silu(self.time_embed(timestep_embedding(timesteps, self.time_embed[0].in_features).to(dtype)))
        y_emb = F.silu(self.label_embed(labels))
        h = self.conv_in(x.to(dtype))
        skips = []
        for level, block in enumerate(self.down_blocks):
            h = block(h, t_emb, y_emb)
            skips.append(h)
            if level < len(self.downsamples):
                h = self.downsamples[level](h)
        h = self.mid_block(h, t_emb, y_emb)
        for i, block in enumerate(self.up_blocks):
            h = block(torch.cat([h, skips.pop()], dim=1), t_emb, y_emb)
            if i < len(self.upsamples):
                h = self.upsamples[i](h)
        return self.conv_out(F.silu(self.norm_out(h)))


def example_inputs(model: MNISTUNet, batch: int = 2) -> dict:
    """Forward kwargs of one denoiser call (for tracing / FLOP counting)."""
    device = next(model.parameters()).device
    size = model.image_size
    return dict(x=torch.randn(batch, model.in_channels, size, size, device=device),
                timesteps=torch.linspace(0, 999, batch, device=device).round(),
                labels=torch.arange(batch, device=device) % model.num_classes)


# --- sampler ----------------------------------------------------------------------------------------
def strided_timesteps(steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """``steps`` evenly spaced training timesteps ending at T-1 ("trailing"), in sampling order (T-1 first)."""
    if not 1 <= steps <= num_train_timesteps:
        raise ValueError(f"steps must be in [1, {num_train_timesteps}], got {steps}")
    stride = num_train_timesteps / steps
    return [int(round(stride * (i + 1))) - 1 for i in reversed(range(steps))]


@dataclass
class DDPMSampler:
    """Ancestral DDPM on ``steps`` strided timesteps (respaced betas), x0 clipped to [-1, 1].

    ``variance="small"`` uses the posterior variance beta_tilde, ``"large"`` the respaced beta (DDPM's two
    choices). ``batch_size`` bounds memory only: every image's numbers come from its own seed."""

    steps: int = 50
    variance: str = "small"
    # memory bounds only (an image never depends on them): left out of the repr that runs record
    batch_size: int = field(default=1000, repr=False)
    noise_cache_images: int = field(default=4096, repr=False)

    def __post_init__(self):
        if self.variance not in ("small", "large"):
            raise ValueError(f"variance must be 'small' or 'large', got {self.variance!r}")
        self.timesteps = strided_timesteps(self.steps, NOISE_SCHEDULE["num_train_timesteps"])
        ab = alphas_cumprod(**NOISE_SCHEDULE)
        ab_t = ab[self.timesteps]
        ab_prev = torch.cat([ab_t[1:], torch.ones(1, dtype=torch.float64)])
        beta = 1.0 - ab_t / ab_prev
        sigma2 = beta * (1.0 - ab_prev) / (1.0 - ab_t) if self.variance == "small" else beta
        # per step: x0 from eps, posterior mean coefficients, noise scale (float64 -> float32 once)
        self._coef = [dict(sqrt_ab=float(ab_t[i].sqrt()), sqrt_1mab=float((1 - ab_t[i]).sqrt()),
                           c_x0=float(ab_prev[i].sqrt() * beta[i] / (1 - ab_t[i])),
                           c_xt=float((1 - beta[i]).sqrt() * (1 - ab_prev[i]) / (1 - ab_t[i])),
                           sigma=float(sigma2[i].sqrt()) if i < self.steps - 1 else 0.0)
                      for i in range(self.steps)]
        self._noise_cache: dict[tuple, torch.Tensor] = {}

    def describe(self) -> dict:
        return dict(sampler="ancestral DDPM", steps=self.steps, variance=self.variance,
                    timesteps=f"trailing stride {NOISE_SCHEDULE['num_train_timesteps'] / self.steps:g}",
                    noise_schedule=NOISE_SCHEDULE, clip_x0=True,
                    seed_rule="image i: torch.Generator('cpu').manual_seed(seeds[i]) draws randn(steps + 1, 1, 28, 28)"
                              " (row 0: start, row k: step k)")

    def image_noise(self, seeds: list[int], shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """``[steps + 1, N, *shape]`` noise; image ``i``'s column depends on ``seeds[i]`` only.

        Every configuration of a dataset renders the same seeds, so each seed's noise is drawn once and kept
        on the device (up to ``noise_cache_images`` images, oldest dropped first)."""
        cache, columns = self._noise_cache, []
        for s in seeds:
            key = (int(s), tuple(shape), str(device))
            if key not in cache:
                g = torch.Generator("cpu").manual_seed(int(s))
                cache[key] = torch.randn((self.steps + 1, *shape), generator=g).to(device)
                while len(cache) > self.noise_cache_images:
                    cache.pop(next(iter(cache)))
            columns.append(cache[key])
        return torch.stack(columns, dim=1)

    @torch.no_grad()
    def __call__(self, model: nn.Module, labels, seeds) -> torch.Tensor:
        labels = torch.as_tensor(np.asarray(labels), dtype=torch.long).flatten()
        seeds = [int(s) for s in np.asarray(seeds).flatten()]
        if len(seeds) != len(labels):
            raise ValueError(f"got {len(labels)} labels but {len(seeds)} seeds: give one seed per image")
        chunks = [self._sample(model, labels[i:i + self.batch_size], seeds[i:i + self.batch_size])
                  for i in range(0, len(labels), self.batch_size)]
        return torch.cat(chunks) if chunks else torch.empty(0, 1, 28, 28, dtype=torch.uint8)

    def _sample(self, model: nn.Module, labels: torch.Tensor, seeds: list[int]) -> torch.Tensor:
        param = next(model.parameters())
        device, dtype = param.device, param.dtype
        shape = (model.in_channels, model.image_size, model.image_size)
        noise = self.image_noise(seeds, shape, device)
        labels = labels.to(device)
        x = noise[0].clone()
        for i, (t, c) in enumerate(zip(self.timesteps, self._coef)):
            t_batch = torch.full((len(labels),), float(t), device=device)
            eps = model(x.to(dtype), t_batch, labels).float()
            x0 = ((x - c["sqrt_1mab"] * eps) / c["sqrt_ab"]).clamp(-1.0, 1.0)
            x = c["c_x0"] * x0 + c["c_xt"] * x
            if c["sigma"] > 0:
                x = x + c["sigma"] * noise[i + 1]
        return to_uint8(x, MODEL_RANGE)
