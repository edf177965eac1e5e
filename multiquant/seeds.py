"""Per-image noise seeds: common random numbers across quantization configurations.

Image ``i`` of a run with seed ``s`` starts from noise drawn with ``seed_for(s, i)``, whatever the batch size,
the batch composition or the device, so two configurations see exactly the same noise.
"""
from __future__ import annotations

import numpy as np
import torch

SEED_RULE = "torch.Generator('cpu').manual_seed(seed_for(seed, i)); seed_for = numpy SeedSequence([seed, i]), 63 bits"


def seed_for(seed: int, index: int) -> int:
    """The noise seed of image ``index``: a well-mixed 63-bit function of (run seed, image index)."""
    words = np.random.SeedSequence([int(seed), int(index)]).generate_state(2, dtype=np.uint32)
    return int((int(words[0]) << 32 | int(words[1])) & (2 ** 63 - 1))


def image_generators(seed: int, indices: list[int]) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(seed_for(seed, i)) for i in indices]


def checked_indices(indices, num_images: int) -> list[int]:
    """``indices`` as ints, each an image of a protocol of ``num_images`` images, at least one."""
    indices = [int(i) for i in indices]
    bad = [i for i in indices if not 0 <= i < num_images]
    if bad:
        raise IndexError(f"image indices {bad[:5]} are outside 0..{num_images - 1}")
    if not indices:
        raise ValueError("generate() needs at least one image index")
    return indices
