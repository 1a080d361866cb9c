"""Loading a diffusion model and its fingerprint.

The fingerprint enters every cache key (docs/design.md §2), so it must change
whenever the generated images could: it hashes the UNet's effective config,
the scheduler config and every weight, and those of a latent model's
autoencoder, and nothing that cannot matter (diffusers version, file paths, the
device or dtype it is loaded on). A model folder's ``clsp_generation.json``
(``proto/model_settings.py``) is read here too, but holds params, not weights: it never
enters the fingerprint (the params a request ends up with enter its keys instead).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DModel

from clsp_positives.proto.model_settings import (
    GenerationDefaults,
    GenerationDefaultsError,
    read_generation_defaults,
)
from clsp_positives.service.sampling.autoencoder import (
    AUTOENCODER_CLASSES,
    AUTOENCODER_DIRS,
    Autoencoder,
    autoencoder_class,
)
from clsp_positives.service.sampling.schedule import (
    UnsupportedSchedulerError,
    check_scheduler_config,
)
from clsp_positives.service.sampling.unet_split import UnsupportedUNetError, check_unconditional

FINGERPRINT_CHARS = 16
"""Hex characters of the public fingerprint (64 bits: no accidental collisions)."""

_CONFIG = "config.json"
_SCHEDULER_CONFIG = "scheduler_config.json"


class ModelLoadError(ValueError):
    """The model cannot be loaded; the message says what to fix."""


@dataclass(frozen=True)
class LoadedModel:
    """A UNet on the CPU in float32 with what identifies it; a latent model
    also has its autoencoder (docs/latent.md); a model folder with a
    ``clsp_generation.json`` also has its generation defaults (docs/design.md §6)."""

    unet: UNet2DModel
    scheduler_config: dict[str, Any]
    fingerprint: str
    source: str
    autoencoder: Autoencoder | None = None
    generation_defaults: GenerationDefaults | None = None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} must hold a JSON object")
    return data


def resolve_layout(model_dir: Path) -> tuple[Path, Path]:
    """``(unet_dir, scheduler_config_path)`` of the pipeline or the flat layout."""
    if not model_dir.exists():
        raise ModelLoadError(
            f"model directory {model_dir} does not exist; pass a directory written by "
            "`clsp diffusion train` or DDPMPipeline.save_pretrained (unet/ and scheduler/)"
        )
    if not model_dir.is_dir():
        raise ModelLoadError(f"{model_dir} is a file; pass the model directory")
    if (model_dir / "unet" / _CONFIG).is_file():
        unet_dir = model_dir / "unet"
        candidates = [model_dir / "scheduler" / _SCHEDULER_CONFIG, model_dir / _SCHEDULER_CONFIG]
    elif (model_dir / _CONFIG).is_file():
        unet_dir = model_dir
        candidates = [model_dir / _SCHEDULER_CONFIG, model_dir / "scheduler" / _SCHEDULER_CONFIG]
    else:
        raise ModelLoadError(
            f"{model_dir} holds no UNet config: expected {model_dir / 'unet' / _CONFIG} "
            f"(pipeline layout) or {model_dir / _CONFIG} (flat layout)"
        )
    for path in candidates:
        if path.is_file():
            return unet_dir, path
    raise ModelLoadError(
        f"{model_dir} has a UNet but no scheduler config: expected "
        f"{candidates[0]} (a DDPMScheduler/DDIMScheduler config; "
        "`presets.default_scheduler_config()` is DDPM's linear schedule)"
    )


def _check_unet_config(config: dict[str, Any], where: Path) -> None:
    cls = config.get("_class_name", "UNet2DModel")
    if cls != "UNet2DModel":
        raise ModelLoadError(
            f"{where} describes a {cls}; CLSP sampling needs an unconditional diffusers "
            "UNet2DModel (a pixel-space DDPM such as google/ddpm-cifar10-32)"
        )
    if config.get("class_embed_type") or config.get("num_class_embeds"):
        raise ModelLoadError(
            f"{where} describes a class-conditional UNet2DModel (class_embed_type="
            f"{config.get('class_embed_type')!r}, num_class_embeds="
            f"{config.get('num_class_embeds')!r}); CLSP needs an unconditional model"
        )


def public_config(config: Any) -> dict[str, Any]:
    """A config without diffusers' bookkeeping keys (``_class_name``, ``_diffusers_version``,
    ``_name_or_path``...), with tuples as lists: what the images depend on."""
    return {
        k: list(v) if isinstance(v, tuple) else v
        for k, v in dict(config).items()
        if not k.startswith("_")
    }


def fingerprint(
    unet: torch.nn.Module,
    scheduler_config: dict[str, Any],
    autoencoder: torch.nn.Module | None = None,
) -> str:
    """sha256 over the canonical UNet config, the scheduler config and the weights,
    then, for a latent model, the autoencoder's class, config and weights.

    Weights are hashed as float32 in sorted state_dict order with their names
    and shapes, so the hash does not depend on the storage format or on the
    device and dtype the model later runs in. A pixel model hashes exactly as
    before latent models existed, so its cached positives stay valid.
    """
    h = hashlib.sha256(b"clsp-positives/model/v1")
    unet_cfg = public_config(getattr(unet, "config", {}))
    for part in (unet_cfg, public_config(scheduler_config)):
        h.update(json.dumps(part, sort_keys=True, separators=(",", ":")).encode() + b"|")
    _hash_weights(h, unet)
    if autoencoder is not None:
        config = public_config(getattr(autoencoder, "config", {}))
        h.update(b"autoencoder|" + type(autoencoder).__name__.encode() + b"|")
        h.update(json.dumps(config, sort_keys=True, separators=(",", ":")).encode() + b"|")
        _hash_weights(h, autoencoder)
    return h.hexdigest()[:FINGERPRINT_CHARS]


def _hash_weights(h: Any, module: torch.nn.Module) -> None:
    state = module.state_dict()
    for name in sorted(state):
        t = state[name].detach().to("cpu", torch.float32).contiguous()
        h.update(f"{name}:{tuple(t.shape)}|".encode())
        h.update(t.numpy().tobytes())


def _load_autoencoder(model_dir: Path) -> Autoencoder | None:
    """The ``vqvae/`` or ``vae/`` folder of a pipeline layout, if it has one."""
    found = [
        model_dir / sub
        for sub in AUTOENCODER_DIRS.values()
        if (model_dir / sub / _CONFIG).is_file()
    ]
    if not found:
        return None
    if len(found) > 1:
        raise ModelLoadError(
            f"{model_dir} holds both {found[0].name}/ and {found[1].name}/; a latent model "
            "has one autoencoder"
        )
    return _autoencoder_at(found[0])


def load_autoencoder(path: str | Path) -> Autoencoder:
    """An autoencoder directory (``config.json`` of an AutoencoderKL or VQModel), or a
    pipeline directory holding one in ``vae/`` or ``vqvae/``: what ``clsp diffusion
    train --vae`` takes."""
    where = Path(path)
    if (where / _CONFIG).is_file():
        return _autoencoder_at(where)
    if not where.is_dir():
        raise ModelLoadError(f"autoencoder directory {where} does not exist")
    found = _load_autoencoder(where)
    if found is None:
        raise ModelLoadError(
            f"{where} holds no autoencoder: expected {where / _CONFIG} (an AutoencoderKL or "
            f"VQModel) or a pipeline's {where / 'vae'} or {where / 'vqvae'}"
        )
    return found


def _autoencoder_at(where: Path) -> Autoencoder:
    cls = _read_json(where / _CONFIG).get("_class_name")
    if cls not in AUTOENCODER_CLASSES:
        raise ModelLoadError(
            f"{where / _CONFIG} describes a {cls}; a latent model's autoencoder must "
            f"be one of {', '.join(AUTOENCODER_CLASSES)}"
        )
    try:
        model = autoencoder_class(AUTOENCODER_CLASSES[cls]).from_pretrained(
            where, torch_dtype=torch.float32, low_cpu_mem_usage=False
        )
    except Exception as exc:  # diffusers raises OSError/ValueError/EnvironmentError...
        raise ModelLoadError(f"cannot load the autoencoder from {where}: {exc}") from None
    return Autoencoder(model)


SERVABLE_PIPELINES: dict[str, str] = {
    "DDPMPipeline": "unet/ and scheduler/ (google/ddpm-cifar10-32)",
    "DDIMPipeline": "unet/ and scheduler/",
    "LDMPipeline": "unet/, vqvae/ and scheduler/ (CompVis/ldm-celebahq-256)",
}
"""The ``model_index.json`` pipelines a model folder may name: the unconditional ones
whose UNet the CLSP sampler splits, with what they hold (docs/library.md, Hub models).
A folder without the file (``clsp diffusion train``'s, a KL ``vae/`` one) is judged by
its folders alone."""

_MODEL_INDEX = "model_index.json"
HUB_FILES = (
    "*.json",
    "*.safetensors",
    "*.bin",
)
"""What of a hub repo is fetched: configs and weights (a repo's images, READMEs and other
frameworks' checkpoints are not)."""
HUB_SKIPPED = ("*.fp16.*", "*.non_ema.*", "*.ema.*", "*.ckpt", "*.msgpack", "*.onnx*", "*.h5")
"""Weights ``from_pretrained`` never reads without a ``variant``, nor from a ckpt."""


def _check_pipeline(model_dir: Path) -> None:
    """Refuse a folder whose ``model_index.json`` names a pipeline not in
    ``SERVABLE_PIPELINES``, naming it, before any weight is read (or downloaded)."""
    index = model_dir / _MODEL_INDEX
    if not index.is_file():
        return
    found = _read_json(index).get("_class_name")
    if found not in SERVABLE_PIPELINES:
        servable = "; ".join(f"{name} ({holds})" for name, holds in SERVABLE_PIPELINES.items())
        raise ModelLoadError(
            f"{index} names a {found}; CLSP sampling serves unconditional pipelines only: "
            f"{servable}, or a folder of unet/, scheduler/ and vae/ without model_index.json"
        )


def check_layout(model_dir: Path) -> tuple[Path, Path]:
    """``resolve_layout`` of a folder whose configs describe a model CLSP can serve: its
    pipeline (``_check_pipeline``) and its UNet's class (``_check_unet_config``), read
    from the configs alone, so a hub repo is judged before its weights are fetched."""
    _check_pipeline(model_dir)
    unet_dir, scheduler_path = resolve_layout(model_dir)
    _check_unet_config(_read_json(unet_dir / _CONFIG), unet_dir / _CONFIG)
    return unet_dir, scheduler_path


def is_hub_id(model: str | Path) -> bool:
    """Whether ``--model`` is read as a Hugging Face hub id: ``ORG/NAME`` given as a string
    that is no existing path and starts like no path (``./``, ``/``, ``~``)."""
    return (
        isinstance(model, str)
        and not Path(model).exists()
        and model.count("/") == 1
        and not model.startswith((".", "/", "~"))
        and all(model.split("/"))
    )


def hub_snapshot(model_id: str) -> Path:
    """The folder of hub model ``model_id`` in the Hugging Face cache, fetched first unless
    it is there (with ``HF_HUB_OFFLINE=1``, only the cache is read): then loaded as any
    model folder, so a hub id and its folder give one model and one fingerprint.

    Configs come first and are checked (``check_layout``), so a repo that cannot be
    served is refused before its weights are downloaded.
    """
    from huggingface_hub import snapshot_download

    try:
        check_layout(Path(snapshot_download(model_id, allow_patterns=["*.json"])))
        return Path(
            snapshot_download(
                model_id, allow_patterns=list(HUB_FILES), ignore_patterns=list(HUB_SKIPPED)
            )
        )
    except ModelLoadError as exc:
        raise ModelLoadError(f"hub model {model_id}: {exc}") from None
    except Exception as exc:  # huggingface_hub: not cached offline, not found, no network...
        from huggingface_hub import constants

        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelLoadError(
            f"model directory {model_id} does not exist, and as a Hugging Face hub id it is "
            f"neither in the cache {constants.HF_HUB_CACHE} nor could it be fetched ({reason}); "
            "pass a local model directory, or fetch the model while online "
            "(HF_HUB_OFFLINE=1 reads the cache only)"
        ) from None


def load_model(model: str | Path) -> LoadedModel:
    """Load a UNet2DModel and its scheduler config from a model directory, or a hub id's
    folder in the Hugging Face cache (``hub_snapshot``): one code path for both.

    Raises ModelLoadError naming what to fix: a missing directory, a pipeline that
    cannot be served, a model that is not an unconditional UNet2DModel, a missing
    scheduler config.
    """
    path = hub_snapshot(model) if is_hub_id(model) else Path(model)
    source = str(model)
    unet_dir, scheduler_path = check_layout(path)
    try:  # before the weights: a bad file is refused at once
        generation_defaults = read_generation_defaults(path)
    except GenerationDefaultsError as exc:
        raise ModelLoadError(str(exc)) from None
    autoencoder = _load_autoencoder(path) if unet_dir != path else None
    scheduler_config = _read_json(scheduler_path)
    try:
        unet = UNet2DModel.from_pretrained(
            unet_dir, torch_dtype=torch.float32, low_cpu_mem_usage=False
        )
    except Exception as exc:  # diffusers raises OSError/ValueError/EnvironmentError...
        raise ModelLoadError(f"cannot load the UNet weights from {unet_dir}: {exc}") from None
    try:
        check_unconditional(unet)
        check_scheduler_config(scheduler_config)
    except (UnsupportedUNetError, UnsupportedSchedulerError) as exc:
        raise ModelLoadError(f"{source}: {exc}") from None
    if unet.config.out_channels != unet.config.in_channels:
        raise ModelLoadError(
            f"{source}: the UNet maps {unet.config.in_channels} channels to "
            f"{unet.config.out_channels}; a noise/sample predictor must output as many "
            "channels as it takes (learned-variance models are not supported)"
        )
    if autoencoder is not None and autoencoder.latent_channels != unet.config.in_channels:
        raise ModelLoadError(
            f"{source}: the autoencoder's latents have {autoencoder.latent_channels} channels "
            f"but the UNet takes {unet.config.in_channels}"
        )
    unet.eval().requires_grad_(False)
    scheduler_config = dict(scheduler_config)
    ae_module = None if autoencoder is None else autoencoder.model
    return LoadedModel(
        unet,
        scheduler_config,
        fingerprint(unet, scheduler_config, ae_module),
        source,
        autoencoder,
        generation_defaults,
    )
