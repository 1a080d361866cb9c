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
from tests.support.stub_pool import stub_positive, stub_server

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
    images, hits = _unpack(
        ResponseArrays(np.zeros((2, 16, 16, 1), np.uint8), np.array([1, 0], np.uint8), "m", PARAMS),
        2,
        (16, 16, 1),
    )
    assert images.shape == (2, 16, 16, 1) and hits == 1
