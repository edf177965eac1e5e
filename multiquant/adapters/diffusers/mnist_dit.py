"""The embedded MNIST DiT (``MNISTDiTPipeline``, :mod:`multiquant.mnist.pipeline`): a pixel-space
class-conditional DiT on 28 x 28 digits, loaded from the shipped weights and sampled by its own pipeline
(DPM-Solver++ 2M from ``scheduler_config.json``); 1 channel, or 3 replicated for RGB feature networks."""
from __future__ import annotations

from .dit import DiTAdapter
from .loading import device_and_dtype


class MNISTDiTAdapter(DiTAdapter):
    kind = "mnist"
    pipeline_classes = ("MNISTDiTPipeline",)
    tiny_schedule: dict = {}
    pixel_space = True

    def load(self, spec, pretrained, device, dtype=None):
        from ...mnist.pipeline import MNISTDiTPipeline

        device, dtype = device_and_dtype(spec, device, dtype)
        return MNISTDiTPipeline.from_family(pretrained, device=device, dtype=dtype, family=spec.name)

    def tiny_pipeline(self, spec, seed: int = 0):
        from ...mnist.pipeline import MNISTDiTPipeline, build_scheduler

        return MNISTDiTPipeline(transformer=spec.build("tiny", seed=seed), scheduler=build_scheduler(spec))

    def sampler_settings(self, sampler) -> dict:
        return {"channels": sampler.channels}

    def render(self, sampler, indices):
        from ...seeds import seed_for

        images = sampler.pipe(class_labels=[sampler.conditions[i] for i in indices],
                              seeds=[seed_for(sampler.seed, i) for i in indices],
                              num_inference_steps=sampler.steps, guidance_scale=sampler.guidance)
        images = images.cpu()
        return images.expand(-1, 3, -1, -1).contiguous() if sampler.channels == "3" else images
