"""DeiT's repeated augmentation (Hoffer et al. 2020; DeiT, Touvron et al. 2021, Sec. 6) with timm's
``RepeatAugSampler``, made to fit this trainer: resumable part-way through an epoch, its order a
function of (seed, epoch), and each copy of an image augmented differently.

timm's sampler repeats every index ``num_repeats`` times and deals the copies to the processes
(copies of one image go to different processes), then keeps about ``len(dataset) / world`` of
them per process, so an epoch has as many steps as without it. Our augmentation is seeded per item
(:class:`condensevit.data.SeededAugmentation`): keyed by the image alone, the copies would be
augmented alike. So each yielded item is ``(key, index)``, the key being the item's position in the
epoch's global stream, unique per copy and the same when the epoch is resumed.
"""
from __future__ import annotations

from torch.utils.data import Sampler

__all__ = ["RepeatAugmentSampler"]


class RepeatAugmentSampler(Sampler):
    """timm's :class:`~timm.data.distributed_sampler.RepeatAugSampler` yielding ``(key, index)``.

    Args:
        n: dataset length. num_replicas, rank: the process group (1, 0 without one).
        seed: the run's seed (timm's sampler shuffles by epoch alone; we seed it by
            ``seed * 100003 + epoch`` so runs with other seeds see other orders).
        num_repeats: copies of each image per epoch (DeiT: 3).

    Call :meth:`set_epoch` each epoch and :meth:`set_start` with the items of this rank already
    consumed, as for :class:`~.distributed.ResumableDistributedSampler`.
    """

    def __init__(self, n: int, *, num_replicas: int = 1, rank: int = 0, seed: int = 0, num_repeats: int = 3):
        from timm.data.distributed_sampler import RepeatAugSampler
        if num_repeats < 1:
            raise ValueError(f"num_repeats {num_repeats} must be at least 1")
        # selected_round: timm's (and DeiT's) 256; datasets smaller than that keep all their images
        self.inner = RepeatAugSampler(range(n), num_replicas=num_replicas, rank=rank, shuffle=True,
                                      num_repeats=num_repeats)
        self.num_replicas, self.rank, self.seed = num_replicas, rank, int(seed)
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int):
        self.epoch = int(epoch)
        self.inner.set_epoch(self.seed * 100_003 + self.epoch)

    def set_start(self, start: int):
        self.start = int(start)

    def __iter__(self):
        for i, index in enumerate(self.inner):
            if i >= self.start:
                yield (self.rank + i * self.num_replicas, index)  # this item's place in the global stream

    def __len__(self) -> int:
        return max(len(self.inner) - self.start, 0)
