"""The cache on a real Redis Cluster of three masters (docs/design.md §7,
docs/deployment.md "Redis Cluster", docs/reliability.md §3): a request's keys spread
over the masters and are read and written per master; a killed master makes its own
keys misses while the others keep serving, and its keys hit again once it is back; a
tampered value on one node is never served. First ``RedisClusterCache`` alone, then a
real ``clsp serve --redis redis+cluster://...`` over HTTP.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
import redis as redis_sync

from clsp_positives.proto.keys import canonical_anchors, positive_key
from clsp_positives.proto.params import GenerationParams
from clsp_positives.service.cache import (
    RedisClusterCache,
    cache_secret,
    decode_value,
    encode_value,
    entry_name,
)
from tests.support.forgery import with_plain_checksum
from tests.support.servers import RedisCluster, RedisServer, ServerProcess
from tests.support.service import anchors_u8, clsp_serve, post_positives, scrape

SECRET = "cluster-pool-secret-5d1f"
MAC_KEY = cache_secret(SECRET, None).key
PARAMS = GenerationParams(steps=2, eta=0.1)
TTL_S = 600


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisCluster]:
    """Three masters on free loopback ports, stopped (and their files removed) after."""
    nodes = RedisCluster(3).start()
    try:
        yield nodes
    finally:
        nodes.close()


def _keys_on(node: RedisServer, pattern: str) -> set[str]:
    """The keys one node holds itself (KEYS on a cluster node lists only its own)."""
    with redis_sync.Redis(host="127.0.0.1", port=node.port) as one:
        return {k.decode() for k in one.keys(pattern)}


def _placement(cluster: RedisCluster, names: list[str]) -> list[set[str]]:
    """Which of ``names`` each master holds."""
    wanted = set(names)
    return [_keys_on(node, "clsp:*") & wanted for node in cluster.nodes]


def _ttl(cluster: RedisCluster, name: str) -> int:
    with redis_sync.RedisCluster(host="127.0.0.1", port=cluster.nodes[0].port) as store:
        return int(store.ttl(name))


def _images(n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (16, 16, 1), dtype=np.uint8) for _ in range(n)]


def _keys(n: int, salt: int) -> list[bytes]:
    return [bytes([salt]) + i.to_bytes(31, "little") for i in range(n)]


def _run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


# ------------------------------------------------------------ the cache alone


def test_keys_spread_over_the_masters_round_trip_and_carry_the_ttl(cluster):
    ks, imgs = _keys(30, salt=1), _images(30, seed=1)

    async def main():
        cache = RedisClusterCache(cluster.url, mac_key=MAC_KEY)
        await cache.set_many("fp-c1", list(zip(ks, imgs, strict=True)), ttl_s=TTL_S)
        got = await cache.get_many("fp-c1", [*ks, _keys(1, salt=2)[0]])
        await cache.close()
        return cache, got

    cache, got = _run(main())
    names = [entry_name("fp-c1", k) for k in ks]
    held = _placement(cluster, names)
    assert sum(len(h) for h in held) == 30  # every key written once, on its own master
    assert sum(1 for h in held if h) > 1  # ... which is more than one master
    assert all(np.array_equal(a, b) for a, b in zip(got[:30], imgs, strict=True))
    assert got[30] is None
    assert (cache.stats.hits, cache.stats.misses, cache.stats.writes) == (30, 1, 30)
    assert cache.stats.errors == 0
    assert 0 < _ttl(cluster, names[0]) <= TTL_S


def test_a_dead_master_misses_and_drops_its_own_keys_only(cluster):
    ks, imgs = _keys(30, salt=3), _images(30, seed=3)
    names = [entry_name("fp-c2", k) for k in ks]
    items = list(zip(ks, imgs, strict=True))
    state: dict[str, object] = {}

    async def main():
        cache = RedisClusterCache(cluster.url, mac_key=MAC_KEY, backoff_max_s=0.2)
        await cache.set_many("fp-c2", items, ttl_s=TTL_S)
        held = _placement(cluster, names)
        victim = max(range(3), key=lambda i: len(held[i]))
        state["victim"], state["held"] = victim, held[victim]
        cluster.nodes[victim].kill()
        try:
            state["down"] = await cache.get_many("fp-c2", ks)
            writes0 = cache.stats.writes
            await cache.set_many("fp-c2", items, ttl_s=TTL_S)  # never raises
            state["written_while_down"] = cache.stats.writes - writes0
            state["errors"] = cache.stats.errors
        finally:
            cluster.restart(victim)  # empty: the cluster keeps no files of its values
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            await cache.set_many("fp-c2", items, ttl_s=TTL_S)
            state["back"] = await cache.get_many("fp-c2", ks)
            if all(v is not None for v in state["back"]):
                break
            await asyncio.sleep(0.2)
        await cache.close()

    _run(main())
    lost = state["held"]
    assert 0 < len(lost) < 30
    for name, img, value in zip(names, imgs, state["down"], strict=True):
        if name in lost:
            assert value is None
        else:  # the other masters kept serving
            assert np.array_equal(value, img)
    assert state["errors"] >= 1
    assert state["written_while_down"] == 30 - len(lost)  # the dead master's writes dropped
    assert all(np.array_equal(a, b) for a, b in zip(state["back"], imgs, strict=True))


# ----------------------------------------------------------- clsp serve on it


@pytest.fixture(scope="module")
def service(tiny_model_dir, cluster) -> Iterator[ServerProcess]:
    args = ("--max-batch", "8", "--max-wait-ms", "20", "--cache-ttl", str(TTL_S))
    args += ("--redis-backoff-max-s", "0.5")
    with clsp_serve(
        tiny_model_dir, cluster.url, args=args, env={"CLSP_CACHE_SECRET": SECRET}
    ) as server:
        yield server


@pytest.fixture()
def client(service: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=service.url, timeout=120) as c:
        yield c


def _names(fingerprint: str, anchors: np.ndarray) -> list[str]:
    canon = canonical_anchors(anchors)
    return [
        entry_name(fingerprint, positive_key(fingerprint, PARAMS, canon[i], 0))
        for i in range(len(anchors))
    ]


def _levels_apart(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(int) - b.astype(int)).max())


@pytest.mark.slow
def test_a_pool_on_a_cluster_spreads_a_request_and_repeats_it_from_the_cache(cluster, client):
    anchors = anchors_u8(24, seed=81_000)
    r, first = post_positives(client, anchors, PARAMS.model_dump())
    assert r.status_code == 200, r.text
    assert first.cache_hit.tolist() == [0] * 24
    names = _names(first.model, anchors)
    held = _placement(cluster, names)
    assert set().union(*held) == set(names)  # every positive written ...
    assert sum(1 for h in held if h) > 1  # ... over more than one master
    assert 0 < _ttl(cluster, names[0]) <= TTL_S  # with --cache-ttl
    with redis_sync.RedisCluster(host="127.0.0.1", port=cluster.nodes[0].port) as store:
        for i, name in enumerate(names):  # under the pool's MAC, as on one Redis
            assert np.array_equal(decode_value(store.get(name), name, MAC_KEY), first.positives[i])

    r, again = post_positives(client, anchors, PARAMS.model_dump())
    assert r.status_code == 200
    assert again.cache_hit.tolist() == [1] * 24
    assert again.positives.tobytes() == first.positives.tobytes()


@pytest.mark.slow
def test_a_tampered_value_on_one_node_is_a_miss_and_is_repaired(cluster, client, service):
    anchors = anchors_u8(6, seed=82_000)
    _, original = post_positives(client, anchors, PARAMS.model_dump())
    names = _names(original.model, anchors)
    held = _placement(cluster, names)
    owner = {name: i for i, h in enumerate(held) for name in h}
    white = np.full((16, 16, 1), 255, np.uint8)

    def plant(name: str, value: bytes) -> None:  # straight on the node that owns it
        with redis_sync.Redis(host="127.0.0.1", port=cluster.nodes[owner[name]].port) as node:
            node.set(name, value)

    source, copied, forged = names[0], names[1], names[2]
    # The source's valid value under the victim's name: its MAC is good, for another name.
    plant(copied, encode_value(original.positives[0], source, MAC_KEY))
    plant(forged, with_plain_checksum(white))  # well-formed, a valid unkeyed checksum
    untrusted0 = scrape(service.url)["clsp_cache_untrusted_total"]

    r, served = post_positives(client, anchors, PARAMS.model_dump())
    assert r.status_code == 200
    assert served.cache_hit.tolist() == [1, 0, 0, 1, 1, 1]  # neither planted value served
    assert scrape(service.url)["clsp_cache_untrusted_total"] == untrusted0 + 2
    assert _levels_apart(served.positives[1], original.positives[1]) <= 1  # its own positive
    assert _levels_apart(served.positives[1], original.positives[0]) > 1  # not the source's
    assert _levels_apart(served.positives[2], white) > 1
    with redis_sync.RedisCluster(host="127.0.0.1", port=cluster.nodes[0].port) as store:
        for i in (1, 2):  # overwritten with values of the pool's MAC
            name = names[i]
            assert np.array_equal(decode_value(store.get(name), name, MAC_KEY), served.positives[i])
    _, repaired = post_positives(client, anchors, PARAMS.model_dump())
    assert repaired.cache_hit.tolist() == [1] * 6
    assert repaired.positives.tobytes() == served.positives.tobytes()


@pytest.mark.slow
def test_a_killed_master_is_a_miss_for_its_keys_and_hits_resume_when_it_is_back(
    cluster, client, service
):
    anchors = anchors_u8(24, seed=83_000)
    _, first = post_positives(client, anchors, PARAMS.model_dump())
    names = _names(first.model, anchors)
    held = _placement(cluster, names)
    victim = max(range(3), key=lambda i: len(held[i]))
    on_victim = [name in held[victim] for name in names]
    assert 0 < sum(on_victim) < 24
    errors0 = scrape(service.url)["clsp_cache_errors_total"]
    cluster.nodes[victim].kill()
    try:
        for _ in range(2):  # the failing call, then the master's backoff
            r, down = post_positives(client, anchors, PARAMS.model_dump())
            assert r.status_code == 200, r.text
            assert down.cache_hit.tolist() == [int(not v) for v in on_victim]
            for i, lost in enumerate(on_victim):
                if lost:  # regenerated: the model's own positive for that key
                    assert _levels_apart(down.positives[i], first.positives[i]) <= 1
                else:  # still served by the masters that are up
                    assert np.array_equal(down.positives[i], first.positives[i])
        assert scrape(service.url)["clsp_cache_errors_total"] > errors0
    finally:
        cluster.restart(victim)  # its nodes.conf, its slots; its values are gone
    deadline = time.monotonic() + 30
    hits: list[int] = []
    while time.monotonic() < deadline and hits != [1] * 24:
        r, back = post_positives(client, anchors, PARAMS.model_dump())
        assert r.status_code == 200, r.text
        hits = back.cache_hit.tolist()
        time.sleep(0.2)
    assert hits == [1] * 24, "the restarted master's keys never hit again"
    assert all(
        _levels_apart(a, b) <= 1 for a, b in zip(back.positives, first.positives, strict=True)
    )


def test_a_redis_url_of_no_known_form_is_refused_naming_the_forms():
    from clsp_positives.service.settings import ServiceSettings

    assert ServiceSettings.from_env({}, model="m", redis="redis+cluster://h:7000").redis
    with pytest.raises(ValueError, match=r"--redis: .*redis\+cluster://"):
        ServiceSettings.from_env({}, model="m", redis="redis-cluster://h:7000")
    with pytest.raises(ValueError, match="only database 0"):
        ServiceSettings.from_env({}, model="m", redis="redis+cluster://h:7000/2")
