"""Named UNet configs, the default noise schedule, and saving a model directory.

A model directory is the diffusers ``save_pretrained`` layout of a DDPM
pipeline (``DIR/unet`` and ``DIR/scheduler``), so every model this project
trains loads in diffusers unchanged and any diffusers DDPM loads here.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from diffusers import DDPMScheduler, UNet2DModel

_PRESETS: dict[str, dict[str, Any]] = {
    # Tests, the demo and the digits quality run: ~0.7 M parameters, attention at
    # the 8x8 bottleneck. A shallow bottleneck keeps the anchor's class: the
    # quality search found 0.73 here against 0.55-0.59 for "small" (4x4) and
    # 0.14 for a 2x2 bottleneck (docs/performance.md).
    "tiny": {
        "block_out_channels": [32, 64],
        "layers_per_block": 1,
        "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
        "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
        "norm_num_groups": 8,
        "attention_head_dim": None,
    },
    # Three levels, attention only at the 4x4 bottleneck where it is cheap,
    # ~2.7 M parameters.
    "small": {
        "block_out_channels": [32, 64, 128],
        "layers_per_block": 1,
        "down_block_types": ["DownBlock2D", "DownBlock2D", "AttnDownBlock2D"],
        "up_block_types": ["AttnUpBlock2D", "UpBlock2D", "UpBlock2D"],
        "norm_num_groups": 16,
        "attention_head_dim": None,
    },
    # The config of google/ddpm-cifar10-32 (35.7 M parameters).
    "ddpm-cifar10": {
        "act_fn": "silu",
        "attention_head_dim": None,
        "block_out_channels": [128, 256, 256, 256],
        "center_input_sample": False,
        "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
        "downsample_padding": 0,
        "flip_sin_to_cos": False,
        "freq_shift": 1,
        "layers_per_block": 2,
        "mid_block_scale_factor": 1,
        "norm_eps": 1e-06,
        "norm_num_groups": 32,
        "time_embedding_type": "positional",
        "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    },
    # After the CLSP authors' 64x64 STL-10 model: base width 192, multipliers
    # [1, 2, 3, 4], attention at the second and third levels (32x32 and 16x16 for
    # 64x64 images), two residual blocks per level. Sample it with the authors'
    # setting, DDIM 200 steps, eta 0.1, w 0.1 (``SAMPLING_SETTINGS``; docs/latent.md).
    "stl10-64": {
        "block_out_channels": [192, 384, 576, 768],
        "layers_per_block": 2,
        "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
        "norm_num_groups": 32,
        "attention_head_dim": None,
    },
}

PRESETS: tuple[str, ...] = tuple(_PRESETS)

SAMPLING_SETTINGS: dict[str, dict[str, Any]] = {
    "stl10-64": {"steps": 200, "eta": 0.1, "interpolation_weight": 0.1, "method": "ddim"},
}
"""The generation params the authors sample a preset's model with, where they
published one (request ``params``; the others use ``GenerationParams``' defaults)."""


def unet_config(preset: str, *, sample_size: int, channels: int) -> dict[str, Any]:
    """``UNet2DModel`` keyword arguments of a named preset for this image size and channels."""
    if preset not in _PRESETS:
        raise ValueError(f"unknown UNet preset {preset!r}; choose one of {', '.join(PRESETS)}")
    cfg = copy.deepcopy(_PRESETS[preset])
    depth = len(cfg["block_out_channels"])
    if sample_size % (2 ** (depth - 1)):
        raise ValueError(
            f"preset {preset!r} halves the image {depth - 1} times, so sample_size must be a "
            f"multiple of {2 ** (depth - 1)}, got {sample_size}"
        )
    if channels < 1:
        raise ValueError(f"channels must be >= 1, got {channels}")
    cfg.update(sample_size=sample_size, in_channels=channels, out_channels=channels)
    return cfg


def default_scheduler_config() -> dict[str, Any]:
    """DDPM's schedule (linear betas 1e-4..0.02, T=1000, epsilon), sampled as the CLSP
    authors' loop does: trailing timesteps, no x0 clipping, alpha_bar 1 after the last
    step and beta_t as the DDPM variance, so that a model trained here samples alike
    whether a service keeps its config (``sampling="model"``) or overrides it with
    ``schedule.AUTHORS_OVERRIDES`` (docs/design.md §1)."""
    return {
        "num_train_timesteps": 1000,
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "beta_schedule": "linear",
        "prediction_type": "epsilon",
        "variance_type": "fixed_large",
        "clip_sample": False,
        "clip_sample_range": 1.0,
        "set_alpha_to_one": True,
        "timestep_spacing": "trailing",
        "steps_offset": 0,
    }


def save_model(unet: UNet2DModel, scheduler_config: dict[str, Any], out_dir: str | Path) -> Path:
    """Write ``out_dir/unet`` and ``out_dir/scheduler`` as ``DDPMPipeline.save_pretrained`` does."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(out / "unet")
    DDPMScheduler.from_config(scheduler_config).save_pretrained(out / "scheduler")
    return out
