"""Distributed set-up for runs launched with ``torchrun``: one process per device, NCCL on GPUs and
gloo on CPU, samplers that shard the data, metric reduction, and "only rank 0 writes".

A plain ``python``/``condensevit`` launch (no ``WORLD_SIZE`` in the environment) is a world of one
and never touches ``torch.distributed``.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

__all__ = [
    "DistInfo", "init_distributed", "cleanup_distributed", "all_reduce_sum", "broadcast_flag",
    "ShardedEvalSampler", "ResumableDistributedSampler", "raise_together",
]


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _resolve_device(device: str | None, local_rank: int) -> torch.device:
    if device in (None, "", "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' was asked for but no CUDA GPU is available; use --device cpu")
        if dev.index is None:
            dev = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(dev)
    return dev


def init_distributed(device: str | None = None, timeout_s: float = 1800) -> DistInfo:
    """Join the process group torchrun describes in the environment (or none), pick the device
    (``cuda:LOCAL_RANK`` on GPU) and the backend (NCCL on GPU, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = _resolve_device(device, local_rank)
    if world > 1 and not dist.is_initialized():
        from datetime import timedelta
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s),
                                **({"device_id": dev} if dev.type == "cuda" else {}))
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def cleanup_distributed():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all ranks (in place when distributed); the identity otherwise."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_flag(flag: bool, device: torch.device) -> bool:
    """True when ``flag`` is set on any rank (so every rank stops at the same step)."""
    if not (dist.is_available() and dist.is_initialized()):
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


class ResumableDistributedSampler(Sampler[int]):
    """``DistributedSampler``'s order (a permutation seeded by seed + epoch, padded and split
    across ranks) that can start part-way through an epoch, for exact mid-epoch resumption.

    Works for a world of one without a process group. Call :meth:`set_epoch` each epoch and
    :meth:`set_start` with the number of samples of this rank already consumed.
    """

    def __init__(self, n: int, *, num_replicas: int = 1, rank: int = 0, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False):
        self.n, self.num_replicas, self.rank = n, num_replicas, rank
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.epoch = 0
        self.start = 0
        if drop_last and n % num_replicas:
            self.num_samples = n // num_replicas
        else:
            self.num_samples = math.ceil(n / num_replicas)
        self.total_size = self.num_samples * num_replicas

    def set_epoch(self, epoch: int):
        self.epoch = int(epoch)

    def set_start(self, start: int):
        self.start = int(start)

    def _indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            indices = torch.randperm(self.n, generator=g).tolist()
        else:
            indices = list(range(self.n))
        if self.total_size > len(indices):
            pad = self.total_size - len(indices)
            indices += (indices * math.ceil(pad / len(indices)))[:pad]
        else:
            indices = indices[:self.total_size]
        return indices[self.rank:self.total_size:self.num_replicas]

    def __iter__(self):
        return iter(self._indices()[self.start:])

    def __len__(self) -> int:
        return max(self.num_samples - self.start, 0)


class ShardedEvalSampler(Sampler[int]):
    """Each rank takes every ``world``-th image, with no padding, so the summed metrics count
    every image exactly once."""

    def __init__(self, n: int, *, num_replicas: int = 1, rank: int = 0):
        self.indices = list(range(rank, n, num_replicas))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def raise_together(error: BaseException | None, info: DistInfo):
    """Collective (every rank calls it): when any rank has an ``error``, every rank raises, the failing
    one its own and the others a one-line error naming it, so that no rank waits forever in the next
    collective for a rank that is gone. Used where only rank 0 works (the run folder's lock, the
    checkpoint writes)."""
    if not info.distributed:
        if error is not None:
            raise error
        return
    mine = None if error is None else (str(error).strip().splitlines() or [type(error).__name__])[0]
    gathered = [None] * info.world_size
    dist.all_gather_object(gathered, mine)
    if error is not None:
        raise error
    for rank, msg in enumerate(gathered):
        if msg is not None:
            from ..cli import UsageError
            raise UsageError(f"rank {rank} stopped: {msg}")
