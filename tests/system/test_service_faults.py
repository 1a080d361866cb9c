"""Faults and overload against a real service started by ``clsp serve``: Redis killed
and restarted, a corrupted cache entry, clients that hang up, a queue that
overflows, JSON logs and a graceful SIGTERM.

The service has a Redis of its own here, so killing it disturbs no other test.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import threading
import time

import httpx
import numpy as np
import psutil
import pytest
import redis as redis_sync

from clsp_positives.proto.keys import canonical_anchors, positive_key
from clsp_positives.proto.params import GenerationParams
from clsp_positives.service.cache import cache_secret, decode_value, entry_name
from tests.support.servers import ServerProcess, free_port
from tests.support.service import anchors_u8, post_positives, run, scrape

PARAMS = {"steps": 2, "eta": 0.1, "interpolation_weight": 0.1}
MAX_QUEUE = 16
SECRET = "service-faults-secret"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def service(tiny_model_dir, own_redis):
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "clsp_positives.cli",
        "serve",
        "--model",
        str(tiny_model_dir),
        "--redis",
        own_redis.url,
        "--port",
        str(port),
        "--max-batch",
        "16",
        "--max-wait-ms",
        "20",
        "--max-queue",
        str(MAX_QUEUE),
        "--log-json",
        "--log-level",
        "info",
    ]
    env = {
        "OMP_NUM_THREADS": "1",
        "CLSP_REDIS_TIMEOUT_S": "0.2",
        "CLSP_REDIS_BACKOFF_MAX_S": "0.5",
        "CLSP_WARMUP_STEPS": "1",
        "CLSP_CACHE_SECRET": SECRET,
    }
    server = ServerProcess(cmd, port, health_path="/readyz", env=env).start(timeout=180)
    yield server
    server.stop()


@pytest.fixture()
def client(service):
    with httpx.Client(base_url=service.url, timeout=120) as c:
        yield c


def _wait_for(service: ServerProcess, condition, timeout: float = 30) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = scrape(service.url)
        if condition(m):
            return m
        time.sleep(0.02)
    raise AssertionError(f"metrics never met the condition; last: {m}")


def _close(a: np.ndarray, b: np.ndarray) -> bool:
    return int(np.abs(a.astype(int) - b.astype(int)).max()) <= 1


def test_redis_killed_mid_test_serves_uncached_then_caching_resumes(service, client, own_redis):
    anchors = anchors_u8(4, seed=1000)
    _, before = post_positives(client, anchors, PARAMS)
    errors0 = scrape(service.url)["clsp_cache_errors_total"]
    own_redis.kill()
    try:
        for seed in (1000, 1001):
            r, reply = post_positives(client, anchors_u8(4, seed=seed), PARAMS)
            assert r.status_code == 200, r.text
            assert reply.cache_hit.tolist() == [0] * 4
        assert _close(
            reply.positives, post_positives(client, anchors_u8(4, 1001), PARAMS)[1].positives
        )
        assert scrape(service.url)["clsp_cache_errors_total"] > errors0
    finally:
        own_redis.start()  # an empty Redis on the same port, as after a crash
    deadline = time.monotonic() + 20
    resumed = False
    while time.monotonic() < deadline and not resumed:
        fresh = anchors_u8(2, seed=int(time.monotonic() * 1000) % 100000 + 2000)
        post_positives(client, fresh, PARAMS)
        _, again = post_positives(client, fresh, PARAMS)
        resumed = again.cache_hit.tolist() == [1, 1]
        time.sleep(0.2)
    assert resumed, "caching did not resume after Redis came back"
    assert _close(post_positives(client, anchors, PARAMS)[1].positives, before.positives)


def test_corrupt_entry_is_detected_regenerated_and_overwritten(service, client, own_redis):
    anchors = anchors_u8(1, seed=1100)
    _, original = post_positives(client, anchors, PARAMS)
    fp = client.get("/v1/model").json()["fingerprint"]
    name = entry_name(
        fp, positive_key(fp, GenerationParams(**PARAMS), canonical_anchors(anchors)[0], 0)
    )
    store = redis_sync.Redis.from_url(own_redis.url)
    good = store.get(name)
    assert good is not None
    store.set(name, good[:-1] + bytes([good[-1] ^ 0xFF]))  # one flipped pixel
    corrupt0 = scrape(service.url)["clsp_cache_corrupt_total"]
    _, served = post_positives(client, anchors, PARAMS)
    assert served.cache_hit.tolist() == [0]  # never served the damaged bytes
    assert _close(served.positives, original.positives)
    assert scrape(service.url)["clsp_cache_corrupt_total"] == corrupt0 + 1
    repaired = decode_value(store.get(name), name, cache_secret(SECRET, None).key)
    assert np.array_equal(repaired, served.positives[0])  # overwritten
    _, again = post_positives(client, anchors, PARAMS)
    assert again.cache_hit.tolist() == [1]
    store.close()


def test_a_client_that_hangs_up_does_not_keep_its_work_queued(service, client):
    busy_result: dict = {}

    def busy() -> None:
        with httpx.Client(base_url=service.url, timeout=300) as c:
            busy_result["r"] = post_positives(
                c, anchors_u8(16, seed=1200), {**PARAMS, "steps": 50}
            )[0]

    m0 = scrape(service.url)
    worker = threading.Thread(target=busy)
    worker.start()
    _wait_for(service, lambda m: m["clsp_items_in_flight"] == 16 and m["clsp_queue_depth"] == 0)
    with (
        pytest.raises(httpx.ReadTimeout),
        httpx.Client(base_url=service.url, timeout=1.0) as impatient,
    ):
        post_positives(impatient, anchors_u8(8, seed=1201), PARAMS)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        m = scrape(service.url)
        if m["clsp_dropped_items_total"] - m0["clsp_dropped_items_total"] >= 8:
            break
        time.sleep(0.05)
    assert m["clsp_dropped_items_total"] - m0["clsp_dropped_items_total"] == 8
    assert m["clsp_queue_depth"] == 0
    worker.join(120)
    assert busy_result["r"].status_code == 200
    m1 = scrape(service.url)
    generated = m1["clsp_positives_generated_total"] - m0["clsp_positives_generated_total"]
    assert generated == 16  # the hung-up client's 8 items were never sampled


def test_overload_gets_429_with_retry_after_and_no_5xx(service):
    proc = psutil.Process(service.proc.pid)
    rss_before = proc.memory_info().rss

    async def main():
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=service.url, timeout=120, limits=limits) as c:
            from tests.support.service import apost_positives

            return await asyncio.gather(
                *(apost_positives(c, anchors_u8(4, seed=3000 + i), PARAMS) for i in range(64))
            )

    results = run(main(), timeout=300)
    statuses = [r.status_code for r, _ in results]
    assert set(statuses) <= {200, 429}, statuses
    assert statuses.count(429) > 0 and statuses.count(200) > 0
    for r, _ in results:
        if r.status_code == 429:
            assert int(r.headers["Retry-After"]) >= 1
            assert r.json()["error"] == "queue_full"
    m = scrape(service.url)
    assert m["clsp_queue_depth"] == 0
    assert m["clsp_rejected_requests_total"] >= statuses.count(429)
    assert httpx.get(service.url + "/healthz").status_code == 200
    assert proc.memory_info().rss - rss_before < 200 * 2**20


def test_logs_are_json_lines(service):
    lines = [ln for ln in service.log().splitlines() if ln.startswith("{")]
    records = [json.loads(ln) for ln in lines]
    assert any(r["msg"].startswith("ready") for r in records)
    assert any(r.get("items") for r in records)  # the per-request line carries its fields
    assert all({"ts", "level", "logger", "msg"} <= set(r) for r in records)


def test_sigterm_finishes_in_flight_work_then_exits(service):
    result: dict = {}

    def slow() -> None:
        with httpx.Client(base_url=service.url, timeout=300) as c:
            result["r"] = post_positives(c, anchors_u8(8, seed=1300), {**PARAMS, "steps": 10})

    worker = threading.Thread(target=slow)
    worker.start()
    _wait_for(service, lambda m: m["clsp_items_in_flight"] > 0)
    service.proc.send_signal(signal.SIGTERM)
    worker.join(120)
    response, reply = result["r"]
    assert response.status_code == 200 and reply.positives.shape == (8, 16, 16, 1)
    # uvicorn re-raises the caught SIGTERM after its clean shutdown: the exit says so.
    assert service.proc.wait(60) in (0, -signal.SIGTERM)
    assert any("in-flight" in ln for ln in service.log().splitlines())
