"""multiquant: multiquantizers, configurations and their scoring (the first half of qua2sedimo).

    from multiquant import get_family, MultiQuantizer, quantize_, load_config
"""
from . import quiet  # noqa: F401  (before anything imports diffusers or torchao)
from .checkpoint import MultiQuantizer
from .config import load_config, quantize_, sample_random_config, save_config, uniform_config
from .families import FamilySpec, get_family, list_families, register_family, resolve_family
from .layers import quantizable_layers

__all__ = ["MultiQuantizer", "FamilySpec", "get_family", "list_families", "register_family", "resolve_family",
           "quantizable_layers",
           "load_config", "save_config", "quantize_", "sample_random_config", "uniform_config"]
