"""A plain-module denoiser unlike the testbeds and tests/module_family.py: unconditional, RGB, one depthwise conv
called twice in a forward (shared weights), 1x1 convs, a Conv1d over tokens, attention written with matmuls,
Linear(1, C) and Linear(C, 1), GroupNorm / LayerNorm; its own few-step DDIM sampler and a callable metric of
its own (a colour-statistics distance to fixed target statistics, not scored against the FP images).

``FAMILY`` is the denoiser; ``LOADER_FAMILY`` the same module given by a loader only (no factory); ``NO_LAYERS`` a
family whose model has no quantizable layer (a user mistake).
Import it, or pass ``--family path/to/shared_weights_family.py:FAMILY``.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from multiquant.families import FamilySpec
from multiquant.metrics import CallableMetric

SIZE = 6
TIMESTEPS = (999, 600, 200, 0)


class SharedWeightsDenoiser(nn.Module):
    """eps(x_t, t): 1x1 stem + time, a depthwise conv used twice, matmul attention, a Conv1d, a scalar gate."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.c = c
        self.stem = nn.Conv2d(3, c, 1)
        self.t_in = nn.Linear(1, c)
        self.t_hidden = nn.Linear(c, c)
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.pw = nn.Conv2d(c, c, 1)
        self.gn = nn.GroupNorm(2, c)
        self.ln = nn.LayerNorm(c)
        self.qkv = nn.Linear(c, 3 * c, bias=False)
        self.attn_out = nn.Linear(c, c)
        self.seq = nn.Conv1d(c, c, 3, padding=1)
        self.gate = nn.Linear(c, 1)
        self.head = nn.Conv2d(c, 3, 1)

    def forward(self, x, t):
        n, _, h, w = x.shape
        z = self.stem(x) + self.t_hidden(torch.sin(self.t_in(t.to(x.dtype).reshape(-1, 1) / 1000)))[:, :, None, None]
        z = z + self.pw(nn.functional.silu(self.dw(self.gn(z))))
        z = self.dw(z)  # the same depthwise conv again: shared weights
        tok = self.ln(z.flatten(2).transpose(1, 2))
        q, k, v = self.qkv(tok).chunk(3, dim=-1)
        tok = tok + self.attn_out(torch.softmax(q @ k.transpose(1, 2) / math.sqrt(self.c), dim=-1) @ v)
        tok = tok + self.seq(tok.transpose(1, 2)).transpose(1, 2)
        tok = tok * torch.sigmoid(self.gate(tok))
        # z and x only lend their shape: no data of theirs reaches the head
        return self.head(tok.transpose(1, 2).reshape_as(z)) + torch.zeros_like(x)


@torch.no_grad()
def ddim(model, conditions, seeds):
    """Deterministic DDIM over TIMESTEPS from per-image seeded noise -> uint8 [N, 3, SIZE, SIZE]."""
    p = next(model.parameters())
    x = torch.stack([torch.randn(3, SIZE, SIZE, generator=torch.Generator().manual_seed(int(s))) for s in seeds])
    x, abar = x.to(p.device, p.dtype), torch.linspace(0.9999, 0.01, 1000) ** 1.5
    for t, s in zip(TIMESTEPS[:-1], TIMESTEPS[1:]):
        eps = model(x, torch.full((len(x),), float(t), device=p.device))
        x0 = ((x - (1 - abar[t]).sqrt() * eps) / abar[t].sqrt()).clamp(-1, 1)
        x = abar[s].sqrt() * x0 + (1 - abar[s]).sqrt() * eps
    return ((x0.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).cpu()


def colour_stats(images: torch.Tensor) -> torch.Tensor:
    """Per-channel mean and standard deviation of the pixels, averaged over the batch."""
    f = images.double() / 255
    return torch.cat([f.mean((2, 3)), f.std((2, 3))], 1).mean(0)


TARGET = colour_stats(torch.randint(0, 256, (32, 3, SIZE, SIZE), generator=torch.Generator().manual_seed(7),
                                    dtype=torch.uint8))


def colour_distance(images: torch.Tensor) -> float:
    return float((colour_stats(images) - TARGET).norm() * 100)


def example_inputs(model, n):
    p = next(model.parameters())
    return {"x": torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(n)).to(p.device, p.dtype),
            "t": torch.linspace(0, 999, n, device=p.device)}


FAMILY = FamilySpec(
    name="tests_shared_weights", factory=lambda size: SharedWeightsDenoiser(8 if size == "tiny" else 16),
    sampler=ddim, resolution=SIZE, steps=len(TIMESTEPS) - 1, num_images=8, fp_prec=32,
    metric=CallableMetric(colour_distance, name="colour-distance"), example_inputs=example_inputs)


def load_seeded(pretrained, device, dtype):
    """A loader (no factory): what a user gives when their weights come from their own code."""
    torch.manual_seed(3)
    return SharedWeightsDenoiser(8).to(device, dtype)


LOADER_FAMILY = FamilySpec(
    name="tests_shared_weights_loader", loader=load_seeded, sampler=ddim, resolution=SIZE, steps=len(TIMESTEPS) - 1,
    num_images=8, fp_prec=32, metric=FAMILY.metric, example_inputs=example_inputs)


class NoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.GroupNorm(1, 3)

    def forward(self, x, t):
        return self.norm(x)


NO_LAYERS = FamilySpec(name="tests_no_layers", factory=lambda size: NoLayers(), sampler=ddim, resolution=SIZE,
                       steps=3, num_images=4, fp_prec=32, metric=FAMILY.metric, example_inputs=example_inputs)
