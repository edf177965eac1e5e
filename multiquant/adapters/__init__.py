"""One adapter per pipeline kind, keyed by kind: how the scorer loads, samples and scores a family.

* ``"module"`` (:mod:`.module`): a plain ``nn.Module`` family with its own sampler and metric;
* ``"pixart" | "hunyuan" | "sdxl" | "sd" | "dit" | "mnist"`` (:mod:`.diffusers`): the diffusers pipelines.

``adapter_for(spec)`` picks it: a family without ``pipeline_class`` is a module family; otherwise its
pipeline class names the kind. Register another kind with :func:`register_adapter`.
"""
from __future__ import annotations

from ..errors import UserError
from .base import Adapter, SamplerOptions
from .diffusers import DiffusersAdapter, MissingReferenceError
from .module import ModuleAdapter, ModuleSampler

__all__ = ["Adapter", "SamplerOptions", "ADAPTERS", "KIND_OF_PIPELINE", "adapter_for", "kind_of", "register_adapter",
           "ModuleAdapter", "ModuleSampler", "DiffusersAdapter", "MissingReferenceError"]

# Which adapter (denoising loop) serves which diffusers pipeline class.
KIND_OF_PIPELINE = {
    "PixArtAlphaPipeline": "pixart",
    "PixArtSigmaPipeline": "pixart",
    "HunyuanDiTPipeline": "hunyuan",
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusionPipeline": "sd",
    "DiTPipeline": "dit",
    "MNISTDiTPipeline": "mnist",
}

ADAPTERS: dict[str, Adapter] = {"module": ModuleAdapter(),
                                **{kind: DiffusersAdapter(kind) for kind in sorted(set(KIND_OF_PIPELINE.values()))}}


def register_adapter(adapter: Adapter, pipeline_classes: tuple[str, ...] = ()) -> Adapter:
    """Add an adapter for a new pipeline kind (and the pipeline classes it serves)."""
    ADAPTERS[adapter.kind] = adapter
    for name in pipeline_classes:
        KIND_OF_PIPELINE[name] = adapter.kind
    return adapter


def kind_of(spec) -> str:
    if spec.pipeline_class is None:
        return "module"
    try:
        return KIND_OF_PIPELINE[spec.pipeline_class]
    except KeyError:
        raise UserError(f"family {spec.name!r} uses pipeline {spec.pipeline_class!r}, which no adapter serves; "
                        f"known: {', '.join(sorted(KIND_OF_PIPELINE))}; a plain nn.Module family leaves "
                        f"pipeline_class unset and gives a sampler") from None


def adapter_for(spec) -> Adapter:
    return ADAPTERS[kind_of(spec)]
