"""Benchmark configuration scoring on every built-in diffusers family: the bare denoiser floor, our scorer and
(PixArt-alpha) the reference loop, side by side in one run.

    python benchmarks/eval_random.py --deadline_s 480      # one GPU: all six families, cheapest first
    torchrun --nproc-per-node 2 benchmarks/eval_random.py --families pixart_alpha --scaling_only --num_images 512

Each family goes through its own adapter with its protocol (resolution, steps, guidance, scheduler, batch size,
text tokens from the FamilySpec): on CUDA the full-size denoiser with random weights in the family's precision and
a full-size random VAE; without CUDA the tiny architecture (a check of the script). Random prompt embeddings
(class ids for DiT), a random-weight Inception (timing only). SDXL's base model runs all 40 steps (no random
refiner). Per family, written after every family (a run stopped by its time limit keeps what it measured):

* ``floor_seconds_per_config``: bare batched denoiser calls (the adapter's own call) for the same images and
  timesteps, classifier-free guidance included; nothing else;
* ``seconds_per_config``: the scorer (multiquant.evaluate.Scorer) on a random configuration: weight swap,
  generation, features, FID; ``overhead_fraction`` = (ours - floor) / ours (the top-level ``overhead_fraction``
  is the headline family's overhead beside the sampling floor at the protocol, the issue's figure, and
  ``overhead_fraction_vs_denoiser`` this one);
* achieved denoiser TFLOP/s (multiquant.flops MACs x 2 x forwards / floor) and ``floor_peak_fraction`` against
  ``--peak_tflops``;
* the same figures at the protocol's image count (``*_at_protocol``: the weight swap, the Frechet distance and,
  when feature chunks overlapped generation, the feature pass's tail after the last batch (one chunk at most) are
  fixed costs, the rest scales with the images), which ``configs_per_hour`` is quoted at;
* where the overhead beside sampling goes: ``generate_s`` (rendering with the feature pass overlapped) against
  ``sampling_seconds_per_config`` (rendering alone), ``generate_overhead_s``, ``features_tail_s``,
  ``feature_chunks_overlapped``, ``metrics_s`` (statistics and distance after generation), ``fid_distance_s``;
* ``--profile`` (CUDA): one denoiser forward (compiled when ``--compile``) under torch.profiler: the shares of GPU
  time in GEMMs, attention and everything else, and the GEMMs' and attention's achieved TFLOP/s (``profile``);
* with ``--dtype`` / ``--channels_last`` / ``--compile`` (each for every family or per family, ``sdv15=float16``):
  the eager floor in the family's precision and layout first (``floor_seconds_per_config_eager``), then each option
  applied in turn through the scoring path (multiquant.evaluate.apply_generation_options: cast, channels-last,
  compile) with the floor after each (``floor_stages``, achieved TFLOP/s and peak fraction per stage); every other
  figure is measured with all of them applied.

    python benchmarks/eval_random.py --families sdxl,sdv15 --compile default --channels_last \
        --dtype sdv15=float16 --batch_size sdxl=16,sdv15=16 --num_images 32

Measure with more images than one feature chunk (``--num_images 96`` at the 32-image Inception chunk and batch 16):
with fewer, no chunk is handed over while generation runs and nothing of the overlap is measured.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import re
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import environment, full_size_vae, read_result, sync, timed, write_result  # noqa: E402
from multiquant import distributed as dist  # noqa: E402
from multiquant.adapters import adapter_for  # noqa: E402
from multiquant.adapters.diffusers.embeddings import random_prompt_embeds  # noqa: E402
from multiquant.adapters.diffusers.loop import timesteps_for  # noqa: E402
from multiquant.adapters.diffusers.sampling import make_sampler  # noqa: E402
from multiquant.checkpoint import MultiQuantizer  # noqa: E402
from multiquant.config import sample_random_config  # noqa: E402
from multiquant.commands import COMPILE_MODES  # noqa: E402
from multiquant.config import ConfigApplier  # noqa: E402
from multiquant.evaluate import Loaded, Scorer, apply_generation_options, feature_chunk  # noqa: E402
from multiquant.families import SCORING_DTYPES, get_family  # noqa: E402
from multiquant.flops import flops_table  # noqa: E402
from multiquant.metrics import FeatureFID  # noqa: E402
from multiquant.metrics.features import RandomInceptionFeatures  # noqa: E402
from multiquant.metrics.fid import feature_stats  # noqa: E402

# cheapest first, so that a run stopped by its time limit has measured as many families as it could
FAMILIES = "pixart_alpha,sdxl,sdv15,pixart_sigma,dit,hunyuan"
HEADLINE = "pixart_alpha"  # the family whose figures the top-level keys repeat (the targets)
H100_DENSE_FP16_TFLOPS = 989.4  # H100/H200 SXM dense fp16/bf16 tensor-core rate
# keys other runs merge into eval_random.json (benchmarks/proxy_mnist_dit.py, the 2-GPU scaling run): kept, unless
# this run writes the key itself (its headline fid_distance_s)
MERGED_ELSEWHERE = ("proxy_", "fid_", "two_gpu_")


def random_pipeline(spec, device, full: bool):
    """The family's tiny pipeline (its adapter's), on CUDA with the full-size random denoiser in the family's
    precision and a full-size random VAE (the 8x, 4-channel AutoencoderKL every family here decodes with)."""
    adapter = adapter_for(spec)
    pipe = adapter.tiny_pipeline(spec)
    if full:
        adapter.with_denoiser(pipe, spec.build("full", device=device, dtype=spec.dtype))
        pipe.vae = full_size_vae(device, spec.dtype, sample_size=spec.resolution)
        pipe.default_resolution = None  # the family's protocol resolution, not the tiny pipelines' 64 px
    return pipe.to(device)


def random_metric(device, dim: int = 2048) -> FeatureFID:
    """FID under random-weight Inception features against random reference statistics (timing only); the
    feature chunk is InceptionFeatures' (32 images), as a scoring run's."""
    return FeatureFID(RandomInceptionFeatures(device=device),
                      reference_stats=feature_stats(np.random.default_rng(0).standard_normal((2 * dim, dim))))


def build_scorer(spec, device, full: bool, num_images: int, batch_size: int | None, methods,
                 metric) -> tuple[Scorer, float]:
    """The scorer of one family: its sampler (random prompt embeddings of the family's text length) and a
    multiquantizer of ``methods`` at the default bit widths, on the device as a scoring run loads it; and the
    multiquantizer's build seconds."""
    adapter = adapter_for(spec)
    pipe = random_pipeline(spec, device, full)
    text = bool(adapter.prompt_fields)
    conditions = list(range(num_images)) if text else adapter.conditions(spec, num_images)  # text: embedding rows
    embeds = random_prompt_embeds(spec, pipe, num_images, seed=0, seq_len=spec.text_tokens or 8) if text else None
    sampler = make_sampler(spec, pipe, num_images=num_images, conditions=conditions, prompt_embeds=embeds,
                           batch_size=batch_size)
    denoiser = adapter.denoiser(pipe)
    mq, build_s = timed(MultiQuantizer.build, denoiser, spec, methods=methods, show_progress=False)
    return Scorer(spec, denoiser, sampler, metric, mq=mq.to(device), proxies=False), build_s


@torch.no_grad()
def floor_seconds(sampler, indices: list[int]) -> tuple[float, int]:
    """Bare batched denoiser calls for images ``indices``: the adapter's denoiser call on each batch's
    conditioning at every timestep of the schedule, CFG-doubled batches; no scheduler step, no VAE. Returns the
    seconds and the number of denoiser forwards (one image, one half of the guidance pair each)."""
    adapter, pipe, size = sampler.adapter, sampler.pipe, sampler.resolution
    cfg = sampler.guidance > 1.0
    device, dtype = sampler.denoiser_device(), sampler.denoiser_dtype()
    timesteps = timesteps_for(pipe.scheduler, sampler.steps, device)
    calls = []
    for start in range(0, len(indices), sampler.batch_size):
        batch = indices[start:start + sampler.batch_size]
        predict = adapter.predictor(pipe, sampler.batch_conditioning(batch), len(batch), size, size, cfg)
        x = torch.randn(adapter.latent_shape(pipe, len(batch) * (1 + cfg), size, size), device=device, dtype=dtype)
        calls.append((predict, x))
    for predict, x in (calls[0], calls[-1]):  # warm-up: each batch shape once
        predict(x, timesteps[0])
    sync()
    start = time.perf_counter()
    for predict, x in calls:
        for t in timesteps:
            predict(x, t)
    sync()
    return time.perf_counter() - start, len(indices) * len(timesteps) * (1 + cfg)


# kernel names by what they compute: cuBLAS / CUTLASS / Triton-template GEMMs and convolutions; flash, memory-
# efficient and cuDNN attention (checked before the GEMMs: CUTLASS attention kernels contain "cutlass" too). Other
# Triton kernels are Inductor's fused pointwise / reduction kernels, whatever aten op their name cites.
ATTENTION_KERNELS = re.compile(r"flash|fmha|attention|attn|sdpa", re.IGNORECASE)
GEMM_KERNELS = re.compile(r"gemm|gemv|nvjet|cutlass|xmma|cublas|matmul|conv|fprop|(^|_)b?mm(_|$)", re.IGNORECASE)


def kernel_kind(name: str) -> str:
    """"gemm", "attention" or "other" for a GPU kernel's name."""
    if name.startswith("triton_"):
        return "gemm" if name.startswith("triton_tem") else "other"
    if ATTENTION_KERNELS.search(name):
        return "attention"
    return "gemm" if GEMM_KERNELS.search(name) else "other"


def kernel_breakdown(kernels, gemm_flops: float, attention_flops: float) -> dict:
    """Shares of GPU time of ``kernels`` ((name, microseconds) pairs) in GEMMs, attention and everything else,
    and the achieved TFLOP/s of the GEMMs and of the attention given the FLOPs each did."""
    seconds = {"gemm": 0.0, "attention": 0.0, "other": 0.0}
    by_name: dict[str, float] = {}
    for name, us in kernels:
        kind = kernel_kind(name)
        seconds[kind] += us * 1e-6
        by_name[name] = by_name.get(name, 0.0) + us * 1e-6
    total = sum(seconds.values())
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:12]
    return {"gpu_seconds": total, **{f"{k}_seconds": v for k, v in seconds.items()},
            **{f"{k}_share": v / total if total else float("nan") for k, v in seconds.items()},
            "gemm_tflops": gemm_flops / seconds["gemm"] / 1e12 if seconds["gemm"] else float("nan"),
            "attention_tflops": attention_flops / seconds["attention"] / 1e12 if seconds["attention"] else float("nan"),
            "gemm_flops": gemm_flops, "attention_flops": attention_flops,
            "top_kernels": [{"name": n[:160], "seconds": t, "share": t / total} for n, t in top]}


def attention_macs(table: dict) -> int:
    """MACs of one forward in attention products (multiquant.flops ``::qk`` / ``::av`` / ``::matmul``)."""
    return sum(v for k, v in table["other_macs"].items() if k.rsplit("::", 1)[-1] in ("qk", "av", "matmul"))


@torch.no_grad()
def profile_forward(sampler, indices: list[int], table: dict, repeats: int = 3) -> dict:
    """torch.profiler of ``repeats`` denoiser calls (the adapter's call, CFG-doubled) on the first full batch of
    ``indices``, after one unprofiled call: where the GPU time of a forward goes (:func:`kernel_breakdown`)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    adapter, pipe, size = sampler.adapter, sampler.pipe, sampler.resolution
    cfg = sampler.guidance > 1.0
    batch = indices[:sampler.batch_size]
    predict = adapter.predictor(pipe, sampler.batch_conditioning(batch), len(batch), size, size, cfg)
    x = torch.randn(adapter.latent_shape(pipe, len(batch) * (1 + cfg), size, size), device=sampler.denoiser_device(),
                    dtype=sampler.denoiser_dtype())
    t = timesteps_for(pipe.scheduler, sampler.steps, x.device)[0]
    predict(x, t)
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        predict(x, t)
    sync()
    wall = time.perf_counter() - start  # the same calls without the profiler: kernel time / wall = GPU busy share
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            predict(x, t)
        sync()
    kernels = [(e.name, e.time_range.elapsed_us()) for e in prof.events() if e.device_type == DeviceType.CUDA]
    forwards = len(batch) * (1 + cfg) * repeats
    attention = attention_macs(table)
    gemm = table["total_layer_macs"] + table["total_other_macs"] - attention
    out = {"batch_images": len(batch), "forwards": forwards, "calls": repeats, "wall_seconds_unprofiled": wall,
           **kernel_breakdown(kernels, 2 * gemm * forwards, 2 * attention * forwards)}
    out["gpu_busy_fraction"] = out["gpu_seconds"] / wall
    out["tflops_unprofiled"] = 2 * (gemm + attention) * forwards / wall / 1e12
    return out


@dataclasses.dataclass(frozen=True)
class GenerationOptions:
    """The speed options one family is measured with (None / False: the family's own)."""

    dtype: str | None = None
    channels_last: bool = False
    compile: str | None = None

    def __bool__(self) -> bool:
        return bool(self.dtype or self.channels_last or self.compile)


def per_family(flag: str) -> str | dict[str, str]:
    """A per-family flag's text: ``V`` (every family) as is, ``fam=V,fam2=V2`` as ``{fam: V, ...}``; ValueError
    for an item without its family in the second form."""
    if "=" not in flag:
        return flag
    items = flag.split(",")
    if any("=" not in item or not item.partition("=")[0] for item in items):
        raise ValueError(f"{flag!r}: every item must be fam=V")
    return dict(item.split("=", 1) for item in items)


def family_value(flag: str | None, family: str, parse=str):
    """A per-family flag's value for ``family``: ``V`` applies to every family, ``fam=V,fam2=V2`` to those named
    (None for the others)."""
    if flag is None:
        return None
    values = per_family(flag)
    if isinstance(values, str):
        return parse(values)
    return parse(values[family]) if family in values else None


def options_of(args, family: str) -> GenerationOptions:
    listed = args.channels_last
    channels_last = listed is not None and (listed == "all" or family in listed.split(","))
    return GenerationOptions(dtype=family_value(args.dtype, family), channels_last=channels_last,
                             compile=family_value(args.compile, family))


def floor_stage(options: dict, floor: float, forwards: int, macs: int, peak_tflops: float) -> dict:
    achieved = 2 * macs * forwards / floor / 1e12
    return {"options": options, "floor_seconds": floor, "achieved_tflops": achieved,
            "floor_peak_fraction": achieved / peak_tflops}


def apply_options_measured(scorer: Scorer, device, options: GenerationOptions, macs: int,
                           peak_tflops: float) -> tuple[list[dict], dict]:
    """Apply ``options`` to the scorer's pipeline one at a time (cast, channels-last, compile: the order of
    apply_generation_options), measuring the floor before the first and after each but the last (whose floor the
    caller measures with every other figure); returns those stages and the entry's figures (``compile_s``, the
    run settings the options add). The weight swap then starts from the cast FP weights, as a scoring run's."""
    sampler, local = scorer.sampler, scorer.local
    loaded = Loaded(sampler.family, sampler.adapter, sampler.pipe, scorer.denoiser, device)
    steps = [("dtype", {"dtype": SCORING_DTYPES[options.dtype]} if options.dtype else None),
             ("channels_last", {"channels_last": True} if options.channels_last else None),
             ("compile", {"compile_mode": options.compile} if options.compile else None)]
    steps = [(name, kwargs) for name, kwargs in steps if kwargs]
    applied: dict = {}
    stages, figures = [], {}
    for position, (name, kwargs) in enumerate(steps):
        floor, forwards = floor_seconds(sampler, local)
        stages.append(floor_stage(dict(applied), floor, forwards, macs, peak_tflops))
        t0 = time.perf_counter()
        applied.update(apply_generation_options(loaded, getattr(sampler, "refiner", None), **kwargs))
        if name == "compile":  # compiles for the full batch shape (the configurations' batches), then the rest
            floor_seconds(sampler, local[:sampler.batch_size])
        if position == len(steps) - 1:  # the last option: warm up the whole rendering once in the final state
            sampler.generate(local[:sampler.batch_size])
            sync()
        if name == "compile":
            figures["compile_s"] = time.perf_counter() - t0
    if "dtype" in applied:  # configurations start from the cast FP weights, as setup_scorer's scorer does
        scorer.applier = ConfigApplier(scorer.denoiser, scorer.mq)
    figures["generation_settings"] = applied
    return stages, figures


def ours_seconds(scorer: Scorer, config: dict) -> dict:
    """One configuration through the scorer: weight swap, batched sampling, features, FID (its own timings)."""
    sync()
    t0 = time.perf_counter()
    timings = scorer.score(config)["timings"]
    sync()
    return {**timings, "total_s": time.perf_counter() - t0}


def _write_png(img: torch.Tensor, path: Path) -> None:
    from PIL import Image

    Image.fromarray(img.permute(1, 2, 0).numpy()).save(path)


def _read_pngs(paths) -> torch.Tensor:
    """Read PNGs back as a uint8 [N, 3, H, W] batch, as the reference's folder-based FID does."""
    from PIL import Image

    return torch.stack([torch.from_numpy(np.array(Image.open(p))).permute(2, 0, 1) for p in paths])


def reference_loop_seconds(sampler, feats_net, n_images: int, n_ref_feats: int) -> dict:
    """The reference loop on a few images: batch 1, PNG written then re-read, reference set re-encoded."""
    one = dataclasses.replace(sampler, batch_size=1)
    res = sampler.resolution
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sync()
        t0 = time.perf_counter()
        for i in range(n_images):
            _write_png(one.generate([i])[0], tmp / f"{i}.png")
        sync()
        t1 = time.perf_counter()
        feats_net(_read_pngs([tmp / f"{i}.png" for i in range(n_images)]))
        sync()
        t2 = time.perf_counter()
        # the reference re-encodes its 5,000-image reference folder for every configuration
        ref_imgs = torch.randint(0, 256, (n_ref_feats, 3, res, res), dtype=torch.uint8)
        for i, img in enumerate(ref_imgs):
            _write_png(img, tmp / f"ref{i}.png")
        t3 = time.perf_counter()
        feats_net(_read_pngs([tmp / f"ref{i}.png" for i in range(n_ref_feats)]))
        sync()
        t4 = time.perf_counter()
    return {"per_image_generate_png_s": (t1 - t0) / n_images, "per_image_reread_features_s": (t2 - t1) / n_images,
            "per_reference_image_features_s": (t4 - t3) / n_ref_feats, "measured_images": n_images,
            "measured_reference_images": n_ref_feats}


def measure_family(name: str, args, metric, device) -> dict:
    """Every figure of one family (see the module doc), measured side by side."""
    spec = get_family(name)
    full = torch.device(device).type == "cuda"
    if full:
        torch.cuda.reset_peak_memory_stats()
    batch = family_value(args.batch_size, name, int) or spec.batch_size
    options = options_of(args, name)
    num_images = args.num_images or 2 * batch  # default: two full batches of the family's batch size
    scorer, build_s = build_scorer(spec, device, full, num_images, batch, args.mq_methods.split(","), metric)
    sampler, local = scorer.sampler, scorer.local
    config = sample_random_config(scorer.layers, seed=0, index=1, methods=scorer.mq.manifest["methods"])
    # warm-up: kernels, allocator, VAE and feature network, on a couple of images; the reference covariance's square
    # root (computed once per run, then reused by every configuration's distance)
    warm = sampler.generate(local[:2])
    metric.features(warm.repeat(((feature_chunk(metric) or 2) + 1) // 2, 1, 1, 1))  # a full chunk's shapes
    reference = metric.reference()
    first_distance_s = timed(metric.distance, reference["mu"], reference["sigma"])[1]
    table = None if args.scaling_only else flops_table(name, tiny=not full, resolution=sampler.resolution)
    macs = table["total_layer_macs"] + table["total_other_macs"] if table else None
    compiled, stages = {}, []
    if options:
        # the eager floor in the family's precision and layout first, then each option in turn: the weight swap
        # copies into the parameters (keeping their dtype and strides), so configurations never recompile
        stages, compiled = apply_options_measured(scorer, device, options, macs, args.peak_tflops)
        compiled["floor_seconds_per_config_eager"] = stages[0]["floor_seconds"]
    dist.barrier()
    t_start = time.perf_counter()
    ours = ours_seconds(scorer, config)
    tokens = {field: int(value.shape[1]) for field, value in (sampler.prompt_embeds or {}).items()
              if value.ndim == 3 and not field.startswith("negative_")}  # the embeddings' sequence lengths
    entry = {"measured": environment()["date"], "compile": options.compile, "channels_last": options.channels_last,
             "dtype": options.dtype, **compiled,
             "architecture": "full-size" if full else "tiny",
             "parameters": sum(p.numel() for p in scorer.denoiser.parameters()),
             "settings": sampler.settings, "text_tokens": tokens,
             "images_per_config": num_images, "protocol_images": spec.num_images, "batch_size": sampler.batch_size,
             "multiquantizer_methods": scorer.mq.manifest["methods"], "multiquantizer_build_s": build_s,
             "ours": ours, "seconds_per_config": ours["total_s"]}
    if args.scaling_only:
        dist.barrier()  # every rank's shard is done: the slowest rank sets the time
        entry["ours"]["total_s_all_ranks"] = time.perf_counter() - t_start
    else:
        floor, forwards = floor_seconds(sampler, local)
        # the sampling floor: the same images rendered (denoiser, scheduler, VAE, uint8 on the CPU), no metric
        sampling = timed(sampler.generate, local)[1]
        achieved = 2 * macs * forwards / floor / 1e12
        if stages:  # the final stage: every option applied, the floor measured with the other figures
            stages.append(floor_stage(dict(compiled["generation_settings"]), floor, forwards, macs, args.peak_tflops))
            entry.update(floor_stages=stages, achieved_tflops_eager=stages[0]["achieved_tflops"],
                         floor_peak_fraction_eager=stages[0]["floor_peak_fraction"],
                         floor_speedup_vs_eager=stages[0]["floor_seconds"] / floor)
        # fixed costs of a configuration: the weight swap, the Frechet distance and the feature pass's tail after
        # the last batch (at most one chunk) when chunks overlapped generation (otherwise the whole feature pass
        # came after it, and it scales); the rest scales with the images
        fid_s = timed(metric.distance, reference["mu"], reference["sigma"])[1]
        scale = spec.num_images / num_images
        tail = ours.get("features_tail_s", 0.0) if ours.get("feature_chunks_overlapped") else 0.0
        fixed = ours["apply_s"] + fid_s + tail
        ours_protocol = fixed + (ours["total_s"] - fixed) * scale
        entry.update(floor_seconds_per_config=floor, overhead_fraction=(ours["total_s"] - floor) / ours["total_s"],
                     macs_per_forward=macs, forwards_per_config=forwards, achieved_tflops=achieved,
                     floor_peak_fraction=achieved / args.peak_tflops, fid_distance_s=fid_s,
                     seconds_per_config_at_protocol=ours_protocol, floor_seconds_at_protocol=floor * scale,
                     overhead_fraction_at_protocol=(ours_protocol - floor * scale) / ours_protocol,
                     configs_per_hour=3600 / ours_protocol, floor_configs_per_hour=3600 / (floor * scale),
                     sampling_seconds_per_config=sampling, generate_s=ours["generate_s"],
                     generate_overhead_s=ours["generate_s"] - sampling, metrics_s=ours["metrics_s"],
                     features_tail_s=ours.get("features_tail_s"),
                     feature_chunks_overlapped=ours.get("feature_chunks_overlapped"),
                     fid_first_distance_s=first_distance_s, fixed_seconds_per_config=fixed,
                     overhead_fraction_vs_sampling=(ours["total_s"] - sampling) / ours["total_s"],
                     overhead_fraction_vs_sampling_at_protocol=(ours_protocol - sampling * scale) / ours_protocol)
        if args.profile and full:
            entry["profile"] = profile_forward(sampler, local, table)
        if name in args.reference_loop.split(","):
            n_ref = min(args.ref_images, num_images)
            ref = reference_loop_seconds(sampler, metric.feature_net, n_ref, n_ref * 4)
            ref_cfg_s = (spec.num_images * (ref["per_image_generate_png_s"] + ref["per_image_reread_features_s"])
                         + args.reference_set * ref["per_reference_image_features_s"])
            entry.update(reference_loop=ref, reference_loop_seconds_per_config=ref_cfg_s,
                         reference_loop_configs_per_hour=3600 / ref_cfg_s, speedup=ref_cfg_s / ours_protocol)
    if full:
        entry["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
    return entry


def summarize(args, names: list[str], families: dict, failed: dict) -> dict:
    head = families.get(HEADLINE, {})
    return {**environment(), "weights": "random (diffusers init), full-size architectures on CUDA, tiny on the CPU",
            "feature_net": "inception-v3 (random weights: timing only)", "world_size": dist.world_size(),
            "peak_tflops": args.peak_tflops, "num_images_arg": args.num_images,
            "headline_family": HEADLINE,
            # the overhead: beside sampling (denoiser + scheduler + VAE: what rendering an image takes),
            # at the protocol's image count; the per-family overhead_fraction is beside the bare denoiser
            "overhead_fraction": head.get("overhead_fraction_vs_sampling_at_protocol"),
            "overhead_fraction_vs_denoiser": head.get("overhead_fraction"),
            **{k: head.get(k) for k in ("floor_peak_fraction", "achieved_tflops",
                                        "seconds_per_config", "floor_seconds_per_config",
                                        "overhead_fraction_at_protocol", "sampling_seconds_per_config",
                                        "overhead_fraction_vs_sampling_at_protocol", "configs_per_hour",
                                        "speedup", "generate_s", "generate_overhead_s", "metrics_s",
                                        "fid_distance_s", "features_tail_s")},
            "families": families, "failed": failed,
            "not_measured": [n for n in names if n not in families and n not in failed],
            "targets": {"overhead_fraction": "<= 0.02 (pixart_alpha, beside the sampling floor, at protocol)",
                        "floor_peak_fraction": ">= 0.6 (pixart_alpha)",
                        "two_gpu_scaling": ">= 1.8"}}


def earlier_families(name: str, out_dir) -> dict:
    """The families an earlier run wrote into the result file (each entry says when it was measured): a run of
    some families keeps the others' figures."""
    return (read_result(name, out_dir) or {}).get("families", {})


def write(name: str, result: dict, out_dir) -> None:
    old = read_result(name, out_dir)
    if old:  # figures other runs merged into this file stay
        result = {**result, **{k: v for k, v in old.items() if k.startswith(MERGED_ELSEWHERE) and k not in result}}
    write_result(name, result, out_dir)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", default=FAMILIES, help="comma-separated family names, measured in this order")
    ap.add_argument("--num_images", type=int, default=None,
                    help="images per configuration (default: two batches of the family's batch size)")
    ap.add_argument("--batch_size", default=None, metavar="N|FAM=N,...",
                    help="images per denoiser call, for every family or per family (default: the family's)")
    ap.add_argument("--mq_methods", default="mse",
                    help="multiquantizer methods the random configuration draws from (all: mse,kmeans,kmeans_all)")
    ap.add_argument("--peak_tflops", type=float, default=H100_DENSE_FP16_TFLOPS,
                    help="the GPU's dense fp16 rate floor_peak_fraction is measured against")
    ap.add_argument("--deadline_s", type=float, default=None,
                    help="start no family after this many seconds (the rest are listed in not_measured)")
    ap.add_argument("--reference_loop", default="pixart_alpha", help="families timed in the reference loop too")
    ap.add_argument("--ref_images", type=int, default=16, help="images timed for the reference loop")
    ap.add_argument("--reference_set", type=int, default=5000, help="reference images re-encoded per config")
    ap.add_argument("--compile", default=None, metavar="MODE|FAM=MODE,...",
                    help="also torch.compile the denoiser in place with this mode (e.g. default), for every family or "
                         "per family: the eager floor first, then the compiled floor and scorer, side by side")
    ap.add_argument("--channels_last", nargs="?", const="all", default=None, metavar="FAM,...",
                    help="also convert the convolutional rendering modules to channels-last (U-Net denoisers, the "
                         "VAE): every family, or those listed")
    ap.add_argument("--dtype", default=None, metavar="DTYPE|FAM=DTYPE,...",
                    help="also cast the rendering modules to this precision (" + ", ".join(SCORING_DTYPES) +
                         "), for every family or per family, e.g. sdv15=float16")
    ap.add_argument("--profile", action="store_true",
                    help="CUDA: profile one denoiser forward (GEMM / attention / other GPU time and TFLOP/s)")
    ap.add_argument("--scaling_only", action="store_true", help="time our path only (for torchrun runs)")
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = ap.parse_args(argv)
    check_family_flags(ap, args)
    return args


def check_family_flags(ap, args) -> None:
    """Every per-family value well formed (a typo fails before any family is measured)."""
    checks = {"--batch_size": (args.batch_size, lambda v: v.isdigit() and int(v) > 0, "a positive integer"),
              "--compile": (args.compile, lambda v: v in COMPILE_MODES, "one of " + ", ".join(COMPILE_MODES)),
              "--dtype": (args.dtype, lambda v: v in SCORING_DTYPES, "one of " + ", ".join(SCORING_DTYPES))}
    for flag, (value, valid, expected) in checks.items():
        if value is None:
            continue
        try:
            values = per_family(value)
        except ValueError:
            values = None
        if values is None or not all(map(valid, [values] if isinstance(values, str) else values.values())):
            ap.error(f"{flag} {value!r}: each value must be {expected}, for every family (V) or per family "
                     f"(fam=V,fam2=V)")
    if args.scaling_only and (args.compile or args.dtype or args.channels_last):
        ap.error("--scaling_only times the family's own precision, layout and eager denoiser: leave out --compile, "
                 "--dtype and --channels_last")


def main(argv=None, metric=None):
    """``metric``: the FID every family is scored with (default: random-weight Inception, timing only)."""
    args = parse_args(argv)
    start = time.perf_counter()
    info = dist.init_from_env()
    device = info.device  # this rank's GPU (already made current), else the CPU
    names = [n.strip() for n in args.families.split(",") if n.strip()]
    metric = metric or random_metric(device)
    name = f"eval_random_scaling_{dist.world_size()}gpu" if args.scaling_only else "eval_random"
    earlier, families, failed = earlier_families(name, args.out), {}, {}
    for family in names:
        if args.deadline_s is not None and time.perf_counter() - start > args.deadline_s:
            break
        print(f"{family}: measuring", flush=True)
        try:
            families[family] = entry = measure_family(family, args, metric, device)
            if family in earlier:  # the figures it replaces stay beside it (one run back)
                entry["previous_run"] = {k: v for k, v in earlier[family].items() if k != "previous_run"}
        except Exception as err:  # one family's failure (e.g. out of memory) must not cost the others' figures
            failed[family] = f"{type(err).__name__}: {err}"[:500]
            traceback.print_exc()
            print(f"{family}: FAILED {failed[family]}", flush=True)
        else:
            print(f"{family}: ours {entry['seconds_per_config']:.2f} s, floor {entry.get('floor_seconds_per_config')}"
                  f" s for {entry['images_per_config']} images ({time.perf_counter() - start:.0f} s so far)",
                  flush=True)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if dist.is_main():  # after every family: a run stopped by its time limit keeps what it measured
            write(name, summarize(args, names, {**earlier, **families}, failed), args.out)
    dist.cleanup()


if __name__ == "__main__":
    main()
