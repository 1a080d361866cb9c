"""Index-carrying batches over an in-memory ``ImageSet``, planned per epoch.

The order of every epoch is a pure function of ``(seed, epoch)``, so the
training loop knows batch b+L while batch b trains and can send its anchors to
the generation pool ahead of time. Under DDP each rank takes a disjoint
strided shard of the same global permutation.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from clsp_positives.images import ImageSet


class IndexedImages(Dataset):
    """``ImageSet`` as a torch Dataset: item i is ``(i, image uint8 [H, W, C], label)``.

    ``__getitems__`` lets a DataLoader fetch a whole batch with one numpy
    gather instead of B Python calls.
    """

    def __init__(self, images: ImageSet) -> None:
        self.data = images

    def __len__(self) -> int:
        return len(self.data.labels)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor, int]:
        return index, torch.from_numpy(self.data.images[index]), int(self.data.labels[index])

    def __getitems__(self, indices: list[int]) -> list[tuple[int, torch.Tensor, int]]:
        return [self[i] for i in indices]

    def anchors(self, indices: np.ndarray) -> np.ndarray:
        """The images at ``indices``, for the positives feed (as a streamed set's
        ``StreamedBatches.anchors``)."""
        return self.data.anchors(indices)

    def batch(self, indices: np.ndarray) -> Batch:
        idx = np.asarray(indices, dtype=np.int64)
        return Batch(
            indices=idx,
            images=np.ascontiguousarray(self.data.images[idx]),
            labels=self.data.labels[idx],
        )


@dataclass(frozen=True)
class Batch:
    indices: np.ndarray  # int64 [B], positions in the data set
    images: np.ndarray  # uint8 [B, H, W, C]
    labels: np.ndarray  # int64 [B]


@dataclass(frozen=True)
class EpochPlan:
    """The batches one rank trains on in one epoch, known before it starts."""

    epoch: int
    batches: tuple[np.ndarray, ...]

    def __len__(self) -> int:
        return len(self.batches)


class ShardedBatchSampler:
    """Seeded per-epoch permutation, cut into equal rank shards and batches.

    The global permutation is truncated to a multiple of
    ``world_size * batch_size`` (drop-last), so every rank runs the same number
    of equally sized steps: DDP's collectives and the gathered contrastive
    batch need that. Rank r takes positions r, r + W, r + 2W, ... of it.
    """

    def __init__(
        self,
        size: int,
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside a world of {world_size}")
        if size < batch_size * world_size:
            raise ValueError(
                f"the data set has {size} images, fewer than one global batch "
                f"({batch_size} x {world_size} ranks): lower --batch-size"
            )
        self.size = size
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle = shuffle

    @property
    def steps_per_epoch(self) -> int:
        return self.size // (self.batch_size * self.world_size)

    def global_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.size, dtype=np.int64)
        rng = np.random.default_rng([self.seed, epoch, 0x5A4D])
        return rng.permutation(self.size).astype(np.int64)

    def plan(self, epoch: int) -> EpochPlan:
        used = self.steps_per_epoch * self.batch_size * self.world_size
        shard = self.global_order(epoch)[:used][self.rank :: self.world_size]
        batches = tuple(shard.reshape(self.steps_per_epoch, self.batch_size))
        return EpochPlan(epoch=epoch, batches=batches)

    def __iter__(self) -> Iterator[list[int]]:
        """Batches of epoch 0, for use as a DataLoader ``batch_sampler``."""
        for b in self.plan(0).batches:
            yield b.tolist()

    def __len__(self) -> int:
        return self.steps_per_epoch


def epoch_candidates(seed: int, epoch: int, size: int, k: int) -> np.ndarray:
    """The candidate index (0..k-1) each image uses as its synthetic positive
    this epoch: one seeded draw per image over the whole data set, so it does
    not depend on the rank layout."""
    if k < 1:
        raise ValueError(f"--k must be >= 1, got {k}")
    rng = np.random.default_rng([seed, epoch, 0xC4D])
    return rng.integers(0, k, size=size, dtype=np.int64)


def channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 ``[N, H, W, C]`` images in [0, 1] units."""
    x = images.reshape(-1, images.shape[-1]).astype(np.float64) / 255.0
    mean = x.mean(axis=0)
    std = np.maximum(x.std(axis=0), 1e-3)
    return [float(v) for v in mean], [float(v) for v in std]
