"""Quantizers against float64 references written here, sizes against hand-computed numbers."""
import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans

from multiquant.options import Option
from multiquant.packing import pack_codes, packed_nbytes, unpack_codes
from multiquant.quantizers import (codebook_dequantize, dequantize, kmeans_1d, kmeans_params, lp_error, nearest_codes,
                                   quantize, uaq_params)


def _weights(c=48, k=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(c, k, generator=g) * 0.02
    w[:, :5] += torch.randn(c, 5, generator=g) * 0.2  # heavy tails so that clipping matters
    return w


def uaq_reference(w: np.ndarray, bits: int):
    """Per-channel grid search in float64, written independently of the library."""
    levels = 2 ** bits - 1
    best = []
    for row in w:
        scores = []
        for i in range(10):
            a = 1.0 - 0.1 * i
            lo, hi = a * row.min(), a * row.max()
            delta = (hi - lo) / levels
            z = np.round(-lo / delta)
            q = np.clip(np.round(row / delta) + z, 0, levels)
            scores.append((np.abs((q - z) * delta - row) ** 2.4).mean())
        i = int(np.argmin(scores))
        a = 1.0 - 0.1 * i
        delta = (a * row.max() - a * row.min()) / levels
        best.append((i, delta, np.round(-a * row.min() / delta), min(scores)))
    return best


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_uaq_matches_float64_reference(bits):
    w = _weights()
    scale, zero = uaq_params(w, bits)
    ref = uaq_reference(w.double().numpy(), bits)
    ref_scale = np.array([r[1] for r in ref])
    ref_zero = np.array([r[2] for r in ref])
    # the clipping choice and grid agree on (almost) every channel; fp32 may flip exact near-ties
    agree = np.isclose(scale.double().numpy(), ref_scale, rtol=1e-5) & (zero.numpy() == ref_zero)
    assert agree.mean() >= 0.95
    codes, params = quantize(w, "mse", bits)
    assert int(codes.max()) <= 2 ** bits - 1
    w_hat = dequantize("mse", codes, params)
    per_channel = ((w_hat.double() - w.double()).abs() ** 2.4).mean(dim=1).numpy()
    ref_scores = np.array([r[3] for r in ref])
    assert np.allclose(per_channel, ref_scores, rtol=1e-3, atol=1e-14)
    assert lp_error(w, w_hat) == pytest.approx(per_channel.sum(), rel=1e-6)


def test_uaq_constant_channel_is_finite():
    w = _weights(4, 16)
    w[1] = 0.3
    codes, params = quantize(w, "mse", 4)
    assert torch.isfinite(dequantize("mse", codes, params)).all()


@pytest.mark.parametrize("bits", [3, 4])
def test_kmeans_objective_no_worse_than_sklearn(bits):
    w = _weights(32, 256, seed=bits)
    cb = kmeans_params(w, bits, per_channel=True)
    assert cb.shape == (32, 2 ** bits)
    ours = ((codebook_dequantize(nearest_codes(w, cb), cb).double() - w.double()) ** 2).sum(dim=1).numpy()
    theirs = np.array([KMeans(2 ** bits, max_iter=100, n_init=1, random_state=c)
                       .fit(w[c].double().numpy().reshape(-1, 1)).inertia_ for c in range(w.shape[0])])
    assert ours.sum() <= theirs.sum() * (1 + 1e-6)
    cb_all = kmeans_params(w, bits, per_channel=False)
    assert cb_all.shape == (1, 2 ** bits)
    ours_all = ((codebook_dequantize(nearest_codes(w, cb_all), cb_all).double() - w.double()) ** 2).sum().item()
    theirs_all = KMeans(2 ** bits, max_iter=100, n_init=1, random_state=0).fit(w.double().numpy().reshape(-1, 1)).inertia_
    assert ours_all <= theirs_all * (1 + 1e-6)


def test_kmeans_codes_are_nearest_centroids_and_deterministic():
    w = _weights(8, 100, seed=3)
    codes, params = quantize(w, "kmeans", 3, seed=7)
    cb = params["codebook"].double()
    dist = (w.double()[:, :, None] - cb[:, None, :]).abs()
    chosen = dist.gather(2, codes.long()[:, :, None]).squeeze(2)
    assert torch.allclose(chosen, dist.min(dim=2).values)
    codes2, params2 = quantize(w, "kmeans", 3, seed=7)
    assert torch.equal(codes, codes2) and torch.equal(params["codebook"], params2["codebook"])


def test_fewer_values_than_centroids():
    w = torch.tensor([[0.1, -0.2, 0.3]])
    codes, params = quantize(w, "kmeans", 4)
    assert torch.allclose(dequantize("kmeans", codes, params), w)


def test_error_ordering_3bit_worse_than_4bit():
    w = _weights()
    for method in ("mse", "kmeans", "kmeans_all"):
        e = {b: lp_error(w, dequantize(method, *quantize(w, method, b))) for b in (3, 4)}
        assert e[3] > e[4] > 0


def test_sizes_hand_computed():
    # AutoBuild's example: a 256->1152 fp16 Linear at mse-3 is 115,200 bytes.
    assert Option("mse", 3).nbytes(256 * 1152, 1152, 16) == 294_912 * 3 // 8 + 2 * 1152 * 16 // 8 == 115_200
    # a 1152x1152 fp16 Linear at kmeans_all-3: 1,327,104*3/8 + 8 centroids * 2 bytes
    assert Option("kmeans_all", 3).nbytes(1152 * 1152, 1152, 16) == 497_680
    # K-Means-C 4-bit: 16 centroids per channel at fp16
    assert Option("kmeans", 4).nbytes(1152 * 1152, 1152, 16) == 663_552 + 1152 * 16 * 2
    # fp32 (SD1.5): overhead costed at 32 bits; 3x3 conv 320->320
    assert Option("mse", 4).nbytes(320 * 320 * 9, 320, 32) == 460_800 + 2 * 320 * 4


def test_parse_option_errors():
    assert Option.parse("kmeans_all-3") == Option("kmeans_all", 3)
    assert Option.parse("fp16") == Option(None, 16) and Option.parse("fp16").is_fp
    for bad in ["kmeans", "foo-3", "mse-9", "mse-x", ""]:
        with pytest.raises(ValueError):
            Option.parse(bad)


@pytest.mark.parametrize("bits", range(2, 9))
def test_packing_round_trip(bits):
    codes = torch.randint(0, 2 ** bits, (1003,), dtype=torch.uint8, generator=torch.Generator().manual_seed(bits))
    packed = pack_codes(codes, bits)
    assert packed.numel() == packed_nbytes(1003, bits) == 126 * bits
    assert torch.equal(unpack_codes(packed, bits, 1003), codes)


def test_stacked_segments_equal_separate_calls():
    """Rows of several tensors stacked with ``segments`` get exactly what each tensor gets alone."""
    a, b, c = _weights(5, 120, seed=11), _weights(9, 120, seed=12), _weights(5, 120, seed=13)
    stacked = kmeans_1d(torch.cat([a, b, c]), 8, n_init=4, seed=3, segments=[5, 9, 5])
    alone = torch.cat([kmeans_1d(t, 8, n_init=4, seed=3) for t in (a, b, c)])
    assert torch.equal(stacked, alone)
    codes, params = quantize(torch.cat([a, c]), "kmeans_all", 3, seed=2, segments=[5, 5])
    for i, t in enumerate((a, c)):
        codes_1, params_1 = quantize(t, "kmeans_all", 3, seed=2)
        assert torch.equal(params["codebook"][i:i + 1], params_1["codebook"])
        assert torch.equal(codes[5 * i:5 * i + 5], codes_1)
    with pytest.raises(ValueError, match="sum to"):
        kmeans_1d(a, 4, segments=[2, 2])


def _greedy_pp_reference(xs: np.ndarray, k: int, first: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Greedy k-means++ on sorted rows with the given draws, every trial's potential summed over all values
    in float64 (the squared distances kept in float32, as the library keeps them)."""
    out = []
    for r, row in enumerate(xs):
        centres = [row[first[r]]]
        d2 = np.square(row - centres[0], dtype=np.float32)
        for step in range(1, k):
            cdf = np.cumsum(d2.astype(np.float64))
            idx = np.minimum(np.searchsorted(cdf, u[step - 1, r] * max(cdf[-1], 1e-300)), len(row) - 1)
            cand = row[idx]
            pots = [np.minimum(d2, np.square(row - c, dtype=np.float32)).astype(np.float64).sum() for c in cand]
            best = cand[int(np.argmin(pots))]
            centres.append(best)
            d2 = np.minimum(d2, np.square(row - best, dtype=np.float32))
        out.append(centres)
    return np.array(out)


def test_seeding_potentials_from_prefix_sums_match_the_direct_sum():
    from multiquant.quantizers import _kmeans_pp, _prefix_sums, _seeding_draws

    xs = torch.sort(_weights(6, 300, seed=21), dim=1).values
    k, n_init = 8, 2
    first, u = _seeding_draws([6], 300, k, n_init, seed=4, device="cpu")
    ours = _kmeans_pp(xs, _prefix_sums(xs), k, n_init, (first, u))  # [n_init, R, k]
    for i in range(n_init):
        ref = _greedy_pp_reference(xs.numpy(), k, first[i].numpy(), u[:, i].numpy())
        np.testing.assert_array_equal(ours[i].numpy(), ref)
