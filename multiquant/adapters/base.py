"""The adapter protocol: everything the scorer needs to know about one pipeline kind.

An adapter loads a family's generation object ("pipe": a diffusers pipeline, or the plain module itself),
names its denoiser, fixes the conditions of an image set, builds the sampler that renders images
``indices`` with the denoiser's current weights, gives the family's metric and example denoiser inputs. The scorer
(:mod:`multiquant.evaluate`) only talks to this interface, so a plain ``nn.Module`` family and a diffusers
pipeline are scored by the same code.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import UserError


@dataclass(frozen=True)
class SamplerOptions:
    """How a run renders its image set (the family's protocol fills what is None)."""

    seed: int = 42  # base seed of the per-image noise
    batch_size: int | None = None
    steps: int | None = None
    guidance: float | None = None
    resolution: int | None = None
    coco_path: object = None
    embed_cache_dir: object = None
    embed_seed: int = 0  # tiny text pipelines: seed of the random prompt embeddings
    refiner: object = None  # SDXL: the FP refiner pipeline


class Adapter:
    """Base class; one subclass per pipeline kind, registered in :data:`multiquant.adapters.ADAPTERS`."""

    kind: str = ""

    def load(self, spec, pretrained, device: torch.device, dtype: torch.dtype | None = None):
        raise NotImplementedError

    def tiny(self, spec, device: torch.device, seed: int = 0):
        raise NotImplementedError

    def denoiser(self, pipe) -> nn.Module:
        raise NotImplementedError

    def refiner(self, spec, source=None, device=None, tiny: bool = False):
        """The FP pipeline that finishes the schedule after the quantized denoiser (SDXL), or None.

        ``source``: None = the family's default, False = none, a path / hub id = that one."""
        if source:
            raise UserError(f"family {spec.name!r} has no refiner stage: leave out --refiner")
        return None

    def with_denoiser(self, pipe, denoiser: nn.Module):
        """``pipe`` generating with ``denoiser`` in place of its own (e.g. a loaded packed export)."""
        raise NotImplementedError

    def pipeline_with(self, spec, denoiser: nn.Module, pretrained=None, device=None, tiny: bool = False):
        """The generation object that renders with ``denoiser`` (e.g. a loaded packed export): the kind's
        pipeline, its other parts (VAE, scheduler, text encoders) loaded, with this denoiser in place of its own."""
        pipe = self.tiny(spec, device) if tiny else self.load(spec, pretrained, device)
        return self.with_denoiser(pipe, denoiser)

    def conditions(self, spec, n: int, tiny: bool = False, coco_path=None) -> list:
        """The family's first ``n`` conditions (prompts, class ids, or the user's ``conditions(n)``)."""
        raise NotImplementedError

    def sampler(self, spec, pipe, conditions: list, options: SamplerOptions, tiny: bool = False):
        raise NotImplementedError

    def default_metric(self, spec, device, inception=None, random_features: bool = False, reference_dir=None):
        raise UserError(f"family {spec.name!r} gives no metric: set FamilySpec(metric=FeatureFID(...)) or "
                        f"CallableMetric(...) (multiquant.metrics)")

    def metric(self, spec, device, inception=None, random_features: bool = False, reference_dir=None):
        """The family's own metric when it declares one (never replaced), else the kind's default."""
        if spec.metric is not None:
            if random_features or inception:
                raise UserError(f"family {spec.name!r} declares its own metric {spec.metric.name!r}: "
                                f"--random_features / --inception only replace the default Inception features")
            from ..metrics.metric import check_metric

            check_metric(spec.metric, spec.name)
            metric = spec.metric
        else:
            metric = self.default_metric(spec, device, inception=inception, random_features=random_features,
                                         reference_dir=reference_dir)
        return metric.to(device) if hasattr(metric, "to") else metric

    # -- how the modules compute (scoring options --dtype / --channels_last) --------------------------------
    def generation_modules(self, spec, pipe, refiner=None) -> dict[str, nn.Module]:
        """The modules that compute while images render, by name: what ``--dtype`` casts. A plain module family
        renders with its denoiser alone."""
        return {"denoiser": self.denoiser(pipe)}

    def convolutional_modules(self, spec, pipe, refiner=None) -> dict[str, nn.Module]:
        """The rendering modules whose convolutions run faster channels-last (``--channels_last``). A plain
        module family: its denoiser (only its 4-D convolution weights change layout)."""
        return {"denoiser": self.denoiser(pipe)}

    def cast_generation(self, spec, pipe, dtype: torch.dtype, refiner=None) -> list[str]:
        """Cast :meth:`generation_modules` to ``dtype`` in place (same parameter objects); returns their names."""
        from ..utils import cast_module

        modules = self.generation_modules(spec, pipe, refiner)
        for module in modules.values():
            cast_module(module, dtype)
        return list(modules)

    def to_channels_last(self, spec, pipe, refiner=None) -> dict[str, int]:
        """Convert :meth:`convolutional_modules` to channels-last in place; returns how many 4-D tensors each
        holds (a module without 2-D convolutions: none)."""
        return {name: channels_last_(module) for name, module in self.convolutional_modules(spec, pipe, refiner).items()}

    def counts_macs(self, spec) -> bool:
        """Whether the BOPs column can be measured: one forward with :meth:`example_inputs` is possible."""
        return True

    def example_inputs(self, spec, model: nn.Module, batch: int = 1, device=None, dtype=None,
                       resolution: int | None = None, seed: int = 0) -> dict:
        """Keyword arguments for ``model(**kwargs)`` with random, non-zero tensors (tracing, MAC counting, smoke
        tests): the family's own ``example_inputs(model, batch)`` when it gives one, on the model's device and
        float dtype; else the kind's (:meth:`denoiser_inputs`)."""
        p = next(model.parameters())
        device = device or p.device
        dtype = dtype or p.dtype
        if spec.example_inputs is not None:  # it draws from the global generator: seeded here, state kept
            with torch.random.fork_rng(devices=[p.device.index or 0] if p.device.type == "cuda" else []):
                torch.manual_seed(seed)
                return moved(spec.example_inputs(model, batch), device, dtype)
        return self.denoiser_inputs(spec, model, batch, device, dtype, resolution, seed)

    def denoiser_inputs(self, spec, model: nn.Module, batch: int, device, dtype, resolution: int | None,
                        seed: int) -> dict:
        raise no_example_inputs(model)


@torch.no_grad()
def channels_last_(module: nn.Module) -> int:
    """Every 4-D floating parameter and buffer of ``module`` (Conv2d weights) in channels-last memory format, in
    place: the same Parameter objects hold the re-laid-out data, so an in-place weight swap (``copy_``, which
    keeps the destination's strides) and a module compiled afterwards keep it. Returns how many 4-D tensors
    the module has (each channels-last now; a 1x1 or depthwise kernel's layout is the same either way). Only
    4-D tensors: ``nn.Module.to(memory_format=...)`` would fail on a Conv3d's 5-D weight."""
    seen: set[int] = set()
    for owner in module.modules():
        for store in (owner._parameters, owner._buffers):
            for tensor in store.values():
                if tensor is None or tensor.dim() != 4 or not tensor.is_floating_point() or id(tensor) in seen:
                    continue
                seen.add(id(tensor))
                if not tensor.is_contiguous(memory_format=torch.channels_last):
                    tensor.data = tensor.data.contiguous(memory_format=torch.channels_last)
    return len(seen)


def no_example_inputs(model: nn.Module) -> UserError:
    return UserError(f"no example inputs for {type(model).__name__}: give the family an example_inputs(model, batch) "
                     f"callable (FamilySpec(example_inputs=...))")


def moved(value, device, dtype):
    """Tensors of ``value`` (nested in dicts, lists, tuples) on ``device``, floating ones in ``dtype``."""
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=dtype) if value.is_floating_point() else value.to(device)
    if isinstance(value, dict):
        return {k: moved(v, device, dtype) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(moved(v, device, dtype) for v in value)
    return value
