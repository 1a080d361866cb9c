"""The offline ``.npy`` format (``trainer/positives/offline.py``): the reader indexes
rows and candidates and refuses files it cannot trust, and the writer fills a file
that the reader accepts, keeps its progress through a failure and resumes only the
missing rows. ``clsp generate`` around the writer is tests/trainer/test_generate_cli.py."""

from __future__ import annotations

import concurrent.futures
import json
from pathlib import Path

import numpy as np
import pytest

from clsp_positives.proto.messages import ResponseArrays
from clsp_positives.proto.params import GenerationParams
from clsp_positives.trainer.positives.offline import (
    OfflineNpySource,
    fill,
    finish,
    meta_path,
    open_output,
    progress_path,
    rows_done,
)

PARAMS = GenerationParams(steps=3, k=2)
META = {"dataset": "test", "split": "train", "params": json.loads(PARAMS.canonical())}


def paper_array(n: int = 10, k: int = 4) -> np.ndarray:
    """[N, K, H, W, C] where every pixel of row i, candidate c is 10*i + c."""
    values = (10 * np.arange(n)[:, None] + np.arange(k)[None, :]).astype(np.uint8)
    return np.broadcast_to(values[:, :, None, None, None], (n, k, 8, 8, 3)).copy()


def batch(b: int, hw: int = 8, c: int = 3) -> np.ndarray:
    return np.random.default_rng(b).integers(0, 256, (b, hw, hw, c), dtype=np.uint8)


# ---------------------------------------------------------------------- reader


def test_offline_source_indexes_rows_and_candidates_memory_mapped(tmp_path: Path) -> None:
    path = tmp_path / "pos.npy"
    np.save(path, paper_array())
    source = OfflineNpySource(path)
    assert isinstance(source.array, np.memmap) and source.k == 4
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
        ([0], [4], batch(1), "--k 4"),
        ([0], [0], batch(1, hw=16), "--image-size and --channels"),
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


# ---------------------------------------------------------------------- writer


class Pool:
    """Answers a chunk of anchors with K positives each at once: candidate c of an
    anchor is the anchor plus c; ``fail_from`` makes the n-th call onwards fail."""

    def __init__(self, k: int, fail_from: int | None = None) -> None:
        self.k = k
        self.fail_from = fail_from
        self.rows: list[int] = []

    def __call__(self, anchors: np.ndarray) -> concurrent.futures.Future[ResponseArrays]:
        fut: concurrent.futures.Future[ResponseArrays] = concurrent.futures.Future()
        if self.fail_from is not None and len(self.rows) >= self.fail_from:
            fut.set_exception(RuntimeError("the pool is down"))
            return fut
        self.rows.append(len(anchors))
        positives = np.stack([anchors + c for c in range(self.k)], axis=1)
        hits = np.zeros(len(anchors) * self.k, np.uint8)
        fut.set_result(ResponseArrays(positives, hits, "m", PARAMS))
        return fut


def images(n: int = 10) -> np.ndarray:
    """[N, 4, 4, 1] where every pixel of image i is 10 * i."""
    return np.broadcast_to((10 * np.arange(n, dtype=np.uint8))[:, None, None, None], (n, 4, 4, 1))


def write(out: Path, pool: Pool, *, batch_size: int = 3) -> dict[str, int]:
    shape = (10, 2, 4, 4, 1)
    array, done = open_output(out, shape, META)
    assert array is not None
    return fill(
        array,
        done,
        images(),
        pool,
        batch_size=batch_size,
        in_flight=1,
        progress_file=progress_path(out),
    )


def test_writer_fills_a_file_the_reader_then_accepts(tmp_path: Path) -> None:
    out = tmp_path / "deep" / "pos.npy"
    totals = write(out, Pool(k=2))
    assert totals == {"rows": 10, "cache_hits": 0}
    assert rows_done(out) == (10, 10)
    with pytest.raises(ValueError, match="incomplete"):
        OfflineNpySource(out)  # not finished yet: the sidecar is still there
    finish(out)
    assert rows_done(out) is None and json.loads(meta_path(out).read_text()) == META
    source = OfflineNpySource(out)
    pending = source.submit(np.zeros((3, 4, 4, 1), np.uint8), np.array([9, 0, 4]), np.ones(3))
    got, _ = pending.collect()
    assert got.images[:, 0, 0, 0].tolist() == [91, 1, 41]
    source.close()
    array, done = open_output(out, (10, 2, 4, 4, 1), META)
    assert array is None and done.all()  # complete: nothing to do


def test_writer_keeps_progress_through_a_failure_and_resumes_only_missing_rows(
    tmp_path: Path,
) -> None:
    out = tmp_path / "pos.npy"
    with pytest.raises(RuntimeError, match="the pool is down"):
        write(out, Pool(k=2, fail_from=2))  # two chunks of 3 rows, then failures
    assert rows_done(out) == (6, 10)
    again = Pool(k=2)
    assert write(out, again)["rows"] == 4
    assert sum(again.rows) == 4  # the six rows already on disk were not asked for
    finish(out)
    source = OfflineNpySource(out)
    expected = (10 * np.arange(10))[:, None] + np.arange(2)[None, :]
    assert source.array[:, :, 0, 0, 0].tolist() == expected.tolist()
    source.close()


def test_writer_refuses_a_file_made_with_other_options(tmp_path: Path) -> None:
    out = tmp_path / "pos.npy"
    write(out, Pool(k=2))
    other = {**META, "split": "test"}
    with pytest.raises(ValueError, match=r"split: 'train' there, 'test' now"):
        open_output(out, (10, 2, 4, 4, 1), other)
    meta_path(out).unlink()
    with pytest.raises(ValueError, match=r"it has no pos\.npy\.meta\.json"):
        open_output(out, (10, 2, 4, 4, 1), META)


# ---------------------------------------------------------------- its model


def test_offline_source_checks_the_model_its_bank_names(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A bank made by another model than the run expects is refused, naming both and the
    way out; one that does not say is taken with one warning; none expected, none checked."""
    path = tmp_path / "pos.npy"
    np.save(path, paper_array())
    with caplog.at_level("WARNING"):
        assert OfflineNpySource(path, expect_model="model-a").model is None
    [warning] = [r.getMessage() for r in caplog.records]
    assert "do not name the model" in warning and "model-a" in warning
    caplog.clear()

    meta_path(path).write_text(json.dumps({**META, "model": "model-a"}))
    with caplog.at_level("WARNING"):
        assert OfflineNpySource(path).model == "model-a"
        assert OfflineNpySource(path, expect_model="model-a").model == "model-a"
    assert caplog.records == []
    with pytest.raises(ValueError, match=r"made by model model-a.*expects model model-b") as e:
        OfflineNpySource(path, expect_model="model-b")
    assert "--allow-model-change" in str(e.value) and "--expect-model" in str(e.value)
