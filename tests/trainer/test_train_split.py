"""``--train-split train+unlabeled``: STL-10's contrastive pre-training on its labelled
and unlabeled images, its evaluation on the labelled train and test splits only.

torchvision's STL10 is replaced by a small stand-in of the same interface, so nothing
is downloaded (the real unlabeled split is 100,000 96x96 images, 2.7 GiB as uint8);
everything after it (clsp_positives.images, the training loop, the evaluation) is real.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest

from clsp_positives.images import load_images
from clsp_positives.trainer.config import TrainConfig
from clsp_positives.trainer.train_loop import evaluate_checkpoint, train

SIZES = {"train": 24, "test": 20, "unlabeled": 40}


class FakeSTL10:
    """``torchvision.datasets.STL10``'s interface: ``data`` uint8 NCHW 96x96, ``labels``
    (-1 for unlabeled images); a split joined by ``+`` is its parts in order."""

    splits: ClassVar[list[str]] = []  # every split asked for, in order

    def __init__(self, root: str, split: str = "train", download: bool = False) -> None:
        FakeSTL10.splits.append(split)
        data, labels = [], []
        for part in split.split("+"):
            rng = np.random.default_rng(list(SIZES).index(part))
            n = SIZES[part]
            data.append(rng.integers(0, 256, (n, 3, 96, 96), dtype=np.uint8))
            labels.append(np.full(n, -1) if part == "unlabeled" else rng.integers(0, 10, n))
        self.data = np.concatenate(data)
        self.labels = np.concatenate(labels)


@pytest.fixture
def fake_stl10(monkeypatch: pytest.MonkeyPatch) -> type[FakeSTL10]:
    from torchvision import datasets

    FakeSTL10.splits = []
    monkeypatch.setattr(datasets, "STL10", FakeSTL10)
    return FakeSTL10


def test_stl10_train_plus_unlabeled_is_the_train_images_then_the_unlabeled(
    tmp_path: Path, fake_stl10: type[FakeSTL10]
) -> None:
    both = load_images("stl10", split="train+unlabeled", root=str(tmp_path), size=16)
    train_set = load_images("stl10", split="train", root=str(tmp_path), size=16)
    assert fake_stl10.splits == ["train+unlabeled", "train"]
    assert both.images.shape == (SIZES["train"] + SIZES["unlabeled"], 16, 16, 3)
    np.testing.assert_array_equal(both.images[: SIZES["train"]], train_set.images)
    np.testing.assert_array_equal(both.labels[: SIZES["train"]], train_set.labels)
    assert (both.labels[SIZES["train"] :] == -1).all() and (train_set.labels >= 0).all()


def test_only_stl10_has_an_unlabeled_split(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"for stl10 also unlabeled or train\+unlabeled"):
        load_images("cifar10", split="train+unlabeled", root=str(tmp_path))


def _run_config(tmp_path: Path, **changes: Any) -> TrainConfig:
    return TrainConfig(
        dataset="stl10",
        data_root=str(tmp_path / "data"),
        image_size=16,
        backbone="resnet-tiny",
        proj_hidden_dim=32,
        proj_dim=16,
        epochs=1,
        batch_size=16,
        optimizer="adamw",
        linear_epochs=1,
        knn_k=5,
        device="cpu",
        progress=False,
        out=str(tmp_path / "run"),
        **changes,
    )


def _records(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.usefixtures("one_torch_thread")
def test_pretraining_uses_the_unlabeled_images_and_the_evaluation_the_labelled(
    tmp_path: Path, fake_stl10: type[FakeSTL10]
) -> None:
    config = _run_config(tmp_path, train_split="train+unlabeled", subset=30)
    result = train(config, echo=lambda line: None)
    start = _records(tmp_path / "run")[0]
    # --subset cuts the pre-training images: the 24 labelled, then 6 unlabeled.
    assert start["train_size"] == 30 and start["config"]["train_split"] == "train+unlabeled"
    assert result.final is not None
    assert (result.final.train_size, result.final.test_size) == (SIZES["train"], SIZES["test"])
    assert "train+unlabeled" in fake_stl10.splits and "test" in fake_stl10.splits
    # The checkpoint's evaluation rebuilds the run on the same images.
    again = evaluate_checkpoint(tmp_path / "run", device="cpu")
    assert (again.train_size, again.test_size) == (SIZES["train"], SIZES["test"])


@pytest.mark.usefixtures("one_torch_thread")
def test_the_default_split_pretrains_on_the_labelled_images_only(
    tmp_path: Path, fake_stl10: type[FakeSTL10]
) -> None:
    train(_run_config(tmp_path), echo=lambda line: None)
    assert _records(tmp_path / "run")[0]["train_size"] == SIZES["train"]
    assert "train+unlabeled" not in fake_stl10.splits and "unlabeled" not in fake_stl10.splits
