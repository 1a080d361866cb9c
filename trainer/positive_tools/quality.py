"""How good are a model's positives: do they keep their anchor's class, and how much do
they differ from each other and from the anchor (docs/design.md §1).

A positive is useful to the trainer when it keeps its anchor's class (the bottleneck
carries the content) and still differs from the anchor and from the anchor's other
candidates (the skips carry new detail). Both are measured here, once, for ``clsp
calibrate`` and the quality benchmark (tests/bench/quality.py): a *probe*, a classifier
fit on real labelled images, says which class each positive shows, and mean absolute
pixel differences say how far apart images are.

Images are uint8 ``[N, H, W, C]`` or floats in [0, 1]; candidates are ``[N, k, H, W, C]``,
candidate index ``j`` of anchor ``i`` at ``[i, j]``. Numpy and scikit-learn only: no torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

FeatureFn = Callable[[np.ndarray], np.ndarray]
"""A feature extractor: uint8 ``[N, H, W, C]`` images -> float ``[N, D]`` features."""


def pixels(images: np.ndarray) -> np.ndarray:
    """Images as rows of pixels in [0, 1]: uint8 is divided by 255, floats (already in
    [0, 1]) are only reshaped, so a caller holding floats gets its own numbers back."""
    flat = images.reshape(len(images), -1)
    return flat / 255.0 if images.dtype == np.uint8 else flat


def to_uint8(images: np.ndarray) -> np.ndarray:
    """uint8 as it is; floats in [0, 1] rounded to 0..255 (what a feature extractor takes)."""
    if images.dtype == np.uint8:
        return images
    return np.clip(np.rint(images * 255.0), 0, 255).astype(np.uint8)


def default_classifier() -> Any:
    """The probe's classifier on raw pixels: logistic regression, as the quality benchmark
    has always measured class-kept (its numbers stay comparable across versions)."""
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(max_iter=5000)


def load_features(spec: str) -> FeatureFn:
    """``module:function`` -> that function; ValueError saying what is wrong otherwise."""
    module_name, sep, name = spec.partition(":")
    if not sep or not module_name or not name:
        raise ValueError(f"{spec!r} is not module:function (e.g. mypackage.features:embed)")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"cannot import {module_name!r}: {exc}") from None
    function = getattr(module, name, None)
    if not callable(function):
        raise ValueError(f"{module_name!r} has no function {name!r}")
    return function


@dataclass(frozen=True)
class Probe:
    """A classifier fit on real labelled images, applied to positives.

    Without ``features`` it reads raw pixels in [0, 1]; with them it reads what they
    return for the uint8 images (a user's pretrained encoder sees more than pixels).
    """

    classifier: Any  # fitted; has predict([N, D]) -> [N]
    features: FeatureFn | None = None

    def inputs(self, images: np.ndarray) -> np.ndarray:
        if self.features is None:
            return pixels(images)
        out = np.asarray(self.features(to_uint8(images)), dtype=np.float64)
        if out.ndim != 2 or len(out) != len(images):
            raise ValueError(
                f"the feature extractor must return [N, D] for N = {len(images)} images, "
                f"got shape {out.shape}"
            )
        return out

    def predict(self, images: np.ndarray) -> np.ndarray:
        """The class of each of ``images`` ([N, H, W, C]) as the probe sees it."""
        return np.asarray(self.classifier.predict(self.inputs(images)))


def fit_probe(
    images: np.ndarray,
    labels: np.ndarray,
    *,
    features: FeatureFn | None = None,
    classifier: Any = None,
) -> Probe:
    """Fit a probe on real images and their labels.

    ``classifier`` defaults to ``default_classifier()``; with ``features`` it is put behind
    a standard scaler, since a user's features come on any scale and logistic regression
    converges badly on unscaled inputs.
    """
    if len(np.unique(labels)) < 2:
        raise ValueError("a class probe needs images of at least 2 classes")
    if classifier is None:
        classifier = default_classifier()
        if features is not None:
            from sklearn.pipeline import make_pipeline
            from sklearn.preprocessing import StandardScaler

            classifier = make_pipeline(StandardScaler(), classifier)
    unfitted = Probe(classifier, features)
    classifier.fit(unfitted.inputs(images), labels)
    return unfitted


def class_kept(probe: Probe, positives: np.ndarray, labels: np.ndarray) -> float:
    """The fraction of positives the probe assigns to their anchor's class.

    ``positives``: ``[N, H, W, C]`` (one per anchor) or ``[N, k, H, W, C]`` (every
    candidate counts); ``labels``: ``[N]``, the anchors' classes. For the real images
    themselves this is the probe's accuracy, the ceiling a positive can reach.
    """
    labels = np.asarray(labels)
    if positives.ndim == 5:
        k = positives.shape[1]
        positives = positives.reshape(-1, *positives.shape[2:])
        labels = np.repeat(labels, k)
    if len(positives) != len(labels):
        raise ValueError(f"{len(positives)} positives for {len(labels)} labels")
    return float((probe.predict(positives) == labels).mean())


def as_unit(images: np.ndarray) -> np.ndarray:
    """float32 in [0, 1] (uint8 / 255; floats as they are)."""
    return images.astype(np.float32) / 255.0 if images.dtype == np.uint8 else images


def _pairs(k: int) -> list[tuple[int, int]]:
    return [(a, b) for a in range(k) for b in range(a + 1, k)]


def between_candidates(candidates: np.ndarray) -> float:
    """Mean absolute pixel difference between two candidates of one anchor, over every
    pair of candidate indices (each pair weighs the same) and every anchor; 0 when the
    candidates are copies of each other. Needs k >= 2."""
    c = as_unit(candidates)
    pairs = _pairs(c.shape[1])
    if not pairs:
        raise ValueError("between-candidate diversity needs k >= 2 candidates per anchor")
    return float(np.mean([np.abs(c[:, a] - c[:, b]).mean() for a, b in pairs]))


def to_anchor(candidates: np.ndarray, anchors: np.ndarray) -> float:
    """Mean absolute pixel difference between each candidate and its anchor; 0 for copies."""
    return float(np.abs(as_unit(candidates) - as_unit(anchors)[:, None]).mean())


def min_to_anchor(candidates: np.ndarray, anchors: np.ndarray) -> float:
    """The closest any candidate comes to its anchor (mean over its pixels): a copy shows
    as 0 here even when the average looks healthy."""
    per_image = np.abs(as_unit(candidates) - as_unit(anchors)[:, None])
    return float(per_image.mean(axis=tuple(range(2, per_image.ndim))).min())


def fraction_all_differ(candidates: np.ndarray) -> float:
    """The fraction of anchors whose candidates all differ from each other (no two equal
    in every pixel): a pool that returned one image for every candidate index gives 0."""
    c = as_unit(candidates)
    differ = np.ones(len(c), dtype=bool)
    for a, b in _pairs(c.shape[1]):
        differ &= np.abs(c[:, a] - c[:, b]).max(axis=tuple(range(1, c.ndim - 1))) > 0
    return float(differ.mean())


@dataclass(frozen=True)
class Diversity:
    """How far apart a setting's images are, on [0, 1] pixels."""

    between_candidates: float
    to_anchor: float
    min_to_anchor: float
    fraction_all_differ: float


def diversity(candidates: np.ndarray, anchors: np.ndarray) -> Diversity:
    """Every distance measure of ``candidates`` [N, k, H, W, C] (k >= 2) of ``anchors``."""
    if candidates.ndim != 5 or len(candidates) != len(anchors):
        raise ValueError(
            f"candidates must be [N, k, H, W, C] for N = {len(anchors)} anchors, "
            f"got {candidates.shape}"
        )
    return Diversity(
        between_candidates=between_candidates(candidates),
        to_anchor=to_anchor(candidates, anchors),
        min_to_anchor=min_to_anchor(candidates, anchors),
        fraction_all_differ=fraction_all_differ(candidates),
    )
