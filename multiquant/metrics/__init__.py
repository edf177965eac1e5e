"""Image-quality metrics, feature networks and BOPs used to label quantization configurations."""
from .fid import feature_stats, fid_from_features, frechet_distance

__all__ = ["feature_stats", "fid_from_features", "frechet_distance"]
