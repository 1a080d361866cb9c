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


def tiny_autoencoder(kind: str, seed: int = 0, *, channels: int = 3, latent_channels: int = 4):
    """A seeded random AutoencoderKL ("kl") or VQModel ("vq") that downsamples 4x
    (three encoder blocks): 64x64 pictures <-> 16x16 latents, ~0.1 M parameters."""
    from diffusers import AutoencoderKL, VQModel

    common = dict(
        in_channels=channels,
        out_channels=channels,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(8, 16, 16),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=64,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if kind == "kl":
            model = AutoencoderKL(**common, scaling_factor=0.5)
        else:
            model = VQModel(**common, num_vq_embeddings=32, vq_embed_dim=latent_channels)
    return model.eval().requires_grad_(False)


def latent_model_dir(
    out_dir: str | Path,
    kind: str = "kl",
    *,
    latent_size: int = 16,
    latent_channels: int = 4,
    seed: int = 0,
    output_scale: float = 1.0,
    scheduler: dict[str, Any] | None = None,
) -> Path:
    """A latent model in the diffusers pipeline layout: ``unet/``, ``scheduler/`` and
    ``vae/`` (an AutoencoderKL, kind "kl") or ``vqvae/`` (a VQModel, as
    ``LDMPipeline`` saves it), all seeded random; ``scheduler`` replaces the
    default scheduler config."""
    unet = tiny_unet(
        seed, channels=latent_channels, sample_size=latent_size, output_scale=output_scale
    )
    config = scheduler if scheduler is not None else presets.default_scheduler_config()
    out = presets.save_model(unet, config, out_dir)
    ae = tiny_autoencoder(kind, seed + 1, latent_channels=latent_channels)
    ae.save_pretrained(out / ("vae" if kind == "kl" else "vqvae"))
    return out


def ddpm_pipeline_dir(out_dir: str | Path, seed: int = 0) -> Path:
    """``random_model_dir``'s model saved by diffusers' own ``DDPMPipeline.save_pretrained``:
    ``model_index.json``, ``unet/`` and ``scheduler/``, the layout of
    google/ddpm-cifar10-32."""
    from diffusers import DDPMPipeline, DDPMScheduler

    unet = tiny_unet(seed)
    scheduler = DDPMScheduler.from_config(presets.default_scheduler_config())
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(out_dir)
    return Path(out_dir)


def ldm_pipeline_dir(out_dir: str | Path, seed: int = 0) -> Path:
    """``latent_model_dir``'s VQ model saved by diffusers' own ``LDMPipeline.save_pretrained``:
    ``model_index.json``, ``unet/``, ``vqvae/`` and ``scheduler/`` (a DDIMScheduler), the
    layout of CompVis/ldm-celebahq-256."""
    from diffusers import DDIMScheduler, LDMPipeline

    unet = tiny_unet(seed, channels=4, sample_size=16)
    scheduler = DDIMScheduler.from_config(presets.default_scheduler_config())
    vqvae = tiny_autoencoder("vq", seed + 1)
    LDMPipeline(vqvae=vqvae, unet=unet, scheduler=scheduler).save_pretrained(out_dir)
    return Path(out_dir)


HUB_REVISION = "0123456789abcdef0123456789abcdef01234567"
"""The commit hash ``hub_cache_entry`` files a model under (any 40 hex digits)."""


def use_offline_hub_cache(cache_dir: Path, monkeypatch: Any) -> Path:
    """Make ``cache_dir`` (created) the Hugging Face hub cache, read offline, until
    ``monkeypatch`` undoes it: ``HF_HUB_CACHE`` and ``HF_HUB_OFFLINE`` for the processes a
    test starts, and huggingface_hub's constants (read once at its import) for this one."""
    from huggingface_hub import constants

    cache_dir.mkdir(parents=True, exist_ok=True)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache_dir))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache_dir))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache_dir


def hub_cache_entry(cache_dir: str | Path, repo_id: str, model_dir: str | Path) -> Path:
    """Copy ``model_dir`` into a Hugging Face hub cache (what ``HF_HUB_CACHE`` names) as
    the main revision of model ``repo_id``, as a download would leave it:
    ``models--ORG--NAME/snapshots/<rev>/`` with ``refs/main`` holding ``<rev>``. The
    hub client reads such a cache with ``HF_HUB_OFFLINE=1``; returns the snapshot."""
    import shutil

    repo = Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / HUB_REVISION
    shutil.copytree(model_dir, snapshot)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(HUB_REVISION)
    return snapshot
