"""Where synthetic positives come from: the pool, an offline .npy or none, chosen by
``build_source`` (docs/design.md §5).

Every source answers with a ``PendingPositives`` (``pending.py``). The pool
source splits a batch into several requests (spread over the generators by the
client's balancing); the offline source (``offline.py``) and the no-op source
answer at once.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from clsp_positives.proto.messages import ResponseArrays
from clsp_positives.proto.params import GenerationParams
from clsp_positives.trainer.positives.offline import OfflineNpySource
from clsp_positives.trainer.positives.pending import (
    PartAnswer,
    PendingPositives,
    PositivesSource,
    Urgency,
    check_batch,
)

if TYPE_CHECKING:  # httpx is the trainer extra's: the service image must import this module
    from clsp_positives.client import PoolClient

log = logging.getLogger(__name__)

DEFAULT_CHUNK = 64
"""Anchors per pool request: small enough that a batch spreads over several
generators and a slow one delays only part of it, large enough to batch well."""


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
        pin_model: bool = True,
        owns_client: bool = True,
    ) -> None:
        if params.k is not None:
            raise ValueError("the trainer asks for one candidate per anchor: params.k must be None")
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        self.client = client
        self.params = params
        self.chunk = chunk
        self.pin_model = pin_model
        self.owns_client = owns_client  # a client the caller passed in is the caller's to close
        self.model: str | None = params.expect_model
        """The fingerprint every positive must come from: ``params.expect_model``, else
        (with ``pin_model``) the model of the first answer. Positives of another model
        never reach training: pinned requests are refused by such a generator (and
        sent to another), and an answer already in flight when the pin was set is
        dropped as missing."""
        self._pin_lock = threading.Lock()

    def _check_model(self, model: str) -> None:
        if not self.pin_model and self.params.expect_model is None:
            return
        with self._pin_lock:
            if self.model is None:
                self.model = model
                self.params = self.params.model_copy(update={"expect_model": model})
                log.info("positives pinned to the pool's model %s", model)
        if model != self.model:
            raise ValueError(f"positives of model {model}, not the pinned {self.model}: dropped")

    def submit(
        self,
        anchors: np.ndarray,
        indices: np.ndarray,
        candidates: np.ndarray,
        *,
        retry_for_s: float | None = None,
        urgency: Urgency | None = None,
    ) -> PendingPositives:
        """One request per ``chunk`` anchors; the pool client retries each by itself
        (for ``retry_for_s`` when given, docs/design.md §5). ``urgency`` becomes the
        requests' ``deadline_ms`` and ``priority``."""
        check_batch(anchors, indices, candidates)
        anchors = np.ascontiguousarray(anchors)
        candidates = np.asarray(candidates, dtype=np.int64)
        expected = anchors.shape[1:]
        params = self.params
        if urgency is not None:
            params = params.model_copy(
                update={"deadline_ms": urgency.deadline_ms, "priority": urgency.priority}
            )

        def send(where: slice) -> concurrent.futures.Future[PartAnswer]:
            answer = self.client.submit(
                anchors[where], candidates[where], params, retry_for_s=retry_for_s
            )
            return _chain(answer, lambda r: self._unpack(r, len(anchors[where]), expected))

        b = len(anchors)
        wheres = [slice(s, min(s + self.chunk, b)) for s in range(0, b, self.chunk)]
        return PendingPositives(anchors.shape, [(w, send(w)) for w in wheres])

    def available(self) -> bool:
        return self.client.available()

    def stats(self) -> dict[str, int]:
        s = self.client.stats()
        return {"failovers": s.failovers, "errors": s.errors, "retries": s.retries}

    def close(self) -> None:
        if self.owns_client:
            self.client.close()

    def _unpack(self, answer: ResponseArrays, n: int, hwc: tuple[int, ...]) -> PartAnswer:
        self._check_model(answer.model)
        return _unpack(answer, n, hwc)


def _unpack(answer: ResponseArrays, n: int, hwc: tuple[int, ...]) -> PartAnswer:
    if answer.positives.shape != (n, *hwc) or answer.positives.dtype != np.uint8:
        raise ValueError(
            f"the pool answered positives {answer.positives.dtype} "
            f"{list(answer.positives.shape)} for anchors [{n}, "
            f"{', '.join(map(str, hwc))}]: the generator's model does not match "
            "the data (check --image-size/--channels against GET /v1/model)"
        )
    arrived = None if answer.expired is None else answer.expired == 0
    return answer.positives, int(np.count_nonzero(answer.cache_hit)), arrived


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


# ------------------------------------------------------------------ nothing


class NoSource:
    """No positives: the baseline method (every anchor masked, nothing waited for)."""

    enabled = False

    def submit(
        self,
        anchors: np.ndarray,
        indices: np.ndarray,
        candidates: np.ndarray,
        *,
        retry_for_s: float | None = None,
        urgency: Urgency | None = None,
    ) -> PendingPositives:
        check_batch(anchors, indices, candidates)
        return PendingPositives(anchors.shape, [])

    def available(self) -> bool:
        return False

    def stats(self) -> dict[str, int]:
        return {"failovers": 0, "errors": 0, "retries": 0}

    def close(self) -> None:
        pass


def build_source(
    positives: str | Sequence[str] | PoolClient | None,
    *,
    offline_npy: str | None,
    token: str | None,
    params: GenerationParams,
    timeout_s: float = 30.0,
    chunk: int = DEFAULT_CHUNK,
    client_options: dict[str, Any] | None = None,
    pin_model: bool = True,
) -> PositivesSource:
    """The source the options ask for: the pool (``--positives``: URLs, or a client of
    the pool that the caller keeps and closes), an offline .npy, or none."""
    if positives and offline_npy:
        raise ValueError(
            "give either --positives (a generation pool) or --positives-npy (a .npy), not both"
        )
    if positives:
        if params.k is not None:
            raise ValueError("the trainer asks for one candidate per anchor: params.k must be None")
        from clsp_positives.client import PoolClient

        if isinstance(positives, PoolClient):
            return PoolSource(
                positives, params, chunk=chunk, pin_model=pin_model, owns_client=False
            )
        client = PoolClient(positives, token=token, timeout_s=timeout_s, **(client_options or {}))
        return PoolSource(client, params, chunk=chunk, pin_model=pin_model)
    if offline_npy:
        return OfflineNpySource(offline_npy, expect_model=params.expect_model)
    return NoSource()
