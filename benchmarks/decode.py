"""The decode kernels alone: the group decode beside the per-weight decode (multiquant/kernels.py), per layer shape.

    python benchmarks/decode.py            # GPU: every distinct layer shape of full-size PixArt-alpha and DiT-XL/2
    python benchmarks/decode.py --smoke    # CPU: the tiny models' shapes under Triton's interpreter (checks the
                                           # script; results go to a temporary folder unless --out is given)

For every distinct weight shape of the models' quantizable layers and every option (UAQ / K-Means-C / K-Means-A
at 3 and 4 bits), a packed layer of that shape with seeded random codes and tables decodes its whole weight into
the shared scratch buffer through the production plan (``kernels.fast_weight``: direct launches), once with the
group decode (the default) and once with the per-weight decode forced (``kernels.use_group_decode(False)``), in
the same run. Figures per case and kernel: ``us`` = :func:`multiquant.kernels.gpu_time` of one decode (median of
its reps, each behind an L2 flush: the codes come from HBM, as in a forward); ``graph_us`` = per decode, a CUDA
graph of ``--graph_calls`` back-to-back decodes of the layer timed the same way (no launch gaps, as under the
export benchmark's graph replays; the codes then stay in L2 after the first); ``gbps`` = (packed codes + tables
read + dense weight written) / ``us``. ``us`` includes the host's launch time where that outlasts the flush (the
first H200 run: 17-19 us for 1152 x 1152 decodes whose graph_us was 4-6): ``graph_us`` is the GPU's figure. Beside
them ``fill_us`` / ``fill_graph_us``: ``zero_()`` of the same dense weight (a write-only floor) and ``ideal_us`` =
those bytes at ``--peak_gbps``. Both kernels' weights are checked bit for bit against the eager path
(``exact_vs_eager``).

Layer figures (GPU, Linear shapes): the packed layer's whole forward on ``--gemm_rows`` input rows (2048: a batch of
2 at 512 px of both models; every layer is timed at that M) within a CUDA graph of ``--graph_calls`` consecutive
calls: ``gemm_us`` the FP16 ``F.linear`` alone, ``layer_us`` decode + GEMM per kernel, and ``layer_ahead_us`` the group
decode with ``kernels.decode_ahead`` (each call's decode overlapping the previous call's GEMM on a side stream),
and ``batched.layer_us`` with ``kernels.batched_decode`` (one decode launch per group of consecutive calls, groups
up to ``kernels.BATCHED_DECODE_MAX_BYTES`` of decoded weights; ``batched.launches`` per graph);
``overhead_us`` = layer minus GEMM. ``per_forward``: per model and option, the sums over the model's layers, each
shape weighted by how often it occurs (every layer counted as a decode; a forward's small-M layers may take the
fused kernel instead; the layer sums cover its Linear layers).

``--sweep``: the group decode at other tiles (GROUPS x 8 weights per tile row, ROWS rows, ``--sweep_weights``
weights a program) on the large shapes (``--sweep_min_numel``) for ``--sweep_options``, ``graph_us`` each, beside
the default tile's and the per-weight kernel's (``sweep``). Writes benchmarks/results/decode.json.
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import environment, random_packed_weight, write_result  # noqa: E402
from multiquant import kernels  # noqa: E402
from multiquant.errors import UserError  # noqa: E402
from multiquant.families import get_family  # noqa: E402
from multiquant.layers import quantizable_layers  # noqa: E402
from multiquant.packed import packed_layer  # noqa: E402

OPTIONS = "mse-3,mse-4,kmeans-3,kmeans-4,kmeans_all-3,kmeans_all-4"
KERNELS = {"group": True, "per_weight": False}  # name -> kernels.use_group_decode setting
# smoke: besides the tiny models' shapes, rows that are not whole groups (the per-weight kernel under both names)
SMOKE_EXTRA_SHAPES = [(8, 5), (6, 1, 3, 3)]


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="pixart_alpha,dit")
    ap.add_argument("--options", default=OPTIONS)
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    ap.add_argument("--graph_calls", type=int, default=20, help="decodes per CUDA graph (graph_us)")
    ap.add_argument("--gemm_rows", type=int, default=2048, help="input rows of the layer figures (0: none)")
    ap.add_argument("--peak_gbps", type=float, default=4800.0, help="HBM bandwidth of ideal_us (H200: 4.8 TB/s)")
    ap.add_argument("--sweep", action="store_true", help="also time the group decode at other tiles (see above)")
    ap.add_argument("--sweep_options", default="mse-4,kmeans-3")
    ap.add_argument("--sweep_groups", default="16,32,64,128", help="GROUPS of the swept tiles")
    ap.add_argument("--sweep_weights", default="2048,4096,8192", help="weights a program of the swept tiles")
    ap.add_argument("--sweep_min_numel", type=int, default=1 << 20, help="shapes swept: at least this many weights")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes under Triton's interpreter on the CPU")
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results; --smoke: a temporary one)")
    return ap.parse_args(argv)


def model_shapes(model_name: str, size: str) -> collections.Counter:
    """Weight shape -> how many quantizable layers (slices) of the model have it (built on the meta device)."""
    family = get_family(model_name)
    model = family.build(size, device="meta")
    return collections.Counter(ref.shape for ref in quantizable_layers(model, family))


def layer_of(part, dtype: torch.dtype, device) -> torch.nn.Module:
    """A packed layer of one slice (no bias: only its decode is timed)."""
    shape = part.shape
    if len(shape) == 2:
        dense = torch.nn.Linear(shape[1], shape[0], bias=False, device="meta")
    else:
        conv = torch.nn.Conv1d if len(shape) == 3 else torch.nn.Conv2d
        dense = conv(shape[1], shape[0], shape[2:], bias=False, device="meta")
    return packed_layer(dense, [part], dtype).to(device)


def graph_time(fn, calls: int, device) -> float:
    """Seconds per call of ``fn`` within a CUDA graph of ``calls`` back-to-back calls (kernels.gpu_time of a replay)."""
    fn()  # warm: plans and compiled kernels exist before capture
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    seconds = kernels.gpu_time(graph.replay, "graph", device) / calls
    del graph
    return seconds


class Repeated(torch.nn.Module):
    """``calls`` forwards of one layer on the same input: a stand-in for consecutive packed layers of a model."""

    def __init__(self, layer: torch.nn.Module, calls: int):
        super().__init__()
        self.layer, self.calls = layer, calls

    def forward(self, x):
        for _ in range(self.calls):
            y = self.layer(x)
        return y


def layer_figures(layer, weight: torch.Tensor, case: dict, dtype, device, args) -> None:
    """GEMM alone, decode + GEMM per kernel, and with decode ahead, per call of a graph of consecutive calls."""
    x = torch.randn(args.gemm_rows, weight.shape[1], device=device, dtype=dtype)
    calls = args.graph_calls
    case["gemm_rows"] = args.gemm_rows
    case["gemm_us"] = 1e6 * graph_time(lambda: torch.nn.functional.linear(x, weight), calls, device)
    repeated = Repeated(layer, calls)
    with kernels.small_m_threshold(0):  # decode + cuBLAS on every call (no fused small-M kernel)
        for name, group in KERNELS.items():
            with kernels.use_group_decode(group):
                case[name]["layer_us"] = 1e6 * graph_time(lambda: repeated(x), 1, device) / calls
        with kernels.use_group_decode(True), kernels.decode_ahead(repeated) as ahead:
            repeated(x)  # records the order; graph_time's warm-up call follows it, then the capture
            case["group"]["layer_ahead_us"] = 1e6 * graph_time(lambda: repeated(x), 1, device) / calls
            case["group"]["ahead_decodes"] = ahead.ahead_decodes
        with kernels.batched_decode(repeated) as batched:
            repeated(x)  # records the order; graph_time's warm-up call builds the groups and follows them
            launches = batched.batched_launches
            case["batched"] = {"layer_us": 1e6 * graph_time(lambda: repeated(x), 1, device) / calls,
                               "groups": batched.groups, "scratch_extra_bytes": batched.scratch_extra_bytes}
            case["batched"]["launches"] = (batched.batched_launches - launches) // 2  # warm-up and capture
    case["overhead_us"] = {"group": case["group"]["layer_us"] - case["gemm_us"],
                           "per_weight": case["per_weight"]["layer_us"] - case["gemm_us"],
                           "group_ahead": case["group"]["layer_ahead_us"] - case["gemm_us"],
                           "batched": case["batched"]["layer_us"] - case["gemm_us"]}


def bench_case(shape: tuple, option: str, seed: int, dtype: torch.dtype, device, args) -> dict:
    part = random_packed_weight(option, shape, seed, device=device)
    layer = layer_of(part, dtype, device)
    rows = shape[0]
    numel = part.numel
    cuda = device.type == "cuda"
    read = sum(t.numel() * t.element_size() for t in layer.parts[0].buffers())
    written = numel * torch.empty(0, dtype=dtype).element_size()
    expected = layer.dequantize_weight(dtype)  # the eager reference path
    case = {"shape": list(shape), "numel": numel, "option": option, "bytes_read": read, "bytes_written": written,
            "row_len": numel // rows, "ideal_us": 1e-3 * (read + written) / args.peak_gbps}
    geometry = kernels.PartGeometry(rows, numel // rows, 0)

    def decode():
        return kernels.fast_weight(layer, dtype, device)

    for name, group in KERNELS.items():
        with kernels.use_group_decode(group):
            launch = kernels._decode_args(layer.parts[0], torch.empty(rows, numel // rows, device="meta"), geometry)
            weight = decode()
            figures = {"kernel": "group" if launch.kernel == kernels.GROUP_KERNEL else "per_weight",
                       "tile": {k: v for k, v in launch.meta.items() if k not in ("BITS", "MODE")},
                       "programs": launch.grid[0] * (launch.grid[1] if len(launch.grid) > 1 else 1),
                       "exact_vs_eager": bool(torch.equal(weight, expected))}
            seconds = kernels.gpu_time(decode, name, device)
            figures.update(us=1e6 * seconds, gbps=1e-9 * (read + written) / seconds)
            if cuda:
                figures["graph_us"] = 1e6 * graph_time(decode, args.graph_calls, device)
        case[name] = figures
    out = torch.empty(rows, numel // rows, device=device, dtype=dtype)
    case["fill_us"] = 1e6 * kernels.gpu_time(out.zero_, "fill", device)
    if cuda:
        case["fill_graph_us"] = 1e6 * graph_time(out.zero_, args.graph_calls, device)
    case["speedup"] = case["per_weight"]["us"] / case["group"]["us"]
    if cuda:
        case["speedup_graph"] = case["per_weight"]["graph_us"] / case["group"]["graph_us"]
        if args.gemm_rows and len(shape) == 2:
            layer_figures(layer, expected, case, dtype, device, args)
    return case


def sweep_case(shape: tuple, option: str, seed: int, dtype: torch.dtype, device, args, case: dict) -> list[dict]:
    """The group decode of one slice at every swept tile (graph_us; smoke: gpu_time's host seconds), exactness."""
    part = random_packed_weight(option, shape, seed, device=device)
    rows = shape[0]
    row_len = part.numel // rows
    expected = part.dequantize(dtype).reshape(rows, row_len)
    out = torch.empty(rows, row_len, device=device, dtype=dtype)
    geometry = kernels.PartGeometry(rows, row_len, 0)
    default = tuple(case["group"]["tile"].values())
    entries = []
    for groups in [int(g) for g in args.sweep_groups.split(",")]:
        for weights in [int(w) for w in args.sweep_weights.split(",")]:
            per = max(1, weights // (8 * groups))
            per = min(kernels._pow2(rows), 1 << (per.bit_length() - 1))
            with kernels.use_group_decode(True):
                launch = kernels._decode_args(part, out, geometry, blocks=(per, groups))
            out.fill_(float("nan"))
            kernels._run_decode(launch)
            entry = {"shape": list(shape), "option": option, "rows_per_program": per, "groups": groups,
                     "weights_per_program": per * groups * 8, "programs": launch.grid[0],
                     "default_tile": (per, groups) == default, "exact_vs_eager": bool(torch.equal(out, expected))}
            if device.type == "cuda":
                entry["graph_us"] = 1e6 * graph_time(lambda: kernels._run_decode(launch), args.graph_calls, device)
            else:
                entry["us"] = 1e6 * kernels.gpu_time(lambda: kernels._run_decode(launch), "sweep", device)
            entries.append(entry)
    field = "graph_us" if device.type == "cuda" else "us"
    best = min(entries, key=lambda e: e[field])
    for entry in entries:
        entry["best"] = entry is best
        entry["per_weight_" + field] = case["per_weight"][field]
        entry["default_" + field] = case["group"][field]
    print(f"sweep {_name(shape)} {option}: best {best['rows_per_program']}x{best['groups']} {best[field]:.2f} us, "
          f"default {case['group'][field]:.2f}, per-weight {case['per_weight'][field]:.2f}", flush=True)
    return entries


def per_forward(shapes: collections.Counter, cases: dict, options: list[str], cuda: bool) -> dict:
    """Per option: the decode time of every layer of the model, summed (microseconds), and the speedup."""
    out = {}
    for option in options:
        entry = {}
        for field in ("us", "graph_us") if cuda else ("us",):
            for name in KERNELS:
                entry[f"{name}_{field}"] = sum(n * cases[(s, option)][name][field] for s, n in shapes.items())
        entry["fill_us"] = sum(n * cases[(s, option)]["fill_us"] for s, n in shapes.items())
        if cuda:
            entry["fill_graph_us"] = sum(n * cases[(s, option)]["fill_graph_us"] for s, n in shapes.items())
        entry["ideal_us"] = sum(n * cases[(s, option)]["ideal_us"] for s, n in shapes.items())
        entry["speedup"] = entry["per_weight_us"] / entry["group_us"]
        if cuda:
            entry["speedup_graph"] = entry["per_weight_graph_us"] / entry["group_graph_us"]
            layered = [(s, n) for s, n in shapes.items() if "gemm_us" in cases[(s, option)]]
            if layered:
                entry["linear_layers"] = sum(n for _, n in layered)
                entry["gemm_us"] = sum(n * cases[(s, option)]["gemm_us"] for s, n in layered)
                for kind in ("group", "per_weight", "group_ahead", "batched"):
                    entry[f"layer_overhead_us_{kind}"] = sum(n * cases[(s, option)]["overhead_us"][kind]
                                                             for s, n in layered)
        out[option] = entry
    return out


@torch.no_grad()
def run(args) -> dict:
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are built (kernels._jit)
        torch.set_num_threads(1)
    if not args.smoke and not torch.cuda.is_available():
        raise UserError("benchmarks/decode.py times GPU kernels and found no CUDA GPU: pass --smoke to check the "
                        "script on the CPU (Triton's interpreter, tiny shapes)")
    device = torch.device("cpu") if args.smoke else torch.device("cuda", torch.cuda.current_device())
    dtype = getattr(torch, args.dtype)
    options = [o.strip() for o in args.options.split(",") if o.strip()]
    started = time.perf_counter()
    models = {}
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        models[name] = model_shapes(name, "tiny" if args.smoke else "full")
    distinct = list(dict.fromkeys(s for shapes in models.values() for s in shapes))
    if args.smoke:
        distinct += [s for s in SMOKE_EXTRA_SHAPES if s not in distinct]
    result = {**environment(), "smoke": args.smoke, "dtype": args.dtype, "options": options,
              "timer": {"warmup": kernels.TIMER_WARMUP, "reps": kernels.TIMER_REPS, "l2_flush": True},
              "graph_calls": args.graph_calls, "gemm_rows": args.gemm_rows, "peak_gbps": args.peak_gbps,
              "group_tile": kernels.GROUP_TILE, "tile_groups": [kernels.MIN_TILE_GROUPS, kernels.MAX_TILE_GROUPS],
              "decode_warps": kernels.DECODE_WARPS, "triton": kernels._triton().__version__,
              "models": {name: {"layers": sum(shapes.values()),
                                "weights": sum(n * _numel(s) for s, n in shapes.items()),
                                "shapes": {_name(s): n for s, n in shapes.items()}} for name, shapes in models.items()},
              "cases": []}
    cases = {}
    for seed, (shape, option) in enumerate((s, o) for s in distinct for o in options):
        case = bench_case(shape, option, seed, dtype, device, args)
        cases[(shape, option)] = case
        result["cases"].append(case)
        print(f"{_name(shape):>16} {option:>13}: group {case['group']['us']:8.2f} us "
              f"({case['group']['gbps']:7.1f} GB/s) per-weight {case['per_weight']['us']:8.2f} us "
              f"speedup {case['speedup']:.2f} graph {case.get('speedup_graph', float('nan')):.2f} "
              f"fill {case['fill_us']:.2f} exact {case['group']['exact_vs_eager']}/"
              f"{case['per_weight']['exact_vs_eager']}", flush=True)
    if args.sweep:
        sweep_options = [o.strip() for o in args.sweep_options.split(",") if o.strip()]
        result["sweep"] = []
        for seed, (shape, option) in enumerate((s, o) for s in distinct for o in sweep_options):
            if (shape, option) in cases and _numel(shape) >= args.sweep_min_numel and _numel(shape[1:]) % 8 == 0:
                result["sweep"] += sweep_case(shape, option, seed, dtype, device, args, cases[(shape, option)])
    result["per_forward"] = {name: per_forward(shapes, cases, options, device.type == "cuda")
                             for name, shapes in models.items()}
    result["all_exact_vs_eager"] = all(c[k]["exact_vs_eager"] for c in result["cases"] for k in KERNELS)
    result["total_seconds"] = time.perf_counter() - started
    for name, per in result["per_forward"].items():
        for option, e in per.items():
            print(f"SUMMARY {name} {option}: per forward group {e['group_us']:.1f} us, per-weight "
                  f"{e['per_weight_us']:.1f} us (speedup {e['speedup']:.2f}; graphs "
                  f"{e.get('group_graph_us', float('nan')):.1f} vs {e.get('per_weight_graph_us', float('nan')):.1f}),"
                  f" fill {e['fill_us']:.1f} us, ideal {e['ideal_us']:.1f} us"
                  + (f"; layers at M={args.gemm_rows}: GEMMs {e['gemm_us']:.1f} us, overhead group "
                     f"{e['layer_overhead_us_group']:.1f} per-weight {e['layer_overhead_us_per_weight']:.1f} "
                     f"group+ahead {e['layer_overhead_us_group_ahead']:.1f} batched "
                     f"{e['layer_overhead_us_batched']:.1f} us" if "gemm_us" in e else ""))
    return result


def _numel(shape) -> int:
    return kernels._numel(shape)


def _name(shape) -> str:
    return "x".join(str(s) for s in shape)


def main(argv=None) -> dict:
    args = parse_args(argv)
    out = args.out or (tempfile.mkdtemp(prefix="decode_smoke_") if args.smoke else None)
    try:
        result = run(args)
    except UserError as e:
        sys.exit(f"error: {e}")
    path = write_result("decode_smoke" if args.smoke else "decode", result, out)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
