"""The diffusers pipeline kinds: one adapter module per kind over a shared base, loading, prompt embeddings,
loop and sampler."""
from .base import DiffusersAdapter, MissingReferenceError

__all__ = ["DiffusersAdapter", "MissingReferenceError"]
