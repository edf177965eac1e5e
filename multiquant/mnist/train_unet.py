"""Train the embedded MNIST U-Net DDPM (plain PyTorch module, class-conditional, epsilon prediction).

    python -m multiquant.mnist.train_unet --device cuda --steps 30000 --time-budget-s 170 --eval-grid 50:large,50:small

DDPM training (linear betas, epsilon-prediction MSE at uniformly drawn timesteps) on the 7,000 ``train``
digits of the split every MNIST figure uses (``multiquant/mnist/data.py``). The EMA weights are saved in fp16
as ``model.safetensors`` together with ``training.json`` and the model card. ``--eval-grid`` scores the
saved weights with the family's own sampler on the 1,000-image plan for several (steps, variance) choices;
``--uniform`` adds uniform quantization configurations, ``--grid`` writes ``samples.png`` and ``quality.json``.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch.nn import functional as F

from ..errors import UserError
from ..utils import atomic_path
from . import cards
from .training import device_label, fit, parse_training_args, training_parser
from .unet import NOISE_SCHEDULE, DDPMSampler, MNISTUNet, alphas_cumprod

# the shipped pre-scored dataset and uniform baselines (scored with `qua2sedimo eval-random / eval-configs`)
SCORED_DIR = Path(__file__).resolve().parents[2] / "quant_caches" / "mnist_unet"
DEFAULT_UNIFORM = ("mse-4", "kmeans-4", "kmeans_all-4", "mse-3", "kmeans-3", "kmeans_all-3")


def diffusion_loss(model, x0: torch.Tensor, labels: torch.Tensor, ab: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Epsilon-prediction MSE at uniformly drawn training timesteps (``ab``: alphas_cumprod, float32)."""
    n, device = x0.shape[0], x0.device
    t = torch.randint(0, len(ab), (n,), generator=gen, device=device)
    noise = torch.randn(x0.shape, generator=gen, device=device)
    a = ab[t].sqrt().view(-1, 1, 1, 1)
    s = (1 - ab[t]).sqrt().view(-1, 1, 1, 1)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        pred = model(a * x0 + s * noise, t.float(), labels)
    return F.mse_loss(pred.float(), noise)


def build_model(size: str) -> MNISTUNet:
    from ..families.mnist_unet import build_unet

    return build_unet(size)


def train(args, log=print) -> tuple[MNISTUNet, dict]:
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    model = build_model(args.size).to(device)
    ab = alphas_cumprod(**NOISE_SCHEDULE).float().to(device)

    def loss(model, x0, labels, gen):
        return diffusion_loss(model, x0, labels, ab, gen)

    ema, info = fit(model.train(), loss, args, device, log)
    info.update(noise_schedule=NOISE_SCHEDULE,
                precision="bf16 autocast, fp32 master weights" if device.type == "cuda" else "fp32")
    return ema, info


# --- weights ----------------------------------------------------------------------------------------
def save_weights(model: MNISTUNet, path: str | Path) -> Path:
    """fp16 ``.safetensors`` state dict; the architecture config rides along in the metadata."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to(torch.float16).cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", "config": json.dumps(model.config)})
    return path


def load_weights(model: MNISTUNet, path: str | Path) -> MNISTUNet:
    state = load_file(str(path))
    model.load_state_dict({k: v.to(model.state_dict()[k].dtype) for k, v in state.items()})
    return model


# --- quality right after training -------------------------------------------------------------------
def score_sampler(model, sampler: DDPMSampler, num_images: int, classifier, ref_stats) -> dict:
    from .quality import evaluation_plan, score_digits

    labels, seeds = evaluation_plan(num_images)
    t0 = time.perf_counter()
    images = sampler(model, labels, seeds)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    speed = num_images / (time.perf_counter() - t0)
    return dict(score_digits(images, labels, classifier, ref_stats), steps=sampler.steps,
                variance=sampler.variance, images_per_s=round(speed, 1))


def uniform_results(model, family, sampler, options, num_images, classifier, ref_stats, mq_path=None,
                    log=print) -> dict:
    """Every layer at one option (through the multiquantizer ``mq_path``, built if missing); FP weights are
    restored afterwards."""
    from ..checkpoint import MultiQuantizer
    from ..config import config_record, quantize_, uniform_config
    from ..options import FP_OPTION, Option

    if mq_path and Path(mq_path).is_file():
        mq = MultiQuantizer.from_pretrained(mq_path, device=next(model.parameters()).device)
        mq.check_compatible(model, family)
    else:
        mq = MultiQuantizer.build(model, family, show_progress=False)
    results = {}
    for option in options:
        config = uniform_config(mq.layers, option)
        quantize_(model, config, mq)
        record = config_record(config, mq.table, mq.fp_prec, mq.fp_bytes)
        r = score_sampler(model, sampler, num_images, classifier, ref_stats)
        results[option] = dict(r, avg_bits=record["avg_bits"], method_name=Option.parse(option).spec.label)
        log(f"uniform {option}: FID {r['fid']:.3f}  accuracy {r['accuracy']:.3f}  ({record['avg_bits']:.2f} bits)")
    quantize_(model, uniform_config(mq.layers, FP_OPTION), mq)
    return results, mq


def sample_grid(model, sampler, path, rows_per_seed: int = 4, mq=None, options=()) -> Path:
    """PNG: ``rows_per_seed`` rows of digits 0..9 (plan images 0..39) of the FP16 weights, then one row per
    uniform option (plan images 0..9)."""
    from ..reporting import save_image_grid
    from .quality import evaluation_plan

    labels, seeds = evaluation_plan(10 * rows_per_seed)
    digits = [sampler(model, labels, seeds)]
    if mq is not None:
        from ..config import quantize_, uniform_config
        from ..options import FP_OPTION

        for option in options:
            quantize_(model, uniform_config(mq.layers, option), mq)
            digits.append(sampler(model, labels[:10], seeds[:10]))
        quantize_(model, uniform_config(mq.layers, FP_OPTION), mq)
    return save_image_grid(torch.cat(digits)[:, :1], path, nrow=10, scale=3, pad=0)


def quality_after_training(weights: Path, args, info: dict, log=print) -> dict:
    from ..families import get_family
    from .classifier import REF_STATS_FILE, load_classifier, load_reference_stats
    from .report import real_floor

    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    family = get_family("mnist_unet")
    model = load_weights(build_model(args.size), weights).to(device=device, dtype=dtype).eval()
    clf = load_classifier(args.classifier, device=device)
    ref = load_reference_stats(Path(args.classifier) / REF_STATS_FILE if args.classifier else None)
    grid = [(int(s), v) for s, v in (item.split(":") for item in args.eval_grid.split(",") if item)]
    quick = []
    for steps, variance in grid:
        r = score_sampler(model, DDPMSampler(steps, variance), args.eval_images, clf, ref)
        log(f"steps {steps} variance {variance}: FID {r['fid']:.3f}  accuracy {r['accuracy']:.3f}  "
            f"{r['images_per_s']} images/s")
        quick.append(dict(r, dtype=str(dtype).replace("torch.", ""), device=str(device)))
    if quick:
        info["quick_quality"] = quick
    from ..families.mnist_unet import SAMPLER

    sampler = DDPMSampler(SAMPLER.steps, SAMPLER.variance)
    fp = score_sampler(model, sampler, args.eval_images, clf, ref)
    floor = real_floor(clf, ref, args.mnist_dir)
    quality = {"protocol": dict(num_images=args.eval_images, seed=0, plan="image i: class i % 10, seed i",
                                dtype=str(dtype).replace("torch.", ""), **sampler.describe(),
                                reference=f"{ref['n']} held-out digits ({ref['split']} split)"),
               "device": info["device"] if device.type == "cuda" else device_label(device),
               "torch": torch.__version__, "fp": fp, "fid_floor": floor["fid"], "floor_accuracy": floor["accuracy"],
               "fid_reference_subset": floor.get("fid_reference_subset")}
    options = DEFAULT_UNIFORM if args.uniform == "all" else [o for o in args.uniform.split(",") if o]
    mq = None
    if options:
        quality["uniform"], mq = uniform_results(model, family, sampler, options, args.eval_images, clf, ref,
                                                   args.mq, log)
    if args.grid:
        quality["grid_rows"] = ["fp16 (4 rows, plan images 0-39)", *options]
        sample_grid(model, sampler, Path(args.outdir) / "samples.png", mq=mq, options=options)
    return quality


def main(argv=None) -> dict:
    from ..families.mnist_unet import ASSET_DIR

    p = training_parser(__doc__, ASSET_DIR, steps=30_000, batch_size=256, lr=5e-4,
                        eval_grid_help="sampler choices scored after training, e.g. '50:large,100:small'",
                        classifier_help="classifier dir for the scores (default: the shipped one)")
    p.add_argument("--uniform", default="", help=f"uniform options to score, or 'all' for {','.join(DEFAULT_UNIFORM)}")
    p.add_argument("--grid", action="store_true", help="write samples.png and quality.json")
    p.add_argument("--mq", default=None, help="multiquantizer file for --uniform (default: build one in memory)")
    p.add_argument("--report-only", action="store_true",
                   help="no training: score the weights already in --outdir (with --eval-grid/--uniform/--grid)")
    args = parse_training_args(p, argv)

    outdir = Path(args.outdir)
    weights = outdir / "model.safetensors"
    if args.report_only:
        info = cards.read_json(outdir / "training.json")
        if info is None or not weights.is_file():
            raise UserError(f"--report-only needs model.safetensors and training.json in {outdir}: train first "
                            f"(without --report-only) or point --outdir at the shipped assets")
    else:
        ema, info = train(args)
        save_weights(ema, weights)
    quality = None
    if args.eval_grid or args.uniform or args.grid:
        quality = quality_after_training(weights, args, info)
        cards.write_json(outdir / "quality.json", quality)
    cards.write_json(outdir / "training.json", info)
    scored = cards.scored_summary(SCORED_DIR) if outdir.resolve() == ASSET_DIR.resolve() else None
    cards.write_text(outdir / "README.md", cards.unet_card(info, quality or cards.read_json(outdir / "quality.json"),
                                                           scored))
    return info


if __name__ == "__main__":
    main()
