"""Latent models in process: loading, fingerprints, and the sampler against diffusers'
latent loop (docs/latent.md)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from clsp_positives.proto.keys import positive_key, seed_from_key
from clsp_positives.proto.params import GenerationParams
from clsp_positives.service.sampling import noise
from clsp_positives.service.sampling.generator import GeneratorInputError, PositivesGenerator
from clsp_positives.service.sampling.model import ModelLoadError, fingerprint, load_model
from tests.support.models import latent_model_dir, scheduler_config, tiny_autoencoder

KINDS = ("kl", "vq")
LATENT = (4, 16, 16)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """x0 clipped to [-3, 3] in the model's config: a random UNet is no denoiser, and
    unclipped its latents grow to ~200, where float32 rounding alone exceeds 1e-4."""
    root = tmp_path_factory.mktemp("latent-models")
    config = scheduler_config(clip_sample_range=3.0)
    return {
        kind: latent_model_dir(root / kind, kind, output_scale=0.2, scheduler=config)
        for kind in KINDS
    }


@pytest.fixture(scope="module")
def generators(model_dirs: dict[str, Path]) -> dict[str, PositivesGenerator]:
    return {kind: PositivesGenerator.from_dir(d) for kind, d in model_dirs.items()}


def _pictures(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 64, 64, 3), dtype=np.uint8)


@pytest.mark.parametrize("kind", KINDS)
def test_latent_models_load_with_their_shapes(generators, kind: str) -> None:
    g = generators[kind]
    info = g.model_info(max_k=4, max_anchors=8)
    assert (info.sample_size, info.channels) == (64, 3)
    assert (info.latent_channels, info.latent_size) == (4, 16)
    assert info.autoencoder == kind
    assert g.latent_chw == LATENT


def test_the_fingerprint_covers_the_autoencoder(model_dirs, tmp_path: Path) -> None:
    loaded = load_model(model_dirs["kl"])
    # the UNet and scheduler alone hash as a pixel model would: the autoencoder adds to it
    assert fingerprint(loaded.unet, loaded.scheduler_config) != loaded.fingerprint
    other = shutil.copytree(model_dirs["kl"], tmp_path / "other")
    shutil.rmtree(other / "vae")
    tiny_autoencoder("kl", seed=99).save_pretrained(other / "vae")
    assert load_model(other).fingerprint != loaded.fingerprint
    config = json.loads((other / "vae" / "config.json").read_text())
    config["scaling_factor"] = 0.25
    (other / "vae" / "config.json").write_text(json.dumps(config))
    assert len({load_model(other).fingerprint, loaded.fingerprint}) == 2


def test_bad_latent_layouts_are_refused(model_dirs, tmp_path: Path) -> None:
    both = shutil.copytree(model_dirs["kl"], tmp_path / "both")
    shutil.copytree(model_dirs["vq"] / "vqvae", both / "vqvae")
    with pytest.raises(ModelLoadError, match="both"):
        load_model(both)
    wide = shutil.copytree(model_dirs["kl"], tmp_path / "wide")
    shutil.rmtree(wide / "vae")
    tiny_autoencoder("kl", latent_channels=3).save_pretrained(wide / "vae")
    with pytest.raises(ModelLoadError, match="3 channels but the UNet takes 4"):
        load_model(wide)
    alien = shutil.copytree(model_dirs["kl"], tmp_path / "alien")
    config = json.loads((alien / "vae" / "config.json").read_text())
    config["_class_name"] = "AutoencoderTiny"
    (alien / "vae" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="AutoencoderTiny"):
        load_model(alien)


@pytest.mark.parametrize("kind", KINDS)
def test_w1_eta0_equals_the_diffusers_latent_loop(generators, model_dirs, kind: str) -> None:
    """The scheduler's ``step`` on the UNet from our initial noise, then the
    autoencoder's decode, as diffusers' ``LDMPipeline`` does."""
    g = generators[kind]
    loaded = load_model(model_dirs[kind])
    seeds = np.array([3, 1 << 40, 77], dtype=np.int64)
    group = GenerationParams(steps=20, eta=0.0, sampling="model").group()
    latents = g.sample(
        np.zeros((3, *LATENT), np.float32),
        seeds,
        np.ones(3, np.float32),
        group._replace(output="latents"),
        anchor_space="latent",
    )
    sched = DDIMScheduler.from_config(loaded.scheduler_config)
    sched.set_timesteps(20)
    x = noise.normal(torch.from_numpy(seeds), noise.STREAM_INITIAL, LATENT)
    with torch.inference_mode():
        for t in sched.timesteps:
            x = sched.step(loaded.unet(x, t).sample, t, x, eta=0.0).prev_sample
        ae = loaded.autoencoder.model
        want = ae.decode(x / ae.config.scaling_factor).sample
    assert np.abs(latents - x.numpy()).max() <= 1e-4
    images = g.sample(
        np.zeros((3, *LATENT), np.float32),
        seeds,
        np.ones(3, np.float32),
        group,
        anchor_space="latent",
    )
    want_u8 = np.rint((want.clamp(-1, 1).permute(0, 2, 3, 1).numpy() + 1) * 127.5)
    assert np.abs(images.astype(np.int16) - want_u8.astype(np.int16)).max() <= 1


@pytest.mark.parametrize("kind", KINDS)
def test_pictures_encode_to_one_latent_and_latents_decode(generators, kind: str) -> None:
    g = generators[kind]
    pictures = _pictures(4)
    latents = g.encode_images(pictures)
    assert latents.shape == (4, *LATENT) and latents.dtype == np.float32
    assert np.array_equal(latents, g.encode_images(pictures))  # deterministic
    # one at a time as in a batch (the encoder treats rows alone)
    assert np.allclose(g.encode_images(pictures[2:3]), latents[2:3], atol=1e-5)
    decoded = g.decode_latents(latents)
    assert decoded.shape == (4, 64, 64, 3) and decoded.dtype == np.uint8


@pytest.mark.parametrize("kind", KINDS)
def test_latents_and_pictures_of_one_positive_are_one_sample(generators, kind: str) -> None:
    """``output`` changes the key's tail, not its seed: decoding the latents gives the
    picture the images request returns."""
    g = generators[kind]
    pictures = _pictures(3, seed=1)
    p_img = GenerationParams(steps=4)
    p_lat = GenerationParams(steps=4, output="latents")
    canon = g._canonical(pictures, "image")
    k_img = positive_key(g.fingerprint, p_img, canon[0], 0)
    k_lat = positive_key(g.fingerprint, p_lat, canon[0], 0)
    assert k_img != k_lat and seed_from_key(k_img) == seed_from_key(k_lat)
    images = g.positives(pictures, None, p_img)
    latents = g.positives(pictures, None, p_lat)
    assert images.shape == (3, 64, 64, 3) and latents.shape == (3, *LATENT)
    assert np.abs(g.decode_latents(latents).astype(int) - images.astype(int)).max() <= 1


@pytest.mark.parametrize("kind", KINDS)
def test_latent_anchors_are_deterministic_and_batch_independent(generators, kind: str) -> None:
    g = generators[kind]
    latents = g.encode_images(_pictures(4, seed=2))
    params = GenerationParams(steps=3, output="latents")
    together = g.positives(latents, np.arange(4), params, anchor_space="latent")
    again = g.positives(latents, np.arange(4), params, anchor_space="latent")
    alone = g.positives(latents[1:2], np.array([1]), params, anchor_space="latent")
    assert np.array_equal(together, again)
    assert np.allclose(alone, together[1:2], atol=1e-5)
    # a latent anchor is not the picture it came from: keys (so positives) differ
    pictures = g.positives(_pictures(4, seed=2), np.arange(4), params)
    assert not np.allclose(pictures, together, atol=1e-3)


def test_pixel_models_refuse_latents(tiny_model_dir) -> None:
    g = PositivesGenerator.from_dir(tiny_model_dir)
    assert g.latent_chw is None and g.model_info(max_k=1, max_anchors=1).latent_size is None
    with pytest.raises(GeneratorInputError, match="no latent space"):
        g.positives(
            np.zeros((1, 4, 4, 4), np.float32), None, GenerationParams(), anchor_space="latent"
        )
    with pytest.raises(GeneratorInputError, match="latent model"):
        g.positives(np.zeros((1, 16, 16, 1), np.uint8), None, GenerationParams(output="latents"))


def test_wrong_latent_shapes_are_refused(generators) -> None:
    with pytest.raises(GeneratorInputError, match=r"\[N, 4, 16, 16\]"):
        generators["kl"].positives(
            np.zeros((1, 4, 8, 8), np.float32), None, GenerationParams(), anchor_space="latent"
        )
