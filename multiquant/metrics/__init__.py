"""Labels for quantization configurations.

* :mod:`.metric`: a family's quality metric: :class:`FeatureFID` (feature network + reference set) and
  :class:`CallableMetric` (any callable scoring a batch of images, optionally against the FP images);
* :mod:`.fid`: ``feature_stats``, ``frechet_distance``, ``fid_from_features`` (numpy only, imported here);
* :mod:`.features`: feature networks (clean-fid Inception in memory, random Inception, any module);
* :mod:`.stats`: reference statistics computed once and cached on disk;
* :mod:`.proxy`: PSNR / SSIM / MSE against same-seed FP images;
* :mod:`.clip`: CLIP score from a local transformers checkpoint;
* :mod:`.bops`: MACs from a real (meta-device) forward and BOPs of a configuration.

The torch-based submodules are imported on use, so ``from multiquant.metrics import frechet_distance``
stays light.
"""
from .fid import feature_stats, fid_from_features, frechet_distance

__all__ = ["feature_stats", "fid_from_features", "frechet_distance", "FeatureFID", "CallableMetric"]


def __getattr__(name):  # torch-based, imported on use
    if name in ("FeatureFID", "CallableMetric"):
        from . import metric

        return getattr(metric, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
