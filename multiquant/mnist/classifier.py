"""LeNet-style MNIST classifier: the "MNIST-FID" feature network and the digit-accuracy judge.

``features(x)`` is the penultimate layer (the hidden fully connected layer, taken *before* its ReLU so
that no unit is identically zero and the feature covariance stays full rank); ``logits(x)`` classifies.
Inputs are uint8 images (``[N, 28, 28]`` or ``[N, 1, 28, 28]``) or float images in [-1, 1].

Shipped as ``multiquant/assets/mnist_classifier/`` (``config.json`` + ``model.safetensors``), with
``ref_stats.npz``: the feature mean/covariance of the held-out ``reference`` digits.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

from ..utils import atomic_path, write_text_atomic

ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"
CLASSIFIER_DIR = ASSETS_DIR / "mnist_classifier"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
REF_STATS_FILE = "ref_stats.npz"


class MNISTClassifier(nn.Module):
    """conv5x5 -> pool -> conv5x5 -> pool -> fc(hidden) [features] -> ReLU -> dropout -> fc(10)."""

    def __init__(self, channels: tuple[int, int] = (32, 64), hidden: int = 128, num_classes: int = 10,
                 dropout: float = 0.3):
        super().__init__()
        c1, c2 = channels
        self.config = dict(channels=[c1, c2], hidden=hidden, num_classes=num_classes, dropout=dropout)
        self.conv1 = nn.Conv2d(1, c1, 5, padding=2)
        self.conv2 = nn.Conv2d(c1, c2, 5, padding=2)
        self.fc1 = nn.Linear(c2 * 7 * 7, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)
        self.dropout = nn.Dropout(dropout)

    @staticmethod
    def prepare(x: torch.Tensor) -> torch.Tensor:
        """uint8 [0, 255] or float [-1, 1] images -> float [N, 1, 28, 28] in [-1, 1]."""
        if x.dim() == 3:
            x = x[:, None]
        if x.dtype == torch.uint8:
            return x.float() / 127.5 - 1.0
        return x.float()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prepare(x).to(self.fc1.weight.device)
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc1(x.flatten(1))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.dropout(F.relu(self.features(x))))

    forward = logits


# --- I/O ------------------------------------------------------------------------------------------
def save_classifier(model: MNISTClassifier, path: str | Path) -> Path:
    """Write ``config.json`` and ``model.safetensors`` (fp32) into ``path``."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(folder / WEIGHTS_FILE, "classifier weights") as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    write_text_atomic(folder / CONFIG_FILE, json.dumps(model.config, indent=2) + "\n")
    return folder


def load_classifier(path: str | Path | None = None, device: str | torch.device = "cpu") -> MNISTClassifier:
    """The trained classifier (shipped one by default), in eval mode."""
    folder = Path(path) if path is not None else CLASSIFIER_DIR
    if not (folder / CONFIG_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(
            f"no MNIST classifier in {folder} (needs {CONFIG_FILE} and {WEIGHTS_FILE}). Fix: train one with "
            f"`python -m multiquant.mnist.train_classifier --outdir {folder}`.")
    cfg = json.loads((folder / CONFIG_FILE).read_text())
    model = MNISTClassifier(channels=tuple(cfg["channels"]), hidden=cfg["hidden"], num_classes=cfg["num_classes"],
                            dropout=cfg.get("dropout", 0.0))
    model.load_state_dict(load_file(str(folder / WEIGHTS_FILE)))
    return model.to(device).eval()


@torch.no_grad()
def classifier_outputs(model: MNISTClassifier, images, batch_size: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """Features (float64 ``[N, hidden]``) and predicted digits (``[N]``) of uint8 or [-1, 1] images."""
    images = torch.as_tensor(images)
    feats, preds = [], []
    for start in range(0, len(images), batch_size):
        f = model.features(images[start:start + batch_size])
        feats.append(f.double().cpu())
        preds.append(model.fc2(F.relu(f)).argmax(1).cpu())
    return torch.cat(feats).numpy(), torch.cat(preds).numpy()


# --- reference statistics -------------------------------------------------------------------------
def save_reference_stats(path: str | Path, mu: np.ndarray, sigma: np.ndarray, indices: np.ndarray,
                         split: str) -> Path:
    """``ref_stats.npz``: feature mean/covariance (float64), N, and which test-set digits they come from."""
    path = Path(path)
    with atomic_path(path, "reference statistics") as tmp, open(tmp, "wb") as f:  # a file: savez adds no suffix
        np.savez(f, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64), n=np.int64(len(indices)),
                 indices=np.asarray(indices, np.int64), split=np.str_(split),
                 source=np.str_("MNIST t10k test set, official idx files"))
    return path


def load_reference_stats(path: str | Path | None = None) -> dict:
    """The shipped MNIST-FID reference statistics: ``{"mu", "sigma", "n", "indices", "split"}``."""
    path = Path(path) if path is not None else CLASSIFIER_DIR / REF_STATS_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"no MNIST reference statistics at {path}. Fix: `python -m multiquant.mnist.train_classifier` writes "
            f"them (it needs the MNIST test set, see QUA2SEDIMO_MNIST).")
    with np.load(path) as f:
        return {"mu": f["mu"], "sigma": f["sigma"], "n": int(f["n"]), "indices": f["indices"], "split": str(f["split"])}


# --- MNIST-FID as a family metric -------------------------------------------------------------------
class MNISTLeNetFeatures:
    """The shipped classifier's penultimate features as a feature network (``name`` ``mnist-lenet``),
    loaded on first use on the device given by :meth:`to`."""

    name = "mnist-lenet"

    def __init__(self, device: str | torch.device = "cpu", batch_size: int = 1000):
        self.device, self.batch_size, self._model = torch.device(device), batch_size, None

    def to(self, device) -> "MNISTLeNetFeatures":
        self.device = torch.device(device)
        if self._model is not None:
            self._model.to(self.device)
        return self

    @torch.inference_mode()
    def __call__(self, images) -> np.ndarray:
        if self._model is None:
            self._model = load_classifier(device=self.device)
        images = torch.as_tensor(images)[:, :1]  # 3-channel copies are the same digit
        chunks = [self._model.features(images[i:i + self.batch_size].to(self.device)).double().cpu()
                  for i in range(0, len(images), self.batch_size)]
        return torch.cat(chunks).numpy()


def mnist_reference() -> dict:
    """The shipped held-out statistics with their reference id (``mnist-heldout-<n>``)."""
    stats = load_reference_stats()
    return {"mu": stats["mu"], "sigma": stats["sigma"], "id": f"mnist-heldout-{stats['n']}"}


def mnist_fid():
    """MNIST-FID: the classifier's features against the shipped held-out digits."""
    from ..metrics.metric import FeatureFID

    return FeatureFID(MNISTLeNetFeatures(), reference_stats=mnist_reference, name="MNIST-FID")
