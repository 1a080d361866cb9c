"""SimCLR, MoCo v2 and NNCLR, registered over one base that adds the CLSP term (docs/design.md §1).

A method is an ``nn.Module`` whose ``forward(v1, v2, v3, present)`` returns the
loss of one step, so DDP can wrap it whole. ``v3`` holds the augmented synthetic
positives of only the anchors whose positive arrived (None when the step has
none) and ``present`` says which anchors those are: a missing positive never
touches the network, neither its forward pass nor the BatchNorm statistics
(docs/design.md §5). The losses live in ``losses.py``; SimCLR's and the CLSP term's
are called through ``clsp_positives/torch.py``, the entry points a plain PyTorch loop
uses, so both run the same code (docs/library.md).

Each method is one class in ``METHODS`` (solo-learn's shape), registered under
its name with its row of ``METHOD_DEFAULTS`` (``method_defaults.py``, torch-free
so that ``TrainConfig`` reads it too). A method says only what is its own: which
encoder sees which view (``project``), its loss (``base_loss``), the same loss
with the synthetic positive inside its InfoNCE (``contrastive_loss``) and its
state (queue, momentum encoder, support set). The base composes the CLSP term
once for all of them:

* ``similarity`` (default): ``L = L_base + lambda * mean_i (2 - 2 cos(z1_i, z3_i))``
  over anchors with a positive;
* ``contrastive``: the synthetic positive is an extra positive inside the
  InfoNCE, its pairs weighted by lambda.
"""

from __future__ import annotations

import copy
import math
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from clsp_positives.distributed import (
    all_reduce_sum,
    gather_nograd,
    gather_with_grad,
    world_size,
)
from clsp_positives.torch import clsp_contrastive_loss, clsp_similarity_loss, nt_xent
from clsp_positives.trainer import losses
from clsp_positives.trainer.backbones import predictor_mlp, projection_mlp
from clsp_positives.trainer.collapse_monitor import infonce_collapsed, nt_xent_collapsed
from clsp_positives.trainer.config import ClspMode, TrainConfig
from clsp_positives.trainer.method_defaults import METHOD_DEFAULTS, MethodDefaults

CLSP_MODES: tuple[str, ...] = typing.get_args(ClspMode)


def _default(name: str) -> Any:
    """A field's default from ``TrainConfig``, the one place it is defined (docs/design.md §8)."""
    return TrainConfig.model_fields[name].default


@dataclass(frozen=True)
class MethodConfig:
    """The method's share of ``TrainConfig``, resolved; built by ``from_train_config``."""

    name: str = _default("method")
    # None here and for the sizes below: the method's default, filled in by
    # __post_init__ by the rule TrainConfig resolves with (MethodDefaults.with_given).
    temperature: float | None = None
    proj_hidden_dim: int | None = None
    proj_dim: int | None = None  # NNCLR's predictor is proj_dim-4096-proj_dim
    proj_bn: bool = _default("proj_bn")
    pred_hidden_dim: int = _default("pred_hidden_dim")
    clsp_weight: float = _default("clsp_weight")
    clsp_mode: str = _default("clsp_mode")
    queue_size: int | None = None  # capped at the data set size; SimCLR keeps none
    momentum: float = _default("moco_momentum")
    momentum_end: float | None = _default("moco_momentum_end")
    joint_forward: bool = _default("joint_forward")

    @classmethod
    def from_train_config(cls, config: TrainConfig) -> MethodConfig:
        return cls(
            name=config.method,
            temperature=config.resolved_temperature(),
            proj_hidden_dim=config.resolved_proj_hidden_dim(),
            proj_dim=config.resolved_proj_dim(),
            proj_bn=config.proj_bn,
            pred_hidden_dim=config.pred_hidden_dim,
            clsp_weight=config.clsp_weight,
            clsp_mode=config.clsp_mode,
            queue_size=config.resolved_queue_size(),
            momentum=config.moco_momentum,
            momentum_end=config.moco_momentum_end,
            joint_forward=config.joint_forward,
        )

    def __post_init__(self) -> None:
        if self.name not in METHODS:
            raise ValueError(f"unknown method {self.name!r}; choose one of {', '.join(METHODS)}")
        given = {field: getattr(self, field) for field in MethodDefaults._fields}
        for field, value in METHODS[self.name].defaults.with_given(**given)._asdict().items():
            object.__setattr__(self, field, value)
        if self.clsp_mode not in CLSP_MODES:
            raise ValueError(
                f"unknown --clsp-mode {self.clsp_mode!r}; choose one of {', '.join(CLSP_MODES)}"
            )
        if self.clsp_weight < 0:
            raise ValueError(f"--clsp-weight must be >= 0, got {self.clsp_weight}")
        if self.temperature is not None and self.temperature <= 0:
            raise ValueError(f"--temperature must be > 0, got {self.temperature}")

    @property
    def tau(self) -> float:
        assert self.temperature is not None  # filled from the method's defaults in __post_init__
        return self.temperature


@dataclass(frozen=True)
class Positives:
    """The synthetic positives of one step, as the method sees them (docs/design.md §5).

    ``view`` holds the augmented positives of only the anchors whose positive
    arrived (None when none did: a rank under DDP that got none still takes the
    positives' code path, to join its collectives); ``rows`` are those anchors'
    row indices ``[P]`` and ``mask`` the same as a bool ``[B]``.
    """

    view: Tensor | None
    rows: Tensor
    mask: Tensor


@dataclass(frozen=True)
class Projections:
    """One step's outputs of a method's networks, from which the base composes the
    loss, the CLSP term and the spread the loop watches.

    ``anchors`` are what the similarity term pulls toward the positives (z1),
    ``views`` the two base views' projections, ``positives`` the positives'
    ``[P, D]`` (None when none arrived; in the contrastive form, the side of the
    method that scores them as keys), and ``keys`` what else the method's loss
    reads (MoCo's momentum keys, NNCLR's predictions).
    """

    anchors: Tensor
    views: tuple[Tensor, Tensor]
    positives: Tensor | None
    keys: tuple[Tensor | None, ...] = ()


@dataclass
class StepLoss:
    loss: Tensor
    base: Tensor
    clsp: Tensor
    # The spread of the step's projections (losses.z_std), for the loop's collapse
    # check (docs/design.md §5): of the base views, and of the positives that
    # arrived (NaN when fewer than 2 did).
    z_std: Tensor | None = None
    z_std_positives: Tensor | None = None


class ContrastiveMethod(nn.Module):
    """Backbone + projector, the CLSP term and the hooks the loop calls.

    A subclass sets ``name`` (its key in ``METHODS`` and ``METHOD_DEFAULTS``),
    is decorated with ``@register``, which gives it its ``defaults``, and
    implements ``project``, ``base_loss`` and ``contrastive_loss``; ``step``
    composes them with the CLSP term the same way for every method.
    """

    name: ClassVar[str]
    defaults: ClassVar[MethodDefaults]
    projector_layers = 2

    def __init__(self, backbone: nn.Module, feature_dim: int, config: MethodConfig) -> None:
        super().__init__()
        self.config = config
        self.backbone = backbone
        self.feature_dim = feature_dim
        self.projector = projection_mlp(
            feature_dim,
            config.proj_hidden_dim,
            config.proj_dim,
            self.projector_layers,
            batch_norm=config.proj_bn,
        )
        # The share of clsp_weight in force (``set_clsp_scale``): 1 but during a CLSP
        # weight warm-up. Not a buffer: the loop sets it from the step before each one,
        # so a resumed run has it from its position (docs/method.md, "Training dynamics").
        self.clsp_scale = 1.0

    @property
    def uses_positives(self) -> bool:
        return self.config.clsp_weight > 0

    @property
    def clsp_weight(self) -> float:
        """lambda as it weighs this step: the configured weight times the warm-up's share."""
        return self.config.clsp_weight * self.clsp_scale

    def set_clsp_scale(self, scale: float) -> None:
        if not 0.0 <= scale <= 1.0:
            raise ValueError(f"the CLSP weight's share must be in [0, 1], got {scale}")
        self.clsp_scale = float(scale)

    def embed(self, x: Tensor) -> Tensor:
        return self.projector(self.backbone(x))

    def passes(self, fn: Callable[[Tensor], Tensor], *views: Tensor | None) -> list[Tensor | None]:
        """``fn`` of each view: one pass per view, or with ``joint_forward`` one
        pass over their concatenation, split back (BatchNorm in training mode then
        normalises over all of them, as the authors' code does; docs/design.md §5).
        A None view (no positive arrived) is passed over and comes back None."""
        given = [v for v in views if v is not None]
        if self.config.joint_forward and len(given) > 1:
            outs = iter(fn(torch.cat(given)).split([v.shape[0] for v in given]))
        else:
            outs = iter([fn(v) for v in given])
        return [None if v is None else next(outs) for v in views]

    def forward(
        self, v1: Tensor, v2: Tensor, v3: Tensor | None = None, present: Tensor | None = None
    ) -> StepLoss:
        """One step's loss. ``present`` says which anchors ``v3``'s rows belong to:
        their row indices (long ``[P]``, ``v3`` is ``[P, ...]``), or a bool mask
        ``[B]`` (``v3`` holds then either the P present rows or one row per anchor,
        of which the missing ones are dropped unread); None: every anchor has one."""
        return self.step(v1, v2, self._positives(v1, v3, present))

    def _positives(self, v1: Tensor, v3: Tensor | None, present: Tensor | None) -> Positives | None:
        if v3 is None or not self.uses_positives:
            return None
        n, dev = v1.shape[0], v1.device
        if present is None:
            present = torch.arange(v3.shape[0], device=dev)
        present = present.to(dev)
        if present.dtype == torch.bool:
            if present.shape != (n,):
                raise ValueError(f"the mask of positives needs {n} entries, got {present.shape}")
            if v3.shape[0] == n:
                v3 = v3[present]  # one row per anchor: the missing ones are never forwarded
            present = present.nonzero().squeeze(1)
        if v3.shape[0] != present.shape[0]:
            raise ValueError(
                f"{v3.shape[0]} positive views for {present.shape[0]} anchors with a positive"
            )
        if present.shape[0] == 1 and self.training and not self.config.joint_forward:
            # A pass of its own over one image has no BatchNorm statistics: a lone
            # positive is dropped, as if it had not arrived (docs/design.md §5).
            v3, present = v3[:0], present[:0]
        if present.shape[0] == 0 and world_size() == 1:
            return None  # nothing to forward and no other rank to keep in step
        mask = torch.zeros(n, dtype=torch.bool, device=dev).index_fill_(0, present, True)
        return Positives(view=v3 if v3.shape[0] else None, rows=present, mask=mask)

    def step(self, v1: Tensor, v2: Tensor, pos: Positives | None) -> StepLoss:
        """The method's loss with the CLSP term, composed here once for every method:
        in the contrastive form the method's own loss takes the positives inside
        (its pairs weighted by lambda), otherwise the similarity term is added to
        its base loss (nothing when no positive arrived)."""
        inside = pos is not None and self.config.clsp_mode == "contrastive"
        proj = self.project(v1, v2, pos.view if pos is not None else None, inside)
        if inside:
            assert pos is not None
            base = self.contrastive_loss(proj, pos)
            out = StepLoss(loss=base, base=base.detach(), clsp=base.new_zeros(()))
        else:
            out = self.combine(self.base_loss(proj), proj.anchors, proj.positives, pos)
        if self.training:
            self.enqueue(proj)
        return self.with_spread(out, proj.views, proj.positives)

    def project(self, v1: Tensor, v2: Tensor, v3: Tensor | None, inside: bool) -> Projections:
        """The step's forward passes (through ``passes``, so ``joint_forward``
        holds); ``inside``: the positives ``v3`` will be keys of the contrastive form."""
        raise NotImplementedError

    def base_loss(self, proj: Projections) -> Tensor:
        """The method's own loss of the two views."""
        raise NotImplementedError

    def contrastive_loss(self, proj: Projections, pos: Positives) -> Tensor:
        """The method's loss with each anchor's synthetic positive as one more
        positive, its pairs weighted by ``clsp_weight`` (the contrastive form)."""
        raise NotImplementedError

    def enqueue(self, proj: Projections) -> None:
        """After a training step's loss: fill the method's queue (none here)."""

    def collapsed_base_loss(self, rows: int, positives: int) -> float:
        """The base loss with every embedding the same, for ``rows`` anchors of all ranks
        of which ``positives`` have their positive inside the loss (the contrastive
        form): the log of the candidates each row is normalised over, every logit equal
        (trainer/collapse_monitor.py)."""
        raise NotImplementedError

    @staticmethod
    def scatter(z: Tensor | None, pos: Positives, like: Tensor) -> Tensor:
        """The positives' embeddings ``[P, D]`` at their anchors' rows of a zero
        ``[B, D]`` tensor shaped like ``like``, so that every rank gathers the same
        shape whatever its count of positives (docs/design.md §5). Zero rows are
        masked out by every loss. With no positive (a rank that got none) it is a
        zero leaf that asks for a gradient, so the gather's backward, a
        collective, still runs on that rank."""
        full = like.detach().new_zeros(like.shape)
        if z is None:
            return full.requires_grad_(torch.is_grad_enabled())
        return full.index_copy(0, pos.rows, z.to(full.dtype))

    def gathered(self, z: Tensor | None, pos: Positives, like: Tensor) -> tuple[Tensor, Tensor]:
        """The positives' rows of every rank (``scatter`` gathered with gradients)
        and the gathered mask of the anchors that have one."""
        return gather_with_grad(self.scatter(z, pos, like)), gather_nograd(pos.mask)

    def combine(
        self, base: Tensor, z1: Tensor, z3: Tensor | None, pos: Positives | None
    ) -> StepLoss:
        """Similarity mode, or no positives: base + lambda * (2 - 2cos)."""
        if pos is None or self.config.clsp_mode != "similarity":
            zero = base.new_zeros(())
            return StepLoss(loss=base, base=base.detach(), clsp=zero)
        clsp = self._clsp_term(z1, self.scatter(z3, pos, z1), pos.mask)
        return StepLoss(loss=base + self.clsp_weight * clsp, base=base.detach(), clsp=clsp.detach())

    @staticmethod
    def across_ranks(mean: Tensor, weight: Tensor) -> Tensor:
        """This rank's share of a mean over *all* ranks, from its ``mean`` over
        its own ``weight`` (a count of positives, or a sum of pair weights).

        Ranks may receive different numbers of positives, none included; DDP
        averages gradients over W ranks, so rank r uses ``W * S_r / C`` (S_r its
        sum, C the weight of all ranks) and the average is exactly
        ``sum_r S_r / C``.
        """
        world = world_size()
        if world == 1:
            return mean
        weight = weight.detach().to(mean.dtype)
        return mean * weight * world / all_reduce_sum(weight).clamp(min=1e-12)

    def _clsp_term(self, z1: Tensor, z3: Tensor, mask: Tensor) -> Tensor:
        """The similarity term as the mean over the positives of all ranks."""
        return self.across_ranks(clsp_similarity_loss(z1, z3, mask), mask.sum())

    @staticmethod
    def with_spread(out: StepLoss, views: Sequence[Tensor], z3: Tensor | None) -> StepLoss:
        """``out`` with the projection spread of this rank's step: the mean
        ``z_std`` of the base views and that of the positives (``z3`` holds only
        those that arrived; None when none did)."""
        spread = torch.stack([losses.z_std(z) for z in views]).mean()
        positives = losses.z_std(z3) if z3 is not None else None
        return replace(out, z_std=spread, z_std_positives=positives)

    @torch.no_grad()
    def after_step(self, progress: float = 0.0) -> None:
        """Called after each optimizer step (momentum updates); ``progress`` is the
        fraction of the run's optimizer steps done, for schedules."""


METHODS: dict[str, type[ContrastiveMethod]] = {}
"""Every contrastive method by the name ``--method`` takes, filled by ``@register``."""


def register(cls: type[ContrastiveMethod]) -> type[ContrastiveMethod]:
    """Add ``cls`` to ``METHODS`` under its ``name``, with its row of
    ``METHOD_DEFAULTS`` as its ``defaults``: a method without a row there has
    no defaults for ``TrainConfig`` to resolve, and is refused."""
    if cls.name not in METHOD_DEFAULTS:
        raise ValueError(
            f"{cls.__name__}.name {cls.name!r} has no row in METHOD_DEFAULTS "
            "(trainer/method_defaults.py)"
        )
    cls.defaults = METHOD_DEFAULTS[cls.name]
    METHODS[cls.name] = cls
    return cls


@register
class SimCLR(ContrastiveMethod):
    name = "simclr"

    def project(self, v1: Tensor, v2: Tensor, v3: Tensor | None, inside: bool) -> Projections:
        z1, z2, z3 = self.passes(self.embed, v1, v2, v3)
        assert z1 is not None and z2 is not None
        return Projections(anchors=z1, views=(z1, z2), positives=z3)

    def base_loss(self, proj: Projections) -> Tensor:
        z1, z2 = proj.views
        return nt_xent(gather_with_grad(z1), gather_with_grad(z2), self.config.tau)

    def collapsed_base_loss(self, rows: int, positives: int) -> float:
        # NT-Xent: each of the 2N (+ P) rows against all the others.
        return nt_xent_collapsed(2 * rows + positives)

    def contrastive_loss(self, proj: Projections, pos: Positives) -> Tensor:
        z1, z2 = proj.views
        g1, g2 = gather_with_grad(z1), gather_with_grad(z2)
        g3, gmask = self.gathered(proj.positives, pos, z1)
        return clsp_contrastive_loss(g1, g2, g3, gmask, self.config.tau, weight=self.clsp_weight)


class FeatureQueue(nn.Module):
    """A ring buffer of unit-norm embeddings (MoCo's queue, NNCLR's support
    set), kept as buffers so checkpoints carry it."""

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        if size < 1:
            raise ValueError(f"queue size must be >= 1, got {size}")
        init = nn.functional.normalize(torch.randn(size, dim), dim=1)
        self.register_buffer("items", init)
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def push(self, x: Tensor) -> None:
        x = nn.functional.normalize(x.detach().float(), dim=1)
        size = self.items.shape[0]
        if x.shape[0] > size:
            x = x[-size:]
        idx = (self.ptr + torch.arange(x.shape[0], device=x.device)) % size
        self.items[idx] = x.to(self.items.dtype)
        self.ptr.copy_((self.ptr + x.shape[0]) % size)


def momentum_at(start: float, end: float | None, progress: float) -> float:
    """The key encoder's momentum ``progress`` (0..1) through the run: ``start`` when no
    ``end`` is set, else a cosine from ``start`` to ``end`` (BYOL's schedule, which
    solo-learn's MoCo recipes use: 0.99 -> 1.0)."""
    if end is None:
        return start
    return end - (end - start) * (math.cos(math.pi * min(max(progress, 0.0), 1.0)) + 1) / 2


@register
class MoCo(ContrastiveMethod):
    """MoCo v2: momentum key encoder, a queue of negatives filled with the keys
    of all ranks, symmetric loss."""

    name = "moco"

    def __init__(self, backbone: nn.Module, feature_dim: int, config: MethodConfig) -> None:
        super().__init__(backbone, feature_dim, config)
        self.key_backbone = copy.deepcopy(self.backbone)
        self.key_projector = copy.deepcopy(self.projector)
        for p in [*self.key_backbone.parameters(), *self.key_projector.parameters()]:
            p.requires_grad_(False)
        self.queue = FeatureQueue(config.queue_size, config.proj_dim)

    @torch.no_grad()
    def key_embed(self, x: Tensor) -> Tensor:
        return self.key_projector(self.key_backbone(x))

    def _pairs(self):
        return zip(
            [*self.backbone.parameters(), *self.projector.parameters()],
            [*self.key_backbone.parameters(), *self.key_projector.parameters()],
            strict=True,
        )

    @torch.no_grad()
    def after_step(self, progress: float = 0.0) -> None:
        m = momentum_at(self.config.momentum, self.config.momentum_end, progress)
        for q, k in self._pairs():
            k.mul_(m).add_(q.detach(), alpha=1 - m)
        for q, k in zip(
            [*self.backbone.buffers(), *self.projector.buffers()],
            [*self.key_backbone.buffers(), *self.key_projector.buffers()],
            strict=True,
        ):
            k.copy_(q)

    def project(self, v1: Tensor, v2: Tensor, v3: Tensor | None, inside: bool) -> Projections:
        # The positives go through the key encoder in contrastive mode (their key
        # joins the query's positives), through the query encoder in similarity mode.
        q1, q2, z3 = self.passes(self.embed, v1, v2, None if inside else v3)
        k1, k2, k3 = self.passes(self.key_embed, v1, v2, v3 if inside else None)
        assert q1 is not None and q2 is not None and k1 is not None and k2 is not None
        return Projections(
            anchors=q1, views=(q1, q2), positives=k3 if inside else z3, keys=(k1, k2)
        )

    def base_loss(self, proj: Projections) -> Tensor:
        (q1, q2), (k1, k2) = proj.views, proj.keys
        assert k1 is not None and k2 is not None
        negatives, tau = self.queue.items.clone(), self.config.tau
        return 0.5 * (
            losses.infonce(q1, k2, negatives, tau) + losses.infonce(q2, k1, negatives, tau)
        )

    def contrastive_loss(self, proj: Projections, pos: Positives) -> Tensor:
        (q1, q2), (k1, k2) = proj.views, proj.keys
        assert k1 is not None and k2 is not None
        negatives, tau = self.queue.items.clone(), self.config.tau
        keys3 = self.scatter(proj.positives, pos, k1).detach()
        w = torch.stack(
            [
                torch.ones_like(pos.mask, dtype=torch.float32),
                pos.mask.float() * self.clsp_weight,
            ],
            dim=1,
        )
        base = 0.5 * (
            losses.multi_positive_infonce(q1, torch.stack([k2, keys3], 1), negatives, tau, w)
            + losses.multi_positive_infonce(q2, torch.stack([k1, keys3], 1), negatives, tau, w)
        )
        # A mean over this rank's weights, which differ between ranks with
        # their counts of positives: made the mean over all ranks' weights.
        return self.across_ranks(base, w.sum())

    def collapsed_base_loss(self, rows: int, positives: int) -> float:
        # InfoNCE: the key (and, in the contrastive form, the positive's key) among the
        # queue's negatives; the share of queries with two positives averaged in.
        return infonce_collapsed(self.queue.items.shape[0], 1 + positives / max(1, rows))

    def enqueue(self, proj: Projections) -> None:
        self.queue.push(gather_nograd(proj.keys[0]))


@register
class NNCLR(ContrastiveMethod):
    """NNCLR: the nearest neighbour of each view's projection in a support set
    (filled from all ranks) is the positive of the other view's prediction."""

    name = "nnclr"
    projector_layers = 3

    def __init__(self, backbone: nn.Module, feature_dim: int, config: MethodConfig) -> None:
        super().__init__(backbone, feature_dim, config)
        self.predictor = predictor_mlp(config.proj_dim, config.pred_hidden_dim)
        self.support = FeatureQueue(config.queue_size, config.proj_dim)

    def project(self, v1: Tensor, v2: Tensor, v3: Tensor | None, inside: bool) -> Projections:
        z1, z2, z3 = self.passes(self.embed, v1, v2, v3)
        assert z1 is not None and z2 is not None
        # The positives' predictions are keys in contrastive mode only.
        p1, p2, p3 = self.passes(self.predictor, z1, z2, z3 if inside else None)
        return Projections(anchors=z1, views=(z1, z2), positives=z3, keys=(p1, p2, p3))

    def _neighbours_and_predictions(
        self, proj: Projections
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Each view's support-set neighbour and prediction, gathered from every rank."""
        (z1, z2), (p1, p2, _) = proj.views, proj.keys
        assert p1 is not None and p2 is not None
        nn1, _ = losses.nearest_neighbour(z1.detach(), self.support.items)
        nn2, _ = losses.nearest_neighbour(z2.detach(), self.support.items)
        g_nn1, g_nn2 = gather_nograd(nn1), gather_nograd(nn2)
        return g_nn1, g_nn2, gather_with_grad(p1), gather_with_grad(p2)

    def collapsed_base_loss(self, rows: int, positives: int) -> float:
        # Cross-entropy over the batch's N predictions (+ P positives' predictions).
        return math.log(rows + positives)

    def base_loss(self, proj: Projections) -> Tensor:
        g_nn1, g_nn2, g_p1, g_p2 = self._neighbours_and_predictions(proj)
        tau = self.config.tau
        return 0.5 * (losses.nnclr_loss(g_nn1, g_p2, tau) + losses.nnclr_loss(g_nn2, g_p1, tau))

    def contrastive_loss(self, proj: Projections, pos: Positives) -> Tensor:
        g_nn1, g_nn2, g_p1, g_p2 = self._neighbours_and_predictions(proj)
        p1, p3 = proj.keys[0], proj.keys[2]
        assert p1 is not None
        g_p3, gmask = self.gathered(p3, pos, p1)
        n, tau = g_p1.shape[0], self.config.tau
        labels = torch.arange(n, device=g_p1.device)
        key_labels = torch.cat([labels, labels[gmask]])
        key_w = torch.cat(
            [
                torch.ones(n, device=g_p1.device),
                torch.full((int(gmask.sum()),), self.clsp_weight, device=g_p1.device),
            ]
        )
        return 0.5 * (
            losses.multi_positive_cross_entropy(
                g_nn1, torch.cat([g_p2, g_p3[gmask]]), labels, key_labels, tau, key_w
            )
            + losses.multi_positive_cross_entropy(
                g_nn2, torch.cat([g_p1, g_p3[gmask]]), labels, key_labels, tau, key_w
            )
        )

    def enqueue(self, proj: Projections) -> None:
        self.support.push(gather_nograd(proj.views[0]))


def build_method(
    config: MethodConfig, backbone: nn.Module, feature_dim: int, dataset_size: int
) -> ContrastiveMethod:
    """The method object; the queue / support set is capped at the data set size
    (a queue longer than the data set holds stale copies of the same images)."""
    size = config.queue_size
    capped = config if size is None else replace(config, queue_size=max(1, min(size, dataset_size)))
    return METHODS[config.name](backbone, feature_dim, capped)
