"""The training batches of a streamed image folder in ``clsp train``'s plan order
(``clsp train --data-workers N``; docs/training.md, "Large data sets").

The folder itself, decoded by DataLoader workers, is ``clsp_positives/streamed.py``
(shared with ``clsp diffusion train``). Here the batches are the sampler's
(``ShardedBatchSampler`` plans): the loader reads the plans of every remaining epoch
in order, so the indices the trainer sends the pool are the ones it trains on
(docs/design.md §5). The positives feed needs the anchors of batch ``b + L`` while
batch ``b`` trains; ``StreamedBatches`` keeps the loader ``L`` batches ahead of the
step and hands the feed those decoded batches (``anchors``), decoding on demand only
what it does not hold.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import Any

import numpy as np

from clsp_positives.images import ImageSet
from clsp_positives.streamed import LoadedBatch, StreamedImages
from clsp_positives.trainer.data.epochs import Batch, ShardedBatchSampler, channel_stats


class PlannedBatches:
    """The sampler's batches of ``epochs``, one epoch after the other: a DataLoader
    ``batch_sampler`` whose order is the training's."""

    def __init__(self, sampler: ShardedBatchSampler, epochs: range) -> None:
        self.sampler = sampler
        self.epochs = epochs

    def __iter__(self) -> Iterator[list[int]]:
        for epoch in self.epochs:
            for batch in self.sampler.plan(epoch).batches:
                yield batch.tolist()

    def __len__(self) -> int:
        return len(self.epochs) * self.sampler.steps_per_epoch


class StreamedBatches:
    """The training batches of a streamed set, from one loader over every remaining
    epoch (its workers live for the run and read across epoch boundaries).

    ``batch(indices)`` is the step's batch; it first has the loader ``lookahead``
    batches ahead, so that the positives feed, asking ``anchors`` for batch
    ``b + lookahead`` while ``b`` trains, gets a batch already decoded. Memory holds
    ``lookahead + 1`` batches here and the loader's prefetch in the workers, however
    large the folder.
    """

    def __init__(
        self,
        images: StreamedImages,
        sampler: ShardedBatchSampler,
        *,
        epochs: range,
        lookahead: int,
    ) -> None:
        self.images = images
        self.lookahead = lookahead
        plan = PlannedBatches(sampler, epochs)
        self._left = len(plan)
        self._loader: Iterator[LoadedBatch] | None = iter(images.loader(plan))
        self._window: deque[tuple[bytes, LoadedBatch]] = deque()
        self._current = False  # the window's first batch is the step's: drop it next
        self.decoded_here = 0  # anchors the feed asked for that no loaded batch held

    def __len__(self) -> int:
        return len(self.images)

    def _fill(self) -> None:
        while len(self._window) <= self.lookahead and self._left > 0:
            if self._loader is None:
                raise RuntimeError("the streamed batches are closed")
            loaded = next(self._loader)
            self._left -= 1
            self._window.append((loaded.indices.numpy().tobytes(), loaded))

    def batch(self, indices: np.ndarray) -> Batch:
        """The step's batch, which must be the plan's next: uint8 images, pinned on
        CUDA (``images`` is a view of the loader's tensor)."""
        if self._current:
            self._window.popleft()
        self._fill()
        idx = np.asarray(indices, dtype=np.int64)
        if not self._window or self._window[0][0] != idx.tobytes():
            raise RuntimeError("the streamed batches are out of step with the sampler's plan")
        self._current = True
        loaded = self._window[0][1]
        return Batch(indices=idx, images=loaded.images.numpy(), labels=loaded.labels.numpy())

    def anchors(self, indices: np.ndarray) -> np.ndarray:
        """The images at ``indices`` for the positives feed: a loaded batch's when the
        window holds one with these indices, else decoded now."""
        key = np.asarray(indices, dtype=np.int64).tobytes()
        for held, loaded in self._window:
            if held == key:
                return loaded.images.numpy()
        self.decoded_here += 1
        return self.images.anchors(np.asarray(indices, dtype=np.int64))

    def close(self) -> None:
        """Stop the workers (dropping the iterator shuts them down)."""
        self._loader = None
        self._window.clear()


def pixels(data: ImageSet | StreamedImages) -> np.ndarray | StreamedImages:
    """What the evaluation reads a set's images from: the array, or the streamed set
    itself (``frozen_features`` reads it batch by batch)."""
    return data if isinstance(data, StreamedImages) else data.images


def pixel_stats(
    data: ImageSet | StreamedImages,
) -> tuple[tuple[int, int, int, int], list[float], list[float]]:
    """A set's shape ``(N, H, W, C)`` and its per-channel mean and std: of every image
    in memory, of ``STATS_IMAGES`` of a streamed set."""
    if isinstance(data, StreamedImages):
        return (data.shape, *data.channel_stats())
    shape: Any = tuple(int(v) for v in data.images.shape)
    return (shape, *channel_stats(data.images))
