"""Backbones and heads: shapes, the small-image stem and the NNCLR predictor."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from clsp_positives.trainer.backbones import (
    build_backbone,
    count_parameters,
    predictor_mlp,
    projection_mlp,
)


def test_resnet18_small_image_stem() -> None:
    net, dim = build_backbone("resnet18", in_channels=1, image_size=16)
    assert dim == 512
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1)
    assert net.conv1.in_channels == 1
    assert isinstance(net.maxpool, nn.Identity)
    net.eval()
    with torch.no_grad():
        assert net(torch.randn(2, 1, 16, 16)).shape == (2, 512)


def test_resnet50_feature_size_and_large_image_stem() -> None:
    net, dim = build_backbone("resnet50", in_channels=3, image_size=96)
    assert dim == 2048
    assert net.conv1.kernel_size == (7, 7) and net.conv1.stride == (2, 2)
    assert not isinstance(net.maxpool, nn.Identity)
    small, _ = build_backbone("resnet50", in_channels=3, image_size=32)
    assert small.conv1.kernel_size == (3, 3) and isinstance(small.maxpool, nn.Identity)


def test_tiny_backbone_is_small_and_works() -> None:
    net, dim = build_backbone("resnet-tiny", in_channels=3, image_size=16)
    assert count_parameters(net) < 200_000
    assert net(torch.randn(4, 3, 16, 16)).shape == (4, dim)


def test_unknown_backbone_names_the_choices() -> None:
    with pytest.raises(ValueError, match="resnet-tiny"):
        build_backbone("vgg", in_channels=3, image_size=32)


def test_heads() -> None:
    proj = projection_mlp(512, 2048, 128)
    assert proj(torch.randn(4, 512)).shape == (4, 128)
    nnclr_proj = projection_mlp(512, 2048, 256, layers=3)
    assert isinstance(nnclr_proj[-1], nn.BatchNorm1d)
    pred = predictor_mlp()
    dims = [m.weight.shape for m in pred if isinstance(m, nn.Linear)]
    assert dims == [torch.Size([4096, 256]), torch.Size([256, 4096])]  # 256-4096-256
