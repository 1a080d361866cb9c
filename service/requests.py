"""Request handling of ``POST /v1/positives`` before the batcher (docs/design.md §4, steps
2 and 3): read the body within its limit, decode and validate it, check its cost,
canonicalise and key every item; and the encoding of the answer.

Apart from the routes (``app.py``), which only call these, and from the cache and
batcher flow (``positives.py``), which gets a ``PreparedRequest`` it can trust.
Everything that is the caller's fault raises a ``ProtocolError``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from fastapi import Request

from clsp_positives.proto.codec import ModelShapes, decode_request, media_type
from clsp_positives.proto.errors import ProtocolError
from clsp_positives.proto.keys import canonical_anchors, canonical_latents, positive_key
from clsp_positives.proto.messages import JSON_MEDIA_TYPE, SAFETENSORS_MEDIA_TYPE, RequestArrays
from clsp_positives.proto.model_settings import GenerationDefaults, resolve_unset
from clsp_positives.proto.params import GenerationParams, Sampling
from clsp_positives.service.settings import ServiceSettings

if TYPE_CHECKING:
    from clsp_positives.service.sampling.generator import PositivesGenerator

_INLINE_DECODE_BYTES = 1 << 20


@dataclass(frozen=True)
class PreparedRequest:
    """A validated request with its canonical anchors and one cache key per item."""

    request: RequestArrays
    canonical: np.ndarray  # float32 [N, C, H, W] pictures, or [N, c, h, w] latents
    keys: list[bytes]
    deadline: float = math.inf  # time.monotonic() of params.deadline_ms, inf for none
    cost: int = 0  # request_cost: sampler item-steps, autoencoder passes included


def request_cost(
    items: int, steps: int, *, encodes: int, decodes: int, autoencoder_cost: int
) -> int:
    """Sampler item-steps a request asks for (``ServiceSettings.max_cost``): each item
    runs every step, and a latent model's autoencoder passes count ``autoencoder_cost``
    each (docs/latent.md)."""
    return items * steps + (encodes + decodes) * autoencoder_cost


@dataclass(frozen=True)
class RequestDefaults:
    """What a service gives the params a request leaves unset (docs/design.md §6): the
    model folder's stored defaults (``clsp_generation.json``), then the service's
    sampling mode.

    Precedence, field by field: the request's own value; for ``sampling``, the operator's
    ``--sampling`` (``CLSP_SAMPLING``) when given; the stored value; the params' default
    (``--sampling``'s for ``sampling``). Without the file it is exactly the service's
    ``--sampling`` resolution of before.
    """

    stored: GenerationDefaults | None
    sampling: Sampling
    """The mode of requests that choose none, after the stored one (GET /v1/model)."""

    @classmethod
    def of(cls, settings: ServiceSettings, generator: PositivesGenerator) -> RequestDefaults:
        stored = generator.generation_defaults
        if stored is None or stored.sampling is None:
            return cls(stored, settings.sampling)
        if "sampling" in settings.model_fields_set:  # the operator chose for this service
            return cls(stored.model_copy(update={"sampling": None}), settings.sampling)
        return cls(stored, stored.sampling)

    def apply(self, params: GenerationParams) -> GenerationParams:
        """The params a request's positives are generated and keyed with."""
        return resolve_unset(params, self.stored, self.sampling)


def model_shapes(generator: PositivesGenerator) -> ModelShapes:
    """The picture and latent layouts of the generator's model, as the codec checks them."""
    return ModelShapes((generator.channels, *generator.sample_hw), generator.latent_chw)


class RequestValidator:
    """Body, validation, cost and keys of the requests of one generator."""

    def __init__(self, settings: ServiceSettings, generator: PositivesGenerator) -> None:
        self.settings = settings
        self.generator = generator
        self.fingerprint = generator.fingerprint
        self.shapes = model_shapes(generator)
        self.defaults = RequestDefaults.of(settings, generator)

    async def read_body(self, request: Request) -> bytes:
        limit = self.settings.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                raise ProtocolError(
                    f"Content-Length {declared!r} is not a number", code="invalid_body"
                ) from None
            if size > limit:
                raise self._too_large(size)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise self._too_large(size, partial=True)
            chunks.append(chunk)
        return b"".join(chunks)

    def _too_large(self, size: int, partial: bool = False) -> ProtocolError:
        what = "more than" if partial else ""
        return ProtocolError(
            f"body is {what} {size} bytes; the limit is {self.settings.max_body_bytes} "
            f"({self.settings.max_body_mb:g} MB): send fewer anchors per request",
            code="body_too_large",
            status=413,
        )

    def prepare(self, body: bytes, content_type: str | None) -> PreparedRequest:
        """Decode, validate, check the cost budget, canonicalise and key every item.

        The params the request left unset take the model's stored defaults and
        ``params.sampling`` None the service's mode here (``RequestDefaults``), before
        any key is made, so the key, the batcher group and the response all carry the
        params the positives were made with (docs/design.md §2, §7).
        """
        s = self.settings
        received = time.monotonic()
        req = decode_request(
            body,
            content_type,
            model=self.shapes,
            max_anchors=s.max_anchors,
            max_k=s.max_k,
        )
        req = dataclasses.replace(req, params=self.defaults.apply(req.params))
        items = len(req.candidates)
        latent_model = self.shapes.latent_chw is not None
        encodes = req.num_anchors if latent_model and req.anchor_space == "image" else 0
        decodes = items if latent_model and req.params.output == "images" else 0
        cost = request_cost(
            items,
            req.params.steps,
            encodes=encodes,
            decodes=decodes,
            autoencoder_cost=s.autoencoder_cost,
        )
        if cost > s.max_cost:
            coding = (
                f" + {encodes + decodes} autoencoder passes x {s.autoencoder_cost}"
                if encodes + decodes
                else ""
            )
            raise ProtocolError(
                f"request asks for {items} positives x {req.params.steps} steps{coding} = "
                f"{cost} sampler item-steps; the limit is {s.max_cost}: send fewer anchors, "
                "a smaller k or fewer steps",
                code="cost_too_high",
                status=413,
            )
        try:
            self.generator.check_params(req.params)
        except ValueError as exc:  # UnsupportedSchedulerError: these params, this model
            raise ProtocolError(
                f"invalid params for this model: {exc}", code="invalid_params", status=422
            ) from None
        expected = req.params.expect_model
        if expected is not None and expected != self.fingerprint:
            raise ProtocolError(
                f"this generator serves model {self.fingerprint}, the request expects "
                f"{expected}: send it to a generator of that model, or drop expect_model",
                code="model_mismatch",
                status=409,
            )
        space = req.anchor_space
        canon = (
            canonical_latents(req.anchors) if space == "latent" else canonical_anchors(req.anchors)
        )
        keys = [
            positive_key(self.fingerprint, req.params, canon[a], int(c), space)
            for a, c in zip(req.anchor_index, req.candidates, strict=True)
        ]
        ms = req.params.deadline_ms
        deadline = received + ms / 1000 if ms else math.inf
        return PreparedRequest(req, canon, keys, deadline, cost)

    async def prepare_async(self, body: bytes, content_type: str | None) -> PreparedRequest:
        # Large bodies decode and hash in a helper thread so the loop keeps serving.
        if len(body) > _INLINE_DECODE_BYTES:
            return await asyncio.to_thread(self.prepare, body, content_type)
        return self.prepare(body, content_type)


def response_encoding(accept: str | None, content_type: str | None) -> str:
    """The first of our two encodings that ``Accept`` names, else the request's own."""
    for part in (accept or "").split(","):
        kind = media_type(part)
        if kind in (SAFETENSORS_MEDIA_TYPE, JSON_MEDIA_TYPE):
            return kind
    kind = media_type(content_type)
    return kind if kind in (SAFETENSORS_MEDIA_TYPE, JSON_MEDIA_TYPE) else JSON_MEDIA_TYPE


async def wait_for_disconnect(request: Request) -> None:
    """Return when the client hangs up: what the batcher wait races against."""
    # After the body is read, the server's receive() only returns on hang-up.
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
