"""Export a configuration as a real packed model, and load it back: sub-4-bit weights on disk and in memory.

    export_quantized(denoiser, family, config, mq, "out/pixart_35")      # writes three files:
        config.json              the denoiser's diffusers config (rebuilds its structure)
        quantized.safetensors    packed codes + quantizer parameters of every quantized layer, and every
                                 other parameter / persistent buffer of the denoiser (FP, as exported)
        quantization.json        family, configuration, per-layer options / shapes / splits / ties,
                                 avg_bits, byte breakdown, multiquantizer hash, versions
        interop.json             the configuration for other tools: torchao per-module map, the
                                 modules_to_not_convert skip list, codebook layers (multiquant/interop.py)
    denoiser = load_quantized("out/pixart_35", device="cuda", dtype=torch.float16)
    swap_denoiser(pipe, denoiser)                                       # pipe.transformer / pipe.unet

The structure is rebuilt with its parameters on the meta device (buffers are computed as usual), quantized
layers are swapped for :mod:`multiquant.packed` modules and every tensor is loaded straight to ``device``:
no dense copy of a quantized weight is ever made (each is dequantized for the duration of its forward).

Layers at option ``fp16`` stay ordinary modules. A split layer is one packed module with two slices (a slice
may itself be ``fp16``: stored dense). Tied copies (DiT's per-block timestep MLPs) store their codes once and
share the canonical layer's slices in memory; their biases stay their own.

Exactness: in the dtype it was exported in, a loaded model equals the simulated configuration
(``config.quantize_``) bit for bit: UAQ scales stay float32, codebooks are stored in the weights' dtype
(rounding a codebook before or after the lookup gives the same values).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
import time
import uuid
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from . import kernels
from .adapters.diffusers.loading import swap_denoiser  # noqa: F401  (public here: a pipeline takes an export)
from .checkpoint import MultiQuantizer, _versions
from .config import applier_of, config_record, validate_config
from .errors import InputError, UserError
from .families import FamilySpec
from .interop import interop_plan, write_interop
from .options import FP_OPTION, Option
from .packed import KEEP_DTYPE, PACKED_CLASSES, PackedWeight, packed_layer
from .packing import packed_nbytes
from .utils import atomic_path

FORMAT = "qua2sedimo-packed"
FORMAT_VERSION = 1
WEIGHTS_NAME = "quantized.safetensors"
INFO_NAME = "quantization.json"
CONFIG_NAME = "config.json"


class ExportError(UserError, ValueError):
    """An export directory that cannot be loaded (missing, incomplete, from another model or version)."""


# ------------------------------------------------------------------------------------------- layout
def packed_layout(config: dict, mq: MultiQuantizer, model: nn.Module) -> "OrderedDict[str, dict]":
    """``{module path: {"type", "weight_shape", "parts": [...]}}`` for every module with a quantized slice.

    A part is ``{"key", "option", "cols", "shape", "tied_to"}``; ``tied_to`` = ``[module path, part index]``
    of the canonical slice whose codes it shares (quantized tied copies only)."""
    by_path: "OrderedDict[str, list]" = OrderedDict()
    for ref in mq.layers:
        by_path.setdefault(ref.path, []).append(ref)
    index_of = {ref.key: (ref.path, i) for refs in by_path.values()
                for i, ref in enumerate(sorted(refs, key=lambda r: r.cols or (0, 0)))}
    layout = OrderedDict()
    for path, refs in by_path.items():
        refs = sorted(refs, key=lambda r: r.cols or (0, 0))
        if all(config[r.key] == FP_OPTION for r in refs):
            continue  # stays an ordinary module
        module = model.get_submodule(path)
        if type(module) not in PACKED_CLASSES:
            raise ExportError(f"layer {path} is a {type(module).__name__}; only nn.Linear/Conv1d/Conv2d can be packed")
        parts = []
        for ref in refs:
            option = config[ref.key]
            tied = list(index_of[ref.tied_to]) if ref.tied_to and option != FP_OPTION else None
            parts.append({"key": ref.key, "option": option, "cols": list(ref.cols) if ref.cols else None,
                          "shape": list(ref.shape), "tied_to": tied})
        layout[path] = {"type": type(module).__name__, "weight_shape": list(module.weight.shape), "parts": parts}
    return layout


def _part_tensors(layout: dict, mq: MultiQuantizer, model: nn.Module) -> "OrderedDict[str, torch.Tensor]":
    """State-dict entries of the packed slices (``{path}.parts.{i}.{codes|scale|zero|codebook|dense}``)."""
    out = OrderedDict()
    for path, entry in layout.items():
        weight = model.get_submodule(path).weight
        for i, part in enumerate(entry["parts"]):
            prefix = f"{path}.parts.{i}."
            if part["tied_to"]:
                continue  # shares the canonical slice's tensors
            if part["option"] == FP_OPTION:
                cols = part["cols"] or [0, weight.shape[1]]
                out[prefix + "dense"] = weight.detach()[:, cols[0]:cols[1]]
                continue
            option = Option.parse(part["option"])
            for name in ("codes", *option.spec.params):  # an untied layer: the checkpoint holds its own tensors
                value = mq.tensors[f"{part['key']}|{part['option']}|{name}"]
                if name == "codebook":
                    value = value.to(weight.dtype)  # exact: see the module docstring
                out[prefix + name] = value
            expected = packed_nbytes(_numel(part["shape"]), option.bits)
            if out[prefix + "codes"].numel() != expected:
                raise ExportError(f"multiquantizer codes of {part['key']} ({part['option']}) have "
                                  f"{out[prefix + 'codes'].numel()} bytes, expected {expected}: "
                                  f"the checkpoint is corrupt or from another model; rebuild it")
    return out


def _fp_tensors(model: nn.Module, layout: dict) -> tuple["OrderedDict[str, torch.Tensor]", dict[str, str]]:
    """Every persistent parameter/buffer except the packed weights; shared tensors once (``aliases``)."""
    replaced = {f"{path}.weight" for path in layout}
    out, aliases, seen = OrderedDict(), {}, {}
    for name, tensor in model.state_dict().items():
        if name in replaced:
            continue
        tensor = tensor.detach()
        identity = (tensor.device, tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tuple(tensor.stride()))
        if tensor.numel() and identity in seen:
            aliases[name] = seen[identity]
            continue
        seen[identity] = name
        out[name] = tensor
    return out, aliases


def _category(name: str) -> str:
    leaf = name.rsplit(".", 1)[-1]
    if ".parts." in name:
        return {"codes": "codes", "dense": "dense_slices"}.get(leaf, "quant_params")
    return "fp_tensors"


def _nbytes(tensors: dict) -> dict:
    sizes = {"codes": 0, "quant_params": 0, "dense_slices": 0, "fp_tensors": 0}
    for name, t in tensors.items():
        sizes[_category(name)] += t.numel() * t.element_size()
    sizes["total"] = sum(sizes.values())
    return sizes


def _manifest_hash(mq: MultiQuantizer) -> str:
    return hashlib.sha256(json.dumps(mq.manifest, sort_keys=True).encode()).hexdigest()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _parse_dtype(name) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    dtype = getattr(torch, str(name).replace("torch.", ""), None)
    if not isinstance(dtype, torch.dtype):
        raise InputError(f"unknown dtype {name!r}; use e.g. float16, bfloat16, float32")
    return dtype


def _model_dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _own_dtypes(model: nn.Module, layout: dict) -> dict[str, str]:
    """``{name: dtype}`` of every floating parameter/buffer (non-persistent ones included) whose dtype is not
    the model's, e.g. a positional table diffusers leaves in float32 in an fp16 model: the loaded model keeps
    these dtypes, so it is the model that was scored, bit for bit."""
    model_dtype, replaced = _model_dtype(model), {f"{path}.weight" for path in layout}
    tensors = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    return {name: _dtype_name(t.dtype) for name, t in tensors
            if t.is_floating_point() and t.dtype != model_dtype and name not in replaced}


# ------------------------------------------------------------------------------------------- export
def export_quantized(denoiser: nn.Module, family: FamilySpec, config: dict, mq: MultiQuantizer,
                     out_dir: str | os.PathLike, verify_weights: bool = True) -> Path:
    """Write ``config`` applied to ``denoiser`` as a packed model directory; returns ``out_dir``.

    ``denoiser`` holds the FP weights ``mq`` was built from (checked unless ``verify_weights=False``; export
    before ``quantize_`` rewrites them); its dtype is the dtype of the stored FP tensors and codebooks
    (export an fp16 denoiser for an fp16 model). ``config``: ``{key: "method-bits" | "fp16"}``, validated
    against the checkpoint (missing tied copies follow their canonical layer). A denoiser holding a
    simulated configuration (``quantize_``) is exported from its FP weights and left as it was."""
    applier = applier_of(denoiser)
    if applier is not None and any(option != FP_OPTION for option in applier.current.values()):
        simulated = OrderedDict(applier.current)
        applier.restore()
        try:
            return export_quantized(denoiser, family, config, mq, out_dir, verify_weights)
        finally:
            applier.apply(simulated)
    mq.check_compatible(denoiser, family, verify_weights=verify_weights)
    config = validate_config(config, mq.layers, options=mq.options)
    layout = packed_layout(config, mq, denoiser)
    fp, aliases = _fp_tensors(denoiser, layout)
    tensors = OrderedDict(list(_part_tensors(layout, mq, denoiser).items()) + list(fp.items()))
    tensors = OrderedDict((k, v.to("cpu").contiguous()) for k, v in tensors.items())
    sizes = _nbytes(tensors)
    quantized_numel = sum(_numel(p["shape"]) for e in layout.values() for p in e["parts"]
                          if p["option"] != FP_OPTION and not p["tied_to"])
    record = config_record(config, mq.table, mq.fp_prec, mq.fp_bytes)
    export_id = uuid.uuid4().hex
    info = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "export_id": export_id, "family": family.name,
        "model_class": type(denoiser).__name__, "dtype": _dtype_name(_model_dtype(denoiser)),
        "structure": CONFIG_NAME if hasattr(denoiser, "to_json_string") else None,
        # plain nn.Module families: which factory size rebuilds this structure on load (None: pass a skeleton)
        "module_size": None if hasattr(denoiser, "to_json_string") else module_size_of(family, denoiser),
        "avg_bits": record["avg_bits"], "quantized_size": record["quantized_size"],
        "stored_bits_per_quantized_weight": 8 * (sizes["codes"] + sizes["quant_params"]) / max(1, quantized_numel),
        "bytes": sizes, "num_packed_modules": len(layout),
        "num_fp16_layers": sum(1 for o in config.values() if o == FP_OPTION),
        "multiquantizer": {"manifest_sha256": _manifest_hash(mq), "content_hash": mq.content_hash,
                           "weight_hash": mq.manifest.get("weight_hash"),
                           "model_id": mq.manifest.get("model_id"), "revision": mq.manifest.get("revision"),
                           "options": mq.options},
        "versions": _versions(), "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "config": dict(config), "layers": layout, "aliases": aliases,
        "own_dtypes": _own_dtypes(denoiser, layout),
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    if info["structure"]:
        with atomic_path(out_dir / CONFIG_NAME) as tmp:
            tmp.write_text(denoiser.to_json_string())
    with atomic_path(out_dir / WEIGHTS_NAME) as tmp:
        save_file(tensors, str(tmp), metadata={"format": FORMAT, "export_id": export_id})
    write_interop(interop_plan(config, mq.layers, denoiser), out_dir)  # torchao map + skip list (interop.py)
    with atomic_path(out_dir / INFO_NAME) as tmp:  # written last: its presence marks a complete export
        tmp.write_text(json.dumps(info, indent=1))
    return out_dir


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


# --------------------------------------------------------------------------------------------- load
@contextlib.contextmanager
def parameters_on_meta():
    """Build modules with every parameter on the meta device (no memory, no init cost) while buffers are
    computed for real, so non-persistent ones (positional tables, ...) need not be stored."""
    register = nn.Module.register_parameter

    def register_on_meta(module, name, param):
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def read_export_info(out_dir: str | os.PathLike) -> dict:
    """The ``quantization.json`` of an export directory, checked for format and version."""
    out_dir = Path(out_dir)
    path = out_dir / INFO_NAME
    if not path.is_file():
        hint = " (the export did not finish: re-run it)" if (out_dir / WEIGHTS_NAME).exists() else ""
        raise FileNotFoundError(f"{path} does not exist{hint}: write an export with `qua2sedimo export --model ... "
                                f"--q_config ... --out {out_dir}` (multiquant.export.export_quantized)")
    info = json.loads(path.read_text())
    if info.get("format") != FORMAT:
        raise ExportError(f"{path} is not a {FORMAT} export (format={info.get('format')!r})")
    if info.get("format_version", 0) > FORMAT_VERSION:
        raise ExportError(f"{path} has format version {info['format_version']}, this qua2sedimo reads up to "
                          f"{FORMAT_VERSION}: upgrade qua2sedimo")
    return info


def _state_shapes(model: nn.Module) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def module_size_of(family: FamilySpec, denoiser: nn.Module) -> str | None:
    """``"full"`` or ``"tiny"``: the factory size whose module has ``denoiser``'s state-dict names and shapes."""
    if family.factory is None and family.loader is None:
        return None
    wanted = _state_shapes(denoiser)
    for size in ("full", "tiny") if family.factory is not None else ("full",):
        try:
            candidate = _structure(family, size)
        except Exception:  # noqa: BLE001 - a factory that cannot build this size is simply not a match
            continue
        if _state_shapes(candidate) == wanted:
            return size
    return None


def _structure(family: FamilySpec, size: str) -> nn.Module:
    """The family's module of ``size``: from its factory with parameters on the meta device; a loader-only family's
    from its loader (real weights on the CPU: the loader may read them into its module, which meta tensors cannot
    take), which the export's tensors then replace."""
    if family.factory is None:
        return family.build(size)
    with parameters_on_meta():
        return family.build(size)


def _module_skeleton(out_dir: Path, info: dict) -> nn.Module:
    """A plain-module family's structure from its factory (parameters on the meta device)."""
    from .families import get_family

    size = info.get("module_size")
    if size is None:
        raise ExportError(f"{out_dir} holds no diffusers config and its family's factory does not rebuild the "
                          f"exported module: pass load_quantized(..., skeleton=model), e.g. built inside "
                          f"`with parameters_on_meta():`")
    try:
        family = get_family(info["family"])
    except KeyError:
        raise ExportError(f"{out_dir} was exported from family {info['family']!r}, which is not registered here: "
                          f"import the module that registers it (CLI: --family my_pkg.my_module:FAMILY)") from None
    return _structure(family, size)


def _skeleton(out_dir: Path, info: dict) -> nn.Module:
    if not info.get("structure"):
        return _module_skeleton(out_dir, info)
    config = json.loads((out_dir / info["structure"]).read_text())
    import diffusers

    cls = getattr(diffusers, config.get("_class_name", info["model_class"]), None)
    if cls is None:
        raise ExportError(f"diffusers {diffusers.__version__} has no class {config.get('_class_name')!r}: "
                          f"install the diffusers version that exported it ({info['versions'].get('diffusers')})")
    with parameters_on_meta():
        return cls.from_config(config)


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)


def install_packed_modules(model: nn.Module, layout: dict, compute_dtype: torch.dtype,
                           device="meta") -> dict[str, nn.Module]:
    """Replace every module of ``layout`` by its packed version (empty slices on ``device``; tied slices
    shared with their canonical module). Returns ``{path: packed module}``."""
    installed = {}
    for path, entry in layout.items():
        dense = model.get_submodule(path)
        if type(dense).__name__ != entry["type"] or list(dense.weight.shape) != entry["weight_shape"]:
            raise ExportError(f"layer {path}: the model has a {type(dense).__name__} {list(dense.weight.shape)}, the "
                              f"export a {entry['type']} {entry['weight_shape']}: config.json and quantization.json "
                              f"are from different models")
        parts = [PackedWeight(p["option"], p["shape"], device=device) for p in entry["parts"]]
        installed[path] = packed_layer(dense, parts, compute_dtype)
        _set_submodule(model, path, installed[path])
    for path, entry in layout.items():  # share tied slices once every canonical module exists
        for i, part in enumerate(entry["parts"]):
            if part["tied_to"]:
                canonical_path, j = part["tied_to"]
                installed[path].parts[i] = installed[canonical_path].parts[j]
    return installed


def _assign(model: nn.Module, name: str, tensor: torch.Tensor, dtype: torch.dtype,
            own_dtypes: dict[str, str] | None = None) -> None:
    path, _, attr = name.rpartition(".")
    module = model.get_submodule(path) if path else model
    slots = module._parameters if attr in module._parameters else module._buffers if attr in module._buffers else None
    if slots is None:
        raise ExportError(f"{WEIGHTS_NAME} holds {name!r}, which the model does not have: the export and "
                          f"config.json are from different models")
    expected = slots[attr]
    if expected is not None and tuple(expected.shape) != tuple(tensor.shape):
        raise ExportError(f"{name}: stored shape {tuple(tensor.shape)} != model shape {tuple(expected.shape)}")
    keep = isinstance(module, PackedWeight) and attr in KEEP_DTYPE
    target = _parse_dtype((own_dtypes or {}).get(name, dtype))
    if tensor.is_floating_point() and not keep and tensor.dtype != target:
        tensor = tensor.to(target)
    slots[attr] = nn.Parameter(tensor, requires_grad=False) if slots is module._parameters else tensor


def _settle_remaining(model: nn.Module, device: torch.device, dtype: torch.dtype,
                      own_dtypes: dict[str, str] | None = None) -> None:
    """Buffers built at construction (not in the file) to ``device``/``dtype`` (or the dtype they had in the
    exported model, ``own_dtypes``); fail on anything left empty."""
    for path, module in model.named_modules(remove_duplicate=False):
        for kind, slots in (("parameter", module._parameters), ("buffer", module._buffers)):
            for attr, t in slots.items():
                if t is None:
                    continue
                if t.device.type == "meta":
                    raise ExportError(f"{kind} {path + '.' if path else ''}{attr} is missing from {WEIGHTS_NAME}: "
                                      f"the file is incomplete or from another model; re-export")
                keep = isinstance(module, PackedWeight) and attr in KEEP_DTYPE
                name = f"{path}.{attr}" if path else attr
                if t.is_floating_point() and name in (own_dtypes or {}):
                    target = _parse_dtype(own_dtypes[name])
                else:
                    target = dtype if t.is_floating_point() and not keep else t.dtype
                if t.device != device or t.dtype != target:
                    moved = t.to(device=device, dtype=target)
                    slots[attr] = nn.Parameter(moved, requires_grad=False) if kind == "parameter" else moved


def _load_device(device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def load_quantized(out_dir: str | os.PathLike, device="cpu", dtype: torch.dtype | str | None = None,
                   skeleton: nn.Module | None = None) -> nn.Module:
    """The packed denoiser of an export directory, on ``device``, computing in ``dtype`` (default: the dtype
    it was exported in; exact vs the simulated configuration in that dtype).

    ``skeleton``: the denoiser's structure for non-diffusers models (parameters may be on the meta device)."""
    from safetensors import safe_open

    out_dir = Path(out_dir)
    info = read_export_info(out_dir)
    weights = out_dir / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} does not exist: the export directory is incomplete; re-export it")
    device = _load_device(device)
    dtype = _parse_dtype(dtype or info["dtype"])
    model = skeleton if skeleton is not None else _skeleton(out_dir, info)
    install_packed_modules(model, info["layers"], dtype)
    with safe_open(str(weights), framework="pt", device=str(device)) as f:
        stored_id = (f.metadata() or {}).get("export_id")
        if stored_id != info["export_id"]:
            raise ExportError(f"{weights} and {INFO_NAME} come from different exports (export_id {stored_id} != "
                              f"{info['export_id']}): re-export the directory")
        own_dtypes = info.get("own_dtypes", {})
        for name in f.keys():
            _assign(model, name, f.get_tensor(name), dtype, own_dtypes)
    for alias, source in info.get("aliases", {}).items():
        source_path, _, source_attr = source.rpartition(".")
        holder = model.get_submodule(source_path) if source_path else model
        value = holder._parameters.get(source_attr, holder._buffers.get(source_attr))
        path, _, attr = alias.rpartition(".")
        module = model.get_submodule(path) if path else model
        (module._parameters if attr in module._parameters else module._buffers)[attr] = value
    _settle_remaining(model, device, dtype, info.get("own_dtypes", {}))
    model.qua2sedimo_export = {k: info[k] for k in ("family", "avg_bits", "export_id", "dtype")}
    if kernels.BATCHED_DECODE:  # one decode launch per group of layers (QUA2SEDIMO_BATCHED_DECODE=0: one per layer)
        model.qua2sedimo_batched_decode = kernels.batched_decode(model, ahead=kernels.BATCHED_DECODE_AHEAD)  # =ahead
    return model.eval()


# ---------------------------------------------------------------------------------------- in memory
@torch.no_grad()
def pack_(denoiser: nn.Module, family: FamilySpec, config: dict, mq: MultiQuantizer,
          verify_weights: bool = False) -> nn.Module:
    """Apply ``config`` as packed modules in place (no files): the dense quantized weights are released."""
    mq.check_compatible(denoiser, family, verify_weights=verify_weights)
    config = validate_config(config, mq.layers, options=mq.options)
    layout = packed_layout(config, mq, denoiser)
    tensors = _part_tensors(layout, mq, denoiser)
    device, dtype = next(denoiser.parameters()).device, _model_dtype(denoiser)
    install_packed_modules(denoiser, layout, dtype)
    for name, tensor in tensors.items():
        # a copy, not a view: a dense slice must not keep the whole FP weight alive
        _assign(denoiser, name, tensor.to(device).clone(memory_format=torch.contiguous_format), dtype)
    return denoiser


# ------------------------------------------------------------------------------------------ helpers
def safetensors_bytes(path: str | os.PathLike) -> dict:
    """Size of a safetensors file split into its JSON header and tensor data, by tensor category."""
    path = Path(path)
    with open(path, "rb") as f:
        header_len = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(header_len))
    sizes = {"codes": 0, "quant_params": 0, "dense_slices": 0, "fp_tensors": 0}
    for name, entry in header.items():
        if name != "__metadata__":
            start, stop = entry["data_offsets"]
            sizes[_category(name)] += stop - start
    sizes["tensor_data"] = sum(sizes.values())
    sizes["header"] = 8 + header_len
    sizes["file"] = path.stat().st_size
    return sizes


def tensor_bytes(model: nn.Module) -> int:
    """Bytes of every distinct parameter and buffer the model holds in memory."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def denoiser_output(model: nn.Module, inputs: dict) -> torch.Tensor:
    """The output tensor of one denoiser forward (diffusers output objects or tuples)."""
    out = model(**inputs)
    if hasattr(out, "sample"):
        return out.sample
    return out[0] if isinstance(out, (tuple, list)) else out


def _cast_floats(value, dtype: torch.dtype):
    if isinstance(value, dict):
        return {k: _cast_floats(v, dtype) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_cast_floats(v, dtype) for v in value)
    return value.to(dtype) if torch.is_tensor(value) and value.is_floating_point() else value


def _dtype_differences(model: nn.Module, reference: nn.Module) -> list[str]:
    """Names (with both dtypes) of buffers and unquantized parameters whose dtype differs between the two."""
    theirs = dict(reference.named_parameters(remove_duplicate=False)) | dict(reference.named_buffers(remove_duplicate=False))
    mine = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers(remove_duplicate=False))
    return [f"{name} {_dtype_name(t.dtype)} vs {_dtype_name(theirs[name].dtype)}" for name, t in mine.items()
            if name in theirs and t.dtype != theirs[name].dtype]


@torch.no_grad()
def check_export(out_dir: str | os.PathLike, device="cpu", dtype=None, simulated: nn.Module | None = None,
                 batch: int = 2, seed: int = 0, tolerance: float = 0.0) -> dict:
    """Load an export, run one forward on the family's example inputs and report sizes (and, given the
    simulated configuration ``simulated`` = FP denoiser after ``quantize_``, the max abs difference and the
    tensors whose dtype differs). ``passed`` and ``reason`` give the verdict."""
    from .families import get_family
    from .adapters import example_inputs

    info = read_export_info(out_dir)
    family = get_family(info["family"])
    model = load_quantized(out_dir, device=device, dtype=dtype)
    inputs = example_inputs(family, model, batch=batch, seed=seed)
    out = denoiser_output(model, inputs)
    report = {"dir": str(out_dir), "family": family.name, "avg_bits": info["avg_bits"],
              "file": safetensors_bytes(Path(out_dir) / WEIGHTS_NAME), "bytes_in_memory": tensor_bytes(model),
              "output_shape": list(out.shape), "output_finite": bool(torch.isfinite(out).all())}
    reasons = [] if report["output_finite"] else ["the output holds NaN or inf"]
    if simulated is not None:
        reference = denoiser_output(simulated, _cast_floats(inputs, _model_dtype(simulated)))
        report["max_abs_diff_vs_simulated"] = float((out.float() - reference.float()).abs().max())
        report["tolerance"] = tolerance
        report["dtype_differences"] = _dtype_differences(model, simulated)
        if report["max_abs_diff_vs_simulated"] > tolerance:
            reasons.append(f"output differs from the simulated configuration by "
                           f"{report['max_abs_diff_vs_simulated']:.3g} > tolerance {tolerance:g}")
        if report["dtype_differences"]:
            reasons.append("dtypes differ from the simulated model (loaded vs simulated): "
                           + ", ".join(report["dtype_differences"][:5]))
    report["passed"] = not reasons
    if reasons:
        report["reason"] = "; ".join(reasons)
    elif simulated is not None:
        report["reason"] = (f"finite output equal to the simulated configuration within {tolerance:g} "
                            f"(max abs diff {report['max_abs_diff_vs_simulated']:.3g}), same dtypes")
    else:
        report["reason"] = "finite output (pass --compare to check it against the simulated configuration)"
    return report
