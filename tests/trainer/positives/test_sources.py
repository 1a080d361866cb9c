"""Positives sources: the no-op source, the pool source's splitting and checks, and
``build_source``'s choice (the offline .npy is tests/trainer/positives/test_offline.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from clsp_positives.proto.messages import ResponseArrays
from clsp_positives.proto.params import GenerationParams
from clsp_positives.trainer.positives.offline import OfflineNpySource
from clsp_positives.trainer.positives.sources import (
    NoSource,
    PoolSource,
    PositivesSource,
    _unpack,
    build_source,
)
from tests.support.stub_pool import counters, stub_positive, stub_server

PARAMS = GenerationParams(steps=3)


def batch(b: int, hw: int = 8, c: int = 3) -> np.ndarray:
    return np.random.default_rng(b).integers(0, 256, (b, hw, hw, c), dtype=np.uint8)


def test_build_source_opens_the_offline_npy(tmp_path: Path) -> None:
    path = tmp_path / "pos.npy"
    np.save(path, np.zeros((4, 2, 8, 8, 3), np.uint8))
    source = build_source(None, offline_npy=str(path), token=None, params=PARAMS)
    assert isinstance(source, OfflineNpySource) and isinstance(source, PositivesSource)
    source.close()


def test_no_source_masks_everything() -> None:
    source = build_source(None, offline_npy=None, token=None, params=PARAMS)
    assert isinstance(source, NoSource) and not source.enabled
    got, errors = source.submit(batch(4), np.arange(4), np.zeros(4, np.int64)).collect()
    assert errors == [] and not got.mask.any() and not got.images.any()


def test_build_source_refuses_two_sources(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not both"):
        build_source("http://127.0.0.1:1", offline_npy="x.npy", token=None, params=PARAMS)
    with pytest.raises(ValueError, match=r"params\.k"):
        build_source(
            "http://127.0.0.1:1", offline_npy=None, token=None, params=GenerationParams(k=2)
        )


def test_pool_source_splits_a_batch_and_reassembles_it_in_order() -> None:
    with stub_server() as server:
        source = build_source(server.url, offline_npy=None, token=None, params=PARAMS, chunk=3)
        assert isinstance(source, PoolSource)
        try:
            a = batch(8, hw=16, c=1)
            cands = np.arange(8) % 5
            pending = source.submit(a, np.arange(8), cands)
            assert len(pending.parts) == 3
            assert pending.wait(30)
            got, errors = pending.collect()
            assert errors == [] and got.mask.all()
            expected = np.stack([stub_positive(x, c) for x, c in zip(a, cands, strict=True)])
            np.testing.assert_array_equal(got.images, expected)
            assert got.cache_hits == 0
            again = source.submit(a, np.arange(8), cands)
            assert again.wait(30) and again.collect()[0].cache_hits == 8
            assert source.stats() == {"failovers": 0, "errors": 0, "retries": 0}
        finally:
            source.close()


def test_pool_answer_of_another_size_is_a_clear_error() -> None:
    answer = ResponseArrays(np.zeros((2, 32, 32, 3), np.uint8), np.zeros(2, np.uint8), "m", PARAMS)
    with pytest.raises(ValueError, match="GET /v1/model"):
        _unpack(answer, 2, (16, 16, 1))
    images, hits, arrived = _unpack(
        ResponseArrays(np.zeros((2, 16, 16, 1), np.uint8), np.array([1, 0], np.uint8), "m", PARAMS),
        2,
        (16, 16, 1),
    )
    assert images.shape == (2, 16, 16, 1) and hits == 1 and arrived is None
    # rows whose deadline passed in the pool did not arrive
    late = ResponseArrays(
        np.zeros((2, 16, 16, 1), np.uint8),
        np.zeros(2, np.uint8),
        "m",
        PARAMS,
        expired=np.array([0, 1], np.uint8),
    )
    assert _unpack(late, 2, (16, 16, 1))[2].tolist() == [True, False]


@pytest.mark.parametrize("pin_model", [True, False])
def test_pool_source_pins_the_model_of_its_first_positives(pin_model: bool) -> None:
    """A pool of two models (a rolling update): pinned, every positive after the first
    answer comes from that answer's model; with ``--allow-model-change`` both serve."""
    with (
        stub_server(STUB_FINGERPRINT="model-a") as a,
        stub_server(STUB_FINGERPRINT="model-b") as b,
    ):
        source = build_source(
            f"{a.url},{b.url}",
            offline_npy=None,
            token=None,
            params=PARAMS,
            chunk=2,
            pin_model=pin_model,
        )
        assert isinstance(source, PoolSource)
        try:
            first = source.submit(batch(2, hw=16, c=1), np.arange(2), np.zeros(2, np.int64))
            assert first.wait(30) and first.collect()[1] == []
            for i in range(6):  # 12 requests of 2 each time, in flight together
                pending = source.submit(batch(24, hw=16, c=1), np.arange(24), np.full(24, i))
                assert pending.wait(30)
                got, errors = pending.collect()
                assert errors == [] and got.mask.all()
            items = {"model-a": counters(a)["items"], "model-b": counters(b)["items"]}
            if pin_model:
                other = "model-b" if source.model == "model-a" else "model-a"
                assert source.model in items and items[other] <= 2, items
            else:
                assert source.model is None and min(items.values()) > 2, items
        finally:
            source.close()
