"""What a source of positives promises the prefetcher (docs/design.md §5).

A source turns (anchors, data set indices, candidate indices) into a
``PendingPositives``: the answer in parts, each part a future, so that the
prefetcher can use the parts that arrived by its deadline and mask the rest.
This module is the interface both sides share; the sources themselves are in
``sources.py`` (the pool, none) and ``offline.py`` (a pre-generated ``.npy``).
"""

from __future__ import annotations

import concurrent.futures
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np


@dataclass(frozen=True)
class Urgency:
    """When a batch's positives are no use any more, and whether a step needs them now
    (priority 0) or they are look-ahead (1): the pool schedules by it and drops what
    would arrive too late (docs/design.md §5). Other sources answer at once and ignore it."""

    deadline_ms: float | None = None
    priority: int = 0


@dataclass
class PositivesBatch:
    """Positives of one batch; ``images`` is zero where ``mask`` is False."""

    images: np.ndarray  # uint8 [B, H, W, C]
    mask: np.ndarray  # bool [B]: True where a positive arrived
    cache_hits: int


PartAnswer = tuple[np.ndarray, int, "np.ndarray | None"]
"""A part's answer: images uint8 ``[n, H, W, C]``, cache hits, and which rows arrived
(bool ``[n]``; None: all; the pool marks those whose deadline passed)."""
Part = tuple[slice, "concurrent.futures.Future[PartAnswer]"]


class PendingPositives:
    """A batch in flight: parts (a slice of the batch and its future), assembled on demand.

    A part's future holds a ``PartAnswer``. Retrying a failed part is the pool
    client's business (docs/design.md §5), not this class's.
    """

    def __init__(self, shape: tuple[int, ...], parts: list[Part]) -> None:
        self.shape = shape
        self.parts = parts

    def wait(self, timeout: float | None) -> bool:
        """Wait until every part is done, at most ``timeout`` s; True if all are done."""
        futures = [f for _, f in self.parts]
        _, pending = concurrent.futures.wait(futures, timeout=timeout)
        return not pending

    def collect(self) -> tuple[PositivesBatch, list[BaseException]]:
        """The parts that arrived (others masked) and the errors of the failed ones."""
        images = np.zeros(self.shape, np.uint8)
        mask = np.zeros(self.shape[0], bool)
        hits = 0
        errors: list[BaseException] = []
        for where, fut in self.parts:
            if not fut.done() or fut.cancelled():
                continue
            exc = fut.exception()
            if exc is not None:
                errors.append(exc)
                continue
            part, part_hits, arrived = fut.result()
            images[where] = part
            mask[where] = True if arrived is None else arrived
            hits += part_hits
        return PositivesBatch(images, mask, hits), errors

    def cancel(self) -> None:
        for _, fut in self.parts:
            fut.cancel()


@runtime_checkable
class PositivesSource(Protocol):
    """What the prefetcher needs of a source of positives."""

    enabled: bool
    """False for the no-op source: the trainer then skips the CLSP term."""

    def submit(
        self,
        anchors: np.ndarray,
        indices: np.ndarray,
        candidates: np.ndarray,
        *,
        retry_for_s: float | None = None,
        urgency: Urgency | None = None,
    ) -> PendingPositives:
        """Start fetching; ``retry_for_s`` asks a source that can fail now and succeed
        later (the pool) to keep trying that long, for the strict wait; ``urgency``
        says when and how urgently they are needed."""
        ...

    def available(self) -> bool:
        """Whether positives can come at all now (False while every generator is down)."""
        ...

    def stats(self) -> dict[str, int]:
        """Cumulative ``failovers``, ``errors`` and ``retries``."""
        ...

    def close(self) -> None: ...


def answered(value: Any) -> concurrent.futures.Future[Any]:
    """A future that is already done: a part of a source that answers at once."""
    fut: concurrent.futures.Future[Any] = concurrent.futures.Future()
    fut.set_result(value)
    return fut


def check_batch(anchors: np.ndarray, indices: np.ndarray, candidates: np.ndarray) -> None:
    """Refuse a batch whose anchors are not uint8 ``[B, H, W, C]`` or whose data set
    indices and candidate indices are not one per anchor."""
    if anchors.dtype != np.uint8 or anchors.ndim != 4:
        raise ValueError(
            f"anchors must be uint8 [B, H, W, C], got {anchors.dtype} {list(anchors.shape)}"
        )
    b = len(anchors)
    if np.shape(indices) != (b,) or np.shape(candidates) != (b,):
        raise ValueError(
            f"indices and candidates must have shape [{b}], got "
            f"{list(np.shape(indices))} and {list(np.shape(candidates))}"
        )
