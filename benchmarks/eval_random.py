"""Benchmark configuration scoring against the denoiser floor and the reference loop, side by side.

    python benchmarks/eval_random.py                       # one GPU: floor, ours, reference loop
    torchrun --nproc-per-node 2 benchmarks/eval_random.py --scaling_only --num_images 512

Full-size PixArt-alpha architecture with random fp16 weights, 512x512, 20 DPM-Solver steps, CFG 4.5,
random prompt embeddings (120 tokens) and a random-weight Inception (labelled: timing only).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import environment, sync, write_result  # noqa: E402
from multiquant import distributed as dist  # noqa: E402
from multiquant.config import ConfigApplier, sample_random_config, uniform_config  # noqa: E402
from multiquant.families import get_family  # noqa: E402
from multiquant.layers import quantizable_layers  # noqa: E402
from multiquant.metrics.features import RandomInceptionFeatures  # noqa: E402
from multiquant.metrics.fid import feature_stats, frechet_distance  # noqa: E402
from multiquant.adapters.diffusers.embeddings import random_prompt_embeds  # noqa: E402
from multiquant.adapters.diffusers.loading import PipelineParts  # noqa: E402
from multiquant.adapters.diffusers.sampling import make_sampler  # noqa: E402

RES, STEPS, GUIDANCE, TOKENS = 512, 20, 4.5, 120


def full_size_pipeline(device, smoke: bool = False):
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler

    family = get_family("pixart_alpha")
    if smoke:  # CPU check of the script itself: tiny pipeline, tiny images
        from multiquant.adapters.diffusers.loading import tiny_pipeline

        return family, tiny_pipeline(family).to(device)
    transformer = family.build("full", device=device, dtype=torch.float16)
    with torch.device(device):
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            sample_size=RES).to(torch.float16).eval()
    return family, PipelineParts("PixArtAlphaPipeline", transformer=transformer, vae=vae,
                                 scheduler=DPMSolverMultistepScheduler())


@torch.no_grad()
def floor_seconds(pipe, embeds, num_images: int, batch: int, device) -> float:
    """Bare batched denoiser calls for the same images: STEPS x (2*batch) forwards per batch, nothing else."""
    tr = pipe.transformer
    dtype = next(tr.parameters()).dtype
    cond = embeds["prompt_embeds"][:batch].to(device, dtype)
    unc = embeds["negative_prompt_embeds"].to(device, dtype).expand(batch, -1, -1)
    text = torch.cat([unc, cond])
    x = torch.randn(2 * batch, 4, RES // 8, RES // 8, device=device, dtype=dtype)
    t = torch.full((2 * batch,), 500.0, device=device, dtype=dtype)
    tr(hidden_states=x, encoder_hidden_states=text, timestep=t, added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    sync()
    start = time.perf_counter()
    for _ in range(0, num_images, batch):
        for _ in range(STEPS):
            tr(hidden_states=x, encoder_hidden_states=text, timestep=t,
               added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    sync()
    return time.perf_counter() - start


def ours_seconds(config, sampler, feats_net, ref, indices, applier) -> dict:
    """One configuration through our path: swap weights, batched sampling, in-memory features, FID."""
    sync()
    t0 = time.perf_counter()
    applier.apply(config)
    sync()
    t1 = time.perf_counter()
    images = sampler.generate(indices)
    sync()
    t2 = time.perf_counter()
    local = torch.from_numpy(np.asarray(feats_net(images), dtype=np.float64))
    feats = dist.gather_features(local).numpy()
    mu, sigma = feature_stats(feats)
    frechet_distance(mu, sigma, ref[0], ref[1], method="eigh")
    sync()
    t3 = time.perf_counter()
    return {"apply_s": t1 - t0, "generate_s": t2 - t1, "features_fid_s": t3 - t2, "total_s": t3 - t0}


def _write_png(img: torch.Tensor, path: Path) -> None:
    from PIL import Image

    Image.fromarray(img.permute(1, 2, 0).numpy()).save(path)


def _read_pngs(paths) -> torch.Tensor:
    """Read PNGs back as a uint8 [N, 3, H, W] batch, as the reference's folder-based FID does."""
    from PIL import Image

    return torch.stack([torch.from_numpy(np.array(Image.open(p))).permute(2, 0, 1) for p in paths])


def reference_loop_seconds(pipe, embeds, feats_net, device, n_images: int, n_ref_feats: int) -> dict:
    """The reference loop on a few images: batch 1, PNG written then re-read, reference set re-encoded."""
    sampler = make_sampler("pixart_alpha", pipe, num_images=n_images, conditions=list(range(n_images)),
                           prompt_embeds={k: v[:n_images] if not k.startswith("negative") else v for k, v in embeds.items()},
                           batch_size=1, resolution=RES, steps=STEPS, guidance=GUIDANCE)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sync()
        t0 = time.perf_counter()
        for i in range(n_images):
            _write_png(sampler.generate([i])[0], tmp / f"{i}.png")
        sync()
        t1 = time.perf_counter()
        feats_net(_read_pngs([tmp / f"{i}.png" for i in range(n_images)]))
        sync()
        t2 = time.perf_counter()
        # the reference re-encodes its 5,000-image reference folder for every configuration
        ref_imgs = torch.randint(0, 256, (n_ref_feats, 3, RES, RES), dtype=torch.uint8)
        for i, img in enumerate(ref_imgs):
            _write_png(img, tmp / f"ref{i}.png")
        t3 = time.perf_counter()
        feats_net(_read_pngs([tmp / f"ref{i}.png" for i in range(n_ref_feats)]))
        sync()
        t4 = time.perf_counter()
    per_image_gen = (t1 - t0) / n_images
    per_image_feat = (t2 - t1) / n_images
    per_ref_feat = (t4 - t3) / n_ref_feats
    return {"per_image_generate_png_s": per_image_gen, "per_image_reread_features_s": per_image_feat,
            "per_reference_image_features_s": per_ref_feat, "measured_images": n_images,
            "measured_reference_images": n_ref_feats}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--num_images", type=int, default=1000)
    ap.add_argument("--batch_size", type=int, default=16)
    ap.add_argument("--ref_images", type=int, default=16, help="images timed for the reference loop")
    ap.add_argument("--reference_set", type=int, default=5000, help="reference images re-encoded per config")
    ap.add_argument("--scaling_only", action="store_true", help="time our path only (for torchrun runs)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--smoke", action="store_true", help="tiny pipeline on the CPU: checks the script only")
    args = ap.parse_args(argv)
    global RES, STEPS, TOKENS
    if args.smoke:
        RES, STEPS, TOKENS = 64, 2, 8
    info = dist.init_from_env()
    device = info.device  # this rank's GPU (already made current), else the CPU
    family, pipe = full_size_pipeline(device, args.smoke)
    layers = quantizable_layers(pipe.transformer, family)
    embeds = random_prompt_embeds(family, pipe, args.num_images, seed=0, seq_len=TOKENS)
    from multiquant.checkpoint import MultiQuantizer

    # scaling runs time the scoring path only: a one-option checkpoint keeps their set-up short
    light = dict(methods=("mse",), bits=(4,)) if args.scaling_only else {}
    mq = MultiQuantizer.build(pipe.transformer, family, show_progress=False, **light)
    applier = ConfigApplier(pipe.transformer, mq)
    sampler = make_sampler(family, pipe, num_images=args.num_images, conditions=list(range(args.num_images)),
                           prompt_embeds=embeds, batch_size=args.batch_size, resolution=RES, steps=STEPS,
                           guidance=GUIDANCE)
    feats_net = RandomInceptionFeatures(device=device, batch_size=100)
    ref = feature_stats(np.random.default_rng(0).standard_normal((4096, 2048)))
    indices = dist.shard(list(range(args.num_images)), dist.rank(), dist.world_size())
    # warm-up on a couple of images (kernels, allocator)
    sampler.generate(indices[:2])
    dist.barrier()
    t_start = time.perf_counter()
    config = uniform_config(layers, "mse-4") if args.scaling_only else sample_random_config(layers, seed=0, index=1)
    ours = ours_seconds(config, sampler, feats_net, ref, indices, applier)
    result = {**environment(), "model": "pixart_alpha (full-size architecture, random fp16 weights)",
              "resolution": RES, "steps": STEPS, "guidance": GUIDANCE, "images_per_config": args.num_images,
              "batch_size": args.batch_size, "feature_net": feats_net.name + " (random weights: timing only)",
              "world_size": dist.world_size(), "ours": ours, "configs_per_hour": 3600 / ours["total_s"]}
    if not args.scaling_only:
        floor = floor_seconds(pipe, embeds, args.num_images, args.batch_size, device)
        ref_loop = reference_loop_seconds(pipe, embeds, feats_net, device, args.ref_images, args.ref_images * 4)
        ref_cfg_s = (args.num_images * (ref_loop["per_image_generate_png_s"] + ref_loop["per_image_reread_features_s"])
                     + args.reference_set * ref_loop["per_reference_image_features_s"])
        result.update(floor_seconds_per_config=floor, floor_configs_per_hour=3600 / floor,
                      reference_loop=ref_loop, reference_loop_seconds_per_config=ref_cfg_s,
                      reference_loop_configs_per_hour=3600 / ref_cfg_s, speedup=ref_cfg_s / ours["total_s"],
                      floor_fraction=floor / ours["total_s"],
                      targets={"floor_fraction": ">= 0.8", "two_gpu_scaling": ">= 1.8"})
    if args.scaling_only:
        dist.barrier()  # every rank's shard is done: the slowest rank sets the time
        result["ours"]["total_s_all_ranks"] = time.perf_counter() - t_start
    if dist.is_main():
        name = "eval_random" if not args.scaling_only else f"eval_random_scaling_{dist.world_size()}gpu"
        write_result(name, result, args.out)
    dist.cleanup()


if __name__ == "__main__":
    main()
