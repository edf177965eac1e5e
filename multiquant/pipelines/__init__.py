"""Generation pipelines of the embedded model families."""
from .mnist_dit import MNISTDiTPipeline, build_scheduler

__all__ = ["MNISTDiTPipeline", "build_scheduler"]
