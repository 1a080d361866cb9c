"""The OpenAPI 3.1 document of the HTTP API (docs/design.md §6).

Written by hand around the pydantic schemas rather than taken from FastAPI's
route introspection, because the positives route reads its body itself (two
media types, one of them binary) and FastAPI cannot see that. The service
serves exactly this document at ``/openapi.json`` and the contract tests fuzz
the service against it, so it is checked in (``proto/openapi.json``) and a
test fails when the file no longer matches the models:

    python -m clsp_positives.proto.openapi --write   # regenerate
    python -m clsp_positives.proto.openapi --check   # exit 1 when stale
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from pydantic.json_schema import models_json_schema

from clsp_positives.proto.auth import TOKEN_ENV
from clsp_positives.proto.messages import (
    JSON_MEDIA_TYPE,
    SAFETENSORS_MEDIA_TYPE,
    ErrorBody,
    Health,
    ModelInfo,
    PositivesRequest,
    PositivesResponse,
)

OPENAPI_PATH = Path(__file__).with_name("openapi.json")
API_VERSION = "1.0.0"
REF = "#/components/schemas/{model}"
BEARER = "bearerAuth"
METRICS_MEDIA_TYPE = "text/plain"

_SAFETENSORS_REQUEST = (
    "A safetensors blob. Tensors: `anchors`, uint8 [N, H, W, C] pixels or float32/float16 "
    "[N, C, H, W] in [-1, 1]; optional `candidates`, int64 [N]. Metadata key `params`: the "
    "GenerationParams object as a JSON string. No other tensors or metadata keys."
)
_SAFETENSORS_RESPONSE = (
    "A safetensors blob. Tensors: `positives`, uint8 [N, H, W, C] ([N, k, H, W, C] with k), "
    "and `cache_hit`, uint8 [N] ([N, k]). Metadata: `model` (the fingerprint) and `params` "
    "(the GenerationParams as applied, a JSON string)."
)
_ERRORS = {
    "400": "The body is malformed: not safetensors or not JSON, a tensor of the wrong dtype, "
    "rank or shape, a byte length that does not match the shape, NaN/Inf or values "
    "outside [-1, 1], bad base64, unknown tensors.",
    "401": "A bearer token is required (the service was started with one) and was missing "
    "or wrong.",
    "409": "params.expect_model names another model than this generator serves "
    "(`model_mismatch`; the detail names both fingerprints).",
    "413": "Too large: the body, the safetensors header, the number of anchors, or the "
    "compute one request asks for.",
    "415": "Content-Type is neither application/x-safetensors nor application/json.",
    "422": "Unknown or out-of-range params, or params.k together with a candidates tensor.",
    "429": "The generation queue is full; retry after the number of seconds in Retry-After.",
    "503": "Not available: the service is starting or shutting down; retry after the number "
    "of seconds in Retry-After.",
}
_RETRY_AFTER = {
    "Retry-After": {
        "description": "Seconds to wait before retrying.",
        "required": True,
        "schema": {"type": "integer", "minimum": 0},
    }
}
_WWW_AUTHENTICATE = {
    "WWW-Authenticate": {
        "description": "The scheme to authenticate with.",
        "required": True,
        "schema": {"type": "string"},
    }
}


def _schema_ref(name: str) -> dict[str, str]:
    return {"$ref": REF.format(model=name)}


def _error_response(status: str, description: str | None = None) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": description or _ERRORS[status],
        "content": {JSON_MEDIA_TYPE: {"schema": _schema_ref("ErrorBody")}},
    }
    if status in ("429", "503"):
        response["headers"] = _RETRY_AFTER
    elif status == "401":
        response["headers"] = _WWW_AUTHENTICATE
    return response


def _binary(description: str) -> dict[str, Any]:
    return {
        "schema": {
            "type": "string",
            "format": "binary",
            "contentMediaType": SAFETENSORS_MEDIA_TYPE,
            "description": description,
        }
    }


def _positives_operation(operation_id: str, summary: str) -> dict[str, Any]:
    return {
        "operationId": operation_id,
        "summary": summary,
        "description": (
            "One positive per (anchor, candidate). The answer's encoding follows Accept "
            "(default: the request's encoding). The same anchor, candidate, params and model "
            "always give the same positive, cached or not."
        ),
        "tags": ["positives"],
        "requestBody": {
            "required": True,
            "content": {
                SAFETENSORS_MEDIA_TYPE: _binary(_SAFETENSORS_REQUEST),
                JSON_MEDIA_TYPE: {"schema": _schema_ref("PositivesRequest")},
            },
            "description": "Anchors and params, as a safetensors blob or as JSON "
            "(PositivesRequest: each tensor as dtype, shape and base64 data).",
        },
        "responses": {
            "200": {
                "description": "The positives, in the encoding Accept asks for.",
                "content": {
                    SAFETENSORS_MEDIA_TYPE: _binary(_SAFETENSORS_RESPONSE),
                    JSON_MEDIA_TYPE: {"schema": _schema_ref("PositivesResponse")},
                },
            },
            **{status: _error_response(status) for status in sorted(_ERRORS)},
        },
    }


def _get(operation_id: str, summary: str, responses: dict[str, Any], *, tag: str) -> dict[str, Any]:
    return {
        "get": {
            "operationId": operation_id,
            "summary": summary,
            "tags": [tag],
            "responses": responses,
        }
    }


def _json_response(description: str, schema: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {JSON_MEDIA_TYPE: {"schema": _schema_ref(schema)}},
    }


def component_schemas() -> dict[str, Any]:
    """The pydantic models' JSON schemas, named as the document references them."""
    _, defs = models_json_schema(
        [
            (PositivesRequest, "validation"),
            (PositivesResponse, "serialization"),
            (ModelInfo, "serialization"),
            (Health, "serialization"),
            (ErrorBody, "serialization"),
        ],
        ref_template=REF,
    )
    return defs["$defs"]


def build_openapi() -> dict[str, Any]:
    """The whole document, as plain JSON data (what ``openapi.json`` holds)."""
    # Protected routes accept either no credentials (a service started without a
    # token) or the bearer token: the empty requirement makes auth optional.
    optional_auth: list[dict[str, list[str]]] = [{}, {BEARER: []}]
    unauthorized = {"401": _error_response("401")}
    positives = _positives_operation("positives", "Synthetic positives for anchors")
    alias = _positives_operation(
        "positives_unversioned", "Synthetic positives (alias of /v1/positives)"
    )
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "CLSP positives",
            "version": API_VERSION,
            "description": "Synthetic positives for contrastive self-supervised learning, "
            "generated on demand by a diffusion model and cached.",
        },
        "paths": {
            "/v1/positives": {"post": {**positives, "security": optional_auth}},
            "/positives": {"post": {**alias, "security": optional_auth}},
            "/v1/model": _get(
                "model_info",
                "The loaded model",
                {
                    "200": _json_response("Fingerprint, shape, scheduler and limits.", "ModelInfo"),
                    **unauthorized,
                },
                tag="service",
            ),
            "/healthz": _get(
                "healthz",
                "Alive",
                {
                    "200": _json_response("The process answers.", "Health"),
                },
                tag="health",
            ),
            "/readyz": _get(
                "readyz",
                "Ready to generate",
                {
                    "200": _json_response("The model is loaded and warmed up.", "Health"),
                    "503": _error_response(
                        "503", "Not ready yet: loading or warming up the model, or shutting down."
                    ),
                },
                tag="health",
            ),
            "/metrics": _get(
                "metrics",
                "Prometheus metrics",
                {
                    "200": {
                        "description": "Prometheus text exposition format.",
                        "content": {METRICS_MEDIA_TYPE: {"schema": {"type": "string"}}},
                    },
                    **unauthorized,
                },
                tag="service",
            ),
        },
        "components": {
            "schemas": component_schemas(),
            "securitySchemes": {
                BEARER: {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "Required only when the service was started with a token "
                    f"({TOKEN_ENV}); the health checks never need it.",
                }
            },
        },
    }
    for route in ("/v1/model", "/metrics"):
        doc["paths"][route]["get"]["security"] = optional_auth
    # A JSON round trip makes the result equal to what json.load gives back.
    return json.loads(json.dumps(doc))


def render(doc: dict[str, Any]) -> str:
    """The checked-in text: sorted keys, two-space indent, trailing newline."""
    return json.dumps(doc, sort_keys=True, indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m clsp_positives.proto.openapi",
        description="Write or check the checked-in OpenAPI document.",
    )
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--write", action="store_true", help=f"rewrite {OPENAPI_PATH.name}")
    group.add_argument(
        "--check",
        action="store_true",
        help=f"exit 1 when {OPENAPI_PATH.name} differs from the models",
    )
    args = parser.parse_args(argv)
    text = render(build_openapi())
    if args.write:
        OPENAPI_PATH.write_text(text)
        print(f"wrote {OPENAPI_PATH}")
        return 0
    current = OPENAPI_PATH.read_text() if OPENAPI_PATH.exists() else ""
    if current != text:
        print(
            f"{OPENAPI_PATH} is stale: run `python -m clsp_positives.proto.openapi --write` "
            "and commit the result",
            file=sys.stderr,
        )
        return 1
    print(f"{OPENAPI_PATH} is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
