"""Frechet Inception Distance from feature matrices (pure numpy, no I/O).

Same formula and numerical guards as clean-fid's ``frechet_distance``; statistics are float64
so that 2048-d covariances from ~1k samples do not lose precision.
"""
from __future__ import annotations

import warnings

import numpy as np
from scipy import linalg

__all__ = ["feature_stats", "frechet_distance", "fid_from_features"]


def feature_stats(feats) -> tuple[np.ndarray, np.ndarray]:
    """Mean vector and (unbiased, ddof=1) covariance of a [N, D] feature matrix, both float64."""
    feats = np.asarray(feats, dtype=np.float64)
    if feats.ndim != 2:
        raise ValueError(f"features must be a [N, D] matrix, got shape {feats.shape}")
    if feats.shape[0] < 2:
        raise ValueError(f"need at least 2 feature rows for a covariance, got {feats.shape[0]}")
    mu = feats.mean(axis=0)
    sigma = np.cov(feats, rowvar=False)
    return mu, np.atleast_2d(sigma)


def _trace_sqrt_product_eigh(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr(sqrt(sigma1 sigma2)) for PSD matrices via two symmetric eigendecompositions.

    sigma1 sigma2 is similar to the PSD matrix A = sqrt(sigma1) sigma2 sqrt(sigma1), so the trace of
    its square root is the sum of sqrt(eig(A)): real by construction, and about 5x faster than a
    general sqrtm at 2048 dimensions."""
    w, v = np.linalg.eigh(sigma1)
    root1 = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    a = root1 @ sigma2 @ root1
    eig = np.linalg.eigvalsh((a + a.T) / 2)
    return float(np.sqrt(np.clip(eig, 0.0, None)).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6, method: str = "sqrtm") -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2):

    ||mu1 - mu2||^2 + tr(sigma1) + tr(sigma2) - 2 tr(sqrt(sigma1 sigma2)).

    ``method="sqrtm"`` (default) is clean-fid's computation (scipy sqrtm, diagonal regularisation
    when singular, imaginary-part guard). ``method="eigh"`` computes the same trace through symmetric
    eigendecompositions: same value to ~1e-8 relative, several times faster for 2048-d features and
    exact for the singular covariances of N < D samples."""
    mu1 = np.atleast_1d(np.asarray(mu1, dtype=np.float64))
    mu2 = np.atleast_1d(np.asarray(mu2, dtype=np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
    if mu1.shape != mu2.shape:
        raise ValueError(f"mean vectors differ in shape: {mu1.shape} vs {mu2.shape}")
    if sigma1.shape != sigma2.shape:
        raise ValueError(f"covariances differ in shape: {sigma1.shape} vs {sigma2.shape}")
    diff = mu1 - mu2
    if method == "eigh":
        tr_covmean = _trace_sqrt_product_eigh(sigma1, sigma2)
    elif method == "sqrtm":
        tr_covmean = _trace_sqrt_product_sqrtm(sigma1, sigma2, eps)
    else:
        raise ValueError(f"method must be 'sqrtm' or 'eigh', got {method!r}")
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


def _trace_sqrt_product_sqrtm(sigma1: np.ndarray, sigma2: np.ndarray, eps: float) -> float:
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        # Nearly singular product (e.g. fewer samples than dimensions): regularise the diagonal.
        warnings.warn(f"singular covariance product in FID; adding {eps} to the diagonals", RuntimeWarning)
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    # Round-off can leave a small imaginary part; a large one means the inputs are not covariances.
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"imaginary component {np.max(np.abs(covmean.imag))} in sqrtm(sigma1 sigma2)")
        covmean = covmean.real
    return float(np.trace(covmean))


def fid_from_features(feats, ref_stats: tuple[np.ndarray, np.ndarray], method: str = "sqrtm") -> float:
    """FID of a [N, D] feature matrix against precomputed reference statistics (mu, sigma)."""
    mu, sigma = feature_stats(feats)
    ref_mu, ref_sigma = ref_stats
    return frechet_distance(mu, sigma, ref_mu, ref_sigma, method=method)
