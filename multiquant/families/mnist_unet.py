"""The second embedded testbed: a plain PyTorch class-conditional U-Net DDPM on MNIST digits.

Brought in exactly as a user brings their own denoiser, through the public family protocol only: an
ordinary ``nn.Module`` (``factory``), its weights in one ``.safetensors`` file (``weights``, trained by
``python -m multiquant.mnist.train_unet``), its own ancestral DDPM sampler (``sampler``), what each image is
conditioned on (``conditions``) and its metric (``metric``: MNIST-FID, the shipped LeNet classifier's features
against the shipped held-out reference statistics), all declared here.
"""
from pathlib import Path

from . import FamilySpec, register_family
from ..metrics import FeatureFID
from ..mnist.classifier import MNISTLeNetFeatures, mnist_reference
from ..mnist.unet import DDPMSampler, MNISTUNet, example_inputs

ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "mnist_unet"
WEIGHTS = ASSET_DIR / "model.safetensors"

# 28/14/7 pixels at 32/64/64 channels, 128-d time and label embeddings: ~0.75M parameters.
FULL_CONFIG = dict(channels=(32, 64, 64), emb_dim=128)
TINY_CONFIG = dict(channels=(8, 16), emb_dim=16, groups=4)
# 50 strided ancestral DDPM steps with the posterior variance (chosen on FP16 quality, see the model card).
SAMPLER = DDPMSampler(steps=50, variance="small", batch_size=1000)


def build_unet(size: str = "full") -> MNISTUNet:
    return MNISTUNet(**(FULL_CONFIG if size == "full" else TINY_CONFIG))


def digit_conditions(n: int) -> list[int]:
    """Image i draws digit i % 10: every prefix of 10k images is class balanced."""
    return [i % 10 for i in range(n)]


MNIST_UNET = register_family(FamilySpec(
    name="mnist_unet", factory=build_unet, weights=WEIGHTS, sampler=SAMPLER, conditions=digit_conditions,
    metric=FeatureFID(MNISTLeNetFeatures(), reference_stats=mnist_reference, name="MNIST-FID"),
    example_inputs=example_inputs, fp_prec=16, architecture="mnist_unet", conditioning="class", num_classes=10,
    num_images=1000, resolution=28, steps=SAMPLER.steps, guidance=1.0,
    # all of a configuration's images in one sampler call (which bounds its own memory): at 64 per call, one
    # configuration took ~3 s on an H200, launch-bound; 1,000 images in one call sample in 0.31 s
    # (benchmarks/results/sampler_layout_mnist_unet.json)
    batch_size=SAMPLER.batch_size,
    notes="Embedded testbed 2: plain nn.Module U-Net DDPM on MNIST with its own 50-step ancestral sampler; "
          "image i gets digit i % 10; MNIST-FID vs held-out digits.",
))
