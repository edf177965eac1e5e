"""Model-family registry: the one place that knows each family.

A :class:`FamilySpec` holds everything the rest of the system needs to know about a denoiser family:
where its weights live (hub id / local directory), how to build it tiny (tests) or full size on the
meta device (structure checks), the generation protocol (resolution, steps, scheduler, guidance,
prompt source) and the layer rules (which weights are excluded, split or tied).

Register your own denoiser (a plain ``nn.Module``; see the README's "Bring your own denoiser")::

    from multiquant.families import FamilySpec, register_family
    from multiquant.metrics import FeatureFID
    register_family(FamilySpec(name="my_unet", factory=lambda size: MyUNet(), weights="my_unet.pt",
                               sampler=my_sampler, metric=FeatureFID(my_feature_net, reference_images=real),
                               example_inputs=lambda model, batch: {...}))

A plain-module family (no diffusers ``pipeline_class``) is served by the "module" adapter: ``sampler(model,
conditions, seeds) -> uint8 [N, C, H, W]`` renders images, ``conditions(n)`` fixes what each image is
conditioned on (with it, declare ``conditioning="text"`` or ``"class"``; without it the spec says ``"class"`` given
``num_classes``, else ``"none"``), and ``metric`` scores them (never replaced by a built-in one).
"""
from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..errors import SetupError, UserError
from ..utils import cast_module, from_pretrained_kwargs

_REGISTRY: dict[str, "FamilySpec"] = {}

DTYPES = {16: torch.float16, 32: torch.float32}
CONDITIONINGS = ("text", "class", "none")  # what each image is conditioned on: prompts, class labels, nothing
# compute precisions a run may be scored in instead of the family's (eval-random / eval-configs --dtype)
SCORING_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class FamilySpec:
    """Declarative description of one denoiser family."""

    name: str
    # --- where the model comes from -------------------------------------------------------------
    model_class: str | None = None  # diffusers class of the denoiser, e.g. "PixArtTransformer2DModel"
    hub_id: str | None = None  # hub repo id of the full pipeline
    subfolder: str | None = None  # "transformer" / "unet" inside the pipeline repo
    revision: str | None = None
    variant: str | None = None
    pipeline_class: str | None = None  # diffusers pipeline used for generation
    full_config: dict = field(default_factory=dict)  # constructor kwargs of the full-size denoiser
    tiny_config: dict = field(default_factory=dict)  # constructor kwargs of a tiny random denoiser
    factory: Callable[[str], nn.Module] | None = None  # custom denoisers: size ("tiny"|"full") -> module
    default_pretrained: Path | None = None  # shipped weights (embedded models)
    # plain-module families: a state dict (.pt/.pth/.bin read with weights_only=True, or .safetensors) loaded
    # into factory("full"); or a loader(pretrained, device, dtype) -> nn.Module that does it all
    weights: str | Path | None = None
    loader: Callable[[object, torch.device, torch.dtype], nn.Module] | None = None
    # --- user protocol (plain-module families; see multiquant.adapters.module) ---------------------
    sampler: Callable[[nn.Module, list, list], torch.Tensor] | None = None  # (model, conditions, seeds) -> uint8
    conditions: Callable[[int], list] | None = None  # n -> what each image is conditioned on
    metric: object | None = None  # multiquant.metrics.FeatureFID / CallableMetric: the family's quality label
    # --- numerics ---------------------------------------------------------------------------------
    fp_prec: int = 16  # precision the reference sizes are costed at (FP_PREC); also the default compute dtype
    # compute dtypes this family must not be scored in (--dtype), each with why: {"float16": "overflows in ..."}
    unsafe_dtypes: dict = field(default_factory=dict)
    reference_fp_bytes: int | None = None  # FP_SIZE of the reference scripts, for checks
    architecture: str | None = None  # the reference's `architecture` label in quant_cache.pkl
    # --- generation protocol ----------------------------------------------------------------------
    # "text" (prompts), "class" (class labels) or "none" (unconditional). None: a diffusers pipeline's is "text";
    # a plain module's follows from what its sampler is given (CONDITIONINGS, __post_init__)
    conditioning: str | None = None
    prompt_source: str = "coco"  # "coco" | "imagenet_classes" | "mnist_classes"
    num_images: int = 1000
    resolution: int = 512
    steps: int = 20
    guidance: float = 4.5
    scheduler: str | None = None  # diffusers scheduler class; None keeps the pipeline's own
    scheduler_kwargs: dict = field(default_factory=dict)
    pipeline_kwargs: dict = field(default_factory=dict)  # extra fixed kwargs of the pipeline call
    num_classes: int | None = None  # class-conditional families
    refiner_hub_id: str | None = None  # SDXL: the FP refiner that finishes the schedule (reference protocol)
    batch_size: int | None = None  # images per denoiser call while scoring (any value renders the same images)
    text_tokens: int | None = None  # text families: cross-attention length the MACs (BOPs) are counted at
    # --- layer rules ------------------------------------------------------------------------------
    exclude: tuple[str, ...] = ()  # fnmatch patterns on module paths: layers that stay FP
    ties: tuple[tuple[str, str], ...] = ()  # (regex, replacement): path -> canonical path it copies
    split_rule: Callable[[nn.Module], dict[str, int]] | None = None  # path -> input-channel split
    example_inputs: Callable[[nn.Module, int], dict] | None = None  # custom denoisers: forward kwargs
    notes: str = ""

    # ----------------------------------------------------------------------------------------------
    def __post_init__(self):
        # conditioning is in every run's identity and shown to the user: it must say what the sampler is given
        object.__setattr__(self, "conditioning", self._checked_conditioning())

    def _checked_conditioning(self) -> str:
        """The declared conditioning, or the one that follows from the spec; a UserError where they disagree."""
        fix = "set FamilySpec(conditioning=...) to one of " + ", ".join(map(repr, CONDITIONINGS))
        given = self.conditioning
        if given is not None and given not in CONDITIONINGS:
            raise UserError(f"family {self.name!r}: conditioning {given!r} is unknown: {fix}")
        if not self.is_module:  # a diffusers pipeline: prompts unless it says class labels
            return given or "text"
        # what default_conditions hands the sampler: the user's conditions(n), class ids, or None per image
        if self.conditions is not None:
            if given is None:
                raise UserError(f"family {self.name!r} gives conditions(n) but no conditioning: {fix} (what its "
                                f"sampler is given per image: prompts, class labels)")
            if given == "none":
                raise UserError(f"family {self.name!r}: conditioning 'none' but it gives conditions(n), which its "
                                f"sampler is given: set conditioning='text' or 'class', or drop conditions")
            return given
        inferred = "class" if self.num_classes else "none"
        if given not in (None, inferred):
            what = f"num_classes={self.num_classes}" if self.num_classes else "no conditions(n) and no num_classes"
            given_to = "class ids" if self.num_classes else "None per image"
            raise UserError(f"family {self.name!r}: conditioning {given!r} but {what}, so its sampler is given "
                            f"{given_to}: set conditioning={inferred!r}"
                            + ("" if self.num_classes else ", or give what it conditions on (conditions=lambda n: "
                                                           "[...] or num_classes=K)"))
        return inferred

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES.get(self.fp_prec, torch.float32)

    def scoring_dtype(self, name: str) -> torch.dtype:
        """The compute dtype ``name`` (float32 / float16 / bfloat16) for scoring this family, or a UserError when
        the name is unknown or the family declares it unsafe (``unsafe_dtypes``)."""
        if name not in SCORING_DTYPES:
            raise UserError(f"--dtype {name!r} is not one of {', '.join(SCORING_DTYPES)}")
        if name in self.unsafe_dtypes:
            safe = [n for n in SCORING_DTYPES if n not in self.unsafe_dtypes]
            raise UserError(f"family {self.name!r} declares {name} unsafe ({self.unsafe_dtypes[name]}): leave out "
                            f"--dtype (default {str(self.dtype).replace('torch.', '')}) or pass one of "
                            f"{', '.join(safe)}")
        return SCORING_DTYPES[name]

    def is_excluded(self, path: str) -> bool:
        return any(fnmatch.fnmatchcase(path, pattern) for pattern in self.exclude)

    def canonical_path(self, path: str) -> str | None:
        """Module path this layer is a copy of (tied weights), or None."""
        for pattern, repl in self.ties:
            if re.fullmatch(pattern, path):
                canonical = re.sub(pattern, repl, path)
                return canonical if canonical != path else None
        return None

    def splits(self, model: nn.Module) -> dict[str, int]:
        return self.split_rule(model) if self.split_rule else {}

    @property
    def is_module(self) -> bool:
        """A plain ``nn.Module`` family (no diffusers pipeline): rendered by its own ``sampler``."""
        return self.pipeline_class is None

    def model_cls(self):
        import diffusers

        if self.model_class is None:
            raise UserError(f"family {self.name!r} has no diffusers model_class: give it a factory (with weights) "
                            f"or a loader(pretrained, device, dtype)")
        return getattr(diffusers, self.model_class)

    def default_conditions(self, n: int) -> list:
        """What images 0..n-1 are conditioned on: ``conditions(n)`` if given, else cycling class ids
        (``num_classes``), else ``None`` per image (unconditional)."""
        if self.conditions is not None:
            out = list(self.conditions(n))
            if len(out) < n:
                raise UserError(f"family {self.name!r}: conditions({n}) returned {len(out)} items; it must return {n}")
            return out[:n]
        if self.num_classes:
            return [i % self.num_classes for i in range(n)]
        return [None] * n

    def build(self, size: str = "tiny", device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
              seed: int = 0) -> nn.Module:
        """Build the denoiser with random weights: ``size="tiny"`` for tests, ``"full"`` for structure
        checks (use ``device="meta"`` so that no memory is allocated)."""
        if size not in ("tiny", "full"):
            raise ValueError(f"size must be 'tiny' or 'full', got {size!r}")
        torch.manual_seed(seed)
        if self.factory is None and self.model_class is None and self.loader is not None:
            if size == "tiny":
                raise UserError(f"family {self.name!r} has a loader but no factory: a tiny random model (--tiny, "
                                f"--size tiny) needs FamilySpec(factory=lambda size: ...)")
            # the architecture is the loader's model (its default weights, read on the CPU), moved where asked:
            # the structure-only commands (dag, flops, train-predictor, ...) trace it on the meta device
            model = self.load(None, device="cpu", dtype=dtype).to(device)
            return model.eval()
        with torch.device(device):
            if self.factory is not None:
                model = self.factory(size)
            else:
                model = self.model_cls()(**(self.tiny_config if size == "tiny" else self.full_config))
        if dtype is not None:
            model = cast_module(model, dtype)
        return model.eval()

    def load(self, pretrained: str | Path | None = None, dtype: torch.dtype | None = None,
             device: str | torch.device = "cpu") -> nn.Module:
        """Load the trained denoiser, in this order of what the family gives:

        * ``loader(pretrained, device, dtype)``: the user's own callable;
        * ``factory`` without a diffusers ``model_class``: ``factory("full")`` with the state dict of
          ``pretrained`` or ``weights`` (``.pt/.pth/.bin`` read with ``weights_only=True``, or ``.safetensors``);
        * diffusers ``from_pretrained``: ``pretrained`` may be a pipeline directory / hub id (the family's
          subfolder is used) or a directory holding the denoiser itself."""
        device = torch.device(device)
        if self.loader is not None:
            model = self.loader(pretrained or self.weights or self.default_pretrained, device, dtype or self.dtype)
            if not isinstance(model, nn.Module):
                raise UserError(f"family {self.name!r}: loader returned {type(model).__name__}, not an nn.Module")
            return model.to(device=device, dtype=dtype or next(model.parameters()).dtype).eval()
        if self.model_class is None and self.factory is not None:
            source = pretrained or self.weights or self.default_pretrained
            if source is None:
                raise UserError(f"family {self.name!r} has no default weights: pass --pretrained FILE "
                                f"(.pt/.pth/.bin state dict or .safetensors) or set the family's weights")
            model = self.build("full")
            load_state_dict_file(model, source, family=self.name)
            return model.to(device=device, dtype=dtype or self.dtype).eval()
        source = pretrained or self.default_pretrained or self.hub_id
        if source is None:
            raise UserError(f"family {self.name!r} has no default weights: pass --pretrained DIR")
        cls = self.model_cls()
        kwargs = from_pretrained_kwargs(dtype or self.dtype)
        if self.revision and not Path(str(source)).exists():
            kwargs["revision"] = self.revision
        if self.variant:
            kwargs["variant"] = self.variant
        local = Path(str(source))
        subfolder = self.subfolder
        if local.exists() and (local / "config.json").exists():
            subfolder = None  # the directory is the denoiser itself
        try:
            model = cls.from_pretrained(str(source), subfolder=subfolder, **kwargs)
        except (OSError, ValueError) as err:
            raise SetupError(
                f"could not load the {self.name} denoiser from {source!r}: {err}\n"
                f"Fix: download the pipeline (hub id {self.hub_id!r}) and pass its local directory "
                f"with --pretrained DIR, or set HF_HOME to a cache that holds it.") from err
        return model.to(device).eval()


STATE_DICT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a state-dict file: ``.safetensors``, or ``.pt/.pth/.bin`` read with ``torch.load(weights_only=True)``
    (never arbitrary unpickling). A ``{"state_dict": ...}`` / ``{"model": ...}`` wrapper is unwrapped."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"weights file {path} does not exist: pass --pretrained FILE (.pt/.pth/.bin/.safetensors)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    if path.suffix not in STATE_DICT_SUFFIXES:
        raise UserError(f"weights file {path} is not one of {', '.join(STATE_DICT_SUFFIXES)}: save the state dict "
                        f"with torch.save(model.state_dict(), 'x.pt') or safetensors")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle errors of every kind: a file that is not a plain state dict
        raise UserError(f"cannot read {path} as a state dict with weights_only=True ({type(err).__name__}: "
                        f"{str(err).splitlines()[0][:200]}): save model.state_dict(), not the module") from None
    for key in ("state_dict", "model"):
        if isinstance(data, dict) and isinstance(data.get(key), dict):
            data = data[key]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise UserError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    return data


def load_state_dict_file(model: nn.Module, path: str | Path, family: str = "") -> nn.Module:
    """Load a state-dict file into ``model`` (strict: every key must match)."""
    state = read_state_dict(path)
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches
        raise UserError(f"{path} does not fit family {family!r}'s factory('full') module: "
                        f"{' '.join(str(err).split())[:300]}") from None
    if result.missing_keys or result.unexpected_keys:
        raise UserError(f"{path} does not fit family {family!r}'s factory('full') module: missing keys "
                        f"{result.missing_keys[:3]}, unexpected keys {result.unexpected_keys[:3]}")
    return model


def register_family(spec: FamilySpec, overwrite: bool = False) -> FamilySpec:
    """Add a family to the registry (your own denoiser: give ``factory``)."""
    if spec.name in _REGISTRY and not overwrite:
        raise ValueError(f"family {spec.name!r} is already registered (pass overwrite=True to replace it)")
    _REGISTRY[spec.name] = spec
    return spec


class UnknownFamilyError(UserError, KeyError):
    """No family of that name is registered (a KeyError too, as a registry lookup)."""

    def __str__(self) -> str:  # KeyError's str() would quote the message
        return str(self.args[0])


def get_family(name: str) -> FamilySpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownFamilyError(f"unknown model family {name!r}; known: {', '.join(list_families())}. Your own: "
                                 f"--family pkg.module:ATTR or path/to/file.py:ATTR") from None


_SPEC_TEXT: dict[str, str] = {}  # family name -> the --family text it was loaded from (resolve_family)


def family_flag(family) -> str:
    """The command-line flag that names ``family`` (a FamilySpec or name) in a fresh process, for the commands that
    messages suggest: ``--family <what the user typed>`` for a family loaded from a file or module, else
    ``--model NAME``."""
    name = family if isinstance(family, str) else family.name
    return f"--family {_SPEC_TEXT[name]}" if name in _SPEC_TEXT else f"--model {name}"


def list_families() -> list[str]:
    return sorted(_REGISTRY)


# Built-in families register themselves on import.
from . import pixart, hunyuan, unet, dit, mnist_dit, mnist_unet  # noqa: E402,F401

BUILTIN_FAMILIES = frozenset(_REGISTRY)  # the families this package ships (users register more)
from .resolve import resolve_family  # noqa: E402,F401
