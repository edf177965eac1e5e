"""The embedded MNIST family: real digits, the MNIST-FID classifier, training scripts and quality reports.

- :mod:`.data`: the official MNIST test set (``constants.MNIST_DIR`` / ``QUA2SEDIMO_MNIST``) and its fixed split.
- :mod:`.classifier`: LeNet-style classifier, ``load_classifier()``, ``load_reference_stats()``.
- :mod:`.quality`: the evaluation plan and MNIST-FID / digit-accuracy scores.
- ``python -m multiquant.mnist.train_classifier`` / ``train_dit`` / ``report``: rebuild the shipped assets.
"""
from .classifier import MNISTClassifier, load_classifier, load_reference_stats
from .data import load_mnist_test, load_split, split_indices
from .quality import evaluate_pipeline, evaluation_plan, score_digits

__all__ = ["MNISTClassifier", "load_classifier", "load_reference_stats", "load_mnist_test", "load_split",
           "split_indices", "evaluate_pipeline", "evaluation_plan", "score_digits"]
