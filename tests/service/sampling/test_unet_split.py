"""The encoder/decoder split reproduces UNet2DModel.forward for many configs."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DModel

from clsp_positives.service.sampling.unet_split import UNetSplit, UnsupportedUNetError

CONFIGS = {
    "attn-1ch-depth2": dict(
        sample_size=16,
        in_channels=1,
        out_channels=1,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    ),
    "attn-3ch-depth3": dict(
        sample_size=16,
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32, 32),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=None,
        downsample_padding=0,
        freq_shift=1,
        flip_sin_to_cos=False,
        norm_eps=1e-6,
    ),
    "no-mid-no-attn-depth4": dict(
        sample_size=16,
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16, 16, 32),
        layers_per_block=1,
        mid_block_type=None,
        down_block_types=("DownBlock2D",) * 4,
        up_block_types=("UpBlock2D",) * 4,
        norm_num_groups=4,
        resnet_time_scale_shift="scale_shift",
        downsample_type="resnet",
        upsample_type="resnet",
    ),
    "skip-fourier-centered": dict(
        sample_size=16,
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 32),
        layers_per_block=1,
        time_embedding_type="fourier",
        center_input_sample=True,
        down_block_types=("SkipDownBlock2D", "AttnSkipDownBlock2D"),
        up_block_types=("AttnSkipUpBlock2D", "SkipUpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=8,
    ),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_split_equals_forward(name: str) -> None:
    torch.manual_seed(0)
    unet = UNet2DModel(**CONFIGS[name]).eval()
    split = UNetSplit(unet)
    c = unet.config.in_channels
    x = torch.randn(3, c, 16, 16)
    fourier = unet.config.time_embedding_type == "fourier"
    for t in [0.5, 7.0] if fourier else [0, 517, 999]:
        step = torch.tensor(t) if fourier else t
        with torch.inference_mode():
            want = unet(x, step).sample
            got = split(x, step)
        assert got.shape == want.shape
        assert (got - want).abs().max().item() <= 1e-5, (name, t)


def test_bottleneck_mix_reaches_output() -> None:
    """Changing only the bottleneck changes the decoded output (the split is wired)."""
    torch.manual_seed(0)
    unet = UNet2DModel(**CONFIGS["attn-1ch-depth2"]).eval()
    split = UNetSplit(unet)
    x = torch.randn(2, 1, 16, 16)
    with torch.inference_mode():
        t = split.timesteps(500, 2)
        emb = split.embed(t)
        enc = split.encode(x, emb)
        base = split.decode(enc, emb, t)
        enc.h = enc.h.flip(0)
        mixed = split.decode(enc, emb, t)
    assert (base - mixed).abs().max().item() > 1e-3


def test_class_conditional_is_refused() -> None:
    unet = UNet2DModel(**CONFIGS["attn-1ch-depth2"], num_class_embeds=10)
    with pytest.raises(UnsupportedUNetError, match="class-conditional"):
        UNetSplit(unet)


def test_other_module_is_refused() -> None:
    with pytest.raises(UnsupportedUNetError, match="UNet2DModel"):
        UNetSplit(torch.nn.Linear(2, 2))  # type: ignore[arg-type]
