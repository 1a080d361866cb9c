"""Pydantic models of the HTTP API (docs/design.md §6).

The JSON forms below document the wire format (and feed the OpenAPI
document); the safetensors fast path carries the same tensors by name. After
decoding, both encodings become the plain-array dataclasses at the bottom, so
nothing downstream cares which encoding a request used.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from clsp_positives.proto.params import (
    AnchorSpace,
    GenerationParams,
    Sampling,
    integral_floats_to_int,
)

JSON_MEDIA_TYPE = "application/json"
SAFETENSORS_MEDIA_TYPE = "application/x-safetensors"

AutoencoderKind = Literal["kl", "vq"]
"""A latent model's autoencoder: diffusers' AutoencoderKL or VQModel (docs/latent.md)."""

TensorDType = Literal["uint8", "int32", "int64", "float16", "float32", "float64"]

MAX_RANK = 8
"""Most dimensions a wire tensor may have (the largest the API uses is 5)."""
MAX_DIM = 2**31 - 1
"""Largest single dimension; bounds the arithmetic on shapes before any array exists."""
BASE64_PATTERN = r"^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$"
"""Exactly the strings the decoder accepts as base64 (standard alphabet, padded).
Documented in the schema only: the decoder checks it itself, with a clearer message."""

Dim = Annotated[int, Field(ge=0, le=MAX_DIM)]


def _narrowed(
    dtypes: list[str], *, min_rank: int, max_rank: int, min_dim: int = 0, nullable: bool = True
) -> Callable[[dict[str, Any]], None]:
    """A ``json_schema_extra`` that narrows the generic Tensor for one named tensor.

    The reference to Tensor becomes ``allOf: [Tensor, constraint]`` (plain
    keywords beside a ``$ref`` are ignored by some tools), so the document
    says which dtypes and ranks each tensor takes; the decoder enforces the
    same, with messages that say what to fix. ``nullable=False`` drops the null
    that an optional field's schema allows: such a tensor is sent or left out.
    """
    constraint = {
        "properties": {
            "dtype": {"enum": dtypes},
            "shape": {"minItems": min_rank, "maxItems": max_rank, "items": {"minimum": min_dim}},
        }
    }

    def narrow(schema: dict[str, Any]) -> None:
        if not nullable and "anyOf" in schema:
            schema.update(next(n for n in schema.pop("anyOf") if "$ref" in n))
            schema.pop("default", None)
        for node in [schema, *schema.get("anyOf", [])]:
            if "$ref" in node:
                node["allOf"] = [{"$ref": node.pop("$ref")}, constraint]

    return narrow


class Tensor(BaseModel):
    """One tensor in JSON: raw little-endian bytes, base64 encoded."""

    model_config = ConfigDict(extra="forbid", strict=True)

    dtype: TensorDType
    shape: list[Dim] = Field(
        max_length=MAX_RANK,
        description="Dimensions; their product times the item size is the decoded byte length.",
    )
    data: str = Field(
        description="Base64 of the raw little-endian bytes, C order.",
        json_schema_extra={"pattern": BASE64_PATTERN, "contentEncoding": "base64"},
    )

    _integral = field_validator("shape", mode="before")(integral_floats_to_int)


class PositivesRequest(BaseModel):
    """``POST /v1/positives`` body in JSON."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={"oneOf": [{"required": ["anchors"]}, {"required": ["anchor_latents"]}]},
    )

    anchors: Tensor | None = Field(
        None,
        description="uint8 [N, H, W, C] pixels, or float32/float16 [N, C, H, W] in [-1, 1]. "
        "Exactly one of anchors and anchor_latents.",
        json_schema_extra=_narrowed(
            ["uint8", "float16", "float32"], min_rank=4, max_rank=4, min_dim=1, nullable=False
        ),
    )
    anchor_latents: Tensor | None = Field(
        None,
        description="A latent model's anchors as float32/float16 [N, c, h, w] latents in its "
        "scaled latent space (GET /v1/model: latent_channels, latent_size; docs/latent.md). "
        "Exactly one of anchors and anchor_latents.",
        json_schema_extra=_narrowed(
            ["float16", "float32"], min_rank=4, max_rank=4, min_dim=1, nullable=False
        ),
    )
    candidates: Tensor | None = Field(
        None,
        description="int64 [N]: candidate index per anchor (default 0). Exclusive with params.k.",
        json_schema_extra=_narrowed(["int64"], min_rank=1, max_rank=1, min_dim=1),
    )
    params: GenerationParams = Field(default_factory=GenerationParams)


class PositivesResponse(BaseModel):
    """``POST /v1/positives`` answer in JSON."""

    model_config = ConfigDict(extra="forbid")

    positives: Tensor = Field(
        description="uint8 [N, H, W, C], or [N, k, H, W, C] with k; with params.output "
        "latents, float32 [N, c, h, w] or [N, k, c, h, w].",
        json_schema_extra=_narrowed(["uint8", "float32"], min_rank=4, max_rank=5),
    )
    cache_hit: Tensor = Field(
        description="uint8 [N] or [N, k]: 1 where the positive came from the cache.",
        json_schema_extra=_narrowed(["uint8"], min_rank=1, max_rank=2),
    )
    expired: Tensor | None = Field(
        None,
        description="uint8 [N] or [N, k], only when some positive's params.deadline_ms "
        "passed: 1 where it did (that positive is all zeros; ask again).",
        json_schema_extra=_narrowed(["uint8"], min_rank=1, max_rank=2),
    )
    model: str = Field(description="Fingerprint of the model that generated the positives.")
    params: GenerationParams = Field(description="The parameters as applied, defaults filled in.")


class ModelInfo(BaseModel):
    """``GET /v1/model``."""

    fingerprint: str
    sample_size: int = Field(description="Height and width of the images (anchors, positives).")
    channels: int = Field(description="Channels of the images.")
    latent_size: int | None = Field(
        None, description="A latent model's latent height and width; null for a pixel model."
    )
    latent_channels: int | None = Field(
        None, description="A latent model's latent channels; null for a pixel model."
    )
    autoencoder: AutoencoderKind | None = Field(
        None,
        description="A latent model's autoencoder: kl (AutoencoderKL) or vq (VQModel); "
        "null for a pixel model.",
    )
    scheduler: dict[str, Any] = Field(description="The model's scheduler config.")
    sampling: Sampling = Field(
        description="What requests without params.sampling get: authors (the CLSP authors' "
        "loop, which overrides the scheduler config's timestep_spacing, clip_sample, "
        "set_alpha_to_one and variance_type), authors-clipped (that loop with x0 clipped) or "
        "model (the scheduler config as written): the service's --sampling when given, else "
        "generation_defaults.sampling when stored, else authors.",
        examples=["authors"],
    )
    generation_defaults: dict[str, Any] | None = Field(
        None,
        description="The model folder's clsp_generation.json as stored (GenerationDefaults "
        "in proto/model_settings.py validates it): the params every request that leaves "
        "them unset gets (a request's own value wins), and what clsp calibrate measured of "
        "them; null when the model has none (the params' own defaults apply).",
        examples=[{"sampling": "authors-clipped", "interpolate": "bottleneck+low-skips"}],
    )
    device: str
    dtype: str
    max_k: int
    max_anchors: int


class Health(BaseModel):
    """``GET /healthz`` and ``GET /readyz`` when the answer is yes."""

    status: str = Field(examples=["ok", "ready"])
    model: str | None = Field(None, description="Fingerprint of the loaded model (/readyz).")


class ErrorBody(BaseModel):
    """Every error answer: a code and a sentence saying what to fix."""

    error: str = Field(examples=["invalid_tensor"])
    detail: str = Field(
        examples=["anchors must have rank 4 ([N, H, W, C] uint8), got shape [3, 32, 32]"]
    )


@dataclass(frozen=True)
class RequestArrays:
    """A decoded, validated positives request.

    ``anchors`` is as sent (uint8 NHWC or float NCHW pictures, or float NCHW
    latents when ``anchor_space`` is latent); ``candidates`` is int64 ``[M]`` and
    ``anchor_index`` maps each of the M items to its anchor, so a request with
    ``k`` has ``M = N * k``.
    """

    anchors: np.ndarray
    candidates: np.ndarray
    anchor_index: np.ndarray
    params: GenerationParams
    anchor_space: AnchorSpace = "image"

    @property
    def num_anchors(self) -> int:
        return int(self.anchors.shape[0])


@dataclass(frozen=True)
class ResponseArrays:
    """A decoded positives answer; ``expired`` (shaped as ``cache_hit``) marks the
    positives whose deadline passed, None when none did."""

    positives: np.ndarray
    cache_hit: np.ndarray
    model: str
    params: GenerationParams
    expired: np.ndarray | None = None
