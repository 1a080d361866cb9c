"""Where synthetic positives come from, behind one interface (docs/design.md §5).

A source turns (anchors, data set indices, candidate indices) into a
``PendingPositives``: the answer in parts, each part a future, so that the
prefetcher can use the parts that arrived by its deadline and mask the rest.
The pool source splits a batch into several requests (spread over the
generators by the client's balancing); the offline and no-op sources answer at
once.
"""

from __future__ import annotations

import concurrent.futures
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from clsp_positives.proto.messages import ResponseArrays
from clsp_positives.proto.params import GenerationParams

if TYPE_CHECKING:  # httpx is the trainer extra's: the service image must import this module
    from clsp_positives.trainer.positives.client import PoolClient

DEFAULT_CHUNK = 64
"""Anchors per pool request: small enough that a batch spreads over several
generators and a slow one delays only part of it, large enough to batch well."""


@dataclass
class PositivesBatch:
    """Positives of one batch; ``images`` is zero where ``mask`` is False."""

    images: np.ndarray  # uint8 [B, H, W, C]
    mask: np.ndarray  # bool [B]: True where a positive arrived
    cache_hits: int


Part = tuple[slice, "concurrent.futures.Future[tuple[np.ndarray, int]]"]


class PendingPositives:
    """A batch in flight: parts (a slice of the batch and its future), assembled on demand.

    A part's future holds ``(images uint8 [n, H, W, C], cache hits)``. ``resubmit``
    sends one part again (strict mode retries failed parts).
    """

    def __init__(
        self,
        shape: tuple[int, ...],
        parts: list[Part],
        resubmit: Callable[[slice], concurrent.futures.Future[tuple[np.ndarray, int]]]
        | None = None,
    ) -> None:
        self.shape = shape
        self.parts = parts
        self._resubmit = resubmit

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
            part, part_hits = fut.result()
            images[where] = part
            mask[where] = True
            hits += part_hits
        return PositivesBatch(images, mask, hits), errors

    def retry_failed(self) -> int:
        """Resubmit the parts that failed; how many were resubmitted."""
        if self._resubmit is None:
            return 0
        count = 0
        for i, (where, fut) in enumerate(self.parts):
            if fut.done() and (fut.cancelled() or fut.exception() is not None):
                self.parts[i] = (where, self._resubmit(where))
                count += 1
        return count

    def cancel(self) -> None:
        for _, fut in self.parts:
            fut.cancel()


@runtime_checkable
class PositivesSource(Protocol):
    """What the prefetcher needs of a source of positives."""

    enabled: bool
    """False for the no-op source: the trainer then skips the CLSP term."""

    def submit(
        self, anchors: np.ndarray, indices: np.ndarray, candidates: np.ndarray
    ) -> PendingPositives: ...

    def available(self) -> bool:
        """Whether positives can come at all now (False while every generator is down)."""
        ...

    def stats(self) -> dict[str, int]:
        """Cumulative ``failovers``, ``errors`` and ``retries``."""
        ...

    def close(self) -> None: ...


def _done(value: Any) -> concurrent.futures.Future[Any]:
    fut: concurrent.futures.Future[Any] = concurrent.futures.Future()
    fut.set_result(value)
    return fut


def _check_batch(anchors: np.ndarray, indices: np.ndarray, candidates: np.ndarray) -> None:
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


# ---------------------------------------------------------------- the pool


class PoolSource:
    """Positives generated on demand by the pool; each batch in requests of ``chunk``."""

    enabled = True

    def __init__(
        self,
        client: PoolClient,
        params: GenerationParams,
        *,
        chunk: int = DEFAULT_CHUNK,
        own_client: bool = True,
    ) -> None:
        if params.k is not None:
            raise ValueError("the trainer asks for one candidate per anchor: params.k must be None")
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        self.client = client
        self.params = params
        self.chunk = chunk
        self._own_client = own_client

    def submit(
        self, anchors: np.ndarray, indices: np.ndarray, candidates: np.ndarray
    ) -> PendingPositives:
        _check_batch(anchors, indices, candidates)
        anchors = np.ascontiguousarray(anchors)
        candidates = np.asarray(candidates, dtype=np.int64)
        expected = anchors.shape[1:]

        def send(where: slice) -> concurrent.futures.Future[tuple[np.ndarray, int]]:
            return _chain(
                self.client.submit(anchors[where], candidates[where], self.params),
                lambda r: _unpack(r, len(anchors[where]), expected),
            )

        b = len(anchors)
        parts = [(slice(s, min(s + self.chunk, b)),) for s in range(0, b, self.chunk)]
        return PendingPositives(anchors.shape, [(w, send(w)) for (w,) in parts], send)

    def available(self) -> bool:
        return self.client.available()

    def stats(self) -> dict[str, int]:
        s = self.client.stats()
        return {"failovers": s.failovers, "errors": s.errors, "retries": s.retries}

    def close(self) -> None:
        if self._own_client:
            self.client.close()


def _unpack(answer: ResponseArrays, n: int, hwc: tuple[int, ...]) -> tuple[np.ndarray, int]:
    if answer.positives.shape != (n, *hwc) or answer.positives.dtype != np.uint8:
        raise ValueError(
            f"the pool answered positives {answer.positives.dtype} "
            f"{list(answer.positives.shape)} for anchors [{n}, "
            f"{', '.join(map(str, hwc))}]: the generator's model does not match "
            "the data (check --size/--channels against GET /v1/model)"
        )
    return answer.positives, int(np.count_nonzero(answer.cache_hit))


def _chain(
    fut: concurrent.futures.Future[Any], fn: Callable[[Any], Any]
) -> concurrent.futures.Future[Any]:
    """A future of ``fn(result)``; cancelling it cancels the request."""
    out: concurrent.futures.Future[Any] = concurrent.futures.Future()

    def relay(src: concurrent.futures.Future[Any]) -> None:
        if not out.set_running_or_notify_cancel():
            return
        if src.cancelled():
            out.set_exception(concurrent.futures.CancelledError())
        elif src.exception() is not None:
            out.set_exception(src.exception())  # type: ignore[arg-type]
        else:
            try:
                out.set_result(fn(src.result()))
            except Exception as exc:
                out.set_exception(exc)

    def forward_cancel(dst: concurrent.futures.Future[Any]) -> None:
        if dst.cancelled():
            fut.cancel()

    out.add_done_callback(forward_cancel)
    fut.add_done_callback(relay)
    return out


# ------------------------------------------------------------- offline .npy


def progress_path(npy: str | Path) -> Path:
    """The sidecar ``clsp generate`` keeps while a .npy is incomplete."""
    return Path(str(npy) + ".progress.npy")


class OfflineNpySource:
    """The paper's pre-generated positives: ``[N, K, H, W, C]`` uint8, memory-mapped and
    indexed by data set index and candidate index."""

    enabled = True

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"offline positives {str(path)!r} do not exist: create them "
                "with `clsp generate --out FILE.npy`"
            )
        progress = progress_path(path)
        if progress.exists():
            done = np.load(progress)
            raise ValueError(
                f"offline positives {str(path)!r} are incomplete ({int(done.sum())}"
                f" of {len(done)} rows): rerun the same `clsp generate` to finish"
            )
        self.array = np.load(path, mmap_mode="r")
        if self.array.dtype != np.uint8 or self.array.ndim != 5:
            raise ValueError(
                f"offline positives must be uint8 [N, K, H, W, C], got "
                f"{self.array.dtype} {list(self.array.shape)} in {str(path)!r}"
            )
        self.path = path

    @property
    def num_candidates(self) -> int:
        return int(self.array.shape[1])

    def submit(
        self, anchors: np.ndarray, indices: np.ndarray, candidates: np.ndarray
    ) -> PendingPositives:
        _check_batch(anchors, indices, candidates)
        n, k = self.array.shape[:2]
        indices = np.asarray(indices, dtype=np.int64)
        candidates = np.asarray(candidates, dtype=np.int64)
        if anchors.shape[1:] != self.array.shape[2:]:
            raise ValueError(
                f"offline positives are {list(self.array.shape[2:])} (H, W, C) but "
                f"the anchors are {list(anchors.shape[1:])}: generate the .npy "
                "with the training --size and --channels"
            )
        if len(indices) and (indices.min() < 0 or indices.max() >= n):
            raise ValueError(
                f"data set index {int(indices.max())} is outside the {n} rows of "
                f"{str(self.path)!r}: was it generated for another data set/split?"
            )
        if len(candidates) and (candidates.min() < 0 or candidates.max() >= k):
            raise ValueError(
                f"candidate {int(candidates.max())} asked but {str(self.path)!r} "
                f"holds K={k}: pass --candidates {k} or fewer"
            )
        images = np.asarray(self.array[indices, candidates])
        return PendingPositives(anchors.shape, [(slice(0, len(anchors)), _done((images, 0)))])

    def available(self) -> bool:
        return True

    def stats(self) -> dict[str, int]:
        return {"failovers": 0, "errors": 0, "retries": 0}

    def close(self) -> None:
        mm = getattr(self.array, "_mmap", None)
        self.array = np.empty((0, 0, 0, 0, 0), np.uint8)
        if mm is not None:
            mm.close()


# ------------------------------------------------------------------ nothing


class NoSource:
    """No positives: the baseline method (every anchor masked, nothing waited for)."""

    enabled = False

    def submit(
        self, anchors: np.ndarray, indices: np.ndarray, candidates: np.ndarray
    ) -> PendingPositives:
        _check_batch(anchors, indices, candidates)
        return PendingPositives(anchors.shape, [])

    def available(self) -> bool:
        return False

    def stats(self) -> dict[str, int]:
        return {"failovers": 0, "errors": 0, "retries": 0}

    def close(self) -> None:
        pass


def build_source(
    positives: str | None,
    *,
    offline_npy: str | None,
    token: str | None,
    params: GenerationParams,
    timeout_s: float = 30.0,
    chunk: int = DEFAULT_CHUNK,
    client_options: dict[str, Any] | None = None,
) -> PositivesSource:
    """The source the options ask for: the pool (``--positives``), an offline .npy, or none."""
    if positives and offline_npy:
        raise ValueError(
            "give either --positives (a generation pool) or --offline-positives (a .npy), not both"
        )
    if positives:
        if params.k is not None:
            raise ValueError("the trainer asks for one candidate per anchor: params.k must be None")
        from clsp_positives.trainer.positives.client import PoolClient

        client = PoolClient(positives, token=token, timeout_s=timeout_s, **(client_options or {}))
        return PoolSource(client, params, chunk=chunk)
    if offline_npy:
        return OfflineNpySource(offline_npy)
    return NoSource()


def describe(source: PositivesSource) -> str:
    """One line for logs and the metrics file."""
    if isinstance(source, PoolSource):
        return "pool " + json.dumps(source.client.endpoint_urls)
    if isinstance(source, OfflineNpySource):
        return f"offline {source.path} {list(source.array.shape)}"
    return "none"
