"""Model loading: both directory layouts, the fingerprint, and clear errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DModel

from clsp_positives.service.ddpm import presets
from clsp_positives.service.sampling.model import ModelLoadError, fingerprint, load_model
from tests.support.models import random_model_dir


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
