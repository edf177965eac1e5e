"""Ranking losses and metrics, pure torch (replaces torchsort / pytorchltr of the reference).

Conventions: ``pred`` and ``target`` are 1-D tensors over one batch of configurations; a higher target
is a better configuration, and a good scorer gives it a higher ``pred``. Every loss returns a
differentiable scalar (the reference injected LambdaRank gradients by hand and then wiped them).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["soft_rank", "exact_rank", "spearman_loss", "lambda_rank_loss", "hybrid_loss", "ranking_loss",
           "ndcg_at_k", "srcc", "standardize", "relevance"]


def standardize(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Batch z-score; makes temperatures and logistic scales unit-free."""
    return (x - x.mean()) / (x.std(unbiased=False) + eps)


def soft_rank(x: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """Differentiable ascending ranks (1 = smallest) by pairwise sigmoids, O(B^2):
    ``r_i = 1/2 + sum_j sigmoid((x_i - x_j) / tau)`` (the j = i term adds 1/2). As tau -> 0 this is the
    exact rank, with ties getting their average rank."""
    x = x.reshape(-1)
    return 0.5 + torch.sigmoid((x[:, None] - x[None, :]) / tau).sum(dim=1)


def exact_rank(x: torch.Tensor) -> torch.Tensor:
    """Ascending 1-based ranks with ties averaged (scipy ``rankdata(method="average")``)."""
    x = x.reshape(-1)
    less = (x[None, :] < x[:, None]).sum(dim=1)
    equal = (x[None, :] == x[:, None]).sum(dim=1)
    return (less + (equal + 1) / 2).to(torch.float32)


def _pearson(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    a, b = a - a.mean(), b - b.mean()
    return (a * b).sum() / (a.norm() * b.norm() + eps)


def spearman_loss(pred: torch.Tensor, target: torch.Tensor, tau: float = 0.1) -> torch.Tensor:
    """1 - differentiable Spearman correlation. Both sides are soft-ranked (the target without
    gradient), after batch standardisation so that ``tau`` is in standard deviations."""
    pred, target = pred.reshape(-1), target.reshape(-1).detach()
    if pred.numel() < 2:
        return pred.sum() * 0.0
    return 1.0 - _pearson(soft_rank(standardize(pred), tau), soft_rank(standardize(target), tau))


def relevance(target: torch.Tensor) -> torch.Tensor:
    """Gains for NDCG: the target min-max rescaled to [0, 1] over the evaluated set."""
    target = target.reshape(-1).to(torch.float32)
    span = target.max() - target.min()
    return (target - target.min()) / span if span > 0 else torch.ones_like(target)


def _discounts(positions: torch.Tensor, k: int) -> torch.Tensor:
    """1 / log2(1 + position) for 1-based positions within the top k, else 0."""
    d = 1.0 / torch.log2(positions.to(torch.float32) + 1.0)
    return torch.where(positions <= k, d, torch.zeros_like(d))


def _ideal_dcg(gains: torch.Tensor, k: int) -> torch.Tensor:
    top = gains.sort(descending=True).values[:k]
    return (top * _discounts(torch.arange(1, top.numel() + 1, device=gains.device), k)).sum()


def lambda_rank_loss(pred: torch.Tensor, target: torch.Tensor, k: int = 10, sigma: float = 1.0) -> torch.Tensor:
    """LambdaRank for NDCG@k as a returned, differentiable loss.

    Pairwise logistic loss ``log(1 + exp(-sigma (s_i - s_j)))`` over pairs with gain_i > gain_j, each
    weighted by |delta NDCG@k| of swapping i and j, where positions (discounts) come from the current
    *predicted* order and gains from the target min-max rescaled to [0, 1]. Scores are batch-standardised
    so the loss cannot be lowered by inflating their scale."""
    s, target = pred.reshape(-1), target.reshape(-1).detach()
    if s.numel() < 2:
        return s.sum() * 0.0
    gains = relevance(target)
    ideal = _ideal_dcg(gains, k)
    if ideal <= 0:
        return s.sum() * 0.0
    with torch.no_grad():
        order = torch.argsort(s, descending=True)
        positions = torch.empty_like(order)
        positions[order] = torch.arange(1, s.numel() + 1, device=s.device)
        disc = _discounts(positions, k)
        delta = (gains[:, None] - gains[None, :]).abs() * (disc[:, None] - disc[None, :]).abs() / ideal
        better = gains[:, None] > gains[None, :]
        weight = torch.where(better, delta, torch.zeros_like(delta))
    z = standardize(s)
    pair_loss = F.softplus(-sigma * (z[:, None] - z[None, :]))  # log(1 + exp(-sigma (s_i - s_j)))
    norm = weight.sum().clamp_min(1e-8)
    return (weight * pair_loss).sum() / norm


def hybrid_loss(pred: torch.Tensor, target: torch.Tensor, k: int = 10, tau: float = 0.1,
                alpha: float = 0.5) -> torch.Tensor:
    """alpha * Spearman loss + (1 - alpha) * LambdaRank loss."""
    return alpha * spearman_loss(pred, target, tau) + (1.0 - alpha) * lambda_rank_loss(pred, target, k)


def ranking_loss(name: str, pred: torch.Tensor, target: torch.Tensor, k: int = 10, tau: float = 0.1) -> torch.Tensor:
    """Dispatch by name: ``"srcc"``, ``"ndcg"`` or ``"hybrid"``."""
    if name == "srcc":
        return spearman_loss(pred, target, tau)
    if name == "ndcg":
        return lambda_rank_loss(pred, target, k)
    if name == "hybrid":
        return hybrid_loss(pred, target, k, tau)
    raise ValueError(f"unknown ranking loss {name!r}; choose srcc, ndcg or hybrid")


# ------------------------------------------------------------------------------------------------ metrics
@torch.no_grad()
def ndcg_at_k(pred: torch.Tensor, target: torch.Tensor, k: int = 10) -> float:
    """NDCG@k of ranking by ``pred``, linear gains = target min-max rescaled to [0, 1] (equal to
    scikit-learn ``ndcg_score([gains], [pred], k=k)`` up to tie handling)."""
    pred = torch.as_tensor(pred, dtype=torch.float32).reshape(-1)
    gains = relevance(torch.as_tensor(target, dtype=torch.float32))
    ideal = _ideal_dcg(gains, k)
    if pred.numel() == 0 or ideal <= 0:
        return float("nan")
    top = torch.argsort(pred, descending=True, stable=True)[:k]
    dcg = (gains[top] / torch.log2(torch.arange(2, top.numel() + 2, dtype=torch.float32))).sum()
    return float(dcg / ideal)


@torch.no_grad()
def srcc(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Spearman rank correlation (ties averaged); NaN when either side is constant."""
    pred = torch.as_tensor(pred, dtype=torch.float64).reshape(-1)
    target = torch.as_tensor(target, dtype=torch.float64).reshape(-1)
    if pred.numel() < 2:
        return float("nan")
    a, b = exact_rank(pred).double(), exact_rank(target).double()
    a, b = a - a.mean(), b - b.mean()
    denom = a.norm() * b.norm()
    return float((a * b).sum() / denom) if denom > 0 else float("nan")
