"""PoolClient against real stub generators on loopback: encoding, balancing,
failover, circuit breaking, recovery, discovery and clean shutdown."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest

from clsp_positives.client import (
    EndpointSpec,
    PoolClient,
    PoolRequestRejected,
    PoolUnavailable,
    parse_endpoints,
    resolve,
)
from clsp_positives.proto.params import GenerationParams
from tests.support.servers import ServerProcess, free_port
from tests.support.stub_pool import configure, counters, stub_positive, stub_server

FAST = {"health_interval_s": 0.1, "breaker_cooldown_s": 0.3, "backoff_s": 0.01, "timeout_s": 10.0}


@pytest.fixture()
def stubs() -> Iterator[list[ServerProcess]]:
    servers = [stub_server(), stub_server()]
    for s in servers:
        s.start()
    yield servers
    for s in servers:
        s.stop()


def anchors(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 16, 16, 1), dtype=np.uint8)


def state_of(client: PoolClient, url: str) -> str:
    return next(e["state"] for e in client.stats().endpoints if e["url"] == url)


def wait_for(predicate, what: str, bound_s: float = 20.0) -> None:
    """Poll for a condition; the bound only keeps a broken build from hanging."""
    end = time.monotonic() + bound_s
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"{what} did not happen")
        time.sleep(0.05)


def test_parse_endpoints_accepts_lists_and_dns_and_names_bad_items() -> None:
    specs = parse_endpoints("http://a:1, https://b,dns+http://gen:8000")
    assert [s.text for s in specs] == ["http://a:1", "https://b:443", "dns+http://gen:8000"]
    assert [s.dns for s in specs] == [False, False, True]
    for bad in ("", "ftp://a:1", "a:1", "http://a:1/v1/positives", "http://a:99999"):
        with pytest.raises(ValueError, match="positives"):
            parse_endpoints(bad)


def test_dns_spec_resolves_every_address_of_the_host() -> None:
    urls = resolve(EndpointSpec("http", "localhost", 8123, dns=True))
    assert "http://127.0.0.1:8123" in urls
    assert all(u.endswith(":8123") for u in urls)
    assert resolve(EndpointSpec("http", "gen", 1, dns=False)) == ["http://gen:1"]
    with pytest.raises(ValueError, match="cannot resolve"):
        PoolClient("dns+http://no-such-host.invalid:80")


def test_round_trip_decodes_positives_and_cache_hits(stubs: list[ServerProcess]) -> None:
    a = anchors(6)
    cand = np.array([0, 1, 2, 3, 4, 5])
    with PoolClient(stubs[0].url, **FAST) as client:
        first = client.positives(a, cand, GenerationParams(steps=5))
        again = client.positives(a, cand, GenerationParams(steps=5))
        info = client.model_info()
    expected = np.stack([stub_positive(x, c) for x, c in zip(a, cand, strict=True)])
    np.testing.assert_array_equal(first.positives, expected)
    assert first.params.steps == 5
    assert first.cache_hit.tolist() == [0] * 6 and again.cache_hit.tolist() == [1] * 6
    assert info["sample_size"] == 16


def test_dns_endpoint_reaches_a_stub_on_localhost(stubs: list[ServerProcess]) -> None:
    with PoolClient(f"dns+http://localhost:{stubs[0].port}", **FAST) as client:
        assert f"http://127.0.0.1:{stubs[0].port}" in client.endpoint_urls
        # localhost may also resolve to ::1, where the stub does not listen: failover covers it
        for i in range(4):
            assert client.positives(anchors(2, i)).positives.shape == (2, 16, 16, 1)


def test_dns_endpoints_are_re_resolved(stubs: list[ServerProcess]) -> None:
    url = f"http://127.0.0.1:{stubs[0].port}"
    opts = {**FAST, "resolve_interval_s": 0.1}
    with PoolClient(f"dns+http://localhost:{stubs[0].port}", **opts) as client:
        del client._endpoints[url]  # as if the replica had not existed at the last lookup
        wait_for(lambda: url in client.endpoint_urls, "re-resolution finding the replica")


def test_least_outstanding_spreads_concurrent_requests(stubs: list[ServerProcess]) -> None:
    for s in stubs:
        configure(s, delay_s=0.3)
    with PoolClient(",".join(s.url for s in stubs), **FAST) as client:
        futures = [client.submit(anchors(2, i)) for i in range(8)]
        for f in futures:
            f.result(30)
    assert [counters(s)["requests"] for s in stubs] == [4, 4]


def test_bearer_token_is_sent_and_a_refusal_says_what_to_fix() -> None:
    with stub_server(STUB_TOKEN="s3cret") as server:
        with PoolClient(server.url, token="s3cret", **FAST) as client:
            assert client.positives(anchors(1)).positives.shape == (1, 16, 16, 1)
        with PoolClient(server.url, token="wrong", **FAST) as client:
            with pytest.raises(PoolRequestRejected, match="--token") as err:
                client.positives(anchors(1))
            assert err.value.status == 401
            assert client.stats().retries == 0  # a refusal is not retried elsewhere


def test_failing_endpoint_fails_over_then_its_circuit_opens_and_recovers(
    stubs: list[ServerProcess],
) -> None:
    bad, good = stubs
    configure(bad, fail_status=500)
    opts = {**FAST, "breaker_cooldown_s": 60.0, "breaker_failures": 2}
    with PoolClient(f"{bad.url},{good.url}", **opts) as client:
        for i in range(10):
            out = client.positives(anchors(3, i))
            np.testing.assert_array_equal(out.positives[0], stub_positive(anchors(3, i)[0], 0))
        stats = client.stats()
        assert stats.failovers >= 1 and stats.errors == 2
        assert state_of(client, bad.url) == "open"
        # its /readyz answers, but only a real request may close the circuit again
        assert counters(bad)["requests"] == 2
        client.breaker_cooldown_s = 0.2  # the half-open probe becomes due
        configure(bad, fail_status=0)
        wait_for(
            lambda: (
                client.positives(anchors(1)) is not None and state_of(client, bad.url) == "closed"
            ),
            "half-open probe closing",
        )
        for i in range(6):
            client.positives(anchors(1, i))
        assert counters(bad)["requests"] >= 5  # back in the rotation


def test_dead_endpoint_is_routed_around() -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    with stub_server() as live, PoolClient(f"{dead},{live.url}", **FAST) as client:
        for i in range(6):
            assert client.positives(anchors(2, i)).positives.shape == (2, 16, 16, 1)
        stats = client.stats()
        assert stats.failovers >= 1
        assert counters(live)["requests"] == 6


def test_all_down_fails_fast_with_pool_unavailable() -> None:
    urls = ",".join(f"http://127.0.0.1:{free_port()}" for _ in range(2))
    with PoolClient(urls, **{**FAST, "breaker_cooldown_s": 30.0, "breaker_failures": 1}) as c:
        with pytest.raises(PoolUnavailable):
            c.positives(anchors(1))
        assert not c.available()
        with pytest.raises(PoolUnavailable, match="no generator"):
            c.positives(anchors(1))


def test_close_leaves_no_thread_and_cancels_in_flight(stubs: list[ServerProcess]) -> None:
    before = set(threading.enumerate())
    configure(stubs[0], delay_s=30)
    client = PoolClient(stubs[0].url, **FAST)
    future = client.submit(anchors(1))
    client.close(timeout=10)
    assert future.cancelled() or future.exception() is not None
    assert set(threading.enumerate()) <= before
    with pytest.raises(RuntimeError, match="closed"):
        client.submit(anchors(1))


def test_retry_for_s_rides_out_an_outage_and_gives_up_when_it_is_over(
    stubs: list[ServerProcess],
) -> None:
    """The one retry policy: a request retries ``max_attempts`` times, or for
    ``retry_for_s`` seconds (the strict wait's requests), then raises PoolUnavailable."""
    server = stubs[0]
    configure(server, fail_status=503)
    with PoolClient(server.url, **{**FAST, "max_backoff_s": 0.2}) as client:
        with pytest.raises(PoolUnavailable):
            client.positives(anchors(1))
        tried = counters(server)["requests"]
        assert tried <= client.max_attempts
        started = time.monotonic()
        with pytest.raises(PoolUnavailable):
            client.positives(anchors(1), retry_for_s=1.0)  # the outage outlasts the window
        assert time.monotonic() - started >= 1.0  # it gave up only when the window closed
        assert counters(server)["requests"] > tried  # half-open probes kept asking
        asked = counters(server)["requests"]
        future = client.submit(anchors(2, 1), retry_for_s=60.0)
        wait_for(lambda: counters(server)["requests"] > asked + 2, "retries during the outage")
        assert not future.done()
        configure(server, fail_status=0)
        out = future.result(30)
    np.testing.assert_array_equal(out.positives[1], stub_positive(anchors(2, 1)[1], 0))


def test_retry_for_s_still_ends_at_a_refusal_and_at_cancel() -> None:
    with stub_server(STUB_TOKEN="s3cret") as server:
        with PoolClient(server.url, token="wrong", **FAST) as client:
            with pytest.raises(PoolRequestRejected):
                client.positives(anchors(1), retry_for_s=60.0)
            assert client.stats().retries == 0
        configure(server, fail_status=503)
        with PoolClient(server.url, token="s3cret", **FAST) as client:
            future = client.submit(anchors(1), retry_for_s=60.0)
            wait_for(lambda: counters(server)["requests"] > 3, "the first attempts")
            future.cancel()
            asked = counters(server)["requests"]
            time.sleep(0.5)  # several back-offs' worth: a cancelled request asks no more
            assert counters(server)["requests"] <= asked + 1


def test_a_pinned_request_skips_generators_of_another_model() -> None:
    """``expect_model``: a generator of another model answers 409, and the client takes
    that as 'not this one' (one warning), not as a refusal of the request."""
    with (
        stub_server(STUB_FINGERPRINT="model-b") as b,
        stub_server(STUB_FINGERPRINT="model-a") as a,
        PoolClient([b.url, a.url], **FAST) as client,
    ):
        assert client.positives(anchors(1)).model in ("model-a", "model-b")  # unpinned
        pinned = GenerationParams(expect_model="model-a")
        before = counters(a)["items"]
        for _ in range(4):
            assert client.positives(anchors(2), params=pinned).model == "model-a"
        assert counters(a)["items"] == before + 8
        with pytest.raises(PoolUnavailable, match="model_mismatch"):
            client.positives(anchors(1), params=GenerationParams(expect_model="model-c"))
