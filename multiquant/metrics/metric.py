"""A family's quality metric: the label every configuration is scored by (lower is better).

Two kinds, one small interface the scorer (:mod:`multiquant.evaluate`) reads:

* :class:`FeatureFID`: a feature network (a :class:`~multiquant.metrics.features.FeatureNet`, any
  ``nn.Module`` or any callable ``uint8 images -> [N, D] features``) with its reference set (statistics or
  images). The reference statistics are computed once and cached on disk, keyed by the content of the
  reference images and of the feature network's weights. The scorer also uses the features for FID-FP
  (quantized images against the FP images).
* :class:`CallableMetric`: any callable scoring a batch of uint8 images ``[N, C, H, W]`` -> float, or, with
  ``needs_fp=True``, ``fn(images, fp_images)`` against the FP model's images of the same seeds.

Every metric has a ``name`` and ``settings`` (recorded in ``run_meta.json``): a family's metric is never
replaced silently, and a resumed run never mixes records of two metrics.
"""
from __future__ import annotations

import hashlib
import inspect
import math
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from ..errors import UserError, user_code
from .fid import feature_stats, float64_on, frechet_distance, frechet_distance_rooted, symmetric_sqrt

__all__ = ["FeatureFID", "CallableMetric", "FID_METHOD", "is_feature_metric", "metric_label", "vs_fp_label"]

FID_METHOD = "eigh"  # same trace as scipy sqrtm (to ~1e-8), several times faster on 2048-d features
# square roots of fixed covariances a metric keeps (the reference set's and the FP images' in one run)
ROOTS_KEPT = 4


def _callable_name(fn) -> str:
    return getattr(fn, "name", None) or getattr(fn, "__qualname__", None) or type(fn).__name__


def _function_digest(fn) -> str | None:
    """Content hash of a plain function's code (bytecode and constants), so that cached reference statistics
    of an edited feature function are never reused; None for other callables."""
    code = getattr(fn, "__code__", None)
    if code is None:
        return None
    h = hashlib.sha256(code.co_code)
    h.update(repr(code.co_consts).encode())
    h.update(repr(code.co_names).encode())
    return h.hexdigest()[:12]


def _module_digest(module: nn.Module) -> str:
    """Content hash of a module's parameters and buffers (names, shapes, bytes)."""
    h = hashlib.sha256()
    for key, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


class _CallableFeatures:
    """A plain callable ``images -> features`` as a feature network (float64 [N, D] output)."""

    def __init__(self, fn: Callable, name: str):
        self.fn, self.name = fn, name

    def __call__(self, images) -> np.ndarray:
        out = self.fn(images)
        if isinstance(out, torch.Tensor):
            out = out.detach().to("cpu", torch.float64).numpy()
        out = np.asarray(out, dtype=np.float64)
        return out.reshape(out.shape[0], -1)


class FeatureFID:
    """FID of the generated images against a reference set, in a given feature space.

    ``features``: a FeatureNet (has ``name``), an ``nn.Module`` (fed uint8 scaled to [0, 1]; wrapped in
    :class:`~multiquant.metrics.features.ModuleFeatures`) or a callable ``images -> features``.
    ``reference_stats``: ``{"mu", "sigma"}`` / ``(mu, sigma)`` / a ``.npz`` path / a callable returning one of
    those (optionally with an ``"id"``); or ``reference_images``: a uint8 tensor ``[N, C, H, W]``, a folder of
    images, or a callable returning a tensor / an iterable of batches. Neither: the metric only compares with
    the FP images (FID-FP, sensitivity); scoring configurations (FID-GT) then asks for a reference.
    ``name``: the metric's name (default ``FID[<feature name>]``)."""

    is_feature_metric = True
    needs_fp = False

    def __init__(self, features, reference_stats=None, reference_images=None, name: str | None = None,
                 reference_name: str | None = None, cache_dir: str | os.PathLike | None = None,
                 fid_method: str = FID_METHOD):
        if reference_stats is not None and reference_images is not None:
            raise UserError("FeatureFID takes one of reference_stats= or reference_images=, not both")
        self._features_arg = features
        self._features = None
        self._device = None
        self.reference_stats_arg = reference_stats
        self.reference_images_arg = reference_images
        self.reference_name = reference_name
        self.cache_dir = cache_dir
        self.fid_method = fid_method
        self._name = name
        self._reference: dict | None = None
        self._reference_id: str | None = None
        self._roots: dict[tuple, torch.Tensor] = {}  # (content hash, device) -> symmetric_sqrt, see _sqrt_of

    # -- feature network -----------------------------------------------------------------------------------
    @property
    def feature_net(self):
        if self._features is None:
            f = self._features_arg
            if isinstance(f, nn.Module):
                from .features import ModuleFeatures

                name = f"{type(f).__name__}-{_module_digest(f)}"
                f = ModuleFeatures(f, name=name, device=self._device)
            elif not hasattr(f, "name"):
                if not callable(f):
                    raise UserError(f"FeatureFID features must be a feature network, an nn.Module or a callable, "
                                    f"not {type(f).__name__}")
                digest = _function_digest(f)
                f = _CallableFeatures(f, _callable_name(f) + (f"-{digest}" if digest else ""))
            self._features = f
        return self._features

    @property
    def feature_name(self) -> str:
        return self.feature_net.name

    @property
    def name(self) -> str:
        return self._name or f"FID[{self.feature_name}]"

    def to(self, device) -> "FeatureFID":
        """Run a module feature network on ``device`` (a given FeatureNet or callable keeps its own)."""
        self._device = torch.device(device)
        if self._features is not None and isinstance(self._features_arg, nn.Module):
            self._features.device = self._device
            self._features.module.to(self._device)
            self._features.reset_stream()  # its weights were just written on the caller's stream
        elif callable(getattr(self._features_arg, "to", None)) and not isinstance(self._features_arg, nn.Module):
            self._features_arg.to(self._device)  # a feature network that moves itself (e.g. loaded lazily)
        return self

    def features(self, images) -> np.ndarray:
        """float64 ``[N, D]`` features of uint8 images."""
        feats = np.asarray(self.feature_net(images), dtype=np.float64)
        return feats.reshape(feats.shape[0], -1)

    # -- reference --------------------------------------------------------------------------------------
    def reference(self) -> dict:
        """``{"mu", "sigma"}`` of the reference set (computed once; on disk keyed by content)."""
        if self._reference is None:
            if self.reference_stats_arg is None and self.reference_images_arg is None:
                raise UserError(f"metric {self.name!r} has no reference set: give FeatureFID(reference_stats=...) "
                                f"or reference_images=... (the real images the generated ones are compared with)")
            if self.reference_stats_arg is not None:
                self._reference, self._reference_id = self._given_stats(self.reference_stats_arg)
            else:
                self._reference, self._reference_id = self._stats_of_images(self.reference_images_arg)
        return self._reference

    @property
    def reference_id(self) -> str:
        self.reference()
        return self._reference_id

    def _given_stats(self, stats) -> tuple[dict, str]:
        if callable(stats) and not isinstance(stats, (dict, tuple, list)):
            stats = stats()
        given_id = None
        if isinstance(stats, (str, os.PathLike)):
            with np.load(stats, allow_pickle=False) as data:
                stats = {"mu": data["mu"], "sigma": data["sigma"]}
        if isinstance(stats, dict):
            given_id = stats.get("id")
            mu, sigma = stats["mu"], stats["sigma"]
        else:
            mu, sigma = stats
        mu, sigma = np.asarray(mu, dtype=np.float64), np.atleast_2d(np.asarray(sigma, dtype=np.float64))
        digest = hashlib.sha256(mu.tobytes() + sigma.tobytes()).hexdigest()[:16]
        return {"mu": mu, "sigma": sigma}, self.reference_name or given_id or f"stats-{digest}"

    def _stats_of_images(self, images) -> tuple[dict, str]:
        from .stats import iter_image_folder, reference_stats

        if isinstance(images, (str, os.PathLike)):
            folder = Path(images)
            if not folder.is_dir():
                raise UserError(f"reference image folder {folder} does not exist: pass the folder of real images")
            listing = sorted((str(p.relative_to(folder)), p.stat().st_size) for p in folder.rglob("*") if p.is_file())
            digest = hashlib.sha256(repr(listing).encode()).hexdigest()[:16]
            ref_id = self.reference_name or f"folder-{folder.resolve().name}-{digest}"
            mu, sigma = reference_stats(ref_id, self.feature_net, lambda: iter_image_folder(folder), self.cache_dir)
            return {"mu": mu, "sigma": sigma}, ref_id
        if callable(images) and not isinstance(images, torch.Tensor):
            images = images()
        if not isinstance(images, torch.Tensor):  # an iterable of batches: hash them as they come
            batches = [b if isinstance(b, torch.Tensor) else torch.stack(list(b)) for b in images]
            images = torch.cat(batches)
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise UserError(f"reference_images must be uint8 [N, C, H, W], got {images.dtype} {tuple(images.shape)}")
        digest = hashlib.sha256(images.contiguous().numpy().tobytes()).hexdigest()[:16]
        ref_id = self.reference_name or f"images-{len(images)}-{digest}"
        mu, sigma = reference_stats(ref_id, self.feature_net, lambda: images, self.cache_dir)
        return {"mu": mu, "sigma": sigma}, ref_id

    # -- scoring --------------------------------------------------------------------------------------
    def distance(self, mu, sigma, other: dict | None = None) -> float:
        """FID of statistics (mu, sigma) against the reference (or ``other``'s mu/sigma).

        Method "eigh": the square root of the reference's covariance is computed once per content (the
        reference set and the FP images are the same for every configuration), the rest in float64 on the
        feature network's device (fid.frechet_distance_rooted: the same value as the numpy path)."""
        ref = other if other is not None else self.reference()
        if self.fid_method != "eigh":
            return float(frechet_distance(mu, sigma, ref["mu"], ref["sigma"], method=self.fid_method))
        device = self.distance_device
        return frechet_distance_rooted(mu, sigma, ref["mu"], ref["sigma"], self._sqrt_of(ref["sigma"], device), device)

    @property
    def distance_device(self) -> torch.device:
        """Where the per-configuration Frechet distance runs: the feature network's GPU, else the CPU."""
        device = getattr(self.feature_net, "device", None)
        if device is not None and torch.device(device).type == "cuda" and torch.cuda.is_available():
            return torch.device(device)
        return torch.device("cpu")

    def _sqrt_of(self, sigma, device: torch.device) -> torch.Tensor:
        """fid.symmetric_sqrt of ``sigma`` on ``device``, keyed by the matrix's content (never by identity: an
        edited array is a new key)."""
        sigma = np.ascontiguousarray(sigma, dtype=np.float64)
        key = (hashlib.sha256(memoryview(sigma).cast("B")).hexdigest(), sigma.shape, str(device))
        if key not in self._roots:
            while len(self._roots) >= ROOTS_KEPT:
                self._roots.pop(next(iter(self._roots)))  # the oldest
            self._roots[key] = float64_on(symmetric_sqrt(sigma), device)
        return self._roots[key]

    def __call__(self, images) -> float:
        return self.distance(*feature_stats(self.features(images)))

    @property
    def has_reference(self) -> bool:
        return self.reference_stats_arg is not None or self.reference_images_arg is not None

    @property
    def settings(self) -> dict:
        return {"feature_net": self.feature_name, "reference": self.reference_id if self.has_reference else None,
                "fid_method": self.fid_method}

    def __repr__(self) -> str:
        return f"FeatureFID(name={self.name!r})"


class CallableMetric:
    """Any callable scoring a batch of uint8 images ``[N, C, H, W]`` (lower is better), optionally against
    the FP model's images of the same seeds (``needs_fp=True``: ``fn(images, fp_images)``)."""

    is_feature_metric = False

    def __init__(self, fn: Callable, name: str, needs_fp: bool = False):
        if not callable(fn):
            raise UserError(f"CallableMetric needs a callable, not {type(fn).__name__}")
        if not name:
            raise UserError("CallableMetric needs a name (it is recorded with every result)")
        self.fn, self.name, self.needs_fp = fn, name, bool(needs_fp)

    def to(self, device) -> "CallableMetric":
        return self

    def __call__(self, images, fp_images=None) -> float:
        if self.needs_fp and fp_images is None:
            raise ValueError(f"metric {self.name!r} scores against the FP images: pass them")
        with user_code(f"metric {self.name!r}"):
            value = self.fn(images, fp_images) if self.needs_fp else self.fn(images)
        return checked_value(value, self.name)

    @property
    def settings(self) -> dict:
        return {"feature_net": None, "reference": "fp-images" if self.needs_fp else None, "fid_method": None}

    def __repr__(self) -> str:
        return f"CallableMetric(name={self.name!r}, needs_fp={self.needs_fp})"


def checked_value(value, name: str) -> float:
    """A metric's result as one float: a number or a one-element tensor/array, not NaN (it would be stored as every
    record's label and poison what learns from it)."""
    size = value.numel() if isinstance(value, torch.Tensor) else value.size if isinstance(value, np.ndarray) else 1
    if size != 1:
        raise UserError(f"metric {name!r} must return one number for the whole batch, got "
                        f"{type(value).__name__} of shape {tuple(value.shape)}")
    try:
        out = float(value.item() if hasattr(value, "item") else value)
    except (TypeError, ValueError):
        raise UserError(f"metric {name!r} must return one number for the whole batch, got "
                        f"{type(value).__name__}") from None
    if math.isnan(out):
        raise UserError(f"metric {name!r} returned NaN: it must return a number for every batch of images")
    return out


def is_feature_metric(metric) -> bool:
    return bool(getattr(metric, "is_feature_metric", False))


def metric_label(metric, key: str = "FID-GT-1k") -> str:
    """How a record's quality ``key`` is shown in logs and plots. The label key (``FID-GT-1k``, the reference's
    name) holds whatever the family's metric computes: its own name (a user's ``CallableMetric`` is no FID);
    ``FID`` for families without one (the default Inception FID). Any other key is shown as itself."""
    if key != "FID-GT-1k":
        return key
    return str(getattr(metric, "name", None) or "FID")


def vs_fp_label(metric) -> str:
    """What the one-layer measurements' ``fid_fp`` is for this metric: a feature metric's FID of the quantized
    against the FP images; a callable metric scored against the FP images, itself; any other callable metric,
    its increase over the FP images' value (it can be negative)."""
    if metric is None or is_feature_metric(metric):
        return "FID-FP"
    return metric.name if getattr(metric, "needs_fp", False) else f"{metric.name} increase over FP"


def check_metric(metric, family: str = "") -> None:
    """A metric object the scorer can use (FeatureFID, CallableMetric or the same interface)."""
    if not hasattr(metric, "name") or not callable(metric):
        raise UserError(f"family {family!r}: metric must be a multiquant.metrics.FeatureFID or CallableMetric "
                        f"(got {type(metric).__name__})")
    if is_feature_metric(metric) and not (hasattr(metric, "features") and hasattr(metric, "distance")):
        raise UserError(f"family {family!r}: a feature metric needs features() and distance()")
    if not is_feature_metric(metric) and len(inspect.signature(metric.__call__).parameters) < 1:
        raise UserError(f"family {family!r}: metric must take the images")
