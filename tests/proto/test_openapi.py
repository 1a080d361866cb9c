"""The OpenAPI document: checked in and current, valid OpenAPI 3.1, complete
(docs/design.md §6), and no more lenient than the decoder it documents."""

from __future__ import annotations

import binascii
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate as validate_openapi

from clsp_positives.proto import (
    JSON_MEDIA_TYPE,
    SAFETENSORS_MEDIA_TYPE,
    SUPPORTED_DTYPES,
    ErrorBody,
    GenerationParams,
    Health,
    ModelInfo,
    PositivesRequest,
    PositivesResponse,
    ProtocolError,
    ResponseArrays,
    decode_request,
    encode_request,
    encode_response,
    tensor_to_json,
)
from clsp_positives.proto import openapi as openapi_module
from clsp_positives.proto.codec import decode_base64
from clsp_positives.proto.messages import BASE64_PATTERN
from clsp_positives.proto.openapi import OPENAPI_PATH, build_openapi, render

DOC = build_openapi()
FAST = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def validator(name: str) -> Draft202012Validator:
    """A JSON Schema validator for one component, resolving the document's refs."""
    root = {"$ref": f"#/components/schemas/{name}", "components": DOC["components"]}
    return Draft202012Validator(root)


REQUEST = validator("PositivesRequest")
RESPONSE = validator("PositivesResponse")


# ------------------------------------------------------------- checked in


def test_checked_in_document_is_current() -> None:
    on_disk = json.loads(OPENAPI_PATH.read_text())
    assert build_openapi() == on_disk, (
        "proto/openapi.json is stale: run `python -m clsp_positives.proto.openapi --write`"
    )
    assert OPENAPI_PATH.read_text() == render(DOC)


def test_check_and_write_commands(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "openapi.json"
    monkeypatch.setattr(openapi_module, "OPENAPI_PATH", target)
    assert openapi_module.main(["--check"]) == 1  # missing
    target.write_text(render(DOC).replace("CLSP positives", "stale"))
    assert openapi_module.main(["--check"]) == 1
    assert openapi_module.main(["--write"]) == 0
    text = target.read_text()
    assert (
        text.endswith("}\n")
        and text == json.dumps(json.loads(text), sort_keys=True, indent=2) + "\n"
    )
    assert openapi_module.main(["--check"]) == 0


def test_check_reports_staleness_on_stderr(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "openapi.json"
    target.write_text("{}\n")
    monkeypatch.setattr(openapi_module, "OPENAPI_PATH", target)
    assert openapi_module.main(["--check"]) == 1
    err = capsys.readouterr().err
    assert "is stale" in err and "--write" in err


def test_check_command_passes_on_the_checked_in_file() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "clsp_positives.proto.openapi", "--check"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr


# ------------------------------------------------------------------ valid


def test_document_is_valid_openapi_31() -> None:
    assert DOC["openapi"].startswith("3.1")
    validate_openapi(DOC)


def test_component_schemas_are_the_models() -> None:
    schemas = DOC["components"]["schemas"]
    assert set(schemas) == {
        "PositivesRequest",
        "PositivesResponse",
        "Tensor",
        "GenerationParams",
        "ModelInfo",
        "Health",
        "ErrorBody",
    }
    assert schemas["GenerationParams"]["additionalProperties"] is False
    assert schemas["PositivesRequest"]["additionalProperties"] is False
    assert schemas["Tensor"]["properties"]["data"]["pattern"] == BASE64_PATTERN
    request = schemas["PositivesRequest"]["properties"]
    for name, dtypes in (
        ("anchors", ["uint8", "float16", "float32"]),
        ("anchor_latents", ["float16", "float32"]),
    ):
        tensor = request[name]  # sent or left out, never null: exactly one of the two
        assert "anyOf" not in tensor
        assert tensor["allOf"][0] == {"$ref": "#/components/schemas/Tensor"}
        assert tensor["allOf"][1]["properties"]["dtype"]["enum"] == dtypes
    # every $ref in the document points at a schema that exists
    refs = {ref for ref in _walk(DOC, "$ref")}
    assert refs == {f"#/components/schemas/{name}" for name in schemas}


def _walk(node: object, key: str):
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                yield v
            yield from _walk(v, key)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v, key)


# --------------------------------------------------------------- complete


@pytest.mark.parametrize("path", ["/v1/positives", "/positives"])
def test_positives_routes(path: str) -> None:
    assert set(DOC["paths"][path]) == {"post"}
    op = DOC["paths"][path]["post"]
    body = op["requestBody"]
    assert body["required"] is True
    assert body["content"][JSON_MEDIA_TYPE]["schema"] == {
        "$ref": "#/components/schemas/PositivesRequest"
    }
    binary = body["content"][SAFETENSORS_MEDIA_TYPE]["schema"]
    assert (binary["type"], binary["format"]) == ("string", "binary")
    ok = op["responses"]["200"]["content"]
    assert ok[JSON_MEDIA_TYPE]["schema"] == {"$ref": "#/components/schemas/PositivesResponse"}
    assert ok[SAFETENSORS_MEDIA_TYPE]["schema"]["format"] == "binary"
    for status in ("400", "401", "413", "415", "422", "429", "503"):
        response = op["responses"][status]
        assert response["content"][JSON_MEDIA_TYPE]["schema"] == {
            "$ref": "#/components/schemas/ErrorBody"
        }, status
        assert response["description"]
    for status in ("429", "503"):
        retry = op["responses"][status]["headers"]["Retry-After"]
        assert retry["schema"]["type"] == "integer" and retry["required"] is True
    assert "WWW-Authenticate" in op["responses"]["401"]["headers"]
    assert {} in op["security"] and {"bearerAuth": []} in op["security"]
    assert "500" not in op["responses"]


def test_operation_ids_are_unique() -> None:
    ids = [op["operationId"] for item in DOC["paths"].values() for op in item.values()]
    assert len(ids) == len(set(ids))


def test_other_routes() -> None:
    paths = DOC["paths"]
    assert set(paths) == {
        "/v1/positives",
        "/positives",
        "/v1/model",
        "/healthz",
        "/readyz",
        "/metrics",
    }
    model = paths["/v1/model"]["get"]["responses"]
    assert model["200"]["content"][JSON_MEDIA_TYPE]["schema"]["$ref"].endswith("/ModelInfo")
    readyz = paths["/readyz"]["get"]["responses"]
    assert set(readyz) == {"200", "503"}
    assert readyz["503"]["content"][JSON_MEDIA_TYPE]["schema"]["$ref"].endswith("/ErrorBody")
    assert "Retry-After" in readyz["503"]["headers"]
    assert set(paths["/healthz"]["get"]["responses"]) == {"200"}
    metrics = paths["/metrics"]["get"]["responses"]["200"]["content"]
    assert metrics == {"text/plain": {"schema": {"type": "string"}}}
    # the health checks never ask for a token; the rest accept one
    for route in ("/healthz", "/readyz"):
        assert "security" not in paths[route]["get"]
    for route in ("/v1/model", "/metrics"):
        assert paths[route]["get"]["security"] == [{}, {"bearerAuth": []}]
        assert "401" in paths[route]["get"]["responses"]
    scheme = DOC["components"]["securitySchemes"]["bearerAuth"]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")
    assert "security" not in DOC  # no global requirement: auth is per route and optional


# ---------------------------------------------------- schema versus decoder


def test_what_the_encoder_writes_fits_the_schemas() -> None:
    anchors = np.zeros((2, 4, 4, 1), np.uint8)
    body, _ = encode_request(anchors, np.array([1, 2]), {"steps": 5}, encoding=JSON_MEDIA_TYPE)
    REQUEST.validate(json.loads(body))
    body, _ = encode_request(anchors, None, {"k": 3}, encoding=JSON_MEDIA_TYPE)
    REQUEST.validate(json.loads(body))
    answer = ResponseArrays(
        np.zeros((2, 3, 4, 4, 1), np.uint8), np.ones((2, 3), np.uint8), "fp", GenerationParams(k=3)
    )
    RESPONSE.validate(json.loads(encode_response(answer, encoding=JSON_MEDIA_TYPE)[0]))
    validator("ErrorBody").validate(ErrorBody(error="x", detail="y").model_dump())
    validator("Health").validate(Health(status="ok").model_dump())
    validator("Health").validate({"status": "ready", "model": "sha256:abc"})
    info = ModelInfo(
        fingerprint="f",
        sample_size=16,
        channels=1,
        scheduler={"a": 1},
        device="cpu",
        dtype="float32",
        max_k=64,
        max_anchors=1024,
        sampling="authors",
    )
    validator("ModelInfo").validate(info.model_dump(mode="json"))


VALID_REQUEST = {
    "anchors": tensor_to_json(np.zeros((1, 2, 2, 1), np.uint8)).model_dump(),
    "candidates": tensor_to_json(np.array([3], np.int64)).model_dump(),
    "params": {
        "steps": 5,
        "eta": 0.0,
        "method": "ddpm",
        "k": None,
        "cache": "bypass",
        "interpolation_weight": 1,
    },
}


@pytest.mark.parametrize(
    "change",
    [
        {"extra": 1},
        {"params": None},
        {"params": '{"steps": 5}'},
        {"params": {"seed": 1}},
        {"params": {"steps": 0}},
        {"params": {"steps": True}},
        {"params": {"steps": "5"}},
        {"params": {"eta": 1.5}},
        {"params": {"method": "euler"}},
        {"params": {"k": 0}},
        {"anchors": None},
        {"anchors": {"dtype": "int8", "shape": [1], "data": "AA=="}},
        {"anchors": {"dtype": "uint8", "shape": [-1], "data": ""}},
        {"anchors": {"dtype": "uint8", "shape": [1] * 9, "data": "AA=="}},
        {"anchors": {"dtype": "uint8", "shape": [1], "data": "AA"}},
        {"anchors": {"dtype": "uint8", "shape": [1], "data": "AA==", "order": "C"}},
        {"anchors": {"dtype": "uint8", "shape": [1]}},
        {"candidates": []},
        {"anchors": tensor_to_json(np.zeros((1, 1, 2, 2), np.float64)).model_dump()},
        {"anchors": tensor_to_json(np.zeros((1, 2, 2), np.uint8)).model_dump()},
        {"anchors": tensor_to_json(np.zeros((1, 0, 2, 1), np.uint8)).model_dump()},
        {"candidates": tensor_to_json(np.array([3], np.int32)).model_dump()},
        {"candidates": tensor_to_json(np.array([[3]], np.int64)).model_dump()},
    ],
)
def test_schema_and_decoder_refuse_the_same_structure(change: dict) -> None:
    body = {**VALID_REQUEST, **change}
    assert not REQUEST.is_valid(body), change
    with pytest.raises(ProtocolError):
        decode_request(json.dumps(body).encode(), JSON_MEDIA_TYPE)


def test_valid_request_passes_both() -> None:
    REQUEST.validate(VALID_REQUEST)
    assert decode_request(json.dumps(VALID_REQUEST).encode(), JSON_MEDIA_TYPE).num_anchors == 1


json_leaf = (
    st.none()
    | st.booleans()
    | st.integers(-3, 10)
    | st.floats(-2, 2)
    | st.sampled_from(["", "AA==", "uint8", "int64", "float32", "ddim", "use", "x"])
)
json_any = st.recursive(
    json_leaf,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(
            st.sampled_from(["dtype", "shape", "data", "steps", "k", "x"]), inner, max_size=3
        )
    ),
    max_leaves=6,
)


@st.composite
def wire_tensors(draw: st.DrawFn) -> dict:
    """A well-formed JSON tensor of any supported dtype and a small shape."""
    dtype = draw(st.sampled_from(SUPPORTED_DTYPES))
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=5, min_side=0, max_side=2))
    values = draw(hnp.arrays(dtype, shape, elements=st.integers(0, 1)))
    return tensor_to_json(values).model_dump()


@st.composite
def mutated_bodies(draw: st.DrawFn) -> dict:
    """The valid request with a field or a nested field replaced, added or dropped."""
    body = json.loads(json.dumps(VALID_REQUEST))
    for _ in range(draw(st.integers(1, 3))):
        outer = draw(st.sampled_from(["anchors", "candidates", "params", "x"]))
        if outer in ("anchors", "candidates") and draw(st.booleans()):
            body[outer] = draw(wire_tensors())
        elif outer not in body or not isinstance(body[outer], dict) or draw(st.booleans()):
            if draw(st.booleans()):
                body.pop(outer, None)
            else:
                body[outer] = draw(json_any)
        else:
            inner = draw(st.sampled_from([*body[outer], "x"]))
            if draw(st.booleans()):
                body[outer].pop(inner, None)
            else:
                body[outer][inner] = draw(json_any)
    return body


@FAST
@given(body=mutated_bodies())
def test_decoder_is_never_more_lenient_than_the_schema(body: dict) -> None:
    """Whatever decode_request accepts, the schema accepts: a client that trusts
    the document is never surprised, and a fuzzer's invalid bodies are refused."""
    try:
        decode_request(json.dumps(body).encode(), JSON_MEDIA_TYPE)
    except ProtocolError:
        return
    assert REQUEST.is_valid(body), body


def _b64_accepted(text: str) -> bool:
    try:
        decode_base64(text)
    except (binascii.Error, ValueError):
        return False
    return True


@FAST
@given(text=st.text(alphabet="AQw+/=!é\n", max_size=10))
@example(text="AAAA=")  # excess padding: b64decode(validate=True) alone takes it
@example(text="AA=A")
def test_base64_pattern_is_what_the_decoder_accepts(text: str) -> None:
    assert bool(re.fullmatch(BASE64_PATTERN, text)) == _b64_accepted(text), text


def test_schemas_come_from_the_models() -> None:
    schemas = DOC["components"]["schemas"]
    for model in (PositivesRequest, PositivesResponse, ModelInfo, Health, ErrorBody):
        assert schemas[model.__name__]["title"] == model.__name__
        assert set(schemas[model.__name__]["properties"]) == set(model.model_fields)
