"""Positives in flight while the model trains (docs/design.md §5).

The train loop knows its batches ahead (the sampler's indices), so it submits
batches b+1..b+L while step b runs and takes batch b's positives just before
its CLSP term. ``take`` waits at most the deadline: whatever has not arrived is
masked out of the CLSP term and counted, so a slow or dead pool makes training
no slower than the baseline. ``strict`` waits for every positive instead; it
only waits, since a strict batch's requests are retried by the pool client
itself until the strict timeout (the one retry policy, docs/design.md §5).

Each request tells the pool when its positives stop being of use (when the step
that takes them starts: ``steps ahead x`` the measured step time away; the pool
answers with what is done by then, so the answer is there when the take looks)
and whether a step needs them now (priority 0: the next step) or they are
look-ahead (priority 1). A pool slower than training then drops what would come
too late instead of serving every batch late, so the positive fraction stays at
what the pool can deliver rather than falling to zero (docs/design.md §5).

The deadline alone would still cost a full deadline on every step while the
pool is hopelessly behind (a cold cache, a slow generator), so waiting is also
rationed by a token bucket: it holds at most one deadline and refills at
``wait_share`` of the wall time, so a persistently slow pool costs at most that
share of the step time, while an occasional late batch still gets the whole
deadline.
"""

from __future__ import annotations

import concurrent.futures
import logging
import time
from typing import Any

import numpy as np

from clsp_positives.client import PoolRequestRejected, PoolUnavailable
from clsp_positives.trainer.positives.pending import (
    PendingPositives,
    PositivesBatch,
    PositivesSource,
    Urgency,
)

log = logging.getLogger(__name__)

DEFAULT_WAIT_SHARE = 0.05
"""Most of the training's wall time that waiting for late positives may take in the long run."""

ANSWER_MARGIN_STEPS = 0.25
"""How long before its take a batch's answer is due, in steps: the pool answers at
the deadline with what is done, and the answer must still travel and be decoded."""

FIRST_STEP_GUESS_S = 1.0
"""The step time assumed until two takes have measured it. The first L batches go out
at once, before any step ran: a guess too short has the pool drop them all, one too
long has it work at most L guesses on batches that may come late. A second is a
training step of a large model, or a few of a small one (docs/performance.md)."""

STEP_TIME_SMOOTHING = 0.2
"""Weight of the newest interval between two takes in the step time estimate."""

STRICT_CHECK_S = 1.0
"""How often a strict wait looks whether the pool is down, to say so once per epoch."""


class WaitBucket:
    """Token bucket of waiting time: at most ``capacity`` s at once, refilled at ``share``
    seconds per second of wall time. Times are passed in, so it is a pure state machine."""

    def __init__(self, capacity: float, share: float, now: float) -> None:
        self.capacity = capacity
        self.share = share
        self.tokens = capacity
        self._at = now

    def allowance(self, now: float) -> float:
        self.tokens = min(self.capacity, self.tokens + self.share * max(0.0, now - self._at))
        self._at = now
        return self.tokens

    def spend(self, seconds: float) -> None:
        self.tokens = max(0.0, self.tokens - seconds)


class Prefetcher:
    """Submit ahead, take with a deadline; per-epoch statistics."""

    def __init__(
        self,
        source: PositivesSource,
        *,
        lookahead: int,
        deadline_ms: float,
        strict: bool,
        strict_timeout_s: float = 600.0,
        wait_share: float | None = DEFAULT_WAIT_SHARE,
        pool_deadlines: bool = True,
    ) -> None:
        if lookahead < 0:
            raise ValueError(f"--prefetch must be >= 0, got {lookahead}")
        if deadline_ms < 0:
            raise ValueError(f"--positives-deadline-ms must be >= 0, got {deadline_ms}")
        self.source = source
        self.lookahead = lookahead
        self.deadline_s = deadline_ms / 1000.0
        self.strict = strict
        self.strict_timeout_s = strict_timeout_s
        if wait_share is not None and not 0 < wait_share <= 1:
            raise ValueError(f"wait_share must lie in (0, 1], got {wait_share}")
        self._bucket = (
            None
            if wait_share is None
            else WaitBucket(self.deadline_s, wait_share, time.monotonic())
        )
        self._pending: dict[int, PendingPositives] = {}
        self._closed = False
        self.pool_deadlines = pool_deadlines
        self._step_s: float | None = None  # smoothed interval between takes
        self._last_take: float | None = None
        self._reset()
        self._source_base = dict(source.stats())

    def _reset(self) -> None:
        self._anchors = 0
        self._arrived = 0
        self._hits = 0
        self._wait_s = 0.0
        self._warned = False

    def urgency(self, steps_ahead: int) -> Urgency | None:
        """When the batch ``steps_ahead`` steps from the current one is taken, and its
        priority; None when strict (a strict batch waits for all its positives) and when
        ``pool_deadlines`` is off.

        A quarter step before the take (``ANSWER_MARGIN_STEPS``), not the take plus its
        wait: the take's wait is rationed (``WaitBucket``) and often near zero, so an
        answer due after the take starts mostly comes too late.
        Until two takes have measured the step time, a step counts as
        ``FIRST_STEP_GUESS_S``."""
        if self.strict or not self.pool_deadlines:
            return None
        step_s = self._step_s if self._step_s is not None else FIRST_STEP_GUESS_S
        # the batch taken now is still waited for, up to the take's deadline
        seconds = max(
            (steps_ahead - ANSWER_MARGIN_STEPS) * step_s,
            (1 - ANSWER_MARGIN_STEPS) * self.deadline_s,
        )
        return Urgency(
            deadline_ms=min(max(seconds * 1000.0, 1.0), 3_600_000.0),
            priority=0 if steps_ahead <= 1 else 1,
        )

    # ------------------------------------------------------------------ API

    def submit(
        self,
        batch_id: int,
        anchors: np.ndarray,
        indices: np.ndarray,
        candidates: np.ndarray,
        *,
        steps_ahead: int | None = None,
    ) -> None:
        """Start fetching a batch's positives (returns at once); the step that takes it
        is ``steps_ahead`` steps after the current one (None: unknown, no deadline)."""
        if self._closed:
            raise RuntimeError("Prefetcher is closed")
        if batch_id in self._pending:
            return
        retry_for_s = self.strict_timeout_s if self.strict else None
        self._pending[batch_id] = self.source.submit(
            anchors,
            indices,
            candidates,
            retry_for_s=retry_for_s,
            urgency=None if steps_ahead is None else self.urgency(steps_ahead),
        )

    def take(self, batch_id: int) -> PositivesBatch:
        """The positives of a submitted batch: at most ``deadline_ms`` of waiting (or until
        every positive arrived, when strict); missing anchors have ``mask`` False."""
        for old in [b for b in self._pending if b < batch_id]:  # skipped batches
            self._pending.pop(old).cancel()
        pending = self._pending.pop(batch_id, None)
        if pending is None:
            raise KeyError(f"batch {batch_id} was never submitted to the prefetcher")
        start = time.monotonic()
        if self._last_take is not None:
            interval = start - self._last_take
            self._step_s = (
                interval
                if self._step_s is None
                else (1 - STEP_TIME_SMOOTHING) * self._step_s + STEP_TIME_SMOOTHING * interval
            )
        self._last_take = start
        try:
            batch = self._take_strict(pending) if self.strict else self._take_deadline(pending)
        finally:
            pending.cancel()  # a part still in flight is late: drop it, bound the backlog
            self._wait_s += time.monotonic() - start
        self._anchors += len(batch.mask)
        self._arrived += int(batch.mask.sum())
        self._hits += batch.cache_hits
        return batch

    def running_stats(self) -> dict[str, float]:
        """This epoch's rates and waiting so far, without resetting them: the figures
        ``epoch_stats`` ends the epoch with, for a log that looks every few steps."""
        return {
            "positive_fraction": self._arrived / self._anchors if self._anchors else 0.0,
            "cache_hit_rate": self._hits / self._arrived if self._arrived else 0.0,
            "wait_seconds": self._wait_s,
        }

    def epoch_stats(self) -> dict[str, Any]:
        """This epoch's figures; resets them (and the once-per-epoch warning)."""
        now = dict(self.source.stats())
        delta = {
            k: now.get(k, 0) - self._source_base.get(k, 0)
            for k in ("failovers", "errors", "retries")
        }
        self._source_base = now
        stats = {
            **self.running_stats(),
            "missing": self._anchors - self._arrived,
            "anchors": self._anchors,
            **delta,
        }
        model = getattr(self.source, "model", None)  # the pool source's pinned fingerprint
        if model is not None:
            stats["model"] = model
        self._reset()
        return stats

    def close(self) -> None:
        """Cancel what is in flight and close the source."""
        if self._closed:
            return
        self._closed = True
        for pending in self._pending.values():
            pending.cancel()
        self._pending.clear()
        self.source.close()

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------- waiting

    def _take_deadline(self, pending: PendingPositives) -> PositivesBatch:
        start = time.monotonic()
        allowed = self.deadline_s if self._bucket is None else self._bucket.allowance(start)
        pending.wait(allowed)
        if self._bucket is not None:
            self._bucket.spend(time.monotonic() - start)
        batch, errors = pending.collect()
        self._raise_rejected(errors)
        if (
            not batch.mask.all()
            and self.source.enabled
            and (any(isinstance(e, PoolUnavailable) for e in errors) or not self.source.available())
        ):
            self._warn_down(errors)
        return batch

    def _take_strict(self, pending: PendingPositives) -> PositivesBatch:
        """Wait for every part, at most the strict timeout; the parts' requests retry by
        themselves meanwhile, so a part that failed has given up for good."""
        if not self.source.enabled:
            return pending.collect()[0]
        end = time.monotonic() + self.strict_timeout_s
        while not pending.wait(min(STRICT_CHECK_S, max(0.0, end - time.monotonic()))):
            if time.monotonic() >= end:
                break
            if not self.source.available():
                self._warn_down([])
        batch, errors = pending.collect()
        self._raise_rejected(errors)
        if not batch.mask.all():
            raise TimeoutError(
                f"--positives-strict: {int((~batch.mask).sum())} positives did not arrive "
                f"within {self.strict_timeout_s:.0f} s (last error: "
                f"{errors[-1] if errors else 'none'}); drop --positives-strict to train on "
                "without them"
            )
        return batch

    @staticmethod
    def _raise_rejected(errors: list[BaseException]) -> None:
        """A refused request is a configuration error (size, token): fail loudly. A
        request whose deadline passed in the pool is only late: its anchors are missing."""
        for exc in errors:
            if isinstance(exc, PoolRequestRejected) and exc.code == "deadline_exceeded":
                continue
            if isinstance(exc, (PoolRequestRejected, ValueError)):
                raise exc

    def _warn_down(self, errors: list[BaseException]) -> None:
        if self._warned:
            return
        self._warned = True
        reason = next(
            (str(e) for e in errors if not isinstance(e, concurrent.futures.CancelledError)),
            "no generator is available",
        )
        if self.strict:
            log.warning(
                "positives generators unavailable (%s); --positives-strict waits for them", reason
            )
        else:
            log.warning(
                "positives generators unavailable (%s); training goes on as the "
                "baseline for the anchors without a positive, and takes positives "
                "again when a generator returns",
                reason,
            )
