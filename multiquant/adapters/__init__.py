"""One adapter per pipeline kind, keyed by kind: how the scorer loads, conditions, samples and scores a family.

* ``"module"`` (:mod:`.module`): a plain ``nn.Module`` family with its own sampler and metric;
* the diffusers pipeline kinds (:mod:`.diffusers`, one module each): ``"pixart"`` (PixArt-alpha/sigma),
  ``"hunyuan"`` (Hunyuan-DiT), ``"sdxl"`` (SDXL base + FP refiner), ``"sd"`` (SD 1.x), ``"dit"`` (DiT-XL/2) and
  ``"mnist"`` (the embedded MNIST DiT).

``adapter_for(spec)`` picks it: a family without ``pipeline_class`` is a module family; otherwise its
pipeline class names the kind. Register another kind with :func:`register_adapter` (docs/design.md §9).
"""
from __future__ import annotations

from .base import Adapter, SamplerOptions
from .diffusers.base import DiffusersAdapter, MissingReferenceError
from .diffusers.dit import DiTAdapter
from .diffusers.hunyuan import HunyuanAdapter
from .diffusers.mnist_dit import MNISTDiTAdapter
from .diffusers.pixart import PixArtAdapter
from .diffusers.sd import SDAdapter
from .diffusers.sdxl import SDXLAdapter
from .module import ModuleAdapter, ModuleSampler
from .registry import ADAPTERS, KIND_OF_PIPELINE, adapter_for, example_inputs, kind_of, register_adapter

__all__ = ["Adapter", "SamplerOptions", "ADAPTERS", "KIND_OF_PIPELINE", "adapter_for", "kind_of", "register_adapter",
           "example_inputs", "ModuleAdapter", "ModuleSampler", "DiffusersAdapter", "MissingReferenceError"]

for _adapter in (ModuleAdapter(), PixArtAdapter(), HunyuanAdapter(), SDXLAdapter(), SDAdapter(), DiTAdapter(),
                 MNISTDiTAdapter()):
    register_adapter(_adapter)
