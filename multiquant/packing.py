"""Bit-packing of b-bit integer codes (2 <= b <= 8): every 8 codes become b bytes, little-endian."""
from __future__ import annotations

import torch


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Flatten ``codes`` (uint8, values < 2^bits) and pack them into ceil(n/8)*bits bytes."""
    flat = codes.reshape(-1)
    if flat.numel() and int(flat.max()) >= 2 ** bits:
        raise ValueError(f"code {int(flat.max())} does not fit in {bits} bits")
    pad = (-flat.numel()) % 8
    if pad:  # the check, the padding and the grouping on the narrow codes: one widening, no full-size copies
        flat = torch.nn.functional.pad(flat, (0, pad))
    groups = flat.view(-1, 8).to(torch.int64)
    shifts = torch.arange(8, device=codes.device, dtype=torch.int64) * bits
    words = (groups << shifts).sum(dim=1)  # one b*8-bit word per group
    byte_shifts = torch.arange(bits, device=codes.device, dtype=torch.int64) * 8
    return ((words[:, None] >> byte_shifts) & 0xFF).to(torch.uint8).reshape(-1)


def unpack_codes(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: the first ``numel`` codes as a flat uint8 tensor."""
    groups = packed.to(torch.int64).view(-1, bits)
    byte_shifts = torch.arange(bits, device=packed.device, dtype=torch.int64) * 8
    words = (groups << byte_shifts).sum(dim=1)
    shifts = torch.arange(8, device=packed.device, dtype=torch.int64) * bits
    codes = (words[:, None] >> shifts) & (2 ** bits - 1)
    return codes.reshape(-1)[:numel].to(torch.uint8)


def packed_nbytes(numel: int, bits: int) -> int:
    return -(-numel // 8) * bits
