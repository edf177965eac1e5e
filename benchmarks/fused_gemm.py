"""An experiment kept with its result: a many-row fused product (``tiled_linear`` below: decode the weight tiles in
registers, ``tl.dot``) beside decode + cuBLAS and the dense FP16 GEMM, per layer shape of the large models, at the
row counts of a batch of 2.

Why it is not in the library: on one H200 (Triton 3.6) the best tiling ran 2.0-5.3x slower than decode + cuBLAS on
every PixArt-alpha / DiT-XL/2 shape (benchmarks/results/fused_gemm.json). Each row tile decodes its weight tiles
again, and the decode's integer and conversion work per K step is about as large as the tile's tensor-core work,
so it does not hide behind the MMAs; the fused kernel of multiquant/kernels.py stays for few rows only.

    python benchmarks/fused_gemm.py            # GPU: PixArt-alpha / DiT-XL/2 shapes at M = 2048 (and 8192)
    python benchmarks/fused_gemm.py --smoke    # CPU: tiny shapes under Triton's interpreter (checks the script)

Per case (shape, option, M): ``gemm_us`` the FP16 ``F.linear`` on the dense weight, ``decode_cublas_us`` the packed
layer's default path (decode into the scratch buffer, then the same GEMM), and ``tiled_us`` per tile configuration
of the fused kernel (``--configs``), all per call within a CUDA graph of ``--graph_calls`` calls (benchmarks/decode.py
``graph_time``); ``within_bound``: the fused output lies within :func:`multiquant.kernels.linear_error_bound` of the
float64 product (checked for every configuration that ran). Writes benchmarks/results/fused_gemm.json.
"""
from __future__ import annotations

import argparse
import functools
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import environment, random_packed_weight, write_result  # noqa: E402
from benchmarks.decode import graph_time, layer_of  # noqa: E402
from multiquant import kernels  # noqa: E402

# name: block_m, block_n, block_k, group_m, num_warps, num_stages
CONFIGS = {"m128n128k64w8s3": (128, 128, 64, 8, 8, 3), "m128n128k64w8s4": (128, 128, 64, 8, 8, 4),
           "m128n64k64w4s4": (128, 64, 64, 8, 4, 4), "m64n128k64w4s4": (64, 128, 64, 8, 4, 4),
           "m128n256k64w8s3": (128, 256, 64, 8, 8, 3), "m128n128k128w8s3": (128, 128, 128, 8, 8, 3),
           "m64n64k64w4s3": (64, 64, 64, 8, 4, 3), "m256n128k64w8s3": (256, 128, 64, 8, 8, 3)}
SMOKE_CONFIGS = {"m16n16k32w4s1": (16, 16, 32, 2, 4, 1)}
SHAPES = "2048:1152x1152,2048:4608x1152,2048:1152x4608,8192:1152x1152"  # M:NxK
SMOKE_SHAPES = "37:40x64"
OPTIONS = "mse-4,kmeans-4,kmeans_all-4,mse-3,kmeans-3"


@functools.lru_cache(maxsize=None)
def tiled_linear_kernel():
    """The experimental many-row fused kernel, built on first use (after TRITON_INTERPRET is settled)."""
    import triton
    import triton.language as tl

    @triton.jit(do_not_specialize=["M"])
    def tiled_linear_kernel(x_ptr, codes_ptr, scale_ptr, zero_ptr, book_ptr, bias_ptr, out_ptr, M, N, K,
                            stride_xm, stride_om, BITS: tl.constexpr, MODE: tl.constexpr, HAS_BIAS: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                            GROUP_M: tl.constexpr, TABLE_GATHER: tl.constexpr):
        # out[M, N] = x[M, K] @ W^T (+ bias) for many rows: one [BLOCK_M, BLOCK_N] output tile per program, the
        # whole K range (K % BLOCK_K == 0, BLOCK_K % 8 == 0: rows of whole groups of 8 codes, no K masks).
        # Programs walk GROUP_M row tiles per column of tiles (the x tiles and codes stay in L2). Each step
        # decodes the [BLOCK_N, BLOCK_K] weight tile in registers (the values of group_decode_kernel, the same
        # bits) and runs tl.dot with a float32 accumulator. BITS <= 4; 4-bit codes come as int32 words (8 codes)
        pid = tl.program_id(0)
        # no tl.cdiv: a jit helper, which the interpreter refuses when Triton was imported before TRITON_INTERPRET=1
        tiles_m = (M + BLOCK_M - 1) // BLOCK_M
        tiles_n = (N + BLOCK_N - 1) // BLOCK_N
        per_group = GROUP_M * tiles_n
        first_m = (pid // per_group) * GROUP_M
        group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
        pid_m = first_m + (pid % per_group) % group_rows
        pid_n = (pid % per_group) // group_rows
        m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_safe = tl.where(m < M, m, 0)  # out-of-range rows / columns read row 0 (in bounds, discarded at the store)
        n_safe = tl.where(n < N, n, 0)
        LEVELS: tl.constexpr = 1 << BITS
        WORDS: tl.constexpr = BLOCK_K // 8
        if MODE == 0:
            scale = tl.load(scale_ptr + n_safe)
            zero_biased = tl.load(zero_ptr + n_safe).to(tl.float32) + 8388608.0
        elif TABLE_GATHER:
            level = tl.arange(0, LEVELS)
            if MODE == 1:
                table = tl.load(book_ptr + n_safe[:, None] * LEVELS + level[None, :]).to(tl.float32)
            else:
                table = tl.broadcast_to(tl.load(book_ptr + level)[None, :], (BLOCK_N, LEVELS)).to(tl.float32)
        acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
        x_rows = x_ptr + m_safe[:, None] * stride_xm
        row_groups = K // 8
        shifts = tl.arange(0, 8) * BITS
        for k0 in range(0, K, BLOCK_K):
            x = tl.load(x_rows + k0 + tl.arange(0, BLOCK_K)[None, :])
            group = k0 // 8 + tl.arange(0, WORDS)
            if BITS == 4:  # a group is one aligned little-endian int32
                word = tl.load(codes_ptr + n_safe[:, None] * row_groups + group[None, :])  # codes viewed as int32
            else:
                base = (n_safe[:, None] * row_groups + group[None, :]) * BITS
                word = tl.load(codes_ptr + base).to(tl.int32)
                for j in tl.static_range(1, BITS):
                    word |= tl.load(codes_ptr + base + j).to(tl.int32) << (8 * j)
            code = tl.reshape((word[:, :, None] >> shifts[None, None, :]) & (LEVELS - 1), (BLOCK_N, BLOCK_K))
            if MODE == 0:
                biased = (code | 0x4B000000).to(tl.float32, bitcast=True)  # 2^23 + code: see group_decode_kernel
                value = (biased - zero_biased[:, None]) * scale[:, None]
            elif TABLE_GATHER:
                value = tl.gather(table, code, axis=1)
            elif MODE == 1:
                value = tl.load(book_ptr + n_safe[:, None] * LEVELS + code)
            else:
                value = tl.load(book_ptr + code)
            w = tl.trans(value.to(tl.float32).to(x_ptr.dtype.element_ty))
            acc = tl.dot(x, w, acc)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + n_safe).to(tl.float32)[None, :]
        tl.store(out_ptr + m[:, None] * stride_om + n[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=(m < M)[:, None] & (n < N)[None, :])

    return tiled_linear_kernel


@dataclass(frozen=True)
class TiledConfig:
    """Tiles and launch options of the many-row fused product (``tiled_linear_kernel``)."""
    block_m: int = 128
    block_n: int = 128
    block_k: int = 64
    group_m: int = 8
    num_warps: int = 8
    num_stages: int = 3
    table_gather: bool = True  # K-Means tables: tl.gather from the tile's codebooks in registers (else L1 loads)


def tiled_linear_fits(bits: int, in_features: int, config: TiledConfig) -> bool:
    """Whether the many-row fused product serves a slice: up to 4 bits, K a multiple of the K tile."""
    return bits <= 4 and config.block_k % 8 == 0 and in_features % config.block_k == 0


def tiled_linear(x: torch.Tensor, codes: torch.Tensor, scale, zero, codebook, bias, method: str, bits: int,
                 out_features: int, config: TiledConfig = TiledConfig()) -> torch.Tensor:
    """out [M, N] = x [M, K] @ W^T (+ bias) by the many-row fused kernel (same weight bits as the eager path;
    float32 accumulation in another order than cuBLAS: the accuracy of :func:`multiquant.kernels.packed_linear`)."""
    rows, in_features = x.shape
    if not tiled_linear_fits(bits, in_features, config):
        raise ValueError(f"tiled_linear: {bits}-bit codes with K={in_features} do not fit {config}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = torch.empty(rows, out_features, device=x.device, dtype=x.dtype)
    mode = kernels.MODES[method]
    words = codes.view(torch.int32) if bits == 4 else codes
    grid = (kernels.triton_cdiv(rows, config.block_m) * kernels.triton_cdiv(out_features, config.block_n),)
    tiled_linear_kernel()[grid](
        x, words, scale if mode == 0 else codes, zero if mode == 0 else codes, codebook if mode != 0 else codes,
        bias if bias is not None else codes, out, rows, out_features, in_features, x.stride(0), out.stride(0),
        BITS=bits, MODE=mode, HAS_BIAS=bias is not None, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
        BLOCK_K=config.block_k, GROUP_M=config.group_m, TABLE_GATHER=config.table_gather,
        num_warps=config.num_warps, num_stages=config.num_stages)
    return out


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=None, help=f"M:NxK list (default {SHAPES})")
    ap.add_argument("--options", default=OPTIONS)
    ap.add_argument("--configs", default=None, help="config names (default: all of CONFIGS)")
    ap.add_argument("--no_gather_configs", default="m128n128k64w8s3,m128n128k64w8s4",
                    help="configs also timed with K-Means tables read from L1 instead of tl.gather")
    ap.add_argument("--graph_calls", type=int, default=20)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes under Triton's interpreter on the CPU")
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results; --smoke: a temporary one)")
    return ap.parse_args(argv)


def parse_shapes(text: str) -> list[tuple[int, int, int]]:
    shapes = []
    for item in text.split(","):
        rows, nk = item.split(":")
        n, k = nk.split("x")
        shapes.append((int(rows), int(n), int(k)))
    return shapes


def time_call(fn, device, calls: int) -> float:
    """Microseconds per call: CUDA-graph replays on the GPU; off it one host-timed call (the smoke checks values)."""
    if device.type == "cuda":
        return 1e6 * graph_time(fn, calls, device)
    start = time.perf_counter()
    fn()
    return 1e6 * (time.perf_counter() - start)


def bench_case(rows: int, n: int, k: int, option: str, configs: dict, no_gather: set, device, args) -> dict:
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    part = random_packed_weight(option, (n, k), seed=rows + n + k, device=device)
    layer = layer_of(part, dtype, device)
    layer.bias = torch.nn.Parameter(torch.randn(n, device=device, dtype=dtype) * 0.1, requires_grad=False)
    weight = layer.dequantize_weight(dtype)
    x = torch.randn(rows, k, device=device, dtype=dtype)
    exact, bound = kernels.linear_error_bound(x, weight, layer.bias, dtype)
    case = {"rows": rows, "shape": [n, k], "option": option}
    with torch.no_grad():
        case["gemm_us"] = time_call(lambda: F.linear(x, weight, layer.bias), device, args.graph_calls)
        with kernels.small_m_threshold(0):
            case["decode_cublas_us"] = time_call(lambda: layer(x), device, args.graph_calls)
        params = part.params()
        tiled = case["tiled"] = {}
        for name, (bm, bn, bk, gm, warps, stages) in configs.items():
            for gather in ([True, False] if part.method != "mse" and name in no_gather else [True]):
                config = TiledConfig(bm, bn, bk, gm, warps, stages, gather)
                key = name if gather else name + "_l1"
                if not tiled_linear_fits(part.bits, k, config):
                    continue
                fn = lambda: tiled_linear(x, part.codes, params.get("scale"), params.get("zero"),  # noqa
                                                  params.get("codebook"), layer.bias, part.method, part.bits, n,
                                                  config)
                try:
                    out = fn()
                    within = bool(((out.double() - exact).abs() <= bound).all())
                    tiled[key] = {"us": time_call(fn, device, args.graph_calls), "within_bound": within}
                except Exception as e:  # a tile this GPU / Triton cannot build (shared memory, registers)
                    tiled[key] = {"error": f"{type(e).__name__}: {e}"[:300]}
    ran = {key: t["us"] for key, t in tiled.items() if "us" in t}
    if ran:
        best = min(ran, key=ran.get)
        case["best"] = best
        case["best_tiled_us"] = ran[best]
        case["best_vs_gemm"] = ran[best] / case["gemm_us"]
        case["best_vs_decode_cublas"] = ran[best] / case["decode_cublas_us"]
    case["decode_cublas_vs_gemm"] = case["decode_cublas_us"] / case["gemm_us"]
    return case


def run(args) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if device.type == "cpu":
        import os

        os.environ["TRITON_INTERPRET"] = "1"
    import triton

    configs = SMOKE_CONFIGS if args.smoke else CONFIGS
    if args.configs:
        configs = {name: CONFIGS[name] for name in args.configs.split(",")}
    shapes = parse_shapes(args.shapes or (SMOKE_SHAPES if args.smoke else SHAPES))
    no_gather = set(args.no_gather_configs.split(",")) if not args.smoke else set(configs)
    result = environment() | {"triton": triton.__version__, "smoke": args.smoke, "graph_calls": args.graph_calls,
                              "configs": {name: dict(zip(("block_m", "block_n", "block_k", "group_m", "num_warps",
                                                          "num_stages"), c)) for name, c in configs.items()},
                              "cases": []}
    start = time.perf_counter()
    for rows, n, k in shapes:
        for option in args.options.split(","):
            case = bench_case(rows, n, k, option, configs, no_gather, device, args)
            result["cases"].append(case)
            print(f"M={rows} {n}x{k} {option}: gemm {case['gemm_us']:.1f} us, decode+cuBLAS "
                  f"{case['decode_cublas_us']:.1f}, best fused {case.get('best_tiled_us', float('nan')):.1f} "
                  f"({case.get('best')})", flush=True)
    result["all_within_bound"] = all(t.get("within_bound", True) for c in result["cases"] for t in c["tiled"].values())
    result["total_seconds"] = time.perf_counter() - start
    return result


def main(argv=None) -> dict:
    args = parse_args(argv)
    result = run(args)
    out = args.out or (tempfile.mkdtemp() if args.smoke else None)
    print(write_result("fused_gemm_smoke" if args.smoke else "fused_gemm", result, out))
    return result


if __name__ == "__main__":
    main()
