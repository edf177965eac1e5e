"""Benchmark the multiquantizer build against the reference's algorithm, in one run.

    python benchmarks/multiquantizer.py [--models pixart_alpha,sdxl,hunyuan] [--out DIR]

Full-size architecture with random fp16 weights of the real shapes. The reference style (scikit-learn
K-Means per channel with 100 iterations and a per-element Python replacement loop, K-Means-A with
scikit-learn on the whole tensor, the per-channel 10-candidate clipping loop) is timed on a few channels of
every distinct layer shape and extrapolated within each shape (channels, elements). Every family listed is
built in one go on one device, with its peak GPU memory. For the reference family the same quantizers are
also driven one layer and option at a time (the driver before batching), side by side, with the largest
relative difference of the option-table errors between the two builds. ``--repeats N`` builds every family
N times in the process (the first stays ``build_seconds``: what a fresh process gets) and records every time;
``--host_copies both`` alternates those rebuilds between page-locked staging and plain ``.cpu()`` copies.
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
from benchmarks.common import environment, sync, timed, write_result  # noqa: E402
from multiquant.build import DEFAULT_CHUNK_ELEMENTS, plan_chunks  # noqa: E402
from multiquant.checkpoint import MultiQuantizer  # noqa: E402
from multiquant.config import ConfigApplier, sample_random_config  # noqa: E402
from multiquant.families import get_family  # noqa: E402
from multiquant.layers import fp_bytes, quantizable_layers  # noqa: E402
from multiquant.utils import default_device  # noqa: E402


def reference_uaq_channel(row: torch.Tensor, bits: int) -> float:
    """One channel, 10 candidates, as the reference loops (tensor ops on the device, one channel at a time)."""
    best, levels = None, 2 ** bits - 1
    for i in range(10):
        a = 1.0 - 0.1 * i
        lo, hi = row.min() * a, row.max() * a
        delta = (hi - lo) / levels
        z = torch.round(-lo / delta)
        q = torch.clamp(torch.round(row / delta) + z, 0, levels)
        score = ((q - z) * delta - row).abs().pow(2.4).mean()
        if best is None or score < best[0]:
            best = (score, delta, z)
    return float(best[1])


def reference_kmeans(values: np.ndarray, k: int) -> np.ndarray:
    from sklearn.cluster import KMeans

    km = KMeans(n_clusters=min(k, len(values)), max_iter=100).fit(values.reshape(-1, 1))
    centres, labels = km.cluster_centers_[:, 0], km.labels_
    out = np.empty_like(values)
    for i in range(len(values)):  # the reference replaces every element in a Python loop
        out[i] = centres[labels[i]]
    return out


def reference_style_seconds(model, layers, sample_channels: int, bits=(4, 3), flat_cap: int = 200_000) -> dict:
    """Time the reference's work on every distinct layer shape and extrapolate within each shape.

    Per-channel work (UAQ grid, scikit-learn K-Means-C with the per-element loop) is timed on
    ``sample_channels`` channels of one layer of each shape and scaled by that shape's channel count;
    K-Means-A on (at most ``flat_cap`` values of) the whole tensor, scaled by that shape's element count.
    Per-channel cost is largely fixed overhead, so scaling per element from one shape would be unfair."""
    by_shape: dict[tuple[int, int], list] = {}
    for ref in layers:
        if not ref.tied_to:
            by_shape.setdefault((ref.channels, ref.numel // ref.channels), []).append(ref)
    est = {"uaq": 0.0, "kmeans_c": 0.0, "kmeans_a": 0.0}
    shapes = []
    for (channels, row), refs in sorted(by_shape.items()):
        w = refs[0].weight(model).detach().reshape(channels, -1)
        rows = w[:sample_channels]
        cost = {"uaq": 0.0, "kmeans_c": 0.0, "kmeans_a": 0.0}
        for b in bits:
            t = time.perf_counter()
            for r in rows:
                reference_uaq_channel(r.float(), b)
            sync()
            cost["uaq"] += (time.perf_counter() - t) / len(rows) * channels
            host = rows.float().cpu().numpy().astype(np.float64)
            t = time.perf_counter()
            for r in host:
                reference_kmeans(r, 2 ** b)
            cost["kmeans_c"] += (time.perf_counter() - t) / len(rows) * channels
            flat = w.float().cpu().numpy().astype(np.float64).reshape(-1)[:flat_cap]
            t = time.perf_counter()
            reference_kmeans(flat, 2 ** b)
            cost["kmeans_a"] += (time.perf_counter() - t) / len(flat) * w.numel()
        for name in est:
            est[name] += cost[name] * len(refs)
        shapes.append({"channels": channels, "row": row, "layers": len(refs), "sampled": refs[0].key,
                       "seconds_per_layer": cost})
    est["total"] = sum(est.values())
    est["shapes"] = shapes
    est["sampled_channels_per_shape"] = sample_channels
    return est


def layer_by_layer_seconds(model, layers, family, options: list[str], seed: int = 0, iters: int = 100) -> tuple[float, dict]:
    """The build as one quantizer call per layer and option (the driver before batching: the same quantizer
    functions, errors and packed codes fetched per layer), timed side by side; returns its seconds and
    table errors (to compare with the batched build's)."""
    from multiquant.options import Option
    from multiquant.packing import pack_codes
    from multiquant.quantizers import dequantize, lp_error, quantize

    errors = {}
    sync()
    start = time.perf_counter()
    for ref in layers:
        if ref.tied_to:
            continue
        w = ref.weight(model).detach().reshape(ref.channels, -1).float()
        for option in options:
            parsed = Option.parse(option)
            codes, params = quantize(w, parsed.method, parsed.bits, iters=iters, seed=seed)
            params = {name: v.to(torch.int16 if name == "zero" else torch.float32) for name, v in params.items()}
            errors[(ref.key, option)] = lp_error(w, dequantize(parsed.method, codes, params).to(family.dtype))
            pack_codes(codes, parsed.bits).cpu()
            for value in params.values():
                value.cpu()
    sync()
    return time.perf_counter() - start, errors


def chunk_sweep(model, family, mq, chunk_sizes: list[int], on_gpu: bool) -> dict:
    """Rebuild at other chunk sizes (warm): seconds, peak GPU bytes, and whether codes and parameters are those
    of ``mq`` (errors may differ in the last bits: per-layer sums over other batch shapes)."""
    out = {}
    for chunk in chunk_sizes:
        if on_gpu:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        other, seconds = timed(MultiQuantizer.build, model, family, show_progress=False, chunk_elements=chunk)
        rel = max(abs(other.table[k][o][3] - v[3]) / max(abs(v[3]), 1e-300)
                  for k, row in mq.table.items() for o, v in row.items())
        out[str(chunk)] = {"build_seconds": seconds, "peak_gpu_bytes": torch.cuda.max_memory_allocated() if on_gpu else None,
                           "same_tensors": other.tensor_digests() == mq.tensor_digests(), "error_max_rel_diff": rel}
        del other
    return out


def repeat_builds(model, family, repeats: int, host_copies: str, first_seconds: float, digests: dict) -> dict:
    """``repeats - 1`` more builds in this process after the first (``first_seconds``, what a fresh process
    gets), each timed: the spread of the build time in one run. ``host_copies`` 'both': as many more builds with
    plain ``.cpu()`` copies (``pinned_host=False``), alternating with the default path round by round (which
    goes first swaps every round), side by side. ``same_tensors``: every rebuild holds the first build's
    tensors (``digests``)."""
    default = host_copies != "plain"
    times = {default: [first_seconds], not default: []}
    modes = [default] + ([not default] if host_copies == "both" else [])
    same = True
    for r in range(1, repeats):
        for pinned in (modes if r % 2 else modes[::-1]):
            other, seconds = timed(MultiQuantizer.build, model, family, show_progress=False, pinned_host=pinned)
            times[pinned].append(seconds)
            same = same and other.tensor_digests() == digests
            del other
    out = {"host_copies": host_copies, "build_seconds_repeats": times[default],
           "build_seconds_median": float(np.median(times[default])), "repeats_same_tensors": same}
    if host_copies == "both":
        out["build_seconds_plain_repeats"] = times[False]
        out["build_seconds_plain_median"] = float(np.median(times[False])) if times[False] else None
    return out


def build_family(name: str, device: str, apply_trials: int, size: str, compare_layer_by_layer: bool,
                 sweep: list[int] = (), profile: bool = False, repeats: int = 1,
                 host_copies: str = "pinned") -> tuple[dict, object, list]:
    """Build one family's multiquantizer: time, memory, checkpoint, option-table objective."""
    family = get_family(name)
    dtype = family.dtype if device == "cuda" else torch.float32
    on_gpu = device == "cuda"
    model, model_s = timed(family.build, size, device=device, dtype=dtype)
    layers = quantizable_layers(model, family)
    if on_gpu:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model_bytes = torch.cuda.memory_allocated() if on_gpu else None
    mq, build_s = timed(MultiQuantizer.build, model, family, show_progress=False, pinned_host=host_copies != "plain")
    peak_gpu = torch.cuda.max_memory_allocated() if on_gpu else None
    canonical = [r for r in layers if not r.tied_to]
    shapes = [(r.channels, r.numel // r.channels) for r in canonical]
    entry = {"architecture": "full-size" if size == "full" else size, "dtype": str(dtype),
             "num_layers": len(layers), "parameters": sum(p.numel() for p in model.parameters()),
             "fp16_bytes": fp_bytes(layers, family.fp_prec), "model_build_seconds": model_s, "build_seconds": build_s,
             "model_gpu_bytes": model_bytes, "peak_gpu_bytes": peak_gpu,
             "host_copies_path": mq.manifest["host_copies"], "pinned_host_used": mq.manifest["host_copies"] == "pinned staging",
             "chunk_elements": DEFAULT_CHUNK_ELEMENTS, "chunks": len(plan_chunks(shapes, DEFAULT_CHUNK_ELEMENTS)),
             "distinct_shapes": len(set(shapes)),
             "objective_by_option": {o: sum(mq.table[r.key][o][3] for r in canonical) for o in mq.options}}
    entry.update(repeat_builds(model, family, repeats, host_copies, build_s, mq.tensor_digests() if repeats > 1 else {}))
    if compare_layer_by_layer:
        entry["layer_by_layer_seconds"], errors = layer_by_layer_seconds(model, layers, family, mq.options)
        entry["batching_speedup"] = entry["layer_by_layer_seconds"] / build_s
        rel = [abs(mq.table[key][o][3] - e) / max(abs(e), 1e-300) for (key, o), e in errors.items()]
        entry["layer_by_layer_error_max_rel_diff"] = max(rel)
        entry["layer_by_layer_objective_by_option"] = {
            o: sum(e for (_, opt), e in errors.items() if opt == o) for o in mq.options}
    if sweep:
        entry["chunk_sweep"] = chunk_sweep(model, family, mq, sweep, on_gpu)
    if profile:
        entry["warm_build_seconds"] = timed(MultiQuantizer.build, model, family, show_progress=False)[1]
        entry["profile"] = build_profile(model, family)
    with tempfile.TemporaryDirectory() as tmp:
        path, entry["save_seconds"] = timed(mq.save_pretrained, tmp)
        entry["checkpoint_bytes"] = path.stat().st_size
        entry["checkpoint_ratio"] = entry["checkpoint_bytes"] / entry["fp16_bytes"]
        loaded, entry["load_seconds"] = timed(MultiQuantizer.from_pretrained, path, device=device)
    applier = ConfigApplier(model, loaded)
    apply_times = [timed(applier.apply, sample_random_config(layers, seed=0, index=i))[1] for i in range(apply_trials)]
    entry["apply_config_seconds"], entry["apply_config_seconds_all"] = max(apply_times), apply_times
    del applier, loaded, mq
    return entry, model, layers


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="pixart_alpha,sdxl,hunyuan",
                    help="families to build, comma-separated, each in one go on one device")
    ap.add_argument("--reference_model", default="pixart_alpha",
                    help="the family also timed against the reference emulation, layer by layer and at other chunk "
                         "sizes (default pixart_alpha; skipped when it is not among --models)")
    ap.add_argument("--size", choices=("full", "tiny"), default=None,
                    help="architecture size (default: full on a GPU, tiny on the CPU)")
    ap.add_argument("--chunk_sweep", default=f"{1 << 26},{1 << 27},{1 << 28}",
                    help="the reference family is rebuilt (warm) at these chunk sizes, comma-separated ('' skips)")
    ap.add_argument("--sample_channels", type=int, default=8, help="channels per layer shape in the emulation")
    ap.add_argument("--apply_trials", type=int, default=5)
    ap.add_argument("--profile", action="store_true", help="the first family listed is also built once more (warm, "
                                                           "timed) and once under torch.profiler (device time per op)")
    ap.add_argument("--repeats", type=int, default=1,
                    help="builds of each family in this process: the first (build_seconds, what a fresh process "
                         "gets) and repeats-1 more, every time recorded (build_seconds_repeats) with the median")
    ap.add_argument("--host_copies", choices=("pinned", "plain", "both"), default="pinned",
                    help="how results reach the host: pinned (default: page-locked staging from a GPU), plain "
                         "(.cpu() per tensor), or both (the repeats alternate the two, side by side)")
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error(f"--repeats must be at least 1, got {args.repeats}")
    device = str(default_device())
    size = args.size or ("full" if device == "cuda" else "tiny")
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    reference = args.reference_model if args.reference_model in names else None
    sweep = [int(c) for c in args.chunk_sweep.split(",") if c.strip()]
    families, ref = {}, None
    for name in names:
        entry, model, layers = build_family(name, device, args.apply_trials, size, compare_layer_by_layer=name == reference,
                                            sweep=sweep if name == reference else [],
                                            profile=args.profile and name == names[0], repeats=args.repeats,
                                            host_copies=args.host_copies)
        if name == reference:
            ref = reference_style_seconds(model, layers, args.sample_channels)
            entry["reference_style_seconds"], entry["speedup"] = ref["total"], ref["total"] / entry["build_seconds"]
        families[name] = entry
        print(f"{name}: build {entry['build_seconds']:.2f} s, peak GPU {entry['peak_gpu_bytes']}", flush=True)
        del model, layers
        if device == "cuda":
            torch.cuda.empty_cache()
        # written after every family: a run stopped by its time limit keeps the families it finished
        write_result("multiquantizer", summarize(names, families, ref, reference), args.out)


def build_profile(model, family, top: int = 25) -> dict:
    """Where one more (warm) build spends its time: the device's busy time (kernels and copies) against the wall,
    and the operators and kernels with the most device time (self time, summed over calls), from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    sync()
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        MultiQuantizer.build(model, family, show_progress=False)
        sync()
    wall = time.perf_counter() - start
    events = prof.key_averages()
    device_us = lambda e: getattr(e, "self_device_time_total", 0) or 0  # noqa: E731
    on_device = [e for e in events if str(getattr(e, "device_type", "")).endswith("CUDA")]  # kernels and copies
    busy = sum(device_us(e) for e in on_device) / 1e6  # the operators' rows count the same kernels again
    rows = sorted(events, key=device_us, reverse=True)[:top]
    syncs = sum(e.count for e in events if e.key in ("cudaStreamSynchronize", "cudaDeviceSynchronize",
                                                      "cudaMemcpyAsync", "cudaMemcpy"))
    return {"wall_seconds_under_profiler": wall, "device_busy_seconds": busy, "host_syncs_and_copies": syncs,
            "top_device_ops": [{"op": e.key, "calls": e.count, "device_seconds": device_us(e) / 1e6,
                                "host_seconds": e.self_cpu_time_total / 1e6} for e in rows]}


def summarize(names: list[str], families: dict, ref: dict | None, reference: str | None) -> dict:
    """Top-level keys are PixArt-alpha's (the target's family) when built, else the first family's."""
    main_name = "pixart_alpha" if "pixart_alpha" in families else next(iter(families))
    first = families[main_name]
    return {
        **environment(), "model": main_name, "architecture": first["architecture"],
        "weights": "random (diffusers init), real shapes",
        **{k: first[k] for k in ("num_layers", "fp16_bytes", "build_seconds", "checkpoint_bytes", "checkpoint_ratio",
                                 "load_seconds", "apply_config_seconds", "apply_config_seconds_all", "peak_gpu_bytes",
                                 "build_seconds_repeats", "build_seconds_median", "host_copies", "host_copies_path",
                                 "pinned_host_used")},
        **{k: first[k] for k in ("build_seconds_plain_repeats", "build_seconds_plain_median") if k in first},
        "reference_model": reference,
        "reference_style_seconds": ref["total"] if ref else None, "reference_style_breakdown": ref,
        "speedup": families[reference]["speedup"] if ref else None,
        "build_seconds_by_family": {n: e["build_seconds"] for n, e in families.items()},
        "peak_gpu_bytes_by_family": {n: e["peak_gpu_bytes"] for n, e in families.items()},
        "sdxl_build_seconds": families.get("sdxl", {}).get("build_seconds"),
        "sdxl_peak_gpu_bytes": families.get("sdxl", {}).get("peak_gpu_bytes"),
        "families": families, "not_built": [n for n in names if n not in families],
        "targets": {"build_seconds": "<= 6 (pixart_alpha, one H200)", "sdxl_build_seconds": "full size, one GPU, one go",
                    "checkpoint_ratio": "<= 1.6", "apply_config_seconds": "< 1"},
    }


if __name__ == "__main__":
    main()
