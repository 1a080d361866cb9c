"""CLSP for your own training loop: the losses over projections, a dataset wrapper that
adds each image's synthetic positive from a bank, and a stream that adds each batch's
positives from a pool (docs/library.md, "Your own training loop" and "A pool in your own
loop: PositivesStream").

A library first, the CLI on top (docs/design.md §1): ``clsp train``'s methods call these
same functions (trainer/methods.py), and ``PositivesStream`` runs ``clsp train``'s own
feed (trainer/positives/feed.py), so a plain PyTorch loop built on them computes and
fetches what the trainer does. The math itself is in trainer/losses.py, one pure
function per loss; this module is the documented, stable entry point and imports
nothing of the trainer's CLI; its defaults are ``TrainConfig``'s.

Every loss takes raw (unnormalised) projections ``[N, D]``, normalises them itself and
computes in float32, so autocast outputs may be passed as they are.
"""

from __future__ import annotations

import collections
import dataclasses
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from clsp_positives.trainer import losses
from clsp_positives.trainer.data.epochs import epoch_candidates
from clsp_positives.trainer.positives.offline import OfflineNpySource

if TYPE_CHECKING:  # httpx, the client's, is imported when a stream is opened
    from clsp_positives.client import PoolClient
    from clsp_positives.proto.params import GenerationParams

__all__ = [
    "Indexed",
    "PositivesStream",
    "WithPositives",
    "clsp_contrastive_loss",
    "clsp_similarity_loss",
    "nt_xent",
]


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


class Indexed(Dataset):
    """``dataset`` with each item's index, for ``PositivesStream``: item i is ``(image,
    i)``, or ``(image, i, *rest)`` for an item ``(image, *rest)`` such as ``(image,
    label)``. ``image`` becomes a tensor: a PIL image or a numpy array as uint8 ``[H, W,
    C]`` (C = 1 for a grey one), a tensor as it is (uint8 ``[H, W, C]`` or float ``[C, H,
    W]`` in [0, 1], as torchvision's ``ToTensor`` gives). The DataLoader's default
    collate then gives the batches ``PositivesStream`` reads: ``(images, indices, ...)``.

    The index is the item's position in ``dataset``: the positives are keyed by it
    (each epoch's candidate, docs/library.md), so wrap the data set the candidates are
    drawn over, not a shard or a ``Subset`` of it unless that is the whole training set.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Any, ...]:
        item = self.dataset[index]
        image, *rest = item if isinstance(item, (tuple, list)) else (item,)
        if not isinstance(image, Tensor):
            pixels = np.asarray(image)
            if pixels.ndim == 2:  # a grey PIL image or array
                pixels = pixels[..., None]
            image = torch.from_numpy(np.ascontiguousarray(pixels))
        return (image, index, *rest)


IMAGES_CONTRACT = (
    "PositivesStream reads batches (images, indices, ...): images uint8 [B, H, W, C] "
    "(numpy or tensor) or a float tensor [B, C, H, W] in [0, 1], the images before any "
    "augmentation or normalisation; indices the images' indices in the data set "
    "(wrap the data set in Indexed(dataset) to get them); anything after them (labels, "
    "views made in the workers) is passed on untouched"
)


def _anchors(images: Any) -> tuple[np.ndarray, bool]:
    """The pool's anchors, uint8 ``[B, H, W, C]``, of a loader's images, and whether
    those are floats ``[B, C, H, W]`` (the positives come back in the images' layout).

    Floats are read as [0, 1] (``ToTensor``'s, rounded back to the bytes they came
    from, so the pool keys them as ``clsp train`` keys the same images); values below 0
    or above 1 (a [-1, 1] or a normalised batch) are refused, since the pool would be
    asked for positives of other pictures."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if not isinstance(images, Tensor) or images.ndim != 4:
        shape = list(getattr(images, "shape", ())) or type(images).__name__
        raise ValueError(f"{IMAGES_CONTRACT}; got images {shape}")
    images = images.detach().cpu()
    if images.dtype == torch.uint8:
        if images.shape[-1] > 4 >= images.shape[1]:
            raise ValueError(
                f"uint8 images must be [B, H, W, C], got {list(images.shape)}, which looks "
                "like [B, C, H, W] (PILToTensor's): pass images.permute(0, 2, 3, 1)"
            )
        return np.ascontiguousarray(images.numpy()), False
    if not images.is_floating_point():
        raise ValueError(f"{IMAGES_CONTRACT}; got {images.dtype}")
    low, high = (float(v) for v in torch.aminmax(images))
    if low < 0 or high > 1:
        raise ValueError(
            f"float images must lie in [0, 1] (ToTensor's), got [{low:.3g}, {high:.3g}]: "
            "yield them before normalising (normalise in the step), or as uint8"
        )
    pixels = (images.float() * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
    return np.ascontiguousarray(pixels.numpy()), True


class PositivesStream:
    """A DataLoader's batches with their synthetic positives from a pool, fetched
    ``lookahead`` batches ahead while the model trains (docs/library.md, "A pool in your
    own loop: PositivesStream").

    ``loader`` yields ``(images, indices, ...)`` (``IMAGES_CONTRACT``;
    ``Indexed(dataset)`` makes such items); the stream yields ``(batch, positives,
    mask)``: the loader's batch unchanged, each image's positive in the images' layout
    (uint8 ``[B, H, W, C]``, or float32 ``[B, C, H, W]`` in [0, 1] for float images),
    zero where ``mask`` (bool ``[B]``) is False: a positive that missed its deadline,
    or every positive while the pool is down. The losses take ``mask`` as it is.

    It is ``clsp train``'s feed (trainer/positives/feed.py), not a copy: the same
    candidate draw (``epoch_candidates``: the candidate of index i in an epoch is the
    trainer's with the same ``seed`` and ``k``), deadlines, wait rationing, request
    deadlines and priorities, failover and model pinning. What differs is how far it
    sees: the trainer knows the plan of every epoch, the stream reads the loader ahead,
    so its look-ahead ends with the epoch.

    ``pool``: URLs (``"http://a:8000,http://b:8000"`` or a list) or a
    ``clsp_positives.Client`` (kept open by ``close``: it is the caller's). ``params``:
    what to ask the pool (``GenerationParams``; unset fields are the pool's, as in
    ``clsp train``); ``params.expect_model`` pins a model from the start. Every other
    argument left None is ``clsp train``'s default of the option of the same meaning
    (``TrainConfig``): ``lookahead`` ``--prefetch``, ``deadline_ms``
    ``--positives-deadline-ms``, ``strict`` ``--positives-strict``, ``k`` ``--k``,
    ``seed`` ``--seed``, ``timeout_s`` ``--positives-timeout-s``,
    ``allow_model_change`` ``--allow-model-change``.

    Call ``set_epoch(epoch)`` before each epoch, as for ``DistributedSampler`` (it sets
    the loader's sampler's epoch too when that has ``set_epoch``). Under DDP each rank
    streams its own loader (its ``DistributedSampler`` shard) with its own client; the
    candidates are drawn over the whole data set, so the ranks agree without talking.
    DataLoader workers load the images; the requests go out from this process.
    """

    def __init__(
        self,
        loader: Iterable[Any],
        pool: str | Sequence[str] | PoolClient,
        *,
        lookahead: int | None = None,
        deadline_ms: float | None = None,
        strict: bool | None = None,
        params: GenerationParams | None = None,
        k: int | None = None,
        seed: int | None = None,
        timeout_s: float | None = None,
        allow_model_change: bool | None = None,
        token: str | None = None,
    ) -> None:
        from clsp_positives.proto.params import GenerationParams
        from clsp_positives.trainer.positives.feed import FeedSettings, open_feed

        if isinstance(pool, (str, os.PathLike)) and str(pool).endswith(".npy"):
            raise ValueError(
                f"PositivesStream asks a pool (URLs or a Client); a bank file such as "
                f"{os.fspath(pool)!r} is read per item by WithPositives (docs/library.md)"
            )
        given = {
            "lookahead": lookahead,
            "deadline_ms": deadline_ms,
            "strict": strict,
            "k": k,
            "seed": seed,
            "timeout_s": timeout_s,
            "allow_model_change": allow_model_change,
        }
        settings = dataclasses.replace(
            FeedSettings.defaults(), **{name: v for name, v in given.items() if v is not None}
        )
        self.loader = loader
        self.epoch = 0
        self._feed = open_feed(
            pool,
            params if params is not None else GenerationParams(),
            settings,
            size=_dataset_size(loader),
            token=token,
        )
        self._next_id = 0  # batch ids grow over the epochs: a take cancels those below it

    @property
    def model(self) -> str | None:
        """The pool's model fingerprint the positives are pinned to, once the first
        answer came (or as ``params.expect_model`` named it); pass it as
        ``expect_model`` to a later run to keep it."""
        return self._feed.model

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose candidates the next iteration asks for."""
        self.epoch = int(epoch)
        for name in ("sampler", "batch_sampler"):
            sampler = getattr(self.loader, name, None)
            if callable(getattr(sampler, "set_epoch", None)):
                sampler.set_epoch(self.epoch)  # type: ignore[union-attr]

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[tuple[Any, Tensor, Tensor]]:
        epoch, batches = self.epoch, iter(self.loader)
        ahead: collections.deque[tuple[int, Any, bool]] = collections.deque()
        exhausted = False
        while True:
            # Before each take, the batches up to L steps after it are with the pool.
            while not exhausted and len(ahead) <= self._feed.lookahead:
                batch = next(batches, _END)
                if batch is _END:
                    exhausted = True
                    break
                ahead.append(self._submit(batch, epoch, steps_ahead=len(ahead)))
            if not ahead:
                return
            batch_id, batch, floats = ahead.popleft()
            got = self._feed.take(batch_id)
            positives = torch.from_numpy(got.images)
            if floats:
                positives = positives.permute(0, 3, 1, 2).float() / 255
            yield batch, positives, torch.from_numpy(got.mask)

    def _submit(self, batch: Any, epoch: int, *, steps_ahead: int) -> tuple[int, Any, bool]:
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise ValueError(f"{IMAGES_CONTRACT}; got a {type(batch).__name__} batch")
        anchors, floats = _anchors(batch[0])
        indices = np.asarray(batch[1], dtype=np.int64).reshape(-1)
        batch_id, self._next_id = self._next_id, self._next_id + 1
        self._feed.submit(batch_id, epoch, indices, anchors, steps_ahead=steps_ahead)
        return batch_id, batch, floats

    def epoch_stats(self) -> dict[str, Any]:
        """The positives' figures since the last call, as ``clsp train``'s epoch records
        have them (``positive_fraction``, ``cache_hit_rate``, ``wait_seconds``,
        ``missing``, ``failovers``...; docs/training.md)."""
        return self._feed.epoch_stats()

    def close(self) -> None:
        """Cancel what is in flight and close the pool client this stream opened."""
        self._feed.close()

    def __enter__(self) -> PositivesStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_END = object()


def _dataset_size(loader: Iterable[Any]) -> int:
    """The number of images the candidates are drawn over: the loader's data set's."""
    try:
        return len(loader.dataset)  # type: ignore[attr-defined]
    except (AttributeError, TypeError):
        raise ValueError(
            "PositivesStream draws each epoch's candidates over the data set: pass a "
            "DataLoader of a map-style data set (one with len())"
        ) from None
