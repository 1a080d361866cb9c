"""The positives of a prepared request (docs/design.md §4, steps 4 to 8): one cache
lookup, the misses handed to the batcher as items of one group, the generated ones
written back; and the lifecycle of the batcher's worker thread.

``PositivesService`` gets a ``PreparedRequest`` (``requests.py``) and returns arrays;
it knows neither HTTP nor encodings, which stay with the routes (``app.py``). The cache
can only ever make a request uncached, not fail.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections.abc import Awaitable, Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, NamedTuple, cast

import numpy as np

from clsp_positives.proto.errors import ProtocolError
from clsp_positives.proto.messages import ResponseArrays
from clsp_positives.proto.params import AnchorSpace, Output, SamplerGroup
from clsp_positives.service.batcher import (
    Batcher,
    BatchStats,
    DeadlineExceeded,
    Item,
    QueueFull,
)
from clsp_positives.service.cache import PositivesCache
from clsp_positives.service.metrics import ServiceMetrics
from clsp_positives.service.requests import PreparedRequest, RequestDefaults, model_shapes
from clsp_positives.service.settings import ServiceSettings

if TYPE_CHECKING:
    from clsp_positives.service.sampling.generator import PositivesGenerator

log = logging.getLogger("clsp.service")

WARMUP_STOP_WAIT_S = 2.0
"""How long a service shutting down waits for its warm-up's current sampler call."""


class BatchGroup(NamedTuple):
    """What items must share to share a sampler call: the sampler's settings and
    whether their anchors are pictures or latents (a latent model encodes the first)."""

    sampler_group: SamplerGroup
    anchor_space: AnchorSpace


class PositivesService:
    """The request flow of ``POST /v1/positives`` and the app's lifecycle."""

    def __init__(
        self,
        settings: ServiceSettings,
        generator: PositivesGenerator,
        cache: PositivesCache,
        metrics: ServiceMetrics,
    ) -> None:
        self.settings = settings
        self.generator = generator
        self.cache = cache
        self.metrics = metrics
        self.fingerprint = generator.fingerprint
        self.shapes = model_shapes(generator)
        # One worker thread per device: batches never compete for it, and the
        # event loop keeps answering while it samples.
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="clsp-sampler")
        self.batcher = Batcher(
            self._run_batch,
            max_batch=settings.max_batch,
            max_wait_ms=settings.max_wait_ms,
            max_queue=settings.max_queue,
            executor=self.executor,
            on_batch=self._on_batch,
            on_expired=metrics.expired_dropped.inc,
        )
        self.ready = False
        self.not_ready_reason = "the model is warming up"
        self._stopping = threading.Event()
        self.warmup_abandoned = False
        metrics.watch_cache(lambda: cache.stats)
        metrics.watch_queue(lambda: self.batcher.queued, lambda: self.batcher.in_flight)
        # The GPU's memory and utilisation join /metrics when the generator's device
        # (resolved, so `auto` counts) is CUDA; a CPU generator exports none.
        metrics.watch_device(generator.device)

    # ---------------------------------------------------------- worker side

    def _run_batch(
        self,
        group: Hashable,
        anchors: np.ndarray,
        keys: list[bytes],
        interpolation_weights: np.ndarray,
    ) -> np.ndarray:
        call = cast(BatchGroup, group)  # what _generate submits items under
        warm = len(self.generator.paths_run)  # one worker thread: nothing else samples now
        images = self.generator.sample_keyed(
            anchors,
            keys,
            interpolation_weights,
            call.sampler_group,
            anchor_space=call.anchor_space,
        )
        if len(self.generator.paths_run) > warm:
            self.metrics.cold_calls.inc()
            log.warning("a sampler call paid for a path the warm-up did not run")
        return images

    def _on_batch(self, stats: BatchStats) -> None:
        self.metrics.batch_size.observe(stats.size)
        self.metrics.sampler_seconds.observe(stats.seconds)
        if stats.error is None:
            self.metrics.generated.inc(stats.size)
        else:
            self.metrics.sampler_errors.inc()
            log.error("sampler call of %d items failed: %r", stats.size, stats.error)

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self.batcher.start()

    async def warm_up(self) -> None:
        """``PositivesGenerator.warmup`` in the worker thread before /readyz says ready,
        so that no request pays for a first call and ready means 'can serve now'.

        A service stopping meanwhile (``stop_warm_up``) is never made ready."""
        t0 = time.perf_counter()
        try:
            warm_calls = await asyncio.get_running_loop().run_in_executor(
                self.executor,
                lambda: self.generator.warmup(
                    steps=self.settings.warmup_steps,
                    # the mode requests get: a stored one warms its x0-clipping variant
                    sampling=RequestDefaults.of(self.settings, self.generator).sampling,
                    batch_sizes=self.warmup_batch_sizes,
                    stop=self._stopping,
                ),
            )
        except Exception as exc:
            if self._stopping.is_set():  # the generator's WarmupStopped, or a late failure
                log.info("warm-up stopped: the service is shutting down")
                return
            self.not_ready_reason = f"warm-up batch failed: {exc!r}"
            log.exception("warm-up batch failed; /readyz stays 503")
            return
        if self._stopping.is_set():
            return
        # the call-time model's first points, until real calls measure their own
        for size, seconds in warm_calls.items():
            self.batcher.call_times.add(size * self.settings.warmup_steps, seconds)
        self.ready = True
        log.info("ready: model %s warmed up in %.2f s", self.fingerprint, time.perf_counter() - t0)

    @property
    def warmup_batch_sizes(self) -> tuple[int, ...]:
        """One item and a full batch: the call-time model starts from both ends, its
        fixed part told from its part per item-step (docs/design.md §4), and a compiled
        generator compiles once per batch bucket, full batches being what a loaded
        service runs."""
        if self.settings.max_batch > 1:
            return (1, self.settings.max_batch)
        return (1,)

    async def stop_warm_up(self, warm: asyncio.Task) -> None:
        """Stop the warm-up between two of its calls; give up on it after
        ``WARMUP_STOP_WAIT_S`` when one call (a compile) is longer.

        A given-up warm-up still holds the worker thread, which Python would join at
        exit: ``warmup_abandoned`` tells ``clsp serve`` to exit without it, so a
        SIGTERM during a compile stops the process in seconds (docs/reliability.md)."""
        self._stopping.set()
        if warm.done():
            return
        try:
            await asyncio.wait_for(asyncio.shield(warm), WARMUP_STOP_WAIT_S)
        except TimeoutError:
            self.warmup_abandoned = True
            log.warning(
                "warm-up still in a sampler call after %g s: not waiting for it",
                WARMUP_STOP_WAIT_S,
            )

    async def stop(self) -> None:
        """Finish the queued and running batches, then close the cache; with the
        warm-up abandoned, fail the queued ones instead, none of which could start
        before the worker thread is free."""
        self.ready = False
        self.not_ready_reason = "the service is shutting down"
        if self.warmup_abandoned:
            self.executor.shutdown(wait=False, cancel_futures=True)
            await self.batcher.close(drain=False)
        else:
            await self.batcher.close(drain=True)
            self.executor.shutdown(wait=True)
        await self.cache.close()

    # ------------------------------------------------------------- requests

    async def positives(
        self, prepared: PreparedRequest, disconnected: Callable[[], Awaitable[Any]]
    ) -> ResponseArrays | None:
        """Cache lookup, batched generation of the misses, cache write.

        Returns None when the client went away before its positives were ready.
        Positives whose deadline passed first come back as zeros, marked in
        ``expired``, and are neither cached nor counted as served; a request with
        none to give is a 504.
        """
        req, keys = prepared.request, prepared.keys
        params = req.params
        m = len(keys)
        images: list[np.ndarray | None] = [None] * m
        hit = np.zeros(m, np.uint8)
        if params.cache == "use":
            found = await self.cache.get_many(self.fingerprint, keys)
            shape, dtype = self._value_layout(params.output)
            for i, image in enumerate(found):
                if image is not None and image.shape == shape and image.dtype == dtype:
                    images[i] = image
                    hit[i] = 1
        missing = [i for i in range(m) if images[i] is None]
        expired = np.zeros(m, np.uint8)
        if missing:
            generated = await self._generate(prepared, missing, disconnected)
            if generated is None:
                return None
            made = []
            for i, image in zip(missing, generated, strict=True):
                if image is None:
                    expired[i] = 1
                else:
                    images[i] = image
                    made.append(i)
            if params.cache != "bypass" and made:
                await self.cache.set_many(
                    self.fingerprint,
                    [(keys[i], images[i]) for i in made],
                    self.settings.cache_ttl,
                )
        late = int(expired.sum())
        if late:
            self.metrics.expired.inc(late)
            if late == m:
                raise ProtocolError(
                    f"params.deadline_ms ({params.deadline_ms:g} ms) passed before any of the "
                    f"{m} positives could be generated: the generators are busier than that; "
                    "allow more time, or ask again",
                    code="deadline_exceeded",
                    status=504,
                )
            shape, dtype = self._value_layout(params.output)
            for i in np.flatnonzero(expired):
                images[i] = np.zeros(shape, dtype)
        positives = np.stack(images)  # type: ignore[arg-type]
        if params.k is not None:
            positives = positives.reshape(req.num_anchors, params.k, *positives.shape[1:])
            hit = hit.reshape(req.num_anchors, params.k)
            expired = expired.reshape(req.num_anchors, params.k)
        self.metrics.served.inc(m - late)
        return ResponseArrays(positives, hit, self.fingerprint, params, expired if late else None)

    def _value_layout(self, output: Output) -> tuple[tuple[int, ...], np.dtype]:
        """Shape and dtype of one positive as generated, so as cached: a value of
        any other layout is a miss."""
        if output == "latents" and self.shapes.latent_chw is not None:
            return self.shapes.latent_chw, np.dtype(np.float32)
        c, h, w = self.shapes.image_chw
        return (h, w, c), np.dtype(np.uint8)

    async def _generate(
        self,
        prepared: PreparedRequest,
        missing: list[int],
        disconnected: Callable[[], Awaitable[Any]],
    ) -> list[np.ndarray | None] | None:
        """The positives of items ``missing``, None for each whose deadline passed
        first; None in all when the client went away."""
        req, canon, keys = prepared.request, prepared.canonical, prepared.keys
        params = req.params
        group = BatchGroup(params.group(), req.anchor_space)
        cost = prepared.cost / len(keys)  # item-steps, as ServiceSettings.max_cost counts
        items = [
            Item(
                keys[i],
                canon[req.anchor_index[i]],
                float(params.interpolation_weight),
                group,
                deadline=prepared.deadline,
                priority=params.priority,
                cost=cost,
            )
            for i in missing
        ]
        try:
            ticket = self.batcher.submit(items)
        except QueueFull:
            self.metrics.rejected.inc()
            raise
        if ticket.deduplicated:
            self.metrics.deduplicated.inc(ticket.deduplicated)
        waiting = asyncio.ensure_future(asyncio.wait(set(ticket.futures)))
        hangup = asyncio.ensure_future(disconnected())
        # At its deadline a request answers with what is done (the batcher sized its
        # calls to end by then); it stops waiting also for items it shares with a request
        # that has more time (the batcher keeps those for the latter).
        timeout = prepared.deadline - time.monotonic()
        try:
            await asyncio.wait(
                {waiting, hangup},
                timeout=None if math.isinf(timeout) else max(timeout, 0.0),
                return_when=asyncio.FIRST_COMPLETED,
            )
            if hangup.done():
                return None
            return [_result_or_expired(f) for f in ticket.futures]
        finally:
            for task in (waiting, hangup):
                task.cancel()
            dropped = self.batcher.release(ticket)
            if dropped and hangup.done():
                self.metrics.dropped.inc(dropped)
                log.info("client went away: %d queued items dropped", dropped)
            elif dropped:  # this request's deadline passed while they waited
                self.metrics.expired_dropped.inc(dropped)


def _result_or_expired(future: asyncio.Future) -> np.ndarray | None:
    """A finished item's positive, None when its deadline passed (in the queue, or
    while this request waited); a sampler failure raises."""
    if not future.done():
        return None
    try:
        return future.result()
    except DeadlineExceeded:
        return None
