"""Loading shared by the diffusers pipeline kinds: the stock pipeline from the hub or a local directory, or a tiny
random one assembled from the family's tiny denoiser.

The full pipelines are the stock diffusers classes loaded with ``from_pretrained``; the sampler uses them for
their components (denoiser, VAE, scheduler) and for ``encode_prompt``. The text-to-image classes need
``transformers``; where it is missing (tests), :func:`tiny_pipeline` returns a :class:`PipelineParts` holding
the same components, with no text encoders, and the sampler is fed prompt embeddings directly. What differs per
kind (the tiny noise schedule, how the embedded MNIST pipeline is built, the SDXL refiner) is its adapter's.
"""
from __future__ import annotations

import inspect
from pathlib import Path

import torch
from torch import nn

from ...errors import InputError, SetupError
from ...families import FamilySpec, get_family
from ...utils import default_device, from_pretrained_kwargs
from ..registry import adapter_for

TINY_LATENT_SIZE = 8
HUB_EXTRA_FIX = "Fix: pip install 'qua2sedimo[hub]' (transformers, accelerate, sentencepiece, ftfy, beautifulsoup4)."


def family_spec(family: str | FamilySpec) -> FamilySpec:
    return family if isinstance(family, FamilySpec) else get_family(family)


def denoiser_of(pipe) -> nn.Module:
    """The pipeline's denoiser: ``transformer`` or ``unet``."""
    for name in ("transformer", "unet"):
        module = getattr(pipe, name, None)
        if isinstance(module, nn.Module):
            return module
    raise ValueError(f"{type(pipe).__name__} has neither a transformer nor a unet")


def swap_denoiser(pipe, denoiser: nn.Module) -> None:
    """Put ``denoiser`` in the pipeline in place of its own (``pipe.transformer`` or ``pipe.unet``)."""
    for name in ("transformer", "unet"):
        if isinstance(getattr(pipe, name, None), nn.Module):
            setattr(pipe, name, denoiser)
            return
    raise ValueError(f"{type(pipe).__name__} has neither a transformer nor a unet to replace")


def vae_scale_factor(vae) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


class PipelineParts:
    """The components of a diffusers pipeline without its text encoders (where ``transformers`` is absent).

    Carries the same attribute names as the stock pipeline (``transformer``/``unet``, ``vae``, ``scheduler``,
    ``text_encoder=None``, ...), which is all the sampler reads; ``pipeline_class`` names the class it stands for.
    """

    def __init__(self, pipeline_class: str, **components):
        self.pipeline_class = pipeline_class
        self.text_encoder = self.text_encoder_2 = self.tokenizer = self.tokenizer_2 = None
        for name, value in components.items():
            setattr(self, name, value)
        self._component_names = ["text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", *components]

    @property
    def components(self) -> dict:
        return {name: getattr(self, name) for name in self._component_names}

    def to(self, device=None, dtype=None):
        args = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
        for value in self.components.values():
            if isinstance(value, nn.Module) and args:
                value.to(**args)
        return self

    def encode_prompt(self, *args, **kwargs):
        raise SetupError(f"this {self.pipeline_class} has no text encoder (tiny test pipeline): pass prompt "
                         f"embeddings to make_sampler(prompt_embeds=...), e.g. from random_prompt_embeds()")

    def set_progress_bar_config(self, **kwargs):
        pass

    def __repr__(self):
        present = ", ".join(name for name, value in self.components.items() if value is not None)
        return f"PipelineParts({self.pipeline_class}: {present})"


def diffusers_class(name: str):
    """The diffusers class ``name``, or None when it is missing or a placeholder (``transformers`` not installed)."""
    import diffusers

    cls = getattr(diffusers, name, None)
    return None if cls is None or cls.__module__.startswith("diffusers.utils.dummy") else cls


def stock_pipeline_class(spec: FamilySpec, required: bool = True):
    """The diffusers pipeline class, or None when it is a placeholder because ``transformers`` is missing."""
    cls = diffusers_class(spec.pipeline_class)
    if cls is None and required:
        raise SetupError(f"{spec.pipeline_class} (family {spec.name!r}) needs transformers for its text "
                         f"encoders, which is not installed. {HUB_EXTRA_FIX}")
    return cls


def swap_scheduler(spec: FamilySpec, pipe) -> None:
    """Replace the pipeline's scheduler by the family's, built from the pipeline's own scheduler config (so the
    noise schedule of the checkpoint is kept: e.g. DPM-Solver++ from DiT's config, as the reference did)."""
    if spec.scheduler is None:
        return
    import diffusers

    cls = getattr(diffusers, spec.scheduler)
    pipe.scheduler = cls.from_config(pipe.scheduler.config, **spec.scheduler_kwargs)


def device_and_dtype(spec: FamilySpec, device=None, dtype: torch.dtype | None = None):
    """``device`` (default: CUDA when there) and ``dtype`` (default: the family's precision on CUDA, fp32 on the
    CPU)."""
    device = torch.device(device) if device is not None else default_device()
    if dtype is None:
        dtype = spec.dtype if device.type == "cuda" else torch.float32
    return device, dtype


def from_pretrained(spec: FamilySpec, cls, source, local: Path, kwargs: dict, device, dtype, what: str,
                    fix: str):
    """``cls.from_pretrained(source)`` as the protocol runs it: the family's fp16 variant where ``local`` (the
    directory the user named) may hold one, the family's scheduler swapped in, moved to ``device``, progress
    bars off. A failed load is a SetupError naming ``fix``."""
    if spec.variant and dtype == torch.float16 and _may_have_variant(local, spec.variant):
        kwargs["variant"] = spec.variant  # e.g. SDXL's fp16 weight files: half the download
    try:
        pipe = cls.from_pretrained(str(source), **kwargs)
    except (OSError, ValueError) as err:
        raise SetupError(f"could not load the {spec.name} {what} from {str(source)!r}: {err}\nFix: {fix}") from err
    swap_scheduler(spec, pipe)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_pipeline(family: str | FamilySpec, pretrained: str | Path | None = None, device=None,
                  dtype: torch.dtype | None = None):
    """The family's pipeline (its adapter loads it; for the stock kinds :func:`load_stock_pipeline`)."""
    spec = family_spec(family)
    return adapter_for(spec).load(spec, pretrained, device=device, dtype=dtype)


def load_stock_pipeline(spec: FamilySpec, pretrained: str | Path | None = None, device=None,
                        dtype: torch.dtype | None = None):
    """The family's stock diffusers pipeline, loaded with ``from_pretrained`` from a hub id or a local directory.

    ``pretrained`` may be a pipeline directory / hub id, or a directory holding only the denoiser (then the
    rest of the pipeline comes from the family's hub id). The family's scheduler is swapped in, the safety
    checker is left out (it would black out images and bias FID), progress bars are off. ``dtype`` defaults to
    the family's precision on CUDA (fp16; fp32 for SD1.x, as the reference ran it) and fp32 on the CPU."""
    device, dtype = device_and_dtype(spec, device, dtype)
    cls = stock_pipeline_class(spec)
    source = pretrained or spec.hub_id
    if source is None:
        raise InputError(f"family {spec.name!r} has no hub id: pass pretrained=DIR (--pretrained)")
    kwargs: dict = from_pretrained_kwargs(dtype)
    local = Path(str(source)).expanduser()
    if local.is_dir() and (local / "config.json").is_file() and not (local / "model_index.json").is_file():
        # A denoiser-only directory: take the rest from the hub, this denoiser in place of the stock one.
        kwargs[_denoiser_name(spec)] = spec.load(local, dtype=dtype)
        source = spec.hub_id
    if spec.revision and not local.exists():
        kwargs["revision"] = spec.revision
    if "safety_checker" in inspect.signature(cls.__init__).parameters:
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    return from_pretrained(spec, cls, source, local, kwargs, device, dtype, "pipeline",
                           f"download the pipeline (hub id {spec.hub_id!r}) and pass its local directory with "
                           f"--pretrained DIR, or set HF_HOME to a cache that holds it.")


def _may_have_variant(local: Path, variant: str) -> bool:
    """Hub repos: ask for the variant; local directories: only if they hold variant files."""
    return not local.is_dir() or any(local.rglob(f"*.{variant}.*"))


def _denoiser_name(spec: FamilySpec) -> str:
    return "unet" if spec.subfolder == "unet" else "transformer"


def tiny_vae(seed: int = 0) -> nn.Module:
    """A random 4-level AutoencoderKL: 8x downsampling and 4 latent channels like the real ones, few weights."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         block_out_channels=(8, 8, 8, 8), norm_num_groups=4, sample_size=64).eval()


def tiny_scheduler(family: str | FamilySpec):
    """The family's scheduler with the noise schedule of its hub config (its adapter's ``tiny_schedule``)."""
    import diffusers

    spec = family_spec(family)
    adapter = adapter_for(spec)
    name = spec.scheduler or adapter.tiny_scheduler_class
    return getattr(diffusers, name)(**adapter.tiny_schedule, **spec.scheduler_kwargs)


def tiny_pipeline(family: str | FamilySpec, seed: int = 0):
    """The family's tiny pipeline (its adapter builds it; for the stock kinds :func:`tiny_stock_pipeline`)."""
    spec = family_spec(family)
    return adapter_for(spec).tiny_pipeline(spec, seed=seed)


def tiny_stock_pipeline(spec: FamilySpec, seed: int = 0):
    """The family's pipeline assembled from the registry's tiny denoiser, a tiny random VAE and the family's
    scheduler; no text encoders or tokenizers (feed prompt embeddings). The stock class where it can be built
    without ``transformers`` (always for DiT), else :class:`PipelineParts` with the same components.

    ``pipe.default_resolution`` (64 px) is the image size the sampler uses by default for it."""
    denoiser = spec.build("tiny", seed=seed)
    components = {_denoiser_name(spec): denoiser, "vae": tiny_vae(seed), "scheduler": tiny_scheduler(spec)}
    cls = stock_pipeline_class(spec, required=False)
    if cls is None:
        pipe = PipelineParts(spec.pipeline_class, **components)
    else:
        accepted = inspect.signature(cls.__init__).parameters
        optional = {name: None for name in ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2",
                                            "safety_checker", "feature_extractor", "image_encoder")
                    if name in accepted}
        if "requires_safety_checker" in accepted:
            optional["requires_safety_checker"] = False
        pipe = cls(**components, **optional)
        pipe.set_progress_bar_config(disable=True)
    # An 8x8 latent: the smallest grid every tiny denoiser takes (keeps CPU tests fast).
    pipe.default_resolution = TINY_LATENT_SIZE * vae_scale_factor(pipe.vae)
    return pipe
