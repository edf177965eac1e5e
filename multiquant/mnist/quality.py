"""Quality of MNIST digits: MNIST-FID (classifier features vs the shipped reference statistics) and
the share of digits the classifier reads as the requested class."""
from __future__ import annotations

import numpy as np

from ..metrics.fid import feature_stats, frechet_distance
from .classifier import MNISTClassifier, classifier_outputs, load_classifier, load_reference_stats


def evaluation_plan(num_images: int = 1000, seed: int = 0, num_classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Class labels and per-image seeds of the fixed evaluation set.

    Labels cycle 0..9, so every prefix whose length is a multiple of 10 is class balanced;
    image ``i`` always gets seed ``seed + i`` (common random numbers across configurations)."""
    index = np.arange(num_images, dtype=np.int64)
    return index % num_classes, seed + index


def score_digits(images, labels=None, classifier: MNISTClassifier | None = None, ref_stats: dict | None = None) -> dict:
    """``{"fid", "accuracy", "n"}`` of uint8 digits ``[N, (1,) 28, 28]``.

    ``fid`` is the Frechet distance of the classifier features to ``ref_stats`` (default: the shipped
    held-out reference digits); ``accuracy`` the share classified as ``labels`` (None without labels)."""
    classifier = classifier or load_classifier()
    ref_stats = ref_stats or load_reference_stats()
    feats, preds = classifier_outputs(classifier, images)
    mu, sigma = feature_stats(feats)
    fid = frechet_distance(mu, sigma, ref_stats["mu"], ref_stats["sigma"])
    accuracy = None if labels is None else float(np.mean(preds == np.asarray(labels)))
    return {"fid": fid, "accuracy": accuracy, "n": int(len(feats))}


def generate_plan(pipe, num_images: int = 1000, steps: int = 20, guidance: float = 1.5, seed: int = 0,
                  batch_size: int = 250) -> tuple[np.ndarray, np.ndarray, float]:
    """uint8 digits ``[N, 1, 28, 28]`` of the fixed evaluation plan, their labels, and images/s."""
    import time

    labels, seeds = evaluation_plan(num_images, seed)
    t0 = time.perf_counter()
    images = pipe(labels, seeds, num_inference_steps=steps, guidance_scale=guidance, batch_size=batch_size)
    return images.numpy(), labels, num_images / (time.perf_counter() - t0)


def evaluate_pipeline(pipe, num_images: int = 1000, steps: int = 20, guidance: float = 1.5, seed: int = 0,
                      batch_size: int = 250, classifier: MNISTClassifier | None = None,
                      ref_stats: dict | None = None) -> dict:
    """Generate the evaluation plan and score it: ``{"fid", "accuracy", "n", "steps", "guidance", "images_per_s"}``."""
    images, labels, speed = generate_plan(pipe, num_images, steps, guidance, seed, batch_size)
    if classifier is not None:
        classifier = classifier.to(pipe.device)
    scores = score_digits(images, labels, classifier, ref_stats)
    return dict(scores, steps=steps, guidance=guidance, images_per_s=round(speed, 2))
