"""Image data sets as plain numpy arrays (uint8 NHWC), shared by the DDPM trainer and the
contrastive trainer.

Everything here is loaded into memory: the data sets this project targets (digits, CIFAR,
STL-10 at small sizes) fit, and whole-array batches make augmentation on the training device
cheap. An image folder larger than memory is streamed instead by both trainers
(``clsp_positives.streamed``, docs/training.md "Large data sets"), which reads it
through ``scan_image_folder`` and ``read_rgb`` so that both paths see the same images.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

SPLITS = ("train", "test")
STL10_UNLABELED_SPLITS = ("unlabeled", "train+unlabeled")
"""STL-10's extra splits: its 100,000 unlabeled 96x96 images (label -1), alone or after the
5,000 labelled training images, the set contrastive pre-training on STL-10 uses."""
TORCHVISION_SETS = ("cifar10", "cifar100", "stl10")
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0
DIGITS_DEFAULT_SIZE = 16
DIGIT_SETS = ("digits", "digits-photos")
"""Sets whose class is a handwritten digit: a mirrored image is not of the same class."""
DIGITS_PHOTOS_SIZE = 32
DIGITS_PHOTOS_SEED = 20240617
"""Seed of the composition of "digits-photos" (mixed with the split), fixed so that every call
on every machine builds the same images (docs/design.md §2)."""
DIGITS_PHOTOS_PATCH = (18, 30)
"""Side of the digit patch on the 32x32 canvas, inclusive range (the 8x8 digit, upscaled)."""
DIGITS_PHOTOS_PHOTO_HEIGHTS = (64, 112, 200)
"""Heights the photos are scaled to before a 32x32 crop: coarse to fine background texture."""
DIGITS_PHOTOS_COLOURS = 16
"""Random colours drawn per image; the one farthest from the background under the digit wins."""


@dataclass(frozen=True)
class ImageSet:
    """A labelled image set; item ``i`` is ``(images[i], labels[i])`` and ``i`` is its index."""

    images: np.ndarray  # uint8 [N, H, W, C]
    labels: np.ndarray  # int64 [N]; -1 where a set has no label (STL-10 unlabeled)
    classes: int
    name: str

    def __post_init__(self) -> None:
        if self.images.dtype != np.uint8 or self.images.ndim != 4:
            raise ValueError(
                f"images must be uint8 [N, H, W, C], got {self.images.dtype} {self.images.shape}"
            )
        if self.labels.dtype != np.int64 or self.labels.shape != (len(self.images),):
            raise ValueError(
                f"labels must be int64 [{len(self.images)}], got {self.labels.dtype} "
                f"{self.labels.shape}"
            )

    def __len__(self) -> int:
        return len(self.images)

    @property
    def size(self) -> int:
        return int(self.images.shape[1])

    def anchors(self, indices: np.ndarray) -> np.ndarray:
        """The images at ``indices`` (uint8 [B, H, W, C], a copy): what the positives
        feed sends the pool, asked of the in-memory and the streamed set alike."""
        return self.images[np.asarray(indices, dtype=np.int64)]

    @property
    def channels(self) -> int:
        return int(self.images.shape[3])


def load_images(
    name: str,
    *,
    split: str = "train",
    size: int | None = None,
    channels: int | None = None,
    root: str | None = None,
    download: bool = False,
) -> ImageSet:
    """Load a data set by name ("digits", "digits-photos", "cifar10", "cifar100", "stl10") or
    image-folder path.

    ``size`` resizes to ``size x size`` (default: the set's native size; 16 for digits, 32 for
    digits-photos);
    ``channels`` is 1 (luminance) or 3 (RGB; grey images are repeated).
    """
    if split not in SPLITS and not (name.lower() == "stl10" and split in STL10_UNLABELED_SPLITS):
        raise ValueError(
            f"split must be one of {SPLITS} (for stl10 also {' or '.join(STL10_UNLABELED_SPLITS)}"
            f"), got {split!r}"
        )
    if size is not None and size < 1:
        raise ValueError(f"size must be positive, got {size}")
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    key = name.lower()
    if key == "digits":
        images, labels, classes = _digits(split, size or DIGITS_DEFAULT_SIZE)
    elif key == "digits-photos":
        images, labels = _digits_photos(split)
        classes = 10
    elif key in TORCHVISION_SETS:
        images, labels, classes = _torchvision_set(key, split, root, download)
    else:
        folder = Path(name)
        if not folder.is_dir():
            raise ValueError(
                f"unknown dataset {name!r}: use digits, digits-photos, cifar10, cifar100, stl10 "
                "or the path of "
                "an image folder with one sub-folder per class"
            )
        images, labels, classes = _image_folder(folder, split, size)
        key = str(folder)
    images = _resize(images, size)
    images = to_channels(images, channels)
    return ImageSet(np.ascontiguousarray(images), labels.astype(np.int64), classes, key)


def _digits(split: str, size: int) -> tuple[np.ndarray, np.ndarray, int]:
    raw, labels = _digits_split(split)
    # 0..16 -> 0..255 before resizing, so the interpolation works on the final value range.
    small = np.rint(raw * (255.0 / 16.0)).astype(np.uint8)[..., None]
    return _resize(small, size), labels, 10


def _digits_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 digits (float 0..16) of one split, and their labels: one split shared
    by "digits" and "digits-photos", so the two sets hold the same digits in the same order."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    index = np.arange(len(data.images))
    train_idx, test_idx = train_test_split(
        index,
        test_size=DIGITS_TEST_FRACTION,
        stratify=data.target,
        random_state=DIGITS_SPLIT_SEED,
    )
    chosen = np.sort(train_idx if split == "train" else test_idx)
    return data.images[chosen], data.target[chosen].astype(np.int64)


def _digits_photos(split: str) -> tuple[np.ndarray, np.ndarray]:
    """The digits of ``split``, each drawn in its own colour over a crop of a photograph.

    The class is the digit; background, colour, position and scale are nuisances drawn
    independently of it. This is the case CLSP's synthetic positives are meant for: an
    augmentation cannot tell a digit from the photo behind it, a generated positive of the same
    image keeps the digit and changes the rest (docs/design.md §1). The photos are the two that
    scikit-learn ships (china.jpg, flower.jpg), so nothing is downloaded; a fixed seed per split
    makes the set the same on every call (docs/design.md §2).
    """
    raw, labels = _digits_split(split)
    photos = _sample_photos()
    n, side = len(raw), DIGITS_PHOTOS_SIZE
    rng = np.random.default_rng([DIGITS_PHOTOS_SEED, SPLITS.index(split)])
    # Every draw is made up front, in a fixed order, so one image's parameters never depend on
    # another's.
    which = rng.integers(0, len(photos), n)
    tops = rng.random(n)
    lefts = rng.random(n)
    patches = rng.integers(DIGITS_PHOTOS_PATCH[0], DIGITS_PHOTOS_PATCH[1] + 1, n)
    offsets = rng.random((n, 2))
    colours = rng.integers(0, 256, (n, DIGITS_PHOTOS_COLOURS, 3)).astype(np.float32)
    out = np.empty((n, side, side, 3), dtype=np.uint8)
    for i in range(n):
        photo = photos[which[i]]
        y = int(tops[i] * (photo.shape[0] - side + 1))
        x = int(lefts[i] * (photo.shape[1] - side + 1))
        background = photo[y : y + side, x : x + side].astype(np.float32)
        patch = int(patches[i])
        # Digit strokes as an alpha mask, upscaled smoothly so edges blend into the photo.
        mask = Image.fromarray(np.rint(raw[i] * (255.0 / 16.0)).astype(np.uint8))
        alpha = np.asarray(mask.resize((patch, patch), Image.Resampling.BICUBIC), np.float32)
        alpha = (alpha / 255.0)[..., None]
        dy, dx = (offsets[i] * (side - patch + 1)).astype(int)
        under = background[dy : dy + patch, dx : dx + patch]
        # The colour farthest from the photo under the strokes keeps the digit legible; the
        # distance is per pixel, so a textured crop is not averaged into a grey it never shows.
        weights = alpha.reshape(-1) / max(float(alpha.sum()), 1e-6)
        pixels = under.reshape(-1, 1, 3)
        distance = weights @ np.linalg.norm(pixels - colours[i][None], axis=2)
        colour = colours[i, int(np.argmax(distance))]
        background[dy : dy + patch, dx : dx + patch] = under * (1.0 - alpha) + colour * alpha
        out[i] = np.clip(np.rint(background), 0, 255).astype(np.uint8)
    return out, labels


@lru_cache(maxsize=1)
def _sample_photos() -> tuple[np.ndarray, ...]:
    """scikit-learn's two sample photos, each at several scales (read once per process)."""
    from sklearn.datasets import load_sample_images

    scaled: list[np.ndarray] = []
    for photo in load_sample_images().images:
        image = Image.fromarray(photo)
        for height in DIGITS_PHOTOS_PHOTO_HEIGHTS:
            width = round(photo.shape[1] * height / photo.shape[0])
            scaled.append(np.asarray(image.resize((width, height), Image.Resampling.BICUBIC)))
    return tuple(scaled)


def _torchvision_set(
    name: str, split: str, root: str | None, download: bool
) -> tuple[np.ndarray, np.ndarray, int]:
    if root is None:
        raise ValueError(
            f"{name} needs --data-root (the folder holding torchvision's {name} files)"
        )
    from torchvision import datasets

    try:
        if name == "stl10":
            ds = datasets.STL10(root, split=split, download=download)
            images = np.asarray(ds.data).transpose(0, 2, 3, 1)  # stored as NCHW
            labels = np.asarray(ds.labels, dtype=np.int64)
            classes = 10
        else:
            cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
            ds = cls(root, train=split == "train", download=download)
            images = np.asarray(ds.data)
            labels = np.asarray(ds.targets, dtype=np.int64)
            classes = 10 if name == "cifar10" else 100
    except RuntimeError as exc:
        if "not found" not in str(exc).lower():
            raise
        raise FileNotFoundError(
            f"{name} ({split}) not found under --data-root {root!r}: point --data-root at the "
            f"folder that holds torchvision's {name} files, or pass --download to fetch them"
        ) from None
    return images, labels, classes


@dataclass(frozen=True)
class FolderIndex:
    """The images of an image folder, without their pixels: ``root/names[i]`` is image
    ``i`` and ``labels[i]`` its class (the sorted sub-folders' order). Both the in-memory
    load and the streamed set (``clsp_positives.streamed``) read a folder through
    it, so they number its images the same way."""

    root: Path
    names: list[str]  # "CLASS/FILE", relative to root
    labels: np.ndarray  # int64 [N]
    classes: int


def scan_image_folder(folder: Path, split: str) -> FolderIndex:
    """ImageFolder layout (DIR/CLASS/*.png); ``folder/train`` and ``folder/test`` are used
    when both exist. Files are taken in sorted order, class by class."""
    if (folder / "train").is_dir() and (folder / "test").is_dir():
        folder = folder / split
    class_dirs = sorted(p for p in folder.iterdir() if p.is_dir())
    if not class_dirs:
        raise ValueError(f"image folder {str(folder)!r} has no class sub-folders (DIR/CLASS/*.png)")
    names: list[str] = []
    labels: list[int] = []
    for label, class_dir in enumerate(class_dirs):
        for path in sorted(class_dir.iterdir()):
            if path.suffix.lower() in IMAGE_SUFFIXES:
                names.append(f"{class_dir.name}/{path.name}")
                labels.append(label)
    if not names:
        raise ValueError(f"image folder {str(folder)!r} holds no images ({sorted(IMAGE_SUFFIXES)})")
    return FolderIndex(folder, names, np.asarray(labels, dtype=np.int64), len(class_dirs))


def read_rgb(
    path: Path | str, target: tuple[int, int] | None = None, *, draft: bool = False
) -> Image.Image:
    """An image file as RGB, bicubically resized to ``target`` (width, height) when given
    and different. ``draft`` lets a JPEG decode at the smallest of its 1/2, 1/4, 1/8
    scales that still covers ``target`` (several times faster for a photo much larger
    than the training size; the pixels differ slightly from a full decode)."""
    with Image.open(path) as img:
        if draft and target is not None:
            img.draft("RGB", target)  # a no-op for formats other than JPEG
        rgb = img.convert("RGB")
    if target is not None and rgb.size != target:
        rgb = rgb.resize(target, Image.Resampling.BICUBIC)
    return rgb


def _image_folder(folder: Path, split: str, size: int | None) -> tuple[np.ndarray, np.ndarray, int]:
    """Every image of an image folder (``scan_image_folder``) in memory."""
    found = scan_image_folder(folder, split)
    images: list[np.ndarray] = []
    target: tuple[int, int] | None = (size, size) if size else None
    for name in found.names:
        rgb = read_rgb(found.root / name, target)
        # The first image fixes the size when none is asked for, so the array is regular.
        target = target or rgb.size
        images.append(np.asarray(rgb, dtype=np.uint8))
    return np.stack(images), found.labels, found.classes


def _resize(images: np.ndarray, size: int | None) -> np.ndarray:
    """Bicubic resize of uint8 NHWC images (PIL clamps to 0..255)."""
    if size is None or images.shape[1:3] == (size, size):
        return images
    out = np.empty((len(images), size, size, images.shape[3]), dtype=np.uint8)
    for i, img in enumerate(images):
        for c in range(images.shape[3]):
            plane = Image.fromarray(np.ascontiguousarray(img[..., c]))
            out[i, ..., c] = np.asarray(plane.resize((size, size), Image.Resampling.BICUBIC))
    return out


def to_channels(images: np.ndarray, channels: int | None) -> np.ndarray:
    """uint8 NHWC images with ``channels`` channels (None: as they are): grey repeated
    to RGB, RGB to luminance."""
    have = images.shape[3]
    if channels is None or channels == have:
        return images
    if channels == 3:
        return np.repeat(images, 3, axis=3)
    # ITU-R 601 luminance, as PIL's convert("L").
    grey = images.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    return np.clip(np.rint(grey), 0, 255).astype(np.uint8)[..., None]


def as_pil(picture: np.ndarray) -> Image.Image:
    """One uint8 ``[H, W, C]`` picture as a PIL image: grey ("L") for C = 1, RGB for C = 3;
    how a bank's candidates and ``CLSPPipeline``'s positives are handed out as pictures
    (docs/library.md)."""
    return Image.fromarray(picture[..., 0] if picture.shape[-1] == 1 else picture)
