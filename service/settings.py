"""Service settings: built once (from the CLI or the environment) and passed down.

One frozen object holds every knob so that the app factory, the batcher and
the cache never read globals or the environment themselves; the CLI and the
uvicorn factory are the only two places that build it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

ENV_PREFIX = "CLSP_"
TOKEN_ENV = "CLSP_API_TOKEN"
"""The token has its own, documented variable name so that it never has to
appear on a command line (where ``ps`` would show it)."""

DType = Literal["float32", "bfloat16", "float16"]


class ServiceSettings(BaseModel):
    """Everything ``clsp serve`` can be told; defaults suit one GPU."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(..., description="Model directory (diffusers save_pretrained layout).")
    redis: str | None = Field(
        None,
        description="Redis URL; without it the cache is an in-process LRU bounded by cache_mb.",
    )
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    device: str = "cpu"
    dtype: DType = "float32"
    max_batch: int = Field(64, ge=1, description="Most items in one sampler call.")
    max_wait_ms: float = Field(
        10.0,
        ge=0.0,
        description="How long the oldest queued item "
        "waits for others before its batch runs anyway.",
    )
    max_queue: int = Field(
        4096, ge=1, description="Most items waiting for the sampler; above it requests get 429."
    )
    max_anchors: int = Field(1024, ge=1, description="Most anchors in one request (413).")
    max_body_mb: float = Field(64.0, gt=0.0, description="Largest request body (413).")
    max_k: int = Field(64, ge=1, description="Largest params.k and candidate index + 1.")
    max_cost: int = Field(
        256 * 1000,
        ge=1,
        description="Most steps x items in one request: the compute one request may ask for (413).",
    )
    token: str | None = Field(
        None, description="Bearer token required on every route but the health checks."
    )
    cache_ttl: int = Field(7 * 24 * 3600, ge=1, description="Seconds a cached positive lives.")
    cache_mb: float = Field(256.0, ge=0.0, description="Size of the in-process LRU cache.")
    redis_timeout_s: float = Field(
        0.3,
        gt=0.0,
        description="Socket timeout of every Redis "
        "call; slower means the request is served uncached.",
    )
    redis_backoff_max_s: float = Field(
        5.0, gt=0.0, description="Longest pause between reconnection attempts while Redis is down."
    )
    log_json: bool = False
    log_level: str = "info"
    warmup_steps: int = Field(
        2,
        ge=1,
        description="Steps of each warm-up call run before /readyz answers 200 "
        "(PositivesGenerator.warmup: 2 or more also compile the noisy update kernel on CUDA).",
    )

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, **overrides: Any
    ) -> ServiceSettings:
        """Settings from ``CLSP_<FIELD>`` variables (``CLSP_MODEL``, ``CLSP_MAX_BATCH``,
        ...; the token from ``CLSP_API_TOKEN``); ``overrides`` win."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for name in cls.model_fields:
            raw = env.get(ENV_PREFIX + name.upper())
            if raw is not None and raw != "":
                values[name] = raw
        if env.get(TOKEN_ENV):
            values.setdefault("token", env[TOKEN_ENV])
        values.update({k: v for k, v in overrides.items() if v is not None})
        if "log_json" in values and isinstance(values["log_json"], str):
            values["log_json"] = values["log_json"].strip().lower() in {"1", "true", "yes", "on"}
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            names = ", ".join(
                ENV_PREFIX + ".".join(map(str, e["loc"])).upper() + f": {e['msg']}"
                for e in exc.errors(include_url=False)
            )
            raise ValueError(f"invalid service settings: {names}") from None
