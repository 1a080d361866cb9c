"""Cache entries bound to their key and keyed by the pool's secret, over a real
Redis shared by real ``clsp serve`` processes (docs/design.md §7,
docs/reliability.md §4): two generators of one pool (one ``CLSP_CACHE_SECRET``)
and one generator of another pool (another secret), all on one Redis.

* An entry copied under another key, one forged with a valid plain checksum and
  one in the first, unkeyed value format are never served by the pool: each is
  a miss counted in ``/metrics``, regenerated and overwritten, and the other
  generator of the pool then hits the repaired entry.
* The two pools never serve each other's entries.
"""

from __future__ import annotations

import httpx
import numpy as np
import pytest
import redis as redis_sync

from clsp_positives.proto.keys import canonical_anchors, positive_key
from clsp_positives.proto.params import GenerationParams
from clsp_positives.service.cache import cache_secret, decode_value, entry_name
from tests.support.forgery import first_format, with_plain_checksum
from tests.support.service import anchors_u8, clsp_serve, post_positives, running, scrape

pytestmark = pytest.mark.slow

PARAMS = GenerationParams(steps=2, eta=0.1)
POOL_SECRET = "pool-one-secret-3b9e"
OTHER_SECRET = "pool-two-secret-a41c"


@pytest.fixture(scope="module")
def generators(tiny_model_dir, own_redis):
    """Two generators of one pool and one of another pool, on one Redis."""
    servers = [
        clsp_serve(tiny_model_dir, own_redis.url, env={"CLSP_CACHE_SECRET": secret})
        for secret in (POOL_SECRET, POOL_SECRET, OTHER_SECRET)
    ]
    with running(servers) as started:
        yield started


@pytest.fixture()
def store(own_redis):
    client = redis_sync.Redis.from_url(own_redis.url)
    yield client
    client.close()


def _names(fingerprint: str, anchors: np.ndarray) -> list[str]:
    canon = canonical_anchors(anchors)
    return [
        entry_name(fingerprint, positive_key(fingerprint, PARAMS, canon[i], 0))
        for i in range(len(anchors))
    ]


def _levels_apart(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(int) - b.astype(int)).max())


def test_copied_and_forged_entries_are_never_served_by_the_pool(generators, store):
    first, second, _ = generators
    params = PARAMS.model_dump()
    source, victim = anchors_u8(2, seed=71_000)
    fresh = anchors_u8(2, seed=71_100)  # two anchors nobody has asked for yet
    anchors = np.stack([victim, *fresh])
    with (
        httpx.Client(base_url=first.url, timeout=120) as a,
        httpx.Client(base_url=second.url, timeout=120) as b,
    ):
        _, original = post_positives(a, np.stack([source, victim]), params)
        fp = original.model
        source_name, victim_name = _names(fp, np.stack([source, victim]))
        names = _names(fp, anchors)
        key = cache_secret(POOL_SECRET, None).key
        white = np.full((16, 16, 1), 255, np.uint8)
        # The source's valid entry, copied under the victim's key: its MAC is good,
        # but for another name.
        store.set(victim_name, store.get(source_name))
        store.set(names[1], with_plain_checksum(white))  # well-formed, valid checksum
        store.set(names[2], first_format(white))  # the old unkeyed format
        before = scrape(second.url)

        r, served = post_positives(b, anchors, params)  # the pool's other generator
        after = scrape(second.url)
        assert r.status_code == 200
        assert served.cache_hit.tolist() == [0, 0, 0]  # none of the planted values served
        assert _levels_apart(served.positives[0], original.positives[1]) <= 1  # the victim's own
        assert _levels_apart(served.positives[0], original.positives[0]) > 1  # not the source's
        assert all(_levels_apart(served.positives[i], white) > 1 for i in (1, 2))
        assert after["clsp_cache_untrusted_total"] - before["clsp_cache_untrusted_total"] == 2
        assert after["clsp_cache_corrupt_total"] - before["clsp_cache_corrupt_total"] == 3
        for i, name in enumerate(names):  # overwritten by the fresh results
            assert np.array_equal(decode_value(store.get(name), name, key), served.positives[i])

        _, again = post_positives(a, anchors, params)
    assert again.cache_hit.tolist() == [1, 1, 1]
    assert np.array_equal(again.positives, served.positives)


def test_two_pools_with_different_secrets_never_serve_each_others_entries(generators, store):
    first, second, stranger = generators
    params = PARAMS.model_dump()
    anchors = anchors_u8(2, seed=72_000)
    with (
        httpx.Client(base_url=first.url, timeout=120) as a,
        httpx.Client(base_url=second.url, timeout=120) as b,
        httpx.Client(base_url=stranger.url, timeout=120) as other,
    ):
        _, mine = post_positives(a, anchors, params)
        names = _names(mine.model, anchors)
        written_by_pool = [store.get(n) for n in names]
        untrusted0 = scrape(stranger.url)["clsp_cache_untrusted_total"]
        _, theirs = post_positives(other, anchors, params)
        assert theirs.cache_hit.tolist() == [0, 0]  # the same model, but not its pool
        assert scrape(stranger.url)["clsp_cache_untrusted_total"] == untrusted0 + 2
        assert [store.get(n) for n in names] != written_by_pool  # it wrote its own
        _, theirs_again = post_positives(other, anchors, params)
        _, ours = post_positives(b, anchors, params)  # the first pool, after the stranger
    assert theirs_again.cache_hit.tolist() == [1, 1]
    assert ours.cache_hit.tolist() == [0, 0]
    key = cache_secret(POOL_SECRET, None).key
    for i, name in enumerate(names):  # the pool took its entries back
        assert np.array_equal(decode_value(store.get(name), name, key), ours.positives[i])
        assert _levels_apart(ours.positives[i], theirs.positives[i]) <= 1  # one model
