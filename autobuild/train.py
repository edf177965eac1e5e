"""K-fold training of the sensitivity GNN and baselines on the same folds (the saved fold ensemble that
scores, configs and the report read lives in :mod:`autobuild.ensemble`).

Protocol (docs/design.md §4): one seeded permutation of the valid records, folds = its
contiguous chunks (recorded); per fold a validation split carved from the training part drives early
stopping (the test fold is never looked at before the final evaluation); AdamW + cosine schedule,
gradient clipping, one backward per step with ``zero_grad`` before it; ranking losses are returned
tensors applied to the prediction and to every hop score; metrics use a real NDCG@10.

Files written to ``out_dir`` (atomically): ``ensemble.safetensors`` (all fold weights, keys
``fold{f}.<param>``), ``ensemble.json`` (model config, graph template, target, per-fold moments and
metrics) and ``metrics.json``. No pickle anywhere.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import networkx as nx
import numpy as np
import torch
import torch.nn.functional as F

from multiquant.errors import InputError
from multiquant.utils import progress_line

from .data import ConfigDataset, GraphTemplate, cache_to_dataset, column_to_json, encode_options, option_columns, pair_columns
from .ensemble import (ENSEMBLE_CONFIG, ENSEMBLE_WEIGHTS, METRICS_FILE, Ensemble, _squared_distances,  # noqa: F401
                       kernel_values, load_ensemble, prior_values, save_ensemble)
from .gnn import SensitivityGNN
from .losses import ndcg_at_k, ranking_loss, srcc
from .target import LearningPlan, Target, learning_plan, parse_target

__all__ = ["TrainOptions", "train_predictor", "make_folds", "baseline_scores", "Ensemble", "load_ensemble",
           "ENSEMBLE_WEIGHTS", "ENSEMBLE_CONFIG", "METRICS_FILE", "learned_validation", "known_term_warning"]


def learned_validation(metrics: Mapping) -> tuple[float | None, str]:
    """Held-out SRCC of what the network learned, and what that is. With exactly known terms in the target
    (``avg_bits``, read from the configuration), the network learns only the measured key (e.g. log FID), and its
    node and unit scores rank that: its validation is the folds' ``learned_srcc``, comparable with other models of
    the measured key. Without known terms it is the target's own held-out SRCC."""
    learned = metrics.get("learned") or {}
    folds = [f["learned_srcc"] for f in metrics.get("folds", []) if f.get("learned_srcc") is not None
             and math.isfinite(f["learned_srcc"])]
    if learned.get("known") and folds:
        return float(np.mean(folds)), f"{learned.get('learned')} (the target's learned part)"
    return metrics.get("srcc_mean"), str(metrics.get("target"))


def known_term_warning(metrics: Mapping, tie: float = 0.01) -> str | None:
    """A warning when the target ranks the held-out configurations as its exactly-known terms alone do (e.g. the
    avg_bits baseline matches the predictor): the measured key then hardly moves the target at its scale (a
    user's metric of a few units against 150 x avg_bits), so a high SRCC says nothing about quality."""
    learned = metrics.get("learned") or {}
    srcc = metrics.get("srcc_mean")
    for key in learned.get("known") or ():
        baseline = (metrics.get("baselines") or {}).get(key, {}).get("srcc_mean")
        if srcc is None or baseline is None or not math.isfinite(baseline) or baseline < srcc - tie:
            continue
        part = learned_validation(metrics)[0]
        return (f"warning: the target {metrics.get('target')!r} ranks these configurations as {key} alone does "
                f"(held-out SRCC {srcc:.3f}, {key} baseline {baseline:.3f}): {learned.get('key')} moves it little at "
                f"this scale, so that figure says nothing about quality; the learned part ranks at "
                f"{part:.3f}. To weigh quality, put the bits term on the metric's scale or pass --target "
                f"'-1*{learned.get('key')}'")
    return None



@dataclass
class TrainOptions:
    """Model and optimisation settings (defaults: the reference's, minus its 10k fixed epochs)."""

    hidden: int = 64
    layers: int = 4
    heads: int = 1
    dropout: float = 0.0
    lr: float = 1e-3
    weight_decay: float = 1e-6
    grad_clip: float = 5.0
    val_fraction: float = 0.15  # of each fold's training part, for early stopping
    patience: int = 40  # epochs without a better validation score
    min_epochs: int = 0
    mse_weight: float = 1.0  # regression of the standardised target by the head
    hop_weight: float = 1.0  # ranking loss on the hop scores (averaged over hops)
    tau: float = 0.1  # soft-rank temperature, in batch standard deviations
    k: int = 10  # NDCG cut-off (loss and metric)
    eval_batch: int = 512
    missing: str = "error"  # absent layer entries: "error" or "fp16"
    linear_prior: bool | str = True  # the network learns the residual of a per-fold ridge on one-hot options;
    # "auto": per fold, with or without that prior, whichever validates better
    additive: bool = True  # a linear per-layer path beside the message-passing head (gnn.SensitivityGNN)
    learn: str = "auto"  # "auto": learn the one measured key (log) and read avg_bits & co exactly; "target"
    threads: int | None = 1  # torch CPU threads per fold: these small graphs run fastest on one
    workers: int = 1  # folds trained in parallel processes (e.g. 2 on a 2-core machine)
    tabular_baselines: bool = False  # also report gradient-boosted trees (slow on 2 cores: benchmarks turn it on)
    # {layer: {option: per-channel output shift}} (autobuild.output_shift): with tabular_baselines, also report
    # ridge and trees with the configuration's summed shift as features
    output_shifts: dict | None = None
    # {layer: {option: output-change signature}} (autobuild.output_shift.SIGNATURE): the prior may then also be
    # "ridge_shift", one-hot options plus a quadratic form of the summed signature's leading components
    shift_signature: dict | None = None
    # leading components of the signature in the ridge_shift prior; several: each is a candidate prior, by the same
    # inner CV (on mnist_unet's folds the inner CV picks 64 every time; the GNN's node features use the largest)
    shift_components: int | tuple[int, ...] = (32, 64)
    # how the signature was measured (multiquantizer, its hash, seed, seconds) or why it was not: recorded only
    shift_source: dict | None = None
    # the network learns the prior's residual on its training records from out-of-fold prior fits (inner K-fold),
    # as it will meet it on new records; False: in-sample residuals of the one prior fit
    cross_fit: bool = True
    # with a shift_signature: the GNN's layer nodes also read their option's output change on the prior's basis,
    # and a readout of the summed change feeds its head (autobuild.gnn.ShiftReadout)
    node_shifts: bool = True
    # with a prior, a network epoch is kept only if its validation score beats the prior's by more than the
    # standard error of that score (autobuild.train._prior_margin); False: by anything
    prior_margin: bool = True
    # with a shift_signature and a prior: kernel ridge of the prior's cross-fitted residual on the summed output
    # change (autobuild.train.fit_shift_kernel), kept only where its inner CV beats no correction
    shift_kernel: bool = True


# ----------------------------------------------------------------------------------------------- helpers
def _nanmean(values: Iterable[float]) -> float:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(values)) if values else float("nan")


def _as_target(target, records: Sequence[Mapping]) -> Callable[[Mapping], float]:
    if isinstance(target, str):
        keys = {k for r in records for k in r if isinstance(k, str)}
        return parse_target(target, keys)
    if callable(target):
        return target
    raise TypeError("target must be an expression string or a callable on a record")


def _target_ok(target, record: Mapping) -> bool:
    if "config" not in record:
        return False
    if isinstance(target, Target):
        return target.available(record)
    try:
        return math.isfinite(float(target(record)))
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return False


def make_folds(n: int, folds: int, seed: int) -> list[np.ndarray]:
    """One seeded permutation of ``range(n)``; fold f = its f-th contiguous chunk (~n/folds)."""
    if folds < 2 or folds > n:
        raise InputError(f"need 2 <= folds <= number of records ({n}), got {folds}")
    return [np.sort(c) for c in np.array_split(np.random.default_rng(seed).permutation(n), folds)]


# ----------------------------------------------------------------------------------------------- baselines
def _proxy_keys(records: Sequence[Mapping], exclude: set[str]) -> list[str]:
    """Numeric FP-reference proxy keys recorded on every record (``proxy_*``, ``*_fp``, ``psnr*``, ...)."""
    def is_proxy(key: str) -> bool:
        low = key.lower()
        return (low.startswith("proxy_") or low.endswith("_fp") or low.startswith(("psnr", "ssim", "lpips"))
                or key == "FID-FP-1k")

    keys = sorted({k for r in records for k in r if isinstance(k, str) and is_proxy(k) and k not in exclude})
    out = []
    for key in keys:
        try:
            values = [float(r[key]) for r in records]
        except (KeyError, TypeError, ValueError):
            continue
        if all(math.isfinite(v) for v in values):
            out.append(key)
    return out


def baseline_scores(records: Sequence[Mapping], exclude: Iterable[str] = ()) -> dict[str, np.ndarray]:
    """Training-free baseline scores per record, in their natural "higher = better" sign:
    ``avg_bits`` -> -avg_bits, ``quantized_error`` -> -(summed layer error), ``bops`` -> -bops, and every
    recorded FP-reference proxy key as is. Each fold re-orients them by the sign of their Spearman
    correlation with the target on its training part (so e.g. ``avg_bits`` predicts a target that rewards
    bits as well as one that penalises them). Proxy keys in ``exclude`` (those the target reads) and
    constant scores are left out."""
    exclude = set(exclude)
    out: dict[str, np.ndarray] = {}
    if all("avg_bits" in r for r in records):
        out["avg_bits"] = -np.array([float(r["avg_bits"]) for r in records])
    out["quantized_error"] = -np.array([float(r["quantized_error"]) if "quantized_error" in r else
                                        sum(float(e[3]) for e in r["config"].values()) for r in records])
    if all("bops" in r for r in records):
        out["bops"] = -np.array([float(r["bops"]) for r in records])
    for key in _proxy_keys(records, exclude):
        out[key] = np.array([float(r[key]) for r in records])
    return {name: score for name, score in out.items() if np.ptp(score) > 0}


def _fold_metrics(score: np.ndarray, y: np.ndarray, k: int) -> dict:
    return {"srcc": srcc(torch.as_tensor(score), torch.as_tensor(y)),
            "ndcg10": ndcg_at_k(torch.as_tensor(score), torch.as_tensor(y), k)}


# ----------------------------------------------------------------------------------------------- training
@dataclass
class Labels:
    """Per record: ``y`` the target (metrics), ``learned`` what the network regresses (e.g. log FID),
    ``known`` the exact configuration keys the plan composes the target with."""

    plan: LearningPlan
    y: torch.Tensor  # [M] float64
    learned: torch.Tensor  # [M] float64
    known: torch.Tensor  # [M, K] float64

    @classmethod
    def of(cls, plan: LearningPlan, records: Sequence[Mapping]) -> "Labels":
        y = torch.tensor([plan.target(r) for r in records], dtype=torch.float64)
        return cls(plan, y, torch.as_tensor(plan.learned(records)), torch.as_tensor(plan.known_values(records)))

    @property
    def hop_y(self) -> torch.Tensor:
        """What hop scores rank by: the learned quality, oriented like the target."""
        return self.y if self.plan.key is None else self.plan.sign * self.learned

    def compose(self, pred_z: torch.Tensor, index, mean: float, std: float, base: torch.Tensor) -> torch.Tensor:
        """Standardised network output (+ the linear prior ``base``) -> target units for records ``index``."""
        index = torch.as_tensor(index)
        learned = base[index].to(pred_z.device) + pred_z.double() * std + mean
        return self.plan.compose(learned, self.known[index].to(pred_z.device))


PRIOR_PAIR_LAYERS = 6  # pair terms among this many layers with the largest sparse main effects
PRIOR_INNER_FOLDS = 5
RIDGE_ALPHAS = np.logspace(-3, 3, 13)


def _inner_folds(n: int) -> int:
    return min(PRIOR_INNER_FOLDS, n)


def _fit_ridge(x: np.ndarray, target: np.ndarray, seed: int | None = None):
    """RidgeCV over :data:`RIDGE_ALPHAS`; with ``seed``, alpha by seeded K-fold MSE (comparable with the lasso
    candidates), else by the efficient leave-one-out.

    The K-fold search is what ``RidgeCV(alphas, cv=KFold(...), scoring="neg_mean_squared_error")`` computes (the
    fold-averaged MSE of ridge with intercept per alpha, the first of equal ones, then a refit on every record),
    with each fold's whole alpha path solved from one SVD of its centred training rows instead of a separate
    scikit-learn fit per alpha and fold (65 of them: most of a predictor's training time on small data). The
    refit is scikit-learn's Ridge, carrying ``alpha_`` and ``best_score_`` as RidgeCV does."""
    from sklearn.linear_model import Ridge, RidgeCV
    from sklearn.model_selection import KFold

    if seed is None:
        return RidgeCV(alphas=RIDGE_ALPHAS).fit(x, target)
    folds = KFold(_inner_folds(len(target)), shuffle=True, random_state=seed)
    features, y = np.asarray(x, dtype=np.float64), np.asarray(target, dtype=np.float64)
    mse = np.zeros(len(RIDGE_ALPHAS))
    for train, test in folds.split(features):
        x_mean, y_mean = features[train].mean(axis=0), y[train].mean()
        u, s, vt = np.linalg.svd(features[train] - x_mean, full_matrices=False)
        shrink = s / (s ** 2 + RIDGE_ALPHAS[:, None])  # [alphas, components]
        coefs = (shrink * (u.T @ (y[train] - y_mean))) @ vt  # [alphas, features]
        pred = (features[test] - x_mean) @ coefs.T + y_mean  # [test records, alphas]
        mse += ((pred - y[test][:, None]) ** 2).mean(axis=0)
    best = int(np.argmin(mse))
    model = Ridge(alpha=float(RIDGE_ALPHAS[best])).fit(x, target)
    model.alpha_, model.best_score_ = float(RIDGE_ALPHAS[best]), -float(mse[best] / folds.get_n_splits())
    return model


def _fit_lasso(x: np.ndarray, target: np.ndarray, seed: int):
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LassoCV
    from sklearn.model_selection import KFold

    # scikit-learn's own path (30 alphas from the smallest that zeroes every coefficient down to 1e-3 of it),
    # spelled out: scikit-learn >= 1.3 is supported and only 1.7 takes a number of alphas as ``alphas``
    centred = target - target.mean()
    alpha_max = float(np.abs((x - x.mean(axis=0)).T @ centred).max()) / len(target)
    alphas = np.geomspace(alpha_max, alpha_max * 1e-3, 30) if alpha_max > 0 else np.array([1e-6])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return LassoCV(alphas=alphas, cv=KFold(_inner_folds(len(target)), shuffle=True, random_state=seed), max_iter=5000,
                       random_state=seed).fit(x, target)


def _prior_entry(kind: str, model, columns, cv_mse: dict) -> dict:
    return {"kind": kind, "coef": model.coef_.astype(np.float64).tolist(), "intercept": float(model.intercept_),
            "alpha": float(model.alpha_), "columns": [column_to_json(c) for c in columns],
            "cv_mse": {k: float(v) for k, v in cv_mse.items()}}


PRIOR_KINDS = ("ridge", "lasso", "lasso_pairs", "ridge_shift")
SHIFT_WEIGHTS = (0.1, 0.3, 1.0, 3.0, 10.0)  # scales of the quadratic shift block beside the one-hot columns (its own penalty)


def fit_prior(records: Sequence[Mapping], learned: np.ndarray, train_idx: np.ndarray, keys: Sequence[str],
              seed: int = 0, kinds: Sequence[str] = PRIOR_KINDS, shift_basis=None) -> dict:
    """The linear prior of the learned value, fitted on ``train_idx`` only: of ridge on one-hot (layer, option),
    lasso on the same columns (few layers matter), lasso with pair terms (every option combination of every
    pair of the :data:`PRIOR_PAIR_LAYERS` layers with the largest lasso main effects) and, given a
    ``shift_basis`` (:func:`autobuild.output_shift.shift_basis`, or a sequence of them: one candidate each), ridge
    on one-hot plus the quadratic form of the configuration's summed output change (``ridge_shift``), the one with
    the lowest seeded inner K-fold MSE. Where
    log FID is additive (mnist_dit) ridge or lasso win; where signed output shifts of several layers add and cancel
    (mnist_unet, autobuild/output_shift.py) the quadratic form expresses it and pair terms only in part."""
    train_idx = np.asarray(train_idx)
    if _inner_folds(len(train_idx)) < 3:  # too few records to compare candidates: the additive reference
        return ridge_prior(records, learned, train_idx, keys)
    part = [records[i] for i in train_idx]
    singles = option_columns(part, keys)
    x = encode_options(part, singles)
    target = np.asarray(learned, dtype=np.float64)[train_idx]
    fitted: dict[str, tuple] = {}
    if "ridge" in kinds:
        model = _fit_ridge(x, target, seed)
        fitted["ridge"] = (model, singles, -float(model.best_score_))
    shift_entry = None
    if "ridge_shift" in kinds:
        for basis in _as_bases(shift_basis):  # the components with the lowest inner-CV error
            model, entry, mse = _fit_ridge_shift(part, x, target, basis, seed)
            if "ridge_shift" not in fitted or mse < fitted["ridge_shift"][2]:
                fitted["ridge_shift"], shift_entry = (model, singles, mse), entry
    if "lasso" in kinds or "lasso_pairs" in kinds:
        model = _fit_lasso(x, target, seed)
        fitted["lasso"] = (model, singles, float(model.mse_path_.mean(axis=1).min()))
        if "lasso_pairs" in kinds:
            effect: dict[str, list[float]] = {}
            for (term,), c in zip(singles, model.coef_):
                effect.setdefault(term[0], []).append(float(c))
            ranked = sorted((k for k in effect if np.ptp(effect[k]) > 0), key=lambda k: -np.ptp(effect[k]))
            top = [k for k in keys if k in ranked[:PRIOR_PAIR_LAYERS]]
            if len(top) >= 2:
                columns = singles + pair_columns(part, top)
                model = _fit_lasso(encode_options(part, columns), target, seed)
                fitted["lasso_pairs"] = (model, columns, float(model.mse_path_.mean(axis=1).min()))
    cv_mse = {kind: item[2] for kind, item in fitted.items()}
    best = min((k for k in kinds if k in fitted), key=cv_mse.__getitem__)
    if best == "ridge_shift":
        model, columns = fitted[best][:2]
        width = len(columns)
        entry = _prior_entry(best, _Coef(model.coef_[:width], model.intercept_, model.alpha_), columns, cv_mse)
        return {**entry, "shift": {**shift_entry, "coef": (shift_entry["weight"] * model.coef_[width:]).tolist()}}
    return _prior_entry(best, fitted[best][0], fitted[best][1], cv_mse)


@dataclass
class _Coef:
    coef_: np.ndarray
    intercept_: float
    alpha_: float


def _fit_ridge_shift(part: Sequence[Mapping], onehot: np.ndarray, target: np.ndarray, basis, seed: int):
    """Ridge on ``[one-hot, weight * quadratic shift features]`` for each of :data:`SHIFT_WEIGHTS` (a separate
    penalty for the quadratic block): the weight with the lowest inner K-fold MSE -> (model, shift entry, MSE).
    The summed coordinates are first rescaled to unit spread over these records (the entry's basis carries it)."""
    from .output_shift import ShiftBasis, quadratic_shift_features

    k = basis.components
    z_spread = float(quadratic_shift_features(part, basis)[:, :k].std()) or 1.0
    basis = ShiftBasis({n: [v / z_spread for v in c] for n, c in basis.coords.items()}, basis.scale * z_spread)
    quad = quadratic_shift_features(part, basis)
    best = None
    for weight in SHIFT_WEIGHTS:
        model = _fit_ridge(np.hstack([onehot, weight * quad]), target, seed)
        if best is None or -float(model.best_score_) < best[2]:
            best = (model, weight, -float(model.best_score_))
    model, weight, mse = best
    return model, {"basis": basis.to_json(), "weight": weight}, mse


def _as_bases(shift_basis) -> list:
    """None, one :class:`autobuild.output_shift.ShiftBasis` or a sequence of them -> a list."""
    from .output_shift import ShiftBasis

    if shift_basis is None:
        return []
    return [shift_basis] if isinstance(shift_basis, ShiftBasis) else list(shift_basis)


def _basis_of_prior(prior: Mapping, bases) -> list:
    """The candidate basis a fitted ``ridge_shift`` prior chose (by its number of components), as a one-item list;
    all of them for other kinds (their refits ignore it)."""
    bases = _as_bases(bases)
    if not prior.get("shift"):
        return bases
    components = len(next(iter(prior["shift"]["basis"]["coords"].values())))
    return [b for b in bases if b.components == components]


def ridge_prior(records: Sequence[Mapping], learned: np.ndarray, train_idx: np.ndarray, keys: Sequence[str]) -> dict:
    """Ridge on one-hot (layer, option) alone (alpha by leave-one-out): the additive reference baseline."""
    part = [records[i] for i in np.asarray(train_idx)]
    singles = option_columns(part, keys)
    model = _fit_ridge(encode_options(part, singles), np.asarray(learned, dtype=np.float64)[np.asarray(train_idx)])
    return _prior_entry("ridge", model, singles, {})


KERNEL_ALPHAS = (0.03, 0.1, 0.3, 1.0, 3.0)
KERNEL_GAMMAS = (1.0, 3.0, 10.0, 30.0)  # x 1 / components: an RBF over coordinates of unit spread


def fit_shift_kernel(records: Sequence[Mapping], residual: np.ndarray, train_idx: np.ndarray, basis, seed: int = 0,
                     choice: Mapping | None = None):
    """Kernel ridge (RBF, no intercept) of a prior's residual on the configuration's summed output-change
    coordinates (``basis``, :func:`autobuild.output_shift.shift_basis`): the local structure of log FID in the
    summed change that a quadratic form misses (mnist_unet: a narrow kernel explains a few % of the ridge_shift
    prior's out-of-sample residual; an MLP of the same coordinates, early-stopped, finds nothing).

    ``residual`` [records] must be out of sample for ``train_idx`` (cross-fitted). (alpha, gamma) from
    :data:`KERNEL_ALPHAS` x :data:`KERNEL_GAMMAS` by seeded inner K-fold MSE; the kernel is kept only if that MSE
    beats no correction by more than the standard error of the paired difference (the guard: else ``None``).
    Returns (kernel entry for :func:`autobuild.ensemble.kernel_values` or None, the inner out-of-fold corrections
    of the ``train_idx`` records (zeros without a kernel), info). ``choice`` ({alpha, gamma}): fit those without a
    search (a refit on more records)."""
    from .output_shift import summed_shift_coords

    train_idx = np.asarray(train_idx)
    z_all = summed_shift_coords([records[i] for i in train_idx], basis)
    spread = float(z_all.std()) or 1.0
    z_all = z_all / spread
    r_all = np.asarray(residual, dtype=np.float64)[train_idx]

    def entry(alpha: float, gamma: float) -> dict:
        gram = np.exp(-gamma * _squared_distances(z_all, z_all))
        dual = np.linalg.solve(gram + alpha * np.eye(len(r_all)), r_all)
        return {"basis": basis.to_json(), "spread": spread, "gamma": gamma, "alpha": alpha,
                "support": z_all.tolist(), "dual": dual.tolist()}

    if choice is not None:
        return entry(float(choice["alpha"]), float(choice["gamma"])), None, dict(choice)
    if _inner_folds(len(train_idx)) < 3:
        return None, np.zeros(len(train_idx)), {"kept": False, "reason": "too few records"}
    distances = _squared_distances(z_all, z_all)
    order = np.random.default_rng([seed, 78]).permutation(len(train_idx))
    parts = np.array_split(order, _inner_folds(len(train_idx)))
    best = None
    for gamma in (g / basis.components for g in KERNEL_GAMMAS):
        gram = np.exp(-gamma * distances)
        for alpha in KERNEL_ALPHAS:
            inner = np.zeros(len(train_idx))
            for part in parts:
                fit = np.setdiff1d(order, part)
                dual = np.linalg.solve(gram[np.ix_(fit, fit)] + alpha * np.eye(len(fit)), r_all[fit])
                inner[part] = gram[np.ix_(part, fit)] @ dual
            gain = r_all ** 2 - (r_all - inner) ** 2  # per record: squared error saved over no correction
            if best is None or gain.mean() > best[0].mean():
                best = (gain, alpha, gamma, inner)
    gain, alpha, gamma, inner = best
    margin = float(gain.std(ddof=1) / math.sqrt(len(gain)))
    info = {"alpha": alpha, "gamma": gamma, "cv_mse": float(np.mean((r_all - inner) ** 2)),
            "cv_mse_none": float(np.mean(r_all ** 2)), "cv_gain": float(gain.mean()), "margin": margin}
    if gain.mean() <= margin:
        return None, np.zeros(len(train_idx)), {**info, "kept": False}
    return entry(alpha, gamma), inner, {**info, "kept": True}


def error_features(records: Sequence[Mapping], keys: Sequence[str]) -> np.ndarray:
    """``[records, layers]`` log1p(100 x weight error) of each layer's chosen option (the GNN's numeric node
    feature), for tabular models beside the one-hot options."""
    return np.array([[math.log1p(100.0 * max(float(r["config"][k][3]), 0.0)) if k in r["config"] else 0.0
                      for k in keys] for r in records], dtype=np.float64)


def _fit_gbm(features: np.ndarray, learned: np.ndarray, train_idx: np.ndarray, seed: int, residual_of=None):
    """Gradient-boosted trees (scikit-learn) of the learned value (or of the residual of ``residual_of``)."""
    from sklearn.ensemble import HistGradientBoostingRegressor

    target = learned[train_idx] - (0.0 if residual_of is None else residual_of[train_idx])
    return HistGradientBoostingRegressor(max_iter=200, learning_rate=0.05, max_leaf_nodes=15, min_samples_leaf=10,
                                         random_state=seed).fit(features[train_idx], target)


@torch.no_grad()
def _predict(model: SensitivityGNN, dataset: ConfigDataset, index: np.ndarray, device, chunk: int) -> dict:
    model.eval()
    preds, hops = [], []
    for start in range(0, len(index), chunk):
        out = model(dataset.collate(index[start:start + chunk]).to(device))
        preds.append(out["pred"].cpu())
        hops.append(out["hop_scores"].cpu())
    return {"pred": torch.cat(preds), "hop_scores": torch.cat(hops)}


@torch.no_grad()
def _moments(model: SensitivityGNN, dataset: ConfigDataset, index: np.ndarray, device, chunk: int) -> dict:
    """Training-set moments used to z-score scores at inference: graph-level hop scores, and per-node L1
    norms over each hop's read-out nodes (unit scoring)."""
    model.eval()
    hop_scores, node_sum, node_sq, node_count = [], 0.0, 0.0, 0.0
    for start in range(0, len(index), chunk):
        batch = dataset.collate(index[start:start + chunk]).to(device)
        hop_scores.append(model(batch)["hop_scores"].cpu())
        norms = model.node_hop_norms(batch).cpu().double()
        mask = batch.hop_mask.cpu().double()
        node_sum = node_sum + (norms * mask).sum(0)
        node_sq = node_sq + (norms ** 2 * mask).sum(0)
        node_count = node_count + mask.sum(0)
    s = torch.cat(hop_scores).double()
    node_mean = node_sum / node_count.clamp_min(1)
    node_std = (node_sq / node_count.clamp_min(1) - node_mean ** 2).clamp_min(0).sqrt()
    return {"hop_score_mean": s.mean(0).tolist(), "hop_score_std": s.std(0, unbiased=False).clamp_min(1e-8).tolist(),
            "node_norm_mean": node_mean.tolist(), "node_norm_std": node_std.clamp_min(1e-8).tolist()}


def _selection_score(loss: str, pred: torch.Tensor, y: torch.Tensor, k: int) -> float:
    s = srcc(pred, y)
    s = -1.0 if math.isnan(s) else s
    if loss == "srcc":
        return s
    n = ndcg_at_k(pred, y, k)
    return 0.5 * (s + (0.0 if math.isnan(n) else n))


def _train_fold(dataset: ConfigDataset, labels: Labels, base: torch.Tensor, train_idx: np.ndarray,
                val_idx: np.ndarray, loss: str, epochs: int, batch_size: int, seed: int, device, opts: TrainOptions,
                log: Callable[[str], None] | None):
    torch.manual_seed(seed)
    template = dataset.template
    model = SensitivityGNN(template.num_ops, template.num_blocks, opts.hidden, opts.layers, opts.heads,
                           opts.dropout, opts.additive, template.shift_dim).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=opts.lr, weight_decay=opts.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(epochs, 1))
    residual = labels.learned - base
    u_train = residual[train_idx]
    u_mean, u_std = float(u_train.mean()), float(u_train.std(unbiased=False).clamp_min(1e-8))
    z = ((residual - u_mean) / u_std).float()
    y_all, hop_y = labels.y.float(), labels.hop_y.float()
    generator = torch.Generator().manual_seed(seed)
    batch_size = batch_size if batch_size > 0 else len(train_idx)

    def validation_score() -> float:
        if len(val_idx) < 2:  # no validation split: keep the last epoch
            return float(epoch)
        val = _predict(model, dataset, val_idx, device, opts.eval_batch)
        composed = labels.compose(val["pred"], val_idx, u_mean, u_std, base)
        return _selection_score(loss, composed, labels.y[val_idx], opts.k)

    epoch = 0
    if opts.linear_prior:  # start from the prior alone (zero residual); keep it unless the network beats it
        with torch.no_grad():
            for layer in (model.head[-1], model.additive, None if model.shift_head is None else model.shift_head[-1]):
                if layer is not None:
                    layer.weight.zero_()
                    layer.bias.zero_()
            model.head[-1].bias.fill_(-u_mean / u_std)  # z * std + mean = 0: the prediction is the prior
    best = (validation_score() if opts.linear_prior else -math.inf, copy.deepcopy(model.state_dict()), 0)
    # an epoch replaces the prior only by more than a validation SRCC's standard error: a 60-record validation
    # split otherwise picks epochs that beat the prior by its noise (they lost to it on the test folds)
    bar = best[0] + (_prior_margin(best[0], len(val_idx)) if opts.linear_prior and opts.prior_margin else 0.0)
    stale, epoch, last_objective, started = 0, 0, float("nan"), time.perf_counter()
    for epoch in range(1, epochs + 1):
        model.train()
        order = torch.as_tensor(train_idx)[torch.randperm(len(train_idx), generator=generator)]
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            if len(chunk) < 2:  # BatchNorm and ranking both need at least two graphs
                continue
            out = model(dataset.collate(chunk).to(device))
            y = y_all[chunk].to(device)
            composed = labels.compose(out["pred"], chunk, u_mean, u_std, base).float()
            objective = ranking_loss(loss, composed, y, opts.k, opts.tau)
            if opts.mse_weight:
                objective = objective + opts.mse_weight * F.mse_loss(out["pred"], z[chunk].to(device))
            if opts.hop_weight:
                ranked = hop_y[chunk].to(device)
                hop_losses = [ranking_loss(loss, out["hop_scores"][:, h], ranked, opts.k, opts.tau)
                              for h in range(out["hop_scores"].shape[1])]
                objective = objective + opts.hop_weight * torch.stack(hop_losses).mean()
            optimizer.zero_grad(set_to_none=True)
            objective.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), opts.grad_clip)
            optimizer.step()
            last_objective = float(objective.detach())
        scheduler.step()
        score = validation_score()
        if score > max(best[0], bar):
            best, stale = (score, copy.deepcopy(model.state_dict()), epoch), 0
        else:
            stale += 1
        if log and (epoch == 1 or epoch % 25 == 0):
            log(f"  epoch {epoch}: objective {last_objective:.4f}, validation {score:.4f} "
                f"({progress_line('epochs', epoch, epochs, time.perf_counter() - started, 'epoch')}"
                f"{'' if epoch >= epochs else ' at most: early stopping may end the fold sooner'})")
        if stale >= opts.patience and epoch >= opts.min_epochs:
            break
    model.load_state_dict(best[1])
    model.eval()
    return model, {"learned_mean": u_mean, "learned_std": u_std, "best_epoch": best[2], "epochs_run": epoch,
                   "val_selection": best[0]}


def _prior_margin(score: float, n: int) -> float:
    """The standard error of a Spearman correlation ``score`` on ``n`` records, (1 - rho^2) / sqrt(n - 3)."""
    return (1.0 - min(max(score, 0.0), 1.0) ** 2) / math.sqrt(max(n - 3, 1))


def _run_fold(dataset: ConfigDataset, labels: Labels, records: Sequence[Mapping], f: int, train_idx: np.ndarray,
              val_idx: np.ndarray, test_idx: np.ndarray, loss: str, epochs: int, batch_size: int, seed: int,
              device: str, opts: TrainOptions, log: Callable[[str], None] | None = None):
    """Train one fold and evaluate it on its test chunk: (result, CPU state dict, ensemble info)."""
    previous_threads = torch.get_num_threads()
    if opts.threads and torch.device(device).type == "cpu":
        torch.set_num_threads(opts.threads)
    try:
        started = time.perf_counter()
        keys = [k for k in dataset.template.keys if k]
        learned = labels.learned.numpy()
        # The prior the network trains against sees the training part only: fitted on the validation split too,
        # its validation residuals would be too small for any network epoch to look better than epoch 0.
        bases = _bases_of(opts)
        fitted = fit_prior(records, learned, train_idx, keys, seed, shift_basis=bases) if opts.linear_prior else None
        # "auto": the fold's validation split decides between the GNN on the prior's residual and the GNN alone
        # (where log FID is far from additive, a prior it cannot leave holds the network back)
        variants = [True, False] if opts.linear_prior == "auto" else [bool(opts.linear_prior)]
        best = None
        for use_prior in variants:
            prior = fitted if use_prior else None
            base = prior_values(prior, records)
            if prior is not None and opts.cross_fit:  # the network sees the prior's out-of-sample errors
                base[torch.as_tensor(train_idx)] = _out_of_fold_prior(records, learned, train_idx, keys, seed,
                                                                      prior["kind"], _basis_of_prior(prior, bases))
            kernel_info, residual = None, learned - base.numpy()  # out of sample (with cross_fit) on every record
            if prior is not None and opts.shift_kernel and bases:  # on the same out-of-sample residuals
                kernel, inner, kernel_info = fit_shift_kernel(records, residual, train_idx,
                                                              max(bases, key=lambda b: b.components), seed)
                if kernel is not None:
                    prior = {**prior, "kernel": kernel}
                    others = np.setdiff1d(np.arange(len(records)), train_idx)
                    base[torch.as_tensor(train_idx)] += torch.as_tensor(inner)
                    base[torch.as_tensor(others)] += torch.as_tensor(kernel_values(kernel, [records[i] for i in others]))
            trained = _train_fold(dataset, labels, base, train_idx, val_idx, loss, epochs, batch_size, seed, device,
                                  replace(opts, linear_prior=use_prior), log)
            if best is None or trained[1]["val_selection"] > best[1]["val_selection"]:
                best = (*trained, prior, base, kernel_info, residual)
        model, info, prior, base, kernel_info, residual = best
        info["prior_used"] = prior is not None
        if prior is not None:  # the kept prior of the same kind, refitted on training + validation part
            rest = np.sort(np.concatenate([train_idx, val_idx]))
            kernel = prior.get("kernel")
            prior = fit_prior(records, learned, rest, keys, seed, kinds=(prior["kind"],),
                              shift_basis=_basis_of_prior(prior, bases))
            if kernel is not None:  # its (alpha, gamma) refitted on rest's out-of-sample residuals of the prior
                prior["kernel"] = fit_shift_kernel(records, residual, rest, max(bases, key=lambda b: b.components),
                                                   seed, choice=kernel_info)[0]
            base = prior_values(prior, records)
        test = _predict(model, dataset, test_idx, device, opts.eval_batch)
        y_test, hop_y = labels.y[test_idx], labels.hop_y[test_idx]
        pred = labels.compose(test["pred"], test_idx, info["learned_mean"], info["learned_std"], base)
        hops = test["hop_scores"]
        result = {"fold": f, "n_train": len(train_idx), "n_val": len(val_idx), "n_test": len(test_idx),
                  "srcc": srcc(pred, y_test), "ndcg10": ndcg_at_k(pred, y_test, opts.k),
                  "mae": float((pred - y_test).abs().mean()),
                  "learned_srcc": srcc(base[test_idx] + test["pred"].double() * info["learned_std"],
                                       labels.learned[test_idx]),
                  "hop_srcc": [srcc(hops[:, h], hop_y) for h in range(hops.shape[1])],
                  "hop_ndcg10": [ndcg_at_k(hops[:, h], hop_y, opts.k) for h in range(hops.shape[1])],
                  "best_epoch": info["best_epoch"], "epochs_run": info["epochs_run"],
                  "prior_used": info["prior_used"], "prior_kind": None if prior is None else prior["kind"],
                  "shift_kernel": kernel_info}
        moments = _moments(model, dataset, train_idx, device, opts.eval_batch)
        result["seconds"] = time.perf_counter() - started
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        info = {**info, **moments, "prior": prior, "hop_srcc": result["hop_srcc"], "test_srcc": result["srcc"],
                "test_ndcg10": result["ndcg10"]}
        return result, state, info
    finally:
        torch.set_num_threads(previous_threads)


def _table_summaries(opts: TrainOptions) -> dict:
    """The shift tables in the recorded options by size and content hash, not by value (a signature is ~1M floats)."""
    import hashlib
    import json

    def summary(table):
        if not table:
            return None
        text = json.dumps(table, sort_keys=True).encode()
        return {"entries": sum(len(v) for v in table.values()), "width": len(next(iter(next(iter(table.values())).values()))),
                "sha256": hashlib.sha256(text).hexdigest()}

    return {"output_shifts": summary(opts.output_shifts), "shift_signature": summary(opts.shift_signature)}


def _out_of_fold_prior(records: Sequence[Mapping], learned: np.ndarray, train_idx: np.ndarray, keys: Sequence[str],
                       seed: int, kind: str, basis) -> torch.Tensor:
    """The prior of ``kind`` on each training record from a fit on the other inner folds (seeded K-fold over
    ``train_idx``). In-sample a flexible prior (pair or quadratic shift terms) fits the training records' noise,
    so their residuals are too small and nothing like the errors on new records: a network trained on them
    learns that noise (mnist_unet: 0.887 held out with in-sample residuals vs 0.904 for the prior alone)."""
    train_idx = np.asarray(train_idx)
    out = torch.zeros(len(train_idx), dtype=torch.float64)
    order = np.random.default_rng([seed, 77]).permutation(len(train_idx))
    for part in np.array_split(order, _inner_folds(len(train_idx))):
        inner = np.sort(train_idx[np.setdiff1d(order, part)])
        fitted = fit_prior(records, learned, inner, keys, seed, kinds=(kind,), shift_basis=basis)
        out[torch.as_tensor(part)] = prior_values(fitted, [records[i] for i in train_idx[part]])
    return out


def _bases_of(opts: TrainOptions) -> list:
    """The shift prior's candidate bases, one per count in ``shift_components`` (label-free: the signature table
    alone), or none without a signature."""
    counts = [opts.shift_components] if isinstance(opts.shift_components, int) else list(opts.shift_components)
    if not opts.shift_signature:
        return []
    from .output_shift import shift_basis

    bases: dict[int, object] = {}
    for k in sorted(set(counts)):
        if k > 0:  # a count above the table's rank gives the same basis as the rank: fitted once
            basis = shift_basis(opts.shift_signature, k)
            bases.setdefault(basis.components, basis)
    return list(bases.values())


def _run_fold_job(job: tuple):
    return _run_fold(*job)


def _log_fold(log: Callable[[str], None] | None, result: Mapping) -> None:
    if log:
        log(f"fold {result['fold'] + 1}: test SRCC {result['srcc']:.4f}, NDCG@10 {result['ndcg10']:.4f}, "
            f"hop SRCC {[round(v, 3) for v in result['hop_srcc']]}, {result['seconds']:.1f}s "
            f"(best epoch {result['best_epoch']}/{result['epochs_run']})")


def train_predictor(records: Sequence[Mapping], graph: nx.DiGraph | GraphTemplate, target: str | Callable,
                    loss: str = "srcc", folds: int = 5, epochs: int = 300, batch_size: int = 128, seed: int = 12345,
                    device: str = "cpu", out_dir: str | Path | None = None, units: Iterable | None = None,
                    options: TrainOptions | None = None, log: Callable[[str], None] | None = print) -> dict:
    """Seeded K-fold CV of :class:`SensitivityGNN` on scored configurations; returns the metrics dict
    (also written to ``out_dir/metrics.json`` with the fold ensemble when ``out_dir`` is given).

    ``target``: expression over record keys (higher = better), e.g. ``"-1*FID-GT-1k - avg_bits*150"``.
    ``units``: unit definitions (``.output``, ``.hops``) whose outputs form the hop read-out sets."""
    if loss not in ("srcc", "ndcg", "hybrid"):
        raise InputError(f"loss must be srcc, ndcg or hybrid, got {loss!r}")
    opts = options or TrainOptions()
    device = torch.device(device)
    target_fn = _as_target(target, records)
    target_expr = target if isinstance(target, str) else getattr(target, "expr", getattr(target, "__name__", "custom"))
    valid = [i for i, r in enumerate(records) if _target_ok(target_fn, r)]
    if len(valid) < max(folds, 2) * 2:
        if len(valid) == len(records):  # every target is fine: there are just too few records for the folds
            raise InputError(f"{len(records)} records are too few for {folds}-fold cross-validation (at least "
                             f"{max(folds, 2) * 2} needed): score more configurations or pass fewer --folds")
        raise InputError(f"only {len(valid)} of {len(records)} records have a finite target {target_expr!r} "
                         f"(at least {max(folds, 2) * 2} needed for {folds} folds): check the target's keys, "
                         f"score more configurations or pass fewer --folds")
    kept = [records[i] for i in valid]
    bases = _bases_of(opts)
    if isinstance(graph, GraphTemplate):
        template = graph
    else:  # with a signature (and node_shifts), each layer node also reads its option's output change
        node_basis = max(bases, key=lambda b: b.components) if bases and opts.node_shifts else None
        template = GraphTemplate.from_graph(graph, units, opts.layers,
                                            shift_coords=None if node_basis is None else node_basis.coords)
    if template.num_hops != opts.layers:
        raise InputError(f"graph template has {template.num_hops} hop levels, the model {opts.layers} layers")
    dataset = cache_to_dataset(kept, template, target_fn, missing=opts.missing)
    plan = learning_plan(target_fn, kept, opts.learn) if isinstance(target_fn, Target) else LearningPlan(target_fn)
    labels = Labels.of(plan, kept)
    y = labels.y.numpy().copy()  # a copy: sending labels to fold processes moves tensors to shared memory
    fold_index = make_folds(len(kept), folds, seed)

    exclude = set(getattr(target_fn, "names", ()))
    fixed_baselines = baseline_scores(kept, exclude)
    layer_keys = [k for k in template.keys if k]
    singles = option_columns(kept, layer_keys)
    onehot = encode_options(kept, singles)
    ridge_names = ["ridge_options"] + (["ridge_learned", "prior_learned"] if plan.key is not None else []) + (
        ["prior_no_kernel_learned"] if plan.key is not None and opts.linear_prior and opts.shift_kernel and bases
        else []) + (
        ["gbm_learned", "ridge_gbm_learned"] if plan.key is not None and opts.tabular_baselines else [])
    tabular = np.hstack([onehot, error_features(kept, layer_keys)]) if opts.tabular_baselines else None
    shifted = None
    if tabular is not None and plan.key is not None and opts.output_shifts:
        from .output_shift import shift_features

        shifts = shift_features(kept, opts.output_shifts)
        shifted = (np.hstack([onehot, shifts]), np.hstack([tabular, shifts]))
        ridge_names += ["ridge_shift_learned", "gbm_shift_learned"]
    baseline_folds: dict[str, list[dict]] = {name: [] for name in [*fixed_baselines, *ridge_names]}

    splits = []
    for f, test_idx in enumerate(fold_index):
        rest = np.setdiff1d(np.arange(len(kept)), test_idx)  # sorted
        n_val = int(round(opts.val_fraction * len(rest))) if opts.val_fraction > 0 else 0
        n_val = n_val if n_val >= 2 and len(rest) - n_val >= 2 else 0
        shuffled = np.random.default_rng(seed + 1000 + f).permutation(rest)
        splits.append((f, np.sort(shuffled[n_val:]), np.sort(shuffled[:n_val]), test_idx))

    started_all = time.perf_counter()
    jobs = [(dataset, labels, kept, f, train_idx, val_idx, test_idx, loss, epochs, batch_size, seed + f, str(device), opts)
            for f, train_idx, val_idx, test_idx in splits]
    workers = max(1, min(int(opts.workers), folds))
    if workers == 1:
        outcomes = []
        for job in jobs:
            if log:
                log(f"fold {job[3] + 1}/{folds}: train {len(job[4])}, validation {len(job[5])}, test {len(job[6])}")
            outcomes.append(_run_fold(*job, log=log))
            _log_fold(log, outcomes[-1][0])
            if log:
                log(progress_line("folds", len(outcomes), folds, time.perf_counter() - started_all, "fold"))
    else:  # folds in parallel processes, one torch thread each (CPU)
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        if log:
            log(f"training {folds} folds in {workers} processes")
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [pool.submit(_run_fold_job, job) for job in jobs]
            for done, future in enumerate(as_completed(futures), 1):
                _log_fold(log, future.result()[0])
                if log:
                    log(progress_line("folds", done, folds, time.perf_counter() - started_all, "fold"))
            outcomes = [future.result() for future in futures]  # fold order
    wall = time.perf_counter() - started_all
    fold_results = [o[0] for o in outcomes]
    fold_states = [o[1] for o in outcomes]
    fold_infos = [o[2] for o in outcomes]

    # baselines on the same folds and target; orientation / fit only on each fold's training part
    for f, train_idx, val_idx, test_idx in splits:
        rest = np.sort(np.concatenate([train_idx, val_idx]))
        for name, score in fixed_baselines.items():
            rho = srcc(torch.as_tensor(score[rest]), torch.as_tensor(y[rest]))
            sign = -1.0 if (not math.isnan(rho) and rho < 0) else 1.0
            baseline_folds[name].append({**_fold_metrics(sign * score[test_idx], y[test_idx], opts.k), "sign": sign})
        test_records = [kept[i] for i in test_idx]
        ridge = prior_values(ridge_prior(kept, y, rest, layer_keys), test_records).numpy()
        baseline_folds["ridge_options"].append(_fold_metrics(ridge, y[test_idx], opts.k))
        if plan.key is not None:  # the same split as the GNN's: linear models of the learned key, composed exactly
            learned_all = labels.learned.numpy()
            ridge = ridge_prior(kept, learned_all, rest, layer_keys)
            for name, linear in (("ridge_learned", ridge),  # additive reference; then the GNN's prior alone
                                 ("prior_learned", fold_infos[f]["prior"] or fit_prior(
                                     kept, learned_all, rest, layer_keys, seed + f, shift_basis=bases))):
                composed = plan.compose(prior_values(linear, test_records), labels.known[test_idx]).numpy()
                baseline_folds[name].append({**_fold_metrics(composed, y[test_idx], opts.k), "kind": linear["kind"]})
            if "prior_no_kernel_learned" in baseline_folds:  # the same prior without its kernel residual
                linear = {k: v for k, v in (fold_infos[f]["prior"] or {}).items() if k != "kernel"} or fit_prior(
                    kept, learned_all, rest, layer_keys, seed + f, shift_basis=bases)
                composed = plan.compose(prior_values(linear, test_records), labels.known[test_idx]).numpy()
                baseline_folds["prior_no_kernel_learned"].append({**_fold_metrics(composed, y[test_idx], opts.k),
                                                                  "kind": linear["kind"]})
            if tabular is not None:  # nonlinear tabular baselines: trees, and trees on the ridge residual
                gbm = _fit_gbm(tabular, learned_all, rest, seed + f)
                pred = torch.as_tensor(gbm.predict(tabular[test_idx]))
                baseline_folds["gbm_learned"].append(_fold_metrics(
                    plan.compose(pred, labels.known[test_idx]).numpy(), y[test_idx], opts.k))
                prior_all = prior_values(ridge, kept).numpy()
                residual = _fit_gbm(tabular, learned_all, rest, seed + f, residual_of=prior_all)
                pred = torch.as_tensor(prior_all[test_idx] + residual.predict(tabular[test_idx]))
                baseline_folds["ridge_gbm_learned"].append(_fold_metrics(
                    plan.compose(pred, labels.known[test_idx]).numpy(), y[test_idx], opts.k))
            if shifted is not None:  # the same models with the summed output shift beside the options
                ridge_x, gbm_x = shifted
                for name, fitted, features in (
                        ("ridge_shift_learned", _fit_ridge(ridge_x[rest], learned_all[rest]), ridge_x),
                        ("gbm_shift_learned", _fit_gbm(gbm_x, learned_all, rest, seed + f), gbm_x)):
                    pred = torch.as_tensor(fitted.predict(features[test_idx]))
                    baseline_folds[name].append(_fold_metrics(
                        plan.compose(pred, labels.known[test_idx]).numpy(), y[test_idx], opts.k))

    metrics = {
        "target": target_expr, "learned": plan.to_json(), "loss": loss, "folds_k": folds, "seed": seed,
        "device": str(device), "prior_columns": [column_to_json(c) for c in singles] if opts.linear_prior else None,
        "n_records": len(records), "n_valid": len(kept), "dropped_records": sorted(set(range(len(records))) - set(valid)),
        "srcc_mean": _nanmean(r["srcc"] for r in fold_results),
        "ndcg10_mean": _nanmean(r["ndcg10"] for r in fold_results),
        "hop_srcc_mean": [_nanmean(r["hop_srcc"][h] for r in fold_results) for h in range(opts.layers + 1)],
        "hop_ndcg10_mean": [_nanmean(r["hop_ndcg10"][h] for r in fold_results) for h in range(opts.layers + 1)],
        "folds": fold_results,
        # record positions (in the input list) of each test fold, and the records' own "index" when present
        "fold_members": [[valid[i] for i in idx] for idx in fold_index],
        "fold_record_index": [[kept[i].get("index") for i in idx] for idx in fold_index],
        "baselines": {name: {"srcc_mean": _nanmean(m["srcc"] for m in ms),
                             "ndcg10_mean": _nanmean(m["ndcg10"] for m in ms),
                             "srcc": [m["srcc"] for m in ms], "ndcg10": [m["ndcg10"] for m in ms],
                             "sign": [m.get("sign", 1.0) for m in ms],
                             **({"kind": [m["kind"] for m in ms]} if ms and "kind" in ms[0] else {})}
                      for name, ms in baseline_folds.items()},
        "timings": {"seconds_per_fold": [r["seconds"] for r in fold_results],
                    "seconds_total": float(sum(r["seconds"] for r in fold_results)), "wall_seconds": wall,
                    "device": str(device), "torch_threads": opts.threads or torch.get_num_threads(),
                    "workers": workers},
        "options": {**asdict(opts), **_table_summaries(opts), "epochs": epochs, "batch_size": batch_size},
        "graph": {"nodes": template.num_nodes, "layers": len(template.layer_index),
                  "edges": int(template.edge_index.shape[1]), "family": template.family},
    }
    if out_dir is not None:
        save_ensemble(out_dir, fold_states, fold_infos, template, metrics)
    return metrics
