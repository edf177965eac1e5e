"""The adapters by pipeline kind, and which kind serves a family (filled by :mod:`multiquant.adapters`)."""
from __future__ import annotations

from ..errors import UserError
from .base import Adapter

ADAPTERS: dict[str, Adapter] = {}
KIND_OF_PIPELINE: dict[str, str] = {}  # diffusers pipeline class -> kind


def register_adapter(adapter: Adapter, pipeline_classes: tuple[str, ...] | None = None) -> Adapter:
    """Add the adapter of a pipeline kind, serving ``pipeline_classes`` (default: the adapter's own)."""
    ADAPTERS[adapter.kind] = adapter
    for name in getattr(adapter, "pipeline_classes", ()) if pipeline_classes is None else pipeline_classes:
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


def example_inputs(family, model, batch: int = 1, device=None, dtype=None, resolution: int | None = None,
                   seed: int = 0) -> dict:
    """Keyword arguments for ``model(**kwargs)`` with random, non-zero tensors, from the family's adapter
    (:meth:`Adapter.example_inputs`). Shapes follow ``resolution`` (latent = resolution / 8 for latent models),
    so one function serves full-size models on the meta device and tiny models on the CPU."""
    return adapter_for(family).example_inputs(family, model, batch, device=device, dtype=dtype,
                                              resolution=resolution, seed=seed)
