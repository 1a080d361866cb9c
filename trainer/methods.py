"""SimCLR, MoCo v2 and NNCLR over one base, each with the CLSP term (docs/design.md §1).

A method is an ``nn.Module`` whose ``forward(v1, v2, v3, mask)`` returns the
loss of one step, so DDP can wrap it whole. ``v3`` is the augmented synthetic
positive (None when the step has none) and ``mask`` says which anchors' positive
arrived. The losses live in ``losses.py``; a method only picks views, keeps its
own state (queue, momentum encoder, support set) and gathers across ranks.

CLSP modes:

* ``similarity`` (default): ``L = L_base + lambda * mean_i (2 - 2 cos(z1_i, z3_i))``
  over anchors with a positive;
* ``contrastive``: the synthetic positive is an extra positive inside the
  InfoNCE, its pairs weighted by lambda.
"""

from __future__ import annotations

import copy
import typing
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from clsp_positives.trainer import losses
from clsp_positives.trainer.backbones import predictor_mlp, projection_mlp
from clsp_positives.trainer.config import (
    DEFAULT_TEMPERATURE,
    METHOD_DEFAULTS,
    ClspMode,
    MethodName,
    TrainConfig,
)
from clsp_positives.trainer.distributed import (
    all_reduce_sum,
    gather_nograd,
    gather_with_grad,
    world_size,
)

METHODS: tuple[str, ...] = typing.get_args(MethodName)
CLSP_MODES: tuple[str, ...] = typing.get_args(ClspMode)


def _default(name: str) -> Any:
    """A field's default from ``TrainConfig``, the one place it is defined (docs/design.md §8)."""
    return TrainConfig.model_fields[name].default


@dataclass(frozen=True)
class MethodConfig:
    """The method's share of ``TrainConfig``, resolved; built by ``from_train_config``."""

    name: str = _default("method")
    # None here and for the sizes below: the method's default (METHOD_DEFAULTS),
    # filled in by __post_init__.
    temperature: float | None = None
    proj_hidden_dim: int | None = None
    proj_dim: int | None = None  # NNCLR's predictor is proj_dim-4096-proj_dim
    pred_hidden_dim: int = _default("pred_hidden_dim")
    clsp_weight: float = _default("clsp_weight")
    clsp_mode: str = _default("clsp_mode")
    queue_size: int | None = None  # capped at the data set size; SimCLR keeps none
    momentum: float = _default("moco_momentum")

    @classmethod
    def from_train_config(cls, config: TrainConfig) -> MethodConfig:
        return cls(
            name=config.method,
            temperature=config.resolved_temperature(),
            proj_hidden_dim=config.resolved_proj_hidden_dim(),
            proj_dim=config.resolved_proj_dim(),
            pred_hidden_dim=config.pred_hidden_dim,
            clsp_weight=config.clsp_weight,
            clsp_mode=config.clsp_mode,
            queue_size=config.resolved_queue_size(),
            momentum=config.moco_momentum,
        )

    def __post_init__(self) -> None:
        if self.name not in METHODS:
            raise ValueError(f"unknown method {self.name!r}; choose one of {', '.join(METHODS)}")
        defaults = METHOD_DEFAULTS[self.name]
        for field in ("temperature", "proj_hidden_dim", "proj_dim", "queue_size"):
            if getattr(self, field) is None:
                object.__setattr__(self, field, getattr(defaults, field))
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
        return self.temperature if self.temperature is not None else DEFAULT_TEMPERATURE[self.name]


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
    """Backbone + projector, the CLSP term and the hooks the loop calls."""

    projector_layers = 2

    def __init__(self, backbone: nn.Module, feature_dim: int, config: MethodConfig) -> None:
        super().__init__()
        self.config = config
        self.backbone = backbone
        self.feature_dim = feature_dim
        self.projector = projection_mlp(
            feature_dim, config.proj_hidden_dim, config.proj_dim, self.projector_layers
        )

    @property
    def uses_positives(self) -> bool:
        return self.config.clsp_weight > 0

    def embed(self, x: Tensor) -> Tensor:
        return self.projector(self.backbone(x))

    def forward(
        self, v1: Tensor, v2: Tensor, v3: Tensor | None = None, mask: Tensor | None = None
    ) -> StepLoss:
        if v3 is not None and mask is None:
            mask = torch.ones(v1.shape[0], dtype=torch.bool, device=v1.device)
        if not self.uses_positives:
            v3 = None
        if v3 is None:
            mask = torch.zeros(v1.shape[0], dtype=torch.bool, device=v1.device)
        return self.step(v1, v2, v3, mask.to(v1.device))

    def step(self, v1: Tensor, v2: Tensor, v3: Tensor | None, mask: Tensor) -> StepLoss:
        raise NotImplementedError

    def combine(self, base: Tensor, z1: Tensor, z3: Tensor | None, mask: Tensor) -> StepLoss:
        """Similarity mode, or no positives: base + lambda * (2 - 2cos)."""
        if z3 is None or self.config.clsp_mode != "similarity":
            zero = base.new_zeros(())
            return StepLoss(loss=base, base=base.detach(), clsp=zero)
        clsp = self._clsp_term(z1, z3, mask)
        return StepLoss(
            loss=base + self.config.clsp_weight * clsp, base=base.detach(), clsp=clsp.detach()
        )

    @staticmethod
    def _clsp_term(z1: Tensor, z3: Tensor, mask: Tensor) -> Tensor:
        """The similarity term as the mean over the positives of *all* ranks.

        Ranks may receive different numbers of positives; DDP averages
        gradients over W ranks, so rank r uses ``W * S_r / C`` (S_r its sum,
        C the global count) and the average is exactly ``sum_r S_r / C``.
        """
        term = losses.clsp_similarity_term(z1, z3, mask)
        world = world_size()
        if world == 1:
            return term
        local = mask.sum().clamp(min=1).to(term.dtype)
        total = all_reduce_sum(mask.sum().to(term.dtype)).clamp(min=1)
        return term * local * world / total

    @staticmethod
    def with_spread(
        out: StepLoss, views: Sequence[Tensor], z3: Tensor | None, mask: Tensor
    ) -> StepLoss:
        """``out`` with the projection spread of this rank's step: the mean
        ``z_std`` of the base views and that of the positives that arrived."""
        spread = torch.stack([losses.z_std(z) for z in views]).mean()
        positives = losses.z_std(z3, mask) if z3 is not None else None
        return replace(out, z_std=spread, z_std_positives=positives)

    @torch.no_grad()
    def after_step(self) -> None:
        """Called after each optimizer step (momentum updates)."""


class SimCLR(ContrastiveMethod):
    def step(self, v1: Tensor, v2: Tensor, v3: Tensor | None, mask: Tensor) -> StepLoss:
        tau = self.config.tau
        z1, z2 = self.embed(v1), self.embed(v2)
        z3 = self.embed(v3) if v3 is not None else None
        g1, g2 = gather_with_grad(z1), gather_with_grad(z2)
        if z3 is not None and self.config.clsp_mode == "contrastive":
            g3, gmask = gather_with_grad(z3), gather_nograd(mask)
            labels = torch.arange(g1.shape[0], device=g1.device)
            base = losses.multi_positive_nt_xent(
                [g1, g2, g3[gmask]],
                [labels, labels, labels[gmask]],
                tau,
                view_weights=[1.0, 1.0, self.config.clsp_weight],
            )
            out = StepLoss(loss=base, base=base.detach(), clsp=base.new_zeros(()))
        else:
            out = self.combine(losses.nt_xent(g1, g2, tau), z1, z3, mask)
        return self.with_spread(out, [z1, z2], z3, mask)


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


class MoCo(ContrastiveMethod):
    """MoCo v2: momentum key encoder, a queue of negatives filled with the keys
    of all ranks, symmetric loss."""

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
    def after_step(self) -> None:
        m = self.config.momentum
        for q, k in self._pairs():
            k.mul_(m).add_(q.detach(), alpha=1 - m)
        for q, k in zip(
            [*self.backbone.buffers(), *self.projector.buffers()],
            [*self.key_backbone.buffers(), *self.key_projector.buffers()],
            strict=True,
        ):
            k.copy_(q)

    def step(self, v1: Tensor, v2: Tensor, v3: Tensor | None, mask: Tensor) -> StepLoss:
        tau = self.config.tau
        q1, q2 = self.embed(v1), self.embed(v2)
        k1, k2 = self.key_embed(v1), self.key_embed(v2)
        negatives = self.queue.items.clone()
        z3: Tensor | None = None
        if v3 is not None and self.config.clsp_mode == "contrastive":
            k3 = z3 = self.key_embed(v3)
            w = torch.stack(
                [
                    torch.ones_like(mask, dtype=torch.float32),
                    mask.float() * self.config.clsp_weight,
                ],
                dim=1,
            )
            base = 0.5 * (
                losses.multi_positive_infonce(q1, torch.stack([k2, k3], 1), negatives, tau, w)
                + losses.multi_positive_infonce(q2, torch.stack([k1, k3], 1), negatives, tau, w)
            )
            out = StepLoss(loss=base, base=base.detach(), clsp=base.new_zeros(()))
        else:
            base = 0.5 * (
                losses.infonce(q1, k2, negatives, tau) + losses.infonce(q2, k1, negatives, tau)
            )
            z3 = self.embed(v3) if v3 is not None else None
            out = self.combine(base, q1, z3, mask)
        if self.training:
            self.queue.push(gather_nograd(k1))
        return self.with_spread(out, [q1, q2], z3, mask)


class NNCLR(ContrastiveMethod):
    """NNCLR: the nearest neighbour of each view's projection in a support set
    (filled from all ranks) is the positive of the other view's prediction."""

    projector_layers = 3

    def __init__(self, backbone: nn.Module, feature_dim: int, config: MethodConfig) -> None:
        super().__init__(backbone, feature_dim, config)
        self.predictor = predictor_mlp(config.proj_dim, config.pred_hidden_dim)
        self.support = FeatureQueue(config.queue_size, config.proj_dim)

    def step(self, v1: Tensor, v2: Tensor, v3: Tensor | None, mask: Tensor) -> StepLoss:
        tau = self.config.tau
        z1, z2 = self.embed(v1), self.embed(v2)
        p1, p2 = self.predictor(z1), self.predictor(z2)
        support = self.support.items
        nn1, _ = losses.nearest_neighbour(z1.detach(), support)
        nn2, _ = losses.nearest_neighbour(z2.detach(), support)
        g_nn1, g_nn2 = gather_nograd(nn1), gather_nograd(nn2)
        g_p1, g_p2 = gather_with_grad(p1), gather_with_grad(p2)
        z3 = self.embed(v3) if v3 is not None else None
        if z3 is not None and self.config.clsp_mode == "contrastive":
            p3 = self.predictor(z3)
            g_p3, gmask = gather_with_grad(p3), gather_nograd(mask)
            n = g_p1.shape[0]
            labels = torch.arange(n, device=g_p1.device)
            key_labels = torch.cat([labels, labels[gmask]])
            key_w = torch.cat(
                [
                    torch.ones(n, device=g_p1.device),
                    torch.full((int(gmask.sum()),), self.config.clsp_weight, device=g_p1.device),
                ]
            )
            base = 0.5 * (
                losses.multi_positive_cross_entropy(
                    g_nn1, torch.cat([g_p2, g_p3[gmask]]), labels, key_labels, tau, key_w
                )
                + losses.multi_positive_cross_entropy(
                    g_nn2, torch.cat([g_p1, g_p3[gmask]]), labels, key_labels, tau, key_w
                )
            )
            out = StepLoss(loss=base, base=base.detach(), clsp=base.new_zeros(()))
        else:
            base = 0.5 * (losses.nnclr_loss(g_nn1, g_p2, tau) + losses.nnclr_loss(g_nn2, g_p1, tau))
            out = self.combine(base, z1, z3, mask)
        if self.training:
            self.support.push(gather_nograd(z1))
        return self.with_spread(out, [z1, z2], z3, mask)


def build_method(
    config: MethodConfig, backbone: nn.Module, feature_dim: int, dataset_size: int
) -> ContrastiveMethod:
    """The method object; the queue / support set is capped at the data set size
    (a queue longer than the data set holds stale copies of the same images)."""
    size = config.queue_size
    capped = config if size is None else replace(config, queue_size=max(1, min(size, dataset_size)))
    cls = {"simclr": SimCLR, "moco": MoCo, "nnclr": NNCLR}[config.name]
    return cls(backbone, feature_dim, capped)
