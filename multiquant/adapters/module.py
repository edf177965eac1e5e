"""The "module" adapter: a plain ``nn.Module`` family that brings its own sampler and metric.

The family gives ``factory`` (+ ``weights``) or ``loader`` (how to load), ``sampler(model, conditions, seeds)
-> uint8 [N, C, H, W]`` (deterministic per image seed), optionally ``conditions(n)`` and ``metric``. Image
``i`` of a run is rendered with seed ``seed_for(run_seed, i)`` and condition ``i``, in batches of any size.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import UserError, user_code
from ..seeds import SEED_RULE, checked_indices, seed_for
from .base import Adapter, SamplerOptions

DEFAULT_BATCH_SIZE = 64


def user_code_settings(spec) -> dict:
    """``{"user_code": digest}`` for a plain-module family: the SHA-256 of the source files that define its
    sampler, conditions and metric (their content, not their path). A run records it, so that a resume after the
    user edited their sampler or metric (same names, other numbers) is refused instead of mixing labels
    (store.ADDED_RUN_KEYS: runs written before it resume). Whole files: a helper the sampler calls counts too."""
    import hashlib
    import inspect

    if not spec.is_module:
        return {}
    metric = spec.metric
    parts = [spec.sampler, spec.conditions, getattr(metric, "fn", None), getattr(metric, "feature_net", None)]
    contents = set()
    for part in parts:
        if part is None:
            continue
        target = part if inspect.isroutine(part) or inspect.isclass(part) else type(part)
        try:
            source = inspect.getsourcefile(target)
        except TypeError:  # a builtin: no source of the user's
            continue
        if source and Path(source).is_file():
            contents.add(hashlib.sha256(Path(source).read_bytes()).hexdigest())
    if not contents:
        return {}
    return {"user_code": hashlib.sha256("".join(sorted(contents)).encode()).hexdigest()[:16]}


class ModuleSampler:
    """Renders images ``indices`` of a fixed image set with the user's sampler and the model's current weights."""

    def __init__(self, spec, model: nn.Module, conditions: list, seed: int, batch_size: int):
        if spec.sampler is None:
            raise UserError(f"family {spec.name!r} is a plain module family without a sampler: set "
                            f"FamilySpec(sampler=fn) with fn(model, conditions, seeds) -> uint8 [N, C, H, W]")
        if batch_size < 1:
            raise UserError(f"--batch_size must be >= 1, got {batch_size}")
        self.family, self.pipe, self.conditions = spec, model, list(conditions)
        self.seed, self.batch_size = int(seed), int(batch_size)

    @property
    def num_images(self) -> int:
        return len(self.conditions)

    @property
    def settings(self) -> dict:
        fn = self.family.sampler
        return {"family": self.family.name, "pipeline": None, "sampler": getattr(fn, "__qualname__", repr(fn)),
                "seed": self.seed, "seed_rule": SEED_RULE, "batch_size": self.batch_size,
                "num_images": self.num_images, "conditioning": self.family.conditioning,
                "steps": self.family.steps, "resolution": self.family.resolution,
                "dtype": str(next(self.pipe.parameters()).dtype).replace("torch.", "")}

    @torch.no_grad()
    def _render(self, indices: list[int]) -> torch.Tensor:
        conditions = [self.conditions[i] for i in indices]
        with user_code(f"family {self.family.name!r}: its sampler"):
            images = self.family.sampler(self.pipe, conditions, [seed_for(self.seed, i) for i in indices])
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.ndim != 4 \
                or images.shape[0] != len(indices):
            got = f"{type(images).__name__} {getattr(images, 'dtype', '')} {tuple(getattr(images, 'shape', ()))}"
            raise UserError(f"family {self.family.name!r}: sampler must return a uint8 tensor "
                            f"[{len(indices)}, C, H, W] for {len(indices)} seeds, got {got}")
        return images.cpu()

    def generate(self, indices) -> torch.Tensor:
        return torch.cat(list(self.batches(indices)))

    def batches(self, indices):
        """The images of :meth:`generate`, one uint8 batch at a time as each is rendered."""
        indices = checked_indices(indices, self.num_images)
        for start in range(0, len(indices), self.batch_size):
            yield self._render(indices[start:start + self.batch_size])

    __call__ = generate


class ModuleAdapter(Adapter):
    kind = "module"

    def load(self, spec, pretrained, device, dtype=None):
        dtype = dtype or (spec.dtype if torch.device(device).type == "cuda" else torch.float32)
        return spec.load(pretrained, dtype=dtype, device=device)

    def tiny(self, spec, device, seed: int = 0):
        return spec.build("tiny", device=device, seed=seed)

    def denoiser(self, pipe) -> nn.Module:
        return pipe

    def with_denoiser(self, pipe, denoiser):
        return denoiser

    def pipeline_with(self, spec, denoiser, pretrained=None, device=None, tiny: bool = False):
        return denoiser  # a plain module is its own generator: nothing else to load

    def conditions(self, spec, n: int, tiny: bool = False, coco_path=None) -> list:
        return spec.default_conditions(n)

    def sampler(self, spec, pipe, conditions, options: SamplerOptions, tiny: bool = False):
        batch_size = options.batch_size or spec.batch_size or DEFAULT_BATCH_SIZE
        return ModuleSampler(spec, pipe, conditions, options.seed, batch_size)

    def counts_macs(self, spec) -> bool:
        return spec.example_inputs is not None  # no forward to count MACs with: BOPs stay NaN (nothing else needs them)
