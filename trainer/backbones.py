"""Backbones, projection heads and the NNCLR predictor.

ResNets come from torchvision with the small-image stem (3x3 conv, stride 1,
no max-pool) for images of 32x32 and smaller: the ImageNet stem would shrink a
32x32 image to 8x8 before the first block and throw away most of it.
"""

from __future__ import annotations

import torch
from torch import nn

BACKBONES = ("resnet18", "resnet50", "resnet-tiny")
SMALL_IMAGE_MAX = 32


class TinyConvNet(nn.Module):
    """A ~100k-parameter CNN for tests and CPU demos: three conv stages and a
    global average pool."""

    def __init__(self, in_channels: int, width: int = 32) -> None:
        super().__init__()

        def stage(cin: int, cout: int, stride: int) -> list[nn.Module]:
            return [
                nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
            ]

        self.features = nn.Sequential(
            *stage(in_channels, width, 1),
            *stage(width, 2 * width, 2),
            *stage(2 * width, 4 * width, 2),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.out_dim = 4 * width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


def _resnet(name: str, in_channels: int, image_size: int) -> tuple[nn.Module, int]:
    from torchvision.models import resnet18, resnet50

    net = resnet18() if name == "resnet18" else resnet50()
    if image_size <= SMALL_IMAGE_MAX:
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    elif in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    out_dim = net.fc.in_features
    net.fc = nn.Identity()
    return net, out_dim


def build_backbone(name: str, *, in_channels: int, image_size: int) -> tuple[nn.Module, int]:
    """A feature extractor ``[B, C, H, W] -> [B, F]`` and its feature size F."""
    if in_channels < 1:
        raise ValueError(f"in_channels must be >= 1, got {in_channels}")
    if name == "resnet-tiny":
        net = TinyConvNet(in_channels)
        return net, net.out_dim
    if name in ("resnet18", "resnet50"):
        return _resnet(name, in_channels, image_size)
    raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")


def projection_mlp(
    in_dim: int, hidden_dim: int, out_dim: int, layers: int = 2, *, batch_norm: bool = True
) -> nn.Sequential:
    """SimCLR/MoCo v2 projector (``layers=2``) or NNCLR's (``layers=3``, BN on
    the output): Linear-BN-ReLU blocks then a final Linear. ``batch_norm=False`` drops the
    hidden blocks' BatchNorm: the CLSP authors' Linear-ReLU-Linear (docs/method.md)."""
    if layers < 2:
        raise ValueError("a projection MLP has at least 2 layers")
    mods: list[nn.Module] = []
    dim = in_dim
    for _ in range(layers - 1):
        norm: list[nn.Module] = [nn.BatchNorm1d(hidden_dim)] if batch_norm else []
        mods += [nn.Linear(dim, hidden_dim), *norm, nn.ReLU(inplace=True)]
        dim = hidden_dim
    mods.append(nn.Linear(dim, out_dim))
    if layers >= 3:
        mods.append(nn.BatchNorm1d(out_dim))
    return nn.Sequential(*mods)


def predictor_mlp(dim: int = 256, hidden_dim: int = 4096) -> nn.Sequential:
    """NNCLR's predictor, 256-4096-256 by default."""
    return nn.Sequential(
        nn.Linear(dim, hidden_dim),
        nn.BatchNorm1d(hidden_dim),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, dim),
    )


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
