"""The prefetcher and the fault behaviour of training with a pool: deadlines,
strict waits, a generator killed mid-way, every generator down and back."""

from __future__ import annotations

import logging
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from clsp_positives.proto.params import GenerationParams
from clsp_positives.trainer.positives.prefetch import Prefetcher, WaitBucket
from clsp_positives.trainer.positives.sources import build_source
from tests.support.servers import ServerProcess, free_port
from tests.support.stub_pool import configure, counters, stub_positive, stub_server

PARAMS = GenerationParams(steps=3)
FAST = {"health_interval_s": 0.1, "breaker_cooldown_s": 0.3, "backoff_s": 0.01}
B = 8


def anchors(batch_id: int) -> np.ndarray:
    return np.random.default_rng(batch_id).integers(0, 256, (B, 16, 16, 1), dtype=np.uint8)


def submit(pf: Prefetcher, batch_id: int) -> None:
    pf.submit(
        batch_id, anchors(batch_id), np.arange(B) + B * batch_id, np.arange(B, dtype=np.int64) % 4
    )


def expected(batch_id: int) -> np.ndarray:
    cands = np.arange(B) % 4
    return np.stack([stub_positive(a, c) for a, c in zip(anchors(batch_id), cands, strict=True)])


def pool_prefetcher(
    urls: str, *, deadline_ms: float, strict: bool = False, chunk: int = 4, lookahead: int = 2
) -> Prefetcher:
    source = build_source(
        urls,
        offline_npy=None,
        token=None,
        params=PARAMS,
        timeout_s=10.0,
        chunk=chunk,
        client_options=FAST,
    )
    return Prefetcher(source, lookahead=lookahead, deadline_ms=deadline_ms, strict=strict)


def down_warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.levelno == logging.WARNING and "generators unavailable" in r.getMessage()
    ]


def test_offline_positives_flow_through_and_stats_reset(tmp_path: Path) -> None:
    table = np.arange(40 * 4, dtype=np.uint8).reshape(40, 4, 1, 1, 1)
    np.save(tmp_path / "p.npy", np.broadcast_to(table, (40, 4, 16, 16, 1)).copy())
    source = build_source(None, offline_npy=str(tmp_path / "p.npy"), token=None, params=PARAMS)
    with Prefetcher(source, lookahead=2, deadline_ms=0, strict=False) as pf:
        for b in range(3):
            submit(pf, b)
        for b in range(3):
            got = pf.take(b)
            assert got.mask.all()
            rows = np.arange(B) + B * b
            assert got.images[:, 0, 0, 0].tolist() == (rows * 4 + np.arange(B) % 4).tolist()
        running = pf.running_stats()  # what a log every few steps reads
        assert pf.running_stats() == running, "looking must not reset the epoch's figures"
        stats = pf.epoch_stats()
        assert {key: stats[key] for key in running} == running
        assert stats["positive_fraction"] == 1.0 and stats["missing"] == 0
        assert stats["anchors"] == 3 * B
        assert pf.epoch_stats()["anchors"] == 0
        with pytest.raises(KeyError, match="never submitted"):
            pf.take(7)


def test_no_source_is_the_baseline_without_warnings(caplog: pytest.LogCaptureFixture) -> None:
    source = build_source(None, offline_npy=None, token=None, params=PARAMS)
    with Prefetcher(source, lookahead=1, deadline_ms=1000, strict=True) as pf:
        submit(pf, 0)
        got = pf.take(0)
        assert not got.mask.any()
        assert pf.epoch_stats()["positive_fraction"] == 0.0
    assert down_warnings(caplog) == []


def test_positives_arrive_and_skipped_batches_are_dropped() -> None:
    with stub_server() as server, pool_prefetcher(server.url, deadline_ms=30_000) as pf:
        for b in range(3):
            submit(pf, b)
        got = pf.take(1)  # batch 0 skipped: cancelled, never taken
        assert got.mask.all()
        np.testing.assert_array_equal(got.images, expected(1))
        assert 0 not in pf._pending
        pf.take(2)
        stats = pf.epoch_stats()
        assert stats["positive_fraction"] == 1.0 and stats["errors"] == 0


def test_slow_generator_never_holds_a_take_beyond_its_deadline() -> None:
    with (
        stub_server(STUB_DELAY_S="20") as server,
        pool_prefetcher(server.url, deadline_ms=100) as pf,
    ):
        for b in range(3):
            submit(pf, b)
        for b in range(3):
            got = pf.take(b)
            assert not got.mask.any() and not got.images.any()
        stats = pf.epoch_stats()
        assert stats["positive_fraction"] == 0.0 and stats["missing"] == 3 * B


def test_slow_generator_masks_only_its_own_part() -> None:
    with (
        stub_server() as fast,
        stub_server(STUB_DELAY_S="30") as slow,
        pool_prefetcher(f"{fast.url},{slow.url}", deadline_ms=3000, chunk=B // 2) as pf,
    ):
        submit(pf, 0)  # two parts: least-outstanding sends one to each generator
        got = pf.take(0)
        assert got.mask.sum() == B // 2
        half = got.mask.nonzero()[0]
        np.testing.assert_array_equal(got.images[half], expected(0)[half])
        assert pf.epoch_stats()["positive_fraction"] == 0.5


def test_wait_bucket_rations_waiting_to_a_share_of_wall_time() -> None:
    bucket = WaitBucket(capacity=0.1, share=0.05, now=0.0)
    assert bucket.allowance(0.0) == pytest.approx(0.1)  # a first late batch: the deadline
    bucket.spend(0.1)
    assert bucket.allowance(0.2) == pytest.approx(0.01)  # then 5% of the 0.2 s since
    bucket.spend(0.01)
    assert bucket.allowance(1.2) == pytest.approx(0.05)
    assert bucket.allowance(100.0) == pytest.approx(0.1)  # never more than one deadline
    bucket.spend(5.0)
    assert bucket.tokens == 0.0
    with pytest.raises(ValueError, match="wait_share"):
        Prefetcher(
            build_source(None, offline_npy=None, token=None, params=PARAMS),
            lookahead=1,
            deadline_ms=10,
            strict=False,
            wait_share=2.0,
        )


def test_strict_waits_for_a_slow_generator() -> None:
    with (
        stub_server(STUB_DELAY_S="0.5") as server,
        pool_prefetcher(server.url, deadline_ms=0, strict=True) as pf,
    ):
        submit(pf, 0)
        got = pf.take(0)
        assert got.mask.all()
        np.testing.assert_array_equal(got.images, expected(0))


def test_strict_gets_every_positive_from_a_pool_that_was_down_and_came_back(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The strict wait only waits: its requests, failing while every generator is
    down, are retried by the pool client until one comes back."""
    caplog.set_level(logging.WARNING, logger="clsp_positives.trainer.positives.prefetch")
    server = stub_server()
    server.start()
    pf = pool_prefetcher(server.url, deadline_ms=0, strict=True)
    try:
        submit(pf, 0)
        assert pf.take(0).mask.all()
        server.kill()
        submit(pf, 1)
        submit(pf, 2)
        restart = threading.Timer(1.5, server.start)  # the same port, while take(1) waits
        restart.start()
        try:
            for b in (1, 2):
                got = pf.take(b)
                assert got.mask.all(), f"batch {b} lost positives"
                np.testing.assert_array_equal(got.images, expected(b))
        finally:
            restart.join()
        stats = pf.epoch_stats()
        assert stats["positive_fraction"] == 1.0 and stats["errors"] >= 1
        assert len(down_warnings(caplog)) == 1
    finally:
        pf.close()
        server.stop()


def test_strict_gives_up_after_its_timeout_naming_the_way_out() -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    source = build_source(
        dead, offline_npy=None, token=None, params=PARAMS, timeout_s=10.0, client_options=FAST
    )
    with Prefetcher(source, lookahead=1, deadline_ms=0, strict=True, strict_timeout_s=1.0) as pf:
        submit(pf, 0)
        started = time.monotonic()
        with pytest.raises(TimeoutError, match="drop --positives-strict"):
            pf.take(0)
        assert time.monotonic() - started < 30  # bound only: it did not wait forever


def test_killed_generator_every_batch_completes_and_the_failover_is_counted() -> None:
    with stub_server(STUB_DELAY_S="0.2") as doomed, stub_server(STUB_DELAY_S="0.2") as survivor:
        with pool_prefetcher(f"{doomed.url},{survivor.url}", deadline_ms=30_000, chunk=2) as pf:
            submit(pf, 0)
            submit(pf, 1)
            for b in range(8):
                submit(pf, b + 2)
                if b == 2:
                    doomed.kill()  # SIGKILL with requests in flight
                got = pf.take(b)
                assert got.mask.all(), f"batch {b} lost positives"
                np.testing.assert_array_equal(got.images, expected(b))
            stats = pf.epoch_stats()
        assert stats["failovers"] >= 1 and stats["errors"] >= 1
        assert stats["positive_fraction"] == 1.0
        assert counters(survivor)["requests"] > 0


def test_all_down_trains_as_baseline_warns_once_per_epoch_and_recovers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="clsp_positives.trainer.positives.prefetch")
    first, second = stub_server(), stub_server()
    first.start()
    second.start()
    pf = pool_prefetcher(f"{first.url},{second.url}", deadline_ms=200)
    try:
        submit(pf, 0)
        assert pf.take(0).mask.all()
        pf.epoch_stats()
        first.kill()
        second.kill()
        batch_id = 1
        for epoch in range(2):
            for _ in range(4):
                submit(pf, batch_id)
                got = pf.take(batch_id)
                assert not got.mask.any()
                batch_id += 1
            stats = pf.epoch_stats()
            assert stats["positive_fraction"] == 0.0 and stats["missing"] == 4 * B
            assert len(down_warnings(caplog)) == epoch + 1
        second.start()  # the same port: the client finds it again by itself
        deadline = time.monotonic() + 30  # bound only, not a timing assertion
        while True:
            submit(pf, batch_id)
            got = pf.take(batch_id)
            batch_id += 1
            if got.mask.all():
                break
            assert time.monotonic() < deadline, "positives never came back"
            time.sleep(0.1)
        np.testing.assert_array_equal(got.images, expected(batch_id - 1))
    finally:
        pf.close()
        first.stop()
        second.stop()


def test_a_refused_request_is_a_loud_configuration_error() -> None:
    with (
        stub_server(STUB_TOKEN="t") as server,
        pool_prefetcher(server.url, deadline_ms=10_000) as pf,
    ):
        submit(pf, 0)
        with pytest.raises(Exception, match="--token"):
            pf.take(0)


def test_close_cancels_in_flight_work_and_leaves_no_threads() -> None:
    before = set(threading.enumerate())
    with stub_server() as server:
        configure(server, delay_s=30)
        pf = pool_prefetcher(server.url, deadline_ms=10)
        for b in range(3):
            submit(pf, b)
        pf.close()
        pf.close()
        with pytest.raises(RuntimeError, match="closed"):
            submit(pf, 4)
    assert set(threading.enumerate()) <= before


@pytest.mark.slow
def test_real_service_positives_flow_then_come_from_its_cache(tiny_model_dir) -> None:
    """The same client against the real `clsp serve` with the tiny model."""
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "clsp_positives.cli",
        "serve",
        "--model",
        str(tiny_model_dir),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--max-wait-ms",
        "20",
    ]
    env = {"OMP_NUM_THREADS": "1", "CLSP_WARMUP_STEPS": "1", "CLSP_LOG_LEVEL": "warning"}
    service = ServerProcess(cmd, port, health_path="/readyz", env=env, start_timeout=300)
    with service as server:
        with pool_prefetcher(server.url, deadline_ms=0, strict=True) as pf:
            for b in range(2):
                submit(pf, b)
            cold = [pf.take(b) for b in range(2)]
            assert all(batch.mask.all() for batch in cold)
            first = pf.epoch_stats()
            assert first["positive_fraction"] == 1.0 and first["cache_hit_rate"] == 0.0
        with pool_prefetcher(server.url, deadline_ms=60_000) as pf:
            for b in range(2):
                submit(pf, b)
            warm = [pf.take(b) for b in range(2)]
            second = pf.epoch_stats()
    assert second["positive_fraction"] == 1.0 and second["cache_hit_rate"] == 1.0
    for c, w in zip(cold, warm, strict=True):
        np.testing.assert_array_equal(c.images, w.images)  # the cache returns what was made
    assert not np.array_equal(cold[0].images, cold[1].images)


def test_requests_carry_when_their_step_needs_them() -> None:
    """Once the step time is measured, a batch L steps ahead asks the pool to drop it
    after about L steps, when its take starts, as look-ahead (priority 1); the next
    step's batch is priority 0. Strict runs wait for everything: no deadline."""
    source = build_source(None, offline_npy=None, token=None, params=PARAMS)
    with Prefetcher(source, lookahead=3, deadline_ms=100, strict=False) as pf:
        first = pf.urgency(3)  # no step time yet: a step counts as a second
        assert first is not None and first.deadline_ms == 2750 and first.priority == 1
        for b in range(4):
            submit(pf, b)
            pf.take(b)
            time.sleep(0.05)
        ahead, next_step = pf.urgency(3), pf.urgency(1)
        assert ahead is not None and next_step is not None
        assert ahead.priority == 1 and next_step.priority == 0
        assert 2.75 * 50 <= ahead.deadline_ms <= 2.75 * 200
        assert next_step.deadline_ms < ahead.deadline_ms
    with Prefetcher(source, lookahead=3, deadline_ms=100, strict=True) as strict:
        for b in range(3):
            submit(strict, b)
            strict.take(b)
        assert strict.urgency(3) is None
