"""Tiny UNets, schedules and model directories for tests and benches (seeded)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DModel

from clsp_positives.service.ddpm import presets


def tiny_unet(
    seed: int = 0, *, channels: int = 1, sample_size: int = 16, output_scale: float = 1.0
) -> UNet2DModel:
    """The "tiny" preset with seeded random weights, eval mode, no grads.

    ``output_scale`` scales the output head. A random network is no denoiser:
    the Jacobian of its noise prediction, divided by ``sqrt(alpha_bar)`` at
    high noise, amplifies float32 rounding ~10x per step, so two correct
    samplers drift apart by ~3e-4 after 20 steps. A trained model does not do
    that; scaling the head by 0.2 gives a random model with that property, so a
    comparison against diffusers measures the sampler and not chaos.
    """
    cfg = presets.unet_config("tiny", sample_size=sample_size, channels=channels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DModel(**cfg)
    if output_scale != 1.0:
        with torch.no_grad():
            unet.conv_out.weight.mul_(output_scale)
            unet.conv_out.bias.mul_(output_scale)
    return unet.eval().requires_grad_(False)


def scheduler_config(**overrides: Any) -> dict[str, Any]:
    """DDPM's schedule as diffusers configs usually sample it (leading timesteps, x0
    clipped, fixed_small variance, which the authors' loop overrides), with some keys
    changed: the "model" sampling path then differs from the "authors" one."""
    cfg = presets.default_scheduler_config()
    cfg.update(timestep_spacing="leading", clip_sample=True, variance_type="fixed_small")
    cfg.pop("set_alpha_to_one")  # DDIMScheduler's own default (True)
    cfg.update(overrides)
    return cfg


def random_model_dir(
    out_dir: str | Path,
    preset: str = "tiny",
    sample_size: int = 16,
    channels: int = 1,
    seed: int = 0,
) -> Path:
    """A model directory (``presets.save_model`` layout) with seeded random weights.

    Random weights are no denoiser, but they load, fingerprint and sample like a
    trained model, which is all the service tests and benches need of them.
    """
    cfg = presets.unet_config(preset, sample_size=sample_size, channels=channels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DModel(**cfg)
    return presets.save_model(unet, presets.default_scheduler_config(), out_dir)
