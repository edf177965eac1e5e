"""Metrics: FID, feature networks, reference-stats cache, proxy metrics, CLIP plumbing, MACs/BOPs.

No Inception or CLIP weights exist here: the feature-network tests use a FAKE Inception torchscript
(a tiny random network saved in clean-fid's file format) and a FAKE ``transformers`` module. They
check the plumbing (resize, normalisation, batching, loading, errors), not real feature values.
"""
from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import torch
from scipy import signal
from torch import nn
import torch.nn.functional as F

from multiquant.metrics.fid import feature_stats, fid_from_features, frechet_distance


def _rng(seed=0):
    return np.random.default_rng(seed)


# ----------------------------------------------------------------------------------------------------
# FID
def test_feature_stats_float64_matches_reference():
    feats = _rng(1).normal(size=(50, 7)).astype(np.float32) * 3 + 1
    mu, sigma = feature_stats(feats)
    ref = feats.astype(np.float64)
    assert mu.dtype == np.float64 and sigma.dtype == np.float64
    np.testing.assert_allclose(mu, ref.sum(0) / 50, rtol=1e-13)
    centred = ref - ref.mean(0)
    np.testing.assert_allclose(sigma, centred.T @ centred / 49, rtol=1e-12)
    with pytest.raises(ValueError):
        feature_stats(feats[:1])


@pytest.mark.parametrize("method", ["sqrtm", "eigh"])
def test_frechet_distance_diagonal_closed_form(method):
    rng = _rng(2)
    d = 16
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    v1, v2 = rng.uniform(0.1, 3, size=d), rng.uniform(0.1, 3, size=d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(v1 + v2 - 2 * np.sqrt(v1 * v2))
    got = frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2), method=method)
    assert isinstance(got, float)
    assert got == pytest.approx(expected, rel=1e-10)
    assert frechet_distance(mu1, np.diag(v1), mu1, np.diag(v1), method=method) == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("method", ["sqrtm", "eigh"])
def test_frechet_distance_rotated_gaussians_closed_form(method):
    # Rotating both covariances by the same orthogonal Q leaves the distance unchanged.
    rng = _rng(3)
    d = 12
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    v1, v2 = rng.uniform(0.2, 2, size=d), rng.uniform(0.2, 2, size=d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(v1 + v2 - 2 * np.sqrt(v1 * v2))
    got = frechet_distance(mu1, q @ np.diag(v1) @ q.T, mu2, q @ np.diag(v2) @ q.T, method=method)
    assert got == pytest.approx(expected, rel=1e-8)


@pytest.mark.filterwarnings("ignore:The `disp` argument is deprecated")  # inside clean-fid
def test_fid_matches_clean_fid_on_random_features():
    from cleanfid.fid import frechet_distance as cleanfid_frechet

    rng = _rng(4)
    a = rng.normal(size=(400, 32))
    b = rng.normal(size=(300, 32)) @ rng.normal(size=(32, 32)) * 0.3 + 0.5
    mu_a, s_a = feature_stats(a)
    mu_b, s_b = feature_stats(b)
    ours = fid_from_features(b, (mu_a, s_a))
    theirs = cleanfid_frechet(mu_b, s_b, mu_a, s_a)
    assert ours == pytest.approx(float(theirs), rel=1e-10)
    assert ours > 1.0
    assert fid_from_features(b, (mu_a, s_a), method="eigh") == pytest.approx(ours, rel=1e-9)
    # singular covariances (fewer samples than dimensions), as with small-N FID
    mu_c, s_c = feature_stats(rng.normal(size=(20, 32)))
    assert frechet_distance(mu_c, s_c, mu_a, s_a, method="eigh") == pytest.approx(
        float(cleanfid_frechet(mu_c, s_c, mu_a, s_a)), rel=1e-7)
    with pytest.raises(ValueError):
        frechet_distance(mu_a, s_a, mu_a[:3], s_a[:3, :3])


def _nuclear_trace(gen: np.ndarray, sigma2: np.ndarray) -> float:
    """tr(sqrt(sigma1 sigma2)) for sigma1 = the covariance of the rows of ``gen``, without any eigenvalue of a
    singular matrix: the nuclear norm of the centred rows times scipy's sqrtm(sigma2) (float64 reference)."""
    from scipy import linalg

    centred = (gen - gen.mean(0)) / np.sqrt(len(gen) - 1)
    return float(np.linalg.svd(centred @ np.real(linalg.sqrtm(sigma2)), compute_uv=False).sum())


@pytest.mark.parametrize("n_gen", [300, 20])  # full-rank and singular (fewer samples than dimensions) sigma1
def test_frechet_distance_rooted_matches_the_numpy_eigh_path_and_an_exact_trace(n_gen):
    from multiquant.metrics.fid import frechet_distance_rooted, symmetric_sqrt

    rng = _rng(11 + n_gen)
    d = 48
    ref = rng.normal(size=(200, d)) @ rng.normal(size=(d, d)) * 0.2
    gen = rng.normal(size=(n_gen, d)) @ rng.normal(size=(d, d)) * 0.3 + 0.4
    (mu2, s2), (mu1, s1) = feature_stats(ref), feature_stats(gen)
    root2 = symmetric_sqrt(s2)
    np.testing.assert_allclose(root2 @ root2, s2, rtol=0, atol=1e-12 * np.abs(s2).max())
    got = frechet_distance_rooted(mu1, s1, mu2, s2, root2)
    assert frechet_distance_rooted(mu1, s1, mu2, s2, torch.from_numpy(root2)) == got  # numpy or tensor root
    exact = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * _nuclear_trace(gen, s2)
    numpy_eigh = frechet_distance(mu1, s1, mu2, s2, method="eigh")
    if n_gen > d:
        assert got == pytest.approx(numpy_eigh, rel=1e-11) and got == pytest.approx(exact, rel=1e-11)
        assert got == pytest.approx(frechet_distance(mu1, s1, mu2, s2, method="sqrtm"), rel=1e-9)
    else:  # the square roots of round-off eigenvalues: ~1e-8 relative noise in both paths
        assert got == pytest.approx(numpy_eigh, rel=1e-7) and got == pytest.approx(exact, rel=1e-7)
    with pytest.raises(ValueError, match="square root"):
        frechet_distance_rooted(mu1, s1, mu2, s2, root2[:4, :4])


def test_feature_fid_distance_keeps_the_reference_root_by_content():
    """The reference covariance's square root is computed once and reused; an edited covariance is a new
    entry (keyed by content), and every distance equals the numpy eigh path."""
    from multiquant.metrics import FeatureFID

    rng = _rng(12)
    d = 24
    ref_mu, ref_sigma = feature_stats(rng.normal(size=(100, d)) @ rng.normal(size=(d, d)))
    metric = FeatureFID(nn.Flatten(), reference_stats=(ref_mu, ref_sigma))
    assert metric.distance_device == torch.device("cpu")
    stats = [feature_stats(rng.normal(size=(n, d)) * 0.7 + 0.2) for n in (60, 10)]
    for mu, sigma in stats:
        assert metric.distance(mu, sigma) == pytest.approx(
            frechet_distance(mu, sigma, ref_mu, ref_sigma, method="eigh"), rel=1e-7)
    assert len(metric._roots) == 1
    other = {"mu": stats[0][0], "sigma": stats[0][1].copy()}
    assert metric.distance(*stats[0], other) == pytest.approx(0.0, abs=1e-6)
    other["sigma"] *= 2.0  # edited in place: a new key, not the stale root
    assert metric.distance(*stats[0], other) == pytest.approx(
        frechet_distance(*stats[0], other["mu"], other["sigma"], method="eigh"), rel=1e-9)
    assert len(metric._roots) == 3


# ----------------------------------------------------------------------------------------------------
# feature networks
class _FakeInceptionLayers(nn.Module):
    """FAKE stand-in for Inception's pool features: 2048-d, random weights (test only)."""

    def __init__(self):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.fc = nn.Linear(48, 2048)

    def forward(self, x):
        return self.fc(self.pool(x).flatten(1)).view(x.shape[0], 2048, 1, 1)


class _FakeInceptionBase(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = _FakeInceptionLayers()

    def forward(self, x, return_features: bool = False):
        return self.layers(x)


@pytest.fixture()
def fake_inception(tmp_path):
    """A FAKE Inception torchscript in clean-fid's file layout; returns (path, eager layers)."""
    torch.manual_seed(5)
    base = _FakeInceptionBase().eval()
    path = tmp_path / "inception-2015-12-05.pt"
    torch.jit.script(base).save(str(path))
    return path, base.layers


def _random_images(n, c=3, h=40, w=56, seed=6):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, c, h, w), dtype=torch.uint8, generator=g)


def test_inception_features_equal_clean_fid_folder_pipeline(fake_inception, tmp_path, monkeypatch):
    """Our in-memory path == clean-fid's PNG-folder path (read, PIL-bicubic resize, model), same network."""
    from PIL import Image
    from cleanfid.fid import get_folder_features
    from cleanfid.inception_torchscript import InceptionV3W

    from multiquant.metrics.features import INCEPTION_ENV, InceptionFeatures

    path, _ = fake_inception
    images = _random_images(5)
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i, img in enumerate(images):
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(folder / f"{i}.png")
    cleanfid_model = InceptionV3W(str(path.parent), download=False).eval()
    theirs = get_folder_features(str(folder), model=cleanfid_model, num_workers=0, batch_size=5,
                                 device=torch.device("cpu"), mode="clean", verbose=False)

    monkeypatch.setenv(INCEPTION_ENV, str(path))
    net = InceptionFeatures(device="cpu", batch_size=2, download=False)
    ours = net(images)
    assert ours.dtype == np.float64 and ours.shape == (5, 2048)
    np.testing.assert_allclose(ours, theirs.astype(np.float64), rtol=1e-5, atol=1e-5)
    assert net.name == "inception-v3-clean"


def test_inception_features_preprocessing_and_batching(fake_inception, tmp_path):
    from multiquant.metrics.features import InceptionFeatures, clean_resize

    path, layers = fake_inception
    renamed = tmp_path / "my_inception.pt"  # a non-canonical file name is accepted too
    renamed.write_bytes(path.read_bytes())
    gray = _random_images(3, c=1, seed=7)
    net = InceptionFeatures(batch_size=2, weights=renamed, download=False)
    feats = net(gray)
    resized = clean_resize(gray)
    assert resized.shape == (3, 3, 299, 299) and resized.dtype == torch.float32
    assert torch.equal(resized[:, 0], resized[:, 2])  # grayscale replicated to RGB, as convert('RGB')
    with torch.no_grad():
        expected = layers((resized - 128) / 128).view(3, 2048).double().numpy()
    np.testing.assert_allclose(feats, expected, rtol=1e-5, atol=1e-6)
    # one batch vs three batches
    np.testing.assert_allclose(InceptionFeatures(batch_size=8, weights=renamed, download=False)(gray), feats,
                               rtol=1e-5, atol=1e-6)


def test_inception_missing_weights_is_a_clear_error(tmp_path, monkeypatch):
    from multiquant.metrics.features import INCEPTION_ENV, InceptionFeatures, InceptionWeightsMissing

    monkeypatch.setenv(INCEPTION_ENV, str(tmp_path / "nope.pt"))
    with pytest.raises(InceptionWeightsMissing, match=INCEPTION_ENV):
        InceptionFeatures(download=False)


def test_random_inception_is_labelled_random():
    from multiquant.metrics.features import RandomInceptionFeatures

    net = RandomInceptionFeatures(batch_size=2, seed=3)
    assert "random" in net.name
    feats = net(_random_images(2, h=32, w=32))  # two images: a full Inception forward is slow on 2 cores
    assert feats.shape == (2, 2048) and feats.dtype == np.float64 and np.isfinite(feats).all()
    # not degenerate: each vector rescaled to norm sqrt(2048) (raw random features are ~1e-8), images told apart
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 2048 ** 0.5, rtol=1e-9)
    assert np.abs(feats[0] - feats[1]).max() > 1e-3


def test_module_features_batched_float64():
    from multiquant.metrics.features import ModuleFeatures

    torch.manual_seed(8)
    module = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 5))
    images = _random_images(7, h=8, w=8, seed=9)
    net = ModuleFeatures(module, name="toy-linear", batch_size=3)
    feats = net(images)
    w = module[1].weight.detach().double().numpy()
    b = module[1].bias.detach().double().numpy()
    expected = (images.double().flatten(1).numpy() / 255.0) @ w.T + b
    assert feats.dtype == np.float64
    np.testing.assert_allclose(feats, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match="uint8"):
        net(images.float())


# ----------------------------------------------------------------------------------------------------
# reference statistics cache
class _CountingNet:
    def __init__(self, name="count-net"):
        self.name = name
        self.calls = 0

    def __call__(self, images):
        self.calls += 1
        return torch.stack(list(images)).double().flatten(1)[:, :6].numpy() + 0.5 * np.arange(6)


def test_reference_stats_cached_once(tmp_path, monkeypatch):
    from multiquant.paths import constants
    from multiquant.metrics.stats import reference_stats, stats_cache_path

    monkeypatch.setattr(constants, "STATS_CACHE_DIR", tmp_path / "stats")
    images = _random_images(9, h=4, w=4, seed=10)
    net = _CountingNet()
    calls = []

    def images_fn():
        calls.append(1)
        return images

    mu, sigma = reference_stats("coco/val2017 (5k)", net, images_fn)
    exp_mu, exp_sigma = feature_stats(net(images))
    np.testing.assert_allclose(mu, exp_mu, rtol=1e-12)
    np.testing.assert_allclose(sigma, exp_sigma, rtol=1e-12)
    path = stats_cache_path("coco/val2017 (5k)", net.name)
    assert path.exists() and path.parent == tmp_path / "stats"

    def must_not_run():
        raise AssertionError("a cache hit must not recompute")

    mu2, sigma2 = reference_stats("coco/val2017 (5k)", net, must_not_run)
    np.testing.assert_array_equal(mu2, mu)
    np.testing.assert_array_equal(sigma2, sigma)
    assert len(calls) == 1
    # another feature network or reference id is another entry
    reference_stats("coco/val2017 (5k)", _CountingNet("other-net"), images_fn)
    reference_stats("coco/val2017_(5k)", net, images_fn)
    assert len(calls) == 3
    assert not list((tmp_path / "stats").glob("*.tmp-*"))


def test_reference_stats_from_folder_batches(tmp_path):
    from PIL import Image
    from multiquant.metrics.stats import iter_image_folder, reference_stats

    sizes = [(10, 12), (7, 9), (12, 12), (5, 6), (9, 9)]
    imgs = []
    for i, (h, w) in enumerate(sizes):
        arr = _random_images(1, h=h, w=w, seed=20 + i)[0]
        imgs.append(arr)
        (tmp_path / "ref" / "sub").mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr.permute(1, 2, 0).numpy()).save(tmp_path / "ref" / "sub" / f"{i}.png")

    def net(images):
        return np.stack([img.double().mean(dim=(1, 2)).numpy() for img in images])

    net.name = "channel-means"
    batches = list(iter_image_folder(tmp_path / "ref", batch_size=2))
    assert [len(b) for b in batches] == [2, 2, 1]
    assert all(b.dtype == torch.uint8 and b.shape[0] == 3 for batch in batches for b in batch)
    mu, sigma = reference_stats("toy-ref", net, lambda: iter_image_folder(tmp_path / "ref", batch_size=2),
                                cache_dir=tmp_path / "cache")
    exp_mu, exp_sigma = feature_stats(net(imgs))
    np.testing.assert_allclose(mu, exp_mu, rtol=1e-12)
    np.testing.assert_allclose(sigma, exp_sigma, rtol=1e-12)


# ----------------------------------------------------------------------------------------------------
# proxy metrics
def _ssim_reference(x: np.ndarray, y: np.ndarray, peak: float) -> float:
    """Float64 SSIM of one image [C, H, W] with a 2-D 11x11 Gaussian (sigma 1.5), 'valid' windows."""
    g = np.exp(-((np.arange(11) - 5.0) ** 2) / (2 * 1.5 ** 2))
    win = np.outer(g, g)
    win /= win.sum()
    c1, c2 = (0.01 * peak) ** 2, (0.03 * peak) ** 2
    vals = []
    for xc, yc in zip(x, y):
        def f(z):
            return signal.correlate2d(z, win, mode="valid")
        mx, my = f(xc), f(yc)
        vx = f(xc * xc) - mx ** 2
        vy = f(yc * yc) - my ** 2
        cxy = f(xc * yc) - mx * my
        vals.append(((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2)))
    return float(np.mean(vals))


def test_ssim_psnr_mse_vs_float64_reference():
    from multiquant.metrics.proxy import mse, psnr, ssim

    a = _random_images(3, h=24, w=20, seed=11)
    noise = torch.randint(-25, 26, a.shape, generator=torch.Generator().manual_seed(12))
    b = (a.int() + noise).clamp(0, 255).to(torch.uint8)
    got = ssim(a, b, batch_size=2)
    assert got.dtype == torch.float64 and got.shape == (3,)
    for i in range(3):
        ref = _ssim_reference(a[i].double().numpy(), b[i].double().numpy(), 255.0)
        assert got[i].item() == pytest.approx(ref, rel=1e-10, abs=1e-12)
    assert torch.allclose(ssim(a, a), torch.ones(3, dtype=torch.float64))

    diff = a.double().numpy() - b.double().numpy()
    ref_mse = (diff ** 2).reshape(3, -1).mean(1)
    np.testing.assert_allclose(mse(a, b).numpy(), ref_mse, rtol=1e-12)
    np.testing.assert_allclose(psnr(a, b).numpy(), 10 * np.log10(255.0 ** 2 / ref_mse), rtol=1e-12)
    assert torch.isinf(psnr(a, a)).all()

    # float images in [0, 1] use data range 1
    af, bf = a.double() / 255, b.double() / 255
    torch.testing.assert_close(ssim(af, bf), got, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(psnr(af, bf), psnr(a, b), rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError):
        ssim(a, b[:, :, :10])


# ----------------------------------------------------------------------------------------------------
# CLIP (plumbing only: FAKE transformers module)
def test_clip_cosine_and_errors(monkeypatch, tmp_path):
    from multiquant.metrics import clip as clip_mod

    rng = _rng(13)
    a, b = rng.normal(size=(4, 8)), rng.normal(size=(4, 8))
    ref = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    np.testing.assert_allclose(clip_mod.clip_cosine(torch.tensor(a).float(), torch.tensor(b).float()).numpy(), ref,
                               rtol=1e-5, atol=1e-6)

    monkeypatch.setitem(sys.modules, "transformers", None)  # import fails
    with pytest.raises(ImportError, match="pip install transformers"):
        clip_mod.clip_score([], [], model_dir=tmp_path)

    fake = types.ModuleType("transformers")  # FAKE: deterministic embeddings from pixels / prompt length

    class FakeModel:
        @classmethod
        def from_pretrained(cls, path, local_files_only):
            assert local_files_only
            return cls()

        def to(self, device):
            return self

        def eval(self):
            return self

        def __call__(self, pixel_values, lengths):
            out = types.SimpleNamespace()
            out.image_embeds = pixel_values
            out.text_embeds = lengths
            return out

    class FakeProcessor:
        @classmethod
        def from_pretrained(cls, path, local_files_only):
            return cls()

        def __call__(self, text, images, return_tensors, padding, truncation):
            pix = torch.tensor(np.stack([im.reshape(-1, 3).mean(0) for im in images]))
            lengths = torch.tensor([[len(t), 1.0, 2.0] for t in text], dtype=torch.float64)
            return {"pixel_values": pix, "lengths": lengths}

    fake.CLIPModel, fake.CLIPProcessor = FakeModel, FakeProcessor
    monkeypatch.setitem(sys.modules, "transformers", fake)
    monkeypatch.delenv(clip_mod.CLIP_ENV, raising=False)
    with pytest.raises(FileNotFoundError, match=clip_mod.CLIP_ENV):
        clip_mod.clip_score([], [])
    with pytest.raises(FileNotFoundError, match="config.json"):
        clip_mod.clip_score([], [], model_dir=tmp_path)
    (tmp_path / "config.json").write_text("{}")
    images = _random_images(5, h=6, w=6, seed=14)
    prompts = ["a", "bb", "ccc", "dddd", "eeeee"]
    scores = clip_mod.clip_score(images, prompts, model_dir=tmp_path, batch_size=2)
    img = images.double().permute(0, 2, 3, 1).reshape(5, -1, 3).mean(1).numpy()
    txt = np.array([[len(p), 1.0, 2.0] for p in prompts])
    ref = (img * txt).sum(1) / (np.linalg.norm(img, axis=1) * np.linalg.norm(txt, axis=1))
    np.testing.assert_allclose(scores, ref, rtol=1e-12)


# ----------------------------------------------------------------------------------------------------
# MACs and BOPs
class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.proj = nn.Linear(4, 12)  # -> q, k, v with 2 heads of 2
        self.cat_proj = nn.Linear(8, 5)  # input is cat([x, x]): a split layer
        self.head = nn.Linear(5, 3)  # excluded from quantization
        self.mix = nn.Parameter(torch.randn(3, 3))

    def forward(self, x):
        h = self.conv(x)  # [B, 4, 6, 6]
        t = h.flatten(2).transpose(1, 2)  # [B, 36, 4]
        q, k, v = self.proj(t).chunk(3, dim=-1)  # [B, 36, 4]
        split = lambda z: z.view(z.shape[0], 36, 2, 2).transpose(1, 2)  # noqa: E731
        a = F.scaled_dot_product_attention(split(q), split(k), split(v))  # [B, 2, 36, 2]
        a = a.transpose(1, 2).reshape(-1, 36, 4)
        y = self.head(self.cat_proj(torch.cat([a, a], -1)))
        return torch.matmul(y, self.mix)  # activation x parameter, not a Linear: an extra matmul


def _toy_family():
    from multiquant.families import FamilySpec

    return FamilySpec(name="toy_bops", factory=lambda size: _Toy(), exclude=("head",),
                      split_rule=lambda m: {"cat_proj": 4}, resolution=6,
                      example_inputs=lambda model, batch: {"x": torch.randn(batch, 3, 6, 6)})


def test_layer_macs_hand_computed():
    from multiquant.metrics.bops import layer_macs

    fam = _toy_family()
    model = fam.build("tiny")
    macs = layer_macs(model, fam, batch=2)
    b = 2
    assert macs == {
        "conv": b * 4 * 6 * 6 * 3 * 3 * 3,
        "proj": b * 36 * 4 * 12,
        "::qk": b * 2 * 36 * 36 * 2,  # SDPA called at the top level: path ""
        "::av": b * 2 * 36 * 36 * 2,
        "cat_proj": b * 36 * 8 * 5,
        "head": b * 36 * 5 * 3,
        "::matmul": b * 36 * 3 * 3,
    }


def test_config_bops_hand_computed():
    from multiquant.layers import quantizable_layers
    from multiquant.metrics.bops import config_bops, layer_macs, weight_bits

    fam = _toy_family()
    model = fam.build("tiny")
    macs = layer_macs(model, fam, batch=1)
    layers = quantizable_layers(model, fam)
    assert [r.key for r in layers] == ["model.conv.weight_quantizer", "model.proj.weight_quantizer",
                                       "model.cat_proj.weight_quantizer", "model.cat_proj.weight_quantizer_0"]
    config = {"model.conv.weight_quantizer": ["mse-3", 1, 1, 0.1], "model.proj.weight_quantizer": "kmeans-3",
              "model.cat_proj.weight_quantizer": "mse-4", "model.cat_proj.weight_quantizer_0": "kmeans_all-4"}
    a = 8
    expected = (macs["conv"] * 3 * a + macs["proj"] * 16 * a  # K-Means: LUT -> FP16 weights
                + macs["cat_proj"] * 0.5 * 4 * a + macs["cat_proj"] * 0.5 * 16 * a  # halves by channel share
                + (macs["::qk"] + macs["::av"] + macs["::matmul"]) * a * a  # activation products
                + macs["head"] * 16 * 16)  # excluded layer: FP16
    assert config_bops(config, layers, macs, act_bits=a) == pytest.approx(expected / 1e12, rel=1e-12)
    assert [weight_bits(o) for o in ("mse-3", "mse-4", "kmeans-3", "kmeans_all-4", "fp16")] == [3, 4, 16, 16, 16]
    with pytest.raises(ValueError):
        weight_bits("int8")


def test_layer_macs_tiny_pixart_per_linear():
    from multiquant.families import get_family
    from multiquant.metrics.bops import layer_macs

    fam = get_family("pixart_alpha")
    model = fam.build("tiny")
    macs = layer_macs(model, fam, resolution=64, batch=1, text_tokens=5)  # latent 8x8, patch 2 -> 16 tokens
    blk = model.transformer_blocks[0]
    heads, dim = 2, 8
    assert macs["transformer_blocks.0.attn1.to_q"] == 16 * blk.attn1.to_q.in_features * blk.attn1.to_q.out_features
    assert macs["transformer_blocks.0.attn2.to_k"] == 5 * blk.attn2.to_k.in_features * blk.attn2.to_k.out_features
    assert macs["transformer_blocks.0.attn1::qk"] == heads * 16 * 16 * dim
    assert macs["transformer_blocks.0.attn2::av"] == heads * 16 * 5 * dim


def test_layer_macs_full_pixart_on_meta_matches_paper_constants():
    from multiquant.families import get_family
    from multiquant.metrics.bops import layer_macs

    fam = get_family("pixart_alpha")
    model = fam.build("full", device="meta")
    macs = layer_macs(model, fam)  # 512 px -> 1024 tokens, 120 T5 tokens, width 1152
    assert macs["transformer_blocks.0.attn1::qk"] == 1024 * 1024 * 1152  # the reference's SA 1.21e9
    assert macs["transformer_blocks.0.attn2::qk"] == 1024 * 120 * 1152  # the reference's CA 141.56e6
    assert macs["transformer_blocks.27.ff.net.0.proj"] == 1024 * 1152 * 4608


def test_features_while_rendering_overlaps_and_gives_the_same_numbers():
    """The feature pass runs on chunks while later batches render; the chunks are those of one call on all
    images, so the features are bit-identical."""
    import threading

    from multiquant.evaluate import features_while_rendering
    from multiquant.metrics.features import ModuleFeatures

    torch.manual_seed(3)
    net = ModuleFeatures(nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4), nn.Tanh()), name="toy", batch_size=3)
    images = _random_images(10, h=8, w=8, seed=4)
    first_chunk_done = threading.Event()

    def features(chunk):
        out = net(chunk)
        first_chunk_done.set()
        return out

    def batches():  # batches of 4 (not a multiple of the chunk of 3); the last batch waits for a feature chunk
        for start in range(0, 10, 4):
            if start == 8:
                assert first_chunk_done.wait(timeout=30), "features did not run while rendering"
            yield images[start:start + 4]

    timings = {}
    got_images, got = features_while_rendering(batches(), features, chunk=3, timings=timings)
    assert torch.equal(got_images, images)
    np.testing.assert_array_equal(got, net(images))
    # chunks [0:3] and [3:6] were handed over before the last batch, [6:9] with it and [9:10] after it
    assert timings["feature_chunks_overlapped"] == 2 and timings["features_tail_s"] >= 0.0


def test_clean_resize_on_threads_is_bit_identical():
    from multiquant.metrics.features import clean_resize

    images = [*_random_images(3, h=37, w=52, seed=13), *_random_images(2, c=1, h=29, w=31, seed=14)]
    one = clean_resize(images, size=23, workers=1)
    assert one.shape == (5, 3, 23, 23) and one.dtype == torch.float32
    assert torch.equal(clean_resize(images, size=23, workers=3), one)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the feature network's own stream")
def test_feature_net_on_its_own_cuda_stream_gives_the_default_stream_features():
    """On CUDA the feature network runs on its own stream, from a worker thread while the default stream is busy:
    the features equal those of its forward on the default stream; images written on the default stream are
    waited for; the Frechet distance runs on the GPU and equals the numpy path."""
    from multiquant.evaluate import features_while_rendering
    from multiquant.metrics import FeatureFID
    from multiquant.metrics.features import ModuleFeatures

    torch.manual_seed(5)
    conv = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten())
    net = ModuleFeatures(conv, name="toy-cuda", batch_size=4, device="cuda")
    images = _random_images(11, h=32, w=32, seed=15)
    with torch.inference_mode():
        expected = torch.cat([net._forward(list(images[i:i + 4])).double().cpu() for i in range(0, 11, 4)]).numpy()
    busy = torch.randn(4096, 4096, device="cuda")

    def batches():  # the default stream stays busy while the worker computes features
        for start in range(0, 11, 3):
            for _ in range(20):
                busy.copy_(torch.tanh(busy @ busy / 4096))
            yield images[start:start + 3]

    _, got = features_while_rendering(batches(), net, chunk=4)
    np.testing.assert_array_equal(got, expected)
    on_gpu = torch.empty_like(images, device="cuda")
    for _ in range(20):
        busy.copy_(torch.tanh(busy @ busy / 4096))
    on_gpu.copy_(images.cuda())  # written on the default stream behind the busy kernels
    np.testing.assert_array_equal(net(on_gpu), expected)

    rng = _rng(16)
    ref_mu, ref_sigma = feature_stats(rng.normal(size=(300, 16 * 2 * 2)))
    metric = FeatureFID(net, reference_stats=(ref_mu, ref_sigma))
    assert metric.distance_device.type == "cuda"
    mu, sigma = feature_stats(got)
    assert metric.distance(mu, sigma) == pytest.approx(
        frechet_distance(mu, sigma, ref_mu, ref_sigma, method="eigh"), rel=1e-7)
