"""GemLite's A16W4 kernels beside the packed layer's own paths, for UAQ-4 (the one option whose format GemLite serves:
per-channel asymmetric 4-bit, weight = (code - zero) x scale), per layer shape of the large models and per row count.

GemLite (Apache-2.0, Triton; https://github.com/dropbox/gemlite) is the library the packed-kernel issue names as a
candidate backend: a fused dequantize-in-registers GEMM/GEMV with its own autotuned tilings. It is not a dependency;
this script measures whether it would pay, and where.

    pip install gemlite          # GPU machine (needs Triton >= 3.6)
    python benchmarks/gemlite_compare.py                 # PixArt-alpha / DiT-XL/2 shapes, M = 2 ... 8192
    python benchmarks/gemlite_compare.py --rows 2,2048 --shapes 1152x1152

Per case (shape N x K, M rows), microseconds per call within a CUDA graph of ``--graph_calls`` calls
(benchmarks/decode.py ``graph_time``): ``gemm_us`` FP16 ``F.linear`` on the dense weight; ``decode_cublas_us`` the
packed layer with decode + cuBLAS (bit-exact with the eager path); ``fused_us`` the packed layer's fused small-M
kernel (M <= 64 only); ``gemlite_us`` GemLite's ``GemLiteLinear`` (its own kernel choice per M: GEMV for M <= 4,
split-K GEMM to 64, GEMM above). Accuracy: each path's largest error against the float64 product of the stored
format, ``(code - zero) x scale`` (fp32 scale, as the checkpoint holds it), beside the stated bound of the packed
layer's fused kernel (:func:`multiquant.kernels.linear_error_bound`) for scale. Writes
benchmarks/results/gemlite.json.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import environment, random_packed_weight, write_result  # noqa: E402
from benchmarks.decode import graph_time, layer_of  # noqa: E402
from multiquant import kernels  # noqa: E402
from multiquant.packing import unpack_codes  # noqa: E402

# out x in of PixArt-alpha's and DiT-XL/2's linears (benchmarks/results/decode.json lists their counts)
SHAPES = "1152x1152,4608x1152,1152x4608,6912x1152,1152x4096,1152x256"
# a batch of 2: adaLN / timestep MLPs (2), cross-attention K/V over 120 text tokens (240), 512 px (2048 tokens),
# 1024 px (8192); 16 and 512 in between
ROWS = "2,16,240,512,2048,8192"
FUSED_MAX_ROWS = 64


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=SHAPES, help="NxK list (out x in features)")
    ap.add_argument("--rows", default=ROWS, help="row counts M")
    ap.add_argument("--graph_calls", type=int, default=20)
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    return ap.parse_args(argv)


def gemlite_layer(part, bias: torch.Tensor):
    """GemLite's layer holding ``part``'s codes, zero-points and fp32 scales (per output channel: group = in
    features; GemLite applies per-channel scales to the fp32 accumulator)."""
    from gemlite import DType, GemLiteLinear

    n, k = part.shape
    codes = unpack_codes(part.codes, part.bits, part.numel).view(n, k).to(torch.uint8)
    layer = GemLiteLinear(4, group_size=k, in_features=k, out_features=n, input_dtype=DType.FP16,
                          output_dtype=DType.FP16)
    layer.pack(codes, part.scale.view(n, 1), part.zero.to(torch.float16).view(n, 1), bias=bias)
    return layer


def max_error(out: torch.Tensor, exact: torch.Tensor) -> float:
    return float((out.double() - exact).abs().max())


def bench_case(rows: int, n: int, k: int, device, args) -> dict:
    dtype = torch.float16
    part = random_packed_weight("mse-4", (n, k), seed=rows + n + k, device=device)
    layer = layer_of(part, dtype, device)
    layer.bias = torch.nn.Parameter(torch.randn(n, device=device, dtype=dtype) * 0.1, requires_grad=False)
    weight = layer.dequantize_weight(dtype)
    x = torch.randn(rows, k, device=device, dtype=dtype)
    codes = unpack_codes(part.codes, part.bits, part.numel).view(n, k).double()
    w64 = (codes - part.zero.double()[:, None]) * part.scale.double()[:, None]
    exact = x.double() @ w64.T + layer.bias.double()
    _, bound = kernels.linear_error_bound(x, weight, layer.bias, dtype)
    case = {"rows": rows, "shape": [n, k], "option": "mse-4", "fused_bound_max": float(bound.max())}
    with torch.no_grad():
        case["gemm_us"] = 1e6 * graph_time(lambda: F.linear(x, weight, layer.bias), args.graph_calls, device)
        with kernels.small_m_threshold(0):
            case["decode_cublas_us"] = 1e6 * graph_time(lambda: layer(x), args.graph_calls, device)
            case["decode_cublas_max_error"] = max_error(layer(x), exact)
        if rows <= FUSED_MAX_ROWS:
            with kernels.small_m_threshold(rows):
                case["fused_us"] = 1e6 * graph_time(lambda: layer(x), args.graph_calls, device)
                case["fused_max_error"] = max_error(layer(x), exact)
        try:
            gl = gemlite_layer(part, layer.bias.data)
            case["gemlite_max_error"] = max_error(gl(x), exact)
            case["gemlite_us"] = 1e6 * graph_time(lambda: gl(x), args.graph_calls, device)
        except Exception as e:  # a format or shape this GemLite / Triton does not take
            case["gemlite_error"] = f"{type(e).__name__}: {e}"[:300]
    for key in ("decode_cublas", "fused", "gemlite"):
        if f"{key}_us" in case:
            case[f"{key}_vs_gemm"] = case[f"{key}_us"] / case["gemm_us"]
    return case


def run(args) -> dict:
    if not torch.cuda.is_available():
        raise SystemExit("gemlite_compare.py needs a CUDA GPU (GemLite's kernels are GPU-only)")
    import gemlite
    import triton

    device = torch.device("cuda")
    result = environment() | {"triton": triton.__version__, "gemlite": getattr(gemlite, "__version__", "unknown"),
                              "graph_calls": args.graph_calls, "cases": []}
    start = time.perf_counter()
    for shape in args.shapes.split(","):
        n, k = (int(v) for v in shape.split("x"))
        for rows in (int(r) for r in args.rows.split(",")):
            case = bench_case(rows, n, k, device, args)
            result["cases"].append(case)
            print(f"M={rows} {n}x{k}: gemm {case['gemm_us']:.1f} us, decode+cuBLAS {case['decode_cublas_us']:.1f}, "
                  f"fused {case.get('fused_us', float('nan')):.1f}, gemlite {case.get('gemlite_us', float('nan')):.1f}"
                  f"; max errors {case['decode_cublas_max_error']:.2g} / {case.get('fused_max_error', float('nan')):.2g}"
                  f" / {case.get('gemlite_max_error', float('nan')):.2g}", flush=True)
            result["total_seconds"] = time.perf_counter() - start
            write_result("gemlite", result, args.out, quiet=True)  # after every case: a cut-short run keeps its cases
    return result


def main(argv=None) -> dict:
    return run(parse_args(argv))


if __name__ == "__main__":
    main()
