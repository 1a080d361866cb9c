"""The positives of batches of data set indices, ``lookahead`` batches ahead of training:
the one feed of ``clsp train`` and of ``PositivesStream`` (docs/design.md §5;
docs/library.md, "A pool in your own loop: PositivesStream").

``open_feed`` builds it the one way: the source the options name (``build_source``),
the params pinned to a model (docs/reliability.md, "Model pinning"), the prefetcher's
deadlines. ``PositivesFeed`` asks for each image the candidate the epoch draws for it
(``epoch_candidates``, a function of (seed, epoch, index) alone, so DDP ranks, resumed
runs and the library ask for the same ones) and keys batches by a running id.
``PlannedFeed`` is ``clsp train``'s use of it: the trainer knows the plan of every epoch
ahead, so its look-ahead crosses epoch boundaries; ``PositivesStream``
(clsp_positives/torch.py) reads a DataLoader ahead instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from clsp_positives.proto.params import GenerationParams
from clsp_positives.trainer.config import TrainConfig
from clsp_positives.trainer.data.epochs import EpochPlan, ShardedBatchSampler, epoch_candidates
from clsp_positives.trainer.positives.pending import PositivesBatch
from clsp_positives.trainer.positives.prefetch import Prefetcher
from clsp_positives.trainer.positives.sources import build_source

if TYPE_CHECKING:  # httpx is the trainer extra's
    from clsp_positives.client import PoolClient


@dataclass(frozen=True)
class FeedSettings:
    """What the feed is told: ``clsp train``'s options of the same meaning
    (``from_config``), whose defaults ``defaults()`` takes for the library."""

    seed: int
    k: int
    lookahead: int
    deadline_ms: float
    strict: bool
    pool_deadlines: bool
    timeout_s: float
    allow_model_change: bool

    @classmethod
    def from_config(cls, config: TrainConfig) -> FeedSettings:
        return cls(
            seed=config.seed,
            k=config.k,
            lookahead=config.prefetch,
            deadline_ms=config.positives_deadline_ms,
            strict=config.positives_strict,
            pool_deadlines=config.pool_deadlines,
            timeout_s=config.positives_timeout_s,
            allow_model_change=config.allow_model_change,
        )

    @classmethod
    def defaults(cls) -> FeedSettings:
        """``clsp train``'s defaults (``TrainConfig``, the one place they are set)."""
        return cls.from_config(TrainConfig.model_construct())


def pinned_params(
    params: GenerationParams, pinned: str | None, allow_model_change: bool
) -> GenerationParams:
    """``params`` with ``pinned`` (a resumed run's model) as ``expect_model``, unless
    ``expect_model`` is set already (it wins) or any model is allowed."""
    if params.expect_model is None and pinned is not None and not allow_model_change:
        return params.model_copy(update={"expect_model": pinned})
    return params


def open_feed(
    positives: str | Sequence[str] | PoolClient | None,
    params: GenerationParams,
    settings: FeedSettings,
    *,
    size: int,
    offline_npy: str | None = None,
    token: str | None = None,
    pinned: str | None = None,
) -> PositivesFeed:
    """The feed of a pool (URLs, or a client of one), or of an offline bank, for a data
    set of ``size`` images; ``pinned``: the model a resumed run keeps."""
    source = build_source(
        positives,
        offline_npy=offline_npy,
        token=token,
        params=pinned_params(params, pinned, settings.allow_model_change),
        timeout_s=settings.timeout_s,
        pin_model=not settings.allow_model_change,
    )
    prefetcher = Prefetcher(
        source,
        lookahead=settings.lookahead,
        deadline_ms=settings.deadline_ms,
        strict=settings.strict,
        pool_deadlines=settings.pool_deadlines,
    )
    return PositivesFeed(prefetcher, size=size, seed=settings.seed, k=settings.k)


class PositivesFeed:
    """Batches of data set indices in, their positives out: ``submit`` a batch as soon as
    its images are known, ``take`` it when its step starts (at most the deadline's wait;
    docs/design.md §5). Batch ids only grow: taking one cancels those below it."""

    def __init__(self, prefetcher: Prefetcher, *, size: int, seed: int, k: int) -> None:
        if k < 1:
            raise ValueError(f"k (candidates per image) must be >= 1, got {k}")
        self.prefetcher = prefetcher
        self.size = size
        self.seed = seed
        self.k = k
        self._draws: dict[int, np.ndarray] = {}

    @property
    def lookahead(self) -> int:
        return self.prefetcher.lookahead

    @property
    def model(self) -> str | None:
        """The model fingerprint the positives are pinned to (a bank's, the pool's)."""
        return getattr(self.prefetcher.source, "model", None)

    def candidates(self, epoch: int, indices: np.ndarray) -> np.ndarray:
        """The candidate index each of ``indices`` takes in ``epoch`` (the last two
        epochs' draws are kept: a look-ahead may straddle a boundary)."""
        if epoch not in self._draws:
            self._draws = {e: d for e, d in self._draws.items() if e >= epoch - 1}
            self._draws[epoch] = epoch_candidates(self.seed, epoch, self.size, self.k)
        return self._draws[epoch][indices]

    def submit(
        self,
        batch_id: int,
        epoch: int,
        indices: np.ndarray,
        anchors: np.ndarray,
        *,
        steps_ahead: int,
    ) -> None:
        """Start fetching the positives of the images ``anchors`` (uint8 [B, H, W, C]),
        data set ``indices``, for the step ``steps_ahead`` steps after the current one."""
        indices = np.asarray(indices, dtype=np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= self.size):
            raise ValueError(
                f"data set indices must lie in [0, {self.size}), got "
                f"{int(indices.min())}..{int(indices.max())}: pass each image's index in "
                "the data set the candidates are drawn over"
            )
        self.prefetcher.submit(
            batch_id,
            anchors,
            indices,
            self.candidates(epoch, indices),
            steps_ahead=steps_ahead,
        )

    def take(self, batch_id: int) -> PositivesBatch:
        return self.prefetcher.take(batch_id)

    def epoch_stats(self) -> dict[str, Any]:
        return self.prefetcher.epoch_stats()

    def running_stats(self) -> dict[str, float]:
        return self.prefetcher.running_stats()

    def close(self) -> None:
        self.prefetcher.close()


class PlannedFeed:
    """``clsp train``'s feed: keeps a ``PositivesFeed`` ``lookahead`` batches ahead across
    epoch boundaries, since the plan of every epoch is known ahead (docs/design.md §5);
    batch ids are global step numbers, and the anchors of step b + L go out while step b
    trains."""

    def __init__(
        self, feed: PositivesFeed, images: Any, sampler: ShardedBatchSampler, *, epochs: int
    ) -> None:
        self.feed = feed
        # uint8 [N, H, W, C], the whole training set, or a set that gives a batch's
        # images by ``anchors(indices)`` (in memory or streamed: trainer/data/streamed.py)
        self._anchors = getattr(images, "anchors", None) or images.__getitem__
        self.sampler = sampler
        self.epochs = epochs
        self.submitted = -1
        self._plans: dict[int, EpochPlan] = {}

    @property
    def model(self) -> str | None:
        return self.feed.model

    def _plan(self, epoch: int) -> EpochPlan:
        if epoch not in self._plans:
            self._plans = {e: p for e, p in self._plans.items() if e >= epoch - 1}
            self._plans[epoch] = self.sampler.plan(epoch)
        return self._plans[epoch]

    def ensure(self, epoch: int, step: int) -> None:
        """Submit every batch up to ``step + L`` (global ids) not yet submitted."""
        spe = self.sampler.steps_per_epoch
        current = epoch * spe + step
        last = min(current + self.feed.lookahead, self.epochs * spe - 1)
        for g in range(max(self.submitted + 1, current), last + 1):
            e, b = divmod(g, spe)
            idx = self._plan(e).batches[b]
            self.feed.submit(g, e, idx, self._anchors(idx), steps_ahead=g - current)
        self.submitted = max(self.submitted, last)

    def take(self, epoch: int, step: int) -> PositivesBatch:
        self.ensure(epoch, step)
        return self.feed.take(epoch * self.sampler.steps_per_epoch + step)

    def epoch_stats(self) -> dict[str, Any]:
        return self.feed.epoch_stats()

    def running_stats(self) -> dict[str, float]:
        return self.feed.running_stats()

    def close(self) -> None:
        self.feed.close()
