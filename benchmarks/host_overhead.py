"""Host (Python + launch) time of one packed layer call beside the FP16 layer it replaces: what an eager forward at a
small batch pays, where the GPU waits for the host (PixArt-alpha at batch 2: benchmarks/results/export.json).

    python benchmarks/host_overhead.py             # GPU
    python benchmarks/host_overhead.py --smoke     # CPU: checks the script (the eager CPU path; no kernels)

A stack of ``--layers`` Linear layers (1152 x 1152, bias) runs on ``--rows`` input rows, FP16 dense and packed per
option, ``--reps`` forwards each; ``host_us`` = wall time of the forwards' Python side per layer call, the GPU
synchronized only after the loop (at these rows the GPU finishes a layer faster than the host queues it, so the
wall time is the host's), the minimum over ``--trials`` trials interleaved across the stacks (host time drifts:
single trials of one stack varied by 30% between calls). ``profile``: the top functions by own time of a cProfile'd packed forward.
``--model NAME`` (e.g. pixart_alpha) adds ``model``: the family's full-size denoiser (random fp16 weights) eager at
``--model_batch``, FP16 beside the same model with every ``nn.Linear`` packed (``--model_option``, random codes)
and load_quantized's default decode lever: host and wall time per forward and the top functions of a cProfile'd
packed forward, so that a whole forward's host cost can be set beside the stack's per-call figures.
Writes benchmarks/results/host_overhead.json.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import environment, random_packed_weight, sync, write_result  # noqa: E402
from multiquant import kernels  # noqa: E402
from multiquant.packed import PackedLinear, packed_layer  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--options", default="mse-4,kmeans-3")
    ap.add_argument("--layers", type=int, default=100)
    ap.add_argument("--features", type=int, default=1152)
    ap.add_argument("--rows", default="64,2", help="input rows per run (64: decode + cuBLAS; 2: the small-M path)")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--trials", type=int, default=7, help="interleaved trials per stack; host_us is their minimum")
    ap.add_argument("--model", default=None, help="also profile this family's full-size denoiser (e.g. pixart_alpha)")
    ap.add_argument("--model_batch", type=int, default=2)
    ap.add_argument("--model_option", default="mse-4")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", default=None)
    return ap.parse_args(argv)


def host_us(stack, x, reps: int) -> float:
    with torch.no_grad():
        for _ in range(3):
            stack(x)
        sync()
        start = time.perf_counter()
        for _ in range(reps):
            stack(x)
        seconds = time.perf_counter() - start
        sync()
    return 1e6 * seconds / (reps * len(stack))


def profile_top(stack, x, lines: int = 25) -> list[str]:
    with torch.no_grad():
        stack(x)
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(5):
            stack(x)
        profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(lines)
    return [line for line in text.getvalue().splitlines() if line.strip()]


def packed_copy(model: torch.nn.Module, option: str, dtype, device) -> torch.nn.Module:
    """``model`` with every stock ``nn.Linear`` replaced by a packed layer of seeded random ``option`` codes."""
    for seed, (name, dense) in enumerate([(n, m) for n, m in model.named_modules() if type(m) is torch.nn.Linear]):
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        layer = packed_layer(torch.nn.Linear(dense.in_features, dense.out_features, bias=False, device="meta"),
                             [random_packed_weight(option, tuple(dense.weight.shape), seed=seed, device=device)], dtype)
        layer = layer.to(device)
        layer.bias = dense.bias
        setattr(parent, attr, layer)
    return model


def forward_inputs_for(family, model, batch: int, device="cpu") -> dict:
    """The export benchmark's inputs (PixArt: 120 text tokens) at the family's resolution, on ``device``."""
    from benchmarks.export import forward_inputs

    return {k: v.to(device) if torch.is_tensor(v) else v
            for k, v in forward_inputs(family, model, batch, 120, None).items()}


def model_profile(args, device, dtype) -> dict:
    """Host and wall time of a whole eager forward, FP16 beside packed (see the module docstring)."""
    from multiquant.families import get_family

    family = get_family(args.model)
    size = "tiny" if args.smoke else "full"
    fp16 = family.build(size, device=device, dtype=dtype, seed=0).eval()
    inputs = forward_inputs_for(family, fp16, args.model_batch, device)
    packed = packed_copy(family.build(size, device=device, dtype=dtype, seed=0).eval(), args.model_option, dtype,
                         device)
    lever = kernels.batched_decode(packed, ahead=kernels.BATCHED_DECODE_AHEAD) if kernels.BATCHED_DECODE else None

    def times(model, reps: int) -> tuple[float, float]:
        sync()
        start = time.perf_counter()
        for _ in range(reps):
            model(**inputs)
        host = time.perf_counter() - start
        sync()
        return 1e3 * host / reps, 1e3 * (time.perf_counter() - start) / reps

    reps = 2 if args.smoke else 10
    samples = {"fp16": [], "packed": []}
    with torch.no_grad():
        for model in (fp16, packed):
            for _ in range(3):
                model(**inputs)  # warm: plans, the recorded order, the batched groups
        for _ in range(args.trials):  # interleaved, as for the stacks
            for name, model in (("fp16", fp16), ("packed", packed)):
                samples[name].append(times(model, reps))
        profiler = cProfile.Profile()
        profiler.enable()
        packed(**inputs)
        profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(30)
    entry = {"model": args.model, "size": size, "batch": args.model_batch, "option": args.model_option,
             "lever": None if lever is None else type(lever).__name__, "reps": reps,
             "packed_linear_layers": sum(isinstance(m, PackedLinear) for m in packed.modules())}
    for name, values in samples.items():
        best = min(values)  # the trial with the least host time
        entry[name] = {"host_ms": best[0], "wall_ms": best[1], "all": values}
    entry["extra_host_us_per_layer"] = 1e3 * (entry["packed"]["host_ms"] - entry["fp16"]["host_ms"]) / max(
        entry["packed_linear_layers"], 1)
    entry["profile"] = [line for line in text.getvalue().splitlines() if line.strip()]
    print(f"{args.model} b{args.model_batch}: host {entry['fp16']['host_ms']:.2f} -> {entry['packed']['host_ms']:.2f}"
          f" ms, wall {entry['fp16']['wall_ms']:.2f} -> {entry['packed']['wall_ms']:.2f} ms per forward "
          f"({entry['extra_host_us_per_layer']:.1f} us more host time per packed linear)", flush=True)
    return entry


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    f = args.features
    layers = 4 if args.smoke else args.layers
    stacks = {"fp16": torch.nn.Sequential(*[torch.nn.Linear(f, f, device=device, dtype=dtype) for _ in range(layers)])}
    for option in args.options.split(","):
        stacks[option] = torch.nn.Sequential(*[
            packed_layer(torch.nn.Linear(f, f, bias=False, device="meta"),
                         [random_packed_weight(option, (f, f), seed=i, device=device)], dtype).to(device)
            for i in range(layers)])
        for layer, ref in zip(stacks[option], stacks["fp16"]):
            layer.bias = ref.bias
    result = environment() | {"layers": layers, "features": f, "reps": args.reps, "trials": args.trials,
                              "runs": []}
    for rows in [int(r) for r in args.rows.split(",")]:
        x = torch.randn(rows, f, device=device, dtype=dtype)
        samples = {name: [] for name in stacks}
        for _ in range(args.trials):  # interleaved: the host's drift hits every stack alike
            for name, stack in stacks.items():
                samples[name].append(host_us(stack, x, args.reps))
        run = {"rows": rows, "fp16_host_us": min(samples["fp16"]), "fp16_host_us_all": samples["fp16"],
               "options": {}}
        for option in stacks:
            if option == "fp16":
                continue
            entry = {"host_us": min(samples[option]), "host_us_all": samples[option]}
            entry["extra_host_us"] = entry["host_us"] - run["fp16_host_us"]
            entry["profile"] = profile_top(stacks[option], x)
            run["options"][option] = entry
            print(f"rows {rows} {option}: packed {entry['host_us']:.1f} us / layer call, FP16 "
                  f"{run['fp16_host_us']:.1f} (min of {args.trials} interleaved trials)", flush=True)
        result["runs"].append(run)
    if args.model:
        result["model"] = model_profile(args, device, dtype)
    result["small_m_table"] = kernels.small_m_table()
    out = args.out or (tempfile.mkdtemp() if args.smoke else None)
    print(write_result("host_overhead", result, out))
    return result


if __name__ == "__main__":
    main()
