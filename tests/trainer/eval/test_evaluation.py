"""Weighted kNN and the fast linear probe on frozen features; the standard protocol
has its own tests (test_linear_protocol.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from clsp_positives.images import load_images
from clsp_positives.trainer.data.augment import BatchAugment
from clsp_positives.trainer.data.epochs import channel_stats
from clsp_positives.trainer.eval.evaluation import evaluate_backbone, knn_predict, linear_probe


def test_knn_weighting_by_hand() -> None:
    train = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8]])
    labels = torch.tensor([0, 1, 1])
    test = torch.tensor([[2.0, 0.0]])
    # tau = 0.1: class 0 gets e^10, class 1 e^8 + e^6: the single close neighbour wins.
    assert knn_predict(train, labels, test, 2, k=3, tau=0.1).item() == 0
    # tau = 10: weights almost flat, e^0.1 < e^0.08 + e^0.06: the majority wins.
    assert knn_predict(train, labels, test, 2, k=3, tau=10.0).item() == 1
    # k larger than the training set is capped.
    assert knn_predict(train, labels, test, 2, k=200, tau=0.1).item() == 0


def test_knn_chunks_agree() -> None:
    g = torch.Generator().manual_seed(0)
    train, test = torch.randn(100, 8, generator=g), torch.randn(30, 8, generator=g)
    labels = torch.randint(0, 5, (100,), generator=g)
    whole = knn_predict(train, labels, test, 5, k=10)
    assert torch.equal(whole, knn_predict(train, labels, test, 5, k=10, chunk=7))


def test_linear_probe_separates_separable_classes() -> None:
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 16, generator=g) * 3
    y = torch.randint(0, 4, (400,), generator=g)
    x = centres[y] + torch.randn(400, 16, generator=g) * 0.5
    pred = linear_probe(x[:300], y[:300], x[300:], 4, epochs=30)
    assert (pred == y[300:]).float().mean().item() > 0.95


def test_raw_pixels_on_digits_are_a_sensible_baseline() -> None:
    train, test = load_images("digits", split="train"), load_images("digits", split="test")
    mean, std = channel_stats(train.images)
    result = evaluate_backbone(
        nn.Flatten(),
        train.images,
        train.labels,
        test.images,
        test.labels,
        train.classes,
        BatchAugment(train.images.shape[1], mean, std),
        probe_epochs=30,
        linear_epochs=3,
    )
    assert result.knn_acc > 0.9 and result.probe_acc > 0.9
    # Three epochs of SGD on crops of raw pixels: far above chance (10 %), far below the probe.
    assert result.linear_acc is not None and result.linear_acc > 0.3
    assert result.train_size == len(train.labels) and result.test_size == len(test.labels)
    assert set(result.as_dict()) == {
        "linear_acc",
        "probe_acc",
        "knn_acc",
        "train_size",
        "test_size",
    }


def test_unlabelled_training_images_are_left_out() -> None:
    images = np.zeros((4, 4, 4, 1), np.uint8)
    labels = np.array([0, -1, 1, -1], np.int64)
    images[2] = 255
    result = evaluate_backbone(
        nn.Flatten(),
        images,
        labels,
        images[[0, 2]],
        np.array([0, 1]),
        2,
        BatchAugment(4, [0.5], [0.5]),
        probe_epochs=5,
    )
    assert result.train_size == 2 and result.knn_acc == 1.0
    assert result.linear_acc is None and "linear_acc" not in result.as_dict()
    with pytest.raises(ValueError, match="labelled"):
        evaluate_backbone(
            nn.Flatten(),
            images[[1]],
            labels[[1]],
            images,
            labels,
            2,
            BatchAugment(4, [0.5], [0.5]),
        )
