"""Model loading: both directory layouts, hub ids from the Hugging Face cache, the
fingerprint, and clear errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DModel

from clsp_positives.proto.model_settings import GenerationDefaults, write_generation_defaults
from clsp_positives.service.ddpm import presets
from clsp_positives.service.sampling.model import ModelLoadError, fingerprint, load_model
from tests.support.models import (
    ddpm_pipeline_dir,
    hub_cache_entry,
    latent_model_dir,
    ldm_pipeline_dir,
    random_model_dir,
    use_offline_hub_cache,
)


def _flat_copy(model_dir: Path, out: Path) -> Path:
    """The flat layout of google/ddpm-cifar10-32: config, weights and scheduler side by side."""
    out.mkdir()
    for f in (model_dir / "unet").iterdir():
        shutil.copy(f, out / f.name)
    shutil.copy(model_dir / "scheduler" / "scheduler_config.json", out)
    return out


def test_pipeline_and_flat_layouts_load_the_same_model(tiny_model_dir: Path, tmp_path: Path):
    a = load_model(tiny_model_dir)
    b = load_model(_flat_copy(tiny_model_dir, tmp_path / "flat"))
    assert isinstance(a.unet, UNet2DModel)
    assert a.unet.config.sample_size == 16 and a.unet.config.in_channels == 1
    assert a.scheduler_config["beta_schedule"] == "linear"
    assert len(a.fingerprint) == 16 and int(a.fingerprint, 16) >= 0
    assert a.fingerprint == b.fingerprint
    assert not any(p.requires_grad for p in a.unet.parameters())


def test_fingerprint_is_stable_and_sensitive(tiny_model_dir: Path, tmp_path: Path):
    base = load_model(tiny_model_dir)
    assert load_model(tiny_model_dir).fingerprint == base.fingerprint

    # The diffusers version and other bookkeeping keys do not matter.
    cfg = dict(base.scheduler_config, _diffusers_version="0.0.1")
    assert fingerprint(base.unet, cfg) == base.fingerprint

    # A scheduler change does.
    assert fingerprint(base.unet, dict(cfg, beta_end=0.021)) != base.fingerprint

    # One changed weight does.
    unet = load_model(tiny_model_dir).unet
    with torch.no_grad():
        unet.conv_out.bias[0] += 1e-6
    assert fingerprint(unet, base.scheduler_config) != base.fingerprint

    # Another seed (same config) does.
    other = random_model_dir(tmp_path / "other", seed=1)
    assert load_model(other).fingerprint != base.fingerprint


def test_missing_directory(tmp_path: Path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(tmp_path / "nope")


def test_directory_without_unet(tmp_path: Path):
    with pytest.raises(ModelLoadError, match="holds no UNet config"):
        load_model(tmp_path)


def test_missing_scheduler_config(tiny_model_dir: Path, tmp_path: Path):
    shutil.copytree(tiny_model_dir / "unet", tmp_path / "m" / "unet")
    with pytest.raises(ModelLoadError, match="no scheduler config"):
        load_model(tmp_path / "m")


def _with_unet_config(tiny_model_dir: Path, tmp_path: Path, **changes) -> Path:
    out = tmp_path / "m"
    shutil.copytree(tiny_model_dir, out)
    path = out / "unet" / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))
    return out


def test_not_a_unet2dmodel(tiny_model_dir: Path, tmp_path: Path):
    d = _with_unet_config(tiny_model_dir, tmp_path, _class_name="UNet2DConditionModel")
    with pytest.raises(ModelLoadError, match=r"UNet2DConditionModel.*unconditional"):
        load_model(d)


def test_class_conditional_unet(tmp_path: Path):
    cfg = presets.unet_config("tiny", sample_size=16, channels=1)
    unet = UNet2DModel(**cfg, num_class_embeds=10)
    d = presets.save_model(unet, presets.default_scheduler_config(), tmp_path / "cond")
    with pytest.raises(ModelLoadError, match="class-conditional"):
        load_model(d)


def test_unsupported_scheduler_is_refused_at_load(tiny_model_dir: Path, tmp_path: Path):
    out = tmp_path / "m"
    shutil.copytree(tiny_model_dir, out)
    path = out / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps(dict(json.loads(path.read_text()), thresholding=True)))
    with pytest.raises(ModelLoadError, match="thresholding"):
        load_model(out)


def test_presets() -> None:
    cifar = presets.unet_config("ddpm-cifar10", sample_size=32, channels=3)
    assert cifar["block_out_channels"] == [128, 256, 256, 256] and cifar["in_channels"] == 3
    with pytest.raises(ValueError, match="unknown UNet preset"):
        presets.unet_config("huge", sample_size=16, channels=1)
    with pytest.raises(ValueError, match="multiple of 4"):
        presets.unet_config("small", sample_size=18, channels=1)


# ------------------------------------------------------------------ hub ids


@pytest.fixture()
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face hub cache, read offline."""
    return use_offline_hub_cache(tmp_path / "hf-cache", monkeypatch)


HUB_LAYOUTS: dict[str, tuple[Callable[[Path], Path], str | None]] = {
    "ddpm": (ddpm_pipeline_dir, None),
    "ldm-vq": (ldm_pipeline_dir, "vq"),
    "kl": (lambda out: latent_model_dir(out, "kl"), "kl"),
}
"""The layouts a hub id may hold (docs/library.md, Hub models): how to write each, and
the autoencoder it carries."""


@pytest.mark.parametrize("layout", sorted(HUB_LAYOUTS))
def test_a_hub_id_loads_from_the_offline_cache_as_its_folder(
    layout: str, hub_cache: Path, tmp_path: Path
) -> None:
    write, autoencoder = HUB_LAYOUTS[layout]
    folder = write(tmp_path / layout)
    stored = GenerationDefaults(interpolation_weight=0.3, steps=7)
    write_generation_defaults(folder, stored)
    hub_cache_entry(hub_cache, f"someorg/{layout}", folder)

    by_id = load_model(f"someorg/{layout}")
    by_path = load_model(folder)
    assert by_id.fingerprint == by_path.fingerprint
    assert by_id.source == f"someorg/{layout}"
    kind = None if by_id.autoencoder is None else by_id.autoencoder.kind
    assert kind == autoencoder
    assert by_id.generation_defaults == stored  # the folder's settings travel with it
    assert by_id.scheduler_config == by_path.scheduler_config


def test_a_hub_id_not_in_the_offline_cache_names_the_cache(hub_cache: Path) -> None:
    with pytest.raises(ModelLoadError) as refused:
        load_model("someorg/absent")
    message = str(refused.value)
    assert "does not exist" in message and "someorg/absent" in message
    assert str(hub_cache) in message and "HF_HUB_OFFLINE" in message


def _conditional_on_the_hub(hub_cache: Path, tmp_path: Path) -> None:
    """``someorg/conditional``: a DDPMPipeline layout whose UNet config is a
    UNet2DConditionModel's, without weights (it is refused on its configs)."""
    folder = ddpm_pipeline_dir(tmp_path / "conditional")
    config = folder / "unet" / "config.json"
    config.write_text(
        json.dumps(dict(json.loads(config.read_text()), _class_name="UNet2DConditionModel"))
    )
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    hub_cache_entry(hub_cache, "someorg/conditional", folder)


def test_a_conditional_unet_on_the_hub_is_refused_on_its_config(
    hub_cache: Path, tmp_path: Path
) -> None:
    _conditional_on_the_hub(hub_cache, tmp_path)
    with pytest.raises(ModelLoadError, match=r"someorg/conditional.*UNet2DConditionModel"):
        load_model("someorg/conditional")


@pytest.mark.parametrize("hub", [True, False], ids=["hub-id", "folder"])
def test_a_pipeline_we_do_not_serve_is_refused_by_name(
    hub: bool, hub_cache: Path, tmp_path: Path
) -> None:
    folder = ddpm_pipeline_dir(tmp_path / "sd")
    index = folder / "model_index.json"
    index.write_text(
        json.dumps(dict(json.loads(index.read_text()), _class_name="StableDiffusionPipeline"))
    )
    hub_cache_entry(hub_cache, "someorg/sd", folder)
    with pytest.raises(ModelLoadError) as refused:
        load_model("someorg/sd" if hub else folder)
    message = str(refused.value)
    assert "names a StableDiffusionPipeline" in message
    assert all(name in message for name in ("DDPMPipeline", "LDMPipeline", "vae/"))


def test_clsp_serve_refuses_a_hub_model_it_cannot_serve_with_exit_2(
    hub_cache: Path, tmp_path: Path
) -> None:
    _conditional_on_the_hub(hub_cache, tmp_path)
    cmd = [sys.executable, "-m", "clsp_positives.cli", "serve", "--model", "someorg/conditional"]
    done = subprocess.run(
        [*cmd, "--port", "0"], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert done.returncode == 2, done.stderr
    assert "UNet2DConditionModel" in done.stderr and "unconditional" in done.stderr
    assert "Traceback" not in done.stderr
