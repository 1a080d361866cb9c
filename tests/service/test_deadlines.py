"""Deadlines and priority over real HTTP: expired items are answered as such, never
generated late and never cached, and /metrics counts them (docs/design.md §4)."""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
import pytest

from tests.support.service import (
    anchors_u8,
    apost_positives,
    post_positives,
    run,
    scrape,
    start_service,
)

pytestmark = pytest.mark.slow

BUSY = {"steps": 300, "priority": 1, "cache": "bypass"}


@pytest.fixture(scope="module")
def service(tiny_model_dir):
    server = start_service(tiny_model_dir, max_batch=4, max_wait_ms=5)
    yield server
    server.stop()


async def _while_busy(url: str, request) -> tuple:
    """``request(client)`` sent while the worker runs a long look-ahead batch."""
    async with httpx.AsyncClient(base_url=url, timeout=120) as c:
        busy = asyncio.ensure_future(apost_positives(c, anchors_u8(4, seed=900), BUSY))
        await asyncio.sleep(0.3)  # the busy batch has started
        answer = await request(c)
        busy_answer = await busy
    return answer, busy_answer


def test_a_request_whose_deadline_passes_in_the_queue_is_a_504(service) -> None:
    before = scrape(service.url)
    anchors = anchors_u8(3, seed=901)

    async def late(c):
        return await apost_positives(c, anchors, {"steps": 2, "deadline_ms": 50})

    (r, _), (busy, _) = run(_while_busy(service.url, late))
    assert busy.status_code == 200
    assert r.status_code == 504, r.text
    assert r.json()["error"] == "deadline_exceeded" and "deadline_ms" in r.json()["detail"]
    after = scrape(service.url)
    assert (
        after["clsp_deadline_expired_items_total"]
        - before.get("clsp_deadline_expired_items_total", 0)
        == 3
    )
    # dropped before launch: never generated, so never cached
    assert (
        after["clsp_deadline_dropped_items_total"]
        - before.get("clsp_deadline_dropped_items_total", 0)
        == 3
    )
    with httpx.Client(base_url=service.url, timeout=60) as c:
        _, reply = post_positives(c, anchors, {"steps": 2})
    assert reply.cache_hit.tolist() == [0, 0, 0]


def test_a_partly_late_request_gets_its_cached_positives_and_an_expired_mask(service) -> None:
    anchors = anchors_u8(4, seed=902)
    with httpx.Client(base_url=service.url, timeout=60) as c:
        _, warm = post_positives(c, anchors[:2], {"steps": 2})  # two are cached now

    async def late(c):
        return await apost_positives(c, anchors, {"steps": 2, "deadline_ms": 50})

    (r, reply), _ = run(_while_busy(service.url, late))
    assert r.status_code == 200, r.text
    assert reply.cache_hit.tolist() == [1, 1, 0, 0]
    assert reply.expired.tolist() == [0, 0, 1, 1]
    assert np.array_equal(reply.positives[:2], warm.positives)
    assert not reply.positives[2:].any()


def test_priority_zero_overtakes_queued_look_ahead(service) -> None:
    """Look-ahead queued behind the busy batch waits for a later step's request."""

    async def main():
        async with httpx.AsyncClient(base_url=service.url, timeout=120) as c:
            busy = asyncio.ensure_future(apost_positives(c, anchors_u8(4, seed=903), BUSY))
            await asyncio.sleep(0.3)
            ahead = asyncio.ensure_future(
                apost_positives(c, anchors_u8(4, seed=904), {**BUSY, "steps": 100})
            )
            await asyncio.sleep(0.1)
            now = asyncio.ensure_future(apost_positives(c, anchors_u8(4, seed=905), {"steps": 2}))
            order: list[str] = []
            ahead.add_done_callback(lambda _: order.append("ahead"))
            now.add_done_callback(lambda _: order.append("now"))
            answers = await asyncio.gather(busy, ahead, now)
            assert all(r.status_code == 200 for r, _ in answers)
            return order

    assert run(main()) == ["now", "ahead"]
