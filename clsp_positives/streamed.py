"""An image folder streamed from disk, for data sets larger than memory: both
trainers read one with ``--data-workers N`` (``clsp train``, docs/training.md "Large
data sets"; ``clsp diffusion train``, docs/training.md "Training the DDPM at scale"),
so it lives in the shared root package (docs/design.md §3).

The in-memory path (``clsp_positives.images.load_images``) decodes every image once
into one uint8 array; here only the folder's index (relative paths and labels) stays
in memory, and DataLoader worker processes decode and resize each batch as it is
needed, at the size the run fixes (``--image-size``, never the first image's).

The batches are the caller's: ``StreamedImages.loader`` takes any iterable of index
lists, so each trainer keeps its own order (``clsp train``'s sampler plans,
``trainer/data/streamed.py``; the DDPM's step-seeded order, ``service/ddpm/train.py``)
and item ``i`` of the folder is data set index ``i`` everywhere.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from clsp_positives.images import (
    DIGIT_SETS,
    TORCHVISION_SETS,
    read_rgb,
    scan_image_folder,
    to_channels,
)

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
