"""Multi-process helpers for torchrun: one process per GPU (or several CPU processes with gloo).

Typical use::

    info = init_from_env()                     # no-op when not launched by torchrun
    mine = shard(range(num_configs), info.rank, info.world_size)
    ...score the configs in `mine`, commit them to a shared RecordStore...
    feats = gather_features(local_feats)       # every rank gets all features, in the original order

:func:`shard` hands out contiguous blocks in rank order and :func:`gather_features` concatenates
in rank order, so ``gather_features`` of the per-shard results equals the single-process result.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Sequence, TypeVar

import torch
import torch.distributed as dist

from .errors import SetupError

__all__ = ["DistInfo", "init_from_env", "shard", "gather_features", "is_main", "barrier", "rank", "world_size",
           "cleanup"]

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None  # None: single process, no process group


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else default


def init_from_env(backend: str | None = None, timeout_s: float = 1800.0) -> DistInfo:
    """Join the process group described by torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR, MASTER_PORT). Backend: nccl when CUDA is available, else gloo. Without those
    variables (or with WORLD_SIZE=1) this is a no-op describing a single process."""
    world = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world <= 1:
        return DistInfo(0, 1, local_rank, device, None)
    if dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device, dist.get_backend())
    for name in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        if name not in os.environ:
            raise SetupError(f"WORLD_SIZE={world} but {name} is not set: launch with torchrun")
    backend = backend or ("nccl" if use_cuda else "gloo")
    kwargs = {"device_id": device} if backend == "nccl" else {}
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s), **kwargs)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device, backend)


def cleanup() -> None:
    """Leave the process group (if any)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if _active() else 0


def world_size() -> int:
    return dist.get_world_size() if _active() else 1


def is_main() -> bool:
    """True on rank 0 (and in a single process)."""
    return rank() == 0


def barrier() -> None:
    """Wait for all ranks (no-op in a single process)."""
    if _active():
        dist.barrier()


def main_decides(flag: bool | None) -> bool:
    """Rank 0's ``flag`` on every rank (other ranks pass anything); a single process gets ``flag``."""
    if not _active():
        return bool(flag)
    nccl = dist.get_backend() == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    t = torch.tensor([1 if (is_main() and flag) else 0], dtype=torch.long, device=device)
    dist.broadcast(t, src=0)
    return bool(t.item())


def shard(indices: Sequence[T], rank: int, world: int) -> list[T]:
    """Rank ``rank``'s contiguous block of ``indices``; block sizes differ by at most one and the
    blocks, concatenated in rank order, give back ``indices``."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"need 0 <= rank < world, got rank={rank}, world={world}")
    items = list(indices)
    base, extra = divmod(len(items), world)
    start = rank * base + min(rank, extra)
    return items[start:start + base + (1 if rank < extra else 0)]


def gather_features(local: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``local`` ``[n_r, ...]`` in rank order, on every rank.

    Blocks may differ in length (see :func:`shard`); the trailing dims and dtype must agree.
    Returns a tensor on ``local``'s device; a single process gets ``local`` back."""
    if not _active():
        return local
    world = dist.get_world_size()
    # nccl needs CUDA tensors, gloo CPU ones.
    nccl = dist.get_backend() == "nccl"
    comm_device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    x = local.to(comm_device).contiguous()
    sizes = [torch.zeros(1, dtype=torch.long, device=comm_device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([x.shape[0]], dtype=torch.long, device=comm_device))
    sizes = [int(s.item()) for s in sizes]
    longest = max(sizes)
    padded = torch.zeros((longest,) + tuple(x.shape[1:]), dtype=x.dtype, device=comm_device)
    padded[:x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)]).to(local.device)
