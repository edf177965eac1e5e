"""Train the embedded MNIST DiT (pixel space, class-conditional, classifier-free guidance).

    python -m multiquant.mnist.train_dit --device cuda --steps 40000 --time-budget-s 420

DDPM training with cosine betas and v-prediction on the 7,000 ``train`` digits; labels are dropped to the
null class with probability ``--p-uncond`` (once per sample, for all blocks alike). As in the original
DiT, all blocks share one timestep/label embedder during training (diffusers stores per-block copies:
they are written out as identical copies, which the family's DIT_TIES rule ties). The EMA weights are
saved in fp16 with ``save_pretrained`` together with the sampler's ``scheduler_config.json``,
``training.json`` and the model card.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler
from diffusers.models.embeddings import LabelEmbedding
from torch.nn import functional as F

from ..families import get_family
from ..families.mnist_dit import ASSET_DIR, NOISE_SCHEDULE, SAMPLER_KWARGS
from . import cards
from .training import fit, parse_training_args, training_parser


# --- model surgery ---------------------------------------------------------------------------------
def init_dit_weights(model: torch.nn.Module) -> torch.nn.Module:
    """adaLN-Zero init (DiT): modulation and output layers start at zero, so every block starts as identity."""
    for block in model.transformer_blocks:
        torch.nn.init.zeros_(block.norm1.linear.weight)
        torch.nn.init.zeros_(block.norm1.linear.bias)
    for layer in (model.proj_out_1, model.proj_out_2):
        torch.nn.init.zeros_(layer.weight)
        torch.nn.init.zeros_(layer.bias)
    return model


def tie_block_embedders(model: torch.nn.Module) -> torch.nn.Module:
    """Make every block use block 0's timestep/label embedder (one shared module, as in the original DiT)."""
    shared = model.transformer_blocks[0].norm1.emb
    for block in model.transformer_blocks[1:]:
        block.norm1.emb = shared
    return model


def untie_block_embedders(model: torch.nn.Module) -> torch.nn.Module:
    """Give every block its own (identical) copy again, the layout diffusers saves and loads."""
    shared = model.transformer_blocks[0].norm1.emb
    for block in model.transformer_blocks[1:]:
        block.norm1.emb = copy.deepcopy(shared)
    return model


def disable_builtin_label_dropout(model: torch.nn.Module) -> None:
    """diffusers' LabelEmbedding drops labels on its own in train mode, independently in every call (block);
    we drop them once per sample instead (see :func:`diffusion_loss`)."""
    for module in model.modules():
        if isinstance(module, LabelEmbedding):
            module.dropout_prob = 0.0


# --- training objective -----------------------------------------------------------------------------
def diffusion_loss(model, x0: torch.Tensor, labels: torch.Tensor, alphas_cumprod: torch.Tensor,
                   gen: torch.Generator, p_uncond: float, null_class: int) -> torch.Tensor:
    """v-prediction MSE at uniformly drawn timesteps, labels dropped to ``null_class`` with ``p_uncond``."""
    n, device = x0.shape[0], x0.device
    t = torch.randint(0, len(alphas_cumprod), (n,), generator=gen, device=device)
    noise = torch.randn(x0.shape, generator=gen, device=device)
    drop = torch.rand(n, generator=gen, device=device) < p_uncond
    labels = torch.where(drop, torch.full_like(labels, null_class), labels)
    a = alphas_cumprod[t].sqrt().view(-1, 1, 1, 1)
    s = (1 - alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
    x_t = a * x0 + s * noise
    v = a * noise - s * x0
    pred = model(x_t, timestep=t, class_labels=labels, return_dict=False)[0]
    return F.mse_loss(pred.float(), v)


def train(args, log=print) -> tuple[torch.nn.Module, dict]:
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    model = get_family("mnist_dit").build(args.size, device=device, seed=args.seed)
    init_dit_weights(model)
    tie_block_embedders(model)
    disable_builtin_label_dropout(model)
    alphas_cumprod = DDPMScheduler(**NOISE_SCHEDULE).alphas_cumprod.to(device)
    null_class = model.config.num_embeds_ada_norm

    def loss(model, x0, labels, gen):
        return diffusion_loss(model, x0, labels, alphas_cumprod, gen, args.p_uncond, null_class)

    ema, info = fit(model.train(), loss, args, device, log)
    info.update(p_uncond=args.p_uncond, noise_schedule=NOISE_SCHEDULE)
    return ema, info


def save_denoiser(ema: torch.nn.Module, outdir: Path) -> None:
    # plain nn.Module.to: diffusers' override only adds a warning about fp32-kept modules (DiT has none)
    model = torch.nn.Module.to(untie_block_embedders(copy.deepcopy(ema)), torch.float16)
    model.save_pretrained(str(outdir), safe_serialization=True)
    DPMSolverMultistepScheduler(**SAMPLER_KWARGS).save_pretrained(str(outdir))


def quick_quality(outdir: Path, device: str, grid: list[tuple[int, float]], num_images: int,
                  classifier_dir: str | None = None) -> list[dict]:
    """Score the saved weights on the evaluation plan for each (steps, guidance) in ``grid``."""
    from .pipeline import MNISTDiTPipeline
    from .classifier import REF_STATS_FILE, load_classifier, load_reference_stats
    from .quality import evaluate_pipeline

    pipe = MNISTDiTPipeline.from_family(outdir, device=device)
    clf = load_classifier(classifier_dir, device=device)
    ref = load_reference_stats(Path(classifier_dir) / REF_STATS_FILE if classifier_dir else None)
    results = []
    for steps, guidance in grid:
        r = evaluate_pipeline(pipe, num_images, steps, guidance, batch_size=num_images, classifier=clf, ref_stats=ref)
        print(f"steps {steps} guidance {guidance}: FID {r['fid']:.3f}  accuracy {r['accuracy']:.3f}")
        results.append(dict(r, dtype=str(pipe.transformer.dtype), device=str(device)))
    return results


def main(argv=None) -> dict:
    p = training_parser(__doc__, ASSET_DIR, steps=40_000, batch_size=512, lr=4e-4,
                        eval_grid_help="quality after training, e.g. '20:1.0,20:1.5,10:1.5' (steps:guidance)",
                        classifier_help="classifier dir for --eval-grid (default: the shipped one)")
    p.add_argument("--p-uncond", type=float, default=0.1)
    args = parse_training_args(p, argv)

    ema, info = train(args)
    outdir = Path(args.outdir)
    save_denoiser(ema, outdir)
    if args.eval_grid:
        grid = [(int(s), float(g)) for s, g in (item.split(":") for item in args.eval_grid.split(","))]
        info["quick_quality"] = quick_quality(outdir, args.device, grid, args.eval_images, args.classifier)
    cards.write_json(outdir / "training.json", info)
    cards.write_text(outdir / "README.md", cards.dit_card(info, cards.read_json(outdir / "quality.json")))
    return info


if __name__ == "__main__":
    main()
