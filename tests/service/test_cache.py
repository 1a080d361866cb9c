"""Caches: the value format, the in-process LRU, and Redis (real redis-server) up,
slow, down and back."""

from __future__ import annotations

import asyncio
import signal
import time

import numpy as np
import pytest

from clsp_positives.service.cache import (
    CorruptValue,
    MemoryCache,
    RedisCache,
    decode_value,
    encode_value,
    entry_name,
)
from tests.support.servers import RedisServer

NS = "fp0"


def images(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (16, 16, 1), dtype=np.uint8) for _ in range(n)]


def keys(n: int, salt: int = 0) -> list[bytes]:
    return [bytes([salt]) + i.to_bytes(31, "little") for i in range(n)]


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


# ------------------------------------------------------------------ format


def test_value_round_trips_with_shape():
    img = images(1)[0]
    out = decode_value(encode_value(img))
    assert out.dtype == np.uint8 and out.shape == (16, 16, 1)
    assert np.array_equal(out, img)


@pytest.mark.parametrize(
    "damage", ["flip_data", "flip_shape", "truncate", "magic", "empty", "pickle"]
)
def test_damaged_values_are_detected(damage):
    blob = bytearray(encode_value(images(1)[0]))
    if damage == "flip_data":
        blob[-1] ^= 1
    elif damage == "flip_shape":
        blob[6] ^= 1
    elif damage == "truncate":
        blob = blob[:-3]
    elif damage == "magic":
        blob[0] ^= 0xFF
    elif damage == "empty":
        blob = bytearray()
    else:
        import pickle

        blob = bytearray(pickle.dumps(images(1)[0]))
    with pytest.raises(CorruptValue):
        decode_value(bytes(blob))


def test_only_uint8_is_cached():
    with pytest.raises(TypeError, match="uint8"):
        encode_value(np.zeros((2, 2), np.float32))


def test_entry_names_are_namespaced_per_model():
    k = keys(1)[0]
    assert entry_name("abc", k) == f"clsp:abc:{k.hex()}"
    assert entry_name("abc", k) != entry_name("abd", k)


# --------------------------------------------------------------- memory LRU


def test_memory_cache_hits_misses_and_namespaces():
    async def main():
        cache = MemoryCache(max_mb=1)
        imgs = images(3)
        await cache.set_many(NS, list(zip(keys(3), imgs, strict=True)), ttl_s=60)
        got = await cache.get_many(NS, [*keys(3), keys(1, salt=9)[0]])
        other = await cache.get_many("other-model", keys(1))
        return cache, imgs, got, other

    cache, imgs, got, other = run(main())
    assert all(np.array_equal(a, b) for a, b in zip(got[:3], imgs, strict=True))
    assert got[3] is None and other == [None]
    assert (cache.stats.hits, cache.stats.misses, cache.stats.writes) == (3, 2, 3)


def test_memory_cache_is_bounded_in_bytes_and_evicts_least_recently_used():
    async def main():
        cache = MemoryCache(max_mb=0.01)  # ~10 KB: room for ~20 values of 256 B + overhead
        ks, imgs = keys(100), images(100)
        await cache.set_many(NS, [(ks[0], imgs[0])], 60)
        for i in range(1, 100):
            await cache.get_many(NS, [ks[0]])  # keep the first one hot
            await cache.set_many(NS, [(ks[i], imgs[i])], 60)
        first, last, old = await cache.get_many(NS, [ks[0], ks[99], ks[1]])
        return cache, first, last, old

    cache, first, last, old = run(main())
    assert cache.size_bytes <= cache.max_bytes
    assert 10 < len(cache) < 100
    assert first is not None and last is not None and old is None


def test_memory_cache_expires_entries():
    async def main():
        cache = MemoryCache(max_mb=1)
        await cache.set_many(NS, [(keys(1)[0], images(1)[0])], ttl_s=1)
        cache._entries[entry_name(NS, keys(1)[0])] = (
            cache._entries[entry_name(NS, keys(1)[0])][0],
            time.monotonic() - 1,
        )
        return await cache.get_many(NS, keys(1)), cache

    got, cache = run(main())
    assert got == [None] and len(cache) == 0


def test_memory_cache_corrupt_value_is_a_counted_miss():
    async def main():
        cache = MemoryCache(max_mb=1)
        cache.put_raw(NS, keys(1)[0], b"CLSP\x01garbage")
        return await cache.get_many(NS, keys(1)), cache

    got, cache = run(main())
    assert got == [None] and cache.stats.corrupt == 1


# -------------------------------------------------------------------- Redis


def test_redis_round_trip_ttl_and_namespaces(redis_url, redis_server):
    async def main():
        cache = RedisCache(redis_url)
        imgs = images(4)
        await cache.set_many(NS, list(zip(keys(4), imgs, strict=True)), ttl_s=120)
        got = await cache.get_many(NS, [*keys(4), keys(1, salt=7)[0]])
        other = await cache.get_many("fp1", keys(2))
        await cache.close()
        return cache, imgs, got, other

    cache, imgs, got, other = run(main())
    assert all(np.array_equal(a, b) for a, b in zip(got[:4], imgs, strict=True))
    assert got[4] is None and other == [None, None]
    assert (cache.stats.hits, cache.stats.misses, cache.stats.errors) == (4, 3, 0)
    name = entry_name(NS, keys(4)[0])
    ttl = int(redis_server.command("TTL", name).strip().lstrip(b":"))
    assert 0 < ttl <= 120


def test_redis_corrupt_value_is_a_counted_miss_and_can_be_overwritten(redis_url):
    async def main():
        cache = RedisCache(redis_url)
        k, img = keys(1)[0], images(1)[0]
        good = encode_value(img)
        await cache.put_raw(NS, k, good[:-1] + bytes([good[-1] ^ 0x55]))
        first = await cache.get_many(NS, [k])
        await cache.set_many(NS, [(k, img)], 60)
        second = await cache.get_many(NS, [k])
        await cache.close()
        return cache, img, first, second

    cache, img, first, second = run(main())
    assert first == [None] and cache.stats.corrupt == 1
    assert np.array_equal(second[0], img)


def test_redis_down_serves_misses_counts_errors_and_recovers_after_backoff():
    server = RedisServer().start()
    try:

        async def main():
            cache = RedisCache(server.url, timeout_s=0.2, backoff_min_s=0.05, backoff_max_s=0.2)
            k, img = keys(2), images(2)
            await cache.set_many(NS, [(k[0], img[0])], 60)
            server.kill()
            t0 = time.monotonic()
            down = await cache.get_many(NS, k)
            await cache.set_many(NS, [(k[1], img[1])], 60)  # skipped or failed, never raises
            down_seconds = time.monotonic() - t0
            errors_while_down = cache.stats.errors
            server.start()
            for _ in range(100):  # backoff is at most 0.2 s
                await asyncio.sleep(0.05)
                await cache.set_many(NS, [(k[1], img[1])], 60)
                back = await cache.get_many(NS, k)
                if back[1] is not None:
                    break
            await cache.close()
            return cache, down, errors_while_down, back, down_seconds

        _, down, errors_while_down, back, down_seconds = run(main())
        assert down == [None, None]
        assert errors_while_down >= 1
        assert down_seconds < 5  # bounded by the socket timeout, not a hang
        assert back[1] is not None  # caching resumed without a new client
    finally:
        server.close()


def test_redis_slower_than_the_timeout_is_an_error_not_a_wait():
    server = RedisServer().start()
    try:

        async def main():
            cache = RedisCache(server.url, timeout_s=0.2)
            await cache.get_many(NS, keys(1))  # connect while Redis is responsive
            server.proc.send_signal(signal.SIGSTOP)  # a hung Redis: connected, silent
            try:
                t0 = time.monotonic()
                got = await cache.get_many(NS, keys(1))
                seconds = time.monotonic() - t0
            finally:
                server.proc.send_signal(signal.SIGCONT)
            await cache.close()
            return cache, got, seconds

        cache, got, seconds = run(main())
        assert got == [None] and cache.stats.errors == 1
        assert seconds < 5
    finally:
        server.close()
