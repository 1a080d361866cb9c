"""The dynamic batcher on its own, with a recording stand-in for the sampler.

The stand-in is the batcher's direct neighbour (``run_batch``): each item's key
is a number, which the stand-in returns as its "image", so every answer can be
traced to its item.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time

import numpy as np
import pytest

from clsp_positives.service.batcher import (
    Batcher,
    BatcherClosed,
    DeadlineExceeded,
    Item,
    QueueFull,
)


class RecordingSampler:
    """Records each call; optionally blocks the first call until released."""

    def __init__(self, block_first: bool = False, fail_groups: tuple = ()) -> None:
        self.calls: list[tuple[object, list[int], list[float], str]] = []
        self.gate = threading.Event()
        if not block_first:
            self.gate.set()
        self.started = threading.Event()
        self.fail_groups = fail_groups

    def __call__(self, group, anchors, keys, interpolation_weights):
        self.started.set()
        self.gate.wait(10)
        seeds = [int.from_bytes(k, "little") for k in keys]
        self.calls.append(
            (group, seeds, interpolation_weights.tolist(), threading.current_thread().name)
        )
        if group in self.fail_groups:
            raise RuntimeError("sampler exploded")
        assert anchors.dtype == np.float32 and anchors.shape[1:] == (1, 2, 2)
        return np.stack([np.full((2, 2, 1), s % 251, np.uint8) for s in seeds])


class SlowSampler(RecordingSampler):
    """0.2 s per item, as a CPU sampler's time grows with its batch."""

    def __call__(self, group, anchors, keys, interpolation_weights):
        time.sleep(0.2 * len(keys))
        return super().__call__(group, anchors, keys, interpolation_weights)


def item(
    seed: int,
    group=("g", 1),
    weight: float = 0.1,
    *,
    deadline: float = math.inf,
    priority: int = 0,
) -> Item:
    return Item(
        key=seed.to_bytes(8, "little"),
        anchor=np.zeros((1, 2, 2), np.float32),
        interpolation_weight=weight,
        group=group,
        deadline=deadline,
        priority=priority,
    )


async def wait_started(sampler: RecordingSampler) -> None:
    while not sampler.started.is_set():
        await asyncio.sleep(0.005)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


def test_concurrent_submissions_merge_into_one_call_up_to_max_batch():
    async def main():
        sampler = RecordingSampler(block_first=True)
        b = Batcher(sampler, max_batch=8, max_wait_ms=5, max_queue=100)
        b.start()
        first = b.submit([item(1000)])
        await wait_started(sampler)  # worker busy: the next submissions pile up
        tickets = [b.submit([item(10 * r + i) for i in range(3)]) for r in range(4)]
        assert b.queued == 12
        sampler.gate.set()
        await asyncio.wait(first.futures + [f for t in tickets for f in t.futures])
        await b.close()
        return sampler, tickets

    sampler, tickets = run(main())
    sizes = [len(seeds) for _, seeds, _, _ in sampler.calls]
    assert sizes == [1, 8, 4]  # 12 queued items: one full batch, then the rest
    for r, ticket in enumerate(tickets):
        for i, fut in enumerate(ticket.futures):
            assert fut.result()[0, 0, 0] == (10 * r + i) % 251
    assert all(name.startswith("clsp-sampler") for *_, name in sampler.calls)


def test_groups_never_share_a_call_but_weights_may_differ():
    async def main():
        sampler = RecordingSampler(block_first=True)
        b = Batcher(sampler, max_batch=16, max_wait_ms=1, max_queue=100)
        b.start()
        t0 = b.submit([item(1, group="busy")])
        await wait_started(sampler)
        t1 = b.submit([item(2, "a", 0.1), item(3, "b", 0.5), item(4, "a", 0.9)])
        sampler.gate.set()
        await asyncio.wait(t0.futures + t1.futures)
        await b.close()
        return sampler

    sampler = run(main())
    by_group = {g: (seeds, weights) for g, seeds, weights, _ in sampler.calls}
    assert sorted(by_group["a"][0]) == [2, 4]
    assert sorted(by_group["a"][1]) == pytest.approx([0.1, 0.9])
    assert by_group["b"][0] == [3]


def test_identical_keys_in_flight_are_generated_once():
    async def main():
        sampler = RecordingSampler(block_first=True)
        b = Batcher(sampler, max_batch=16, max_wait_ms=1, max_queue=100)
        b.start()
        busy = b.submit([item(99)])
        await wait_started(sampler)
        a = b.submit([item(1), item(2), item(1)])  # a duplicate inside one request
        c = b.submit([item(2), item(3)])  # and across requests
        sampler.gate.set()
        await asyncio.wait(busy.futures + a.futures + c.futures)
        await b.close()
        return sampler, a, c

    sampler, a, c = run(main())
    assert sorted(sampler.calls[1][1]) == [1, 2, 3]
    assert a.deduplicated == 1 and c.deduplicated == 1
    assert a.futures[1] is c.futures[0]
    assert np.array_equal(a.futures[0].result(), a.futures[2].result())


def test_release_drops_unstarted_items_unless_someone_else_wants_them():
    async def main():
        sampler = RecordingSampler(block_first=True)
        b = Batcher(sampler, max_batch=16, max_wait_ms=1, max_queue=100)
        b.start()
        busy = b.submit([item(99)])
        await wait_started(sampler)
        leaver = b.submit([item(1), item(2), item(3)])
        stayer = b.submit([item(3), item(4)])
        dropped = b.release(leaver)
        assert dropped == 2  # 1 and 2; 3 is still wanted
        assert b.release(leaver) == 0  # idempotent
        assert b.queued == 2
        assert leaver.futures[0].cancelled()
        b.release(busy)  # already running: it still finishes
        sampler.gate.set()
        await asyncio.wait(stayer.futures)
        await b.close()
        return sampler, busy

    sampler, busy = run(main())
    assert busy.futures[0].result()[0, 0, 0] == 99  # released while running: it finished
    assert sampler.calls[0][1] == [99]
    assert sorted(sampler.calls[1][1]) == [3, 4]


def test_full_queue_refuses_new_work_with_a_retry_hint():
    async def main():
        sampler = RecordingSampler(block_first=True)
        b = Batcher(sampler, max_batch=4, max_wait_ms=1, max_queue=5)
        b.start()
        busy = b.submit([item(99)])
        await wait_started(sampler)
        ok = b.submit([item(i) for i in range(5)])
        with pytest.raises(QueueFull) as info:
            b.submit([item(100)])
        shared = b.submit([item(0), item(1)])  # already queued keys cost nothing
        assert b.queued == 5
        sampler.gate.set()
        await asyncio.wait(busy.futures + ok.futures + shared.futures)
        await b.close()
        return info.value

    err = run(main())
    assert err.retry_after >= 1 and err.limit == 5 and "retry after" in str(err)


def test_a_failing_call_fails_its_waiters_and_the_batcher_carries_on():
    async def main():
        sampler = RecordingSampler(fail_groups=("bad",))
        b = Batcher(sampler, max_batch=4, max_wait_ms=1, max_queue=10)
        b.start()
        bad = b.submit([item(1, "bad")])
        await asyncio.wait(bad.futures)
        good = b.submit([item(2, "good")])
        await asyncio.wait(good.futures)
        await b.close()
        return bad, good

    bad, good = run(main())
    with pytest.raises(RuntimeError, match="exploded"):
        bad.futures[0].result()
    assert good.futures[0].result()[0, 0, 0] == 2


def test_close_drains_queued_work_then_refuses_more():
    async def main():
        sampler = RecordingSampler(block_first=True)
        b = Batcher(sampler, max_batch=2, max_wait_ms=50, max_queue=10)
        b.start()
        t = b.submit([item(i) for i in range(5)])
        await wait_started(sampler)
        closing = asyncio.create_task(b.close(drain=True))
        await asyncio.sleep(0.01)
        with pytest.raises(BatcherClosed):
            b.submit([item(7)])
        sampler.gate.set()
        await closing
        return t

    t = run(main())
    assert [f.result()[0, 0, 0] for f in t.futures] == [0, 1, 2, 3, 4]


def test_priority_then_earliest_deadline_fill_the_next_batch():
    """While the worker is busy, look-ahead (priority 1) arrives first, then items a
    step needs now (priority 0) with various deadlines: the next call takes the
    priority 0 items, earliest deadline first, whichever group and order they came in."""

    async def main():
        sampler = RecordingSampler(block_first=True)
        b = Batcher(sampler, max_batch=3, max_wait_ms=1, max_queue=100)
        b.start()
        first = b.submit([item(1)])
        await wait_started(sampler)
        now = time.monotonic()
        later = b.submit([item(10 + i, group="look", priority=1) for i in range(3)])
        urgent = b.submit([item(20 + i, group="now", deadline=now + 30 - i) for i in range(4)])
        sampler.gate.set()
        await asyncio.wait(first.futures + later.futures + urgent.futures)
        await b.close()
        return sampler

    sampler = run(main())
    groups = [(g, seeds) for g, seeds, _, _ in sampler.calls[1:]]
    assert groups[0] == ("now", [23, 22, 21])  # deadlines now+27, +28, +29
    assert groups[1] == ("now", [20])
    assert groups[2] == ("look", [10, 11, 12])


def test_items_past_their_deadline_are_dropped_before_launch_and_counted():
    async def main():
        sampler = RecordingSampler(block_first=True)
        expired: list[int] = []
        b = Batcher(sampler, max_batch=8, max_wait_ms=1, max_queue=100, on_expired=expired.append)
        b.start()
        first = b.submit([item(1, deadline=time.monotonic() + 0.05)])
        await wait_started(sampler)  # started: it runs to the end whatever its deadline
        soon = time.monotonic() + 0.05
        mixed = b.submit([item(2, deadline=soon), item(3), item(4, deadline=soon)])
        await asyncio.sleep(0.1)  # both deadlines pass while the worker is busy
        sampler.gate.set()
        await asyncio.wait(first.futures + mixed.futures)
        assert b.queued == 0 and b.in_flight == 0
        await b.close()
        return sampler, first, mixed, expired

    sampler, first, mixed, expired = run(main())
    assert first.futures[0].result()[0, 0, 0] == 1
    for i in (0, 2):
        with pytest.raises(DeadlineExceeded):
            mixed.futures[i].result()
    assert mixed.futures[1].result()[0, 0, 0] == 3
    assert [seeds for _, seeds, _, _ in sampler.calls] == [[1], [3]]  # never generated
    assert sum(expired) == 2


def test_a_shared_item_waits_for_its_last_holder_at_its_most_urgent_priority():
    async def main():
        sampler = RecordingSampler(block_first=True)
        b = Batcher(sampler, max_batch=1, max_wait_ms=1, max_queue=100)
        b.start()
        first = b.submit([item(1)])
        await wait_started(sampler)
        other = b.submit([item(5)])
        short = b.submit([item(7, priority=1, deadline=time.monotonic() + 0.05)])
        long = b.submit([item(7, priority=0, deadline=time.monotonic() + 30)])
        await asyncio.sleep(0.1)  # the first holder's deadline passes
        sampler.gate.set()
        await asyncio.wait(first.futures + other.futures + short.futures + long.futures)
        await b.close()
        return sampler, long

    sampler, long = run(main())
    assert long.futures[0].result()[0, 0, 0] == 7
    # priority 0 from the second holder: before item 5, which arrived earlier
    assert [seeds for _, seeds, _, _ in sampler.calls] == [[1], [7], [5]]


def test_items_that_would_finish_late_are_not_started():
    """After a call that measured 0.2 s per item, an item due in 0.1 s cannot make it:
    it is dropped unrun, while one due later is generated."""

    async def main():
        sampler = SlowSampler()
        b = Batcher(sampler, max_batch=1, max_wait_ms=1, max_queue=100)
        b.start()
        await asyncio.wait(b.submit([item(1)]).futures)  # measures 0.2 s per item
        now = time.monotonic()
        tight = b.submit([item(2, deadline=now + 0.1)])
        loose = b.submit([item(3, deadline=now + 5)])
        await asyncio.wait(tight.futures + loose.futures)
        await b.close()
        return sampler, tight, loose

    sampler, tight, loose = run(main())
    with pytest.raises(DeadlineExceeded):
        tight.futures[0].result()
    assert loose.futures[0].result()[0, 0, 0] == 3
    assert [seeds for _, seeds, _, _ in sampler.calls] == [[1], [3]]


def test_batches_shrink_to_end_before_their_deadlines():
    """At 0.2 s per item, four items due in 0.5 s fit two to a call: the call takes two,
    the other two cannot make it any more and are dropped; items due later go next."""

    async def main():
        sampler = SlowSampler()
        b = Batcher(sampler, max_batch=8, max_wait_ms=1, max_queue=100)
        b.start()
        await asyncio.wait(b.submit([item(1)]).futures)  # measures 0.2 s per item
        now = time.monotonic()
        tight = b.submit([item(10 + i, deadline=now + 0.5) for i in range(4)])
        loose = b.submit([item(20 + i, deadline=now + 10) for i in range(2)])
        await asyncio.wait(tight.futures + loose.futures)
        await b.close()
        return sampler, tight

    sampler, tight = run(main())
    assert [seeds for _, seeds, _, _ in sampler.calls] == [[1], [10, 11], [20, 21]]
    assert [f.exception() is None for f in tight.futures] == [True, True, False, False]


def test_call_times_fit_a_fixed_part_and_a_part_per_item_step():
    from clsp_positives.service.batcher import CallTimes, fit_call_times

    assert fit_call_times([]) == (0.0, 0.0)
    # one cost only: proportional
    assert fit_call_times([(10, 1.0), (10, 3.0)]) == (0.0, 0.2)
    fixed, per_cost = fit_call_times([(c, 0.5 + 0.01 * c) for c in (10, 40, 100)])
    assert abs(fixed - 0.5) < 1e-9 and abs(per_cost - 0.01) < 1e-9
    # a negative intercept is not a time: through the origin instead
    fixed, per_cost = fit_call_times([(10, 0.05), (100, 1.0)])
    assert fixed == 0.0 and per_cost > 0
    times = CallTimes()
    for c in (8, 64):
        times.add(c, 0.2 + 0.05 * c)
    assert abs(times(32) - (0.2 + 0.05 * 32)) < 1e-9


def test_call_times_of_flat_calls_are_their_mean_whatever_the_size():
    """Flat calls (a GPU's: the fixed part dominates) whose noise fits a slope below 0:
    the best line of slope >= 0 is flat at their mean, not a proportional model that
    would price a full batch at many small calls (docs/design.md §4)."""
    from clsp_positives.service.batcher import fit_call_times

    calls = [(2, 0.51), (32, 0.50), (8, 0.505), (32, 0.49)]
    fixed, per_cost = fit_call_times(calls)
    assert per_cost == 0.0
    assert abs(fixed - np.mean([s for _, s in calls])) < 1e-12
    # a slope just above 0 is kept as fitted: a near-flat call still grows a little
    fixed, per_cost = fit_call_times([(2, 0.50), (32, 0.53)])
    assert abs(fixed - 0.498) < 1e-9 and abs(per_cost - 0.001) < 1e-9
