"""Generation parameters: what a caller may ask of the sampler.

Validation is strict (unknown fields and out-of-range values are refused)
because a silently coerced parameter would generate, and cache, positives the
caller did not ask for.
"""

from __future__ import annotations

import json
from typing import Any, Literal, NamedTuple, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from clsp_positives.proto.errors import ProtocolError

DEFAULT_MAX_K = 64
"""Largest number of candidates per anchor a request may ask for, unless the
service is configured otherwise (pass ``{"max_k": n}`` as validation context)."""


def integral_floats_to_int(value: Any) -> Any:
    """``5.0`` -> ``5``; anything else unchanged (strict validation follows).

    JSON, and JSON Schema, which calls ``5.0`` an integer, cannot tell 5 from
    5.0, and some encoders write one for the other; booleans, strings and
    5.5 are still refused. Lists are converted item by item (shapes).
    """
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list):
        return [integral_floats_to_int(v) if isinstance(v, float) else v for v in value]
    return value


Method = Literal["ddim", "ddpm", "dpmpp-2m"]
"""Step rules (docs/design.md §1): DDIM, DDPM ancestral, DPM-Solver++ (2M); the wire's
``method``, the code's solver (``SamplerGroup.solver``). Everything that lists them (the
sampler's plans, the OpenAPI document, the CLI) derives from here; the sampler's
solver registry (``service.sampling.solvers.SOLVERS``, one class per name) checks on
import that its names are these and its eta-taking solvers ``ETA_METHODS``."""
ETA_METHODS: tuple[Method, ...] = ("ddim",)
"""The step rules that take ``eta``: for the others it changes nothing, so it enters
neither their keys nor their sampler groups (``GenerationParams.sampler_eta``)."""
CacheMode = Literal["use", "refresh", "bypass"]
Sampling = Literal["authors", "authors-clipped", "model"]
Interpolate = Literal["bottleneck", "bottleneck+low-skips"]
AnchorSpace = Literal["image", "latent"]
"""What a request's anchors are: pictures (wire tensor ``anchors``) or a latent model's
scaled latents (``anchor_latents``); docs/latent.md."""
Output = Literal["images", "latents"]
"""What a positive comes back as: uint8 pixels, or a latent model's scaled latents
(docs/latent.md)."""

DEFAULT_SAMPLING: Sampling = "authors"
"""The sampling mode of a service not told otherwise (``ServiceSettings.sampling``):
the CLSP authors' loop, whatever the model's scheduler config says (docs/design.md §1)."""


class GenerationParams(BaseModel):
    """Parameters of one positives request (docs/design.md §6)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    interpolation_weight: float = Field(
        0.1,
        ge=0.0,
        le=1.0,
        allow_inf_nan=False,
        description="Weight of the candidate's own bottleneck; 1 = plain sampling, "
        "0 = only the anchor's bottleneck.",
    )
    steps: int = Field(100, ge=1, le=1000, description="Sampling steps.")
    eta: float = Field(
        0.1,
        ge=0.0,
        le=1.0,
        allow_inf_nan=False,
        description="DDIM stochasticity (ignored by the other methods).",
    )
    method: Method = Field(
        "ddim",
        description=f"Step rule, called the solver in the code: "
        f"{', '.join(get_args(Method)[:-1])} or "
        f"{get_args(Method)[-1]} (DPM-Solver++ 2M, deterministic).",
    )
    sampling: Sampling | None = Field(
        None,
        description="authors: the CLSP authors' loop (trailing timesteps, no x0 clipping, "
        "fixed_large DDPM variance); authors-clipped: that loop with x0 clipped to [-1, 1] "
        "at every step (small models diverge without it: docs/performance.md); model: the "
        "model's scheduler config as written; null: the service's default (GET /v1/model "
        "shows it).",
    )
    interpolate: Interpolate = Field(
        "bottleneck",
        description="What of the anchor's encoding enters the candidate: bottleneck: the "
        "bottleneck alone (the paper); bottleneck+low-skips: also the skip tensors at the "
        "bottleneck's resolution, which keeps the anchor's class far more often with small "
        "models (docs/method.md).",
    )
    interpolate_until: float = Field(
        1.0,
        gt=0.0,
        le=1.0,
        allow_inf_nan=False,
        description="Share of the sampling steps, from the noisiest on, in which the "
        "anchor's encoding is mixed in; the later, finer steps run the candidate alone. "
        "1 = every step, as the paper; lower keeps the anchor's coarse shape and lets the "
        "candidates' detail differ more (docs/method.md).",
    )
    share_anchor: bool = Field(
        False,
        description="The k candidates of an anchor share one noised anchor (noise seeded "
        "by the anchor's content instead of each candidate's key): one anchor encoder pass "
        "per anchor and step instead of k. Faster; candidates of one anchor come out a "
        "little closer together (docs/performance.md).",
    )
    anchor_refresh: int = Field(
        1,
        ge=1,
        le=1000,
        description="Encode the anchor at every n-th step only and reuse that encoding in "
        "between (DeepCache-style); 1 = every step, as the paper (docs/performance.md).",
    )
    output: Output = Field(
        "images",
        description="images: uint8 pixels; latents: a latent model's float32 [c, h, w] "
        "latents in its scaled latent space, not decoded (docs/latent.md). A pixel model "
        "refuses latents.",
    )
    expect_model: str | None = Field(
        None,
        min_length=1,
        max_length=128,
        description="The model fingerprint the caller expects (GET /v1/model): a generator "
        "serving another model answers 409 model_mismatch instead of its positives.",
    )
    deadline_ms: float | None = Field(
        None,
        gt=0,
        le=3_600_000,
        allow_inf_nan=False,
        description="Milliseconds from when the service has read the request until its "
        "positives are no use: items no sampler call has taken by then are dropped "
        "(never generated, never cached). None answered: 504 deadline_exceeded; some: the "
        "`expired` mask beside the positives. Null: no deadline.",
    )
    priority: int = Field(
        0,
        ge=0,
        le=1,
        description="0: a training step needs these now; 1: look-ahead, generated after "
        "every waiting priority-0 item.",
    )
    k: int | None = Field(
        None,
        ge=1,
        description="Return candidates 0..k-1 for every anchor (exclusive with `candidates`).",
    )
    cache: CacheMode = Field(
        "use",
        description="use: read and write the cache; refresh: regenerate and "
        "overwrite; bypass: neither read nor write.",
    )

    _integral = field_validator("steps", "anchor_refresh", "priority", "k", mode="before")(
        integral_floats_to_int
    )

    @field_validator("k")
    @classmethod
    def _k_within_limit(cls, k: int | None, info: ValidationInfo) -> int | None:
        max_k = (info.context or {}).get("max_k", DEFAULT_MAX_K)
        if k is not None and k > max_k:
            raise ValueError(f"k={k} is above this service's limit of {max_k}")
        return k

    @property
    def sampler_eta(self) -> float | None:
        """``eta`` as the sampler uses it: None for a method not in ``ETA_METHODS``
        (DDPM, DPM-Solver++), whose step has no eta.

        Decided here alone: ``canonical`` and ``group`` both read it, so requests of
        such a method that differ only in eta share their keys and their sampler calls.
        """
        # + 0.0 folds -0.0 into 0.0: the same sampler, so the same key
        return float(self.eta) + 0.0 if self.method in ETA_METHODS else None

    @property
    def sampler_sampling(self) -> Sampling:
        """``sampling`` as the sampler uses it: None counts as ``DEFAULT_SAMPLING``.

        A service resolves None to its own setting (``resolved``) before it makes
        keys, so this fallback only decides the keys of params made elsewhere:
        they match what a service with the default setting caches.
        """
        return self.sampling if self.sampling is not None else DEFAULT_SAMPLING

    def resolved(self, default: Sampling) -> GenerationParams:
        """These params with ``sampling`` None replaced by ``default`` (a service's setting)."""
        if self.sampling is not None:
            return self
        return self.model_copy(update={"sampling": default})

    def canonical(self) -> bytes:
        """The bytes that enter a positive's cache key.

        Only what changes the generated sample takes part: ``k``, ``cache``,
        ``expect_model``, ``deadline_ms`` and ``priority`` select, route, check and
        schedule, they do not change a positive (the
        model enters every key as its fingerprint), and eta enters as
        ``sampler_eta``. The sampling mode always enters, so positives made
        under the model's own scheduler config are never served for the
        authors' loop, nor the other way round (docs/design.md §7). Every other field of
        the sampler group (``interpolate``, ``share_anchor``, ``anchor_refresh`` and any
        added later) enters only when it is not its default, the paper's setting, so the
        keys of every positive cached before it existed stay valid. ``output`` is not
        here: it changes how a positive is returned, not which positive, and enters only
        the key's tail (``keys.positive_key``).
        """
        fields: dict[str, Any] = {
            # + 0.0 folds -0.0 into 0.0: the same sampler, so the same key
            "interpolation_weight": float(self.interpolation_weight) + 0.0,
            "method": self.method,
            "sampling": self.sampler_sampling,
            "steps": int(self.steps),
        }
        if self.sampler_eta is not None:
            fields["eta"] = self.sampler_eta
        for name in SamplerGroup._fields:
            wire = SAMPLER_WIRE_NAMES.get(name, name)
            if wire in fields or wire in NOT_KEYED:
                continue
            value = getattr(self, wire)
            if value != type(self).model_fields[wire].default:
                fields[wire] = value
        return json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()

    def group(self) -> SamplerGroup:
        """The settings of the sampler call, built once per request and passed whole down
        to the sampling loop: items may share one call only when these are equal (the
        interpolation weight may differ per item).

        Each ``SamplerGroup`` field is read from the params field of its name
        (``SAMPLER_WIRE_NAMES`` for the two the code renames); only eta and the sampling
        mode go through their ``sampler_`` properties, so that requests which sample
        alike share a group.
        """
        wire = {
            name: getattr(self, SAMPLER_WIRE_NAMES.get(name, name)) for name in SamplerGroup._fields
        }
        eta = self.sampler_eta
        return SamplerGroup(
            **wire | {"eta": 0.0 if eta is None else eta, "sampling": self.sampler_sampling}
        )


class SamplerGroup(NamedTuple):
    """``GenerationParams.group()``: the settings of one sampler call, one hashable value
    from the request through the batcher's group to ``CLSPSampler`` (docs/design.md §4).

    A NamedTuple: immutable and hashable, as a batcher group must be. Two fields are
    named as the code names them, not as the wire does (``SAMPLER_WIRE_NAMES``):
    ``sampling_steps`` is the wire's ``steps`` and ``solver`` the wire's ``method`` (the
    step rule). A new generation param that changes the sampler is one field in
    ``GenerationParams``, the same field here, and its use in the sampler.
    """

    sampling_steps: int
    eta: float
    solver: Method
    sampling: Sampling
    interpolate: Interpolate
    interpolate_until: float
    share_anchor: bool
    anchor_refresh: int
    output: Output


SAMPLER_WIRE_NAMES: dict[str, str] = {"sampling_steps": "steps", "solver": "method"}
"""``SamplerGroup`` fields whose ``GenerationParams`` field has another name; every
other field has its wire field's name."""
NOT_KEYED = frozenset({"eta", "output"})
"""Sampler group fields ``canonical`` does not take from the group: eta enters as
``sampler_eta``, and ``output`` only chooses how a positive is returned."""


def parse_params(raw: Any, *, max_k: int = DEFAULT_MAX_K) -> GenerationParams:
    """Validate ``raw`` (a dict, a JSON string or None) into parameters.

    Raises ProtocolError whose detail lists each offending field.
    """
    if raw is None:
        return GenerationParams()
    if isinstance(raw, (str, bytes)):
        try:
            raw = json.loads(raw)
        except (ValueError, RecursionError) as exc:  # syntax, UTF-8, int digits, depth
            raise ProtocolError(
                f"params is not valid JSON ({exc}); send an object such as "
                '{"interpolation_weight": 0.1, "steps": 100}',
                code="invalid_params",
                status=422,
            ) from None
    if not isinstance(raw, dict):
        raise ProtocolError(
            f"params must be a JSON object, got {type(raw).__name__}",
            code="invalid_params",
            status=422,
        )
    try:
        return GenerationParams.model_validate(raw, context={"max_k": max_k})
    except ValidationError as exc:
        raise ProtocolError(
            "invalid params: "
            + describe_validation_error(exc, allowed=sorted(GenerationParams.model_fields)),
            code="invalid_params",
            status=422,
        ) from None


def describe_validation_error(exc: ValidationError, *, allowed: list[str] | None = None) -> str:
    """One readable line per pydantic error: ``field: message (got value)``."""
    parts = []
    for err in exc.errors(include_url=False):
        loc = ".".join(str(p) for p in err["loc"]) or "body"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
            if allowed:
                msg += f"; allowed fields are {', '.join(allowed)}"
        got = err.get("input")
        hide = err["type"] == "extra_forbidden" or isinstance(got, dict)
        shown = "" if hide else f" (got {_short(got)})"
        parts.append(f"{loc}: {msg}{shown}")
    return "; ".join(parts)


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
