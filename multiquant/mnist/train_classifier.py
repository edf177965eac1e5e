"""Train the MNIST classifier (feature net of MNIST-FID) and write its reference statistics.

    python -m multiquant.mnist.train_classifier [--epochs 20] [--device cpu] [--outdir DIR]

Trains on the ``train`` split only (7,000 digits, light random affine augmentation), reports accuracy on
the 3,000 held-out digits, and writes ``config.json``, ``model.safetensors``, ``ref_stats.npz`` (features
of the 2,000 ``reference`` digits), ``training.json`` and the model card ``README.md`` into ``--outdir``.
"""
from __future__ import annotations

import argparse
import math
import platform
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from ..metrics.fid import feature_stats, frechet_distance
from . import cards
from .classifier import CLASSIFIER_DIR, REF_STATS_FILE, MNISTClassifier, classifier_outputs, save_classifier, save_reference_stats
from .data import load_mnist_test, split_indices, to_model_range


def random_affine(x: torch.Tensor, gen: torch.Generator, max_deg: float = 10.0, max_shift: float = 2.0,
                  scale: tuple[float, float] = (0.9, 1.1)) -> torch.Tensor:
    """Small random rotation / shift / zoom of ``[N, 1, 28, 28]`` images in [-1, 1] (background stays -1)."""
    n = x.shape[0]
    u = torch.rand(n, 4, generator=gen, device=gen.device).to(x.device)
    angle = (u[:, 0] * 2 - 1) * math.radians(max_deg)
    s = scale[0] + u[:, 1] * (scale[1] - scale[0])
    shift = (u[:, 2:] * 2 - 1) * (2 * max_shift / x.shape[-1])
    cos, sin = torch.cos(angle) / s, torch.sin(angle) / s
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x + 1, grid, align_corners=False, padding_mode="zeros") - 1


def train(images: torch.Tensor, labels: torch.Tensor, epochs: int, batch_size: int, lr: float, seed: int,
          device: str, log=print) -> MNISTClassifier:
    torch.manual_seed(seed)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    model = MNISTClassifier().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps_per_epoch = math.ceil(len(images) / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch)
    x_all, y_all = to_model_range(images).to(device), labels.to(device)
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(x_all), generator=gen).to(device)
        total = 0.0
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            x = random_affine(x_all[idx], gen)
            loss = F.cross_entropy(model.logits(x), y_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        log(f"epoch {epoch + 1}/{epochs}  loss {total / len(x_all):.4f}")
    return model.eval()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mnist-dir", default=None, help="folder of the MNIST t10k idx files (default: QUA2SEDIMO_MNIST)")
    p.add_argument("--outdir", default=str(CLASSIFIER_DIR))
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)

    images, labels = load_mnist_test(args.mnist_dir)
    split = {name: split_indices(name) for name in ("train", "reference", "eval", "heldout")}
    t0 = time.time()
    model = train(torch.from_numpy(images[split["train"]]), torch.from_numpy(labels[split["train"]]),
                  args.epochs, args.batch_size, args.lr, args.seed, args.device)
    wall = time.time() - t0

    feats, preds = classifier_outputs(model, torch.from_numpy(images))
    accuracy = {name: float(np.mean(preds[idx] == labels[idx])) for name, idx in split.items()}
    mu, sigma = feature_stats(feats[split["reference"]])
    floor_eval = frechet_distance(*feature_stats(feats[split["eval"]]), mu, sigma)
    floor_train = frechet_distance(*feature_stats(feats[split["train"][:1000]]), mu, sigma)

    outdir = Path(args.outdir)
    save_classifier(model.cpu(), outdir)
    save_reference_stats(outdir / REF_STATS_FILE, mu, sigma, split["reference"], "reference")
    info = {
        "data": "MNIST t10k test set (official idx files), split by index % 10",
        "train_digits": len(split["train"]), "reference_digits": len(split["reference"]),
        "eval_digits": len(split["eval"]),
        "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
        "augmentation": "random affine: rotation +-10 deg, shift +-2 px, zoom 0.9-1.1",
        "device": f"cuda ({torch.cuda.get_device_name(args.device)})" if str(args.device).startswith("cuda") else str(args.device),
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "wall_time_s": round(wall, 1),
        "accuracy": accuracy, "feature_dim": int(feats.shape[1]),
        "fid_floor_eval_1000": floor_eval, "fid_train_1000": floor_train,
    }
    cards.write_json(outdir / "training.json", info)
    cards.write_text(outdir / "README.md", cards.classifier_card(info))
    print(f"held-out accuracy {accuracy['heldout']:.4f}; FID floor (1,000 eval digits) {floor_eval:.3f}; "
          f"1,000 train digits {floor_train:.3f}; {wall:.0f}s")
    return info


if __name__ == "__main__":
    main()
