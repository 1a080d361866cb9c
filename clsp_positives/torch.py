"""CLSP for your own training loop: the losses over projections and a dataset wrapper that
adds each image's synthetic positive (docs/library.md, "Your own training loop").

A library first, the CLI on top (docs/design.md §1): ``clsp train``'s methods call these
same functions (trainer/methods.py), so a plain PyTorch loop built on them computes what
the trainer computes. The math itself is in trainer/losses.py, one pure function per loss;
this module is the documented, stable entry point and imports neither the trainer's CLI
nor its config.

Every loss takes raw (unnormalised) projections ``[N, D]``, normalises them itself and
computes in float32, so autocast outputs may be passed as they are.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from clsp_positives.trainer import losses
from clsp_positives.trainer.data.epochs import epoch_candidates
from clsp_positives.trainer.positives.offline import OfflineNpySource

__all__ = ["WithPositives", "clsp_contrastive_loss", "clsp_similarity_loss", "nt_xent"]


def nt_xent(z1: Tensor, z2: Tensor, temperature: float) -> Tensor:
    """SimCLR's NT-Xent over the 2N views of N images.

    With ``u`` the L2-normalised rows of ``[z1; z2]`` and ``p(a)`` the other view of
    row a's image::

        L = -1/(2N) sum_a log( exp(u_a . u_p(a) / t) / sum_{k != a} exp(u_a . u_k / t) )

    Each of the 2N rows is an anchor against its 2N - 1 others. This is the loss of the
    CLSP authors' ``train_simclr_clsp.py`` (``info_nce_loss_with_label``, SupCon's loss
    without labels; docs/method.md, "The authors' recipe, field by field") and
    ``clsp train --method simclr``'s base loss.
    """
    return losses.nt_xent(z1, z2, temperature)


def clsp_similarity_loss(
    z_anchor: Tensor, z_positive: Tensor, mask: Tensor | None = None
) -> Tensor:
    """The paper's CLSP term: ``mean_{i: mask_i} (2 - 2 cos(z_anchor_i, z_positive_i))``.

    ``z_positive[i]`` is the projection of anchor i's synthetic positive; ``mask`` (bool
    ``[N]``; None: all) says which anchors have one; a row where it is False counts
    neither in the mean nor in the gradient (the trainer passes zeros there). The term
    is added to the method's own loss, weighted by lambda:
    ``L = L_base + lambda * clsp_similarity_loss(z1, z3, mask)``.
    Gradients flow into both sides, as in the authors' ``similarity_loss_fn`` of
    ``train_simclr_clsp.py`` and ``train_moco_clsp.py`` (docs/method.md, "The authors'
    recipe, field by field"), which ``clsp train --clsp-mode similarity`` matches.

    With no positive at all it is a zero that still depends on its inputs, so a step
    without positives has the same autograd graph as one with them (DDP needs that).
    """
    return losses.clsp_similarity_term(z_anchor, z_positive, mask)


def clsp_contrastive_loss(
    z1: Tensor,
    z2: Tensor,
    z_positive: Tensor,
    mask: Tensor | None,
    temperature: float,
    *,
    weight: float = 1.0,
) -> Tensor:
    """NT-Xent with each anchor's synthetic positive as one more positive (the CLSP
    contrastive form): the positive's rows join the 2N views as a third view of their
    images.

    The rows are ``[z1; z2; z_positive[mask]]``, L2-normalised (``u``), with image labels
    ``y``; every other row of the same image is a positive of a row. A pair (a, p) is
    weighted ``w_a w_p``, ``w`` being 1 for the two views and ``weight`` (lambda) for
    the positives'::

        L = sum_{a, p != a, y_a = y_p} w_a w_p * -log( exp(u_a . u_p / t)
                                                      / sum_{k != a} exp(u_a . u_k / t) )
            / sum_{a, p != a, y_a = y_p} w_a w_p

    ``mask``: bool ``[N]``, None for all; the rows of ``z_positive`` where it is False
    are never read, and with ``mask`` all False the loss is exactly ``nt_xent(z1, z2, t)``.

    This form is this project's (``clsp train --clsp-mode contrastive``, the form ``clsp
    demo`` uses; docs/method.md): the authors' ``train_simclr_clsp.py`` adds the
    similarity term instead. It is their ``info_nce_loss_with_label`` with the positives
    as a third labelled view.
    """
    if z_positive.shape != z1.shape:
        raise ValueError(
            f"z_positive needs one row per anchor, {tuple(z1.shape)}, got "
            f"{tuple(z_positive.shape)}: pass zeros where mask is False"
        )
    labels = torch.arange(z1.shape[0], device=z1.device)
    if mask is None:
        mask = torch.ones_like(labels, dtype=torch.bool)
    mask = mask.to(device=z1.device, dtype=torch.bool)
    return losses.multi_positive_nt_xent(
        [z1, z2, z_positive[mask]],
        [labels, labels, labels[mask]],
        temperature,
        view_weights=[1.0, 1.0, weight],
    )


POOL_REFUSAL = (
    "WithPositives reads a bank file (`clsp generate --out FILE.npy`); a pool is fetched "
    "per batch, not per item: wrap the batches with PositivesStream instead (see "
    "docs/library.md)"
)


class WithPositives(Dataset):
    """``dataset`` with each image's synthetic positive from a bank of ``clsp generate``.

    Item i is ``(dataset[i], positive, has_positive)``: the item unchanged (an image,
    PIL, uint8 array or tensor, or ``(image, label)``), one of index i's K candidates in
    the bank (uint8 ``[N, K, H, W, C]``), as a PIL image or ``transform(PIL image)``,
    and whether it has one. A bank is read only when complete (trainer/positives/
    offline.py refuses one whose ``clsp generate`` has not finished), so every item has
    its positive; the flag is what the losses' ``mask`` takes, as from a pool, where
    positives may be missing.

    The candidate is drawn once per epoch (``set_epoch``, like DistributedSampler's) by
    ``epoch_candidates(seed, epoch)`` (trainer/data/epochs.py), a pure function of
    (seed, epoch, index): DDP ranks and DataLoader workers agree without sharing state,
    and ``clsp train --seed`` draws the same. As for any dataset attribute, call
    ``set_epoch`` before iterating and leave ``persistent_workers`` off, so the workers
    start with the epoch.
    """

    def __init__(
        self,
        dataset: Dataset,
        source: str | os.PathLike[str],
        *,
        transform: Any = None,
        seed: int = 0,
    ) -> None:
        if not isinstance(source, (str, os.PathLike)) or "://" in str(source):
            raise ValueError(f"{POOL_REFUSAL}; got {source!r}")
        self.dataset = dataset
        self.path = os.fspath(source)
        self.transform = transform
        self.seed = seed
        self.epoch = 0
        self._bank: OfflineNpySource | None = OfflineNpySource(self.path)
        self.k = self._bank.k
        size, bank_rows = len(dataset), int(self._bank.array.shape[0])  # type: ignore[arg-type]
        if bank_rows != size:
            raise ValueError(
                f"the bank {self.path!r} holds positives of {bank_rows} images but the "
                f"dataset has {size}: generate the bank from this dataset (same split, "
                "same order)"
            )
        self._candidates: tuple[int, np.ndarray] | None = None

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose candidates the items take (DistributedSampler's convention)."""
        self.epoch = int(epoch)

    def candidate(self, index: int) -> int:
        """Which of index's K candidates this epoch takes; cached per epoch and process."""
        if self._candidates is None or self._candidates[0] != self.epoch:
            draw = epoch_candidates(self.seed, self.epoch, len(self), self.k)
            self._candidates = (self.epoch, draw)
        return int(self._candidates[1][index])

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Any, Any, bool]:
        if self._bank is None:  # a worker process that got the dataset pickled
            self._bank = OfflineNpySource(self.path)
        from clsp_positives.images import as_pil  # Pillow: the trainer's dependency, not torch's

        positive = as_pil(np.asarray(self._bank.array[index, self.candidate(index)]))
        if self.transform is not None:
            positive = self.transform(positive)
        return self.dataset[index], positive, True

    def __getstate__(self) -> dict[str, Any]:
        """Without the memory map: a spawned worker opens the bank itself instead of
        receiving a copy of it (np.memmap pickles as the whole array)."""
        return {**self.__dict__, "_bank": None}
