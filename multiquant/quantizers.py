"""Weight quantizers as pure tensor functions, batched over all output channels at once.

Every function takes a weight reshaped to 2-D ``[C, K]`` (C output channels, K = in*kh*kw) and returns
integer codes plus the parameters needed to dequantize them:

- UAQ (``mse``): per-channel asymmetric uniform grid; the clipping range is chosen per channel among 10
  shrink ratios (1.0, 0.9, ..., 0.1) by the Lp (p=2.4) error, as in the reference.
- K-Means-C (``kmeans``): one 1-D codebook of 2^b centroids per output channel.
- K-Means-A (``kmeans_all``): one 1-D codebook of 2^b centroids for the whole tensor.

1-D K-Means is exact Lloyd on sorted data: clusters are contiguous runs of the sorted values, so one
iteration is a searchsorted over the centroid midpoints plus prefix sums. That makes it deterministic
(no atomics), memory-light and fast on the GPU. Several seeded starts (greedy k-means++ as in scikit-learn, plus
quantiles) run side by side and each channel keeps the best.

Error (one definition for every method, in float64): ``E = sum(|w - w_hat|^2.4) / K``, i.e. the sum over
channels of the per-channel mean Lp error. That equals the reference's UAQ and K-Means-C error, and fixes
its K-Means-A normalisation (which divided by C*kh*kw instead of K).
"""
from __future__ import annotations

import torch

from .options import MAX_BITS, METHOD_NAMES, METHODS, MIN_BITS

LP_NORM = 2.4
UAQ_SHRINKS = tuple(1.0 - 0.1 * i for i in range(10))  # 1.0 ... 0.1 (wider range first wins ties)
_CHUNK_ELEMENTS = 1 << 25  # bound temporaries of the batched grid search
_SEED_SAMPLE = 1 << 14  # values per row used for k-means++ seeding
_CHECK_EVERY = 8  # Lloyd iterations between convergence checks (each check is one host sync)
_ZERO_POINT_RANGE = 2.0 ** -14  # smallest UAQ step relative to the channel's magnitude
ZERO_POINT_LIMIT = 2 ** 14  # so |UAQ zero-point| <= 2^14: it fits the int16 it is stored in


def check_bits(bits: int) -> int:
    if not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an integer in {MIN_BITS}..{MAX_BITS}, got {bits!r}")
    return bits


# ---------------------------------------------------------------------------------------------- UAQ
def uaq_params(w: torch.Tensor, bits: int, shrinks=UAQ_SHRINKS, p: float = LP_NORM):
    """Per-channel (scale, zero_point) of the asymmetric uniform quantizer with the Lp-best clipping."""
    check_bits(bits)
    w = w.float()
    levels = 2 ** bits - 1
    alphas = torch.tensor(shrinks, device=w.device, dtype=w.dtype).view(-1, 1, 1)
    rows = max(1, _CHUNK_ELEMENTS // max(1, w.shape[1] * len(shrinks)))
    scales, zeros = [], []
    for chunk in w.split(rows):
        lo = chunk.amin(dim=1, keepdim=True) * alphas  # [A, c, 1]
        hi = chunk.amax(dim=1, keepdim=True) * alphas
        # Floor the step at 2^-14 of the channel's magnitude (below fp16 resolution): the zero-point
        # |lo / scale| then stays <= 2^14 and fits the int16 it is stored in, and a constant channel (one
        # weight per channel, e.g. Conv2d(1, 64, 1)) is represented exactly instead of overflowing it.
        floor = torch.maximum(lo.abs(), hi.abs()) * _ZERO_POINT_RANGE
        scale = torch.maximum((hi - lo) / levels, floor).clamp_min(torch.finfo(torch.float32).tiny)
        zero = torch.round(-lo / scale)
        q = torch.clamp(torch.round(chunk / scale) + zero, 0, levels)
        score = ((q - zero) * scale - chunk).abs().pow(p).mean(dim=2)  # [A, c]
        best = score.argmin(dim=0)  # first minimum = widest range on ties
        pick = best.view(1, -1, 1)
        scales.append(scale.gather(0, pick).view(-1))
        zeros.append(zero.gather(0, pick).view(-1))
    return torch.cat(scales), torch.cat(zeros)


def uaq_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    q = torch.round(w.float() / scale[:, None]) + zero[:, None]
    return torch.clamp(q, 0, 2 ** bits - 1).to(torch.uint8)


def uaq_dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return (codes.float() - zero.float()[:, None]) * scale.float()[:, None]


# ------------------------------------------------------------------------------------------ K-Means
def kmeans_1d(x: torch.Tensor, k: int, iters: int = 100, n_init: int = 3, seed: int = 0,
              tol: float = 1e-7) -> torch.Tensor:
    """Row-wise 1-D K-Means. ``x``: [R, N]; returns sorted centroids [R, k] (float32).

    Runs ``n_init`` seeded greedy k-means++ starts plus a quantile start side by side and keeps, per row,
    the run with the lowest SSE. Rows leave the Lloyd loop once every run of theirs has converged (checked
    every ``_CHECK_EVERY`` iterations: one host sync per check, not per iteration)."""
    R, N = x.shape
    xs = torch.sort(x.float(), dim=1).values
    k_eff = min(k, N)
    gen = torch.Generator(device=x.device).manual_seed(seed)
    qpos = ((torch.arange(k_eff, device=x.device, dtype=torch.float64) + 0.5) / k_eff * N).long().clamp_max(N - 1)
    # Seeding only needs the shape of the distribution: seed on an evenly strided subsample of the sorted
    # values (at most _SEED_SAMPLE per row), all starts in one batched call, then run Lloyd on every value.
    seed_rows = xs[:, :: max(1, -(-N // _SEED_SAMPLE))]
    starts = [xs[:, qpos].unsqueeze(1)]
    if n_init > 0:
        starts.append(_kmeans_pp(seed_rows.repeat(n_init, 1), k_eff, gen).view(n_init, R, k_eff).transpose(0, 1))
    cents = torch.sort(torch.cat(starts, dim=1).double(), dim=2).values  # [R, runs, k]
    runs = cents.shape[1]
    cums = torch.nn.functional.pad(xs.double().cumsum(dim=1), (1, 0))  # prefix sums: cluster sums in O(k)
    sq_cums = torch.nn.functional.pad(xs.double().square().cumsum(dim=1), (1, 0))
    limit = tol * (xs.abs().amax(dim=1) + 1e-30).double()  # [R]: convergence threshold per row
    final = torch.empty_like(cents)
    rows = torch.arange(R, device=x.device)  # original index of each row still iterating
    xs_a, cums_a, lim_a, done = xs, cums, limit, 0
    while rows.numel() and done < iters:
        for _ in range(min(_CHECK_EVERY, iters - done)):
            bounds = _run_bounds(xs_a, cents)
            sums = _run_sums(cums_a, bounds)
            counts = (bounds[..., 1:] - bounds[..., :-1]).double()
            new = torch.where(counts > 0, sums / counts.clamp_min(1), cents)  # an empty cluster keeps its centroid
            shift = (new - cents).abs().amax(dim=(1, 2))
            cents = torch.sort(new, dim=2).values
        done += _CHECK_EVERY
        moving = shift > lim_a
        if done < iters and bool(moving.all()):
            continue
        final[rows[~moving]] = cents[~moving]
        rows, cents, xs_a, cums_a, lim_a = rows[moving], cents[moving], xs_a[moving], cums_a[moving], lim_a[moving]
    final[rows] = cents  # rows that used up ``iters``
    sse = _sorted_sse(xs, cums, sq_cums, final)  # [R, runs]
    best = sse.argmin(dim=1)  # first run (quantile start) wins ties: deterministic
    chosen = final[torch.arange(R, device=x.device), best].float()
    if k_eff < k:  # fewer values than centroids: repeat the last centroid (codes never use it)
        chosen = torch.cat([chosen, chosen[:, -1:].expand(-1, k - k_eff)], dim=1)
    return chosen


def _kmeans_pp(xs: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """Greedy k-means++ seeding (2 + log k local trials per centre, as scikit-learn), batched over rows."""
    R, N = xs.shape
    trials = 2 + int(torch.tensor(float(k)).log())
    rows = torch.arange(R, device=xs.device)
    first = torch.randint(N, (R,), device=xs.device, generator=gen)
    centres = [xs[rows, first]]
    d2 = (xs - centres[0][:, None]).square()  # [R, N]
    for _ in range(1, k):
        cdf = d2.double().cumsum(dim=1)
        total = cdf[:, -1:].clamp_min(1e-300)
        u = torch.rand(R, trials, device=xs.device, generator=gen, dtype=torch.float64) * total
        idx = torch.searchsorted(cdf, u).clamp_max(N - 1)  # [R, trials]
        cand = xs.gather(1, idx)
        cand_d2 = torch.minimum(d2[:, None, :], (xs[:, None, :] - cand[:, :, None]).square())  # [R, T, N]
        pick = cand_d2.sum(dim=2).argmin(dim=1)
        centres.append(cand[rows, pick])
        d2 = cand_d2[rows, pick]
    return torch.stack(centres, dim=1)


def _run_bounds(xs: torch.Tensor, cents: torch.Tensor) -> torch.Tensor:
    """Cluster i of run r is the slice xs[row, b[row, r, i]:b[row, r, i+1]] of the sorted values (nearest
    sorted centroid). ``xs`` [R, N], ``cents`` [R, runs, k] -> bounds [R, runs, k+1]."""
    R, N = xs.shape
    mids = ((cents[..., 1:] + cents[..., :-1]) / 2).to(xs.dtype)
    # every run's midpoints of a row in one search over that row (searched values need not be sorted)
    edges = torch.searchsorted(xs, mids.reshape(R, -1).contiguous()).view(mids.shape)
    # first/last bound from the row count, not from edges: with one centroid edges has no column
    first = torch.zeros(*edges.shape[:2], 1, dtype=edges.dtype, device=edges.device)
    return torch.cat([first, edges, torch.full_like(first, N)], dim=2)


def _run_sums(cums: torch.Tensor, bounds: torch.Tensor) -> torch.Tensor:
    """Per-cluster sums from row prefix sums ``cums`` [R, N+1] and ``bounds`` [R, runs, k+1]."""
    flat = cums.gather(1, bounds.reshape(bounds.shape[0], -1)).view(bounds.shape)
    return flat[..., 1:] - flat[..., :-1]


def _sorted_sse(xs, cums, sq_cums, cents):
    """SSE of every run: ``cents`` [R, runs, k] -> [R, runs]."""
    bounds = _run_bounds(xs, cents)
    s1, s2 = _run_sums(cums, bounds), _run_sums(sq_cums, bounds)
    n = (bounds[..., 1:] - bounds[..., :-1]).double()
    return (s2 - 2 * cents * s1 + n * cents.square()).sum(dim=2)


def nearest_codes(x: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid. ``x``: [R, N], ``codebook``: sorted [R, k] (or [1, k])."""
    mids = ((codebook[:, 1:] + codebook[:, :-1]) / 2).contiguous()
    if mids.shape[0] == 1 and x.shape[0] > 1:
        return torch.bucketize(x.float().contiguous(), mids[0]).to(torch.uint8)
    return torch.searchsorted(mids, x.float().contiguous()).to(torch.uint8)


def kmeans_params(w: torch.Tensor, bits: int, per_channel: bool, iters: int = 100, seed: int = 0) -> torch.Tensor:
    """Codebook [C, 2^b] (K-Means-C) or [1, 2^b] (K-Means-A)."""
    check_bits(bits)
    if per_channel:
        return kmeans_1d(w.float(), 2 ** bits, iters=iters, seed=seed, n_init=4)
    # one row only: afford as many starts as scikit-learn's classic n_init=10
    return kmeans_1d(w.float().reshape(1, -1), 2 ** bits, iters=iters, seed=seed, n_init=10)


def codebook_dequantize(codes: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    if codebook.shape[0] == 1:
        return codebook[0][codes.long()]
    return codebook.gather(1, codes.long())


# ------------------------------------------------------------------------------------- one entry point
def quantize(w2d: torch.Tensor, method: str, bits: int, iters: int = 100, seed: int = 0) -> tuple[torch.Tensor, dict]:
    """Quantize a [C, K] weight: returns (uint8 codes [C, K], params) with params
    ``{"scale", "zero"}`` for UAQ or ``{"codebook"}`` for the K-Means methods."""
    spec = METHODS.get(method)
    if spec is None:
        raise ValueError(f"unknown quantization method {method!r}; expected one of {METHOD_NAMES}")
    if spec.codebook:
        codebook = kmeans_params(w2d, bits, per_channel=spec.per_channel, iters=iters, seed=seed)
        return nearest_codes(w2d, codebook), {"codebook": codebook}
    scale, zero = uaq_params(w2d, bits)
    return uaq_codes(w2d, scale, zero, bits), {"scale": scale, "zero": zero}


def dequantize(method: str, codes: torch.Tensor, params: dict) -> torch.Tensor:
    """Float32 [C, K] weight from codes and params (inverse of :func:`quantize`)."""
    if METHODS[method].codebook:
        return codebook_dequantize(codes, params["codebook"])
    return uaq_dequantize(codes, params["scale"], params["zero"])


def lp_error(w: torch.Tensor, w_hat: torch.Tensor, p: float = LP_NORM) -> float:
    """The single error definition: sum(|w - w_hat|^p) / K for a [C, K] weight, in float64."""
    err = (w.double() - w_hat.double()).abs().pow(p).sum() / w.shape[1]
    return float(err)
