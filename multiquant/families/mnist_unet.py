"""The second embedded testbed: a plain PyTorch class-conditional U-Net DDPM on MNIST digits.

Brought in exactly as a user brings their own denoiser: an ordinary ``nn.Module`` and its own ancestral
DDPM sampler (``multiquant/mnist/unet.py``), weights in one ``.safetensors`` file (trained by
``python -m multiquant.mnist.train_unet``), quality = MNIST-FID with the shipped LeNet classifier.
"""
from pathlib import Path

from . import FamilySpec, register_family
from ..mnist.unet import DDPMSampler, MNISTUNet, example_inputs

ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "mnist_unet"
WEIGHTS = ASSET_DIR / "model.safetensors"

# 28/14/7 pixels at 32/64/64 channels, 128-d time and label embeddings: ~0.75M parameters.
FULL_CONFIG = dict(channels=(32, 64, 64), emb_dim=128)
TINY_CONFIG = dict(channels=(8, 16), emb_dim=16, groups=4)
SAMPLER = DDPMSampler(steps=50, variance="small", batch_size=1000)


def build_unet(size: str = "full") -> MNISTUNet:
    return MNISTUNet(**(FULL_CONFIG if size == "full" else TINY_CONFIG))


MNIST_UNET = register_family(FamilySpec(
    name="mnist_unet", factory=build_unet, default_pretrained=WEIGHTS, fp_prec=16, architecture="mnist_unet",
    conditioning="class", num_classes=10, num_images=1000, resolution=28, steps=SAMPLER.steps, guidance=1.0,
    example_inputs=example_inputs,
    notes="Embedded testbed 2: plain nn.Module U-Net DDPM on MNIST with its own 50-step ancestral sampler; "
          "image i gets class i % 10; MNIST-FID vs held-out digits.",
))
