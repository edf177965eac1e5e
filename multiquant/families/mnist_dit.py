"""The embedded default family: a small class-conditional pixel-space DiT trained on MNIST digits.

Weights ship in ``multiquant/assets/mnist_dit`` (trained by ``python -m multiquant.mnist.train_dit``), so
the whole system runs on a real trained model on a CPU with no downloads. Quality is MNIST-FID: the
features of the shipped classifier (``multiquant/assets/mnist_classifier``) against held-out real digits.
"""
from pathlib import Path

from ..mnist.classifier import mnist_fid
from . import FamilySpec, register_family
from .dit import DIT_TIES

ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "mnist_dit"

# Training noise process (DDPM, cosine betas, v-prediction); the sampler below must use the same one.
NOISE_SCHEDULE = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")
SAMPLER_KWARGS = dict(NOISE_SCHEDULE, algorithm_type="dpmsolver++", solver_order=2)

# 6 blocks x 192 wide on 4x4 patches (49 tokens): ~4.6M parameters.
FULL_CONFIG = dict(num_attention_heads=6, attention_head_dim=32, in_channels=1, out_channels=1, num_layers=6,
                   sample_size=28, patch_size=4, num_embeds_ada_norm=10)
TINY_CONFIG = dict(num_attention_heads=2, attention_head_dim=8, in_channels=1, out_channels=1, num_layers=2,
                   sample_size=28, patch_size=4, num_embeds_ada_norm=10)

register_family(FamilySpec(
    name="mnist_dit", model_class="DiTTransformer2DModel", pipeline_class="MNISTDiTPipeline", batch_size=250,
    default_pretrained=ASSET_DIR, fp_prec=16, architecture="mnist_dit",
    conditioning="class", prompt_source="mnist_classes", num_classes=10, num_images=1000, resolution=28,
    steps=20, guidance=1.0, scheduler="DPMSolverMultistepScheduler", scheduler_kwargs=SAMPLER_KWARGS,
    full_config=FULL_CONFIG, tiny_config=TINY_CONFIG, ties=DIT_TIES,
    metric=mnist_fid(),  # declared, never implied by prompt_source: the shipped classifier vs held-out digits
    notes="Embedded default: pixel-space DiT on MNIST (multiquant.mnist.pipeline.MNISTDiTPipeline); 100 images per "
          "digit, image i gets class i % 10 and seed i; MNIST-FID vs held-out digits.",
))
