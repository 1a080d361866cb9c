"""Load, in its CI form (the full 60 s run is ``python tests/bench/load.py``):
32 concurrent clients against a real service on loopback with its own Redis,
half the requests cached anchor sets and half fresh ones.

What must hold under load (no timing is asserted; latency and throughput are
printed for docs/reliability.md): every answer is a 200 with the right
positives or a documented 429, cached positives come back byte-identical,
fresh ones are never reported as hits, the queue drains afterwards, and the
server's resident memory after warm-up grows less than 10%. The same load
then runs while Redis is SIGKILLed and restarted under it.
"""

from __future__ import annotations

import pytest

from tests.bench.load import drive, run_with_warmup, warm_sets
from tests.support.service import run, scrape, start_service

CLIENTS = 32
ANCHORS = 4
PARAMS = {"steps": 2, "eta": 0.1, "interpolation_weight": 0.1}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def service(tiny_model_dir, own_redis):
    server = start_service(
        tiny_model_dir,
        redis_url=own_redis.url,
        threads=1,
        redis_timeout_s=0.2,
        redis_backoff_max_s=0.5,
    )
    yield server
    server.stop()


def _drained(url: str) -> None:
    m = scrape(url)
    assert m["clsp_queue_depth"] == 0 and m["clsp_items_in_flight"] == 0, m


def test_32_clients_hits_and_misses_no_errors_bounded_memory(service):
    result = run(
        run_with_warmup(
            service.url,
            pid=service.proc.pid,
            clients=CLIENTS,
            seconds=10,
            warmup_s=3,
            anchors=ANCHORS,
            params=PARAMS,
            warm_count=8,
            hit_ratio=0.5,
        ),
        timeout=300,
    )
    print("\n" + result.table())
    assert not result.failures, result.failures[:10]
    assert set(result.statuses) <= {200, 429}, result.statuses
    hits, misses = result.ok("hit"), result.ok("miss")
    assert len(hits) >= CLIENTS and len(misses) >= CLIENTS
    assert all(r.cached == ANCHORS for r in hits) and all(r.cached == 0 for r in misses)
    assert result.rss_growth is not None and result.rss_growth < 0.10, result.summary()
    _drained(service.url)


def test_redis_killed_and_restarted_under_load(service, own_redis):
    """Kill at 2.5 s, restart (empty, same port) at 5.5 s of a 9 s run: every request
    still gets its positives (uncached while Redis is down, the same images up to
    float rounding), and caching resumes by itself after the restart."""
    if not own_redis.ping():
        own_redis.start()
    warm = run(warm_sets(service.url, 8, ANCHORS, PARAMS))
    errors0 = scrape(service.url)["clsp_cache_errors_total"]
    kill_at, restart_at = 2.5, 5.5
    result = run(
        drive(
            service.url,
            clients=CLIENTS,
            seconds=9,
            anchors=ANCHORS,
            params=PARAMS,
            warm=warm,
            seed=3,
            hits_required=False,
            events=[(kill_at, own_redis.kill), (restart_at, own_redis.start)],
        ),
        timeout=300,
    )
    print("\n" + result.table())
    assert not result.failures, result.failures[:10]
    assert set(result.statuses) <= {200, 429}, result.statuses
    down = [r for r in result.ok() if kill_at + 0.3 < r.start < restart_at - 0.3]
    assert down, "no request was served while Redis was down"
    assert all(r.cached == 0 for r in down)
    after = [r for r in result.ok("hit") if r.start > restart_at + 1.5]
    assert sum(r.cached for r in after) > 0, "caching did not resume after the restart"
    assert scrape(service.url)["clsp_cache_errors_total"] > errors0
    _drained(service.url)
