"""Multiquantizer checkpoints: every quantization option of every layer, built once, applied many times.

The file is a single safetensors file (no pickle): packed integer codes plus scale/zero-point (UAQ) or
codebooks (K-Means) per layer and option, and a JSON manifest in the safetensors metadata that records the
model id and revision, the layer list with shapes, tied aliases and exclusions, a hash of the FP weights,
the per-option size and error table, the build settings, the building device and the library versions.

Integrity: at save time the manifest gets a sha256 of every tensor and the metadata a sha256 of the
manifest; loading verifies both (flipped bytes in codes, an edited table entry) and rejects non-finite
parameters. :attr:`MultiQuantizer.content_hash` (tensors + option table) identifies what the checkpoint
computes: result stores are keyed by it, so records of two different builds never mix. Builds on different
devices may differ (GPU and CPU reductions round differently); the manifest records the device.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .build import DEFAULT_CHUNK_ELEMENTS, HostCopies, host_bytes, quantize_layers
from .errors import MissingFileError, UserError
from .families import FamilySpec
from .layers import LayerRef, excluded_layers, fp_bytes, quantizable_layers
from .packing import unpack_codes
from .options import METHOD_NAMES, Option, options_for
from .quantizers import dequantize
from .utils import atomic_path

FORMAT = "qua2sedimo-multiquantizer"
FORMAT_VERSION = 2  # 2: per-tensor and manifest digests (version 1 files load, unverified)
DEFAULT_BITS = (4, 3)


class MultiQuantizerMismatch(UserError, ValueError):
    """The checkpoint was built for another model, revision or set of weights."""


class CheckpointCorruptError(UserError, ValueError):
    """The checkpoint file is truncated, edited or holds non-finite parameters."""


def tensor_digest(t: torch.Tensor) -> str:
    """sha256 of a CPU tensor's dtype, shape and bytes."""
    h = hashlib.sha256(f"{t.dtype}|{list(t.shape)}|".encode())
    h.update(t.contiguous().view(torch.uint8).reshape(-1).numpy().data)
    return h.hexdigest()


def _own_storage(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor with storage of its own (the build returns views of one host buffer per chunk,
    and safetensors refuses tensors that share memory)."""
    t = t.contiguous()
    return t.clone() if t.untyped_storage().nbytes() != t.nbytes else t


def _manifest_digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def weight_hash(model: nn.Module, layers: list[LayerRef]) -> str:
    """sha256 over the bytes of every quantizable weight (tied copies and split halves once per module), as
    float16. Read through build.host_bytes: from a GPU on a side stream, beside a running build."""
    paths, weights, seen = [], [], set()
    for ref in layers:
        if ref.path in seen or ref.tied_to:
            continue
        seen.add(ref.path)
        paths.append(ref.path)
        weights.append(model.get_submodule(ref.path).weight)
    h, last = hashlib.sha256(), -1
    for i, piece in host_bytes(weights, torch.float16):
        if i != last:
            h.update(paths[i].encode())
            last = i
        h.update(piece)
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
            raise CheckpointCorruptError(f"not a {FORMAT} checkpoint (format={manifest.get('format')!r}): pass a file "
                                         f"`qua2sedimo multiquantizer` wrote")
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

    # ----------------------------------------------------------------------------------------- build
    @classmethod
    def build(cls, model: nn.Module, family: FamilySpec, methods=METHOD_NAMES, bits=DEFAULT_BITS, device=None,
              seed: int = 0, kmeans_iters: int = 100, model_id: str | None = None, revision: str | None = None,
              show_progress: bool = True, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
              pinned_host: bool = True) -> "MultiQuantizer":
        """Quantize every layer with every option on ``device`` (default: the model's device), many layers
        per quantizer call, at most ``chunk_elements`` weights at a time (build.quantize_layers).
        ``pinned_host``: from a GPU, results reach the host through page-locked staging without holding up
        the device (build.HostCopies); False copies each with ``.cpu()``. The tensors are the same either way."""
        start = time.perf_counter()
        layers = quantizable_layers(model, family)
        device = torch.device(device) if device is not None else next(model.parameters()).device
        options = options_for(methods, bits)
        host = HostCopies(device, staged=None if pinned_host else False)
        with ThreadPoolExecutor(1) as pool:  # hashing the weights on the host overlaps the device work
            hashed = pool.submit(weight_hash, model, layers)
            canonical = [ref for ref in layers if not ref.tied_to]
            built = dict(zip((ref.key for ref in canonical), quantize_layers(
                [ref.weight(model).detach() for ref in canonical], options, family.dtype,
                device, seed=seed, iters=kmeans_iters, chunk_elements=chunk_elements, show_progress=show_progress,
                desc=f"multiquantizer {family.name}", host=host)))
            hash_of_weights = hashed.result()
        tensors: dict[str, torch.Tensor] = {}
        table: dict[str, dict[str, list]] = {}
        mse: dict[str, dict[str, float]] = {}
        for ref in layers:
            if ref.tied_to:  # a copy of the canonical layer: share its options
                table[ref.key], mse[ref.key] = table[ref.tied_to], mse[ref.tied_to]
                continue
            result = built[ref.key]
            table[ref.key] = {option: [option, int(ref.numel * family.fp_prec / 8),
                                       Option.parse(option).nbytes(ref.numel, ref.channels, family.fp_prec),
                                       result.error[option]] for option in options}
            mse[ref.key] = dict(result.mse)
            for option in options:
                for name, value in result.tensors[option].items():
                    tensors[f"{ref.key}|{option}|{name}"] = value
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "family": family.name,
            "model_id": model_id or family.hub_id or (str(family.default_pretrained) if family.default_pretrained else None),
            "revision": revision or family.revision, "model_class": type(model).__name__,
            "fp_prec": family.fp_prec, "fp_bytes": fp_bytes(layers, family.fp_prec),
            "fp_bytes_dedup": fp_bytes(layers, family.fp_prec, dedup=True),
            "methods": list(methods), "bits": list(bits), "options": options,
            "layers": [{"key": r.key, "path": r.path, "cols": list(r.cols) if r.cols else None,
                        "shape": list(r.shape), "tied_to": r.tied_to} for r in layers],
            "excluded": excluded_layers(model, family), "weight_hash": hash_of_weights,
            "table": table, "mse": mse, "error_definition": "sum(|w - w_hat|^2.4) / K, float64 (K = in*kh*kw)",
            "seed": seed, "kmeans_iters": kmeans_iters, "chunk_elements": chunk_elements, "versions": _versions(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "build_seconds": time.perf_counter() - start,
            "device": str(device), "device_name": _device_name(device),
            "host_copies": "pinned staging" if host.pinned else ("staging" if host.staged else "direct"),
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
        tensors = {k: _own_storage(v.detach().cpu()) for k, v in self.tensors.items()}
        self.manifest = dict(self.manifest, format_version=FORMAT_VERSION, content_hash=self.content_hash,
                             tensor_sha256=self.tensor_digests())
        text = json.dumps(self.manifest)
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"manifest": text, "manifest_sha256": _manifest_digest(text)})
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
        """Load and verify a checkpoint (digests, finiteness); raises :class:`CheckpointCorruptError`."""
        path = Path(path)
        if path.is_dir():
            found = sorted(path.glob("*_mq.safetensors"))
            if len(found) != 1:
                raise MissingFileError(f"expected one *_mq.safetensors in {path}, found {len(found)}: "
                                       f"pass the file itself")
            path = found[0]
        if not path.exists():
            raise MissingFileError(f"multiquantizer checkpoint {path} does not exist: check the path, or build it "
                                   f"with `qua2sedimo multiquantizer --model <family>` (or pass --build_mq)")
        from safetensors import SafetensorError, safe_open

        rebuild = "rebuild it with `qua2sedimo multiquantizer --model <family> --overwrite`"
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            tensors = load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointCorruptError(f"{path} is not a readable safetensors file (truncated or damaged: "
                                         f"{err}): {rebuild}") from None
        if "manifest" not in meta:
            raise CheckpointCorruptError(f"{path} has no qua2sedimo manifest: pass a multiquantizer checkpoint "
                                         f"(`qua2sedimo multiquantizer` writes one)")
        if "manifest_sha256" in meta and _manifest_digest(meta["manifest"]) != meta["manifest_sha256"]:
            raise CheckpointCorruptError(f"{path}: the manifest (option table, layer list) was edited or damaged "
                                         f"after it was written: {rebuild}")
        try:
            manifest = json.loads(meta["manifest"])
        except ValueError as err:
            raise CheckpointCorruptError(f"{path}: the manifest is not valid JSON ({err}): {rebuild}") from None
        try:
            mq = cls(manifest, tensors)
        except (KeyError, TypeError, AttributeError) as err:
            raise CheckpointCorruptError(f"{path}: the manifest lacks or mangles {err}: {rebuild}") from None
        mq.verify(source=str(path))
        return mq.to(device)

    # --------------------------------------------------------------------------------------- integrity
    def tensor_digests(self) -> dict[str, str]:
        """sha256 of every tensor (computed once, on the CPU copy)."""
        if getattr(self, "_digests", None) is None:
            self._digests = {k: tensor_digest(v.detach().cpu()) for k, v in sorted(self.tensors.items())}
        return self._digests

    @property
    def content_hash(self) -> str:
        """What this checkpoint computes: its tensors and its option table (not when or where it was built)."""
        body = {"family": self.family, "options": self.options, "fp_prec": self.fp_prec, "table": self.table,
                "layers": self.manifest["layers"], "tensors": self.tensor_digests()}
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()

    def verify(self, source: str = "checkpoint") -> None:
        """Check the stored digests (when the file has them), the tensor set and that every parameter and
        table error is finite."""
        fix = "rebuild it with `qua2sedimo multiquantizer --model <family> --overwrite`"
        stored = self.manifest.get("tensor_sha256")
        if stored is not None:
            actual = self.tensor_digests()
            if set(stored) != set(actual):
                diff = sorted(set(stored) ^ set(actual))
                raise CheckpointCorruptError(f"{source}: tensor set differs from the manifest's "
                                             f"({len(diff)} differ, e.g. {diff[0]!r}): {fix}")
            bad = [k for k in stored if stored[k] != actual[k]]
            if bad:
                raise CheckpointCorruptError(f"{source}: {len(bad)} tensor(s) do not match their stored sha256 "
                                             f"(e.g. {bad[0]!r}): the file was damaged or edited: {fix}")
            if self.manifest.get("content_hash") not in (None, self.content_hash):
                raise CheckpointCorruptError(f"{source}: content hash does not match the manifest's: {fix}")
        for name, t in self.tensors.items():
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise CheckpointCorruptError(f"{source}: parameter {name!r} holds NaN or inf values: {fix}")
            if name.endswith("|scale") and not bool((t > 0).all()):
                raise CheckpointCorruptError(f"{source}: UAQ scale {name!r} is not positive: {fix}")
        for key, entries in self.table.items():
            for option, entry in entries.items():
                if not (isinstance(entry, list) and len(entry) == 4 and all(
                        isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf")
                        for v in entry[1:])):
                    raise CheckpointCorruptError(f"{source}: option table entry {key!r} {option!r} is malformed or "
                                                 f"non-finite ({entry!r:.80}): {fix}")

    def to(self, device) -> "MultiQuantizer":
        self.tensor_digests()  # hash on the CPU before the tensors move (the identity stays with them)
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
        from .families import family_flag

        fix = f"rebuild it with `qua2sedimo multiquantizer {family_flag(family)}` for these weights"
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
