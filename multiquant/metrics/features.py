"""Feature networks for FID, behind one small interface.

A feature network is any object with

* ``name``: str, identifies the network in the reference-statistics cache key, and
* ``__call__(images) -> np.ndarray`` float64 ``[N, D]``, where ``images`` is a uint8 tensor
  ``[N, C, H, W]`` (C = 1 or 3) or a list of uint8 ``[C, H, W]`` tensors of different sizes
  (reference folders). It batches internally and runs on its own device.

Provided: :class:`InceptionFeatures` (clean-fid "clean" mode, in memory), :class:`RandomInceptionFeatures`
(same cost, random weights; timing only) and :class:`ModuleFeatures` (wrap any ``nn.Module``, e.g. the
MNIST classifier's penultimate layer).
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import UserError

__all__ = ["FeatureNet", "InceptionFeatures", "RandomInceptionFeatures", "ModuleFeatures",
           "InceptionWeightsMissing", "clean_resize", "default_resize_workers", "inception_weights_path", "INCEPTION_ENV", "INCEPTION_FILE"]

INCEPTION_ENV = "QUA2SEDIMO_INCEPTION"
INCEPTION_FILE = "inception-2015-12-05.pt"  # the torchscript file clean-fid downloads
INCEPTION_SIZE = 299
Images = torch.Tensor | Sequence[torch.Tensor]


class InceptionWeightsMissing(UserError, FileNotFoundError):
    """The Inception torchscript is not available locally and could not be downloaded."""


def default_resize_workers() -> int:
    """Threads for the per-image CPU resize: half the CPUs this process may use (the other half keeps the
    sampler's Python and the data loading going), at most 8."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cpus // 2))


class FeatureNet:
    """Base class: batching, uint8 checks and float64 output; subclasses implement ``_forward``.

    On CUDA the network runs on a CUDA stream of its own, so that a feature pass on a worker thread
    (evaluate.features_while_rendering) does not queue its kernels between the denoiser's on the default stream.
    The stream waits for the caller's stream when it is made and whenever images arrive on the GPU; each call
    returns only after its stream's work is done (the features are copied to the CPU on it). A feature network
    whose weights are rewritten later drops its stream (:meth:`reset_stream`)."""

    name: str = "feature-net"

    def __init__(self, device: str | torch.device = "cpu", batch_size: int = 32):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.batch_size = batch_size
        self._stream = None

    def _forward(self, images: list[torch.Tensor]) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def reset_stream(self) -> None:
        """Forget the CUDA stream: the next call makes one that waits for the caller's stream (after the
        network's weights were moved or rewritten there)."""
        self._stream = None

    @contextmanager
    def _on_own_stream(self, images: list[torch.Tensor]):
        if self.device.type != "cuda" or not torch.cuda.is_available():
            yield
            return
        caller = torch.cuda.current_stream(self.device)
        if getattr(self, "_stream", None) is None:
            # priority 0 is CUDA's lowest, the default stream's: no lower one exists
            self._stream = torch.cuda.Stream(self.device, priority=0)
            self._stream.wait_stream(caller)  # the network's weights were written on the caller's stream
        elif any(img.is_cuda for img in images):
            self._stream.wait_stream(caller)  # images produced there
        with torch.cuda.stream(self._stream):
            yield

    @torch.inference_mode()
    def __call__(self, images: Images) -> np.ndarray:
        images = _as_image_list(images)
        if not images:
            raise ValueError("no images given")
        with self._on_own_stream(images):
            chunks = [self._forward(images[i:i + self.batch_size]) for i in range(0, len(images), self.batch_size)]
            # a blocking copy to the CPU on this stream: the features are complete when it returns
            feats = torch.cat([c.detach().to("cpu", torch.float64).reshape(c.shape[0], -1) for c in chunks])
        return feats.numpy()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, device={str(self.device)!r}, batch_size={self.batch_size})"


def _as_image_list(images: Images) -> list[torch.Tensor]:
    if isinstance(images, torch.Tensor):
        if images.ndim != 4:
            raise ValueError(f"images must be [N, C, H, W], got shape {tuple(images.shape)}")
        images = list(images)
    images = list(images)
    for img in images:
        if not isinstance(img, torch.Tensor) or img.dtype != torch.uint8 or img.ndim != 3:
            got = f"{type(img).__name__} {getattr(img, 'dtype', '')} {tuple(getattr(img, 'shape', ()))}"
            raise TypeError(f"images must be uint8 tensors [C, H, W] with values 0..255, got {got}")
        if img.shape[0] not in (1, 3):
            raise ValueError(f"images must have 1 or 3 channels, got {img.shape[0]}")
    return images


# ----------------------------------------------------------------------------------------------------
# clean-fid "clean" resize, in memory
def _clean_resizer(size: int):
    from cleanfid.resize import make_resizer

    # clean-fid's "clean" mode: PIL bicubic on float32 channels, clipped to 0..255, not re-quantised.
    return make_resizer("PIL", False, "bicubic", (size, size))


def clean_resize(images: Images, size: int = INCEPTION_SIZE, workers: int = 1) -> torch.Tensor:
    """clean-fid's resize applied to uint8 images: float32 ``[N, 3, size, size]`` in 0..255.

    Grayscale is replicated to RGB, as clean-fid's ``convert('RGB')`` does. This is exactly what
    clean-fid computes after reading a PNG, minus the PNG round trip. ``workers`` > 1 resizes the images on
    that many threads (each image on its own: the same numbers)."""
    resize = _clean_resizer(size)
    arrays = []
    for img in _as_image_list(images):
        if img.shape[0] == 1:
            img = img.expand(3, -1, -1)
        arrays.append(img.permute(1, 2, 0).cpu().numpy())
    if workers > 1 and len(arrays) > 1:  # PIL releases the GIL while resizing
        with ThreadPoolExecutor(min(workers, len(arrays))) as pool:
            out = list(pool.map(resize, arrays))
    else:
        out = [resize(a) for a in arrays]
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()


# ----------------------------------------------------------------------------------------------------
# Inception
def _clean_fid_weights_dir() -> Path:
    import platform

    return Path("./") if platform.system() == "Windows" else Path("/tmp")  # where clean-fid keeps it


def inception_weights_path(path: str | os.PathLike | None = None, download: bool = True) -> Path:
    """Locate the Inception torchscript: ``path`` > ``$QUA2SEDIMO_INCEPTION`` > clean-fid's location
    (downloaded there by clean-fid when ``download`` and the network allow). A directory means
    ``<dir>/inception-2015-12-05.pt``."""
    source = path or os.environ.get(INCEPTION_ENV)
    if source:
        candidate = Path(source).expanduser()
        if candidate.is_dir():
            candidate = candidate / INCEPTION_FILE
        if candidate.is_file():
            return candidate
        raise InceptionWeightsMissing(
            f"Inception torchscript not found at {candidate} (from {'argument' if path else '$' + INCEPTION_ENV}). "
            + _HOW_TO_PROVIDE)
    default = _clean_fid_weights_dir() / INCEPTION_FILE
    if default.is_file():
        return default
    if download:
        from cleanfid.downloads_helper import check_download_inception, inception_url

        try:
            check_download_inception(fpath=str(default.parent))
        except Exception as err:
            if default.exists():  # it was absent before, so this is a torn download: do not keep it
                default.unlink()
            raise InceptionWeightsMissing(
                f"Inception torchscript missing at {default} and the download from {inception_url} failed "
                f"({type(err).__name__}: {err}). " + _HOW_TO_PROVIDE) from err
        return default
    raise InceptionWeightsMissing(f"Inception torchscript missing at {default}. " + _HOW_TO_PROVIDE)


_HOW_TO_PROVIDE = (
    f"Provide it by copying {INCEPTION_FILE} (clean-fid's file, from "
    "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt) "
    f"to {_clean_fid_weights_dir() / INCEPTION_FILE}, or set {INCEPTION_ENV}=/path/to/{INCEPTION_FILE} "
    "(or to its directory).")


class InceptionFeatures(FeatureNet):
    """Inception-v3 pool features (2048-d) exactly as clean-fid's "clean" mode computes them.

    clean-fid's torchscript wrapper (``InceptionV3W``), clean-fid's PIL-bicubic resize to 299,
    applied to uint8 images in memory. Missing weights raise :class:`InceptionWeightsMissing`
    (never a silent substitute)."""

    name = "inception-v3-clean"

    def __init__(self, device: str | torch.device = "cpu", batch_size: int = 32,
                 weights: str | os.PathLike | None = None, download: bool = True, resize_workers: int | None = None):
        super().__init__(device, batch_size)
        path = inception_weights_path(weights, download=download)
        self.weights_path = path
        self.resize_workers = resize_workers or default_resize_workers()
        self.model = _load_inception_torchscript(path, self.device)

    def _forward(self, images):
        x = clean_resize(images, INCEPTION_SIZE, self.resize_workers).to(self.device)
        return self.model(x)


def _load_inception_torchscript(path: Path, device: torch.device) -> nn.Module:
    from cleanfid.inception_torchscript import InceptionV3W

    if path.name != INCEPTION_FILE:
        # InceptionV3W loads <dir>/inception-2015-12-05.pt; give it a private directory with that name.
        import tempfile

        link_dir = Path(tempfile.mkdtemp(prefix="qua2sedimo-inception-"))
        (link_dir / INCEPTION_FILE).symlink_to(path.resolve())
        path = link_dir / INCEPTION_FILE
    try:
        model = InceptionV3W(str(path.parent), download=False, resize_inside=False)
    except (RuntimeError, ValueError) as err:
        raise InceptionWeightsMissing(
            f"{path} is not a loadable Inception torchscript ({err}). " + _HOW_TO_PROVIDE) from err
    return model.to(device).eval()


class RandomInceptionFeatures(FeatureNet):
    """Inception-v3 (torchvision architecture, 2048-d pool features) with **random** weights.

    Same resize and roughly the same compute as :class:`InceptionFeatures`; for timing benchmarks, pipeline
    tests and data-free smoke runs. A random-weight Inception shrinks its activations layer by layer (raw
    features are about 1e-8, so every FID came out 0.000): each feature vector is rescaled to norm sqrt(2048),
    which keeps its direction, so FIDs come out in a readable range and grow with how far images move. They are
    in arbitrary units, never comparable with Inception FIDs; the ``name`` says "random" so cached statistics
    never mix with real ones."""

    def __init__(self, device: str | torch.device = "cpu", batch_size: int = 32, seed: int = 0,
                 resize_workers: int | None = None):
        super().__init__(device, batch_size)
        from torchvision.models import inception_v3

        self.name = f"inception-v3-random-seed{seed}-unitnorm"
        self.resize_workers = resize_workers or default_resize_workers()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = inception_v3(weights=None, aux_logits=False, init_weights=False, transform_input=False)
        model.fc = nn.Identity()
        self.model = model.to(self.device).eval()

    def _forward(self, images):
        x = clean_resize(images, INCEPTION_SIZE, self.resize_workers).to(self.device)
        feats = self.model((x - 128) / 128).double()
        return feats * feats.shape[1] ** 0.5 / feats.norm(dim=1, keepdim=True).clamp_min(1e-300)


class ModuleFeatures(FeatureNet):
    """Any ``nn.Module`` as a feature network.

    ``preprocess`` maps a uint8 batch ``[B, C, H, W]`` (on the module's device) to the module's input;
    the default scales to [0, 1] float32. The output is flattened to ``[B, D]``. Images of a batch
    must share one size (stack them yourself or resize in ``preprocess``)."""

    def __init__(self, module: nn.Module, name: str, preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 device: str | torch.device | None = None, batch_size: int = 64):
        if device is None:
            param = next(module.parameters(), None)
            device = param.device if param is not None else "cpu"
        super().__init__(device, batch_size)
        if not name:
            raise ValueError("a feature network needs a non-empty name (it keys the statistics cache)")
        self.name = name
        self.module = module.to(self.device).eval()
        self.preprocess = preprocess or (lambda x: x.float() / 255.0)

    def _forward(self, images):
        shapes = {tuple(img.shape) for img in images}
        if len(shapes) != 1:
            raise ValueError(f"{self.name}: images of one batch differ in size {sorted(shapes)}; resize them first")
        x = torch.stack(images).to(self.device)
        return self.module(self.preprocess(x))
