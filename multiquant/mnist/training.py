"""What the two MNIST denoiser training scripts (``train_dit``, ``train_unet``) share: their command-line flags,
the EMA training loop (AdamW, linear warm-up, gradient clipping, loss log) and the fields of ``training.json``."""
from __future__ import annotations

import argparse
import copy
import platform
import time
from typing import Callable

import torch

from ..utils import default_device
from .data import load_split, to_model_range

TRAIN_DATA = "MNIST t10k test set, train split (i % 10 in 0..6): 7,000 digits"

# loss(model, clean digits in [-1, 1], labels, generator) -> scalar loss
LossFn = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, torch.Generator], torch.Tensor]


def training_parser(doc: str, outdir, steps: int, batch_size: int, lr: float, eval_grid_help: str,
                    classifier_help: str) -> argparse.ArgumentParser:
    """The flags both scripts take, with each script's defaults; the script adds its own after these."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mnist-dir", default=None, help="folder of the MNIST t10k idx files (default: QUA2SEDIMO_MNIST)")
    p.add_argument("--outdir", default=str(outdir))
    p.add_argument("--size", default="full", choices=["full", "tiny"])
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--time-budget-s", type=float, default=0, help="stop early after this many seconds (0: none)")
    p.add_argument("--batch-size", type=int, default=batch_size)
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--warmup", type=int, default=500)
    p.add_argument("--ema", type=float, default=0.9995)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cuda / cpu (default: cuda if available)")
    p.add_argument("--log-every", type=int, default=500)
    p.add_argument("--eval-grid", default="", help=eval_grid_help)
    p.add_argument("--eval-images", type=int, default=1000)
    p.add_argument("--classifier", default=None, help=classifier_help)
    return p


def parse_training_args(p: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    args = p.parse_args(argv)
    args.device = str(default_device(args.device))
    return args


def device_label(device: torch.device) -> str:
    """The GPU's name, else ``cpu (<machine>)``: what ``training.json`` and ``quality.json`` record."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.machine()})"


@torch.no_grad()
def ema_update(ema_params: list[torch.Tensor], params: list[torch.Tensor], decay: float) -> None:
    torch._foreach_lerp_(ema_params, params, 1.0 - decay)


def fit(model: torch.nn.Module, loss_fn: LossFn, args, device: torch.device, log=print) -> tuple[torch.nn.Module, dict]:
    """Train ``model`` (on ``device``, in train mode) on the train split for ``args.steps`` steps (or until
    ``args.time_budget_s``); returns the EMA copy and the shared ``training.json`` fields."""
    images, labels = load_split("train", args.mnist_dir)
    x_all = to_model_range(images).to(device)
    y_all = torch.from_numpy(labels).to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    params, ema_params = list(model.parameters()), list(ema.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0, betas=(0.9, 0.99),
                            **({"fused": True} if device.type == "cuda" else {}))
    gen = torch.Generator(device=device).manual_seed(args.seed)

    history, window, t0, step = [], [], time.time(), 0
    while step < args.steps:
        if args.time_budget_s and time.time() - t0 > args.time_budget_s:
            log(f"time budget of {args.time_budget_s}s reached at step {step}")
            break
        for group in opt.param_groups:  # linear warm-up, then constant (EMA does the averaging)
            group["lr"] = args.lr * min(1.0, (step + 1) / args.warmup)
        idx = torch.randint(0, len(x_all), (args.batch_size,), generator=gen, device=device)
        loss = loss_fn(model, x_all[idx], y_all[idx], gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema_update(ema_params, params, min(args.ema, (1 + step) / (10 + step)))
        window.append(loss.detach())
        step += 1
        if step % args.log_every == 0 or step == args.steps:
            mean = torch.stack(window).mean().item()
            window = []
            history.append([step, round(mean, 5), round(time.time() - t0, 1)])
            log(f"step {step}  loss {mean:.4f}  {time.time() - t0:.0f}s")
    info = {
        "data": TRAIN_DATA, "size": args.size, "config": dict(model.config),
        "parameters": sum(p.numel() for p in params), "steps": step, "batch_size": args.batch_size, "lr": args.lr,
        "warmup": args.warmup, "ema": args.ema, "seed": args.seed, "time_budget_s": args.time_budget_s,
        "device": device_label(device), "torch": torch.__version__, "wall_time_s": round(time.time() - t0, 1),
        "loss_history": history,
    }
    return ema, info
