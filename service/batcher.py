"""Dynamic batching of generation items (docs/design.md §4).

The batcher knows items, groups, deadlines and futures, not UNets: it merges
the items of concurrent requests into one call of a ``run_batch`` function,
up to ``max_batch`` items or until the oldest waiting item has waited
``max_wait_ms``. Items can share a call only when their ``group`` is equal (the
service's ``BatchGroup``: the request's ``SamplerGroup`` and anchor space); the
interpolation weight travels per item.

``run_batch`` runs in ONE worker thread (one per device), so the event loop
keeps answering health checks and cache hits while the sampler works, and
batches never compete for the device.

Identical keys in flight are generated once: a second submission of a key that
is queued or running shares the first one's future. Each request holds a
``Ticket``; releasing it (the client went away) drops its items that have not
started, unless another ticket still wants them.

Items may carry a deadline and a priority (0: a training step needs it now, 1:
look-ahead). The next call serves the group of the most urgent item (lowest
priority, then earliest deadline, then oldest) and fills its batch in that
order, earliest-deadline-first within a priority. A call's duration grows with
its size (``CallTimes``: a fixed part plus a part per item-step, fitted to the
last calls), so a batch only grows while it would still end before the earliest
deadline in it: under tight deadlines calls get
smaller and finish in time, rather than full and late. Before every launch,
items that could not finish even in a call of their own are dropped with
``DeadlineExceeded``: such an item is late whatever happens, so it is never
generated and never cached, and the sampler's time goes to items that can still
make it. Plain earliest-deadline-first without both is known to collapse under
overload, every call finishing just too late for its items. An item that started
runs to the end (docs/design.md §4).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

RunBatch = Callable[[Hashable, np.ndarray, list[bytes], np.ndarray], np.ndarray]
"""``run_batch(group, anchors [M,C,H,W] float32, keys [M], interpolation_weights [M]
float32) -> uint8 [M, ...]``: one sampler call, run in the worker thread. It gets the
keys, not seeds: the generator alone turns a key into a seed (docs/design.md §2)."""


CALL_TIME_WINDOW = 32
"""Recent sampler calls the call-time model is fitted to."""


class CallTimes:
    """How long a sampler call of a given cost (item-steps) takes: ``fixed + per_cost *
    cost``, least squares over the last ``CALL_TIME_WINDOW`` calls.

    A fixed part matters: a call of one item costs far more than 1/64 of a call of 64
    on a CPU (and nearly as much as all 64 on a GPU), and a proportional model would
    shrink batches under tight deadlines into calls that still end late. Until the
    calls differ in cost the fit is proportional.
    """

    def __init__(self) -> None:
        self._calls: collections.deque[tuple[float, float]] = collections.deque(
            maxlen=CALL_TIME_WINDOW
        )
        self.fixed = 0.0
        self.per_cost = 0.0

    def add(self, cost: float, seconds: float) -> None:
        self._calls.append((cost, seconds))
        self.fixed, self.per_cost = fit_call_times(list(self._calls))

    def __call__(self, cost: float) -> float:
        return self.fixed + self.per_cost * cost


def fit_call_times(calls: list[tuple[float, float]]) -> tuple[float, float]:
    """``(fixed, per_cost)`` of calls ``(cost, seconds)``, both >= 0."""
    costs = np.array([c for c, _ in calls], dtype=np.float64)
    seconds = np.array([s for _, s in calls], dtype=np.float64)
    if len(calls) == 0 or costs.sum() <= 0:
        return 0.0, 0.0
    proportional = (0.0, float(seconds.sum() / costs.sum()))
    if np.ptp(costs) <= 1e-9 * costs.max():
        return proportional
    per_cost, fixed = np.polyfit(costs, seconds, 1)
    if per_cost <= 0:  # flat (a GPU's calls): the best line of slope >= 0 is the mean
        return float(seconds.mean()), 0.0
    if fixed < 0:  # through the origin instead
        return 0.0, float((costs * seconds).sum() / (costs * costs).sum())
    return float(fixed), float(per_cost)


class QueueFull(Exception):
    """Too many items wait already; the caller should retry after ``retry_after`` s."""

    def __init__(self, queued: int, limit: int, retry_after: int) -> None:
        super().__init__(
            f"{queued} items are waiting for the sampler (limit {limit}); "
            f"retry after {retry_after} s"
        )
        self.queued = queued
        self.limit = limit
        self.retry_after = retry_after


class BatcherClosed(Exception):
    """The batcher is shutting down and takes no new work."""


class DeadlineExceeded(Exception):
    """The item's deadline passed before a sampler call could take it."""


@dataclass(frozen=True)
class Item:
    """One positive to generate: its key, canonical anchor and interpolation weight,
    and when (``time.monotonic()``; inf: never) and how urgently (0 first) it is needed;
    ``cost`` is its sampler work in item-steps (``ServiceSettings.max_cost``'s unit), which
    scales the measured time per unit into the time its call will take."""

    key: bytes
    anchor: np.ndarray  # float32 [C, H, W] in [-1, 1]
    interpolation_weight: float
    group: Hashable
    deadline: float = math.inf
    priority: int = 0
    cost: float = 1.0


@dataclass(frozen=True)
class BatchStats:
    """What one sampler call did (for metrics and Retry-After estimates)."""

    group: Hashable
    size: int
    seconds: float
    error: BaseException | None = None


@dataclass(eq=False)
class _Entry:
    item: Item
    future: asyncio.Future
    enqueued: float
    deadline: float
    priority: int
    holders: int = 1
    started: bool = False

    def urgency(self) -> tuple[int, float, float]:
        """The scheduling order: priority, then deadline, then arrival."""
        return (self.priority, self.deadline, self.enqueued)


@dataclass(eq=False)
class Ticket:
    """A request's claim on its items; ``futures[i]`` resolves to item i's image."""

    keys: list[bytes]
    futures: list[asyncio.Future]
    deduplicated: int = 0
    released: bool = field(default=False, repr=False)


class Batcher:
    """Merge items of concurrent requests into sampler calls."""

    def __init__(
        self,
        run_batch: RunBatch,
        *,
        max_batch: int = 64,
        max_wait_ms: float = 10.0,
        max_queue: int = 4096,
        executor: ThreadPoolExecutor | None = None,
        on_batch: Callable[[BatchStats], None] | None = None,
        on_expired: Callable[[int], None] | None = None,
    ) -> None:
        if max_batch < 1 or max_queue < 1 or max_wait_ms < 0:
            raise ValueError("max_batch and max_queue must be >= 1 and max_wait_ms >= 0")
        self._run_batch = run_batch
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self._own_executor = executor is None
        self._executor = executor or ThreadPoolExecutor(1, thread_name_prefix="clsp-sampler")
        self._on_batch = on_batch
        self._on_expired = on_expired
        self._groups: dict[Hashable, OrderedDict[bytes, _Entry]] = {}
        self._entries: dict[bytes, _Entry] = {}  # queued or running, by key
        self._pending = 0
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._closing = False
        self._seconds_per_item = 0.0  # moving estimate, for Retry-After
        self.call_times = CallTimes()  # for deadlines

    # ------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Start the scheduling task on the running loop."""
        if self._task is None:
            self._wakeup = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(
                self._schedule(), name="clsp-batcher"
            )

    async def close(self, *, drain: bool = True) -> None:
        """Stop taking work; with ``drain`` finish every queued and running item first."""
        self._closing = True
        if not drain:
            for entries in self._groups.values():
                for entry in entries.values():
                    entry.future.cancel()
                    self._entries.pop(entry.item.key, None)
            self._groups.clear()
            self._pending = 0
        if self._task is not None:
            self._kick()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._own_executor:
            self._executor.shutdown(wait=True)

    # ---------------------------------------------------------------- queries

    @property
    def queued(self) -> int:
        """Items waiting for the sampler (not counting the running batch)."""
        return self._pending

    @property
    def in_flight(self) -> int:
        """Items queued or running."""
        return len(self._entries)

    def retry_after(self) -> int:
        """Whole seconds until the queue has likely drained enough to take work."""
        return max(1, math.ceil(self._pending * self._seconds_per_item))

    # ------------------------------------------------------------- submission

    def submit(self, items: Sequence[Item]) -> Ticket:
        """Queue ``items`` (sharing any key already in flight); raise ``QueueFull``
        when the new ones do not fit, ``BatcherClosed`` while shutting down."""
        if self._closing or self._task is None:
            raise BatcherClosed("the service is shutting down")
        new_keys = {it.key for it in items if it.key not in self._entries}
        if self._pending and self._pending + len(new_keys) > self.max_queue:
            raise QueueFull(self._pending, self.max_queue, self.retry_after())
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        futures: list[asyncio.Future] = []
        shared = 0
        for it in items:
            entry = self._entries.get(it.key)
            if entry is None:
                entry = _Entry(it, loop.create_future(), now, it.deadline, it.priority)
                self._entries[it.key] = entry
                self._groups.setdefault(it.group, OrderedDict())[it.key] = entry
                self._pending += 1
            else:
                # a shared item runs at its most urgent holder's priority and is kept
                # until its last holder's deadline: an earlier one still wants it
                entry.holders += 1
                entry.deadline = max(entry.deadline, it.deadline)
                entry.priority = min(entry.priority, it.priority)
                shared += 1
            futures.append(entry.future)
        self._kick()
        return Ticket([it.key for it in items], futures, deduplicated=shared)

    def release(self, ticket: Ticket) -> int:
        """Give up a ticket's claim; drop its unstarted items nobody else wants.

        Returns how many items left the queue. Safe to call more than once and
        after the futures resolved.
        """
        if ticket.released:
            return 0
        ticket.released = True
        dropped = 0
        for key in ticket.keys:
            entry = self._entries.get(key)
            if entry is None or entry.future.done():
                continue
            entry.holders -= 1
            if entry.holders <= 0 and not entry.started:
                group = self._groups.get(entry.item.group)
                if group is not None and group.pop(key, None) is not None:
                    self._pending -= 1
                    if not group:
                        del self._groups[entry.item.group]
                del self._entries[key]
                entry.future.cancel()
                dropped += 1
        return dropped

    # -------------------------------------------------------------- scheduling

    def _kick(self) -> None:
        if self._wakeup is not None:
            self._wakeup.set()

    def _most_urgent_group(self) -> tuple[Hashable, float]:
        """The group of the most urgent entry, and when that group must launch: its
        oldest entry's arrival plus ``max_wait``, or ``max_wait`` before its earliest
        deadline, so that waiting for company never expires an item."""
        group, _ = min(
            ((g, e) for g, entries in self._groups.items() for e in entries.values()),
            key=lambda ge: ge[1].urgency(),
        )
        entries = self._groups[group].values()
        oldest = next(iter(entries)).enqueued
        earliest = min(e.deadline for e in entries)
        # time for a call of the most costly one alone, at least
        slack = self.max_wait + self.call_times(max(e.item.cost for e in entries))
        return group, min(oldest + self.max_wait, earliest - slack)

    def _drop_expired(
        self, now: float, call_time: Callable[[float], float] = lambda cost: 0.0
    ) -> int:
        """Fail every queued entry that could not end by its deadline even in a call of
        its own starting ``now`` (``DeadlineExceeded``)."""
        expired = [
            (g, key, e)
            for g, entries in self._groups.items()
            for key, e in entries.items()
            if e.deadline <= now + call_time(e.item.cost)
        ]
        for group, key, entry in expired:
            entries = self._groups[group]
            del entries[key]
            if not entries:
                del self._groups[group]
            del self._entries[key]
            self._pending -= 1
            if not entry.future.done():
                entry.future.set_exception(DeadlineExceeded("the deadline passed in the queue"))
                entry.future.exception()  # marks it retrieved: waiters still see it
        if expired and self._on_expired is not None:
            self._on_expired(len(expired))
        return len(expired)

    async def _schedule(self) -> None:
        assert self._wakeup is not None
        loop = asyncio.get_running_loop()
        while True:
            if not self._groups:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            group, launch_by = self._most_urgent_group()
            wait = launch_by - time.monotonic()
            if wait > 0 and len(self._groups[group]) < self.max_batch and not self._closing:
                self._wakeup.clear()
                with contextlib.suppress(TimeoutError, asyncio.TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), wait)
                continue  # re-evaluate: the group may have filled, emptied or changed
            if self._drop_expired(time.monotonic(), self.call_times):
                continue  # re-evaluate: groups may have emptied
            batch = self._take(group, time.monotonic())
            await self._run(loop, group, batch)

    def _take(self, group: Hashable, now: float) -> list[_Entry]:
        """Up to ``max_batch`` of the group's entries, most urgent first (earliest deadline
        first within a priority), each taken only if the call, one item longer, would
        still end before every taken item's deadline; the rest keep their order. The
        most urgent entry is always taken (``_drop_expired`` made sure it can finish)."""
        entries = self._groups[group]
        batch: list[_Entry] = []
        due, cost = math.inf, 0.0
        for key, entry in sorted(entries.items(), key=lambda kv: kv[1].urgency()):
            if len(batch) == self.max_batch:
                break
            ends = now + self.call_times(cost + entry.item.cost)
            if batch and ends > min(due, entry.deadline):
                continue
            due, cost = min(due, entry.deadline), cost + entry.item.cost
            del entries[key]
            entry.started = True
            batch.append(entry)
        if not entries:
            del self._groups[group]
        self._pending -= len(batch)
        return batch

    async def _run(
        self, loop: asyncio.AbstractEventLoop, group: Hashable, batch: list[_Entry]
    ) -> None:
        anchors = np.stack([e.item.anchor for e in batch]).astype(np.float32, copy=False)
        keys = [e.item.key for e in batch]
        interpolation_weights = np.array(
            [e.item.interpolation_weight for e in batch], dtype=np.float32
        )
        t0 = time.perf_counter()
        error: BaseException | None = None
        try:
            images = await loop.run_in_executor(
                self._executor, self._run_batch, group, anchors, keys, interpolation_weights
            )
            if len(images) != len(batch):
                raise RuntimeError(
                    f"run_batch returned {len(images)} images for {len(batch)} items"
                )
        except Exception as exc:  # the sampler failed: every waiter learns why
            error = exc
        seconds = time.perf_counter() - t0
        per_item = seconds / len(batch)
        self._seconds_per_item = (
            per_item
            if self._seconds_per_item == 0.0
            else 0.8 * self._seconds_per_item + 0.2 * per_item
        )
        self.call_times.add(sum(e.item.cost for e in batch), seconds)
        for i, entry in enumerate(batch):
            self._entries.pop(entry.item.key, None)
            if entry.future.done():
                continue
            if error is None:
                entry.future.set_result(images[i])
            else:
                entry.future.set_exception(error)
                entry.future.exception()  # marks it retrieved: waiters still see it
        if self._on_batch is not None:
            self._on_batch(BatchStats(group, len(batch), seconds, error))
