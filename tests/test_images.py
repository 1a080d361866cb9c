"""Data loaders of ``clsp_positives.images``: shapes, dtypes, split determinism, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clsp_positives.images import ImageSet, load_images


@pytest.fixture(scope="module")
def digits_train() -> ImageSet:
    return load_images("digits")


@pytest.fixture(scope="module")
def digits_test() -> ImageSet:
    return load_images("digits", split="test")


def test_digits_default_shape_dtype_and_range(digits_train: ImageSet) -> None:
    assert digits_train.images.shape[1:] == (16, 16, 1)
    assert digits_train.images.dtype == np.uint8
    assert digits_train.labels.dtype == np.int64
    assert digits_train.classes == 10
    assert digits_train.name == "digits"
    # Upsampled from 0..16 to the full uint8 range: dark background, bright strokes.
    assert digits_train.images.max() >= 250
    assert digits_train.images.min() == 0
    assert set(np.unique(digits_train.labels)) == set(range(10))


def test_digits_split_is_stratified_disjoint_and_complete(
    digits_train: ImageSet, digits_test: ImageSet
) -> None:
    assert len(digits_train) + len(digits_test) == 1797
    assert 0.18 < len(digits_test) / 1797 < 0.22
    train_frac = np.bincount(digits_train.labels) / len(digits_train)
    test_frac = np.bincount(digits_test.labels) / len(digits_test)
    np.testing.assert_allclose(train_frac, test_frac, atol=0.01)
    train_rows = {img.tobytes() for img in digits_train.images}
    overlap = sum(img.tobytes() in train_rows for img in digits_test.images)
    # A few digits in sklearn's set are exact duplicates of each other; a leak would be hundreds.
    assert overlap < 5


def test_digits_split_is_deterministic(digits_train: ImageSet) -> None:
    again = load_images("digits", split="train")
    np.testing.assert_array_equal(again.images, digits_train.images)
    np.testing.assert_array_equal(again.labels, digits_train.labels)


def test_digits_size_and_channels(digits_test: ImageSet) -> None:
    rgb = load_images("digits", split="test", size=32, channels=3)
    assert rgb.images.shape == (len(digits_test), 32, 32, 3)
    np.testing.assert_array_equal(rgb.images[..., 0], rgb.images[..., 2])
    native = load_images("digits", split="test", size=8)
    assert native.images.shape[1:] == (8, 8, 1)
    np.testing.assert_array_equal(native.labels, digits_test.labels)


def _write_folder(root: Path, classes: dict[str, list[tuple[int, int, int]]], side: int) -> None:
    for name, colours in classes.items():
        (root / name).mkdir(parents=True)
        for i, colour in enumerate(colours):
            Image.new("RGB", (side + i, side), colour).save(root / name / f"{i}.png")
    (root / "cat" / "notes.txt").write_text("not an image")


def test_image_folder_resizes_and_labels_by_sorted_class(tmp_path: Path) -> None:
    _write_folder(tmp_path, {"dog": [(0, 0, 255)], "cat": [(255, 0, 0), (0, 255, 0)]}, side=10)
    images = load_images(str(tmp_path), size=12)
    assert images.images.shape == (3, 12, 12, 3)
    assert images.classes == 2
    np.testing.assert_array_equal(images.labels, [0, 0, 1])  # cat=0, dog=1
    assert tuple(images.images[0, 6, 6]) == (255, 0, 0)
    assert tuple(images.images[2, 6, 6]) == (0, 0, 255)
    grey = load_images(str(tmp_path), size=12, channels=1)
    assert grey.images.shape == (3, 12, 12, 1)
    assert grey.images[0, 6, 6, 0] == 76  # 0.299 * 255, rounded


def test_image_folder_uses_train_and_test_subfolders(tmp_path: Path) -> None:
    _write_folder(tmp_path / "train", {"a": [(1, 2, 3)] * 2, "cat": [(9, 9, 9)]}, side=8)
    _write_folder(tmp_path / "test", {"a": [(1, 2, 3)], "cat": [(9, 9, 9)]}, side=8)
    assert len(load_images(str(tmp_path), split="train", size=8)) == 3
    assert len(load_images(str(tmp_path), split="test", size=8)) == 2


def test_missing_torchvision_root_names_the_options(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"--data-root.*--download"):
        load_images("cifar10", root=str(tmp_path))
    with pytest.raises(ValueError, match="--data-root"):
        load_images("cifar100")


def test_bad_names_and_options_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown dataset"):
        load_images("mnist-but-not-here")
    with pytest.raises(ValueError, match="channels"):
        load_images("digits", channels=2)
    with pytest.raises(ValueError, match="split"):
        load_images("digits", split="val")
    with pytest.raises(ValueError, match="no class sub-folders"):
        load_images(str(tmp_path))


# ---------------------------------------------------------------- digits-photos


@pytest.fixture(scope="module")
def photos_train() -> ImageSet:
    return load_images("digits-photos")


@pytest.fixture(scope="module")
def photos_test() -> ImageSet:
    return load_images("digits-photos", split="test")


def test_digits_photos_shape_dtype_and_name(photos_train: ImageSet) -> None:
    assert photos_train.images.shape[1:] == (32, 32, 3)
    assert photos_train.images.dtype == np.uint8
    assert photos_train.classes == 10
    assert photos_train.name == "digits-photos"
    # Colour photographs, not grey digits repeated over three channels.
    assert not np.array_equal(photos_train.images[..., 0], photos_train.images[..., 2])


def test_digits_photos_are_the_same_on_every_call(photos_train: ImageSet) -> None:
    again = load_images("digits-photos", split="train")
    np.testing.assert_array_equal(again.images, photos_train.images)
    np.testing.assert_array_equal(again.labels, photos_train.labels)


def test_digits_photos_hold_the_digits_split(
    photos_train: ImageSet,
    photos_test: ImageSet,
    digits_train: ImageSet,
    digits_test: ImageSet,
) -> None:
    np.testing.assert_array_equal(photos_train.labels, digits_train.labels)
    np.testing.assert_array_equal(photos_test.labels, digits_test.labels)
    # The two splits are composed with different draws, not the same backgrounds again.
    assert not np.array_equal(photos_train.images[:10], photos_test.images[:10])


def test_digits_photos_size_and_channels(photos_test: ImageSet) -> None:
    small = load_images("digits-photos", split="test", size=16)
    assert small.images.shape == (len(photos_test), 16, 16, 3)
    grey = load_images("digits-photos", split="test", size=16, channels=1)
    assert grey.images.shape == (len(photos_test), 16, 16, 1)
    np.testing.assert_array_equal(grey.labels, photos_test.labels)


def _border(images: np.ndarray) -> np.ndarray:
    """Mean colour of the outer two pixels of each image: mostly the photo behind the digit."""
    ring = np.ones(images.shape[1:3], dtype=bool)
    ring[2:-2, 2:-2] = False
    return images[:, ring].astype(np.float64).mean(axis=1) / 255.0


def test_digits_photos_backgrounds_vary_within_a_class(photos_train: ImageSet) -> None:
    zeros = photos_train.images[photos_train.labels == 0]
    # Crops are drawn independently, so two images of a class rarely share one exactly.
    assert len({img[:, :2].tobytes() for img in zeros}) >= 0.95 * len(zeros)
    # The spread of background colours within one class is wide (0..1 scale), not a tint.
    assert _border(zeros).std(axis=0).min() > 0.1


def _fit_score(
    train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray
) -> float:
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(C=0.1, max_iter=200).fit(train_x, train_y)
    return float(model.score(test_x, test_y))


def test_digits_photos_class_is_in_the_digit_not_the_background(
    photos_train: ImageSet, photos_test: ImageSet
) -> None:
    """The class is recoverable from where the image departs from its background, but the
    background colour says nothing about it: the nuisance is the background."""
    chance = 1.0 / photos_test.classes

    def contrast(split: str) -> np.ndarray:
        # Polarity-free (a digit may be darker or lighter than its photo): distance of each
        # pixel from the image's median colour, at 16x16.
        x = load_images("digits-photos", split=split, size=16).images.astype(np.float64) / 255.0
        median = np.median(x.reshape(len(x), -1, 3), axis=1)[:, None, None, :]
        return np.linalg.norm(x - median, axis=3).reshape(len(x), -1)

    digit = _fit_score(contrast("train"), photos_train.labels, contrast("test"), photos_test.labels)
    assert digit > 2 * chance
    background = _fit_score(
        _border(photos_train.images),
        photos_train.labels,
        _border(photos_test.images),
        photos_test.labels,
    )
    assert background < chance + 0.06
