"""The fast packed path (multiquant/kernels.py): the Triton decode gives the eager path's dense weight bit for
bit for every method, bit-width, dtype and layer shape (run by Triton's interpreter on the CPU; on a GPU the same
checks run compiled), the shared scratch and the per-layer plans follow buffers, and the torch.compile op
traces. GPU-only checks (the compiled kernel, CUDA graphs, Inductor, a whole model) are skipped without CUDA."""
from __future__ import annotations

import contextlib
import functools
import json
import os
import re

import pytest
import torch

from multiquant import kernels
from multiquant.errors import UserError
from multiquant.packed import PackedWeight, packed_layer
from multiquant.packing import pack_codes

triton = pytest.importorskip("triton")
CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if CUDA else [])
# Triton's interpreter casts float32 to bfloat16 by truncation (compiled kernels round to nearest even, like
# torch): bfloat16 is checked on the GPU only
DTYPES = {"cpu": (torch.float16, torch.float32), "cuda": (torch.float16, torch.bfloat16, torch.float32)}


@functools.lru_cache(maxsize=None)
def interpreter_gap() -> str:
    """Why Triton's interpreter cannot run the fused small-M kernel here ("" where it can). The kernel loops over
    runtime bounds; Triton 3.6's interpreter turns such a bound into an int through a 1-element NumPy array, which
    NumPy 2.5 refuses (seen on the GPU host: Triton 3.6, NumPy 2.5.2; its [cuda] cases test the compiled kernel)."""
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"  # read when a kernel is decorated
    try:
        import triton
        import triton.language as tl

        @triton.jit
        def count(out_ptr, n, STEP: tl.constexpr):
            start = tl.program_id(2) * n  # the small-M kernel's loop over its K split
            steps = 0
            for _ in range(start, start + n, STEP):
                steps += 1
            tl.store(out_ptr, steps)

        out = torch.zeros(1, dtype=torch.int32)
        count[(1, 1, 1)](out, 3, STEP=1)
        return "" if int(out) == 3 else f"Triton's interpreter ran {int(out)} of 3 loop steps"
    except Exception as e:  # noqa: BLE001 (any failure of the probe says the same)
        return f"Triton's interpreter cannot loop over a runtime bound here ({type(e).__name__}: {e})"
    finally:
        if previous is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = previous


@pytest.fixture
def device(request, monkeypatch):
    """cpu: Triton's interpreter runs the kernel on CPU tensors; cuda: the compiled kernel."""
    if request.param == "cpu" and "small_m" in request.node.name and interpreter_gap():
        pytest.skip(interpreter_gap())
    if request.param == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    else:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    torch.manual_seed(0)
    return torch.device(request.param)


def random_part(option: str, shape, seed: int, device="cpu", codebook_dtype=torch.float32) -> PackedWeight:
    """A packed slice with fresh random codes and quantizer parameters (any valid values: the decode must
    compute the same function on every input, not only on the quantizers' outputs)."""
    g = torch.Generator().manual_seed(seed)
    part = PackedWeight(option, shape, codebook_dtype=codebook_dtype, dense_dtype=torch.float32, device="cpu")
    if option == "fp16":
        part.dense.copy_(torch.randn(*shape, generator=g))
        return part.to(device)
    bits = part.bits
    codes = torch.randint(0, 2 ** bits, (part.numel,), generator=g).to(torch.uint8)
    part.codes.copy_(pack_codes(codes, bits))
    if part.method == "mse":
        part.scale.copy_(torch.rand(shape[0], generator=g) * 0.1 + 1e-3)
        part.zero.copy_(torch.randint(0, 2 ** bits, (shape[0],), generator=g))
    else:
        part.codebook.copy_(torch.randn(part.codebook.shape, generator=g))
    return part.to(device)


OPTIONS = [f"{m}-{b}" for m in ("mse", "kmeans", "kmeans_all") for b in range(2, 9)]  # every packable width
# 1 weight per channel, 1x1 and 3x3 convolutions, depthwise, Conv1d, rows that are not a multiple of 8 codes (groups
# span rows: the per-weight kernel), rows of whole groups (the group kernel: 1x1 conv on 8 channels, a 3x3 conv of
# 9 groups a row, 17 groups a row: a partial column block)
SHAPES = [(5, 12), (3, 7), (1, 1), (3, 1), (4, 3, 3, 3), (6, 5, 1, 1), (6, 1, 3, 3), (6, 5, 3), (33, 40),
          (5, 16), (6, 8, 1, 1), (4, 8, 3, 3), (3, 136)]
GROUP_SHAPES = [s for s in SHAPES if kernels._numel(s[1:]) % 8 == 0]


@pytest.fixture(params=[True, False], ids=["group_decode", "per_weight_decode"])
def group_decode(request):
    """Both positions of the decode switch (QUA2SEDIMO_GROUP_DECODE)."""
    with kernels.use_group_decode(request.param):
        yield request.param


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("option", OPTIONS)
def test_decode_equals_the_eager_dequantization_bit_for_bit(device, option, group_decode):
    """Every shape through the kernel it takes: switch off, the per-weight kernel on all of them; switch on, the
    group kernel on the rows of whole groups (the others take the per-weight kernel, checked with the switch off).
    The interpreter decodes each shape into one output dtype, alternating along the shapes and between options
    (every option, kernel and dtype meet; the interpreter's cost is per launch); compiled: every dtype."""
    for i, shape in enumerate(SHAPES):
        rows = shape[0]
        geometry = kernels.PartGeometry(rows, kernels._numel(shape[1:]), 0)
        assert kernels.takes_group_decode(geometry) == (group_decode and shape in GROUP_SHAPES)
        if group_decode and shape not in GROUP_SHAPES:
            continue
        part = random_part(option, shape, seed=i, device=device)
        dtypes = DTYPES[device.type]
        if device.type == "cpu":
            dtypes = dtypes[(i + OPTIONS.index(option)) % len(dtypes):][:1]
        for dtype in dtypes:
            out = torch.full((rows, part.numel // rows), float("nan"), device=device, dtype=dtype)  # poison
            kernels.decode_into(part, out)
            expected = part.dequantize(dtype).reshape(rows, -1)
            assert torch.equal(out, expected), (option, shape, dtype)


@pytest.mark.parametrize("option", ["mse-3", "mse-4", "kmeans-3", "kmeans_all-4"])
def test_group_decode_compiles_for_hopper_with_16_byte_stores(option, monkeypatch):
    """The compiled kernel (not the interpreter's): Triton builds it for sm_90 without a GPU; a 1152-long row tile
    stores 8 fp16 values (16 bytes) per instruction and uses no shared memory (no layout conversion through it)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    method, bits = option.split("-")
    mode = kernels.MODES[method]
    rows_per, groups = kernels.group_blocks(1152, 1152 // 8)
    names = ("codes_ptr", "scale_ptr", "zero_ptr", "book_ptr", "out_ptr", "rows", "row_groups", "out_stride",
             "col_offset", "col_blocks")
    types = ("*u8", "*fp32", "*i16", "*fp32", "*fp16") + ("i32",) * 5
    signature = dict(zip(names, types)) | dict.fromkeys(("BITS", "MODE", "ROWS", "GROUPS"), "constexpr")
    aligned = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(names)
               if name.endswith("_ptr") or name in ("out_stride", "col_offset")}  # as Triton specializes them
    source = ASTSource(fn=kernels._jit(False)[2], signature=signature, attrs=aligned,
                       constexprs={"BITS": int(bits), "MODE": mode, "ROWS": rows_per, "GROUPS": groups})
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": kernels.DECODE_WARPS})
    ptx = compiled.asm["ptx"]
    stores = re.findall(r"st\.global[.\w]*", ptx)  # (predicated: "@%p1 st.global.v4.b32 [...], {...};")
    assert stores and set(stores) == {"st.global.v4.b32"}, set(stores)
    assert compiled.metadata.shared == 0


@pytest.mark.parametrize("wide", [False, True])
def test_batched_decode_compiles_for_hopper_with_16_byte_stores(wide, monkeypatch):
    """The batched kernel for sm_90 (no GPU needed), width and table kind read per slice: table pointers cast from
    the descriptor's integers, 8 fp16 values (16 bytes) per store, no shared memory."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    names = ("desc_ptr", "out_ptr", "scale_like", "zero_like", "book_like", "parts")
    signature = dict(zip(names, ("*i64", "*fp16", "*fp32", "*i16", "*fp32", "i32"))) | dict.fromkeys(
        ("WIDE", "TILE", "FIELDS"), "constexpr")
    aligned = {(i,): [["tt.divisibility", 16]] for i in range(5)}
    source = ASTSource(fn=kernels._jit(False)[3], signature=signature, attrs=aligned,
                       constexprs={"WIDE": wide, "TILE": kernels.GROUP_TILE, "FIELDS": kernels.DESCRIPTOR_FIELDS})
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": kernels.DECODE_WARPS})
    stores = re.findall(r"st\.global[.\w]*", compiled.asm["ptx"])
    assert stores and set(stores) == {"st.global.v4.b32"}, set(stores)
    assert compiled.metadata.shared == 0


def test_group_tiles_fit_the_rows():
    """A warp's threads along one row (32 or 64 groups, the one that overhangs the row less; rows of fewer groups:
    one block), 4096 weights a program, one program for a small slice."""
    assert kernels.group_blocks(1152, 1152 // 8) == (16, 32)  # 5 blocks, the last half outside the row
    assert kernels.group_blocks(1152, 4608 // 8) == (8, 64)  # 9 blocks exactly
    assert kernels.group_blocks(1152, 256 // 8) == (16, 32)
    assert kernels.group_blocks(3, 2) == (4, 2)
    assert kernels.group_blocks(40, 9) == (32, 16)
    assert kernels.group_blocks(5, 36) == (8, 64)  # a tie (64 lanes either way): the larger block
    for rows, row_groups in [(1, 1), (7, 3), (3, 17), (300, 100), (1152, 144), (6912, 144), (1152, 512)]:
        per, groups = kernels.group_blocks(rows, row_groups)
        assert groups & (groups - 1) == 0 and per & (per - 1) == 0 and per <= kernels._pow2(rows)
        if row_groups > kernels.MIN_TILE_GROUPS:
            assert groups in (kernels.MIN_TILE_GROUPS, kernels.MAX_TILE_GROUPS)
        else:
            assert kernels.triton_cdiv(row_groups, groups) == 1
        assert per * groups <= max(kernels.GROUP_TILE, groups)


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # the interpreter's fp16 infs
def test_group_decode_of_uaq_is_exact_for_any_int16_zero_and_scale(device):
    """The group kernel forms code - zero as (2^23 + code) - (2^23 + zero) in float32: exact for every int16 zero
    (negative ones, the extremes) and scale (either sign, tiny and huge): the eager path's bits."""
    g = torch.Generator().manual_seed(7)
    part = random_part("mse-4", (10, 24), seed=7)
    part.zero.copy_(torch.tensor([-32768, 32767, -1, 0, 15, 16, -300, 12000, 7, -7], dtype=torch.int16))
    part.scale.copy_(torch.randn(10, generator=g) * torch.tensor([1e-30, 1e30, 1, -1, 3e-5, -2e4, 1, 1, 0.1, -0.1]))
    part = part.to(device)
    for dtype in DTYPES[device.type]:
        out = torch.full((10, 24), float("nan"), device=device, dtype=dtype)
        with kernels.use_group_decode(True):
            kernels.decode_into(part, out)
        bits = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}[dtype]
        assert torch.equal(out.view(bits), part.dequantize(dtype).view(bits)), dtype  # infs and signed zeros too


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("option", ["mse-3", "kmeans-4", "kmeans_all-5"])
def test_group_decode_of_a_column_slice_over_many_tiles(device, option):
    """Small tiles (many row and column blocks, partial ones at both ends) and a slice at a column offset of a
    wider buffer: every weight of the slice written as the eager path's, no other column touched. Few rows: the
    interpreter runs the programs one by one."""
    rows, row_len, total, col_offset = 5, 560, 600, 16  # 70 groups a row: 3 blocks of 32, the last one partial
    part = random_part(option, (rows, row_len), seed=5, device=device)
    expected = part.dequantize(torch.float16)
    geometry = kernels.PartGeometry(rows, row_len, col_offset)
    for tile, rows_per in ((1, 1), (64, 2)):  # one row a block; two (5 rows: the last block half outside)
        per, groups = kernels.group_blocks(rows, row_len // 8, tile)
        assert per == rows_per and groups == 32 and kernels.triton_cdiv(row_len // 8, groups) == 3
        out = torch.full((rows, total), float("nan"), device=device, dtype=torch.float16)
        with kernels.use_group_decode(True):
            kernels._launch_decode(part, out, geometry, tile=tile)
        assert torch.equal(out[:, col_offset:col_offset + row_len], expected), tile
        assert torch.isnan(out[:, :col_offset]).all() and torch.isnan(out[:, col_offset + row_len:]).all()


SPLITS = {"dense_second": (("mse-3", (7, 5, 3)), ("fp16", (7, 4, 3))),
          "whole_groups": (("mse-3", (7, 16)), ("kmeans-4", (7, 24))),  # the group kernel at an aligned offset
          "odd_offset": (("kmeans_all-3", (7, 5)), ("mse-4", (7, 16)))}  # ... at column 5; the first per weight


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("split", SPLITS)
def test_decode_writes_only_its_columns_of_a_split_layer(device, split, group_decode):
    """Two slices side by side in one [C, total] buffer, the second at a column offset (out_stride != row_len);
    columns of the other slice untouched."""
    (option_a, shape_a), (option_b, shape_b) = SPLITS[split]
    first = random_part(option_a, shape_a, seed=1, device=device)
    second = random_part(option_b, shape_b, seed=2, device=device)
    cut, total = first.numel // 7, (first.numel + second.numel) // 7
    out = torch.full((7, total), float("nan"), device=device, dtype=torch.float16)
    kernels.decode_into(second, out, col_offset=cut)
    assert torch.isnan(out[:, :cut]).all() and not torch.isnan(out[:, cut:]).any()
    kernels.decode_into(first, out, col_offset=0)
    expected = torch.cat([first.dequantize(torch.float16), second.dequantize(torch.float16)], dim=1)
    assert torch.equal(out, expected.reshape(7, total))


def _layer(kind: str, device, options=("kmeans-4", "fp16")) -> torch.nn.Module:
    dense = {"linear": torch.nn.Linear(10, 6), "conv2d": torch.nn.Conv2d(4, 6, 3, padding=1),
             "conv1d": torch.nn.Conv1d(4, 6, 1)}[kind]
    shape = tuple(dense.weight.shape)
    cut = shape[1] // 2
    if len(options) == 1:
        parts = [random_part(options[0], shape, seed=3)]
    else:
        parts = [random_part(options[0], (shape[0], cut) + shape[2:], seed=3),
                 random_part(options[1], (shape[0], shape[1] - cut) + shape[2:], seed=4)]
    return packed_layer(dense, parts, torch.float16).to(device)


@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_a_plan_compares_its_objects_only_after_a_structure_change_and_follows_every_kind_of_replacement(
        device, monkeypatch):
    """While no packed module changed, a plan is reused without comparing the objects it depends on; after each way
    of replacing a slice or a slice's tensor (attribute, register_buffer, a new ModuleList, load_state_dict with
    assign, moving a slice alone) the next fast weight is the new eager weight."""
    layer = _layer("linear", device, options=("kmeans-4", "fp16"))
    kernels.fast_weight(layer, torch.float32, device)
    identity = kernels._identity
    monkeypatch.setattr(kernels, "_identity", lambda layer: pytest.fail("compared without a structure change"))
    assert torch.equal(kernels.fast_weight(layer, torch.float32, device), layer.dequantize_weight(torch.float32))
    monkeypatch.setattr(kernels, "_identity", identity)

    def replaced(step):
        step()
        plan = layer._fast_plan
        assert torch.equal(kernels.fast_weight(layer, torch.float32, device), layer.dequantize_weight(torch.float32))
        assert layer._fast_plan is not plan

    first, dense = layer.parts[0], layer.parts[1]
    replaced(lambda: first.register_buffer("codebook", torch.randn_like(first.codebook)))
    replaced(lambda: setattr(layer, "parts", torch.nn.ModuleList([first, random_part("fp16", dense.shape, seed=5)])))
    assert type(layer.parts) is not torch.nn.ModuleList and "PackedWeight(fp16, shape=(6, 5))" in repr(layer)
    replaced(lambda: layer.parts.__setitem__(1, random_part("fp16", dense.shape, seed=6).to(device)))
    state = {k: torch.randn_like(v) if v.is_floating_point() else v.clone() for k, v in layer.state_dict().items()}
    replaced(lambda: layer.load_state_dict(state, assign=True))
    replaced(lambda: layer.parts[1].to(torch.float64))  # the dense slice alone: new tensors, cast


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("kind", ["linear", "conv2d", "conv1d"])
def test_fast_weight_of_a_layer_is_its_eager_weight_and_follows_new_buffers(device, kind):
    layer = _layer(kind, device)
    for dtype in (torch.float16, torch.float32):
        fast = kernels.fast_weight(layer, dtype, device)
        assert torch.equal(fast, layer.dequantize_weight(dtype))
    plan = layer._fast_plan
    assert kernels.fast_weight(layer, torch.float32, device) is plan.weight  # plan reused: same scratch view
    # new buffer contents of the same tensors are read (plans hold tensors, not values)
    layer.parts[0].codes.copy_(torch.randint_like(layer.parts[0].codes, 0, 256))
    assert torch.equal(kernels.fast_weight(layer, torch.float32, device), layer.dequantize_weight(torch.float32))
    # a replaced buffer object invalidates the plan
    layer.parts[0].codes = layer.parts[0].codes.clone().flip(0)
    assert torch.equal(kernels.fast_weight(layer, torch.float32, device), layer.dequantize_weight(torch.float32))
    assert layer._fast_plan is not plan
    plan = layer._fast_plan  # ... and so does a replaced slice
    first = layer.parts[0]
    layer.parts[0] = random_part(first.option, first.shape, seed=9, device=device,
                                 codebook_dtype=first.codebook.dtype if first.method != "mse" else torch.float32)
    assert torch.equal(kernels.fast_weight(layer, torch.float32, device), layer.dequantize_weight(torch.float32))
    assert layer._fast_plan is not plan
    layer.to(torch.float32)  # moving the module drops its plan (no pinned old tensors)
    assert "_fast_plan" not in layer.__dict__


@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_a_layer_plan_follows_the_decode_switch(device):
    """Flipping the switch re-plans the layer's launches (group <-> per-weight kernel); the weight is the eager
    one either way (the scratch poisoned between calls: each call's weight is its own decode)."""
    layer = packed_layer(torch.nn.Linear(24, 6), [random_part("mse-4", (6, 24), seed=3)], torch.float16).to(device)
    expected = layer.dequantize_weight(torch.float16)
    kinds = []
    for group in (True, False, True):
        with kernels.use_group_decode(group):
            assert torch.equal(kernels.fast_weight(layer, torch.float16, device), expected)
            kinds.append([launch[1].kernel for launch in layer._fast_plan.launches if launch[0] == "decode"])
            layer._fast_plan.flat.fill_(float("nan"))
    assert kinds == [[2], [0], [2]]


@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_scratch_is_shared_grows_to_the_largest_layer_and_frees_the_old_buffer(device):
    kernels.SCRATCH.release()
    small, large = _layer("linear", device, ("mse-4",)), _layer("conv2d", device, ("mse-3",))
    w_small = kernels.fast_weight(small, torch.float16, device)
    expected_small = small.dequantize_weight(torch.float16)
    assert torch.equal(w_small, expected_small)
    kernels.fast_weight(large, torch.float16, device)
    indexed = torch.device("cuda", torch.cuda.current_device()) if device.type == "cuda" else device
    buffer = kernels.SCRATCH.buffers[(indexed, torch.float16)]  # fast_weight keys the current GPU by its index
    assert buffer.numel() == 6 * 4 * 9
    assert small._fast_plan.weight is None  # its view of the outgrown buffer was dropped
    # the small layer now decodes into the start of the same (larger) buffer
    w_small = kernels.fast_weight(small, torch.float16, device)
    assert w_small.data_ptr() == buffer.data_ptr() and torch.equal(w_small, expected_small)
    kernels.SCRATCH.release()
    assert not kernels.SCRATCH.buffers and small._fast_plan.weight is None


@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_compile_op_traces_and_equals_the_eager_weight(device):
    """Under torch.compile the decode is an opaque custom op returning a fresh tensor (fake impl for tracing)."""
    torch._dynamo.reset()
    layer = _layer("linear", device, ("mse-3", "kmeans_all-4"))
    x = torch.randn(3, 10, device=device, dtype=torch.float32)

    def forward(x):
        return torch.nn.functional.linear(x, kernels._compiled_weight(layer, x.dtype), layer.bias)

    compiled = torch.compile(forward, backend="aot_eager", fullgraph=True)
    expected = torch.nn.functional.linear(x, layer.dequantize_weight(torch.float32), layer.bias)
    assert torch.equal(compiled(x), expected)
    torch.library.opcheck(kernels.decode_packed, (layer.parts[0].codes, layer.parts[0].scale, layer.parts[0].zero,
                                                  None, "mse", 3, 6, 5, torch.float16))


def test_the_eager_path_is_used_off_cuda_and_when_disabled():
    layer = _layer("linear", "cpu")
    x = torch.randn(2, 10)
    with kernels.use_packed_kernels(True):
        layer(x)
    assert "_fast_plan" not in layer.__dict__  # CPU input: never the fast path
    with kernels.use_packed_kernels(False):
        assert not kernels.kernels_enabled()
    assert kernels.kernels_enabled() == (kernels._ENABLED[0] and kernels._triton() is not None)


def test_direct_launch_passes_no_hooks_while_none_are_registered_and_the_full_path_otherwise():
    """The launcher is called as Triton's own CompiledKernel runner calls it; with a registered launch hook
    (profilers) the hooks and their metadata are passed on."""
    from triton import knobs

    calls = []

    class Compiled:  # the attributes of triton.compiler.CompiledKernel the direct path reads
        function, packed_metadata = 7, (4, 1, 0)

        def run(self, *a):
            calls.append(a)

        def launch_metadata(self, grid, stream, *args):
            return {"grid": grid}

    launch = kernels._direct_launcher(Compiled(), (3, 2), ("x", 5, 9))
    if not hasattr(knobs.runtime.launch_enter_hook, "calls"):
        assert launch is None  # another hook type: the plain path
        return
    launch(11)
    assert calls[-1] == (3, 2, 1, 11, 7, (4, 1, 0), None, None, None, "x", 5, 9)
    hook = lambda metadata: None  # noqa: E731
    knobs.runtime.launch_enter_hook.add(hook)
    try:
        launch(11)
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)
    assert calls[-1][6] == {"grid": (3, 2)} and calls[-1][7] is knobs.runtime.launch_enter_hook


# -- small-M fused GEMM ---------------------------------------------------------------------------------------
SMALL_M_OPTIONS = [f"{m}-{b}" for m in ("mse", "kmeans", "kmeans_all") for b in (3, 4)]
# (M, N, K): 1 output channel / M = 1 / K < 8; rows not a multiple of 8 codes nor of the block; N past one 32-wide
# tile and M not a multiple of its 32-row block; K over three 64-wide blocks (split K on the interpreter's "4 SMs");
# K a multiple of 8 (whole groups of 8 codes per row: the grouped decode) in one block and split over several
SMALL_M_SHAPES = [(1, 1, 13), (3, 5, 40), (17, 70, 37), (2, 33, 130), (5, 20, 200)]


def _linear_within_bound(y, x, part, bias, dtype):
    exact, bound = kernels.linear_error_bound(x, part.dequantize(dtype), bias, dtype)
    err = (y.double().reshape(exact.shape) - exact).abs()
    assert y.dtype == dtype and torch.isfinite(y).all()
    assert (err <= bound).all(), float((err / bound).max())
    return float((err / bound).max())


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("option", SMALL_M_OPTIONS)
def test_small_m_kernel_is_within_its_bound_of_the_float64_product(device, option):
    """Fresh random codes, tables, inputs and bias vs the float64 product of the eager dequantized weight, for
    per-channel (UAQ, K-Means-C) and per-tensor (K-Means-A) tables, 3 and 4 bits, odd shapes, with/without bias.
    The interpreter runs each shape in one (dtype, bias) combination, taking every combination in turn along the
    shapes and shifted between options (each option meets all four, each shape all four over the options);
    compiled: every combination."""
    combinations = [(dtype, with_bias) for dtype in DTYPES[device.type] for with_bias in (False, True)]
    for i, (rows, out_features, in_features) in enumerate(SMALL_M_SHAPES):
        book_dtype = (torch.float32, torch.float16)[i % 2]  # fp16 codebooks too (upcast to a float32 compute)
        part = random_part(option, (out_features, in_features), seed=10 + i, device=device, codebook_dtype=book_dtype)
        params = part.params()
        chosen = combinations
        if device.type == "cpu":
            chosen = [combinations[(i + SMALL_M_OPTIONS.index(option)) % len(combinations)]]
        for dtype, with_bias in chosen:
            x = torch.randn(rows, in_features, device=device).to(dtype)
            bias = torch.randn(out_features, device=device).to(dtype) if with_bias else None
            y = kernels._packed_linear(x, part.codes, params.get("scale"), params.get("zero"), params.get("codebook"),
                                       bias, part.method, part.bits, out_features)
            _linear_within_bound(y, x, part, bias, dtype)


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("option", ["mse-2", "kmeans-5", "kmeans_all-8"])
def test_small_m_kernel_other_widths(device, option):
    """2 bits (grouped decode, 4 codes a byte) and 5 / 8 bits (codebooks too large to hold on chip: looked up in
    memory), rows of whole and partial groups."""
    for i, (rows, out_features, in_features) in enumerate([(3, 9, 24), (2, 5, 19)]):
        part = random_part(option, (out_features, in_features), seed=30 + i, device=device)
        params = part.params()
        x = torch.randn(rows, in_features, device=device, dtype=torch.float16)
        bias = torch.randn(out_features, device=device, dtype=torch.float16)
        y = kernels._packed_linear(x, part.codes, params.get("scale"), params.get("zero"), params.get("codebook"),
                                   bias, part.method, part.bits, out_features)
        _linear_within_bound(y, x, part, bias, torch.float16)


@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_small_m_split_k_equals_its_bound_and_is_deterministic(device):
    """K split 1, 2 and 3 ways (the last of a tile's programs sums the partials in split order): every split is
    within the bound, a repeated launch is bit-identical (the counters were re-armed), and the splits really
    differ in tiling."""
    rows, out_features, in_features = 3, 20, 192  # whole groups of 8 codes per row (the grouped decode), 3 K blocks
    part = random_part("kmeans-3", (out_features, in_features), seed=7, device=device)
    params = part.params()
    x = torch.randn(rows, in_features, device=device, dtype=torch.float16)
    bias = torch.randn(out_features, device=device, dtype=torch.float16)
    tilings = set()
    for split in (1, 2, 3):
        tilings.add(kernels.linear_tiling(rows, out_features, in_features, 4, split))
        run = lambda: kernels._packed_linear(x, part.codes, None, None, params["codebook"], bias,  # noqa: E731
                                             "kmeans", 3, out_features, split_k=split)
        first = run()
        _linear_within_bound(first, x, part, bias, torch.float16)
        assert torch.equal(run(), first)
    assert sorted(t.split_k for t in tilings) == [1, 2, 3]
    assert not kernels._counters(device).any()  # every counter re-armed to zero


def test_small_m_tiling_splits_k_only_where_tiles_are_few():
    one = kernels.linear_tiling(2, 1152, 1152, 132)  # timestep MLP at batch 2: 72 tiles on 132 SMs
    assert (one.block_m, one.block_n, one.block_k, one.num_warps) == (16, 16, 64, 4)
    assert one.split_k == 9 and one.k_per_split == 128  # 18 K blocks, 2 per split (16 ways would leave 2 empty)
    adaln = kernels.linear_tiling(2, 6912, 1152, 132)
    assert adaln.split_k == 2 and 432 * adaln.split_k >= kernels.PROGRAMS_PER_SM * 132 * 0.8
    kv = kernels.linear_tiling(240, 1152, 1152, 132)  # cross-attention K/V over 2 x 120 tokens
    assert (kv.block_m, kv.block_n, kv.block_k, kv.num_warps) == (128, 32, 64, 8) and kv.split_k == 9
    assert kernels.linear_tiling(2048, 1152, 1152, 132).split_k == 1  # 576 tiles: enough programs unsplit
    tiny = kernels.linear_tiling(1, 1, 13, 132)
    assert (tiny.block_m, tiny.block_n, tiny.block_k, tiny.split_k, tiny.k_per_split) == (16, 16, 16, 1, 16)


def _small_layer(option="mse-4", out_features=7, in_features=20, device="cpu", bias=True):
    dense = torch.nn.Linear(in_features, out_features, bias=bias)
    return packed_layer(dense, [random_part(option, (out_features, in_features), seed=5)], torch.float16).to(device)


@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_small_m_layer_product_keeps_leading_dims_and_is_within_bound(device):
    """Through the layer's cached launch (one per input signature): reused while its tensors are the layer's,
    rebuilt when a buffer is replaced, dropped when the module moves."""
    layer = _small_layer("kmeans_all-3", device=device).half()
    x = torch.randn(2, 3, 20, device=device, dtype=torch.float16)
    with torch.no_grad():
        y = kernels.packed_linear(layer, x)
        assert y.shape == (2, 3, 7)
        _linear_within_bound(y, x, layer.parts[0], layer.bias, torch.float16)
        (launch,) = layer._small_m_plans.values()
        part = layer.parts[0]
        part.codebook.copy_(torch.randn_like(part.codebook))  # new contents of the same tensor: read
        _linear_within_bound(kernels.packed_linear(layer, x), x, part, layer.bias, torch.float16)
        assert len(layer._small_m_plans) == 1 and next(iter(layer._small_m_plans.values())) is launch
        part.codes = part.codes.clone().flip(0)  # a replaced buffer: a new launch reads it
        _linear_within_bound(kernels.packed_linear(layer, x), x, part, layer.bias, torch.float16)
        assert next(iter(layer._small_m_plans.values())) is not launch
        y5 = kernels.packed_linear(layer, x[:, :1])  # another row count: its own launch
        _linear_within_bound(y5, x[:, :1], part, layer.bias, torch.float16)
        assert len(layer._small_m_plans) == 2
    layer.to(device)
    assert "_small_m_plans" not in layer.__dict__


def test_small_m_path_is_taken_only_for_few_rows_one_packed_slice_and_no_autograd():
    layer = _small_layer("mse-3", in_features=20)
    x = torch.randn(4, 5, 20)
    with torch.no_grad():
        with kernels.small_m_threshold(20):
            assert kernels.takes_small_m_path(layer, x)  # 20 rows
            assert not kernels.takes_small_m_path(layer, torch.randn(3, 7, 20))  # 21 rows
            assert not kernels.takes_small_m_path(layer, x.to(torch.int32))
            assert not kernels.takes_small_m_path(layer, x[:0])
            assert not kernels.takes_small_m_path(_layer("linear", "cpu"), torch.randn(2, 10))  # split layer
        with kernels.small_m_threshold(0):
            assert not kernels.takes_small_m_path(layer, x)
    assert kernels.small_m_max() == kernels.SMALL_M_MAX
    with kernels.small_m_threshold(20):
        assert not kernels.takes_small_m_path(layer, x)  # grad enabled and the bias needs it: no backward here
        assert kernels.takes_small_m_path(layer.requires_grad_(False), x)


@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_small_m_compile_op_traces_and_equals_the_kernel(device):
    """Under torch.compile the fused product is an opaque custom op (fake impl for tracing), no graph break."""
    torch._dynamo.reset()
    layer = _small_layer("kmeans-4", device=device).requires_grad_(False)
    x = torch.randn(3, 20, device=device, dtype=torch.float32)
    compiled = torch.compile(lambda x: kernels.packed_linear(layer, x), backend="aot_eager", fullgraph=True)
    y = compiled(x)
    assert torch.equal(y, kernels.packed_linear(layer, x))
    _linear_within_bound(y, x, layer.parts[0], layer.bias, torch.float32)
    part = layer.parts[0]
    torch.library.opcheck(kernels.packed_linear_op, (x, part.codes, None, None, part.codebook, layer.bias,
                                                     "kmeans", 4, 7))


# -- the measured small-M dispatch ----------------------------------------------------------------------------
class FakeTimer:
    """An injected timer (kernels.small_m_timer): runs each timed path once, keeps its output, and reports the
    seconds given per path ("decode_cublas" / "fused"), or raises for a path given an exception."""

    def __init__(self, decode_cublas=2e-6, fused=1e-6):
        self.seconds = {"decode_cublas": decode_cublas, "fused": fused}
        self.calls, self.outputs = [], []

    def __call__(self, fn, path, device):
        self.calls.append(path)
        if isinstance(self.seconds[path], Exception):
            raise self.seconds[path]
        self.outputs.append((path, fn()))
        return self.seconds[path]


@contextlib.contextmanager
def _measured_setting():
    """The measured setting on an empty decision table, the table restored afterwards."""
    saved = dict(kernels._SMALL_M_TABLE)
    kernels.clear_small_m_table()
    try:
        with kernels.small_m_threshold(kernels.MEASURED), torch.no_grad():
            yield
    finally:
        kernels.clear_small_m_table()
        kernels._SMALL_M_TABLE.update(saved)


@pytest.fixture
def measured(monkeypatch):
    """The measured setting on an empty decision table, kernels run by the interpreter."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with _measured_setting():
        yield


def test_measured_dispatch_times_each_key_once_and_keeps_the_faster_path(measured):
    if interpreter_gap():
        pytest.skip(interpreter_gap())
    layer = _small_layer("mse-4", out_features=7, in_features=20)
    x = torch.randn(3, 20)
    timer = FakeTimer(decode_cublas=2e-6, fused=1e-6)
    with kernels.small_m_timer(timer):
        assert kernels.takes_small_m_path(layer, x)
        assert timer.calls == ["decode_cublas", "fused"]
        # the timed functions are the two paths on this layer and input: decode + cuBLAS equals the eager product
        # bit for bit, the fused kernel is within its bound
        (_, decoded), (_, fused) = timer.outputs
        assert torch.equal(decoded, torch.nn.functional.linear(x, layer.dequantize_weight(x.dtype), layer.bias))
        _linear_within_bound(fused, x, layer.parts[0], layer.bias, torch.float32)
        (entry,) = kernels.small_m_table()
        assert entry == {"method": "mse", "bits": 4, "per_channel_table": True, "out_features": 7,
                         "in_features": 20, "rows_bucket": 4, "dtype": "float32", "bias": True, "device_type": "cpu",
                         "device_index": None, "fused": True, "decode_cublas_us": 2.0, "fused_us": 1.0, "rows": 3,
                         "error": ""}
        # keyed by content, not by module: another layer of the same kind and a row count of the same bucket reuse
        # the decision without timing
        other = _small_layer("mse-4", out_features=7, in_features=20)
        other.parts[0].scale.mul_(3)
        assert kernels.takes_small_m_path(other, torch.randn(2, 2, 20)) and len(timer.calls) == 2
        assert kernels.takes_small_m_path(layer, torch.randn(5, 20))  # bucket 8: a new key, timed
        assert len(timer.calls) == 4 and len(kernels.small_m_table()) == 2
        # above the hard cap: decode + cuBLAS, nothing timed
        assert not kernels.takes_small_m_path(layer, torch.randn(kernels.MEASURED_MAX_ROWS + 1, 20))
        assert len(timer.calls) == 4
    assert json.loads(json.dumps(kernels.small_m_table())) == kernels.small_m_table()


def test_measured_dispatch_keeps_decode_on_near_ties_and_when_the_fused_kernel_fails(measured):
    near_tie = FakeTimer(decode_cublas=1.0e-6, fused=0.98e-6)  # 2% faster: under MEASURED_MIN_GAIN
    with kernels.small_m_timer(near_tie):
        assert not kernels.takes_small_m_path(_small_layer("kmeans-3"), torch.randn(2, 20))
    failing = FakeTimer(fused=RuntimeError("no kernel for this GPU"))
    with kernels.small_m_timer(failing):
        assert not kernels.takes_small_m_path(_small_layer("kmeans_all-3"), torch.randn(2, 20))
    entry = next(e for e in kernels.small_m_table() if e["method"] == "kmeans_all")
    assert not entry["fused"] and entry["fused_us"] == float("inf") and "no kernel" in entry["error"]
    assert failing.calls == ["decode_cublas", "fused"]


def test_measured_key_is_the_layer_kind(measured):
    def key(option, rows=2, bias=True, dtype=torch.float32, out_features=7):
        layer = _small_layer(option, out_features=out_features, bias=bias)
        return kernels.small_m_key(layer, torch.randn(rows, 20, dtype=dtype))

    assert key("mse-4")[:3] == ("mse", 4, True) and key("kmeans-3")[:3] == ("kmeans", 3, True)
    assert key("kmeans_all-3")[:3] == ("kmeans_all", 3, False)  # one codebook: a per-tensor table
    assert [kernels._rows_bucket(m) for m in (1, 2, 3, 4, 5, 9, 16)] == [1, 2, 4, 4, 8, 16, 16]
    assert len({key("mse-4"), key("mse-4", rows=3), key("mse-4", bias=False), key("mse-4", dtype=torch.float16),
                key("mse-4", out_features=8), key("mse-3"), key("mse-4", rows=2)}) == 6
    assert dict(zip(kernels.SMALL_M_KEY_FIELDS, key("mse-4")))["in_features"] == 20


def test_nothing_is_timed_while_torch_compile_traces(measured):
    """Under tracing the dispatch reads the table (no timing): the cached decision if any, else decode + cuBLAS,
    and nothing is cached for it."""
    layer = _small_layer("kmeans-4").requires_grad_(False)
    x = torch.randn(3, 20)
    timer = FakeTimer()

    def branch(x):  # the decision, as traced: x * 2 where the fused kernel would run
        return x * 2 if kernels.takes_small_m_path(layer, x) else x * 3

    with kernels.small_m_timer(timer):
        torch._dynamo.reset()
        assert torch.equal(torch.compile(branch, backend="eager", fullgraph=True)(x), x * 3)
        assert timer.calls == [] and kernels.small_m_table() == []
        assert kernels.takes_small_m_path(layer, x)  # eager: timed, fused faster
        assert timer.calls == ["decode_cublas", "fused"]
        torch._dynamo.reset()
        assert torch.equal(torch.compile(branch, backend="eager", fullgraph=True)(x), x * 2)
        assert len(timer.calls) == 2


def test_small_m_settings_and_their_errors():
    assert kernels.small_m_setting("auto") == kernels.small_m_setting("") == kernels.MEASURED
    assert kernels.small_m_setting(" Measured ") == kernels.MEASURED
    assert kernels.small_m_setting("0") == 0 and kernels.small_m_setting(16) == 16
    for bad in ("-1", "sixteen", "1.5"):
        with pytest.raises(UserError, match="QUA2SEDIMO_SMALL_M_MAX"):
            kernels.small_m_setting(bad)
    with kernels.small_m_threshold("auto"):
        assert kernels.small_m_max() == kernels.MEASURED
        with kernels.small_m_threshold(0):
            assert not kernels.takes_small_m_path(_small_layer("mse-4").requires_grad_(False), torch.randn(2, 20))
        assert kernels.small_m_max() == kernels.MEASURED


# -- GPU only -------------------------------------------------------------------------------------------------
gpu = pytest.mark.skipif(not CUDA, reason="needs CUDA")


def _linear(options, rows: int, widths, seed: int) -> torch.nn.Module:
    """A packed Linear of ``rows`` outputs whose slices (``options`` [i], ``widths`` [i] inputs) sit side by side."""
    parts = [random_part(o, (rows, w), seed=seed + i) for i, (o, w) in enumerate(zip(options, widths))]
    return packed_layer(torch.nn.Linear(sum(widths), rows), parts, torch.float16)


class _WeightCalls(torch.nn.Module):
    """A forward that asks each layer for its fast weight in turn and copies it, as its GEMM would read it before
    the next call (a CPU stand-in for a model's packed-layer calls); ``skip`` drops the call of that index;
    ``pointers``: where each weight of the last forward lay."""

    def __init__(self, layers, device):
        super().__init__()
        self.layers, self.device, self.skip = torch.nn.ModuleList(layers), torch.device(device), None

    def forward(self, dtype):
        weights, self.pointers = [], []
        for i, layer in enumerate(self.layers):
            if i != self.skip:
                weight = kernels.fast_weight(layer, dtype, self.device)
                self.pointers.append(weight.data_ptr())
                weights.append(weight.clone())
        return weights


# each method in both dtypes, 3 and 4 bits (int32 words) and 6 bits (int64 words), each width in both dtypes but 6
BATCHED_CASES = [("mse-3", torch.float16), ("mse-4", torch.float32), ("kmeans-3", torch.float32),
                 ("kmeans-4", torch.float16), ("kmeans_all-3", torch.float16), ("kmeans_all-6", torch.float32)]


@pytest.mark.parametrize("device", ["cpu"], indirect=True)
@pytest.mark.parametrize("option,dtype", BATCHED_CASES, ids=[f"{o}-{str(d)[6:]}" for o, d in BATCHED_CASES])
def test_batched_decode_equals_the_eager_weights_and_groups_where_the_kernel_is_shared(device, option, dtype):
    """One launch per group of consecutive calls: mixed shapes and a two-slice layer in one group; a row of 5 codes
    (not whole groups), another option, a dense slice break groups; every weight equals the eager one bit for bit
    (the scratch poisoned before each forward)."""
    other = "kmeans-4" if option == "mse-3" else "mse-3"
    layers = [_linear([option], 24, [16], 1), _linear([option], 8, [40], 2),  # 1: 5 groups a row, one tile
              _linear([option, option], 16, [8, 24], 3),  # two slices: the second at column 8
              _linear([option], 3, [5], 5),  # per layer: groups of 8 codes span rows
              _linear([other], 8, [16], 6), _linear([other], 8, [24], 7),  # another option: a group of its own
              _linear([option, "fp16"], 8, [16, 8], 8),  # a dense slice: per layer
              _linear([option], 72, [64], 9), _linear([option], 8, [8], 10)]  # 72 x 8 groups: two programs
    model = _WeightCalls(layers, device)
    expected = [layer.dequantize_weight(dtype) for layer in layers]
    with kernels.batched_decode(model) as batched:
        for forward in range(3):  # records, builds the groups and follows, follows
            for buffer in kernels.SCRATCH.buffers.values():
                buffer.fill_(float("nan"))
            weights = model(dtype)
            assert all(torch.equal(w, e) for w, e in zip(weights, expected)), forward
        assert batched.recorded_calls == 9 and batched.groups == [(0, 3), (4, 6), (7, 9)]
        assert batched.batched_launches == 2 * 3 and batched.batched_calls == 2 * 7
    assert kernels._AHEAD[0] is None


@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_batched_decode_batches_a_mixed_configuration_and_splits_where_words_or_table_dtypes_differ(device):
    """Every method at 3 and 4 bits in a row (and a two-slice layer of two methods) is one group; widths above 4
    bits (int64 words) form their own; a codebook of another dtype starts a new group; the weights equal the eager
    ones bit for bit in both compute dtypes."""
    def layer(options, rows, widths, seed, codebook_dtype=torch.float32):
        parts = [random_part(o, (rows, w), seed=seed + i, codebook_dtype=codebook_dtype)
                 for i, (o, w) in enumerate(zip(options, widths))]
        return packed_layer(torch.nn.Linear(sum(widths), rows), parts, torch.float16).to(device)

    layers = [layer(["mse-3"], 8, [16], 1), layer(["kmeans-4"], 16, [8], 2), layer(["kmeans_all-3"], 24, [16], 3),
              layer(["mse-4", "kmeans-3"], 8, [8, 16], 4), layer(["kmeans_all-4"], 72, [64], 6),  # group 0
              layer(["kmeans-3"], 8, [16], 7, torch.float16), layer(["mse-4"], 8, [16], 8),  # group 1: fp16 books
              layer(["kmeans_all-6"], 8, [16], 9), layer(["mse-8"], 8, [8], 10)]  # group 2: int64 words
    model = _WeightCalls(layers, device)
    for dtype in (torch.float16, torch.float32):
        expected = [layer.dequantize_weight(dtype) for layer in layers]
        with kernels.batched_decode(model) as batched:
            for forward in range(3):  # records, builds the groups and follows, follows
                assert all(torch.equal(w, e) for w, e in zip(_poisoned_forward(model, dtype), expected)), forward
            assert batched.groups == [(0, 5), (5, 7), (7, 9)] and batched.batched_calls == 2 * 9


@pytest.mark.parametrize("device", ["cpu"], indirect=True)
def test_batched_decode_leaves_a_diverging_forward_to_the_layer_path_and_caps_its_groups(device):
    layers = [_linear(["kmeans-3"], 8, [16], i) for i in range(5)]
    model = _WeightCalls(layers, device)
    expected = [layer.dequantize_weight(torch.float16) for layer in layers]
    cap = 2 * 8 * 16 * 2  # the decoded bytes of two layers in float16
    with kernels.batched_decode(model, max_bytes=cap) as batched:
        model(torch.float16)
        assert all(torch.equal(w, e) for w, e in zip(model(torch.float16), expected))
        assert batched.groups == [(0, 2), (2, 4)] and batched.batched_launches == 2
        assert batched.scratch_extra_bytes == 8 * 16 * 2  # two layers' scratch instead of one
        model.skip = 1  # leaves the order at its second call (within the first group): the layer path from there
        assert all(torch.equal(w, e) for w, e in zip(model(torch.float16), expected[:1] + expected[2:]))
        assert batched.recorded_calls is None and batched.batched_launches == 3 and batched.batched_calls == 5
        model(torch.float16)  # records the new order
        assert all(torch.equal(w, e) for w, e in zip(model(torch.float16), expected[:1] + expected[2:]))
        assert batched.recorded_calls == 4 and batched.groups == [(0, 2), (2, 4)]
    assert kernels.batch_groups([layers[0]._fast_plan] * 3, cap) == [(0, 2)]  # a single call is no group


def _poisoned_forward(model, dtype=torch.float16) -> list:
    for buffer in kernels.SCRATCH.buffers.values():  # a weight not decoded in this forward reads NaN
        buffer.fill_(float("nan"))
    return model(dtype)


def _slot_of(pointer: int, device) -> int | None:
    """The scratch slot (float16 buffers) whose memory holds ``pointer``."""
    for slot, key in enumerate([(device, torch.float16), (device, torch.float16, 1)]):
        buffer = kernels.SCRATCH.buffers.get(key)
        if buffer is not None and 0 <= pointer - buffer.data_ptr() < buffer.numel() * buffer.element_size():
            return slot
    return None


@pytest.mark.parametrize("device", ["cpu"], indirect=True)
@pytest.mark.parametrize("lever", ["batched_ahead", "decode_ahead"])
def test_decode_ahead_alternates_scratch_slots_by_unit_and_equals_the_eager_weights(device, lever):
    """Off CUDA the decode "ahead" runs at once (no side stream), into the other scratch slot all the same: each
    call's weight equals the eager one bit for bit and lies in its unit's slot (batched: the groups and the calls
    between them; decode_ahead: each call); a forward that leaves the order decodes layer by layer in slot 0 from
    there, and the next two record and follow anew."""
    layers = [_linear(["mse-4"], 8, [16], 1), _linear(["mse-4"], 16, [8], 2),  # group 0
              _linear(["mse-4"], 3, [5], 3),  # rows of 5 codes: a unit of its own
              _linear(["kmeans-3"], 8, [16], 4), _linear(["kmeans-3"], 8, [24], 5),  # group 1: another kernel
              _linear(["kmeans-3", "fp16"], 8, [8, 8], 6),  # a dense slice: a unit of its own
              _linear(["mse-4"], 8, [8], 7), _linear(["mse-4"], 16, [16], 8)]  # group 2: the largest unit
    model = _WeightCalls(layers, device)
    expected = [layer.dequantize_weight(torch.float16) for layer in layers]
    batched = lever == "batched_ahead"
    units = [0, 0, 1, 2, 2, 3, 4, 4] if batched else list(range(8))
    with (kernels.batched_decode(model, ahead=True) if batched else kernels.decode_ahead(model)) as ahead:
        for forward in range(3):  # records; builds the units, sizes both slots and follows; follows
            assert all(torch.equal(w, e) for w, e in zip(_poisoned_forward(model), expected)), forward
        assert ahead.recorded_calls == 8 and ahead.ahead_decodes == 2 * (units[-1])
        assert [_slot_of(p, device) for p in model.pointers] == [u % 2 for u in units]
        largest_unit = 8 * 8 + 16 * 16 if batched else 16 * 16
        assert ahead.scratch_extra_bytes == (2 * largest_unit - 16 * 16) * 2  # beside one buffer of the largest layer
        if batched:
            assert ahead.groups == [(0, 2), (3, 5), (6, 8)]
            assert ahead.batched_launches == 2 * 3 and ahead.batched_calls == 2 * 6
        model.skip = 4  # leaves the order at call 4 (group 1's second call; decoded ahead in the batched case)
        weights = _poisoned_forward(model)
        assert all(torch.equal(w, e) for w, e in zip(weights, expected[:4] + expected[5:]))
        assert [_slot_of(p, device) for p in model.pointers[4:]] == [0, 0, 0] and ahead.recorded_calls is None
        for forward in range(2):  # records the new order, then follows it
            assert all(torch.equal(w, e) for w, e in zip(_poisoned_forward(model), expected[:4] + expected[5:]))
        assert ahead.recorded_calls == 7 and (not batched or ahead.groups == [(0, 2), (5, 7)])
    assert kernels._AHEAD[0] is None


@gpu
@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_cuda_forward_takes_the_fast_path_and_equals_eager(kind):
    layer = _layer(kind, "cuda", ("mse-4", "kmeans-3")).half()
    x = torch.randn(4, *((10,) if kind == "linear" else (4, 9, 9)), device="cuda", dtype=torch.float16)
    with torch.no_grad():
        fast = layer(x)
        assert "_fast_plan" in layer.__dict__
        again = layer(x)  # the second forward launches through the compiled kernel's launcher directly
        with kernels.use_packed_kernels(False):
            eager = layer(x)
    assert torch.equal(fast, eager) and torch.equal(again, eager)
    launches = [launch for launch in layer._fast_plan.launches if launch[0] == "decode"]
    assert launches and all(launch[2] is not None for launch in launches)  # ("decode", DecodeLaunch, launcher)


@gpu
@kernels.small_m_threshold(0)  # the decode + cuBLAS path: bit-exact
def test_cuda_graph_replay_equals_eager():
    layers = torch.nn.Sequential(_layer("linear", "cuda", ("mse-4",)), torch.nn.ReLU(),
                                 packed_layer(torch.nn.Linear(6, 10), [random_part("kmeans_all-3", (10, 6), 5)],
                                              torch.float16).cuda()).half()
    x = torch.randn(8, 10, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        with kernels.use_packed_kernels(False):
            eager = layers(x)
        layers(x)  # warm-up: compiles the kernel, sizes the scratch
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = layers(x)
        x.copy_(torch.randn_like(x))
        graph.replay()
        with kernels.use_packed_kernels(False):
            eager = layers(x)
    assert torch.equal(out, eager)


class _Chain(torch.nn.Module):
    """Packed layers in a row: one called twice, a split layer with a dense half; ``skip`` drops a call."""

    def __init__(self):
        super().__init__()
        half = torch.float16
        self.a = packed_layer(torch.nn.Linear(16, 24), [random_part("mse-4", (24, 16), seed=11)], half)
        self.b = packed_layer(torch.nn.Linear(24, 24), [random_part("kmeans-3", (24, 8), seed=12),
                                                        random_part("fp16", (24, 16), seed=13)], half)
        self.c = packed_layer(torch.nn.Linear(24, 16), [random_part("kmeans_all-4", (16, 24), seed=14)], half)
        self.skip = False

    def forward(self, x):
        h = self.b(torch.relu(self.a(x)))
        if not self.skip:
            h = self.b(torch.tanh(h))
        return self.a(self.c(h))


@gpu
@kernels.small_m_threshold(0)  # decode + cuBLAS everywhere (bit-exact)
def test_cuda_decode_ahead_is_bit_identical_follows_the_recorded_order_and_is_captured():
    model = _Chain().cuda().half()  # fp16 biases too: the layers compute in fp16
    inputs = [torch.randn(64, 16, device="cuda", dtype=torch.float16) for _ in range(2)]
    with torch.no_grad():
        reference = [model(x) for x in inputs]  # decode ahead off
        model.skip = True
        skipped = model(inputs[0])
        model.skip = False
        with kernels.decode_ahead(model) as ahead:
            assert torch.equal(model(inputs[0]), reference[0])  # records the order of the 5 packed calls
            assert ahead.recorded_calls == 5 and ahead.ahead_decodes == 0
            for _ in range(2):  # follow it: calls 1..4 decoded ahead on the side stream
                assert torch.equal(model(inputs[1]), reference[1])
            assert ahead.ahead_decodes == 8
            model.skip = True  # leaves the order at the third call: joins, decodes on the main stream, re-records
            assert torch.equal(model(inputs[0]), skipped) and ahead.recorded_calls is None
            assert torch.equal(model(inputs[0]), skipped) and ahead.recorded_calls == 4
            model.skip = False
            for x, expected in [(inputs[0], reference[0])] * 3:  # leaves, records, follows
                assert torch.equal(model(x), expected)
            assert ahead.recorded_calls == 5
            before = ahead.ahead_decodes
            x = inputs[0].clone()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):  # the side stream forks from and joins the capture stream
                out = model(x)
            assert ahead.ahead_decodes == before + 4
            for source, expected in zip(inputs[::-1], reference[::-1]):
                x.copy_(source)
                graph.replay()
                torch.cuda.synchronize()
                assert torch.equal(out, expected)
        assert torch.equal(model(inputs[1]), reference[1])  # removed: the ordinary path again
        assert kernels._AHEAD[0] is None


@gpu
@kernels.small_m_threshold(0)  # decode + cuBLAS everywhere (bit-exact)
def test_cuda_batched_decode_is_bit_identical_eager_and_under_graph_capture():
    model = _Chain().cuda().half()  # a, b (kmeans-3 + dense: per layer), b, c, a: c and a batch (two methods)
    wide = torch.nn.Sequential(*[packed_layer(torch.nn.Linear(24, 24), [random_part("mse-4", (24, 24), seed=20 + i)],
                                              torch.float16) for i in range(4)]).cuda().half()
    inputs = [torch.randn(64, 16, device="cuda", dtype=torch.float16) for _ in range(2)]
    with torch.no_grad():
        reference = [wide(model(x)) for x in inputs]  # batched decode off
        with kernels.batched_decode(model) as chain, kernels.batched_decode(wide) as batched:
            for _ in range(3):  # records, builds and follows, follows
                assert all(torch.equal(wide(model(x)), expected) for x, expected in zip(inputs, reference))
            # 6 forwards: the first records, the other 5 follow the groups (4 calls each)
            assert batched.groups == [(0, 4)] and chain.groups == [(3, 5)] and batched.batched_calls == 5 * 4
            x = inputs[0].clone()
            graph = torch.cuda.CUDAGraph()
            launches = batched.batched_launches
            with torch.cuda.graph(graph):
                out = wide(model(x))
            assert batched.batched_launches == launches + 1
            for source, expected in zip(inputs[::-1], reference[::-1]):
                x.copy_(source)
                graph.replay()
                torch.cuda.synchronize()
                assert torch.equal(out, expected)
        assert torch.equal(wide(model(inputs[1])), reference[1])
        assert kernels._AHEAD[0] is None


class _Groups(torch.nn.Module):
    """Runs of packed layers that batch (UAQ-4, K-Means-C-6: int64 words, so a group of its own, UAQ-4 again: the
    first two layers called a second time), a layer with a dense slice between, tanh after each; before each layer the GPU sleeps ``sleep`` cycles,
    so that the host queues far ahead of the GPU (a decode into a slot whose readers have not run yet would show);
    ``skip`` drops the call of that index."""

    def __init__(self, width: int = 64):
        super().__init__()

        def layer(options, seed):
            widths = [width // len(options)] * len(options)
            return packed_layer(torch.nn.Linear(width, width), [random_part(o, (width, w), seed=seed + i)
                                                                for i, (o, w) in enumerate(zip(options, widths))],
                                torch.float16)

        uaq = [layer(["mse-4"], 30 + i) for i in range(3)]
        self.calls = torch.nn.ModuleList(uaq + [layer(["kmeans-3", "fp16"], 40)]
                                         + [layer(["kmeans-6"], 50 + i) for i in range(3)] + uaq[:2])
        self.skip, self.sleep = None, 0

    def forward(self, x):
        for i, layer in enumerate(self.calls):
            if i != self.skip:
                if self.sleep:
                    torch.cuda._sleep(self.sleep)
                x = torch.tanh(layer(x))
        return x


@gpu
@kernels.small_m_threshold(0)  # decode + cuBLAS everywhere (bit-exact)
def test_cuda_batched_decode_ahead_is_bit_identical_leaves_a_diverging_forward_and_is_captured():
    model = _Groups().cuda().half()
    model.sleep = 200_000  # about 0.1 ms a layer: the host runs ahead, the side stream must wait for the slot's readers
    inputs = [torch.randn(256, 64, device="cuda", dtype=torch.float16) for _ in range(2)]
    with torch.no_grad():
        reference = [model(x) for x in inputs]  # per-layer decode
        model.skip = 5  # the second K-Means layer
        skipped = model(inputs[0])
        model.skip = None
        with kernels.batched_decode(model, ahead=True) as ahead:
            assert torch.equal(model(inputs[0]), reference[0])  # records the order of the 9 packed calls
            assert ahead.recorded_calls == 9 and ahead.groups is None and ahead.ahead_decodes == 0
            for _ in range(2):  # builds the units (3 groups, the dense-slice layer alone) and follows them
                assert torch.equal(model(inputs[1]), reference[1])
            assert ahead.groups == [(0, 3), (4, 7), (7, 9)]
            assert ahead.ahead_decodes == 2 * 3 and ahead.batched_launches == 2 * 3 and ahead.batched_calls == 2 * 8
            model.skip = 5  # leaves the order within group 1, decoded ahead: joins, decodes layer by layer
            assert torch.equal(model(inputs[0]), skipped) and ahead.recorded_calls is None
            model.skip = None
            for _ in range(2):  # records, builds and follows
                assert torch.equal(model(inputs[0]), reference[0])
            assert ahead.recorded_calls == 9
            before = ahead.ahead_decodes, ahead.batched_launches
            x = inputs[0].clone()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):  # the side stream forks from and joins the capture stream
                out = model(x)
            assert (ahead.ahead_decodes, ahead.batched_launches) == (before[0] + 3, before[1] + 3)
            for _ in range(2):
                for source, expected in zip(inputs[::-1], reference[::-1]):
                    x.copy_(source)
                    graph.replay()
                    torch.cuda.synchronize()
                    assert torch.equal(out, expected)
            model.skip = 5  # eager forwards drop the captured order and build another one's descriptors ...
            for _ in range(3):
                assert torch.equal(model(inputs[0]), skipped)
            model.skip = None
            x.copy_(inputs[1])
            graph.replay()  # ... while the graph still reads the captured order's, kept alive
            torch.cuda.synchronize()
            assert torch.equal(out, reference[1])
        assert torch.equal(model(inputs[1]), reference[1])  # removed: the ordinary path again
        assert kernels._AHEAD[0] is None


@gpu
def test_inductor_compiled_layer_equals_eager():
    torch._dynamo.reset()
    layer = _layer("linear", "cuda", ("mse-3", "fp16")).half()
    x = torch.randn(16, 10, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        compiled = torch.compile(layer, fullgraph=True)(x)
        with kernels.use_packed_kernels(False):
            eager = layer(x)
    assert torch.equal(compiled, eager)


@gpu
@pytest.mark.parametrize("option", ["mse-4", "kmeans-3", "kmeans_all-3"])
@pytest.mark.parametrize("rows", [1, 2, 16, 240])
def test_cuda_small_m_forward_takes_the_fused_kernel_within_bound(option, rows):
    """A PackedLinear on few rows runs the fused kernel (compiled, direct launches after the first) within its
    bound of the float64 product; above the threshold it decodes + cuBLAS, bit-exact with eager."""
    layer = _small_layer(option, out_features=1152, in_features=1152, device="cuda").half()
    x = torch.randn(rows, 1152, device="cuda", dtype=torch.float16)
    kernels._LINEAR_RUNNERS.clear()
    with torch.no_grad(), kernels.small_m_threshold(256):
        first, again = layer(x), layer(x)
        assert kernels._LINEAR_RUNNERS  # the fused kernel ran, then launched directly
        with kernels.small_m_threshold(rows - 1):
            decoded = layer(x)
        with kernels.use_packed_kernels(False):
            eager = layer(x)
    assert torch.equal(first, again) and torch.equal(decoded, eager)
    _linear_within_bound(first, x, layer.parts[0], layer.bias, torch.float16)


@gpu
@kernels.small_m_threshold(256)  # on, whatever the default
def test_cuda_small_m_graph_replay_and_inductor_are_within_bound():
    torch._dynamo.reset()
    layer = _small_layer("kmeans-4", out_features=300, in_features=200, device="cuda").half()
    x = torch.randn(2, 200, device="cuda", dtype=torch.float16)
    kernels._LINEAR_RUNNERS.clear()
    with torch.no_grad():
        layer(x)  # warm-up: compiles the kernel, allocates the split-K counters
        assert kernels._LINEAR_RUNNERS  # the fused kernel ran
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = layer(x)
        x.copy_(torch.randn_like(x))
        graph.replay()
        assert torch.equal(out, layer(x))
        _linear_within_bound(out, x, layer.parts[0], layer.bias, torch.float16)
        compiled = torch.compile(layer, fullgraph=True)(x)
    assert torch.equal(compiled, out)


@pytest.fixture
def measured_on_gpu():
    """The measured setting on an empty decision table, compiled kernels."""
    with _measured_setting():
        yield


class CountingTimer:
    """The real GPU timer, counting its calls."""

    def __init__(self):
        self.calls = []

    def __call__(self, fn, path, device):
        self.calls.append(path)
        return kernels.gpu_time(fn, path, device)


@gpu
@pytest.mark.parametrize("option", ["mse-4", "kmeans-3", "kmeans_all-3"])
def test_cuda_measured_dispatch_is_within_bound_and_times_each_key_once(option, measured_on_gpu):
    """Real GPU timings of both paths on a K/V-sized layer: the decision's path is within the fused bound of the
    float64 product (bit-exact with eager where decode + cuBLAS was chosen), the same on every later call."""
    layer = _small_layer(option, out_features=1152, in_features=1152, device="cuda").half()
    timer = CountingTimer()
    with kernels.small_m_timer(timer):
        for rows in (1, 2, 16, 17):
            x = torch.randn(rows, 1152, device="cuda", dtype=torch.float16)
            first, again = layer(x), layer(x)
            with kernels.use_packed_kernels(False):
                eager = layer(x)
            assert torch.equal(first, again)
            entries = {e["rows_bucket"]: e for e in kernels.small_m_table()}
            if rows > kernels.MEASURED_MAX_ROWS:
                assert kernels._rows_bucket(rows) not in entries and torch.equal(first, eager)
                continue
            entry = entries[kernels._rows_bucket(rows)]
            assert 0 < entry["decode_cublas_us"] < 1e4 and 0 < entry["fused_us"] < 1e4 and not entry["error"]
            assert entry["fused"] == (entry["fused_us"] < (1 - kernels.MEASURED_MIN_GAIN) * entry["decode_cublas_us"])
            if entry["fused"]:
                _linear_within_bound(first, x, layer.parts[0], layer.bias, torch.float16)
            else:  # decode + cuBLAS: the eager path's bits
                assert torch.equal(first, eager)
    assert len(timer.calls) == 2 * 3  # buckets 1, 2, 16 timed once each (two paths); 17 rows never


def _two_layer_model():
    return torch.nn.Sequential(
        packed_layer(torch.nn.Linear(200, 300), [random_part("kmeans-4", (300, 200), seed=8)], torch.float16),
        torch.nn.ReLU(),
        packed_layer(torch.nn.Linear(300, 200), [random_part("mse-4", (200, 300), seed=9)], torch.float16),
    ).cuda().half().requires_grad_(False)


@gpu
@pytest.mark.parametrize("timing", ["gpu", "fused_faster", "decode_faster"])
def test_cuda_graph_and_compile_after_tune_small_m_use_the_table_and_time_nothing(timing, measured_on_gpu):
    """tune_small_m fills the table (real GPU timings, or injected ones forcing each path); then CUDA-graph capture
    and torch.compile time nothing and replay / run the warmed decisions: outputs equal the eager forward's."""
    torch._dynamo.reset()
    model = _two_layer_model()
    x = torch.randn(2, 200, device="cuda", dtype=torch.float16)
    timer = CountingTimer() if timing == "gpu" else FakeTimer(*((2e-6, 1e-6) if timing == "fused_faster" else
                                                               (1e-6, 2e-6)))
    kernels._LINEAR_RUNNERS.clear()
    with kernels.small_m_timer(timer):
        entries = kernels.tune_small_m(model, x)
        assert [(e["out_features"], e["in_features"], e["rows_bucket"]) for e in entries] == [(300, 200, 2),
                                                                                            (200, 300, 2)]
        assert len(timer.calls) == 4
        if timing != "gpu":
            assert all(e["fused"] == (timing == "fused_faster") for e in entries)
        eager = model(x)
        assert len(timer.calls) == 4  # the table is warm: an eager forward times nothing more
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = model(x)
        x.copy_(torch.randn_like(x))
        graph.replay()
        eager = model(x)
        assert torch.equal(out, eager)
        compiled = torch.compile(model, fullgraph=True)(x)
        assert torch.equal(compiled, eager) and len(timer.calls) == 4
    if timing == "fused_faster":
        assert kernels._LINEAR_RUNNERS  # the fused kernel really ran
    # each layer as dispatched: within the fused bound of its float64 product, or decode + cuBLAS with eager's bits
    hidden = x
    for layer, entry in zip((model[0], model[2]), entries):
        out = layer(hidden)
        if entry["fused"]:
            _linear_within_bound(out, hidden, layer.parts[0], layer.bias, torch.float16)
        else:
            with kernels.use_packed_kernels(False):
                assert torch.equal(out, layer(hidden))
        hidden = torch.relu(out)


@gpu
def test_cuda_capture_without_a_warm_table_times_nothing_and_decodes(measured_on_gpu):
    layer = _small_layer("kmeans-3", out_features=300, in_features=200, device="cuda").half().requires_grad_(False)
    x = torch.randn(2, 200, device="cuda", dtype=torch.float16)
    timer = CountingTimer()
    with kernels.small_m_timer(timer):
        with kernels.small_m_threshold(0):
            layer(x)  # warm-up for capture (decode kernel compiled, scratch sized), nothing measured
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = layer(x)
        graph.replay()
        assert timer.calls == [] and kernels.small_m_table() == []  # capture never times, caches nothing
        with kernels.use_packed_kernels(False):
            assert torch.equal(out, layer(x))  # decode + cuBLAS: bit-exact with eager
