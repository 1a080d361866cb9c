"""The evaluations of a frozen backbone (docs/design.md §1): weighted kNN, the fast
linear probe and, when asked, the standard linear protocol.

kNN and the probe run on features of un-augmented images, extracted once, so they cost
seconds even for CIFAR and can run every few epochs; the probe's ``probe_acc`` tracks a
run but is not comparable with published tables. ``linear_acc`` comes from the standard
protocol (``linear_protocol.py``: SGD on features of images re-augmented every epoch),
the number solo-learn's and the CLSP paper's linear tables report; it costs a forward
pass over the training set per epoch, so a run computes it at its final evaluation only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clsp_positives.trainer.data.augment import BatchAugment
from clsp_positives.trainer.eval.linear_protocol import frozen_features, linear_protocol


@dataclass(frozen=True)
class EvalResult:
    probe_acc: float
    knn_acc: float
    train_size: int
    test_size: int
    linear_acc: float | None = None  # None: the standard protocol did not run

    def as_dict(self) -> dict[str, float | int]:
        out: dict[str, float | int] = {
            "probe_acc": self.probe_acc,
            "knn_acc": self.knn_acc,
            "train_size": self.train_size,
            "test_size": self.test_size,
        }
        if self.linear_acc is not None:
            out["linear_acc"] = self.linear_acc
        return out


def extract_features(
    backbone: nn.Module,
    images: Any,
    preprocess: BatchAugment,
    *,
    batch_size: int = 512,
    autocast: bool = False,
) -> Tensor:
    """Backbone features ``[N, F]`` (float32, on the preprocessing device) of the
    un-augmented images, in eval mode."""
    return frozen_features(
        backbone, images, preprocess.plain, batch_size=batch_size, autocast=autocast
    )


def knn_predict(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    classes: int,
    *,
    k: int = 200,
    tau: float = 0.1,
    chunk: int = 1024,
) -> Tensor:
    """Weighted kNN (InstDisc): the k most cosine-similar training features
    vote for their class with weight ``exp(sim / tau)``."""
    train = F.normalize(train_features.float(), dim=1)
    test = F.normalize(test_features.float(), dim=1)
    k = min(k, train.shape[0])
    preds = []
    for start in range(0, test.shape[0], chunk):
        sim = test[start : start + chunk] @ train.T
        top_sim, top_idx = sim.topk(k, dim=1)
        votes = torch.zeros(sim.shape[0], classes, device=sim.device)
        votes.scatter_add_(1, train_labels[top_idx], torch.exp(top_sim / tau))
        preds.append(votes.argmax(dim=1))
    return torch.cat(preds)


def linear_probe(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    classes: int,
    *,
    epochs: int = 100,
    batch_size: int = 256,
    lr: float = 1e-2,
    weight_decay: float = 1e-5,
    seed: int = 0,
) -> Tensor:
    """The fast probe: a linear classifier on standardised frozen features (Adam,
    cosine decay); returns the test predictions. A proxy for tracking a run, not the
    standard protocol (``linear_protocol.py``)."""
    gen = torch.Generator().manual_seed(seed)
    mean = train_features.mean(dim=0, keepdim=True)
    std = train_features.std(dim=0, keepdim=True).clamp(min=1e-6)
    x_train = (train_features - mean) / std
    x_test = (test_features - mean) / std
    dev = x_train.device
    head = nn.Linear(x_train.shape[1], classes).to(dev)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=gen) * 0.01)
        head.bias.zero_()
    opt = torch.optim.Adam(head.parameters(), lr=lr, weight_decay=weight_decay)
    n = x_train.shape[0]
    steps = epochs * max(1, -(-n // batch_size))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen).to(dev)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            loss = F.cross_entropy(head(x_train[idx]), train_labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    with torch.no_grad():
        return head(x_test).argmax(dim=1)


def evaluate_backbone(
    backbone: nn.Module,
    train_images: Any,
    train_labels: np.ndarray,
    test_images: Any,
    test_labels: np.ndarray,
    classes: int,
    preprocess: BatchAugment,
    *,
    k: int = 200,
    tau: float = 0.1,
    probe_epochs: int = 100,
    linear_epochs: int = 0,
    seed: int = 0,
    autocast: bool = False,
    progress: bool = False,
) -> EvalResult:
    """kNN and fast-probe top-1 accuracy of a frozen backbone, and with
    ``linear_epochs > 0`` the standard linear protocol's. Unlabelled training images
    (label -1, STL-10's extra split) are left out. The images are uint8 ``[N, H, W, C]``
    arrays or streamed sets, whose features are extracted batch by batch without
    holding their pixels (``linear_protocol.uint8_batches``)."""
    keep = train_labels >= 0
    if not keep.all():  # a streamed folder has no unlabelled rows: it is never indexed
        train_images, train_labels = train_images[keep], train_labels[keep]
    if len(train_labels) == 0 or len(test_labels) == 0:
        raise ValueError("evaluation needs labelled train and test images")
    dev = preprocess.device
    f_train = extract_features(backbone, train_images, preprocess, autocast=autocast)
    f_test = extract_features(backbone, test_images, preprocess, autocast=autocast)
    y_train = torch.from_numpy(train_labels).to(dev)
    y_test = torch.from_numpy(test_labels).to(dev)
    knn = knn_predict(f_train, y_train, f_test, classes, k=k, tau=tau)
    with torch.enable_grad():
        probe = linear_probe(f_train, y_train, f_test, classes, epochs=probe_epochs, seed=seed)
        linear = None
        if linear_epochs > 0:
            linear = linear_protocol(
                backbone,
                train_images,
                train_labels,
                test_images,
                test_labels,
                classes,
                preprocess,
                epochs=linear_epochs,
                seed=seed,
                autocast=autocast,
                progress=progress,
            ).accuracy
    return EvalResult(
        probe_acc=float((probe == y_test).float().mean()),
        knn_acc=float((knn == y_test).float().mean()),
        train_size=len(train_labels),
        test_size=len(test_labels),
        linear_acc=linear,
    )
