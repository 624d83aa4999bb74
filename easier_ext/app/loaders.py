"""Reproducible DataLoaders for the datasets of :mod:`easier_ext.app.data`, with or without
``torch.distributed``.

:func:`make_loader` wraps a dataset in a :class:`~torch.utils.data.DataLoader` whose sampler has
``set_epoch(epoch)``: a :class:`SeededSampler` in one process; under ``torch.distributed`` a
``DistributedSampler`` for training and a :class:`ShardSampler` for evaluation.
"""

from __future__ import annotations

from typing import Iterator, Optional

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from easier_ext.core.checks import is_int

__all__ = ["SeededSampler", "ShardSampler", "make_loader"]


class SeededSampler(Sampler[int]):
    """All indices of a dataset, in an order fixed by ``seed + epoch`` (or in order).

    The non-distributed counterpart of :class:`~torch.utils.data.DistributedSampler`: the
    permutation of epoch ``e`` is ``torch.randperm(n)`` from a generator seeded with
    ``seed + e``, the one a 1-process DistributedSampler draws, so a run resumed at epoch ``e``
    sees the same order as the uninterrupted run, and the order does not depend on the global RNG.

    Args:
        num_samples: length of the dataset.
        shuffle: permute (training) or keep ``0..n-1`` (evaluation).
        seed: base seed of the permutations.
    """

    def __init__(self, num_samples: int, *, shuffle: bool = True, seed: int = 0) -> None:
        if num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        self.num_samples, self.shuffle, self.seed, self.epoch = num_samples, shuffle, seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Selects the order of epoch ``epoch`` for the next iterations.

        Args:
            epoch: the epoch about to start.
        """
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.num_samples))
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.num_samples, generator=generator).tolist())

    def __len__(self) -> int:
        return self.num_samples


class ShardSampler(Sampler[int]):
    """Rank ``r`` of ``w`` gets samples ``r, r + w, r + 2w, ...``: unpadded shards, so every sample
    is seen exactly once over the ranks (DistributedSampler pads shards to equal sizes).

    Args:
        num_samples: length of the dataset.
        rank: this process's rank.
        world_size: number of processes.
    """

    def __init__(self, num_samples: int, rank: int, world_size: int) -> None:
        self.indices = list(range(rank, num_samples, world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)

    def set_epoch(self, epoch: int) -> None:
        """In order every epoch (kept for the same interface as the training samplers).

        Args:
            epoch: the epoch about to start; it does not change the order.
        """


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    train: bool,
    seed: int = 0,
    workers: int = 0,
    drop_last: Optional[bool] = None,
) -> DataLoader:
    """A reproducible DataLoader, sharded across ranks under ``torch.distributed``.

    Without an initialized process group the sampler is a :class:`SeededSampler`; with one it is
    ``DistributedSampler(dataset, shuffle=True, seed=seed, drop_last=drop_last)`` for training, so
    each rank sees its own shard; evaluation data gets a :class:`ShardSampler`, unpadded shards
    whose union is every sample once, so that accuracies all-reduced over ranks are exact.
    Either way the order is a function of ``seed`` and the epoch: call
    ``loader.sampler.set_epoch(epoch)`` before each epoch, or every epoch repeats epoch 0's order.

    Args:
        dataset: a map-style dataset (with ``__len__``).
        batch_size: samples per batch (per rank).
        train: shuffle, and by default drop the last incomplete batch; False: in order, all.
        seed: seed of the shuffles, and of the worker processes' RNGs.
        workers: worker processes (0: load in the main process).
        drop_last: drop the last incomplete batch (and, distributed, the tail that does not
            divide evenly among ranks). None: ``train``, unless a rank's data is less than one
            batch, where dropping would leave nothing.

    Memory is pinned when CUDA is available, for asynchronous host-to-device copies.

    Returns:
        the DataLoader; ``loader.sampler.set_epoch`` selects the epoch's order.

    Raises:
        ValueError: ``batch_size`` < 1 or ``workers`` < 0.
    """
    if not is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    drop = train if drop_last is None else drop_last
    distributed = dist.is_available() and dist.is_initialized()
    if distributed and train:
        sampler = DistributedSampler(dataset, shuffle=True, seed=seed, drop_last=drop)
    elif distributed:
        sampler = ShardSampler(len(dataset), dist.get_rank(), dist.get_world_size())
    else:
        sampler = SeededSampler(len(dataset), shuffle=train, seed=seed)
    # An explicit drop_last is obeyed; the default must not silently train on nothing.
    drop_batch = drop and (drop_last is not None or len(sampler) >= batch_size)
    # A private generator: the loader draws its workers' base seed from it at every iteration,
    # which would otherwise consume the global RNG; offset by rank so ranks augment differently.
    generator = torch.Generator().manual_seed(seed + (dist.get_rank() if distributed else 0))
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        drop_last=drop_batch,
        generator=generator,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=False,
    )
