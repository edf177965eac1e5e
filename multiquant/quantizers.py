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
        # (clamp(round(w / s) + z, 0, L) - z) * s - w, in place: the integers are exact in float32 (|w / s| <=
        # 10 * 2^14 by the step floor), so clamping round(w / s) to [-z, L - z] is the same
        err = torch.div(chunk, scale).round_().clamp_(-zero, levels - zero).mul_(scale).sub_(chunk)
        score = err.abs_().pow_(p).mean(dim=2)  # [A, c]
        del err
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
              tol: float = 1e-7, segments: list[int] | None = None) -> torch.Tensor:
    """Row-wise 1-D K-Means. ``x``: [R, N]; returns sorted centroids [R, k] (float32).

    Runs ``n_init`` seeded greedy k-means++ starts plus a quantile start side by side and keeps, per row,
    the run with the lowest SSE. Rows leave the Lloyd loop once every run of theirs has converged (checked
    every ``_CHECK_EVERY`` iterations: one host sync per check, not per iteration).

    ``segments`` (rows per block, summing to R; default one block): ``x`` stacks the rows of several
    independent blocks (e.g. layers); every block gets the random draws it would get alone, so stacking
    changes no result. Every row is independent of the others apart from those draws."""
    R, N = x.shape
    segments = [R] if segments is None else list(segments)
    if sum(segments) != R or min(segments, default=1) < 1:
        raise ValueError(f"segments {segments[:8]}... must be positive and sum to the {R} rows")
    xs = torch.sort(x.float(), dim=1).values
    k_eff = min(k, N)
    qpos = ((torch.arange(k_eff, device=x.device, dtype=torch.float64) + 0.5) / k_eff * N).long().clamp_max(N - 1)
    cums, sq_cums = _prefix_sums(xs)  # prefix sums: cluster sums in O(k)
    # Seeding only needs the shape of the distribution: seed on an evenly strided subsample of the sorted
    # values (at most _SEED_SAMPLE per row), all starts in one batched call, then run Lloyd on every value.
    stride = max(1, -(-N // _SEED_SAMPLE))
    starts = [xs[:, qpos].unsqueeze(1)]
    if n_init > 0:
        seed_rows = xs[:, ::stride]
        seed_cums = (cums, sq_cums) if stride == 1 else _prefix_sums(seed_rows)
        draws = _seeding_draws(segments, seed_rows.shape[1], k_eff, n_init, seed, x.device)
        starts.append(_kmeans_pp(seed_rows.contiguous(), seed_cums, k_eff, n_init, draws).transpose(0, 1))
    cents = torch.sort(torch.cat(starts, dim=1).double(), dim=2).values  # [R, runs, k]
    limit = tol * (xs.abs().amax(dim=1) + 1e-30).double()  # [R]: convergence threshold per row
    final = torch.empty_like(cents)
    rows = torch.arange(R, device=x.device)  # original index of each row still iterating
    cur, xs_a, cums_a, lim_a, done = cents, xs, cums, limit, 0  # cur [rows, runs, k]: sorted centroids
    while rows.numel() and done < iters:
        steps = min(_CHECK_EVERY, iters - done)
        mids = _boundary_buffer(cur, xs.dtype)  # reused by every step until the next check
        for step in range(steps):
            bounds = _run_bounds(xs_a, cur, mids)
            sums = _run_sums(cums_a, bounds)
            counts = bounds[..., 1:] - bounds[..., :-1]  # int64: the division widens it exactly
            new = torch.where(counts > 0, sums / counts, cur)  # an empty cluster keeps its centroid
            if step == steps - 1:  # only the last shift before a check is looked at
                shift = (new - cur).abs().amax(dim=(1, 2))
            cur = torch.sort(new, dim=2).values
        done += steps
        moving = shift > lim_a
        if done < iters and bool(moving.all()):
            continue
        final[rows[~moving]] = cur[~moving]
        rows, cur, xs_a, cums_a, lim_a = rows[moving], cur[moving], xs_a[moving], cums_a[moving], lim_a[moving]
    final[rows] = cur  # rows that used up ``iters``
    sse = _sorted_sse(xs, cums, sq_cums, final)  # [R, runs]
    best = sse.argmin(dim=1)  # first run (quantile start) wins ties: deterministic
    chosen = final[torch.arange(R, device=x.device), best].float()
    if k_eff < k:  # fewer values than centroids: repeat the last centroid (codes never use it)
        chosen = torch.cat([chosen, chosen[:, -1:].expand(-1, k - k_eff)], dim=1)
    return chosen


def _prefix_sums(xs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-padded float64 prefix sums of the values and of their squares, [R, N+1] each (one widening of
    ``xs`` serves both: a cumsum with dtype=float64 widens its input first, so the sums are the same)."""
    pad = torch.nn.functional.pad
    wide = xs.double()
    sums = pad(wide.cumsum(dim=1), (1, 0))
    return sums, pad(wide.square_().cumsum(dim=1), (1, 0))


def _pp_trials(k: int) -> int:
    return 2 + int(torch.tensor(float(k)).log())  # local trials per centre, as scikit-learn


def _seeding_draws(segments: list[int], n: int, k: int, n_init: int, seed: int, device):
    """The random numbers of greedy k-means++ (first centre index [n_init, R]; uniforms [k-1, n_init, R, trials])
    with every segment drawing from its own generator seeded ``seed``, in the order a lone call draws them
    (one draw set per distinct segment size, reused by the segments of that size)."""
    trials = _pp_trials(k)
    by_size = {}
    for size in sorted(set(segments)):
        gen = torch.Generator(device=device).manual_seed(seed)
        first = torch.randint(n, (n_init * size,), device=device, generator=gen).view(n_init, size)
        us = [torch.rand(n_init * size, trials, device=device, generator=gen, dtype=torch.float64)
              for _ in range(1, k)]
        u = torch.stack(us).view(k - 1, n_init, size, trials) if us else None
        by_size[size] = (first, u)
    if len(segments) == 1:
        return by_size[segments[0]]
    first = torch.cat([by_size[s][0] for s in segments], dim=1)
    u = torch.cat([by_size[s][1] for s in segments], dim=2) if k > 1 else None
    return first, u


def _take_prefix(prefix: torch.Tensor, idx: torch.Tensor, rows: int) -> torch.Tensor:
    """``prefix`` [R, N+1] at ``idx`` [n_init, R, T] (row r of every start reads prefix row r)."""
    width = prefix.shape[1]
    base = (torch.arange(rows, device=idx.device) * width).view(1, rows, 1)
    return prefix.reshape(-1).take(idx + base)


def _kmeans_pp(xs: torch.Tensor, prefix: tuple[torch.Tensor, torch.Tensor], k: int, n_init: int, draws) -> torch.Tensor:
    """Greedy k-means++ seeding (scikit-learn's: 2 + log k local trials per centre, keep the trial that lowers
    the potential most), ``n_init`` starts per row of the sorted ``xs`` [R, N]; returns [n_init, R, k].

    In 1-D a new centre c only changes the squared distances of the values closer to c than to any present
    centre: one contiguous run of the sorted values, between the midpoints to c's present neighbours.
    A trial's potential is then total - sum over that run of (d2 - (x - c)^2), from prefix sums (float64),
    instead of a pass over all values per trial."""
    R, N = xs.shape
    first, u = draws
    cums, sq_cums = prefix
    inf = torch.tensor(float("inf"), device=xs.device, dtype=xs.dtype)
    centres = [xs.gather(1, first.t()).t()]  # [n_init, R]
    d2 = (xs.unsqueeze(0) - centres[0].unsqueeze(2)).square_()  # [n_init, R, N]
    for step in range(1, k):
        cdf = d2.cumsum(dim=2, dtype=torch.float64)
        total = cdf[..., -1:].clamp_min(1e-300)
        idx = torch.searchsorted(cdf, u[step - 1] * total).clamp_max_(N - 1)  # [n_init, R, T]
        cand = _gather_rows(xs, idx)
        present = torch.stack(centres, dim=2).unsqueeze(2)  # [n_init, R, 1, step]
        c4 = cand.unsqueeze(3)
        left = torch.where(present <= c4, present, -inf).amax(dim=3)
        right = torch.where(present >= c4, present, inf).amin(dim=3)
        lo = _search_rows(xs, (cand + left) * 0.5, right=True)
        hi = torch.maximum(_search_rows(xs, (cand + right) * 0.5, right=False), lo)
        cdf_at = lambda i: torch.where(i > 0, cdf.gather(2, (i - 1).clamp_min(0)), 0.0)  # noqa: E731
        run_d2 = cdf_at(hi) - cdf_at(lo)
        n = hi - lo  # int64: widened exactly where it meets the float64 sums
        s1 = _take_prefix(cums, hi, R) - _take_prefix(cums, lo, R)
        s2 = _take_prefix(sq_cums, hi, R) - _take_prefix(sq_cums, lo, R)
        c = cand.double()
        potential = total - (run_d2 - (s2 - 2 * c * s1 + n * c * c))
        pick = potential.argmin(dim=2, keepdim=True)  # first minimum, as argmin over the trials' sums
        best = cand.gather(2, pick).squeeze(2)  # [n_init, R]
        centres.append(best)
        torch.minimum(d2, (xs.unsqueeze(0) - best.unsqueeze(2)).square_(), out=d2)
    return torch.stack(centres, dim=2)


def _gather_rows(xs: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``xs`` [R, N] at ``idx`` [n_init, R, T] -> [n_init, R, T]."""
    n_init, R, T = idx.shape
    return xs.gather(1, idx.permute(1, 0, 2).reshape(R, n_init * T)).view(R, n_init, T).permute(1, 0, 2)


def _search_rows(xs: torch.Tensor, values: torch.Tensor, right: bool) -> torch.Tensor:
    """searchsorted of ``values`` [n_init, R, T] in the sorted rows ``xs`` [R, N] (row r for every start)."""
    n_init, R, T = values.shape
    q = values.permute(1, 0, 2).reshape(R, n_init * T).contiguous()
    return torch.searchsorted(xs, q, right=right).view(R, n_init, T).permute(1, 0, 2)


def _boundary_buffer(cents: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[..., k+1] cluster boundaries for centroids ``cents`` [..., k]: -inf and +inf at the ends (so the outer
    searches find 0 and N), the k-1 midpoints to be written in place (:func:`_run_bounds`)."""
    buf = torch.empty(*cents.shape[:-1], cents.shape[-1] + 1, dtype=dtype, device=cents.device)
    buf[..., 0], buf[..., -1] = float("-inf"), float("inf")
    return buf


def _run_bounds(xs: torch.Tensor, cents: torch.Tensor, mids: torch.Tensor | None = None) -> torch.Tensor:
    """Cluster i of run r is the slice xs[row, b[row, r, i]:b[row, r, i+1]] of the sorted values (nearest
    sorted centroid). ``xs`` [R, N], ``cents`` [R, runs, k] sorted -> bounds [R, runs, k+1]. ``mids``: a
    :func:`_boundary_buffer` of ``cents``' shape to write the midpoints into (the Lloyd loop reuses one)."""
    mids = _boundary_buffer(cents, xs.dtype) if mids is None else mids
    # the k-1 midpoints in float64, rounded once to the data's dtype, straight into their slots
    torch.mul(cents[..., 1:] + cents[..., :-1], 0.5, out=mids[..., 1:-1])
    # every run's midpoints of a row in one search over that row (searched values need not be sorted)
    return torch.searchsorted(xs, mids.view(mids.shape[0], -1)).view(mids.shape)


def _run_sums(cums: torch.Tensor, bounds: torch.Tensor) -> torch.Tensor:
    """Per-cluster sums from row prefix sums ``cums`` [R, N+1] and ``bounds`` [R, runs, k+1]."""
    flat = cums.gather(1, bounds.reshape(bounds.shape[0], -1)).view(bounds.shape)
    return flat[..., 1:] - flat[..., :-1]


def _sorted_sse(xs, cums, sq_cums, cents):
    """SSE of every run: ``cents`` [R, runs, k] -> [R, runs]."""
    bounds = _run_bounds(xs, cents)
    s1, s2 = _run_sums(cums, bounds), _run_sums(sq_cums, bounds)
    n = bounds[..., 1:] - bounds[..., :-1]  # int64: widened exactly where it meets the float64 sums
    return (s2 - 2 * cents * s1 + n * cents.square()).sum(dim=2)


def nearest_codes(x: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid. ``x``: [R, N], ``codebook``: sorted [R, k] (or [1, k])."""
    mids = ((codebook[:, 1:] + codebook[:, :-1]) / 2).contiguous()
    if mids.shape[0] == 1 and x.shape[0] > 1:
        return torch.bucketize(x.float().contiguous(), mids[0]).to(torch.uint8)
    return torch.searchsorted(mids, x.float().contiguous()).to(torch.uint8)


def kmeans_params(w: torch.Tensor, bits: int, per_channel: bool, iters: int = 100, seed: int = 0,
                  segments: list[int] | None = None) -> torch.Tensor:
    """Codebook [C, 2^b] (K-Means-C) or [1, 2^b] (K-Means-A). ``segments``: see :func:`quantize`."""
    check_bits(bits)
    if per_channel:
        return kmeans_1d(w.float(), 2 ** bits, iters=iters, seed=seed, n_init=4, segments=segments)
    # one row per tensor: afford as many starts as scikit-learn's classic n_init=10
    tensors = 1 if segments is None else len(segments)
    return kmeans_1d(_one_row_per_tensor(w, segments).float(), 2 ** bits, iters=iters, seed=seed, n_init=10,
                     segments=[1] * tensors)


def _one_row_per_tensor(w: torch.Tensor, segments: list[int] | None) -> torch.Tensor:
    if segments is None:
        return w.reshape(1, -1)
    if len(set(segments)) != 1:
        raise ValueError(f"per-tensor quantization of stacked tensors needs equal row counts, got {sorted(set(segments))}")
    return w.reshape(len(segments), -1)


def codebook_dequantize(codes: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    if codebook.shape[0] == 1:
        return codebook[0][codes.long()]
    return codebook.gather(1, codes.long())


# ------------------------------------------------------------------------------------- one entry point
def quantize(w2d: torch.Tensor, method: str, bits: int, iters: int = 100, seed: int = 0,
             segments: list[int] | None = None) -> tuple[torch.Tensor, dict]:
    """Quantize a [C, K] weight: returns (uint8 codes [C, K], params) with params
    ``{"scale", "zero"}`` for UAQ or ``{"codebook"}`` for the K-Means methods.

    ``segments`` (rows per tensor, default one tensor): ``w2d`` stacks the rows of several tensors, each
    quantized exactly as if alone (its own seeded draws; K-Means-A: one codebook row per tensor, so the
    tensors must have equal row counts)."""
    spec = METHODS.get(method)
    if spec is None:
        raise ValueError(f"unknown quantization method {method!r}; expected one of {METHOD_NAMES}")
    if spec.codebook:
        codebook = kmeans_params(w2d, bits, per_channel=spec.per_channel, iters=iters, seed=seed, segments=segments)
        if spec.per_channel or segments is None:
            return nearest_codes(w2d, codebook), {"codebook": codebook}
        flat = _one_row_per_tensor(w2d, segments)
        return nearest_codes(flat, codebook).view(w2d.shape), {"codebook": codebook}
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
