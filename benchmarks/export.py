"""Real savings of a packed export: size on disk, peak GPU memory and latency of one denoiser forward, exactness.

    python benchmarks/export.py                  # GPU: full-size PixArt-alpha, random fp16 weights (~2-4 min)
    python benchmarks/export.py --tiny           # CPU: the tiny model, seconds (checks the script)

For each configuration (default: uniform UAQ 4-bit and a random ~3.5-bit mix of all six options) the
denoiser is exported with ``export_quantized`` and loaded back with ``load_quantized``; the FP16 reference
is the same denoiser's ``save_pretrained`` safetensors and its ordinary forward. Memory: peak of
``torch.cuda.max_memory_allocated`` over one forward (batch 2, 512 px = 64x64 latents, 120 text tokens),
with nothing else on the GPU, stats reset before each. Exactness: max abs difference of the packed
forward vs the simulated configuration (``quantize_`` on the FP16 model) on the same inputs.
Weights are random, so K-Means runs few iterations (``--kmeans_iters``): quality is not measured here.
Writes benchmarks/results/export.json (export_tiny.json with --tiny).
"""
from __future__ import annotations

import argparse
import gc
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import environment, sync, timed, write_result  # noqa: E402
from multiquant.checkpoint import MultiQuantizer  # noqa: E402
from multiquant.config import config_record, quantize_, sample_random_config, uniform_config  # noqa: E402
from multiquant.export import (WEIGHTS_NAME, denoiser_output, export_quantized, load_quantized,  # noqa: E402
                               read_export_info, safetensors_bytes, tensor_bytes)
from multiquant.families import get_family  # noqa: E402
from multiquant.families.inputs import example_inputs  # noqa: E402
from multiquant.layers import fp_bytes, quantizable_layers  # noqa: E402


def make_configs(names: list[str], layers) -> dict[str, dict]:
    configs = {}
    for name in names:
        if name == "random_3.5":  # p(3-bit) = 0.5 for every layer, methods uniform: ~3.5 bits + overhead
            configs[name] = sample_random_config(layers, seed=0, index=0, a_l=0.5, a_u=0.5)
        elif name.startswith("uniform_"):
            configs[name] = uniform_config(layers, name[len("uniform_"):])
        else:
            raise ValueError(f"unknown configuration {name!r}: use random_3.5 or uniform_<method>-<bits>")
    return configs


def forward_inputs(family, model, batch: int, tokens: int, resolution: int | None) -> dict:
    inputs = example_inputs(family, model, batch=batch, resolution=resolution, seed=0)
    if "encoder_hidden_states" in inputs and type(model).__name__ == "PixArtTransformer2DModel":
        g = torch.Generator().manual_seed(1)
        dim = inputs["encoder_hidden_states"].shape[-1]
        inputs["encoder_hidden_states"] = torch.randn(batch, tokens, dim, generator=g).to(
            inputs["encoder_hidden_states"])
    return inputs


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@torch.no_grad()
def measure_forward(model, inputs, reps: int, warmup: int = 2) -> tuple[torch.Tensor, dict]:
    """Output, peak memory of one forward (CUDA), resident bytes and latency statistics."""
    cuda = torch.cuda.is_available() and next(model.parameters()).is_cuda
    for _ in range(warmup):
        denoiser_output(model, inputs)
    sync()
    stats = {"tensor_bytes": tensor_bytes(model)}
    if cuda:
        free_memory()
        torch.cuda.reset_peak_memory_stats()
        stats["allocated_before_forward"] = torch.cuda.memory_allocated()
    out = denoiser_output(model, inputs)
    sync()
    if cuda:
        stats["peak_allocated"] = torch.cuda.max_memory_allocated()
        stats["forward_extra_peak"] = stats["peak_allocated"] - stats["allocated_before_forward"]
    times = []
    for _ in range(reps):
        _, seconds = timed(denoiser_output, model, inputs)
        times.append(seconds)
    stats.update(latency_ms_median=1e3 * statistics.median(times), latency_ms_min=1e3 * min(times),
                 latency_ms_all=[1e3 * t for t in times])
    return out, stats


def main(argv=None) -> dict:
    args = parse_args(argv)
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="export_bench_"))
    try:
        return run(args, workdir)
    finally:
        if not args.workdir:  # exports of random weights: nothing worth keeping
            shutil.rmtree(workdir, ignore_errors=True)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="pixart_alpha")
    ap.add_argument("--tiny", action="store_true", help="tiny random model (default on a machine without CUDA)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--configs", default="uniform_mse-4,random_3.5")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=120, help="text tokens (PixArt)")
    ap.add_argument("--resolution", type=int, default=None, help="pixels (default: the family's; tiny: its own)")
    ap.add_argument("--reps", type=int, default=20, help="timed forwards per model")
    ap.add_argument("--kmeans_iters", type=int, default=10, help="random weights: few Lloyd iterations suffice")
    ap.add_argument("--workdir", default=None, help="where exports are written (default: a temporary directory)")
    ap.add_argument("--out", default=None, help="results directory (default benchmarks/results)")
    return ap.parse_args(argv)


def run(args, workdir: Path) -> dict:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tiny = args.tiny or device.type != "cuda"
    if device.type == "cpu":
        torch.set_num_threads(1)  # tiny models: threads only spin-wait each other on a shared CPU
    family = get_family(args.model)
    dtype = family.dtype if device.type == "cuda" else torch.float32  # fp16 matmuls are slow or missing on CPUs
    resolution = args.resolution if args.resolution else (None if tiny else family.resolution)
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    model = family.build("tiny" if tiny else "full", device=device, dtype=dtype, seed=0)
    layers = quantizable_layers(model, family)
    inputs = forward_inputs(family, model, args.batch, args.tokens, resolution)
    result = {**environment(), "model": args.model, "architecture": "tiny" if tiny else "full-size",
              "weights": "random (diffusers init), real shapes", "dtype": str(dtype).replace("torch.", ""),
              "forward": {"batch": args.batch, "resolution": resolution, "tokens": args.tokens,
                          "input_shapes": {k: list(v.shape) for k, v in inputs.items() if torch.is_tensor(v)}},
              "num_layers": len(layers), "fp_bytes_quantizable": fp_bytes(layers, family.fp_prec)}

    # FP16 reference: the stock safetensors and an ordinary forward, alone on the device
    fp_dir = workdir / "fp16"
    model.save_pretrained(fp_dir, safe_serialization=True)
    fp_file_bytes = sum(p.stat().st_size for p in fp_dir.glob("*.safetensors"))
    fp_out, fp_stats = measure_forward(model, inputs, args.reps)
    result["fp16"] = {"file_bytes": fp_file_bytes, **fp_stats}

    mq, build_s = timed(MultiQuantizer.build, model, family, kmeans_iters=args.kmeans_iters, show_progress=False)
    result["multiquantizer_build_seconds"] = build_s
    configs = make_configs([c.strip() for c in args.configs.split(",") if c.strip()], mq.layers)
    simulated_out, records = {}, {}
    for name, config in configs.items():  # export every configuration from the FP weights first
        out_dir, export_s = timed(export_quantized, model, family, config, mq, workdir / name)
        record = config_record(config, mq.table, mq.fp_prec, mq.fp_bytes)
        info = read_export_info(out_dir)
        records[name] = {"avg_bits": record["avg_bits"], "export_seconds": export_s,
                         "stored_bits_per_quantized_weight": info["stored_bits_per_quantized_weight"],
                         "file": safetensors_bytes(out_dir / WEIGHTS_NAME),
                         "hand_computed_tensor_bytes": info["bytes"]["total"],
                         # the reference's size formula (fp16 overheads) plus the non-quantized tensors
                         "reference_formula_bytes": record["quantized_size"] + info["bytes"]["fp_tensors"]}
        records[name]["file_bytes_match_hand_computed"] = (
            records[name]["file"]["tensor_data"] == info["bytes"]["total"]
            and records[name]["file"]["file"] == info["bytes"]["total"] + records[name]["file"]["header"])
    for name, config in configs.items():
        quantize_(model, config, mq)  # simulated configuration, for the exactness check
        with torch.no_grad():
            simulated_out[name] = denoiser_output(model, inputs)
    del model, mq
    free_memory()

    for name in configs:
        packed, load_s = timed(load_quantized, workdir / name, device=device, dtype=dtype)
        out, stats = measure_forward(packed, inputs, args.reps)
        rec = records[name]
        rec.update(load_seconds=load_s, packed=stats,
                   max_abs_diff_vs_simulated=float((out.float() - simulated_out[name].float()).abs().max()),
                   max_abs_diff_vs_fp16=float((out.float() - fp_out.float()).abs().max()),
                   disk_ratio_vs_fp16=rec["file"]["file"] / fp_file_bytes,
                   memory_ratio_vs_fp16=stats["tensor_bytes"] / fp_stats["tensor_bytes"],
                   latency_ratio_vs_fp16=stats["latency_ms_median"] / fp_stats["latency_ms_median"])
        if "peak_allocated" in stats:
            rec["peak_ratio_vs_fp16"] = stats["peak_allocated"] / fp_stats["peak_allocated"]
        del packed, out
        free_memory()
    result["configs"] = records
    result["total_seconds"] = time.perf_counter() - started
    result["workdir"] = str(workdir) if args.workdir else None
    write_result("export_tiny" if tiny else "export", result, args.out)
    return result


if __name__ == "__main__":
    main()
