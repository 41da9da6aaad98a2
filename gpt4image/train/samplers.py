"""Samplers for distributed training and exact distributed evaluation."""
from __future__ import annotations

import math
from collections.abc import Iterator, Sized

import torch
import torch.distributed as dist


def _rank_world(rank, world_size):
    if world_size is None:
        world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if rank is None:
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    return rank, world_size


class ExactDistributedSampler(torch.utils.data.Sampler):
    """Each rank takes indices ``rank, rank + W, ...``: every sample is visited exactly once over all
    ranks (no padding with duplicates), so ranks may get one sample more than others. Metrics must be
    reduced by sample count, and the model must not be DDP-wrapped during evaluation."""

    def __init__(self, dataset: Sized, rank: int | None = None, world_size: int | None = None) -> None:
        self.rank, self.world_size = _rank_world(rank, world_size)
        self.total = len(dataset)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.total, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.total, self.world_size))


class RASampler(torch.utils.data.Sampler):
    """Repeated augmentation (Hoffer et al., 2020; as used by DeiT): each epoch, every sample appears
    ``repeats`` times in a row of the shuffled order, so its copies land on consecutive ranks of one
    global batch, each with its own augmentation. As in DeiT, an epoch keeps only
    ``len // 256 * 256 / W`` indices per rank (so its length equals an epoch without repeats);
    datasets smaller than 256 samples keep ``ceil(len / W)``.
    """

    def __init__(self, dataset: Sized, rank: int | None = None, world_size: int | None = None, shuffle: bool = True,
                 repeats: int = 3, seed: int = 0) -> None:
        self.rank, self.world_size = _rank_world(rank, world_size)
        self.n = len(dataset)
        self.shuffle, self.repeats, self.seed = shuffle, repeats, seed
        self.epoch = 0
        self.num_samples = math.ceil(self.n * repeats / self.world_size)
        self.total_size = self.num_samples * self.world_size
        if self.n >= 256:
            self.num_selected = self.n // 256 * 256 // self.world_size
        else:
            self.num_selected = math.ceil(self.n / self.world_size)

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose order ``__iter__`` serves (shuffled by seed + epoch)."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        order = [i for i in order for _ in range(self.repeats)]
        order += order[:self.total_size - len(order)]
        mine = order[self.rank:self.total_size:self.world_size]
        return iter(mine[:self.num_selected])

    def __len__(self) -> int:
        return self.num_selected
