"""Faults across the whole stack: two real ``clsp serve`` generators (the tiny model)
sharing one Redis, and the trainer's real pool client and prefetcher.

* A generator SIGKILLed while it is sampling a batch: the trainer's requests to
  it fail over to the other generator and every positive of every batch
  arrives, equal to what the model makes for those keys.
* Cache entries damaged in Redis in ways other than the one flipped byte of
  tests/system/test_service_faults.py (garbage, truncation, an empty value, a pickle,
  a well-formed value of the wrong shape): never served, regenerated and
  overwritten, so the pool's other generator then hits the repaired entry.

The slow generator (the deadline holds), clients that hang up and a full
queue are covered in tests/trainer/positives/test_prefetch.py and
tests/system/test_service_faults.py.
"""

from __future__ import annotations

import contextlib
import pickle
import time

import httpx
import numpy as np
import pytest
import redis as redis_sync

from clsp_positives.proto.keys import canonical_anchors, positive_key
from clsp_positives.proto.params import GenerationParams
from clsp_positives.service.cache import cache_secret, decode_value, encode_value, entry_name
from clsp_positives.trainer.positives.prefetch import Prefetcher
from clsp_positives.trainer.positives.sources import build_source
from tests.support.service import anchors_u8, clsp_serve, post_positives, running, scrape

pytestmark = pytest.mark.slow

B = 8  # anchors per training batch
SLOW = GenerationParams(steps=12, eta=0.1)  # long enough batches to be killed inside one
FAST = GenerationParams(steps=2, eta=0.1)
CLIENT = {"health_interval_s": 0.2, "breaker_cooldown_s": 0.5, "backoff_s": 0.02}
SECRET = "faults-pool-secret"  # one cache secret: the two generators share entries
MAC_KEY = cache_secret(SECRET, None).key


@pytest.fixture(scope="module")
def pool(tiny_model_dir, own_redis):
    servers = [
        clsp_serve(tiny_model_dir, own_redis.url, env={"CLSP_CACHE_SECRET": SECRET})
        for _ in range(2)
    ]
    with running(servers) as started:
        yield started


@pytest.fixture(scope="module")
def generator(tiny_model_dir):
    from clsp_positives.service.sampling.generator import PositivesGenerator

    return PositivesGenerator.from_dir(tiny_model_dir)


def _batch(batch_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    anchors = anchors_u8(B, seed=50_000 + batch_id)
    return anchors, np.arange(B) + B * batch_id, np.arange(B, dtype=np.int64) % 3


@contextlib.contextmanager
def one_torch_thread():
    """Sample in this process on one thread: two OpenMP threads on a busy two-core
    machine spin against the servers and run many times slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _levels_apart(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(int) - b.astype(int)).max())


# ------------------------------------------------------------------ corruption


def _damage(good: bytes, how: str, name: str) -> bytes:
    if how == "garbage":
        return b"\x89PNG not ours at all" * 3
    if how == "truncated":
        return good[: len(good) // 2]
    if how == "empty":
        return b""
    if how == "pickle":
        return pickle.dumps(decode_value(good, name, MAC_KEY))
    if how == "wrong shape, valid checksum":  # even with the pool's own secret
        return encode_value(np.full((8, 8, 1), 255, np.uint8), name, MAC_KEY)
    raise ValueError(how)


@pytest.mark.parametrize(
    "how", ["garbage", "truncated", "empty", "pickle", "wrong shape, valid checksum"]
)
def test_damaged_entry_is_never_served_and_is_repaired_for_the_whole_pool(pool, own_redis, how):
    first, second = pool
    anchors = anchors_u8(1, seed=60_000 + len(how))
    params = FAST.model_dump()
    with (
        httpx.Client(base_url=first.url, timeout=120) as a,
        httpx.Client(base_url=second.url, timeout=120) as b,
    ):
        _, original = post_positives(a, anchors, params)
        fp = original.model
        name = entry_name(fp, positive_key(fp, FAST, canonical_anchors(anchors)[0], 0))
        store = redis_sync.Redis.from_url(own_redis.url)
        try:
            good = store.get(name)
            assert good is not None and decode_value(good, name, MAC_KEY).shape == (16, 16, 1)
            store.set(name, _damage(good, how, name))
            r, served = post_positives(b, anchors, params)  # the other generator reads it
            assert r.status_code == 200
            assert served.cache_hit.tolist() == [0]  # never served as a hit
            assert served.positives.shape == (1, 16, 16, 1)
            assert _levels_apart(served.positives, original.positives) <= 1
            repaired = store.get(name)
            repaired_image = decode_value(repaired, name, MAC_KEY)
            assert np.array_equal(repaired_image, served.positives[0])  # overwritten
            _, again = post_positives(a, anchors, params)
            assert again.cache_hit.tolist() == [1]
            assert np.array_equal(again.positives, served.positives)
        finally:
            store.close()


# ---------------------------------------------------------------- SIGKILL


def test_generator_sigkilled_mid_batch_trainer_fails_over_and_loses_nothing(pool, generator):
    doomed, survivor = pool
    batches = 3
    source = build_source(
        f"{doomed.url},{survivor.url}",
        offline_npy=None,
        token=None,
        params=SLOW,
        timeout_s=120,
        chunk=B // 2,
        client_options=CLIENT,
    )
    # One generous deadline per batch (no rationing): what arrives is what the
    # pool client delivered by itself, failover included.
    with Prefetcher(
        source, lookahead=batches, deadline_ms=300_000, strict=False, wait_share=None
    ) as pf:
        for b in range(batches):
            pf.submit(b, *_batch(b))
        deadline = time.monotonic() + 120  # bound only: the doomed one gets work at once
        while scrape(doomed.url)["clsp_items_in_flight"] == 0:
            assert time.monotonic() < deadline, "the doomed generator never started a batch"
            time.sleep(0.02)
        doomed.kill()  # SIGKILL while its sampler runs a batch
        got = [pf.take(b) for b in range(batches)]
        stats = pf.epoch_stats()
    print("\nprefetcher after the SIGKILL:", stats)
    assert doomed.proc.poll() is not None
    assert stats["positive_fraction"] == 1.0, stats
    assert stats["failovers"] >= 1 and stats["errors"] >= 1, stats
    for b, batch in enumerate(got):
        anchors, _, candidates = _batch(b)
        assert batch.mask.all(), f"batch {b} lost positives"
        with one_torch_thread():
            expected = generator.positives(anchors, candidates, SLOW)
        assert _levels_apart(batch.images, expected) <= 1, f"batch {b}"
    assert scrape(survivor.url)["clsp_positives_generated_total"] > 0
