"""Positives sources: the offline .npy layout, the no-op source, the pool source's
splitting and checks, and ``build_source``'s choice."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from clsp_positives.proto.messages import ResponseArrays
from clsp_positives.proto.params import GenerationParams
from clsp_positives.trainer.positives.sources import (
    NoSource,
    OfflineNpySource,
    PoolSource,
    PositivesSource,
    _unpack,
    build_source,
    progress_path,
)
from tests.support.stub_pool import stub_positive, stub_server

PARAMS = GenerationParams(steps=3)


def paper_array(n: int = 10, k: int = 4) -> np.ndarray:
    """[N, K, H, W, C] where every pixel of row i, candidate c is 10*i + c."""
    values = (10 * np.arange(n)[:, None] + np.arange(k)[None, :]).astype(np.uint8)
    return np.broadcast_to(values[:, :, None, None, None], (n, k, 8, 8, 3)).copy()


def batch(b: int, hw: int = 8, c: int = 3) -> np.ndarray:
    return np.random.default_rng(b).integers(0, 256, (b, hw, hw, c), dtype=np.uint8)


def test_offline_source_indexes_rows_and_candidates_memory_mapped(tmp_path: Path) -> None:
    path = tmp_path / "pos.npy"
    np.save(path, paper_array())
    source = build_source(None, offline_npy=str(path), token=None, params=PARAMS)
    assert isinstance(source, OfflineNpySource) and isinstance(source, PositivesSource)
    assert isinstance(source.array, np.memmap) and source.num_candidates == 4
    indices, cands = np.array([7, 2, 9]), np.array([3, 0, 1])
    got, errors = source.submit(batch(3), indices, cands).collect()
    assert errors == [] and got.mask.all() and got.cache_hits == 0
    assert got.images[:, 0, 0, 0].tolist() == [73, 20, 91]
    assert got.images.shape == (3, 8, 8, 3)
    source.close()


@pytest.mark.parametrize(
    ("indices", "cands", "anchors", "message"),
    [
        ([10], [0], batch(1), "outside the 10 rows"),
        ([0], [4], batch(1), "--candidates 4"),
        ([0], [0], batch(1, hw=16), "--size and --channels"),
        ([0, 1], [0], batch(2), "shape"),
    ],
)
def test_offline_source_names_what_to_fix(
    tmp_path: Path, indices, cands, anchors, message: str
) -> None:
    path = tmp_path / "pos.npy"
    np.save(path, paper_array())
    source = OfflineNpySource(path)
    with pytest.raises(ValueError, match=message):
        source.submit(anchors, np.array(indices), np.array(cands))


def test_offline_source_refuses_missing_wrong_and_unfinished_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="clsp generate"):
        OfflineNpySource(tmp_path / "nope.npy")
    np.save(tmp_path / "flat.npy", np.zeros((4, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match=r"\[N, K, H, W, C\]"):
        OfflineNpySource(tmp_path / "flat.npy")
    np.save(tmp_path / "half.npy", paper_array())
    np.save(progress_path(tmp_path / "half.npy"), np.array([True] * 4 + [False] * 6))
    with pytest.raises(ValueError, match=r"incomplete \(4 of 10"):
        OfflineNpySource(tmp_path / "half.npy")


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
