"""Real MNIST digits from the official idx files, and the fixed split every MNIST figure uses.

Only the official 10,000-digit **test** set is needed (``t10k-*-idx*-ubyte.gz``); its location is
``constants.MNIST_DIR`` (env ``QUA2SEDIMO_MNIST``, or ``--mnist-dir`` on the scripts).

The split is by index modulo 10, so it is version-proof (no RNG) and mixes both writer populations of
the test set (its first and second halves come from different writer groups):

* ``train``     (``i % 10`` in 0..6, 7,000 digits): trains the denoiser and the classifier.
* ``reference`` (``i % 10`` in 7, 8, 2,000 digits): the MNIST-FID reference statistics.
* ``eval``      (``i % 10 == 9``, 1,000 digits): the FID floor (real digits vs the reference statistics).

``reference`` and ``eval`` together (``heldout``, 3,000 digits) are never seen by either network in
training; the classifier's accuracy figure is measured on them.
"""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch

IMAGE_FILE = "t10k-images-idx3-ubyte.gz"
LABEL_FILE = "t10k-labels-idx1-ubyte.gz"
NUM_DIGITS = 10_000
MNIST_FIX = (f"put the official MNIST test set ({IMAGE_FILE}, {LABEL_FILE}; e.g. from "
             f"https://ossci-datasets.s3.amazonaws.com/mnist/, the mirror torchvision uses, or "
             f"`python -c \"import torchvision; torchvision.datasets.MNIST('DIR', train=False, download=True)\"`, "
             f"which writes them to DIR/MNIST/raw) into one folder and point to it with QUA2SEDIMO_MNIST=DIR "
             f"(or QUA2SEDIMO_DATA=D holding D/mnist) or the --mnist-dir DIR flag")
SPLITS = {
    "train": tuple(range(0, 7)),
    "reference": (7, 8),
    "eval": (9,),
    "heldout": (7, 8, 9),
    "all": tuple(range(10)),
}


def mnist_dir(path: str | Path | None = None) -> Path:
    """The folder holding the idx files: ``path`` if given, else ``constants.MNIST_DIR``."""
    if path is None:
        from multiquant.paths import constants

        path = constants.MNIST_DIR
    if path is None:
        raise FileNotFoundError(f"no MNIST folder given. Fix: {MNIST_FIX}")
    folder = Path(path).expanduser()
    missing = [name for name in (IMAGE_FILE, LABEL_FILE) if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"MNIST test-set files {missing} not found in {folder}. Fix: {MNIST_FIX}")
    return folder


def _read_idx(path: Path, offset: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), dtype=np.uint8, offset=offset)


def load_mnist_test(path: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """All 10,000 test digits: uint8 images ``[N, 28, 28]`` and int64 labels ``[N]``."""
    folder = mnist_dir(path)
    images = _read_idx(folder / IMAGE_FILE, 16).reshape(-1, 28, 28).copy()  # writable, torch-friendly
    labels = _read_idx(folder / LABEL_FILE, 8).astype(np.int64)
    if len(images) != NUM_DIGITS or len(labels) != NUM_DIGITS:
        raise ValueError(f"{folder} holds {len(images)} images / {len(labels)} labels; the MNIST test set has "
                         f"{NUM_DIGITS} of each (is it the training set or a truncated download?)")
    return images, labels


def split_indices(split: str, n: int = NUM_DIGITS) -> np.ndarray:
    """Indices (into the 10,000 test digits) of one named split."""
    if split not in SPLITS:
        raise KeyError(f"unknown MNIST split {split!r}; known: {', '.join(SPLITS)}")
    return np.flatnonzero(np.isin(np.arange(n) % 10, SPLITS[split]))


def load_split(split: str, path: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images ``[N, 28, 28]`` and labels of one split."""
    images, labels = load_mnist_test(path)
    idx = split_indices(split)
    return images[idx], labels[idx]


def to_model_range(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 ``[N, 28, 28]`` or ``[N, 1, 28, 28]`` -> float32 ``[N, 1, 28, 28]`` in [-1, 1] (the denoiser's space)."""
    x = torch.as_tensor(np.asarray(images) if not torch.is_tensor(images) else images).float()
    if x.dim() == 3:
        x = x[:, None]
    return x / 127.5 - 1.0


MODEL_RANGE = (-1.0, 1.0)  # pixel range the MNIST models work in (multiquant.utils.to_uint8(x, MODEL_RANGE))
