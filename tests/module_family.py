"""A plain-module denoiser defined in the tests (not a built-in family): a tiny class-conditional conv net
with its own deterministic sampler and metric, registered through the public protocol only.

``FAMILY`` uses a feature FID against random reference digits; ``CALLABLE_FAMILY`` a callable metric scored
against the FP images. Import it (or pass ``--family tests.module_family:FAMILY``) to use it.
"""
from __future__ import annotations

import torch
from torch import nn

from multiquant.families import FamilySpec, register_family
from multiquant.metrics import CallableMetric, FeatureFID

SIZE = 8
STEPS = 3


class ToyDenoiser(nn.Module):
    """eps(x_t, t, y): conv in, time MLP and label embedding added per channel, conv out."""

    def __init__(self, width: int = 8, num_classes: int = 4):
        super().__init__()
        self.time_mlp = nn.Sequential(nn.Linear(1, width), nn.SiLU(), nn.Linear(width, width))
        self.label_emb = nn.Embedding(num_classes, width)
        self.conv_in = nn.Conv2d(1, width, 3, padding=1)
        self.block = nn.Sequential(nn.Conv2d(width, width, 3, padding=1, groups=2), nn.SiLU(), nn.Conv2d(width, width, 1))
        self.conv_out = nn.Conv2d(width, 1, 3, padding=1)

    def forward(self, x, t, y):
        h = self.conv_in(x) + (self.time_mlp(t.to(x.dtype).reshape(-1, 1) / 1000) + self.label_emb(y))[:, :, None, None]
        return self.conv_out(h + self.block(h))


def sample(model, conditions, seeds):
    """A few deterministic DDIM-like steps from per-image seeded noise -> uint8 [N, 1, SIZE, SIZE]."""
    p = next(model.parameters())
    x = torch.stack([torch.randn(1, SIZE, SIZE, generator=torch.Generator().manual_seed(s)) for s in seeds])
    x = x.to(p.device, p.dtype)
    y = torch.tensor(conditions, device=p.device)
    for t in torch.linspace(900, 100, STEPS):
        x = x - 0.3 * model(x, torch.full((len(seeds),), float(t), device=p.device), y)
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


class PoolFeatures(nn.Module):
    """A tiny fixed feature network: 2x2-pooled pixels and a random projection."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.register_buffer("proj", torch.randn(16, 6, generator=gen))

    def forward(self, x):
        return nn.functional.avg_pool2d(x, 2).flatten(1) @ self.proj


REFERENCE = torch.randint(0, 256, (32, 1, SIZE, SIZE), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)


def _example_inputs(model, batch):
    p = next(model.parameters())
    return {"x": torch.randn(batch, 1, SIZE, SIZE, device=p.device, dtype=p.dtype),
            "t": torch.full((batch,), 500.0, device=p.device), "y": torch.arange(batch, device=p.device) % 4}


def mean_abs_diff(images, fp_images):
    return (images.float() - fp_images.float()).abs().mean()


FAMILY = register_family(FamilySpec(
    name="tests_toy", factory=lambda size: ToyDenoiser(8 if size == "tiny" else 12), fp_prec=32,
    conditioning="class", num_classes=4, num_images=8, resolution=SIZE, steps=STEPS, sampler=sample,
    metric=FeatureFID(PoolFeatures(), reference_images=REFERENCE, name="toy-FID"),
    example_inputs=_example_inputs), overwrite=True)

CALLABLE_FAMILY = register_family(FamilySpec(
    name="tests_toy_callable", factory=FAMILY.factory, fp_prec=32, conditioning="class", num_classes=4,
    num_images=8, resolution=SIZE, steps=STEPS, sampler=sample,
    metric=CallableMetric(mean_abs_diff, name="mean-abs-diff-vs-fp", needs_fp=True),
    example_inputs=_example_inputs), overwrite=True)

# the same denoiser, declaring both half precisions unsafe (what a family whose activations overflow in fp16 does)
FP32_ONLY_FAMILY = register_family(FamilySpec(
    name="tests_toy_fp32_only", factory=FAMILY.factory, fp_prec=32, conditioning="class", num_classes=4,
    num_images=8, resolution=SIZE, steps=STEPS, sampler=sample, metric=FAMILY.metric, example_inputs=_example_inputs,
    unsafe_dtypes={"float16": "its activations overflow float16", "bfloat16": "trained and validated in float32"}),
    overwrite=True)
