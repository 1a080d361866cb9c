"""Service settings: built once (from the CLI or the environment) and passed down.

One frozen object holds every knob so that the app factory, the batcher and
the cache never read globals or the environment themselves; the CLI and the
uvicorn factory are the only two places that build it, both through
``ServiceSettings.from_env``, so both honour the same precedence. Each field
owns its default, bounds and help: ``clsp serve``'s options and docs/cli.md's
table are generated from them (docs/design.md §8).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from clsp_positives.options import flag
from clsp_positives.proto.auth import TOKEN_ENV
from clsp_positives.proto.params import DEFAULT_MAX_K, DEFAULT_SAMPLING, Sampling
from clsp_positives.service.cache import CLUSTER_SCHEMES, SERVER_SCHEMES

ENV_PREFIX = "CLSP_"

DType = Literal["float32", "bfloat16", "float16"]
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def env_var(name: str) -> str:
    """The variable of a field: ``CLSP_<FIELD>``, except the token's own name."""
    return TOKEN_ENV if name == "token" else ENV_PREFIX + name.upper()


class ServiceSettings(BaseModel):
    """Everything ``clsp serve`` can be told; defaults suit one GPU."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(
        ...,
        description="Model directory (diffusers save_pretrained layout), or a Hugging Face hub "
        "id ORG/NAME read from the hub cache (docs/library.md, Hub models).",
    )
    redis: str | None = Field(
        None,
        description="Redis URL, e.g. redis://host:6379/0, or any one node of a Redis "
        "Cluster as redis+cluster://host:6379 (rediss+cluster:// with TLS); without it the "
        "cache is an in-process LRU bounded by cache_mb.",
    )
    host: str = Field("127.0.0.1", description="Address to listen on (0.0.0.0 in containers).")
    port: int = Field(8000, ge=0, le=65535, description="Port to listen on (0: any free one).")
    metrics_port: int | None = Field(
        None,
        ge=1,
        le=65535,
        description="Also serve GET /metrics on this port, without the bearer token, for a "
        "scraper that cannot send one (keep the port off public networks); none: off.",
    )
    device: str = Field("cpu", description="cpu, cuda or cuda:N.")
    dtype: DType = Field(
        "float32",
        description="The UNet's dtype (the trajectory stays float32); float16 needs CUDA, "
        "bfloat16 CUDA or a CPU with native bf16 (docs/performance.md).",
    )
    compile: bool = Field(
        False,
        description="torch.compile the UNet's halves: faster sampling once each batch shape "
        "is compiled (the warm-up compiles those of max_batch; docs/performance.md).",
    )
    sampling: Sampling = Field(
        DEFAULT_SAMPLING,
        description="Sampling of requests that do not choose: authors (the CLSP authors' "
        "loop, whatever the model's scheduler config says), authors-clipped (that loop with "
        "x0 clipped, for small models) or model (that config as written).",
    )
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
    max_body_mb: float = Field(64.0, gt=0.0, description="Largest request body in MB (413).")
    max_k: int = Field(DEFAULT_MAX_K, ge=1, description="Largest params.k and candidate index + 1.")
    max_cost: int = Field(
        256 * 1000,
        ge=1,
        description="Most steps x items in one request: the compute one request may ask for "
        "(413). A latent model adds autoencoder_cost per picture it encodes or decodes.",
    )
    autoencoder_cost: int = Field(
        1,
        ge=0,
        description="Sampler item-steps that one autoencoder encode or decode of one picture "
        "counts as toward max_cost (latent models only; docs/latent.md).",
    )
    token: str | None = Field(
        None,
        description="Bearer token required on every route but the health checks "
        f"(better set {TOKEN_ENV}: a flag shows in ps).",
    )
    cache_secret: str | None = Field(
        None,
        description="Key of the MAC that binds each cached positive to its key: set the "
        "same one on every generator of a pool sharing Redis (better as CLSP_CACHE_SECRET: "
        "a flag shows in ps). Without it: derived from the token, else random to the process.",
    )
    cache_ttl: int = Field(7 * 24 * 3600, ge=1, description="Seconds a cached positive lives.")
    cache_mb: float = Field(256.0, ge=0.0, description="Size of the in-process LRU cache in MB.")
    redis_timeout_s: float = Field(
        0.3,
        gt=0.0,
        description="Socket timeout of every Redis "
        "call; slower means the request is served uncached.",
    )
    redis_backoff_max_s: float = Field(
        5.0, gt=0.0, description="Longest pause between reconnection attempts while Redis is down."
    )
    log_json: bool = Field(False, description="One JSON object per log line.")
    log_level: str = Field(
        "info", description=f"Least severe level written: {', '.join(LOG_LEVELS)}."
    )
    warmup_steps: int = Field(
        2, ge=1, description="Steps of the warm-up batch run before /readyz answers 200."
    )

    @field_validator("redis")
    @classmethod
    def _redis_url(cls, value: str | None) -> str | None:
        if not value:
            return value
        url = urlsplit(value)
        if url.scheme not in (*SERVER_SCHEMES, *CLUSTER_SCHEMES):
            forms = ", ".join(f"{s}://" for s in (*SERVER_SCHEMES, *CLUSTER_SCHEMES))
            raise ValueError(f"a Redis URL starts with one of {forms}")
        if url.scheme in CLUSTER_SCHEMES and url.path.strip("/") not in ("", "0"):
            raise ValueError("a Redis Cluster has only database 0: drop the path")
        return value

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        if value.lower() not in LOG_LEVELS:
            raise ValueError(f"must be one of {', '.join(LOG_LEVELS)}")
        return value.lower()

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)

    def public(self) -> dict[str, Any]:
        """The settings as the start-up log shows them: no token, cache secret or
        Redis password."""
        values = self.model_dump(exclude={"token", "cache_secret"})
        if self.redis:
            url = urlsplit(self.redis)
            if url.password:  # redis://:secret@host: keep the secret out of logs
                values["redis"] = url._replace(
                    netloc="***@" + url.netloc.rsplit("@", 1)[1]
                ).geturl()
        return {
            **values,
            "token": "set" if self.token else None,
            "cache_secret": "set" if self.cache_secret else None,
        }

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, **overrides: Any
    ) -> ServiceSettings:
        """Settings by the one precedence of ``clsp serve`` and the uvicorn factory:
        ``overrides`` (the flags given) > ``CLSP_<FIELD>`` (``CLSP_API_TOKEN`` for the
        token; empty counts as unset) > the field's default (docs/design.md §8).

        Raises ValueError naming, for each bad value, the flag or variable it came from.
        """
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        source: dict[str, str] = {}
        for name in cls.model_fields:
            raw = env.get(env_var(name))
            if raw is not None and raw != "":
                values[name], source[name] = raw, env_var(name)
        for name, value in overrides.items():
            if value is not None:
                values[name], source[name] = value, flag(name)
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            problems = []
            for err in exc.errors(include_url=False):
                name = str(err["loc"][0]) if err["loc"] else ""
                where = source.get(name, f"{flag(name)} or {env_var(name)}")
                shown = "" if err["type"] == "missing" else f" (got {err.get('input')!r})"
                problems.append(f"{where}: {err['msg']}{shown}")
            raise ValueError("invalid service settings: " + "; ".join(problems)) from None
