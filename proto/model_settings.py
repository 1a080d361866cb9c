"""Generation settings that travel with a model: ``clsp_generation.json`` in its folder.

The authors' defaults (``GenerationParams``) suit the models they trained; a small model
often needs others (``sampling`` authors-clipped, ``interpolate`` bottleneck+low-skips:
docs/method.md), and ``clsp calibrate --write`` measures which. The file keeps that
choice beside the weights, so a service of the model applies it to every request that
leaves those params unset, and every user of the pool gets it without passing it
(docs/design.md §6). It holds params, not weights: the model's fingerprint ignores it,
and the params a request ends up with are what its positives are keyed by (§7).

Torch-free, like the rest of ``proto/``: the service reads the file, ``clsp calibrate``
(the trainer's side) writes it, and ``GET /v1/model`` reports it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, MutableMapping
from datetime import datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic.fields import FieldInfo

from clsp_positives.proto.params import (
    GenerationParams,
    Sampling,
    describe_validation_error,
    integral_floats_to_int,
)

GENERATION_DEFAULTS_FILE = "clsp_generation.json"
"""The file's name in a model folder (beside ``unet/`` and ``scheduler/``, or in a flat
model's own folder)."""

STORED_FIELDS = (
    "interpolation_weight",
    "steps",
    "eta",
    "method",
    "sampling",
    "interpolate",
    "interpolate_until",
)
"""The ``GenerationParams`` fields the file may hold: what decides which positive a
request gets, and what ``clsp calibrate`` measures (the reuse options ``share_anchor`` and
``anchor_refresh`` trade quality for speed, the caller's choice)."""


class GenerationDefaultsError(ValueError):
    """The file is unreadable or invalid; the message names the file and the field."""


class Measured(BaseModel):
    """What ``clsp calibrate`` measured of the stored setting (docs/training.md)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    class_kept: float = Field(
        ge=0.0, le=1.0, description="How often the probe put a positive in its anchor's class."
    )
    between_candidates: float = Field(
        ge=0.0,
        description="Diversity: mean absolute pixel difference (pixels in [0, 1]) between two "
        "candidates of one anchor.",
    )
    to_anchor: float | None = Field(
        None,
        ge=0.0,
        description="Mean absolute pixel difference between a positive and its anchor.",
    )
    positives_per_s: float | None = Field(
        None, ge=0.0, description="What the pool delivered (cache bypassed)."
    )
    probe: str = Field(description="The class probe (raw pixels or a feature extractor).")
    probe_accuracy: float | None = Field(
        None, ge=0.0, le=1.0, description="The probe on the real held-out anchors."
    )
    dataset: str = Field(description="The labelled images the anchors came from.")
    anchors: int = Field(ge=1, description="Held-out anchors measured.")
    k: int = Field(ge=1, description="Candidates per anchor.")
    min_class_kept: float = Field(ge=0.0, le=1.0, description="The class kept aimed at.")
    reached_target: bool = Field(description="Whether class_kept reached min_class_kept.")
    model: str | None = Field(
        None,
        description="Fingerprint of the model measured (GET /v1/model); a service of weights "
        "with another fingerprint warns at start-up.",
    )
    at: datetime = Field(description="When it was measured (UTC).")
    command: str = Field(description="The command that measured it (no token).")


def _declare_stored(namespace: MutableMapping[str, Any]) -> None:
    """Declare, in the class body being defined, a copy of each ``STORED_FIELDS`` field of
    ``GenerationParams`` (type, bounds, help) that may be null or left out: not stored."""
    annotations = namespace.setdefault("__annotations__", {})
    for name in STORED_FIELDS:
        source = GenerationParams.model_fields[name]
        annotations[name] = source.annotation | None
        namespace[name] = FieldInfo.merge_field_infos(
            source,
            default=None,
            description=f"{(source.description or '').rstrip('.')}. In this file, null "
            "or left out: not stored.",
        )


class GenerationDefaults(BaseModel):
    """``clsp_generation.json``: the generation params a model's service applies to
    requests that leave them unset, and what was measured of them.

    Each stored field is a copy of ``GenerationParams``'s, validated as strictly; null
    or absent means not stored (the service's own default stays)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    _declare_stored(locals())  # interpolation_weight, steps, eta, method, sampling, interpolate
    measured: Measured | None = Field(
        None,
        description="What clsp calibrate --write measured of this setting; null for settings "
        "written by hand.",
    )

    _integral = field_validator("steps", mode="before")(integral_floats_to_int)

    def stored(self) -> dict[str, Any]:
        """The params the file sets, by field name."""
        return {n: v for n in STORED_FIELDS if (v := getattr(self, n)) is not None}

    def applied_to(self, params: GenerationParams) -> GenerationParams:
        """``params`` with each stored field the request left unset taken from here.

        Unset is pydantic's ``model_fields_set``: a field absent from the request's params.
        ``sampling`` sent as null counts as unset too, since null means "the service's
        default", which this file is part of. A field the request sets always wins, so a
        request that sets every stored field gets exactly the params (and keys) it got
        before the file existed.
        """
        sent = params.model_fields_set
        update = {
            name: value
            for name, value in self.stored().items()
            if name not in sent or getattr(params, name) is None
        }
        return params.model_copy(update=update) if update else params


def resolve_unset(
    params: GenerationParams, stored: GenerationDefaults | None, sampling: Sampling | None
) -> GenerationParams:
    """The params a request's positives are generated and keyed with: each field left
    unset from ``stored``, then a null sampling mode from ``sampling`` (docs/design.md
    §6). The one rule of the service (``RequestDefaults``) and of the clients that
    resolve as it does (``as_pool_applies``)."""
    if stored is not None:
        params = stored.applied_to(params)
    return params if sampling is None else params.resolved(sampling)


def as_pool_applies(params: GenerationParams, info: Mapping[str, Any]) -> GenerationParams:
    """The params a pool generates for a request of ``params``, from its ``GET /v1/model``
    (``info``): ``resolve_unset`` with the model's stored settings and the pool's sampling
    mode. A client that records what made its positives (``clsp generate``'s bank, ``clsp
    calibrate``'s file) sends these, explicit, and the keys are those of the request it
    would have sent.

    The stored ``sampling`` is left out: ``info["sampling"]`` is already the pool's
    choice between it and an operator's ``--sampling`` (docs/design.md §6).
    """
    stored = info.get("generation_defaults")
    defaults = (
        GenerationDefaults.model_validate(stored).model_copy(update={"sampling": None})
        if stored
        else None
    )
    return resolve_unset(params, defaults, info.get("sampling"))


def read_generation_defaults(model_dir: str | Path) -> GenerationDefaults | None:
    """The ``GENERATION_DEFAULTS_FILE`` of a model folder, None when it has none.

    Raises ``GenerationDefaultsError`` naming the file and each offending field.
    """
    path = Path(model_dir) / GENERATION_DEFAULTS_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise GenerationDefaultsError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise GenerationDefaultsError(f"{path} must hold a JSON object")
    try:
        return GenerationDefaults.model_validate(data)
    except ValidationError as exc:
        allowed = sorted(GenerationDefaults.model_fields)
        raise GenerationDefaultsError(
            f"{path}: {describe_validation_error(exc, allowed=allowed)} (fix or delete the "
            "file; docs/training.md, 'Choosing w: clsp calibrate')"
        ) from None


def write_generation_defaults(model_dir: str | Path, defaults: GenerationDefaults) -> Path:
    """Write the file into a model folder, replaced whole (a service starting meanwhile
    never reads half of it); only the stored fields, and ``measured``."""
    path = Path(model_dir) / GENERATION_DEFAULTS_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(defaults.model_dump(mode="json", exclude_none=True), indent=2) + "\n")
    tmp.replace(path)
    return path


def check_model_dir(model_dir: str | Path) -> Path:
    """``model_dir`` if it holds a model (``unet/config.json`` of the pipeline layout or
    a flat ``config.json``, as ``clsp diffusion train`` writes and ``clsp serve`` loads),
    else ``GenerationDefaultsError`` saying what is missing. Only the layout is checked:
    the weights are the service's to load."""
    path = Path(model_dir)
    if not path.is_dir():
        raise GenerationDefaultsError(f"{path} is not a directory; pass the model folder")
    if not ((path / "unet" / "config.json").is_file() or (path / "config.json").is_file()):
        raise GenerationDefaultsError(
            f"{path} holds no model: expected {path / 'unet' / 'config.json'} (pipeline "
            f"layout) or {path / 'config.json'} (flat layout), the folder `clsp serve "
            "--model` is given"
        )
    return path
