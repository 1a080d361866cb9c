"""An image folder streamed from disk, for data sets larger than memory
(``clsp train --data-workers N``; docs/training.md, "Large data sets").

The in-memory path (``clsp_positives.images.load_images``) decodes every image once
into one uint8 array; here only the folder's index (relative paths and labels) stays
in memory, and DataLoader worker processes decode and resize each batch as it is
needed, at the size the run fixes (``--image-size``, never the first image's).

The batches are still the sampler's (``ShardedBatchSampler`` plans): the loader
reads the plans of every remaining epoch in order, so item ``i`` of the folder is
data set index ``i`` everywhere, and the indices the trainer sends the pool are the
ones it trains on (docs/design.md §5). The positives feed needs the anchors of batch
``b + L`` while batch ``b`` trains; ``StreamedBatches`` keeps the loader ``L``
batches ahead of the step and hands the feed those decoded batches (``anchors``),
decoding on demand only what it does not hold.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from clsp_positives.images import (
    DIGIT_SETS,
    TORCHVISION_SETS,
    ImageSet,
    read_rgb,
    scan_image_folder,
    to_channels,
)
from clsp_positives.trainer.data.epochs import Batch, ShardedBatchSampler, channel_stats

STATS_IMAGES = 4096
"""Images the normalisation's per-channel mean and std are measured on (all of a
smaller set): a pass over a large folder only to normalise it would cost an epoch of
decoding before the first step, and a few thousand images pin the mean to ~1e-3."""
STATS_SEED = 0x57A75
"""Seed of that sample: fixed, so that ``clsp eval`` measures what the run did."""
STATS_BATCH = 256


class PathTable:
    """Relative paths as one UTF-8 buffer and its offsets, without a Python object
    per path: forked DataLoader workers touching a list of strings would copy it page
    by page (reference counts are writes), a numpy buffer stays shared."""

    def __init__(self, blob: np.ndarray, offsets: np.ndarray) -> None:
        self._blob = blob  # uint8 [total bytes]
        self._offsets = offsets  # int64 [N + 1]

    @classmethod
    def of(cls, names: Sequence[str]) -> PathTable:
        encoded = [name.encode() for name in names]
        offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(e) for e in encoded], out=offsets[1:])
        return cls(np.frombuffer(b"".join(encoded), dtype=np.uint8), offsets)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, index: int) -> str:
        start, end = self._offsets[index], self._offsets[index + 1]
        return self._blob[start:end].tobytes().decode()

    def first(self, n: int) -> PathTable:
        return PathTable(self._blob[: self._offsets[n]], self._offsets[: n + 1])


class LoadedBatch(NamedTuple):
    """One decoded batch as the loader yields it (pinned on CUDA)."""

    indices: torch.Tensor  # int64 [B], data set indices
    images: torch.Tensor  # uint8 [B, H, W, C]
    labels: torch.Tensor  # int64 [B]


def _as_loaded(batch: LoadedBatch) -> LoadedBatch:
    """The loader's collate function: ``__getitems__`` already stacked the batch."""
    return batch


def _chunked(rows: np.ndarray, size: int) -> list[list[int]]:
    return [rows[s : s + size].tolist() for s in range(0, len(rows), size)]


class StreamedImages(Dataset):
    """An image folder read on demand: item ``i`` is ``(i, uint8 [H, W, C], label)``,
    image ``i`` of ``scan_image_folder``'s order (the in-memory load's order), RGB
    resized to ``size x size`` and then made ``channels`` channels as the in-memory
    load does. ``workers`` decode the batches of every loader it opens."""

    def __init__(
        self,
        root: Path,
        paths: PathTable,
        labels: np.ndarray,
        classes: int,
        name: str,
        *,
        size: int,
        channels: int | None,
        workers: int,
        pin_memory: bool = False,
    ) -> None:
        if len(paths) != len(labels):
            raise ValueError(f"{len(paths)} paths but {len(labels)} labels")
        self.root = root
        self.paths = paths
        self.labels = labels
        self.classes = classes
        self.name = name
        self.size = size
        self.channels = channels or 3
        self.workers = workers
        self.pin_memory = pin_memory

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """What ``ImageSet.images.shape`` would be, without the pixels."""
        return len(self), self.size, self.size, self.channels

    def read(self, index: int) -> np.ndarray:
        """Image ``index``, decoded now: uint8 ``[size, size, channels]``."""
        rgb = read_rgb(self.root / self.paths[int(index)], (self.size, self.size), draft=True)
        return to_channels(np.asarray(rgb, dtype=np.uint8)[None], self.channels)[0]

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor, int]:
        return index, torch.from_numpy(self.read(index)), int(self.labels[index])

    def __getitems__(self, indices: list[int]) -> LoadedBatch:
        """A whole batch, stacked in the worker (the DataLoader calls this with the
        batch sampler's list; ``_as_loaded`` passes it on)."""
        idx = np.asarray(indices, dtype=np.int64)
        return LoadedBatch(
            torch.from_numpy(idx),
            torch.from_numpy(self.anchors(idx)),
            torch.from_numpy(self.labels[idx]),
        )

    def anchors(self, indices: np.ndarray) -> np.ndarray:
        """The images at ``indices`` (uint8 [B, H, W, C]), decoded in this process."""
        out = np.empty((len(indices), self.size, self.size, self.channels), dtype=np.uint8)
        for row, index in enumerate(indices):
            out[row] = self.read(index)
        return out

    def first(self, n: int) -> StreamedImages:
        """The first ``n`` images (``--subset``)."""
        if n >= len(self):
            return self
        return StreamedImages(
            self.root,
            self.paths.first(n),
            self.labels[:n],
            self.classes,
            self.name,
            size=self.size,
            channels=self.channels,
            workers=self.workers,
            pin_memory=self.pin_memory,
        )

    def loader(self, batches: Iterable[list[int]]) -> DataLoader:
        """A DataLoader of these batches (lists of indices), decoded by the workers."""
        return DataLoader(
            self,
            batch_sampler=batches,  # type: ignore[arg-type]
            num_workers=self.workers,
            collate_fn=_as_loaded,
            pin_memory=self.pin_memory,
        )

    def chunks(self, batch_size: int) -> Iterator[torch.Tensor]:
        """Every image in data set order, uint8 [B, H, W, C] batches: how the
        evaluation's feature extraction reads a streamed set (``frozen_features``)."""
        for batch in self.loader(_chunked(np.arange(len(self)), batch_size)):
            yield batch.images

    def channel_stats(self, limit: int = STATS_IMAGES) -> tuple[list[float], list[float]]:
        """Per-channel mean and std in [0, 1] units, as ``epochs.channel_stats``, of a
        seeded sample of ``limit`` images (all of them when fewer), summed batch by batch."""
        n = len(self)
        rows = np.arange(n)
        if n > limit:
            rows = np.sort(np.random.default_rng(STATS_SEED).choice(n, limit, replace=False))
        total = np.zeros(self.channels)
        squares = np.zeros(self.channels)
        count = 0
        for batch in self.loader(_chunked(rows, STATS_BATCH)):
            x = batch.images.numpy().reshape(-1, self.channels).astype(np.float64) / 255.0
            total += x.sum(axis=0)
            squares += (x * x).sum(axis=0)
            count += len(x)
        mean = total / count
        std = np.maximum(np.sqrt(np.maximum(squares / count - mean**2, 0.0)), 1e-3)
        return [float(v) for v in mean], [float(v) for v in std]


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


def open_streamed(
    name: str,
    *,
    split: str,
    size: int | None,
    channels: int | None,
    workers: int,
    pin_memory: bool,
) -> StreamedImages:
    """The streamed set of an image folder, or a ValueError saying why it cannot be."""
    folder = Path(name)
    if name.lower() in (*DIGIT_SETS, *TORCHVISION_SETS) or not folder.is_dir():
        raise ValueError(
            f"--data-workers streams an image folder (DIR/CLASS/*.png), and {name!r} is not "
            "one: the named sets load in memory (--data-workers 0)"
        )
    if size is None:
        raise ValueError(
            "--data-workers streams the folder at --image-size, which it needs: pass "
            "--image-size N (every image is resized to N x N as it is read)"
        )
    found = scan_image_folder(folder, split)
    return StreamedImages(
        found.root,
        PathTable.of(found.names),
        found.labels,
        found.classes,
        str(folder),
        size=size,
        channels=channels,
        workers=workers,
        pin_memory=pin_memory,
    )


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
