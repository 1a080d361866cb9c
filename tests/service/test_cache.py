"""Caches: the value format and its MAC, the in-process LRU, and Redis (real
redis-server) up, slow, down and back, shared by caches with one secret or two."""

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
    UntrustedValue,
    cache_secret,
    decode_value,
    encode_value,
    entry_name,
)
from tests.support.forgery import first_format, with_plain_checksum
from tests.support.servers import RedisServer

NS = "fp0"
MAC_KEY = cache_secret("test-pool-secret", None).key
NAME = "clsp:fp0:00ff"


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
    out = decode_value(encode_value(img, NAME, MAC_KEY), NAME, MAC_KEY)
    assert out.dtype == np.uint8 and out.shape == (16, 16, 1)
    assert np.array_equal(out, img)


@pytest.mark.parametrize(
    "damage", ["flip_data", "flip_shape", "truncate", "magic", "empty", "pickle"]
)
def test_damaged_values_are_detected(damage):
    blob = bytearray(encode_value(images(1)[0], NAME, MAC_KEY))
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
        decode_value(bytes(blob), NAME, MAC_KEY)


@pytest.mark.parametrize(
    "attack", ["other name", "other secret", "plain checksum", "first format", "from a token"]
)
def test_a_value_is_only_good_under_its_own_name_and_secret(attack):
    img = images(1)[0]
    other_key = cache_secret("another pool", None).key
    if attack == "other name":  # a valid value copied under another key
        blob, name, key = encode_value(img, NAME, MAC_KEY), "clsp:fp0:00fe", MAC_KEY
    elif attack == "other secret":  # another pool's entry
        blob, name, key = encode_value(img, NAME, other_key), NAME, MAC_KEY
    elif attack == "plain checksum":
        blob, name, key = with_plain_checksum(img), NAME, MAC_KEY
    elif attack == "first format":
        blob, name, key = first_format(img), NAME, MAC_KEY
    else:  # a secret equal to a token still gives another key
        blob, name, key = (
            encode_value(img, NAME, cache_secret(None, "test-pool-secret").key),
            NAME,
            MAC_KEY,
        )
    with pytest.raises(CorruptValue) as caught:
        decode_value(blob, name, key)
    assert isinstance(caught.value, UntrustedValue) == (attack != "first format")


def test_the_secret_comes_from_the_variable_then_the_token_then_chance():
    by_secret, by_token = cache_secret("s", "t"), cache_secret(None, "t")
    assert by_secret.source == "CLSP_CACHE_SECRET" and by_token.source == "the API token"
    assert by_secret.key == cache_secret("s", None).key != by_token.key
    assert by_token.key == cache_secret("", "t").key  # an empty variable is unset
    first, second = cache_secret(None, None), cache_secret(None, None)
    assert first.key != second.key and "random" in first.source
    assert len({by_secret.key, by_token.key, first.key}) == 3
    assert all(len(s.key) == 32 for s in (by_secret, by_token, first))
    assert by_secret.key.hex() not in repr(by_secret)  # never the key in a log line


def test_only_uint8_images_and_float32_latents_are_cached():
    for dtype in (np.float64, np.float16, np.int64):
        with pytest.raises(TypeError, match="uint8 images and float32 latents"):
            encode_value(np.zeros((2, 2), dtype), NAME, MAC_KEY)


def test_latent_values_round_trip_and_say_what_they_are():
    latents = np.random.default_rng(0).normal(size=(4, 8, 8)).astype(np.float32)
    blob = encode_value(latents, NAME, MAC_KEY)
    back = decode_value(blob, NAME, MAC_KEY)
    assert back.dtype == np.float32 and np.array_equal(back, latents)
    # the kind is part of the MACed header: relabelling float bytes as pixels fails
    relabelled = b"CLSP\x02" + blob[5:]
    with pytest.raises(CorruptValue):
        decode_value(relabelled, NAME, MAC_KEY)
    image = np.zeros((4, 8, 8), np.uint8)
    assert decode_value(encode_value(image, NAME, MAC_KEY), NAME, MAC_KEY).dtype == np.uint8


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


def test_memory_cache_refuses_a_value_moved_to_another_key():
    async def main():
        cache = MemoryCache(max_mb=1)
        await cache.set_many(NS, [(keys(1)[0], images(1)[0])], ttl_s=60)
        moved = cache._entries[entry_name(NS, keys(1)[0])][0]
        cache.put_raw(NS, keys(1, salt=1)[0], moved)
        return await cache.get_many(NS, [keys(1, salt=1)[0], keys(1)[0]]), cache

    (moved, original), cache = run(main())
    assert moved is None and original is not None
    assert (cache.stats.corrupt, cache.stats.untrusted, cache.stats.hits) == (1, 1, 1)


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
        cache = RedisCache(redis_url, mac_key=MAC_KEY)
        k, img = keys(1)[0], images(1)[0]
        good = encode_value(img, entry_name(NS, k), MAC_KEY)
        await cache.put_raw(NS, k, good[:-1] + bytes([good[-1] ^ 0x55]))
        first = await cache.get_many(NS, [k])
        await cache.set_many(NS, [(k, img)], 60)
        second = await cache.get_many(NS, [k])
        await cache.close()
        return cache, img, first, second

    cache, img, first, second = run(main())
    assert first == [None] and cache.stats.corrupt == 1 and cache.stats.untrusted == 1
    assert np.array_equal(second[0], img)


def test_redis_caches_share_entries_only_with_the_same_secret(redis_url):
    """Two caches of one pool (one secret) and one of another pool, on one Redis:
    the pool shares entries, the other pool never reads them, and an entry copied
    under another key or forged with a plain checksum is a counted miss that the
    next write replaces."""
    ns = "fp-share"
    ks, imgs = keys(3, salt=40), images(3, seed=40)

    async def main():
        one, two = RedisCache(redis_url, mac_key=MAC_KEY), RedisCache(redis_url, mac_key=MAC_KEY)
        stranger = RedisCache(redis_url, mac_key=cache_secret("another pool", None).key)
        await one.set_many(ns, [(ks[0], imgs[0])], 60)
        shared = await two.get_many(ns, [ks[0]])
        foreign = await stranger.get_many(ns, [ks[0]])
        await one.put_raw(ns, ks[1], encode_value(imgs[0], entry_name(ns, ks[0]), MAC_KEY))
        await one.put_raw(ns, ks[2], with_plain_checksum(imgs[0]))
        attacked = await two.get_many(ns, ks[1:])
        await two.set_many(ns, list(zip(ks[1:], imgs[1:], strict=True)), 60)
        repaired = await one.get_many(ns, ks[1:])
        for c in (one, two, stranger):
            await c.close()
        return two, stranger, shared, foreign, attacked, repaired

    two, stranger, shared, foreign, attacked, repaired = run(main())
    assert np.array_equal(shared[0], imgs[0]) and foreign == [None]
    assert attacked == [None, None]
    assert (two.stats.untrusted, two.stats.corrupt, two.stats.misses) == (2, 2, 2)
    assert stranger.stats.untrusted == 1
    assert all(np.array_equal(a, b) for a, b in zip(repaired, imgs[1:], strict=True))


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
