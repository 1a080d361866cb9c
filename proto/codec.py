"""The tensor codec: safetensors bytes on the fast path, base64 JSON for small
requests and curl.

Decoding is strict and never trusts the sender: the safetensors parser is our
own (a few lines) so that the header cap, dtype, shape, offsets and byte
lengths are checked before a single array is built, and every failure is a
``ProtocolError`` saying what to fix. Nothing is ever unpickled.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import safetensors.numpy
from pydantic import ValidationError

from clsp_positives.proto.errors import ProtocolError
from clsp_positives.proto.messages import (
    JSON_MEDIA_TYPE,
    MAX_DIM,
    MAX_RANK,
    SAFETENSORS_MEDIA_TYPE,
    PositivesRequest,
    PositivesResponse,
    RequestArrays,
    ResponseArrays,
    Tensor,
)
from clsp_positives.proto.params import (
    DEFAULT_MAX_K,
    AnchorSpace,
    GenerationParams,
    describe_validation_error,
    parse_params,
)

_NO_LIMIT = 1 << 30
"""max_k on the client side: the service enforces its own limit."""

DEFAULT_MAX_HEADER_BYTES = 64 * 1024
"""A positives request has at most a handful of tensors; a larger header is
either a mistake or an attempt to make the server parse megabytes of JSON."""

# safetensors dtype tag <-> numpy little-endian dtype <-> JSON name
_ST_TO_NP: dict[str, np.dtype] = {
    "U8": np.dtype("u1"),
    "I32": np.dtype("<i4"),
    "I64": np.dtype("<i8"),
    "F16": np.dtype("<f2"),
    "F32": np.dtype("<f4"),
    "F64": np.dtype("<f8"),
}
_NP_TO_ST = {dt.name: tag for tag, dt in _ST_TO_NP.items()}
_JSON_TO_NP = {dt.name: dt for dt in _ST_TO_NP.values()}
SUPPORTED_DTYPES = tuple(_JSON_TO_NP)

_REQUEST_TENSORS = {"anchors", "anchor_latents", "candidates"}
_RESPONSE_TENSORS = {"positives", "cache_hit"}
_OPTIONAL_RESPONSE_TENSORS = {"expired"}
_MAX_TENSOR_BYTES = 1 << 48
"""Bound on the bytes a declared shape may describe, so that even an empty
tensor with absurd dimensions is refused before numpy is asked to build it."""


def _error(detail: str, code: str = "invalid_tensor", status: int = 400) -> ProtocolError:
    return ProtocolError(detail, code=code, status=status)


def _check_shape(name: str, shape: Any, itemsize: int) -> list[int]:
    """A declared shape as a list of ints that numpy can build, or a ProtocolError."""
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise _error(
            f"{name}: shape must be a list of non-negative integers of at most "
            f"{MAX_DIM}, got {_short(shape)}"
        )
    if len(shape) > MAX_RANK:
        raise _error(f"{name}: shape has rank {len(shape)}; the limit is {MAX_RANK}")
    if math.prod(max(d, 1) for d in shape) * itemsize > _MAX_TENSOR_BYTES:
        raise _error(f"{name}: shape {shape} describes more than {_MAX_TENSOR_BYTES} bytes")
    return shape


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_DIM


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _loads(text: str | bytes) -> Any:
    """Strict JSON: no NaN/Infinity literals; every parser failure is a ValueError
    (bad UTF-8, bad syntax, too-long integers, too-deep nesting)."""

    def _no_constants(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    try:
        return json.loads(text, parse_constant=_no_constants)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def _check_supported(name: str, dtype: np.dtype) -> np.dtype:
    if dtype.name not in _JSON_TO_NP:
        raise _error(
            f"{name}: dtype {dtype.name} is not supported; use one of {', '.join(SUPPORTED_DTYPES)}"
        )
    return _JSON_TO_NP[dtype.name]


# ---------------------------------------------------------------- safetensors


def encode_safetensors(
    tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None
) -> bytes:
    """Serialise named arrays (and string metadata) to safetensors bytes."""
    arrays = {}
    for name, arr in tensors.items():
        arr = np.asarray(arr)
        dt = _check_supported(name, arr.dtype)
        arrays[name] = np.asarray(arr, dtype=dt, order="C")  # keeps 0-d arrays 0-d
    return safetensors.numpy.save(arrays, metadata=dict(metadata) if metadata else None)


def decode_safetensors(
    blob: bytes, *, max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Parse safetensors bytes into read-only arrays and the metadata dict."""
    if len(blob) < 8:
        raise _error(
            f"body is {len(blob)} bytes, too short for safetensors (it starts "
            "with an 8-byte header length)",
            code="invalid_body",
        )
    (header_len,) = struct.unpack("<Q", blob[:8])
    if header_len > max_header_bytes:
        raise _error(
            f"safetensors header is {header_len} bytes; the limit is {max_header_bytes}",
            code="header_too_large",
            status=413,
        )
    if 8 + header_len > len(blob):
        raise _error(
            f"safetensors body is truncated: the header says {header_len} bytes "
            f"but only {len(blob) - 8} follow",
            code="invalid_body",
        )
    try:
        header = _loads(bytes(blob[8 : 8 + header_len]).decode("utf-8"))
    except ValueError:
        raise _error(
            "body is not safetensors: its header is not UTF-8 JSON", code="invalid_body"
        ) from None
    if not isinstance(header, dict):
        raise _error(
            "body is not safetensors: its header is not a JSON object", code="invalid_body"
        )

    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise _error("safetensors __metadata__ must map strings to strings", code="invalid_body")

    data = memoryview(blob)[8 + header_len :]
    spans: list[tuple[int, int, str]] = []
    tensors: dict[str, np.ndarray] = {}
    for name, entry in header.items():
        dtype, shape, (begin, end) = _parse_entry(name, entry)
        nbytes = math.prod(shape) * dtype.itemsize
        if not 0 <= begin <= end <= len(data):
            raise _error(
                f"{name}: data_offsets [{begin}, {end}] lie outside the "
                f"{len(data)} data bytes (is the body truncated?)",
                code="invalid_body",
            )
        if end - begin != nbytes:
            raise _error(
                f"{name}: shape {shape} of {dtype.name} needs {nbytes} bytes but "
                f"data_offsets span {end - begin}"
            )
        spans.append((begin, end, name))
        arr = np.frombuffer(data[begin:end], dtype=dtype) if nbytes else np.empty(0, dtype)
        tensors[name] = arr.reshape(shape)

    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            raise _error(
                f"{name}: data_offsets leave a gap or overlap at byte {position}",
                code="invalid_body",
            )
        position = end
    if position != len(data):
        raise _error(
            f"safetensors body has {len(data) - position} bytes after the last tensor",
            code="invalid_body",
        )
    return tensors, metadata


def _parse_entry(name: str, entry: Any) -> tuple[np.dtype, list[int], tuple[int, int]]:
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise _error(
            f"{name}: a safetensors entry needs exactly dtype, shape and data_offsets",
            code="invalid_body",
        )
    tag, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(tag, str) or tag not in _ST_TO_NP:
        raise _error(
            f"{name}: dtype {_short(tag)} is not supported; use one of {', '.join(_ST_TO_NP)}"
        )
    dtype = _ST_TO_NP[tag]
    shape = _check_shape(name, shape, dtype.itemsize)
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
    ):
        raise _error(f"{name}: data_offsets must be two non-negative integers", code="invalid_body")
    return dtype, shape, (offsets[0], offsets[1])


# ----------------------------------------------------------------------- JSON


def tensor_to_json(arr: np.ndarray) -> Tensor:
    """One array as the JSON ``Tensor`` model."""
    arr = np.asarray(arr)
    dt = _check_supported("tensor", arr.dtype)
    raw = np.ascontiguousarray(arr, dtype=dt).tobytes()
    return Tensor(dtype=dt.name, shape=list(arr.shape), data=base64.b64encode(raw).decode())


def decode_base64(text: str) -> bytes:
    """Standard padded base64, exactly what ``BASE64_PATTERN`` documents.

    ``b64decode(validate=True)`` alone still takes excess or misplaced padding
    (``"AAAA="``), which the schema refuses; a client that trusts the document
    must never see the decoder accept what it calls invalid.
    """
    body = text.rstrip("=")
    if len(text) % 4 or len(text) - len(body) > 2 or "=" in body:
        raise ValueError("not standard padded base64")
    return base64.b64decode(text, validate=True)


def tensor_from_json(name: str, tensor: Tensor | Mapping[str, Any]) -> np.ndarray:
    """The array a JSON ``Tensor`` describes, with its byte length checked."""
    if not isinstance(tensor, Tensor):
        try:
            tensor = Tensor.model_validate(tensor)
        except ValidationError as exc:
            raise _error(f"{name}: " + describe_validation_error(exc)) from None
    dtype = _JSON_TO_NP[tensor.dtype]
    shape = _check_shape(name, list(tensor.shape), dtype.itemsize)
    try:
        raw = decode_base64(tensor.data)
    except (binascii.Error, ValueError):
        raise _error(
            f"{name}: data is not valid base64 (standard alphabet, with padding)",
            code="invalid_base64",
        ) from None
    nbytes = math.prod(shape) * dtype.itemsize
    if len(raw) != nbytes:
        raise _error(
            f"{name}: shape {shape} of {tensor.dtype} needs {nbytes} bytes "
            f"but data decodes to {len(raw)}"
        )
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def _json_body(body: bytes) -> dict[str, Any]:
    try:
        obj = _loads(body)
    except ValueError as exc:
        raise _error(f"body is not valid JSON: {exc}", code="invalid_body") from None
    if not isinstance(obj, dict):
        raise _error("body must be a JSON object", code="invalid_body")
    return obj


# ------------------------------------------------------------ request checks


def check_anchors(
    anchors: np.ndarray,
    *,
    expected_chw: tuple[int, int, int] | None = None,
    max_anchors: int | None = None,
) -> None:
    """Rank, dtype, count, finiteness, range and (if known) the model's shape."""
    if anchors.dtype == np.uint8:
        layout = "[N, H, W, C] uint8"
    elif anchors.dtype in (np.float16, np.float32):
        layout = "[N, C, H, W] float in [-1, 1]"
    else:
        raise _error(
            f"anchors: dtype {anchors.dtype.name} is not accepted; send uint8 "
            "[N, H, W, C] pixels or float32/float16 [N, C, H, W] in [-1, 1]"
        )
    if anchors.ndim != 4:
        raise _error(f"anchors must have rank 4 ({layout}), got shape {list(anchors.shape)}")
    n = anchors.shape[0]
    if n == 0:
        raise _error("anchors is empty: send at least one anchor")
    if 0 in anchors.shape:
        raise _error(f"anchors have an empty dimension ({layout}), got shape {list(anchors.shape)}")
    if max_anchors is not None and n > max_anchors:
        raise _error(
            f"{n} anchors in one request; the limit is {max_anchors}: split the request",
            code="too_many_anchors",
            status=413,
        )
    chw = (
        anchors.shape[1:]
        if anchors.dtype != np.uint8
        else (anchors.shape[3], anchors.shape[1], anchors.shape[2])
    )
    if expected_chw is not None and tuple(chw) != tuple(expected_chw):
        c, h, w = expected_chw
        want = f"[N, {h}, {w}, {c}] uint8 or [N, {c}, {h}, {w}] float"
        raise _error(
            f"anchors have {chw[0]} channels of {chw[1]}x{chw[2]} but the model "
            f"takes {c} channels of {h}x{w}: send {want}",
            code="wrong_shape",
        )
    if anchors.dtype != np.uint8:
        values = anchors.astype(np.float32, copy=False)
        if not np.isfinite(values).all():
            raise _error("anchors contain NaN or Inf")
        lo, hi = float(values.min()), float(values.max())
        if lo < -1.0 or hi > 1.0:
            raise _error(
                f"float anchors must lie in [-1, 1], got values in [{lo:.4g}, "
                f"{hi:.4g}]; scale pixels as x / 127.5 - 1"
            )


def check_latents(
    latents: np.ndarray,
    *,
    expected_chw: tuple[int, int, int] | None = None,
    max_anchors: int | None = None,
) -> None:
    """``anchor_latents``: dtype, rank, count, the model's latent shape, finiteness.

    No range check: a scaled latent space is not bounded the way pixels are.
    """
    layout = "float32/float16 [N, c, h, w] latents"
    if latents.dtype not in (np.float16, np.float32):
        raise _error(f"anchor_latents: dtype {latents.dtype.name} is not accepted; send {layout}")
    if latents.ndim != 4:
        raise _error(f"anchor_latents must have rank 4 ({layout}), got shape {list(latents.shape)}")
    n = latents.shape[0]
    if n == 0 or 0 in latents.shape:
        raise _error(
            f"anchor_latents is empty: send at least one latent, got {list(latents.shape)}"
        )
    if max_anchors is not None and n > max_anchors:
        raise _error(
            f"{n} anchors in one request; the limit is {max_anchors}: split the request",
            code="too_many_anchors",
            status=413,
        )
    if expected_chw is not None and tuple(latents.shape[1:]) != tuple(expected_chw):
        c, h, w = expected_chw
        raise _error(
            f"anchor_latents have shape [N, {', '.join(map(str, latents.shape[1:]))}] but the "
            f"model's latents are [N, {c}, {h}, {w}] (GET /v1/model: latent_channels, "
            "latent_size)",
            code="wrong_shape",
        )
    if not np.isfinite(latents.astype(np.float32, copy=False)).all():
        raise _error("anchor_latents contain NaN or Inf")


def _candidate_items(
    n: int, candidates: np.ndarray | None, params: GenerationParams, max_k: int
) -> tuple[np.ndarray, np.ndarray]:
    """(candidate index, anchor index) of every requested item."""
    if params.k is not None:
        if candidates is not None:
            raise _error(
                "send either params.k or a candidates tensor, not both",
                code="invalid_params",
                status=422,
            )
        return (
            np.tile(np.arange(params.k, dtype=np.int64), n),
            np.repeat(np.arange(n, dtype=np.int64), params.k),
        )
    if candidates is None:
        return np.zeros(n, np.int64), np.arange(n, dtype=np.int64)
    if candidates.dtype != np.int64:
        raise _error(f"candidates must be int64, got {candidates.dtype.name}")
    if candidates.shape != (n,):
        raise _error(
            f"candidates must have shape [{n}] (one index per anchor), got {list(candidates.shape)}"
        )
    if n and (candidates.min() < 0 or candidates.max() >= max_k):
        raise _error(
            f"candidate indices must lie in [0, {max_k - 1}], got "
            f"[{candidates.min()}, {candidates.max()}]"
        )
    return candidates.astype(np.int64), np.arange(n, dtype=np.int64)


@dataclass(frozen=True)
class ModelShapes:
    """What the serving model takes, for validating requests: its image shape and,
    for a latent model, its latent shape (None: a pixel model, which refuses
    ``anchor_latents`` and ``params.output`` latents)."""

    image_chw: tuple[int, int, int]
    latent_chw: tuple[int, int, int] | None = None


def _request_arrays(
    tensors: Mapping[str, np.ndarray],
    raw_params: Any,
    *,
    model: ModelShapes | None,
    max_anchors: int | None,
    max_k: int,
) -> RequestArrays:
    unknown = set(tensors) - _REQUEST_TENSORS
    if unknown:
        raise _error(
            f"unknown tensors {sorted(unknown)}; a request carries 'anchors' (or "
            "'anchor_latents') and optionally 'candidates'"
        )
    given = [name for name in ("anchors", "anchor_latents") if name in tensors]
    if len(given) != 1:
        raise _error(
            "the request has "
            + (
                "neither 'anchors' nor 'anchor_latents'"
                if not given
                else "both 'anchors' and 'anchor_latents'"
            )
            + ": send exactly one (pictures, or a latent model's latents)"
        )
    params = parse_params(raw_params, max_k=max_k)
    latent_model = model is None or model.latent_chw is not None
    if params.output == "latents" and not latent_model:
        raise _error(
            "params.output: latents needs a latent model (one with an autoencoder); this "
            "model samples pixels: ask for images",
            code="invalid_params",
            status=422,
        )
    if given == ["anchor_latents"]:
        if not latent_model:
            raise _error(
                "anchor_latents: this model samples pixels and has no latent space; send "
                "the pictures as 'anchors'",
                code="latents_unsupported",
            )
        anchors = tensors["anchor_latents"]
        check_latents(
            anchors,
            expected_chw=None if model is None else model.latent_chw,
            max_anchors=max_anchors,
        )
        space: AnchorSpace = "latent"
    else:
        anchors = tensors["anchors"]
        check_anchors(
            anchors,
            expected_chw=None if model is None else model.image_chw,
            max_anchors=max_anchors,
        )
        space = "image"
    candidates, anchor_index = _candidate_items(
        anchors.shape[0], tensors.get("candidates"), params, max_k
    )
    return RequestArrays(anchors, candidates, anchor_index, params, space)


# ------------------------------------------------------------ request / reply


def media_type(content_type: str | None) -> str:
    """The bare media type of a Content-Type or Accept value."""
    return (content_type or "").split(";", 1)[0].strip().lower()


def decode_request(
    body: bytes,
    content_type: str | None,
    *,
    model: ModelShapes | None = None,
    max_anchors: int | None = None,
    max_k: int = DEFAULT_MAX_K,
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
) -> RequestArrays:
    """Decode and validate a ``POST /v1/positives`` body in either encoding.

    ``model`` None checks what can be checked without knowing the model."""
    kind = media_type(content_type)
    if kind == SAFETENSORS_MEDIA_TYPE:
        tensors, metadata = decode_safetensors(body, max_header_bytes=max_header_bytes)
        unknown_meta = set(metadata) - {"params"}
        if unknown_meta:
            raise _error(
                f"unknown metadata keys {sorted(unknown_meta)}; only 'params' is read",
                code="invalid_params",
                status=422,
            )
        return _request_arrays(
            tensors,
            metadata.get("params"),
            model=model,
            max_anchors=max_anchors,
            max_k=max_k,
        )
    if kind == JSON_MEDIA_TYPE:
        obj = _json_body(body)
        unknown = set(obj) - set(PositivesRequest.model_fields)
        if unknown:
            raise _error(
                f"unknown fields {sorted(unknown)}; a request has anchors (or anchor_latents), "
                "candidates and params",
                code="invalid_body",
            )
        if "params" in obj and not isinstance(obj["params"], dict):
            raise _error(
                f"params must be a JSON object, got {_short(obj['params'])}",
                code="invalid_params",
                status=422,
            )
        for name in ("anchors", "anchor_latents"):
            if name in obj and obj[name] is None:
                raise _error(f"{name} is null: send a tensor, or leave the field out")
        tensors = {
            name: tensor_from_json(name, obj[name])
            for name in ("anchors", "anchor_latents", "candidates")
            if obj.get(name) is not None
        }
        return _request_arrays(
            tensors,
            obj.get("params"),
            model=model,
            max_anchors=max_anchors,
            max_k=max_k,
        )
    raise _error(
        f"unsupported content type {content_type!r}; send "
        f"{SAFETENSORS_MEDIA_TYPE} or {JSON_MEDIA_TYPE}",
        code="unsupported_media_type",
        status=415,
    )


def encode_request(
    anchors: np.ndarray,
    candidates: np.ndarray | None = None,
    params: GenerationParams | Mapping[str, Any] | None = None,
    *,
    encoding: str = SAFETENSORS_MEDIA_TYPE,
    latents: bool = False,
) -> tuple[bytes, str]:
    """Client side: (body, content type) of a positives request; ``latents``: the
    anchors are a latent model's latents, sent as ``anchor_latents``."""
    p = (
        params
        if isinstance(params, GenerationParams)
        else parse_params(dict(params or {}), max_k=_NO_LIMIT)
    )
    tensors = {"anchor_latents" if latents else "anchors": anchors}
    if candidates is not None:
        tensors["candidates"] = np.asarray(candidates, dtype=np.int64)
    # Only what the caller set: a field left unset takes the model's stored default on
    # the service (docs/api.md, "Params").
    params_obj = p.model_dump(mode="json", exclude_unset=True)
    return _encode(tensors, {"params": params_obj}, encoding)


def encode_response(result: ResponseArrays, *, encoding: str) -> tuple[bytes, str]:
    """Server side: (body, content type) of a positives answer."""
    tensors = {"positives": result.positives, "cache_hit": result.cache_hit}
    if result.expired is not None:
        tensors["expired"] = result.expired
    meta = {"model": result.model, "params": result.params.model_dump(mode="json")}
    return _encode(tensors, meta, encoding)


def _encode(
    tensors: dict[str, np.ndarray], meta: dict[str, Any], encoding: str
) -> tuple[bytes, str]:
    kind = media_type(encoding)
    if kind == SAFETENSORS_MEDIA_TYPE:
        st_meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}
        return encode_safetensors(tensors, st_meta), SAFETENSORS_MEDIA_TYPE
    if kind == JSON_MEDIA_TYPE:
        obj: dict[str, Any] = {k: tensor_to_json(v).model_dump() for k, v in tensors.items()}
        obj.update(meta)
        return json.dumps(obj, separators=(",", ":")).encode(), JSON_MEDIA_TYPE
    raise ProtocolError(
        f"unknown encoding {encoding!r}; use {SAFETENSORS_MEDIA_TYPE} or {JSON_MEDIA_TYPE}",
        code="unsupported_media_type",
        status=415,
    )


def decode_response(body: bytes, content_type: str | None) -> ResponseArrays:
    """Client side: decode a positives answer in either encoding."""
    kind = media_type(content_type)
    if kind == SAFETENSORS_MEDIA_TYPE:
        tensors, meta = decode_safetensors(body, max_header_bytes=1 << 20)
        if "params" not in meta or "model" not in meta:
            raise _error(
                "malformed answer: safetensors metadata needs 'model' and 'params'",
                code="invalid_body",
            )
        raw_params, model = meta["params"], meta["model"]
    elif kind == JSON_MEDIA_TYPE:
        obj = _json_body(body)
        try:
            reply = PositivesResponse.model_validate(obj, context={"max_k": _NO_LIMIT})
        except ValidationError as exc:
            raise _error(
                "malformed answer: " + describe_validation_error(exc), code="invalid_body"
            ) from None
        tensors = {
            name: tensor_from_json(name, getattr(reply, name))
            for name in sorted(_RESPONSE_TENSORS | _OPTIONAL_RESPONSE_TENSORS)
            if getattr(reply, name) is not None
        }
        raw_params, model = reply.params.model_dump(), reply.model
    else:
        raise _error(
            f"unexpected answer content type {content_type!r}",
            code="unsupported_media_type",
            status=415,
        )
    missing = _RESPONSE_TENSORS - set(tensors)
    if missing:
        raise _error(f"answer lacks tensors {sorted(missing)}", code="invalid_body")
    params = parse_params(raw_params, max_k=_NO_LIMIT)
    positives, cache_hit = tensors["positives"], tensors["cache_hit"]
    expired = tensors.get("expired")
    _check_answer(positives, cache_hit, params)
    if expired is not None and (expired.dtype != np.uint8 or expired.shape != cache_hit.shape):
        raise _error(
            f"malformed answer: expired must be uint8 {list(cache_hit.shape)} like cache_hit, "
            f"got {expired.dtype.name} {list(expired.shape)}",
            code="invalid_body",
        )
    return ResponseArrays(positives, cache_hit, model, params, expired)


def _check_answer(positives: np.ndarray, cache_hit: np.ndarray, params: GenerationParams) -> None:
    """An answer's tensors must fit together: a client indexes them blindly."""
    rank = 4 if params.k is None else 5
    item = "H, W, C" if params.output == "images" else "c, h, w"
    layout = "[N, " + ("" if params.k is None else "k, ") + item + "]"
    dtype = np.uint8 if params.output == "images" else np.float32
    if positives.dtype != dtype or positives.ndim != rank:
        raise _error(
            f"malformed answer: positives must be {np.dtype(dtype).name} {layout}, got "
            f"{positives.dtype.name} {list(positives.shape)}",
            code="invalid_body",
        )
    if params.k is not None and positives.shape[1] != params.k:
        raise _error(
            f"malformed answer: positives hold {positives.shape[1]} candidates per "
            f"anchor but params.k is {params.k}",
            code="invalid_body",
        )
    if cache_hit.dtype != np.uint8 or cache_hit.shape != positives.shape[: rank - 3]:
        raise _error(
            f"malformed answer: cache_hit must be uint8 "
            f"{list(positives.shape[: rank - 3])}, got {cache_hit.dtype.name} "
            f"{list(cache_hit.shape)}",
            code="invalid_body",
        )
