"""Bring your own denoiser: a plain nn.Module, its own sampler and its own metric."""
import torch
from torch import nn

from multiquant.families import FamilySpec, register_family
from multiquant.metrics import FeatureFID


class MyDenoiser(nn.Module):  # eps(x_t, t, y) of a class-conditional 16x16 DDPM
    def __init__(self, width=32):
        super().__init__()
        self.time_mlp = nn.Sequential(nn.Linear(1, width), nn.SiLU(), nn.Linear(width, width))
        self.label_emb = nn.Embedding(10, width)
        self.conv_in, self.conv_out = nn.Conv2d(1, width, 3, padding=1), nn.Conv2d(width, 1, 3, padding=1)
        self.mid = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.SiLU(), nn.Conv2d(width, width, 1))

    def forward(self, x, t, y):
        h = self.conv_in(x) + (self.time_mlp(t[:, None] / 1000) + self.label_emb(y))[:, :, None, None]
        return self.conv_out(h + self.mid(h))


@torch.no_grad()
def sample(model, conditions, seeds, steps=10):  # deterministic DDIM from per-image seeded noise
    p = next(model.parameters())
    x = torch.stack([torch.randn(1, 16, 16, generator=torch.Generator().manual_seed(s)) for s in seeds]).to(p)
    y, abar = torch.tensor(conditions, device=p.device), torch.cos(torch.linspace(0, 1.5, 1000)) ** 2
    ts = torch.linspace(999, 0, steps + 1).long()
    for t, s in zip(ts[:-1], ts[1:]):
        eps = model(x, t.to(p).expand(len(x)), y)
        x0 = ((x - (1 - abar[t]).sqrt() * eps) / abar[t].sqrt()).clamp(-1, 1)
        x = abar[s].sqrt() * x0 + (1 - abar[s]).sqrt() * eps
    return ((x0 + 1) * 127.5).round().to(torch.uint8).cpu()


def features(images):  # any images -> [N, D] features; here 4x4-pooled pixels
    return nn.functional.avg_pool2d(images.float() / 255, 4).flatten(1)


FAMILY = register_family(FamilySpec(
    name="my_denoiser", factory=lambda size: MyDenoiser(16 if size == "tiny" else 32), weights="my_denoiser.pt",
    sampler=sample, num_classes=10, conditioning="class", resolution=16, steps=10, num_images=100, fp_prec=32,
    metric=FeatureFID(features, reference_images=lambda: torch.load("real_digits.pt", weights_only=True), name="FID-pooled"),
    example_inputs=lambda m, n: {"x": torch.randn(n, 1, 16, 16), "t": torch.rand(n) * 999, "y": torch.arange(n) % 10}),
    overwrite=True)
