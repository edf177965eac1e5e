"""Multiquantizer checkpoints: every quantization option of every layer, built once, applied many times.

The file is a single safetensors file (no pickle): packed integer codes plus scale/zero-point (UAQ) or
codebooks (K-Means) per layer and option, and a JSON manifest in the safetensors metadata that records the
model id and revision, the layer list with shapes, tied aliases and exclusions, a hash of the FP weights,
the per-option size and error table, the build settings and the library versions.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import UserError
from .families import FamilySpec
from .layers import LayerRef, excluded_layers, fp_bytes, quantizable_layers
from .packing import pack_codes, unpack_codes
from .options import METHOD_NAMES, Option, options_for
from .quantizers import dequantize, lp_error, quantize
from .utils import atomic_path, progress

FORMAT = "qua2sedimo-multiquantizer"
FORMAT_VERSION = 1
DEFAULT_BITS = (4, 3)


class MultiQuantizerMismatch(ValueError):
    """The checkpoint was built for another model, revision or set of weights."""


def weight_hash(model: nn.Module, layers: list[LayerRef]) -> str:
    """sha256 over the bytes of every quantizable weight (tied copies and split halves once per module)."""
    h = hashlib.sha256()
    seen = set()
    for ref in layers:
        if ref.path in seen or ref.tied_to:
            continue
        seen.add(ref.path)
        w = model.get_submodule(ref.path).weight.detach()
        h.update(ref.path.encode())
        h.update(w.to("cpu", torch.float16).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _versions() -> dict:
    import diffusers
    import safetensors

    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "safetensors": safetensors.__version__,
            "python": platform.python_version(), "qua2sedimo": _own_version()}


def _own_version() -> str:
    try:
        from importlib.metadata import version

        return version("qua2sedimo")
    except Exception:  # running from a source tree
        return "source"


class MultiQuantizer:
    """All quantization options of every layer of one denoiser (codes + parameters + size/error table)."""

    def __init__(self, manifest: dict, tensors: dict[str, torch.Tensor]):
        if manifest.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} checkpoint (format={manifest.get('format')!r})")
        self.manifest = manifest
        self.tensors = tensors
        self.layers = [LayerRef(d["key"], d["path"], tuple(d["cols"]) if d["cols"] else None, tuple(d["shape"]),
                                d["tied_to"]) for d in manifest["layers"]]
        self.by_key = {ref.key: ref for ref in self.layers}

    # ------------------------------------------------------------------------------------ properties
    @property
    def family(self) -> str:
        return self.manifest["family"]

    @property
    def options(self) -> list[str]:
        return self.manifest["options"]

    @property
    def table(self) -> dict[str, dict[str, list]]:
        """``{key: {"mse-4": ["mse-4", fp_bytes, quant_bytes, error], ...}}`` (the reference ``_mq.pkl`` form)."""
        return self.manifest["table"]

    @property
    def fp_prec(self) -> int:
        return self.manifest["fp_prec"]

    @property
    def fp_bytes(self) -> int:
        return self.manifest["fp_bytes"]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    # ----------------------------------------------------------------------------------------- build
    @classmethod
    def build(cls, model: nn.Module, family: FamilySpec, methods=METHOD_NAMES, bits=DEFAULT_BITS, device=None,
              seed: int = 0, kmeans_iters: int = 100, model_id: str | None = None, revision: str | None = None,
              show_progress: bool = True) -> "MultiQuantizer":
        """Quantize every layer with every option, one layer at a time on ``device`` (default: the
        model's device), so that only one layer's temporaries are ever on the GPU."""
        start = time.perf_counter()
        layers = quantizable_layers(model, family)
        device = torch.device(device) if device is not None else next(model.parameters()).device
        options = options_for(methods, bits)
        tensors: dict[str, torch.Tensor] = {}
        table: dict[str, dict[str, list]] = {}
        mse: dict[str, dict[str, float]] = {}
        for ref in progress(layers, desc=f"multiquantizer {family.name}", disable=not show_progress):
            if ref.tied_to:  # a copy of the canonical layer: share its options
                table[ref.key], mse[ref.key] = table[ref.tied_to], mse[ref.tied_to]
                continue
            w = ref.weight(model).detach().to(device).reshape(ref.channels, -1).float()
            table[ref.key], mse[ref.key] = {}, {}
            for option in options:
                parsed = Option.parse(option)
                codes, params = quantize(w, parsed.method, parsed.bits, iters=kmeans_iters, seed=seed)
                w_hat = dequantize(parsed.method, codes, params).to(family.dtype)  # what the model will hold
                err = lp_error(w, w_hat)
                mse[ref.key][option] = float((w.double() - w_hat.double()).square().mean())
                table[ref.key][option] = [option, int(ref.numel * family.fp_prec / 8),
                                          parsed.nbytes(ref.numel, ref.channels, family.fp_prec), err]
                tensors[f"{ref.key}|{option}|codes"] = pack_codes(codes, parsed.bits).cpu()
                for name, value in params.items():
                    tensors[f"{ref.key}|{option}|{name}"] = value.to(torch.int16 if name == "zero" else torch.float32).cpu()
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "family": family.name,
            "model_id": model_id or family.hub_id or (str(family.default_pretrained) if family.default_pretrained else None),
            "revision": revision or family.revision, "model_class": type(model).__name__,
            "fp_prec": family.fp_prec, "fp_bytes": fp_bytes(layers, family.fp_prec),
            "fp_bytes_dedup": fp_bytes(layers, family.fp_prec, dedup=True),
            "methods": list(methods), "bits": list(bits), "options": options,
            "layers": [{"key": r.key, "path": r.path, "cols": list(r.cols) if r.cols else None,
                        "shape": list(r.shape), "tied_to": r.tied_to} for r in layers],
            "excluded": excluded_layers(model, family), "weight_hash": weight_hash(model, layers),
            "table": table, "mse": mse, "error_definition": "sum(|w - w_hat|^2.4) / K, float64 (K = in*kh*kw)",
            "seed": seed, "kmeans_iters": kmeans_iters, "versions": _versions(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "build_seconds": time.perf_counter() - start,
            "device": str(device),
        }
        return cls(manifest, tensors)

    # ------------------------------------------------------------------------------------------- I/O
    def save_pretrained(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write the checkpoint. An existing checkpoint built from other weights (another family, layer list
        or weight hash, e.g. a tiny random model over the shipped one) is kept unless ``overwrite``."""
        path = Path(path)
        if path.suffix != ".safetensors":
            path = path / f"{self.family}_mq.safetensors"
        if path.exists() and not overwrite:
            self._refuse_overwrite_of_other_weights(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            save_file({k: v.contiguous() for k, v in self.tensors.items()}, str(tmp),
                      metadata={"manifest": json.dumps(self.manifest)})
        return path

    def _refuse_overwrite_of_other_weights(self, path: Path) -> None:
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                old = json.loads((f.metadata() or {}).get("manifest", "{}"))
        except Exception:  # not a readable safetensors file: never replace what we cannot identify
            old = {}
        same = all(old.get(k) == self.manifest.get(k) for k in ("family", "weight_hash", "layers"))
        if not same:
            raise UserError(f"{path} already holds a checkpoint of other weights "
                            f"(family {old.get('family')!r}, model_id {old.get('model_id')!r}): "
                            f"write elsewhere (--out) or pass --overwrite to replace it")

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device="cpu") -> "MultiQuantizer":
        path = Path(path)
        if path.is_dir():
            found = sorted(path.glob("*_mq.safetensors"))
            if len(found) != 1:
                raise FileNotFoundError(f"expected one *_mq.safetensors in {path}, found {len(found)}")
            path = found[0]
        if not path.exists():
            raise FileNotFoundError(f"multiquantizer checkpoint {path} does not exist: build it with "
                                    f"`qua2sedimo multiquantizer --model <family>`")
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if "manifest" not in meta:
            raise ValueError(f"{path} has no qua2sedimo manifest: is it a multiquantizer checkpoint?")
        return cls(json.loads(meta["manifest"]), load_file(str(path), device=str(device)))

    def to(self, device) -> "MultiQuantizer":
        self.tensors = {k: v.to(device) for k, v in self.tensors.items()}
        return self

    def export_option_table(self, path: str | os.PathLike) -> Path:
        """Write the per-layer option table in the form the predictor half reads (``<family>_mq.pkl``,
        or ``.json``)."""
        import pickle

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            if path.suffix == ".json":
                tmp.write_text(json.dumps(self.table, indent=1))
            else:
                with open(tmp, "wb") as f:
                    pickle.dump({k: dict(v) for k, v in self.table.items()}, f, protocol=4)
        return path

    # ------------------------------------------------------------------------------------ validation
    def check_compatible(self, model: nn.Module, family: FamilySpec, verify_weights: bool = True) -> None:
        """Raise :class:`MultiQuantizerMismatch` if this checkpoint was not built for ``model``."""
        fix = f"rebuild it with `qua2sedimo multiquantizer --model {family.name}` for these weights"
        if family.name != self.family:
            raise MultiQuantizerMismatch(f"checkpoint built for family {self.family!r}, model is {family.name!r}: {fix}")
        layers = quantizable_layers(model, family)
        mine = [(r.key, r.shape) for r in self.layers]
        theirs = [(r.key, r.shape) for r in layers]
        if mine != theirs:
            diff = next(((a, b) for a, b in zip(mine, theirs) if a != b), None) or (len(mine), len(theirs))
            raise MultiQuantizerMismatch(f"layer list differs from the checkpoint's (first difference: {diff}): {fix}")
        if verify_weights and self.manifest.get("weight_hash") != weight_hash(model, layers):
            raise MultiQuantizerMismatch(
                f"the model's weights differ from those the checkpoint was built from "
                f"(model_id={self.manifest.get('model_id')!r}, revision={self.manifest.get('revision')!r}): {fix}")

    # --------------------------------------------------------------------------------------- decode
    def dequantize(self, key: str, option: str, dtype=torch.float32) -> torch.Tensor:
        """The dequantized weight of layer ``key`` under ``option``, shaped like the (half) weight."""
        ref = self.by_key[key]
        source = ref.tied_to or key
        parsed = Option.parse(option)
        codes = unpack_codes(self.tensors[f"{source}|{option}|codes"], parsed.bits, ref.numel)
        params = {name: self.tensors[f"{source}|{option}|{name}"] for name in parsed.spec.params}
        return dequantize(parsed.method, codes.view(ref.channels, -1), params).to(dtype).view(ref.shape)
