"""The standard linear evaluation protocol of self-supervised learning (docs/training.md).

Published SSL tables (solo-learn's; the CLSP paper's "offline" accuracies) train a
linear classifier with SGD on the *frozen* backbone's features of *augmented* training
images, re-augmented every epoch, for 100 epochs with a step schedule, and report its
top-1 accuracy on the plain test images after the last epoch. That number is
``linear_acc``. The fast probe of ``evaluation.py`` (Adam on standardised features of
un-augmented images, ``probe_acc``) tracks a run cheaply and is not comparable with them.

The settings are solo-learn's linear config (its ``scripts/linear`` configs, its
``main_linear.py`` with momentum 0.9 for SGD, and the SimCLR learning rate of its
``bash_files/linear/run_linear.sh``): SGD with momentum 0.9 on the classifier only,
learning rate 0.1, no weight decay, batch 256, 100 epochs, the learning rate divided by
10 after epochs 60 and 80; training views are a random resized crop (scale 0.08-1) and
a horizontal flip, test images are only normalised. The backbone runs in eval mode
under ``no_grad``: its weights and BatchNorm statistics never change.

Where this differs from solo-learn, on purpose: the step epochs scale with ``epochs``
(60 % and 80 % of them, so a short protocol also decays); every image is used every
epoch (no drop of the last partial batch); and an epoch's training features are computed
for the whole set first and then shuffled into batches, the same updates in distribution
as augmenting batch by batch, because the backbone is frozen. The CLSP authors' offline script
(``utils/eval_utils.py``, ``linear_eval``) shares the frozen backbone, batch 256, 100
epochs, no weight decay and the steps at 60 and 80, but its training views are a flip
only (no crop) and its SGD has no momentum, with learning rate 1.0 in their example.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clsp_positives.trainer.data.augment import AugmentConfig, BatchAugment


@dataclass(frozen=True)
class ProtocolSettings:
    """solo-learn's linear config, less its epochs (``TrainConfig.linear_epochs``)."""

    batch_size: int = 256
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 0.0
    decay_at: tuple[float, ...] = (0.6, 0.8)  # fractions of the epochs: 60 and 80 of 100
    decay_factor: float = 0.1
    crop_scale: tuple[float, float] = (0.08, 1.0)
    flip_p: float = 0.5


SOLO_LEARN = ProtocolSettings()


@dataclass(frozen=True)
class ProtocolResult:
    accuracy: float  # top-1 on the test images, after the last epoch
    predictions: Tensor  # [N_test] int64
    losses: tuple[float, ...]  # mean training cross-entropy of each epoch
    train_accuracy: float  # on the last epoch's augmented views


def crop_flip_augment(
    preprocess: BatchAugment, settings: ProtocolSettings = SOLO_LEARN, *, seed: int = 0
) -> BatchAugment:
    """The protocol's training views: ``preprocess``'s size, normalisation and device,
    a random resized crop and a flip, and no colour change (jitter, grayscale, blur and
    solarisation off)."""
    config = AugmentConfig(
        scale=settings.crop_scale,
        flip_p=settings.flip_p,
        jitter_p=0.0,
        grayscale_p=0.0,
        blur_p=0.0,
        solarize_p=0.0,
    )
    return BatchAugment(
        preprocess.size[0],
        preprocess.mean.flatten().tolist(),
        preprocess.std.flatten().tolist(),
        device=preprocess.device,
        config=config,
        seed=seed,
    )


def uint8_batches(images: Any, batch_size: int) -> Iterator[Tensor]:
    """uint8 ``[B, H, W, C]`` batches of every image in order: slices of an array, or
    a streamed set's own batches (``chunks``: decoded by its DataLoader workers, so a
    folder larger than memory is evaluated without loading it; docs/training.md,
    "Large data sets")."""
    chunks = getattr(images, "chunks", None)
    if chunks is not None:
        yield from chunks(batch_size)
        return
    for start in range(0, len(images), batch_size):
        yield torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size]))


@torch.no_grad()
def frozen_features(
    backbone: nn.Module,
    images: Any,
    transform: Callable[[Tensor], Tensor],
    *,
    batch_size: int = 512,
    autocast: bool = False,
) -> Tensor:
    """Backbone features ``[N, F]`` (float32) of ``transform(uint8 batch)``, in eval mode
    and without gradients; the backbone's mode is restored afterwards. ``images`` is a
    uint8 ``[N, H, W, C]`` array or a streamed set (``uint8_batches``)."""
    was_training = backbone.training
    backbone.eval()
    out = []
    try:
        for batch in uint8_batches(images, batch_size):
            x = transform(batch)
            with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=autocast):
                out.append(backbone(x).float())
    finally:
        backbone.train(was_training)
    return torch.cat(out)


def decay_epochs(epochs: int, settings: ProtocolSettings = SOLO_LEARN) -> list[int]:
    """The epochs after which the learning rate drops: [60, 80] of 100."""
    return sorted({max(1, round(f * epochs)) for f in settings.decay_at})


def _linear_head(dim: int, classes: int, gen: torch.Generator) -> nn.Linear:
    """``nn.Linear``'s own initialisation (uniform within 1/sqrt(dim)), drawn from
    ``gen``: the global RNG is left alone, so evaluating does not change what a run
    draws afterwards."""
    head = nn.utils.skip_init(nn.Linear, dim, classes)
    bound = 1.0 / dim**0.5
    with torch.no_grad():
        head.weight.copy_((torch.rand(classes, dim, generator=gen) * 2 - 1) * bound)
        head.bias.copy_((torch.rand(classes, generator=gen) * 2 - 1) * bound)
    return head


def linear_protocol(
    backbone: nn.Module,
    train_images: Any,
    train_labels: np.ndarray,
    test_images: Any,
    test_labels: np.ndarray,
    classes: int,
    preprocess: BatchAugment,
    *,
    epochs: int,
    seed: int = 0,
    settings: ProtocolSettings = SOLO_LEARN,
    autocast: bool = False,
    progress: bool = False,
    on_epoch: Callable[[int, Tensor], None] | None = None,
) -> ProtocolResult:
    """Train a linear classifier on the frozen ``backbone`` (solo-learn's linear config,
    see the module docstring) and return its test accuracy.

    ``train_images`` / ``test_images`` are uint8 ``[N, H, W, C]`` with labelled rows only
    (arrays, or streamed sets read batch by batch: ``uint8_batches``);
    ``preprocess`` gives the size, normalisation and device (its own generator is not
    used). Everything random (views, batch order, initialisation) comes from ``seed``.
    ``on_epoch(epoch, features)`` sees each epoch's training features in data set order.
    """
    if epochs < 1:
        raise ValueError(f"the linear protocol needs at least 1 epoch, got {epochs}")
    if len(train_labels) == 0 or len(test_labels) == 0:
        raise ValueError("the linear protocol needs labelled train and test images")
    dev = preprocess.device
    augment = crop_flip_augment(preprocess, settings, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    y_train = torch.as_tensor(train_labels, dtype=torch.long, device=dev)
    test_features = frozen_features(backbone, test_images, preprocess.plain, autocast=autocast)
    head = _linear_head(test_features.shape[1], classes, gen).to(dev)
    opt = torch.optim.SGD(
        head.parameters(),
        lr=settings.lr,
        momentum=settings.momentum,
        weight_decay=settings.weight_decay,
    )
    schedule = torch.optim.lr_scheduler.MultiStepLR(
        opt, decay_epochs(epochs, settings), gamma=settings.decay_factor
    )
    n = len(train_labels)
    losses: list[float] = []
    correct = 0
    bar = _epoch_bar(epochs, progress)
    for epoch in range(epochs):
        features = frozen_features(backbone, train_images, augment, autocast=autocast)
        if on_epoch is not None:
            on_epoch(epoch, features)
        order = torch.randperm(n, generator=gen).to(dev)
        total, correct = 0.0, 0
        for start in range(0, n, settings.batch_size):
            idx = order[start : start + settings.batch_size]
            logits = head(features[idx])
            loss = F.cross_entropy(logits, y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
            correct += int((logits.detach().argmax(dim=1) == y_train[idx]).sum())
        schedule.step()
        losses.append(total / n)
        if bar is not None:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            bar.update(1)
    if bar is not None:
        bar.close()
    with torch.no_grad():
        predictions = head(test_features).argmax(dim=1)
    y_test = torch.as_tensor(test_labels, dtype=torch.long, device=dev)
    return ProtocolResult(
        accuracy=float((predictions == y_test).float().mean()),
        predictions=predictions,
        losses=tuple(losses),
        train_accuracy=correct / n,
    )


def _epoch_bar(epochs: int, enabled: bool) -> Any:
    """A tqdm bar over the epochs (tqdm imported only when shown), or None."""
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=epochs, desc="linear protocol", unit="epoch", leave=False)
