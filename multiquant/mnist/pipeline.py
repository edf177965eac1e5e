"""Class-conditional pixel-space DiT pipeline for the embedded MNIST family.

Each image's starting noise comes from its own ``torch.Generator`` seeded by that image's seed (drawn on
the CPU, then moved), and the default solver (DPM-Solver++ 2M) is deterministic, so image ``i`` does not
depend on the batch size, the batch composition or the device: common random numbers across
quantization configurations.
"""
from __future__ import annotations

import inspect
from pathlib import Path

import torch
from diffusers import DiffusionPipeline

from .data import MODEL_RANGE
from ..utils import to_uint8


class MNISTDiTPipeline(DiffusionPipeline):
    """``transformer``: a ``DiTTransformer2DModel`` with ``in_channels=1``; ``scheduler``: any diffusers scheduler.

    Classifier-free guidance uses the label embedding's null class (index ``num_embeds_ada_norm``)."""

    model_cpu_offload_seq = "transformer"

    def __init__(self, transformer, scheduler):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler)

    @property
    def null_class(self) -> int:
        return int(self.transformer.config.num_embeds_ada_norm)

    @classmethod
    def from_family(cls, pretrained: str | Path | None = None, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None, family: str = "mnist_dit") -> "MNISTDiTPipeline":
        """The shipped (or ``pretrained``) denoiser with the family's sampler; fp16 on CUDA, fp32 on CPU."""
        from ..families import get_family

        spec = get_family(family)
        device = torch.device(device)
        dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
        transformer = spec.load(pretrained, dtype=dtype, device=device)
        return cls(transformer=transformer, scheduler=build_scheduler(spec, pretrained))

    def initial_noise(self, seeds, device=None, dtype=torch.float32) -> tuple[torch.Tensor, list[torch.Generator]]:
        """``[N, C, H, W]`` noise, row ``i`` drawn from ``torch.Generator().manual_seed(seeds[i])``."""
        cfg = self.transformer.config
        shape = (cfg.in_channels, cfg.sample_size, cfg.sample_size)
        generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        noise = torch.stack([torch.randn(shape, generator=g) for g in generators])
        return noise.to(device=device or self.device, dtype=dtype), generators

    def _denoise(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, guidance_scale: float) -> torch.Tensor:
        model_dtype = self.transformer.dtype
        if guidance_scale == 1.0:
            x_in, y_in = x, labels
        else:  # conditional and unconditional halves in one forward
            x_in = torch.cat([x, x])
            y_in = torch.cat([labels, torch.full_like(labels, self.null_class)])
        t_in = t.expand(x_in.shape[0]).to(x.device)
        out = self.transformer(x_in.to(model_dtype), timestep=t_in, class_labels=y_in, return_dict=False)[0].float()
        if out.shape[1] == 2 * x.shape[1]:  # learned-sigma checkpoints: keep the mean prediction
            out = out[:, :x.shape[1]]
        if guidance_scale == 1.0:
            return out
        cond, uncond = out.chunk(2)
        return uncond + guidance_scale * (cond - uncond)

    @torch.no_grad()
    def __call__(self, class_labels, seeds=None, num_inference_steps: int = 20, guidance_scale: float = 1.5,
                 batch_size: int | None = None, output_type: str = "uint8", progress: bool = False) -> torch.Tensor:
        """Generate one digit per label.

        Args:
            class_labels: digits 0-9 (list / tensor), one image each.
            seeds: one integer per image (default ``0..N-1``); image ``i``'s noise depends on ``seeds[i]`` only.
            num_inference_steps: solver steps.
            guidance_scale: classifier-free guidance (1.0 = conditional only, one forward per step).
            batch_size: images per denoiser batch (default: all at once); results do not depend on it.
            output_type: ``"uint8"`` -> uint8 ``[N, 1, 28, 28]`` on the CPU; ``"pt"`` -> float [-1, 1].
        """
        labels = torch.as_tensor(class_labels, dtype=torch.long).flatten()
        seeds = list(range(len(labels))) if seeds is None else [int(s) for s in seeds]
        if len(seeds) != len(labels):
            raise ValueError(f"got {len(labels)} class labels but {len(seeds)} seeds: give one seed per image")
        if len(labels) and (labels.min() < 0 or labels.max() >= self.null_class):
            raise ValueError(f"class labels must be in [0, {self.null_class - 1}], got {labels.tolist()[:10]}...")
        if output_type not in ("uint8", "pt"):
            raise ValueError(f"output_type must be 'uint8' or 'pt', got {output_type!r}")
        batch_size = batch_size or max(len(labels), 1)
        chunks = [self._generate(labels[i:i + batch_size], seeds[i:i + batch_size], num_inference_steps,
                                 guidance_scale, progress) for i in range(0, len(labels), batch_size)]
        images = torch.cat(chunks) if chunks else torch.empty(0, 1, 28, 28)
        return to_uint8(images, MODEL_RANGE) if output_type == "uint8" else images

    def _generate(self, labels, seeds, steps, guidance_scale, progress) -> torch.Tensor:
        device = self.device
        x, generators = self.initial_noise(seeds, device=device)
        labels = labels.to(device)
        self.scheduler.set_timesteps(steps, device=device)
        x = x * self.scheduler.init_noise_sigma
        # Stochastic schedulers draw their step noise per image too (a list of generators, one per row).
        step_kwargs = {"generator": generators} if "generator" in inspect.signature(self.scheduler.step).parameters else {}
        timesteps = self.scheduler.timesteps
        for t in (self.progress_bar(timesteps) if progress else timesteps):
            x_in = self.scheduler.scale_model_input(x, t)
            out = self._denoise(x_in, t.reshape(1), labels, guidance_scale)
            x = self.scheduler.step(out, t, x, return_dict=False, **step_kwargs)[0]
        return x.float().cpu()


def build_scheduler(spec, pretrained: str | Path | None = None):
    """The family's sampling scheduler: ``scheduler_config.json`` beside the weights if present, else the spec's."""
    import diffusers

    cls = getattr(diffusers, spec.scheduler or "DPMSolverMultistepScheduler")
    folder = Path(str(pretrained or spec.default_pretrained or ""))
    if (folder / "scheduler_config.json").is_file():
        return cls.from_pretrained(str(folder))
    return cls(**spec.scheduler_kwargs)
