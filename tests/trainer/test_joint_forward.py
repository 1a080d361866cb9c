"""``joint_forward``: [v1; v2; positives] through the network in one pass, as the
CLSP authors' code does, beside the default of one pass per view (docs/design.md §5)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from clsp_positives.trainer.backbones import build_backbone
from clsp_positives.trainer.config import TrainConfig
from clsp_positives.trainer.methods import MethodConfig, build_method

B = 6
PRESENT = torch.tensor([0, 2, 3, 5])


def _method(name: str, mode: str, joint: bool):
    torch.manual_seed(0)
    backbone, dim = build_backbone("resnet-tiny", in_channels=1, image_size=8)
    cfg = MethodConfig(
        name=name, proj_hidden_dim=32, proj_dim=16, pred_hidden_dim=32, queue_size=64,
        clsp_weight=0.5, clsp_mode=mode, joint_forward=joint,
    )  # fmt: skip
    return build_method(cfg, backbone, dim, dataset_size=64)


def _views() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(4)
    v1, v2 = (torch.randn(B, 1, 8, 8, generator=g) for _ in range(2))
    return v1, v2, torch.randn(len(PRESENT), 1, 8, 8, generator=g)


def _bn_stats(method: nn.Module) -> list[torch.Tensor]:
    return [
        t.clone()
        for m in method.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
        for t in (m.running_mean, m.running_var)
    ]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.allclose(x, y, atol=1e-5, rtol=1e-5) for x, y in zip(a, b, strict=True))


CASES = [(n, m) for n in ("simclr", "moco", "nnclr") for m in ("similarity", "contrastive")]


@pytest.mark.parametrize(("name", "mode"), CASES)
def test_joint_differs_in_training_and_equals_per_view_in_eval(name: str, mode: str) -> None:
    v1, v2, v3 = _views()
    per_view, joint = _method(name, mode, False), _method(name, mode, True)
    with torch.no_grad():
        a, b = per_view(v1, v2, v3, PRESENT), joint(v1, v2, v3, PRESENT)
    # Training mode: BatchNorm normalises over the union, so the loss moves.
    assert abs(a.loss.item() - b.loss.item()) > 1e-4
    # Evaluation mode (fresh copies: the step above moved their running statistics).
    per_view, joint = _method(name, mode, False).eval(), _method(name, mode, True).eval()
    with torch.no_grad():
        a, b = per_view(v1, v2, v3, PRESENT), joint(v1, v2, v3, PRESENT)
    assert a.loss.item() == pytest.approx(b.loss.item(), abs=1e-5)
    assert a.clsp.item() == pytest.approx(b.clsp.item(), abs=1e-5)
    assert a.z_std is not None and b.z_std is not None
    assert a.z_std.item() == pytest.approx(b.z_std.item(), abs=1e-5)


@pytest.mark.parametrize(("name", "mode"), CASES)
def test_a_joint_step_has_the_statistics_of_one_pass_over_the_concatenation(
    name: str, mode: str
) -> None:
    v1, v2, v3 = _views()
    joint = _method(name, mode, True)
    joint(v1, v2, v3, PRESENT).loss.backward()
    ref = _method(name, mode, True)
    both, all_three = torch.cat([v1, v2]), torch.cat([v1, v2, v3])
    contrastive = mode == "contrastive"
    with torch.no_grad():
        if name == "moco":  # the positives go through the key encoder in contrastive mode
            ref.embed(both if contrastive else all_three)
            ref.key_embed(all_three if contrastive else both)
        elif name == "nnclr":  # the positives' predictions are needed in contrastive mode
            z = ref.embed(all_three)
            ref.predictor(z if contrastive else z[: 2 * B])
        else:
            ref.embed(all_three)
    assert _same(_bn_stats(joint), _bn_stats(ref))
    per_view = _method(name, mode, False)
    per_view(v1, v2, v3, PRESENT)
    assert not _same(_bn_stats(per_view), _bn_stats(ref))


def test_joint_forward_is_off_by_default_and_reaches_the_method() -> None:
    assert TrainConfig().joint_forward is False
    assert MethodConfig().joint_forward is False
    config = TrainConfig(joint_forward=True)
    assert MethodConfig.from_train_config(config).joint_forward is True
