"""Real savings of a packed export: size on disk, peak GPU memory and latency of one denoiser forward, exactness,
for the fast packed path (multiquant/kernels.py) beside the eager reference path, and the whole pipeline's memory.

    python benchmarks/export.py                  # GPU: full-size PixArt-alpha and DiT-XL/2, random fp16 weights
    python benchmarks/export.py --tiny           # CPU: the tiny models, seconds (checks the script)

Per model, each configuration (default: uniform UAQ-4, uniform K-Means-A-4, uniform K-Means-C-3 and a random
~3.5-bit mix of all six options) is exported with ``export_quantized`` and loaded back with ``load_quantized``;
the FP16 reference is the same denoiser's ``save_pretrained`` safetensors and its ordinary forward. Per shape
(batch x resolution; PixArt with 120 text tokens): latency = median of ``--reps`` forwards after warm-up (eager
path: ``--eager_reps``), each model alone on the GPU, all measured side by side in one run; for every fast path also
``paired``: ``--reps`` FP16 and packed forwards alternated, and ``latency_ratio_vs_fp16`` is the median of their
per-pair ratios (``_unpaired``: the ratio of the two medians; ``--no_paired`` skips the pairs), because the eager
batch-2 forwards are bound by host time that drifts between calls; memory = peak of
``torch.cuda.max_memory_allocated`` over one forward, stats reset before it (the packed model's figure includes
the shared decode scratch); exactness = max abs difference of the packed forward vs the simulated configuration
(``quantize_`` on the FP16 model) on the same inputs. At batch 2 the forwards are also replayed as CUDA graphs
(launch overhead removed), fast path vs FP16. Pipeline memory: the text encoder (PixArt: T5-XXL) and the VAE are
measured alone (resident bytes + peak of one encode / decode) and combined with the denoiser's figures.
Weights are random, so K-Means runs few iterations (``--kmeans_iters``): quality is not measured here.

Small-M kernel: per configuration and shape, ``fast`` is the library's default fast path (``--small_m_max``,
default the library's setting: "measured", the measured dispatch of multiquant.kernels, which times decode + cuBLAS
against the fused table-lookup GEMM once per layer kind on the GPU and keeps the faster; ``kernels.tune_small_m``
warms it before the timed forwards and ``small_m_decisions`` lists its decisions), and beside it, in the same run,
``fast_no_small_m`` (setting 0: decode + cuBLAS everywhere, bit-exact) and ``fast_small_m_measured`` (the measured
dispatch; measured only when the default is another setting), plus ``fast_small_m`` at a fixed threshold of
``--small_m_compare`` rows when that is > 0. ``*_with_small_m`` (the measured path) / ``*_without_small_m`` (setting
0) keys and ``small_m_speedup`` (latency without / with; ``small_m_speedup_cuda_graph`` from graph replays at batch
<= 2) compare them, ``small_m_layers`` counts the layer calls that took the kernel. Before the models,
``small_m_microbench`` times the small-M layers alone (K/V and timestep MLP 1152 x 1152, adaLN 1152 -> 6912, caption
projection 4096 -> 1152) at M = 1 ... 2048 for FP16 ``F.linear``, decode + cuBLAS and the fused kernel (host-timed
back-to-back calls and CUDA-graph replays), checks each fused result against its stated error bound, records the
measured dispatch's decision at M <= its cap (``measured_dispatch``), and reports per shape and option the largest M
up to which the fused kernel is at least as fast on the GPU (``crossover``). If the fused kernel fails there, the
models are measured without it and ``small_m_disabled_because`` says why.

Decode levers: ``fast`` carries the lever load_quantized attaches (``default_lever``: the batched decode unless
QUA2SEDIMO_BATCHED_DECODE says otherwise). Beside it, in the same run: ``--layer_decode_compare`` measures
``fast_layer_decode`` without it (one decode launch per layer, group decode kernel), ``--decode_compare``
``fast_per_weight_decode`` (one launch per layer, the per-weight kernel forced: ``kernels.use_group_decode(False)``,
as QUA2SEDIMO_GROUP_DECODE=0), ``--decode_ahead_compare`` ``fast_decode_ahead`` (``kernels.decode_ahead``: each
layer's decode overlapping the previous layer's GEMM on a side stream), ``--batched_decode_compare``
``fast_batched_decode`` (``kernels.batched_decode``: one launch per group of consecutive packed layers, up to
``kernels.BATCHED_DECODE_MAX_BYTES`` decoded bytes a group; its launches, groups and extra scratch bytes) and
``--batched_ahead_compare`` ``fast_batched_ahead`` (``batched_decode(model, ahead=True)``: each group's decode on a
side stream during the previous group's compute). Speedups (``*_speedup``, ``_cuda_graph`` from graph replays) are
one decode per layer (fast_layer_decode, or fast when it has no lever) over the lever's path:
``default_lever_speedup``, ``decode_ahead_speedup``, ``batched_decode_speedup``, ``batched_ahead_speedup``; and
``group_decode_speedup`` = the per-weight path over one decode per layer.

Subsets: ``--models pixart_alpha,dit --shapes b2_512`` measures batch 2 at 512 px of both models only (a
``--shapes`` item without ``model:`` applies to every model); the rows of other shapes and models already in the
results file are kept (``--no_merge``: start the file afresh), each row saying when it was measured
(``measured_in``), and the targets are read off the merged rows.
Writes benchmarks/results/export.json (export_tiny.json with --tiny), rewritten after the micro-benchmark and
after every configuration.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import functools
import gc
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import (environment, full_size_vae, random_packed_weight, read_result,  # noqa: E402
                               result_path, sync, timed, write_result)
from multiquant.checkpoint import MultiQuantizer  # noqa: E402
from multiquant.config import config_record, quantize_, sample_random_config, uniform_config  # noqa: E402
from multiquant.export import (WEIGHTS_NAME, denoiser_output, export_quantized, load_quantized,  # noqa: E402
                               read_export_info, safetensors_bytes, tensor_bytes)
from multiquant.families import get_family  # noqa: E402
from multiquant.adapters import example_inputs  # noqa: E402
from multiquant import kernels  # noqa: E402
from multiquant.kernels import SCRATCH, small_m_threshold, use_packed_kernels  # noqa: E402
from multiquant.packed import PackedLinear, packed_layer  # noqa: E402
from multiquant.layers import fp_bytes, quantizable_layers  # noqa: E402
from multiquant.errors import UserError  # noqa: E402
from multiquant.utils import default_device  # noqa: E402


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
    SCRATCH.release()
    gc.collect()
    if torch.cuda.is_available():
        # cuBLAS keeps a workspace per stream it ran on (graph capture runs on a side stream): drop them, so a
        # model measured after a capture does not carry the previous one's workspace in its figures
        torch._C._cuda_clearCublasWorkspaces()
        torch.cuda.empty_cache()


@torch.no_grad()
def measure_forward(model, inputs, reps: int, warmup: int = 3) -> tuple[torch.Tensor, dict]:
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


@torch.no_grad()
def paired_latency(fp_model, model, inputs, reps: int, device) -> dict:
    """FP16 and packed forwards alternated, ``reps`` pairs after two warm-up pairs, the FP16 model on the device
    only meanwhile: drift of the host or the GPU hits both alike (eager forwards at batch 2 are bound by host time,
    and FP16's own median moved 1.9x between two calls on one H200 host). ``ratio_median``: the median of the
    per-pair ratios packed / FP16."""
    fp_model.to(device)
    try:
        for _ in range(2):
            denoiser_output(fp_model, inputs)
            denoiser_output(model, inputs)
        fp_times, times = [], []
        for _ in range(reps):
            fp_times.append(timed(denoiser_output, fp_model, inputs)[1])
            times.append(timed(denoiser_output, model, inputs)[1])
    finally:
        fp_model.to("cpu")
        free_memory()
    return {"pairs": reps, "fp16_ms_median": 1e3 * statistics.median(fp_times),
            "latency_ms_median": 1e3 * statistics.median(times),
            "ratio_median": statistics.median(t / f for t, f in zip(times, fp_times))}


@torch.no_grad()
def graph_latency(model, inputs, reps: int) -> dict:
    """Median latency of CUDA-graph replays of one forward (launch overhead gone) and the replayed output."""
    denoiser_output(model, inputs)  # warm-up outside capture (kernels compiled, scratch sized)
    sync()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = denoiser_output(model, inputs)
    times = []
    for _ in range(reps + 2):
        _, seconds = timed(graph.replay)
        times.append(seconds)
    times = times[2:]
    result = {"latency_ms_median": 1e3 * statistics.median(times), "output": out.clone()}
    del graph
    return result


DEFAULT_SHAPES = {"pixart_alpha": "2x512,16x512,2x1024,16x1024", "dit": "2x512,16x512"}


def parse_shapes(text: str) -> list[tuple[int, int | None]]:
    """``BxRES`` or ``bB_RES`` items (``B`` alone: the model's own resolution), comma-separated."""
    shapes = []
    for item in text.split(","):
        item = item.strip().lower()
        if item.startswith("b"):
            item = item[1:].replace("_", "x")
        batch, _, res = item.partition("x")
        if not batch.isdigit() or not (res.isdigit() or not res):
            raise UserError(f"shape {item!r} is not BATCHxRESOLUTION: write e.g. 2x512 or b2_512 (--shapes)")
        shapes.append((int(batch), int(res) if res else None))
    return shapes


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
    ap.add_argument("--models", default="pixart_alpha,dit")
    ap.add_argument("--tiny", action="store_true", help="tiny random models (default on a machine without CUDA)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--configs", default="uniform_mse-4,uniform_kmeans_all-4,uniform_kmeans-3,random_3.5")
    ap.add_argument("--shapes", default=None,
                    help="model:BxRES,... separated by ';' (default: PixArt 2/16 x 512/1024, DiT 2/16 x 512; "
                         "tiny: 2 and 16 at the tiny model's own resolution)")
    ap.add_argument("--tokens", type=int, default=120, help="text tokens (PixArt)")
    ap.add_argument("--reps", type=int, default=20, help="timed forwards per model and shape (fast path, FP16)")
    ap.add_argument("--eager_reps", type=int, default=5, help="timed forwards of the eager reference path")
    ap.add_argument("--kmeans_iters", type=int, default=3, help="random weights: few Lloyd iterations suffice")
    ap.add_argument("--no_pipeline", action="store_true", help="skip the text encoder / VAE memory figures")
    ap.add_argument("--workdir", default=None, help="where exports are written (default: a temporary directory)")
    ap.add_argument("--out", default=None, help="results directory (default benchmarks/results)")
    ap.add_argument("--small_m_max", type=kernels.small_m_setting, default=None,
                    help="small-M setting of the default fast path: 'measured' (per layer kind, timed on the GPU), "
                         "0 (never the fused kernel) or N rows (always on <= N rows); default: the library's "
                         "(multiquant.kernels.SMALL_M_MAX, QUA2SEDIMO_SMALL_M_MAX)")
    ap.add_argument("--small_m_compare", type=int, default=0,
                    help="also measure the fast path with the fused kernel on every layer of <= this many rows "
                         "(fast_small_m; 0: not measured)")
    ap.add_argument("--no_small_m_compare", action="store_true",
                    help="measure the fast path at --small_m_max only (no side-by-side small-M paths)")
    ap.add_argument("--no_merge", action="store_true",
                    help="write a fresh results file (default: keep the rows of shapes and models this run does "
                         "not measure from the existing file)")
    ap.add_argument("--decode_compare", action="store_true",
                    help=f"also measure the fast path with the per-weight decode kernel everywhere "
                         f"({PER_WEIGHT_DECODE_PATH}; QUA2SEDIMO_GROUP_DECODE=0), side by side with the default")
    ap.add_argument("--layer_decode_compare", action="store_true",
                    help=f"also measure the fast path without load_quantized's decode lever ({LAYER_DECODE_PATH}: one "
                         f"decode launch per layer), side by side with the default")
    ap.add_argument("--no_paired", action="store_true",
                    help="skip the paired timings (FP16 and packed forwards alternated) behind latency_ratio_vs_fp16")
    ap.add_argument("--decode_ahead_compare", action="store_true",
                    help=f"also measure the fast path with kernels.decode_ahead on the model ({DECODE_AHEAD_PATH}), "
                         f"side by side with the default")
    ap.add_argument("--batched_decode_compare", action="store_true",
                    help=f"also measure the fast path with kernels.batched_decode on the model "
                         f"({BATCHED_DECODE_PATH}), side by side with the default")
    ap.add_argument("--batched_ahead_compare", action="store_true",
                    help=f"also measure the fast path with kernels.batched_decode(model, ahead=True) on the model "
                         f"({BATCHED_AHEAD_PATH}), side by side with the default")
    ap.add_argument("--no_microbench", action="store_true", help="skip the small-M layer micro-benchmark")
    ap.add_argument("--micro_rows", default=None,
                    help=f"rows M of the micro-benchmark (default {MICRO_ROWS}; tiny: {MICRO_ROWS_TINY})")
    ap.add_argument("--micro_options", default=MICRO_OPTIONS)
    ap.add_argument("--micro_calls", type=int, default=100,
                    help="back-to-back calls per host-timed figure (CUDA graphs: 20 calls per replay)")
    return ap.parse_args(argv)


def _shapes_for(args, model_name: str, tiny: bool) -> list[tuple[int, int | None]]:
    if args.shapes:  # "model:2x512,16x512;other:..." or, for every model, "2x512,16x512" / "b2_512"
        shared = []
        for spec in args.shapes.split(";"):
            name, colon, shapes = spec.partition(":")
            if not colon:
                shared += parse_shapes(spec)
            elif name.strip() == model_name:
                return parse_shapes(shapes)
        return shared
    return [(2, None), (16, None)] if tiny else parse_shapes(DEFAULT_SHAPES.get(model_name, "2x512,16x512"))


def run(args, workdir: Path) -> dict:
    device = default_device(args.device)
    if args.small_m_max is None:
        args.small_m_max = kernels.small_m_max()
    tiny = args.tiny or device.type != "cuda"
    if device.type == "cpu":
        torch.set_num_threads(1)  # tiny models: threads only spin-wait each other on a shared CPU
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    result = {**environment(), "architecture": "tiny" if tiny else "full-size",
              "weights": "random (diffusers init), real shapes", "kmeans_iters": args.kmeans_iters,
              "reps": args.reps, "eager_reps": args.eager_reps, "tokens": args.tokens,
              "fast_path": "multiquant.kernels: Triton decode into a shared scratch buffer + cuBLAS; PackedLinear "
                           "forwards on few rows: the fused table-lookup GEMM on the packed codes where the "
                           "small_m_max setting says so ('measured': per layer kind, where it was timed faster, "
                           f"on at most {kernels.MEASURED_MAX_ROWS} rows)",
              "side_by_side_paths": "fast: the library default (small_m_max); fast_no_small_m: setting 0 (decode + "
                                    "cuBLAS for every layer); fast_small_m_measured: the measured dispatch (when "
                                    "fast is another setting); fast_small_m: the fused kernel at <= small_m_compare "
                                    "rows (when > 0); eager: the reference path",
              "small_m_measured_max_rows": kernels.MEASURED_MAX_ROWS,
              "small_m_measured_min_gain": kernels.MEASURED_MIN_GAIN,
              "small_m_compare": args.small_m_compare,
              "small_m_max": args.small_m_max, "group_decode": kernels.group_decode_enabled(),
              "decode_compare": args.decode_compare, "decode_ahead_compare": args.decode_ahead_compare,
              "batched_decode_compare": args.batched_decode_compare,
              "batched_ahead_compare": args.batched_ahead_compare,
              "layer_decode_compare": args.layer_decode_compare,
              "batched_decode_max_bytes": kernels.BATCHED_DECODE_MAX_BYTES,
              "default_lever": _lever_name(default_lever()) if default_lever() else None,
              "latency_ratio": "the median of paired ratios (FP16 and packed forwards alternated, paired.ratio_median)"
                               if not args.no_paired else "median packed latency / median FP16 latency",
              "models": {}, "shapes": [], "pipeline_memory": []}
    name = "export_tiny" if tiny else "export"
    previous = None if args.no_merge else read_previous(name, args.out)

    def save(final: bool = False) -> dict:
        merged = merge_previous(result, previous) if previous else dict(result)
        if final:
            merged["targets"] = target_summary(merged)
        write_result(name, merged, args.out)
        return merged

    if not args.no_microbench:
        try:
            result["small_m_microbench"] = small_m_microbench(args, device)
        except Exception as e:
            result.setdefault("errors", {})["small_m_microbench"] = f"{type(e).__name__}: {e}"[:2000]
            traceback.print_exc()
        failed = result.get("small_m_microbench", {}).get("fused_errors")
        if failed and device.type == "cuda":  # the fused kernel failed on this GPU: measure the models without it
            result["small_m_disabled_because"] = failed[0]
            args.small_m_max = result["small_m_max"] = 0
        free_memory()
        save()
    for model_name in [m.strip() for m in args.models.split(",") if m.strip()]:
        try:
            bench_model(args, model_name, device, tiny, workdir / model_name, result, save=save)
        except Exception as e:  # one run on a lent GPU: keep the other models' figures, record the failure
            result.setdefault("errors", {})[model_name] = f"{type(e).__name__}: {e}"[:2000]
            traceback.print_exc()
            free_memory()
        result["total_seconds"] = time.perf_counter() - started
        save()
    result["small_m_table"] = kernels.small_m_table()  # every measured decision of this run
    result["direct_launch_engaged"] = kernels.DIRECT_LAUNCH[0]
    result["total_seconds"] = time.perf_counter() - started
    final = save(final=True)
    print_summary(final)
    return final


ROW_KEY = ("model", "batch", "resolution")
# about a whole file's run (or recomputed): not carried over as figures, kept as the previous run's notes
RUN_NOTES = ("produced_by", "headline_path", "previous_run", "pipeline_memory_from", "merged", "errors", "targets")


def read_previous(name: str, out_dir) -> dict | None:
    try:
        return read_result(name, out_dir)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read the previous results {result_path(name, out_dir)} to merge into ({e}): fix or "
                        f"move it, or pass --no_merge") from e


def merge_previous(result: dict, previous: dict) -> dict:
    """This run's results, plus what ``previous`` (the results file before it) has and this run did not measure:
    rows and pipeline-memory entries of other (model, batch, resolution), other models' info, other top-level
    figures (e.g. an earlier micro-benchmark). Rows keep the previous order (re-measured rows in place), each
    row says when it was measured; the previous file's notes on its own run go under ``merged``."""
    def key(row):
        return tuple(row.get(k) for k in ROW_KEY)

    def tagged(rows, date):
        return [row if "measured_in" in row else dict(row, measured_in=date) for row in rows]

    new_rows = {key(r): r for r in tagged(result["shapes"], result.get("date"))}
    old_rows = tagged(previous.get("shapes", []), previous.get("date"))
    rows = [new_rows.pop(key(r), r) for r in old_rows] + list(new_rows.values())
    measured = {key(r) for r in result["shapes"]}
    kept = [key(r) for r in old_rows if key(r) not in measured]
    pipeline = [e for e in previous.get("pipeline_memory", []) if key(e) not in measured]
    carried = {k: v for k, v in previous.items() if k not in result and k not in RUN_NOTES}
    merged = dict(carried)
    merged.update(result, shapes=rows, pipeline_memory=pipeline + list(result.get("pipeline_memory", [])),
                  models={**previous.get("models", {}), **result.get("models", {})})
    merged["merged"] = {"previous_date": previous.get("date"), "previous_device": previous.get("device"),
                        "rows_from_previous_run": [f"{m} b{b} {r}px" for m, b, r in kept],
                        "figures_from_previous_run": sorted(carried),
                        # one level: the previous file's own merge record and targets would nest run after run
                        "previous_notes": {k: previous[k] for k in RUN_NOTES
                                           if k in previous and k not in ("merged", "targets")}}
    return merged


def bench_model(args, model_name: str, device, tiny: bool, workdir: Path, result: dict, save=lambda: None) -> None:
    """One model: its FP16 rows, then every configuration's, written (``save``) after each configuration."""
    family = get_family(model_name)
    dtype = family.dtype if device.type == "cuda" else torch.float32  # fp16 matmuls are slow or missing on CPUs
    shapes = _shapes_for(args, model_name, tiny)
    workdir.mkdir(parents=True, exist_ok=True)
    model = family.build("tiny" if tiny else "full", device=device, dtype=dtype, seed=0)
    layers = quantizable_layers(model, family)
    info = {"dtype": str(dtype).replace("torch.", ""), "num_layers": len(layers),
            "fp_bytes_quantizable": fp_bytes(layers, family.fp_prec)}
    shape_inputs = []
    for batch, res in shapes:
        resolution = res if res else (None if tiny else family.resolution)
        inputs = forward_inputs(family, model, batch, args.tokens, resolution)
        shape_inputs.append((batch, resolution, _to(inputs, "cpu")))  # on the GPU only while measured

    # FP16 reference: the stock safetensors and an ordinary forward, alone on the device
    fp_dir = workdir / "fp16"
    model.save_pretrained(fp_dir, safe_serialization=True)
    info["fp16_file_bytes"] = sum(p.stat().st_size for p in fp_dir.glob("*.safetensors"))
    info["fp16_tensor_bytes"] = tensor_bytes(model)
    rows, fp_outs = [], []
    for batch, resolution, cpu_inputs in shape_inputs:
        inputs = _to(cpu_inputs, device)
        out, stats = measure_forward(model, inputs, args.reps)
        if device.type == "cuda" and batch <= 2:
            stats["cuda_graph"] = _graph(model, inputs, args.reps, out)
        rows.append({"model": model_name, "batch": batch, "resolution": resolution,
                     "input_shapes": {k: list(v.shape) for k, v in inputs.items() if torch.is_tensor(v)},
                     "fp16": stats, "configs": {}})
        fp_outs.append(out.float().cpu())
        del out, inputs  # nothing of this shape left on the GPU while the next one is measured
        free_memory()

    fp_model = None if args.no_paired else copy.deepcopy(model).cpu()  # paired timings: on the device when timed
    mq, build_s = timed(MultiQuantizer.build, model, family, kmeans_iters=args.kmeans_iters, show_progress=False)
    info["multiquantizer_build_seconds"] = build_s
    configs = make_configs([c.strip() for c in args.configs.split(",") if c.strip()], mq.layers)
    info["configs"] = {}
    for cname, config in configs.items():  # export every configuration from the FP weights first
        out_dir, export_s = timed(export_quantized, model, family, config, mq, workdir / cname)
        record = config_record(config, mq.table, mq.fp_prec, mq.fp_bytes)
        einfo = read_export_info(out_dir)
        file = safetensors_bytes(out_dir / WEIGHTS_NAME)
        info["configs"][cname] = {
            "avg_bits": record["avg_bits"], "export_seconds": export_s,
            "options": dict(sorted(_counts(config).items())),
            "stored_bits_per_quantized_weight": einfo["stored_bits_per_quantized_weight"], "file": file,
            "hand_computed_tensor_bytes": einfo["bytes"]["total"],
            "file_bytes_match_hand_computed": (file["tensor_data"] == einfo["bytes"]["total"]
                                               and file["file"] == einfo["bytes"]["total"] + file["header"]),
            "disk_ratio_vs_fp16": file["file"] / info["fp16_file_bytes"]}
    simulated = {}
    for cname, config in configs.items():
        quantize_(model, config, mq)  # simulated configuration, for the exactness check
        with torch.no_grad():
            simulated[cname] = [denoiser_output(model, _to(inputs, device)).float().cpu()
                                for _, _, inputs in shape_inputs]
    del model, mq
    free_memory()
    result["models"][model_name] = info

    result["shapes"] += rows  # filled in below, one configuration at a time
    for cname in configs:
        packed, load_s = timed(load_quantized, workdir / cname, device=device, dtype=dtype)
        handle = getattr(packed, "qua2sedimo_batched_decode", None)
        if handle is not None:
            handle.remove()  # put back per path (default_lever), beside the paths without it
        info["configs"][cname]["load_seconds"] = load_s
        info["configs"][cname]["memory_ratio_vs_fp16"] = tensor_bytes(packed) / info["fp16_tensor_bytes"]
        for row, fp_out, (batch, resolution, inputs), sim in zip(rows, fp_outs, shape_inputs, simulated[cname]):
            row["configs"][cname] = bench_packed(packed, _to(inputs, device), row, fp_out, sim, args, device, batch,
                                                 info["configs"][cname]["disk_ratio_vs_fp16"], fp_model)
        del packed
        free_memory()
        save()
    if not args.no_pipeline:
        try:
            result["pipeline_memory"] += pipeline_memory(family, model_name, rows, info, device, dtype, tiny, args)
        except Exception as e:
            result.setdefault("errors", {})[f"{model_name} pipeline_memory"] = f"{type(e).__name__}: {e}"[:2000]
            traceback.print_exc()
            free_memory()


def _to(inputs: dict, device) -> dict:
    return {k: _to(v, device) if isinstance(v, dict) else v.to(device) if torch.is_tensor(v) else v
            for k, v in inputs.items()}


def _counts(config: dict) -> dict:
    counts = {}
    for option in config.values():
        counts[option] = counts.get(option, 0) + 1
    return counts


def _graph(model, inputs, reps: int, eager_out: torch.Tensor) -> dict:
    try:
        graphed = graph_latency(model, inputs, reps)
    except Exception as e:  # a forward that syncs the host cannot be captured: say so, keep going
        return {"error": f"{type(e).__name__}: {e}"[:300]}
    out = graphed.pop("output")
    graphed["equals_eager_output"] = bool(torch.equal(out, eager_out))
    return graphed


PER_WEIGHT_DECODE_PATH = "fast_per_weight_decode"  # one decode per layer, the per-weight decode kernel everywhere
LAYER_DECODE_PATH = "fast_layer_decode"  # one decode per layer (group kernel): load_quantized's lever taken off
DECODE_AHEAD_PATH = "fast_decode_ahead"  # kernels.decode_ahead on the model instead of load_quantized's lever
BATCHED_DECODE_PATH = "fast_batched_decode"  # kernels.batched_decode on the model
BATCHED_AHEAD_PATH = "fast_batched_ahead"  # ... with kernels.batched_decode(model, ahead=True)
LEVERS = {DECODE_AHEAD_PATH: kernels.decode_ahead, BATCHED_DECODE_PATH: kernels.batched_decode,
          BATCHED_AHEAD_PATH: functools.partial(kernels.batched_decode, ahead=True),
          PER_WEIGHT_DECODE_PATH: None, LAYER_DECODE_PATH: None}  # path -> the handle it puts on the model
SETTING_PATHS = tuple(LEVERS)  # not small-M comparisons


def _lever_name(lever) -> str:
    if isinstance(lever, functools.partial):
        return f"{lever.func.__name__}({', '.join(f'{k}={v}' for k, v in lever.keywords.items())})"
    return lever.__name__


def default_lever():
    """The decode lever load_quantized attaches (kernels.BATCHED_DECODE / _AHEAD: QUA2SEDIMO_BATCHED_DECODE), or
    None. The benchmark takes it off the loaded model and puts it back per path (``fast`` and the small-M paths)."""
    if not kernels.BATCHED_DECODE:
        return None
    return functools.partial(kernels.batched_decode, ahead=kernels.BATCHED_DECODE_AHEAD)


def bench_paths(args) -> dict:
    """name -> (Triton fast path on, small-M setting): ``fast`` at the default setting (``--small_m_max``);
    beside it ``fast_no_small_m`` (0) and ``fast_small_m_measured`` (the measured dispatch), each unless it is the
    default's setting, ``fast_small_m`` at ``--small_m_compare`` rows when > 0, PER_WEIGHT_DECODE_PATH at the
    default's setting with ``--decode_compare``, LAYER_DECODE_PATH with ``--layer_decode_compare``, DECODE_AHEAD_PATH
    likewise with ``--decode_ahead_compare``,
    BATCHED_DECODE_PATH with ``--batched_decode_compare``, BATCHED_AHEAD_PATH with ``--batched_ahead_compare``;
    the eager reference."""
    paths = {"fast": (True, args.small_m_max)}
    if not args.no_small_m_compare:
        others = [("fast_no_small_m", 0), ("fast_small_m_measured", kernels.MEASURED)]
        if args.small_m_compare:
            others.append(("fast_small_m", args.small_m_compare))
        for name, setting in others:
            if setting != args.small_m_max:
                paths[name] = (True, setting)
    if args.decode_compare:
        paths[PER_WEIGHT_DECODE_PATH] = (True, args.small_m_max)
    if args.layer_decode_compare:
        paths[LAYER_DECODE_PATH] = (True, args.small_m_max)
    if args.decode_ahead_compare:
        paths[DECODE_AHEAD_PATH] = (True, args.small_m_max)
    if args.batched_decode_compare:
        paths[BATCHED_DECODE_PATH] = (True, args.small_m_max)
    if args.batched_ahead_compare:
        paths[BATCHED_AHEAD_PATH] = (True, args.small_m_max)
    paths["eager"] = (False, 0)
    return paths


def _path_with(paths: dict, setting) -> str | None:
    """The fast path measured at this small-M setting (``fast`` first; not the decode comparisons')."""
    return next((name for name, (fast, s) in paths.items() if fast and s == setting and name not in SETTING_PATHS),
                None)


def bench_packed(packed, inputs, row: dict, fp_out: torch.Tensor, simulated_out: torch.Tensor, args, device,
                 batch: int, disk_ratio: float, fp_model=None) -> dict:
    fp = row["fp16"]
    paths = bench_paths(args)
    with_name, without_name = _path_with(paths, kernels.MEASURED), _path_with(paths, 0)
    entry = {"disk_ratio_vs_fp16": disk_ratio, "small_m_path": with_name, "small_m_off_path": without_name}
    if with_name:  # warm the measured dispatch's table (timings on the GPU) before anything is timed or captured
        entry["small_m_decisions"] = kernels.tune_small_m(packed, **inputs)
        entry["small_m_layers"] = small_m_census(packed, inputs, kernels.MEASURED)
    fast_out = None
    for path, (fast, threshold) in paths.items():
        try:
            reps = args.eager_reps if path == "eager" else args.reps
            group_decode = kernels.group_decode_enabled() and path != PER_WEIGHT_DECODE_PATH
            lever = LEVERS[path] if path in LEVERS else default_lever() if fast else None
            ahead = lever(packed) if lever else contextlib.nullcontext()
            settings = use_packed_kernels(fast), small_m_threshold(threshold), kernels.use_group_decode(group_decode)
            with contextlib.ExitStack() as stack:
                for setting in settings + (ahead,):
                    stack.enter_context(setting)
                out, stats = measure_forward(packed, inputs, reps)
                if fast and device.type == "cuda" and batch <= 2:
                    stats["cuda_graph"] = _graph(packed, inputs, args.reps, out)
                    if "latency_ms_median" in stats["cuda_graph"] and "latency_ms_median" in fp.get("cuda_graph", {}):
                        stats["cuda_graph"]["latency_ratio_vs_fp16"] = (stats["cuda_graph"]["latency_ms_median"]
                                                                        / fp["cuda_graph"]["latency_ms_median"])
                if lever:
                    stats.update(lever=_lever_name(lever), ahead_decodes=ahead.ahead_decodes,
                                 recorded_calls=ahead.recorded_calls, scratch_extra_bytes=ahead.scratch_extra_bytes)
                if isinstance(ahead, kernels.BatchedDecode):
                    stats.update(batched_launches=ahead.batched_launches, batched_calls=ahead.batched_calls,
                                 batched_groups=len(ahead.groups or ()))
                if fast and fp_model is not None:  # eager latency beside FP16, forward by forward
                    stats["paired"] = paired_latency(fp_model, packed, inputs, args.reps, device)
            unpaired = stats["latency_ms_median"] / fp["latency_ms_median"]
            stats.update(max_abs_diff_vs_simulated=float((out.float().cpu() - simulated_out).abs().max()),
                         max_abs_diff_vs_fp16=float((out.float().cpu() - fp_out).abs().max()),
                         latency_ratio_vs_fp16=stats.get("paired", {}).get("ratio_median", unpaired),
                         latency_ratio_vs_fp16_unpaired=unpaired)
            if "peak_allocated" in stats:
                stats["peak_ratio_vs_fp16"] = stats["peak_allocated"] / fp["peak_allocated"]
            stats.pop("latency_ms_all")
            if path == "fast":
                fast_out = out.cpu()
            elif path in SETTING_PATHS and fast_out is not None:  # bit-identical by design: checked here
                stats["equals_fast_output"] = bool(torch.equal(out.cpu(), fast_out))
            entry[path] = stats
            del out
            free_memory()
        except Exception as e:  # an optional comparison that fails on the GPU: record it, keep the other paths
            if path not in SETTING_PATHS:
                raise
            entry[path] = {"error": f"{type(e).__name__}: {e}"[:2000]}
            traceback.print_exc()
            free_memory()
    # the headline keys are the fast path's (the default on CUDA); the other paths' stay under their names
    for key in ("latency_ratio_vs_fp16", "peak_ratio_vs_fp16", "max_abs_diff_vs_simulated"):
        if key in entry["fast"]:
            entry[key] = entry["fast"][key]
    if with_name in entry and without_name in entry:  # the small-M kernel's effect, side by side
        with_, without = entry[with_name], entry[without_name]
        for key in ("latency_ratio_vs_fp16", "max_abs_diff_vs_simulated"):
            entry[f"{key}_with_small_m"], entry[f"{key}_without_small_m"] = with_[key], without[key]
        _speedup(entry, "small_m_speedup", baseline=without, variant=with_)
    # each lever against one decode per layer (LAYER_DECODE_PATH where measured, else ``fast`` when it has no lever)
    layer = entry.get(LAYER_DECODE_PATH) if LAYER_DECODE_PATH in paths else None if default_lever() else entry["fast"]
    lever_paths = {"group_decode_speedup": PER_WEIGHT_DECODE_PATH, "decode_ahead_speedup": DECODE_AHEAD_PATH,
                   "batched_decode_speedup": BATCHED_DECODE_PATH, "batched_ahead_speedup": BATCHED_AHEAD_PATH,
                   "default_lever_speedup": "fast"}
    for name, path in lever_paths.items():
        other = entry.get(path, {})
        if layer is None or other is layer or "latency_ms_median" not in other or "latency_ms_median" not in layer:
            continue
        if path == PER_WEIGHT_DECODE_PATH:  # the group decode kernel's speedup: the per-weight path is its baseline
            _speedup(entry, name, baseline=other, variant=layer)
        else:
            _speedup(entry, name, baseline=layer, variant=other)
    return entry


def _speedup(entry: dict, name: str, baseline: dict, variant: dict) -> None:
    """entry[name]: baseline / variant median latency, and name_cuda_graph the same under CUDA graphs where both
    were timed there."""
    entry[name] = baseline["latency_ms_median"] / variant["latency_ms_median"]
    graphs = baseline.get("cuda_graph", {}), variant.get("cuda_graph", {})
    if all("latency_ms_median" in g for g in graphs):
        entry[f"{name}_cuda_graph"] = graphs[0]["latency_ms_median"] / graphs[1]["latency_ms_median"]


@torch.no_grad()
def small_m_census(model, inputs, max_rows: int) -> dict:
    """Which PackedLinear calls of one forward take the fused small-M kernel at ``max_rows`` (the rule of
    multiquant.kernels.takes_small_m_path, as it would apply on CUDA), and their share of the packed weights."""
    calls = {"calls": 0, "packed_linear_calls": 0, "weights": 0, "packed_linear_weights": 0, "rows": {}}

    def hook(module, args):
        x = args[0]
        numel = module.parts[0].numel if len(module.parts) == 1 else sum(p.numel for p in module.parts)
        calls["packed_linear_calls"] += 1
        calls["packed_linear_weights"] += numel
        if kernels.takes_small_m_path(module, x):
            calls["calls"] += 1
            calls["weights"] += numel
            rows = str(x.numel() // x.shape[-1])
            calls["rows"][rows] = calls["rows"].get(rows, 0) + 1

    handles = [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, PackedLinear)]
    try:
        with small_m_threshold(max_rows):
            denoiser_output(model, inputs)
    finally:
        for h in handles:
            h.remove()
    calls["weights_fraction"] = calls["weights"] / max(1, calls["packed_linear_weights"])
    return calls


# ------------------------------------------------------------------------------------- small-M micro-benchmark
# PixArt-alpha / DiT-XL/2's small-M layers (hidden size 1152): cross-attention K/V and the second timestep-MLP
# layer (1152 -> 1152; M = batch x 120 text tokens or M = batch), adaLN (1152 -> 6 x 1152, M = batch), caption
# projection (4096 -> 1152, M = batch x 120)
MICRO_SHAPES = {"kv_1152x1152": (1152, 1152), "adaln_1152x6912": (1152, 6912), "caption_4096x1152": (4096, 1152)}
MICRO_SHAPES_TINY = {"tiny_40x24": (40, 24)}
MICRO_ROWS = "1,2,16,64,128,240,512,2048"
MICRO_ROWS_TINY = "1,2,5"
MICRO_OPTIONS = "mse-4,kmeans_all-4,kmeans-3"  # the uniform configurations' options
GRAPH_CALLS = 20


def random_packed_linear(option: str, in_features: int, out_features: int, device, dtype, seed: int):
    """A PackedLinear with seeded random codes, tables and bias (latency does not depend on the values)."""
    part = random_packed_weight(option, (out_features, in_features), seed)
    g = torch.Generator().manual_seed(seed + 1)
    dense = torch.nn.Linear(in_features, out_features, device="meta")
    dense.bias = torch.nn.Parameter(torch.randn(out_features, generator=g) * 0.1, requires_grad=False)
    return packed_layer(dense, [part], dtype).to(device=device, dtype=dtype)


def _time_calls(fn, calls: int, cuda: bool) -> dict:
    """Microseconds per call: back-to-back calls timed on the host (launch overhead included) and, on CUDA,
    replays of a CUDA graph of GRAPH_CALLS calls (GPU time alone; median of 5 replays)."""
    for _ in range(3):
        fn()
    sync()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    sync()
    figures = {"host_us": 1e6 * (time.perf_counter() - start) / calls}
    if cuda:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(GRAPH_CALLS):
                fn()
        graph.replay()
        times = []
        for _ in range(5):
            _, seconds = timed(graph.replay)
            times.append(seconds)
        figures["graph_us"] = 1e6 * statistics.median(times) / GRAPH_CALLS
        del graph
    return figures


@torch.no_grad()
def small_m_microbench(args, device) -> dict:
    """The small-M layers alone: FP16 ``F.linear`` vs decode + cuBLAS vs the fused kernel, per shape, option
    and row count M (the fused kernel forced at every M to find where it stops paying), with the fused result's
    error against its stated bound (multiquant.kernels.linear_error_bound). On a machine without CUDA it runs
    tiny shapes through Triton's interpreter (checks the code, times nothing meaningful)."""
    cuda = device.type == "cuda"
    dtype = torch.float16 if cuda else torch.float32
    shapes = MICRO_SHAPES if cuda else MICRO_SHAPES_TINY
    rows_list = [int(r) for r in (args.micro_rows or (MICRO_ROWS if cuda else MICRO_ROWS_TINY)).split(",")]
    options = [o.strip() for o in args.micro_options.split(",") if o.strip()]
    result = {"dtype": str(dtype).replace("torch.", ""), "shapes": {k: list(v) for k, v in shapes.items()},
              "rows": rows_list, "options": options, "graph_calls": GRAPH_CALLS, "host_calls": args.micro_calls,
              "small_m_max_default": kernels.SMALL_M_MAX, "cases": [], "fused_errors": [],
              "fused_out_of_bound": []}
    interpret = contextlib.nullcontext() if cuda else _env("TRITON_INTERPRET", "1")
    with interpret, use_packed_kernels(True):
        for seed, ((sname, (in_f, out_f)), option) in enumerate((s, o) for s in shapes.items() for o in options):
            layer = random_packed_linear(option, in_f, out_f, device, dtype, seed)
            weight = layer.dequantize_weight(dtype)
            bias = layer.bias
            g = torch.Generator().manual_seed(1000 + seed)
            for rows in rows_list:
                x = torch.randn(rows, in_f, generator=g).to(device=device, dtype=dtype)
                case = {"shape": sname, "in_features": in_f, "out_features": out_f, "option": option, "rows": rows}
                tiling = kernels.linear_tiling(rows, out_f, in_f, kernels._processors(device))
                case["tiling"] = dataclasses.asdict(tiling)
                case["fp16"] = _time_calls(lambda: torch.nn.functional.linear(x, weight, bias), args.micro_calls, cuda)
                case["decode_cublas"] = _time_calls(
                    lambda: torch.nn.functional.linear(x, kernels.fast_weight(layer, dtype, x.device), bias),
                    args.micro_calls, cuda)
                try:
                    y = kernels.packed_linear(layer, x)
                    exact, bound = kernels.linear_error_bound(x, weight, bias, dtype)
                    ratio = float(((y.double() - exact).abs() / bound).max())
                    case["fused_max_err_over_bound"] = ratio
                    case["fused_within_bound"] = ratio <= 1.0
                    if not ratio <= 1.0:
                        result["fused_out_of_bound"].append(f"{sname} {option} M={rows}: err/bound {ratio:.3g}")
                    case["fused"] = _time_calls(lambda: kernels.packed_linear(layer, x), args.micro_calls, cuda)
                    if rows <= kernels.MEASURED_MAX_ROWS:  # what the measured dispatch decides for this layer
                        kernels.small_m_choice(layer, x)
                        case["measured_dispatch"] = kernels.small_m_entry(kernels.small_m_key(layer, x))
                except Exception as e:  # record it; the model runs then go without the fused kernel
                    case["fused_error"] = f"{type(e).__name__}: {e}"[:500]
                    result["fused_errors"].append(f"{sname} {option} M={rows}: {case['fused_error']}")
                    traceback.print_exc()
                for key in ("host_us", "graph_us"):
                    base = case["fp16"].get(key)
                    for variant in ("decode_cublas", "fused"):
                        if base and key in case.get(variant, {}):
                            case[f"{variant}_{key.split('_')[0]}_vs_fp16"] = case[variant][key] / base
                    if key in case.get("fused", {}):
                        case[f"fused_{key.split('_')[0]}_vs_decode_cublas"] = (case["fused"][key]
                                                                               / case["decode_cublas"][key])
                result["cases"].append(case)
                print(f"small-M {sname} {option} M={rows} us (graph / host): " + "  ".join(
                    f"{v} {_us(case.get(v, {}))}" for v in ("fp16", "decode_cublas", "fused"))
                    + f"  err/bound {case.get('fused_max_err_over_bound', case.get('fused_error'))}", flush=True)
            del layer, weight
            free_memory()
    result["direct_launch_engaged"] = kernels.DIRECT_LAUNCH[0]  # False: a launcher fell back to kernel[grid]
    result["crossover"] = _crossover(result["cases"], "graph" if cuda else "host")
    result["recommended_small_m_max"] = min((v for per in result["crossover"].values() for v in per.values()),
                                            default=0)
    return result


def _us(figures: dict) -> str:
    return "/".join(f"{figures[k]:.1f}" for k in ("graph_us", "host_us") if k in figures) or "-"


def print_summary(result: dict) -> None:
    """One line per shape and configuration (and the micro-benchmark's crossover), prefixed SUMMARY."""
    def fmt(value):
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    micro = result.get("small_m_microbench")
    if micro:
        print(f"SUMMARY small-M crossover (largest M where fused <= decode+cuBLAS on the GPU): {micro['crossover']} "
              f"recommended_small_m_max={micro.get('recommended_small_m_max')} errors={micro.get('fused_errors', [])[:2]} "
              f"out_of_bound={micro.get('fused_out_of_bound', [])[:4]}")  # merged entries of earlier versions lack some
    table = result.get("small_m_table", [])
    if table:
        print(f"SUMMARY small-M measured dispatch: {sum(e['fused'] for e in table)} of {len(table)} layer kinds "
              f"took the fused kernel: " + ", ".join(
                  f"{e['method']}-{e['bits']} {e['in_features']}->{e['out_features']} M<={e['rows_bucket']} "
                  f"{'fused' if e['fused'] else 'decode'} ({e['fused_us']:.1f} vs {e['decode_cublas_us']:.1f} us)"
                  for e in table))
    for row in result["shapes"]:
        earlier = "" if row.get("measured_in", result.get("date")) == result.get("date") else " [previous run]"
        for cname, e in row["configs"].items():
            with_ = e.get(e.get("small_m_path") or "", {})
            off = e.get("small_m_off_path") or ("fast_no_small_m" if e.get("small_m_path") == "fast" else "fast")
            without = e.get(off, {})
            graph, graph_without = with_.get("cuda_graph", {}), without.get("cuda_graph", {})
            print(f"SUMMARY{earlier} {row['model']} b{row['batch']} {row['resolution']}px {cname}: latency/fp16 "
                  f"{fmt(e.get('latency_ratio_vs_fp16'))} (with small-M "
                  f"{fmt(e.get('latency_ratio_vs_fp16_with_small_m'))}, without "
                  f"{fmt(e.get('latency_ratio_vs_fp16_without_small_m'))}, eager "
                  f"{fmt(e.get('eager', {}).get('latency_ratio_vs_fp16'))}) graph/fp16 with "
                  f"{fmt(graph.get('latency_ratio_vs_fp16'))} without {fmt(graph_without.get('latency_ratio_vs_fp16'))}"
                  f" small-M calls {e.get('small_m_layers', {}).get('calls')} peak {fmt(e.get('peak_ratio_vs_fp16'))}"
                  f" diff {fmt(e.get('max_abs_diff_vs_simulated'))} (with "
                  f"{fmt(e.get('max_abs_diff_vs_simulated_with_small_m'))})"
                  + (f" per-weight decode: graph/fp16 "
                     f"{fmt(e[PER_WEIGHT_DECODE_PATH].get('cuda_graph', {}).get('latency_ratio_vs_fp16'))} group "
                     f"speedup {fmt(e.get('group_decode_speedup_cuda_graph', e.get('group_decode_speedup')))}"
                     if PER_WEIGHT_DECODE_PATH in e else "")
                  + (f" decode ahead: graph/fp16 "
                     f"{fmt(e[DECODE_AHEAD_PATH].get('cuda_graph', {}).get('latency_ratio_vs_fp16'))} speedup "
                     f"{fmt(e.get('decode_ahead_speedup_cuda_graph', e.get('decode_ahead_speedup')))}"
                     if DECODE_AHEAD_PATH in e else "")
                  + (f" batched decode: graph/fp16 "
                     f"{fmt(e[BATCHED_DECODE_PATH].get('cuda_graph', {}).get('latency_ratio_vs_fp16'))} speedup "
                     f"{fmt(e.get('batched_decode_speedup_cuda_graph', e.get('batched_decode_speedup')))} launches "
                     f"{e[BATCHED_DECODE_PATH].get('batched_launches')} extra scratch "
                     f"{e[BATCHED_DECODE_PATH].get('scratch_extra_bytes')} B" if BATCHED_DECODE_PATH in e else "")
                  + (f" batched ahead: graph/fp16 "
                     f"{fmt(e[BATCHED_AHEAD_PATH].get('cuda_graph', {}).get('latency_ratio_vs_fp16'))} speedup "
                     f"{fmt(e.get('batched_ahead_speedup_cuda_graph', e.get('batched_ahead_speedup')))} ahead "
                     f"{e[BATCHED_AHEAD_PATH].get('ahead_decodes')} extra scratch "
                     f"{e[BATCHED_AHEAD_PATH].get('scratch_extra_bytes')} B" if BATCHED_AHEAD_PATH in e else ""))
    for key, t in result.get("targets", {}).items():
        print(f"SUMMARY target {key}: worst {fmt(t.get('worst'))} at {t.get('worst_at')} met {t.get('met_everywhere')}")
    for key, err in result.get("errors", {}).items():
        print(f"SUMMARY error {key}: {err[:300]}")


def _crossover(cases: list, key: str) -> dict:
    """Per shape and option: the largest M of the sweep up to which the fused kernel is at least as fast as
    decode + cuBLAS at every measured M (``key``: graph = GPU time, host = with launch overhead); 0: never."""
    out, stopped = {}, set()
    for case in sorted(cases, key=lambda c: c["rows"]):
        pair = (case["shape"], case["option"])
        per = out.setdefault(case["shape"], {})
        per.setdefault(case["option"], 0)
        if pair in stopped:
            continue
        ratio = case.get(f"fused_{key}_vs_decode_cublas")
        if ratio is not None and ratio <= 1.0:
            per[case["option"]] = case["rows"]
        else:
            stopped.add(pair)
    return out


@contextlib.contextmanager
def _env(name: str, value: str):
    previous = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous


# ------------------------------------------------------------------------------------- pipeline memory
def _t5_xxl(device, dtype, tiny: bool):
    """PixArt's text encoder: T5 v1.1 XXL's architecture (4.8B parameters) with random weights, built on the
    meta device and filled on ``device`` (no CPU init of billions of weights)."""
    from transformers import T5Config, T5EncoderModel

    if tiny:
        cfg = T5Config(d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=2, vocab_size=100,
                       feed_forward_proj="gated-gelu", is_encoder_decoder=False)
    else:
        cfg = T5Config(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, vocab_size=32128,
                       feed_forward_proj="gated-gelu", is_encoder_decoder=False, tie_word_embeddings=False)
    with torch.device("meta"):
        model = T5EncoderModel(cfg)
    model = model.to_empty(device=device).to(dtype)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02, generator=g)
    return model.eval(), cfg


def _vae(device, dtype, tiny: bool):
    """The latent diffusion VAE (the SD / PixArt / DiT AutoencoderKL architecture), random weights."""
    if tiny:
        from multiquant.adapters.diffusers.loading import tiny_vae

        return tiny_vae().to(device=device, dtype=dtype)
    return full_size_vae(device, dtype)


@torch.no_grad()
def _stage_peak(fn) -> dict:
    """Bytes allocated before ``fn`` and the extra peak over one call (stats reset before it)."""
    free_memory()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    sync()
    return {"allocated_before": before, "extra_peak": torch.cuda.max_memory_allocated() - before}


def pipeline_memory(family, model_name: str, rows: list, info: dict, device, dtype, tiny: bool, args) -> list:
    """Whole-pipeline peak GPU memory, FP16 denoiser vs each packed configuration: measured resident bytes and
    one-call peaks of the text encoder (text families), the denoiser (from the shape rows) and the VAE decoder,
    combined as (a) everything resident on the GPU, peak = sum of residents + the largest stage peak, and
    (b) model offload (each component moved to the GPU for its stage), peak = the largest resident + stage peak."""
    if device.type != "cuda":
        return []
    encoder = None
    text_stage = {}
    if family.conditioning == "text":
        free_memory()
        before = torch.cuda.memory_allocated()
        encoder, cfg = _t5_xxl(device, dtype, tiny)
        text_stage["resident"] = torch.cuda.memory_allocated() - before
        text_stage["parameters"] = sum(p.numel() for p in encoder.parameters())
    vae_before = torch.cuda.memory_allocated()
    vae = _vae(device, dtype, tiny)
    vae_resident = torch.cuda.memory_allocated() - vae_before
    out = []
    for row in rows:
        batch = row["batch"]
        latent = row["input_shapes"].get("hidden_states", row["input_shapes"].get("sample"))
        stages = {}
        if encoder is not None:
            ids = torch.randint(0, cfg.vocab_size, (batch, args.tokens), device=device)
            stages["text_encoder"] = {"resident": text_stage["resident"],
                                      "extra_peak": _stage_peak(lambda: encoder(input_ids=ids))["extra_peak"]}
        z = torch.randn(batch, 4, latent[2], latent[3], device=device, dtype=dtype)
        stages["vae_decode"] = {"resident": vae_resident,
                                "extra_peak": _stage_peak(lambda: vae.decode(z / 0.18215))["extra_peak"]}
        entry = {"model": model_name, "batch": batch, "resolution": row["resolution"], "stages": stages,
                 "text_encoder_parameters": text_stage.get("parameters"), "denoisers": {}}
        variants = {"fp16": row["fp16"]} | {c: v["fast"] for c, v in row["configs"].items()}
        for vname, stats in variants.items():
            den = {"resident": stats["allocated_before_forward"], "extra_peak": stats["forward_extra_peak"]}
            parts = dict(stages, denoiser=den)
            all_resident = sum(p["resident"] for p in parts.values()) + max(p["extra_peak"] for p in parts.values())
            offload = max(p["resident"] + p["extra_peak"] for p in parts.values())
            entry["denoisers"][vname] = {"denoiser_peak": stats["peak_allocated"],
                                         "pipeline_peak_all_resident": all_resident,
                                         "pipeline_peak_model_offload": offload}
        fp = entry["denoisers"]["fp16"]
        for vname, fig in entry["denoisers"].items():
            fig["pipeline_peak_ratio_vs_fp16"] = fig["pipeline_peak_all_resident"] / fp["pipeline_peak_all_resident"]
            fig["denoiser_peak_ratio_vs_fp16"] = fig["denoiser_peak"] / fp["denoiser_peak"]
        out.append(entry)
        free_memory()
    del encoder, vae
    free_memory()
    return out


def target_summary(result: dict) -> dict:
    """The issue's targets, read off the shape rows: latency ratio <= 1.05, denoiser peak <= 0.30x FP16,
    outputs identical to the simulated configuration. Exactness is the decode + cuBLAS path's (bit-exact by
    construction); the fused small-M kernel is within its stated per-layer bound instead, so its whole-model
    difference is reported beside the quantization error it sits in."""
    lat, lat_with, lat_without, peak, diff, small_m_diff = [], [], [], [], [], []
    lat_graph, lat_graph_best = [], []
    for row in result["shapes"]:
        for cname, entry in row["configs"].items():
            where = f"{row['model']} b{row['batch']} {row['resolution']}px {cname}"
            lat.append((entry.get("latency_ratio_vs_fp16", float("nan")), where))
            if "latency_ratio_vs_fp16_with_small_m" in entry:
                lat_with.append((entry["latency_ratio_vs_fp16_with_small_m"], where))
                lat_without.append((entry["latency_ratio_vs_fp16_without_small_m"], where))
            if "peak_ratio_vs_fp16" in entry:
                peak.append((entry["peak_ratio_vs_fp16"], where))
            graph = {path: fig["cuda_graph"]["latency_ratio_vs_fp16"] for path, fig in entry.items()
                     if isinstance(fig, dict) and "latency_ratio_vs_fp16" in (fig.get("cuda_graph") or {})}
            if "fast" in graph:  # GPU time without the host's launch noise (batch 2 is launch-bound in eager)
                lat_graph.append((graph["fast"], where))
                best = min(graph, key=graph.get)
                lat_graph_best.append((graph[best], f"{where} ({best})"))
            with_name = entry.get("small_m_path")
            if with_name in entry and entry.get("small_m_layers", {}).get("calls"):
                fused = entry[with_name]
                small_m_diff.append((fused["max_abs_diff_vs_simulated"], where,
                                     fused["max_abs_diff_vs_simulated"] / max(fused["max_abs_diff_vs_fp16"], 1e-30)))
                if with_name == "fast":  # the headline path took the fused kernel: exactness from the other one
                    if "max_abs_diff_vs_simulated_without_small_m" in entry:  # (not measured: no exactness figure)
                        diff.append((entry["max_abs_diff_vs_simulated_without_small_m"], where))
                    continue
            diff.append((entry["max_abs_diff_vs_simulated"], where))
    summary = {}
    for key, values, limit in (("latency_ratio_vs_fp16", lat, 1.05),
                               ("latency_ratio_vs_fp16_with_small_m", lat_with, 1.05),
                               ("latency_ratio_vs_fp16_without_small_m", lat_without, 1.05),
                               ("latency_ratio_vs_fp16_cuda_graph", lat_graph, 1.05),
                               ("latency_ratio_vs_fp16_cuda_graph_best_path", lat_graph_best, 1.05),
                               ("peak_ratio_vs_fp16", peak, 0.30), ("max_abs_diff_vs_simulated", diff, 0.0)):
        if values:
            worst = max(values)
            summary[key] = {"target": limit, "worst": worst[0], "worst_at": worst[1],
                            "met_everywhere": all(v <= limit for v, _ in values),
                            "missed_at": [w for v, w in values if not v <= limit]}
    if small_m_diff:
        worst = max(small_m_diff)
        summary["max_abs_diff_vs_simulated_with_small_m"] = {
            "target": "per layer: within multiquant.kernels.packed_linear's stated bound (tested); not bit-exact",
            "worst": worst[0], "worst_at": worst[1],
            "worst_relative_to_quantization_error": max(r for _, _, r in small_m_diff)}
    return summary


if __name__ == "__main__":
    main()
