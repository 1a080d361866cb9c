"""SimCLR, MoCo v2 and NNCLR with the CLSP term, on a tiny backbone."""

from __future__ import annotations

import typing

import pytest
import torch
import torch.nn.functional as F

from clsp_positives.trainer import losses
from clsp_positives.trainer.backbones import build_backbone
from clsp_positives.trainer.config import TrainConfig
from clsp_positives.trainer.method_defaults import METHOD_DEFAULTS, METHOD_TITLES
from clsp_positives.trainer.methods import (
    METHODS,
    ContrastiveMethod,
    FeatureQueue,
    MethodConfig,
    MoCo,
    build_method,
    momentum_at,
    register,
)


def _method(name: str, **kw):
    torch.manual_seed(0)
    backbone, dim = build_backbone("resnet-tiny", in_channels=1, image_size=8)
    cfg = MethodConfig(name=name, proj_hidden_dim=32, proj_dim=16, pred_hidden_dim=32, **kw)
    return build_method(cfg, backbone, dim, dataset_size=kw.get("queue_size", 64))


def _views(n: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(n, 1, 8, 8, generator=g) for _ in range(3))  # type: ignore[return-value]


@pytest.mark.parametrize("name", ["simclr", "moco", "nnclr"])
@pytest.mark.parametrize("mode", ["similarity", "contrastive"])
def test_every_method_and_mode_trains(name: str, mode: str) -> None:
    method = _method(name, clsp_weight=0.5, clsp_mode=mode)
    v1, v2, v3 = _views()
    mask = torch.tensor([True, False, True, True, False, True])
    out = method(v1, v2, v3, mask)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    grads = [p.grad for p in method.backbone.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("name", ["simclr", "moco", "nnclr"])
def test_similarity_mode_is_base_plus_weighted_term(name: str) -> None:
    v1, v2, v3 = _views()
    mask = torch.tensor([True, True, False, True, True, True])
    out = _method(name, clsp_weight=0.7)(v1, v2, v3, mask)
    assert out.clsp.item() > 0
    assert out.loss.item() == pytest.approx(out.base.item() + 0.7 * out.clsp.item(), rel=1e-5)
    base_only = _method(name, clsp_weight=0.7)(v1, v2, v3, torch.zeros(6, dtype=torch.bool))
    assert base_only.clsp.item() == 0.0
    assert base_only.loss.item() == pytest.approx(base_only.base.item(), rel=1e-6)


def test_simclr_matches_nt_xent_and_weight_zero_ignores_positives() -> None:
    method = _method("simclr")
    method.eval()  # BatchNorm on running stats: the projections do not depend on the batch
    v1, v2, v3 = _views()
    with torch.no_grad():
        out = method(v1, v2, v3)
        expected = losses.nt_xent(method.embed(v1), method.embed(v2), method.config.tau)
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert out.clsp.item() == 0.0


def test_queue_is_a_ring_of_unit_vectors() -> None:
    q = FeatureQueue(5, 2)
    q.push(torch.tensor([[3.0, 4.0], [0.0, 2.0], [1.0, 0.0]]))
    assert q.ptr.item() == 3
    assert torch.allclose(q.items[:3], torch.tensor([[0.6, 0.8], [0.0, 1.0], [1.0, 0.0]]))
    q.push(torch.tensor([[2.0, 0.0], [0.0, -1.0], [-1.0, 0.0]]))  # wraps around
    assert q.ptr.item() == 1
    assert torch.allclose(q.items[3:], torch.tensor([[1.0, 0.0], [0.0, -1.0]]))
    assert torch.allclose(q.items[0], torch.tensor([-1.0, 0.0]))
    assert torch.allclose(q.items[1], torch.tensor([0.0, 1.0]))  # older entries stay


def test_moco_queue_receives_the_key_of_view_one() -> None:
    method = _method("moco", queue_size=32)
    assert isinstance(method, MoCo)
    v1, v2, _ = _views()
    with torch.no_grad():
        # Train-mode BN uses batch statistics, so the keys are a function of the batch.
        expected = F.normalize(method.key_embed(v1), dim=1)
        method(v1, v2)
        assert method.queue.ptr.item() == 6
        assert torch.allclose(method.queue.items[:6], expected, atol=1e-5)
        method(v1, v2)
        assert method.queue.ptr.item() == 12
        method.eval()
        before = method.queue.items.clone()
        method(v1, v2)  # evaluation does not enqueue
        assert torch.equal(method.queue.items, before) and method.queue.ptr.item() == 12


def test_moco_momentum_update() -> None:
    method = _method("moco", momentum=0.9)
    with torch.no_grad():
        for p in [*method.backbone.parameters(), *method.projector.parameters()]:
            p.add_(1.0)
    q_params = [p.clone() for p in [*method.backbone.parameters(), *method.projector.parameters()]]
    k_before = [
        p.clone() for p in [*method.key_backbone.parameters(), *method.key_projector.parameters()]
    ]
    method.after_step()
    k_after = [*method.key_backbone.parameters(), *method.key_projector.parameters()]
    for q, k0, k1 in zip(q_params, k_before, k_after, strict=True):
        assert torch.allclose(k1, 0.9 * k0 + 0.1 * q, atol=1e-6)
    assert not any(p.requires_grad for p in method.key_backbone.parameters())


def test_moco_momentum_follows_its_cosine_schedule() -> None:
    assert momentum_at(0.99, None, 0.7) == 0.99
    assert momentum_at(0.99, 0.999, 0.0) == pytest.approx(0.99)
    assert momentum_at(0.99, 0.999, 0.5) == pytest.approx(0.9945)
    assert momentum_at(0.99, 0.999, 1.0) == pytest.approx(0.999)
    method = _method("moco", momentum=0.9, momentum_end=1.0)
    with torch.no_grad():
        for p in [*method.backbone.parameters(), *method.projector.parameters()]:
            p.add_(1.0)
    k_before = [p.clone() for p in method.key_backbone.parameters()]
    method.after_step(1.0)  # the end of the run: momentum 1, the keys stay
    for k0, k1 in zip(k_before, method.key_backbone.parameters(), strict=True):
        assert torch.equal(k0, k1)
    method.after_step(0.0)  # the start: momentum 0.9, the keys move
    assert not all(
        torch.equal(k0, k1)
        for k0, k1 in zip(k_before, method.key_backbone.parameters(), strict=True)
    )


def test_nnclr_uses_the_true_nearest_neighbour_and_fills_its_support_set() -> None:
    method = _method("nnclr", queue_size=40)
    assert method.support.items.shape == (40, 16)
    v1, v2, _ = _views()
    method.eval()
    with torch.no_grad():
        z1 = method.embed(v1)
        support = method.support.items
        _, idx = losses.nearest_neighbour(z1, support)
        cos = F.normalize(z1, dim=1) @ F.normalize(support, dim=1).T
        assert torch.equal(idx, cos.argmax(dim=1))
        # Plant an exact copy of z1[2] in the support set: it must become its neighbour.
        method.support.items[17] = F.normalize(z1[2], dim=0)
        _, idx2 = losses.nearest_neighbour(z1, method.support.items)
        assert idx2[2].item() == 17
        # The loss the method computes is the NNCLR loss with those neighbours.
        nn1, _ = losses.nearest_neighbour(z1, method.support.items)
        nn2, _ = losses.nearest_neighbour(method.embed(v2), method.support.items)
        p1, p2 = method.predictor(z1), method.predictor(method.embed(v2))
        tau = method.config.tau
        expected = 0.5 * (losses.nnclr_loss(nn1, p2, tau) + losses.nnclr_loss(nn2, p1, tau))
        assert method(v1, v2).loss.item() == pytest.approx(expected.item(), rel=1e-5)
    method.train()
    with torch.no_grad():
        method(v1, v2)
    assert method.support.ptr.item() == 6


def test_queue_and_support_set_are_capped_at_the_data_set_size() -> None:
    backbone, dim = build_backbone("resnet-tiny", in_channels=1, image_size=8)
    cfg = MethodConfig(name="moco", proj_hidden_dim=8, proj_dim=4)
    assert build_method(cfg, backbone, dim, dataset_size=100).queue.items.shape == (100, 4)


def test_config_errors_name_the_option() -> None:
    with pytest.raises(ValueError, match="--clsp-mode"):
        MethodConfig(clsp_mode="both")
    with pytest.raises(ValueError, match="unknown method"):
        MethodConfig(name="byol")
    assert MethodConfig(name="nnclr").tau == 0.2


@pytest.mark.parametrize("name", ["simclr", "moco", "nnclr"])
@pytest.mark.parametrize("mode", ["similarity", "contrastive"])
def test_every_step_reports_the_spread_of_its_projections(name: str, mode: str) -> None:
    v1, v2, v3 = _views()
    method = _method(name, clsp_weight=0.5, clsp_mode=mode)
    out = method(v1, v2, v3, torch.tensor([True, False, True, True, False, True]))
    assert out.z_std is not None and 0.0 < out.z_std.item() < 2.0
    assert not out.z_std.requires_grad
    assert out.z_std_positives is not None and 0.0 < out.z_std_positives.item() < 2.0
    two = method(v1, v2, v3, torch.tensor([True, False, False, False, False, True]))
    assert two.z_std_positives is not None and torch.isfinite(two.z_std_positives)
    method.eval()  # a lone positive is forwarded only outside training (see below)
    one = method(v1, v2, v3, torch.tensor([True, False, False, False, False, False]))
    assert one.z_std_positives is not None and torch.isnan(one.z_std_positives)
    method.train()
    baseline = method(v1, v2)
    assert baseline.z_std is not None and baseline.z_std_positives is None


@pytest.mark.parametrize("name", ["simclr", "moco", "nnclr"])
@pytest.mark.parametrize("mode", ["similarity", "contrastive"])
def test_a_lone_positive_is_dropped_in_training_unless_the_pass_is_joint(
    name: str, mode: str
) -> None:
    # BatchNorm in training mode has no statistics of a pass over one image.
    v1, v2, v3 = _views()
    lone = torch.tensor([False, False, False, True, False, False])
    out = _method(name, clsp_weight=0.5, clsp_mode=mode)(v1, v2, v3, lone)
    none = _method(name, clsp_weight=0.5, clsp_mode=mode)(v1, v2)
    assert out.z_std_positives is None
    assert out.loss.item() == pytest.approx(none.loss.item(), rel=1e-6)
    joint = _method(name, clsp_weight=0.5, clsp_mode=mode, joint_forward=True)
    kept = joint(v1, v2, v3, lone)
    assert kept.z_std_positives is not None and torch.isnan(kept.z_std_positives)
    if mode == "similarity":
        assert kept.clsp.item() > 0


def test_positive_views_must_match_their_anchors() -> None:
    method = _method("simclr", clsp_weight=0.5)
    v1, v2, v3 = _views()
    with pytest.raises(ValueError, match="3 positive views for 2 anchors"):
        method(v1, v2, v3[:3], torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="6 entries"):
        method(v1, v2, v3, torch.ones(5, dtype=torch.bool))


def test_the_registry_is_the_list_of_methods() -> None:
    """``--method`` takes the registry's names; each class carries its row of defaults."""
    names = list(METHODS)
    assert names == list(METHOD_DEFAULTS) == list(METHOD_TITLES)
    assert list(typing.get_args(TrainConfig.model_fields["method"].annotation)) == names
    for name, cls in METHODS.items():
        assert cls.name == name and cls.__name__ == METHOD_TITLES[name]
        assert cls.defaults is METHOD_DEFAULTS[name]
        assert type(_method(name)) is cls


def test_a_method_without_defaults_is_refused() -> None:
    class Byol(ContrastiveMethod):
        name = "byol"

    with pytest.raises(ValueError, match="no row in METHOD_DEFAULTS"):
        register(Byol)
    assert "byol" not in METHODS
