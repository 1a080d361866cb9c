"""The tensor codec: bit-exact round trips in both encodings, compatibility with
the official safetensors reader and writer, and strict refusal of bad input
(only ever as a ProtocolError that names the problem)."""

from __future__ import annotations

import base64
import json
import struct
import typing

import numpy as np
import pytest
import safetensors.numpy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from clsp_positives.proto import (
    DEFAULT_MAX_HEADER_BYTES,
    JSON_MEDIA_TYPE,
    SAFETENSORS_MEDIA_TYPE,
    SUPPORTED_DTYPES,
    GenerationParams,
    ModelShapes,
    ProtocolError,
    ResponseArrays,
    decode_request,
    decode_response,
    decode_safetensors,
    encode_request,
    encode_response,
    encode_safetensors,
    media_type,
    tensor_from_json,
    tensor_to_json,
)
from clsp_positives.proto.params import Method

ENCODINGS = [SAFETENSORS_MEDIA_TYPE, JSON_MEDIA_TYPE]
FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ------------------------------------------------------------------ helpers

shapes = hnp.array_shapes(min_dims=0, max_dims=5, min_side=0, max_side=4)


@st.composite
def any_array(draw: st.DrawFn) -> np.ndarray:
    """Any supported dtype and shape, every bit pattern (NaN payloads included)."""
    dtype = np.dtype(draw(st.sampled_from(SUPPORTED_DTYPES)))
    return draw(hnp.arrays(dtype, draw(shapes)))


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def anchors_u8(n: int = 2, h: int = 4, w: int = 4, c: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, c), dtype=np.uint8)


def st_blob(
    tensors: dict[str, dict],
    data: bytes = b"",
    metadata: dict | None = None,
    header_len: int | None = None,
) -> bytes:
    """A safetensors blob written by hand, so that it can be wrong on purpose."""
    header = dict(tensors)
    if metadata is not None:
        header["__metadata__"] = metadata
    raw = json.dumps(header).encode()
    n = len(raw) if header_len is None else header_len
    return struct.pack("<Q", n) + raw + data


def raw_blob(header: bytes, data: bytes = b"") -> bytes:
    return struct.pack("<Q", len(header)) + header + data


def json_body(**fields: object) -> bytes:
    return json.dumps(fields).encode()


def tensor_json(arr: np.ndarray) -> dict:
    return tensor_to_json(arr).model_dump()


def expect_error(
    fn, *args, status: int, words: tuple[str, ...], code: str | None = None, **kwargs
) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        fn(*args, **kwargs)
    err = info.value
    assert err.status == status, err
    for word in words:
        assert word.lower() in err.detail.lower(), (word, err.detail)
    if code is not None:
        assert err.code == code, err
    return err


# ----------------------------------------------------------- round trips


@PROPERTY
@given(
    tensors=st.dictionaries(st.text("abcxyz_", min_size=1, max_size=6), any_array(), max_size=4),
    meta=st.dictionaries(st.text(max_size=8), st.text(max_size=20), max_size=3),
)
def test_safetensors_round_trip_is_bit_exact(tensors: dict, meta: dict) -> None:
    blob = encode_safetensors(tensors, meta)
    back, back_meta = decode_safetensors(blob)
    assert set(back) == set(tensors)
    for name, arr in tensors.items():
        assert same_bits(back[name], arr), name
    assert back_meta == meta


@PROPERTY
@given(
    tensors=st.dictionaries(
        st.sampled_from(["a", "b", "anchors"]), any_array(), min_size=1, max_size=3
    )
)
def test_safetensors_interoperates_with_the_official_library(tensors: dict) -> None:
    ours = encode_safetensors(tensors, {"params": "{}"})
    official = safetensors.numpy.load(ours)
    for name, arr in tensors.items():
        assert same_bits(np.asarray(official[name]), arr), name

    theirs = safetensors.numpy.save(tensors, metadata={"k": "v"})
    back, meta = decode_safetensors(theirs)
    assert meta == {"k": "v"}
    for name, arr in tensors.items():
        assert same_bits(back[name], arr), name


@PROPERTY
@given(arr=any_array())
def test_json_tensor_round_trip_is_bit_exact(arr: np.ndarray) -> None:
    wire = json.loads(json.dumps(tensor_json(arr)))
    assert wire["dtype"] == arr.dtype.name and wire["shape"] == list(arr.shape)
    assert same_bits(tensor_from_json("t", wire), arr)


def test_big_endian_input_is_written_little_endian() -> None:
    arr = np.arange(6, dtype=">f4").reshape(2, 3)
    back, _ = decode_safetensors(encode_safetensors({"x": arr}))
    assert back["x"].dtype == np.dtype("<f4")
    np.testing.assert_array_equal(back["x"], arr)
    assert base64.b64decode(tensor_to_json(arr).data) == arr.astype("<f4").tobytes()


@st.composite
def requests(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray | None, GenerationParams]:
    n = draw(st.integers(1, 3))
    c, h, w = draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(1, 4))
    kind = draw(st.sampled_from(["uint8", "float16", "float32"]))
    if kind == "uint8":
        anchors = draw(hnp.arrays(np.uint8, (n, h, w, c)))
    else:
        unit = st.floats(-1, 1, width=16 if kind == "float16" else 32)
        anchors = draw(hnp.arrays(np.dtype(kind), (n, c, h, w), elements=unit))
    params = GenerationParams(
        interpolation_weight=draw(st.floats(0, 1)),
        steps=draw(st.integers(1, 1000)),
        eta=draw(st.floats(0, 1)),
        method=draw(st.sampled_from(typing.get_args(Method))),
        cache=draw(st.sampled_from(["use", "refresh", "bypass"])),
        k=draw(st.none() | st.integers(1, 8)),
    )
    candidates = None
    if params.k is None and draw(st.booleans()):
        candidates = draw(hnp.arrays(np.int64, (n,), elements=st.integers(0, 63)))
    return anchors, candidates, params


@PROPERTY
@given(req=requests(), encoding=st.sampled_from(ENCODINGS))
def test_request_round_trip(req: tuple, encoding: str) -> None:
    anchors, candidates, params = req
    body, ctype = encode_request(anchors, candidates, params, encoding=encoding)
    assert ctype == encoding
    got = decode_request(body, ctype + "; charset=utf-8")
    assert same_bits(got.anchors, anchors)
    assert got.params == params
    n = anchors.shape[0]
    if params.k is not None:
        np.testing.assert_array_equal(got.candidates, np.tile(np.arange(params.k), n))
        np.testing.assert_array_equal(got.anchor_index, np.repeat(np.arange(n), params.k))
    elif candidates is not None:
        assert same_bits(got.candidates, candidates)
        np.testing.assert_array_equal(got.anchor_index, np.arange(n))
    else:
        np.testing.assert_array_equal(got.candidates, np.zeros(n, np.int64))
    assert got.candidates.dtype == np.int64 and got.num_anchors == n


@PROPERTY
@given(
    n=st.integers(1, 3),
    k=st.none() | st.integers(1, 3),
    data=st.data(),
    encoding=st.sampled_from(ENCODINGS),
)
def test_response_round_trip(n: int, k: int | None, data: st.DataObject, encoding: str) -> None:
    lead = (n,) if k is None else (n, k)
    positives = data.draw(hnp.arrays(np.uint8, (*lead, 4, 4, 3)))
    cache_hit = data.draw(hnp.arrays(np.uint8, lead, elements=st.integers(0, 1)))
    params = GenerationParams(k=k, steps=7)
    body, ctype = encode_response(
        ResponseArrays(positives, cache_hit, "fp-1", params), encoding=encoding
    )
    got = decode_response(body, ctype)
    assert same_bits(got.positives, positives) and same_bits(got.cache_hit, cache_hit)
    assert got.model == "fp-1" and got.params == params


def test_response_accepts_k_above_the_default_limit() -> None:
    params = GenerationParams.model_validate({"k": 100}, context={"max_k": 100})
    result = ResponseArrays(
        np.zeros((1, 100, 2, 2, 1), np.uint8), np.zeros((1, 100), np.uint8), "fp", params
    )
    for encoding in ENCODINGS:
        assert decode_response(*encode_response(result, encoding=encoding)).params.k == 100


def test_media_type_strips_parameters_and_case() -> None:
    assert media_type("Application/JSON; charset=utf-8") == JSON_MEDIA_TYPE
    assert media_type(None) == ""


def test_limits_are_applied_from_the_arguments() -> None:
    body, ctype = encode_request(anchors_u8(n=3, h=8, w=8, c=1))
    assert decode_request(body, ctype, model=ModelShapes((1, 8, 8)), max_anchors=3).num_anchors == 3
    body, ctype = encode_request(anchors_u8(n=1), np.array([9]))
    assert decode_request(body, ctype, max_k=10).candidates.tolist() == [9]
    expect_error(decode_request, body, ctype, max_k=9, status=400, words=("[0, 8]",))


# ------------------------------------------------------- malformed input

GOOD_ANCHORS = anchors_u8()
GOOD_ST, _ = encode_request(GOOD_ANCHORS)
_ENTRY = {"dtype": "U8", "shape": [1, 2, 2, 1], "data_offsets": [0, 4]}


def _st_request(**tensors: np.ndarray) -> bytes:
    return encode_safetensors(tensors, {"params": "{}"})


MALFORMED_SAFETENSORS = {
    "empty": (b"", 400, ("too short",)),
    "seven bytes": (b"\x01" * 7, 400, ("too short",)),
    "truncated data": (GOOD_ST[:-5], 400, ("truncated",)),
    "truncated header": (GOOD_ST[:20], 400, ("truncated",)),
    "garbage": (raw_blob(b"\xff\xfe garbage \x00\x01\x02"), 400, ("not safetensors",)),
    "header not an object": (struct.pack("<Q", 2) + b"[]", 400, ("not a json object",)),
    "oversized header": (
        struct.pack("<Q", DEFAULT_MAX_HEADER_BYTES + 1) + b"{}",
        413,
        ("header", "limit"),
    ),
    "huge header length": (b"\xff" * 8 + b"{}", 413, ("header", "limit")),
    "bad dtype tag": (
        st_blob({"anchors": {**_ENTRY, "dtype": "BF16"}}, b"\0" * 4),
        400,
        ("dtype", "bf16", "not supported"),
    ),
    "wrong dtype for anchors": (
        _st_request(anchors=np.zeros((1, 2, 2, 1), np.float64)),
        400,
        ("float64", "uint8"),
    ),
    "shape and bytes disagree": (
        st_blob({"anchors": {**_ENTRY, "shape": [1, 2, 2, 2]}}, b"\0" * 4),
        400,
        ("needs 8 bytes", "span 4"),
    ),
    "offsets outside data": (
        st_blob({"anchors": {**_ENTRY, "data_offsets": [0, 4]}}, b"\0"),
        400,
        ("outside",),
    ),
    "bytes after the last tensor": (
        st_blob({"anchors": _ENTRY}, b"\0" * 6),
        400,
        ("after the last tensor",),
    ),
    "gap between tensors": (
        st_blob({"anchors": {**_ENTRY, "data_offsets": [2, 6]}}, b"\0" * 6),
        400,
        ("gap",),
    ),
    "negative dimension": (
        st_blob({"anchors": {**_ENTRY, "shape": [1, -2, 2, 1]}}, b"\0" * 4),
        400,
        ("shape", "non-negative"),
    ),
    "rank above the limit": (
        st_blob({"anchors": {**_ENTRY, "shape": [1] * 9}}, b"\0"),
        400,
        ("rank 9", "limit"),
    ),
    "absurd empty shape": (
        st_blob({"anchors": {**_ENTRY, "shape": [0] + [2**31 - 1] * 7, "data_offsets": [0, 0]}}),
        400,
        ("describes more than",),
    ),
    "entry with extra key": (
        st_blob({"anchors": {**_ENTRY, "x": 1}}, b"\0" * 4),
        400,
        ("exactly dtype, shape and data_offsets",),
    ),
    "metadata not strings": (
        st_blob({"anchors": _ENTRY}, b"\0" * 4, {"params": 3}),
        400,
        ("__metadata__",),
    ),
    "huge integer in header": (
        raw_blob(
            b'{"anchors": {"dtype": "U8", "shape": ['
            + b"9" * 5000
            + b'], "data_offsets": [0, 4]}}',
            b"\0" * 4,
        ),
        400,
        ("not safetensors",),
    ),
    "deeply nested header": (
        struct.pack("<Q", 40000) + b"[" * 20000 + b"]" * 20000,
        400,
        ("not safetensors",),
    ),
    "NaN literal in header": (
        st_blob({"anchors": {**_ENTRY, "shape": [float("nan")]}}, b"\0" * 4),
        400,
        ("not safetensors",),
    ),
    "unknown tensor": (
        _st_request(anchors=GOOD_ANCHORS, extra=np.zeros(2, np.uint8)),
        400,
        ("unknown tensors", "extra"),
    ),
    "no anchors": (_st_request(candidates=np.zeros(2, np.int64)), 400, ("neither 'anchors'",)),
    "rank 3 anchors": (_st_request(anchors=GOOD_ANCHORS[0]), 400, ("rank 4", "[4, 4, 3]")),
    "zero anchors": (_st_request(anchors=GOOD_ANCHORS[:0]), 400, ("empty", "at least one")),
    "empty image": (
        _st_request(anchors=np.zeros((1, 0, 4, 3), np.uint8)),
        400,
        ("empty dimension",),
    ),
    "NaN anchors": (_st_request(anchors=np.full((1, 3, 4, 4), np.nan, np.float32)), 400, ("nan",)),
    "Inf anchors": (_st_request(anchors=np.full((1, 3, 4, 4), np.inf, np.float16)), 400, ("inf",)),
    "float anchors out of range": (
        _st_request(anchors=np.full((1, 3, 4, 4), 2, np.float32)),
        400,
        ("[-1, 1]", "127.5"),
    ),
    "int32 candidates": (
        _st_request(anchors=GOOD_ANCHORS, candidates=np.zeros(2, np.int32)),
        400,
        ("candidates", "int64", "int32"),
    ),
    "candidates of wrong length": (
        _st_request(anchors=GOOD_ANCHORS, candidates=np.zeros(3, np.int64)),
        400,
        ("candidates", "shape [2]"),
    ),
    "negative candidate": (
        _st_request(anchors=GOOD_ANCHORS, candidates=np.array([0, -1], np.int64)),
        400,
        ("candidate indices", "[0, 63]"),
    ),
    "unknown metadata": (
        encode_safetensors({"anchors": GOOD_ANCHORS}, {"prams": "{}"}),
        422,
        ("unknown metadata", "prams"),
    ),
    "params not JSON": (
        encode_safetensors({"anchors": GOOD_ANCHORS}, {"params": "{steps"}),
        422,
        ("params is not valid json",),
    ),
    "params with a huge integer": (
        encode_safetensors({"anchors": GOOD_ANCHORS}, {"params": '{"steps": ' + "9" * 5000 + "}"}),
        422,
        ("params",),
    ),
    "params not an object": (
        encode_safetensors({"anchors": GOOD_ANCHORS}, {"params": "[1]"}),
        422,
        ("params must be a json object",),
    ),
    "unknown params field": (
        encode_safetensors({"anchors": GOOD_ANCHORS}, {"params": '{"stepz": 5}'}),
        422,
        ("stepz", "unknown field", "allowed fields", "interpolation_weight"),
    ),
    "out-of-range params": (
        encode_safetensors({"anchors": GOOD_ANCHORS}, {"params": '{"steps": 0}'}),
        422,
        ("steps", "greater than or equal to 1"),
    ),
    "k with candidates": (
        encode_safetensors(
            {"anchors": GOOD_ANCHORS, "candidates": np.zeros(2, np.int64)}, {"params": '{"k": 2}'}
        ),
        422,
        ("params.k", "candidates", "not both"),
    ),
    "k above the limit": (
        encode_safetensors({"anchors": GOOD_ANCHORS}, {"params": '{"k": 65}'}),
        422,
        ("k=65", "64"),
    ),
}


@pytest.mark.parametrize("case", sorted(MALFORMED_SAFETENSORS))
def test_malformed_safetensors_request(case: str) -> None:
    body, status, words = MALFORMED_SAFETENSORS[case]
    expect_error(decode_request, body, SAFETENSORS_MEDIA_TYPE, status=status, words=words)


def test_header_cap_is_configurable() -> None:
    expect_error(
        decode_request,
        GOOD_ST,
        SAFETENSORS_MEDIA_TYPE,
        max_header_bytes=16,
        status=413,
        words=("limit is 16",),
        code="header_too_large",
    )


def test_too_many_anchors_and_wrong_model_shape() -> None:
    body, ctype = encode_request(anchors_u8(n=5, h=8, w=8, c=1))
    expect_error(
        decode_request,
        body,
        ctype,
        max_anchors=4,
        status=413,
        words=("5 anchors", "limit is 4", "split"),
        code="too_many_anchors",
    )
    expect_error(
        decode_request,
        body,
        ctype,
        model=ModelShapes((3, 8, 8)),
        status=400,
        words=("1 channels of 8x8", "3 channels of 8x8", "[N, 8, 8, 3] uint8"),
        code="wrong_shape",
    )
    body, ctype = encode_request(np.zeros((1, 1, 8, 6), np.float32))
    expect_error(
        decode_request,
        body,
        ctype,
        model=ModelShapes((1, 8, 8)),
        status=400,
        words=("1 channels of 8x6", "[N, 1, 8, 8] float"),
        code="wrong_shape",
    )


def _good_json(**overrides: object) -> bytes:
    fields: dict = {"anchors": tensor_json(GOOD_ANCHORS), "params": {"steps": 5}}
    fields.update(overrides)
    return json.dumps({k: v for k, v in fields.items() if v is not ...}).encode()


MALFORMED_JSON = {
    "not JSON": (b"{anchors", 400, ("not valid json",)),
    "not UTF-8": (b'{"a": "\xff\xfe"}', 400, ("not valid json",)),
    "NaN literal": (b'{"anchors": NaN}', 400, ("not valid json", "nan")),
    "huge integer": (b'{"x": ' + b"9" * 5000 + b"}", 400, ("not valid json",)),
    "deep nesting": (b"[" * 100000 + b"]" * 100000, 400, ("not valid json",)),
    "not an object": (b"[1, 2]", 400, ("json object",)),
    "unknown field": (_good_json(extra=1), 400, ("unknown fields", "extra")),
    "missing anchors": (_good_json(anchors=...), 400, ("neither 'anchors'",)),
    "bad base64": (
        _good_json(anchors={**tensor_json(GOOD_ANCHORS), "data": "!!!!"}),
        400,
        ("base64",),
    ),
    "base64 without padding": (
        _good_json(anchors={"dtype": "uint8", "shape": [1], "data": "QQ"}),
        400,
        ("base64",),
    ),
    "unknown dtype name": (
        _good_json(anchors={**tensor_json(GOOD_ANCHORS), "dtype": "int8"}),
        400,
        ("anchors", "dtype"),
    ),
    "shape and bytes disagree": (
        _good_json(anchors={**tensor_json(GOOD_ANCHORS), "shape": [2, 4, 4, 4]}),
        400,
        ("needs 128 bytes", "decodes to 96"),
    ),
    "negative dimension": (
        _good_json(anchors={**tensor_json(GOOD_ANCHORS), "shape": [2, -4, 4, 3]}),
        400,
        ("shape", "greater than or equal to 0"),
    ),
    "rank above the limit": (
        _good_json(anchors={"dtype": "uint8", "shape": [1] * 9, "data": "AA=="}),
        400,
        ("shape", "at most 8"),
    ),
    "shape as a string": (
        _good_json(anchors={**tensor_json(GOOD_ANCHORS), "shape": "2,4"}),
        400,
        ("shape",),
    ),
    "boolean dimension": (
        _good_json(anchors={"dtype": "uint8", "shape": [True], "data": "AA=="}),
        400,
        ("shape",),
    ),
    "extra tensor field": (
        _good_json(anchors={**tensor_json(GOOD_ANCHORS), "order": "C"}),
        400,
        ("order", "unknown field"),
    ),
    "wrong dtype for anchors": (
        _good_json(anchors=tensor_json(np.zeros((1, 1, 2, 2), np.int32))),
        400,
        ("int32", "not accepted"),
    ),
    "wrong rank": (_good_json(anchors=tensor_json(GOOD_ANCHORS[0])), 400, ("rank 4",)),
    "zero anchors": (_good_json(anchors=tensor_json(GOOD_ANCHORS[:0])), 400, ("at least one",)),
    "NaN anchors": (
        _good_json(anchors=tensor_json(np.full((1, 1, 2, 2), np.nan, np.float32))),
        400,
        ("nan",),
    ),
    "params null": (_good_json(params=None), 422, ("params must be a json object",)),
    "params as a string": (
        _good_json(params='{"steps": 5}'),
        422,
        ("params must be a json object",),
    ),
    "unknown params field": (
        _good_json(params={"steps": 5, "seed": 1}),
        422,
        ("seed", "unknown field", "allowed fields are anchor_refresh, cache, deadline_ms, eta"),
    ),
    "steps as a string": (_good_json(params={"steps": "5"}), 422, ("steps", "integer")),
    "steps as a boolean": (_good_json(params={"steps": True}), 422, ("steps", "integer")),
    "steps as a fraction": (_good_json(params={"steps": 5.5}), 422, ("steps", "integer")),
    "fractional dimension": (
        _good_json(anchors={"dtype": "uint8", "shape": [1.5], "data": "AA=="}),
        400,
        ("shape.0", "integer"),
    ),
    "eta above 1": (_good_json(params={"eta": 1.5}), 422, ("eta", "less than or equal to 1")),
    "unknown method": (_good_json(params={"method": "euler"}), 422, ("method", "ddim", "ddpm")),
    "unknown cache mode": (_good_json(params={"cache": "never"}), 422, ("cache", "bypass")),
    "k zero": (_good_json(params={"k": 0}), 422, ("k", "greater than or equal to 1")),
    "k with candidates": (
        _good_json(params={"k": 2}, candidates=tensor_json(np.zeros(2, np.int64))),
        422,
        ("not both",),
    ),
}


@pytest.mark.parametrize("case", sorted(MALFORMED_JSON))
def test_malformed_json_request(case: str) -> None:
    body, status, words = MALFORMED_JSON[case]
    expect_error(decode_request, body, JSON_MEDIA_TYPE, status=status, words=words)


@pytest.mark.parametrize(
    "ctype", [None, "", "text/plain", "application/octet-stream", "multipart/form-data; boundary=x"]
)
def test_wrong_content_type_is_415(ctype: str | None) -> None:
    expect_error(
        decode_request,
        GOOD_ST,
        ctype,
        status=415,
        words=("content type", SAFETENSORS_MEDIA_TYPE, JSON_MEDIA_TYPE),
        code="unsupported_media_type",
    )


def test_null_candidates_mean_default_and_int_weight_is_accepted() -> None:
    body = _good_json(candidates=None, params={"interpolation_weight": 1, "k": None})
    got = decode_request(body, JSON_MEDIA_TYPE)
    assert got.candidates.tolist() == [0, 0]
    assert got.params.interpolation_weight == 1.0


def test_integral_floats_count_as_integers_in_json() -> None:
    """JSON Schema calls 4.0 an integer; so does the decoder (shapes and params)."""
    anchors = {**tensor_json(GOOD_ANCHORS), "shape": [2.0, 4.0, 4, 3]}
    got = decode_request(_good_json(anchors=anchors, params={"steps": 5.0}), JSON_MEDIA_TYPE)
    assert same_bits(got.anchors, GOOD_ANCHORS) and got.params.steps == 5


def test_bad_client_side_input_is_a_protocol_error() -> None:
    expect_error(encode_request, GOOD_ANCHORS, params={"stepz": 3}, status=422, words=("stepz",))
    expect_error(encode_request, GOOD_ANCHORS, encoding="text/csv", status=415, words=("text/csv",))
    expect_error(
        encode_safetensors, {"x": np.zeros(2, bool)}, status=400, words=("bool", "not supported")
    )
    expect_error(tensor_to_json, np.zeros(2, np.complex64), status=400, words=("complex64",))


def _answer(encoding: str, **overrides: object) -> bytes:
    positives = overrides.pop("positives", np.zeros((2, 4, 4, 3), np.uint8))
    cache_hit = overrides.pop("cache_hit", np.zeros(2, np.uint8))
    params = overrides.pop("params", GenerationParams())
    return encode_response(ResponseArrays(positives, cache_hit, "fp", params), encoding=encoding)[0]


MALFORMED_ANSWERS = {
    "json missing model": (
        json.dumps(
            {
                "positives": tensor_json(np.zeros((1, 2, 2, 1), np.uint8)),
                "cache_hit": tensor_json(np.zeros(1, np.uint8)),
                "params": {},
            }
        ).encode(),
        JSON_MEDIA_TYPE,
        ("malformed answer", "model"),
    ),
    "float positives": (
        _answer(JSON_MEDIA_TYPE, positives=np.zeros((2, 4, 4, 3), np.float32)),
        JSON_MEDIA_TYPE,
        ("positives must be uint8",),
    ),
    "cache_hit of wrong length": (
        _answer(SAFETENSORS_MEDIA_TYPE, cache_hit=np.zeros(3, np.uint8)),
        SAFETENSORS_MEDIA_TYPE,
        ("cache_hit", "[2]"),
    ),
    "k disagrees": (
        _answer(
            SAFETENSORS_MEDIA_TYPE,
            positives=np.zeros((2, 3, 4, 4, 3), np.uint8),
            cache_hit=np.zeros((2, 3), np.uint8),
            params=GenerationParams(k=2),
        ),
        SAFETENSORS_MEDIA_TYPE,
        ("3 candidates", "params.k is 2"),
    ),
    "no metadata": (
        encode_safetensors(
            {"positives": np.zeros((1, 2, 2, 1), np.uint8), "cache_hit": np.zeros(1, np.uint8)}
        ),
        SAFETENSORS_MEDIA_TYPE,
        ("'model' and 'params'",),
    ),
    "missing tensor": (
        encode_safetensors(
            {"positives": np.zeros((1, 2, 2, 1), np.uint8)}, {"model": "fp", "params": "{}"}
        ),
        SAFETENSORS_MEDIA_TYPE,
        ("lacks tensors", "cache_hit"),
    ),
    "html error page": (b"<html>502</html>", "text/html", ("content type", "text/html")),
}


@pytest.mark.parametrize("case", sorted(MALFORMED_ANSWERS))
def test_malformed_answer(case: str) -> None:
    body, ctype, words = MALFORMED_ANSWERS[case]
    with pytest.raises(ProtocolError) as info:
        decode_response(body, ctype)
    for word in words:
        assert word.lower() in info.value.detail.lower(), (word, info.value.detail)


# ------------------------------------------------------------- fuzzing


def only_protocol_errors(fn, *args, **kwargs) -> None:
    """Call fn; a ProtocolError is fine, any other exception fails the test."""
    try:
        fn(*args, **kwargs)
    except ProtocolError as err:
        assert err.detail and 400 <= err.status < 500


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
field_names = st.sampled_from(
    [
        "anchors",
        "candidates",
        "params",
        "dtype",
        "shape",
        "data",
        "data_offsets",
        "__metadata__",
        "k",
        "steps",
        "positives",
        "cache_hit",
        "model",
    ]
) | st.text(max_size=6)
# JSON shaped like our messages, so that the fuzz reaches the deeper checks
near_json = st.recursive(
    json_values,
    lambda inner: st.dictionaries(field_names, inner, max_size=4) | st.lists(inner, max_size=3),
    max_leaves=16,
)


@FUZZ
@given(body=st.binary(max_size=256), ctype=st.sampled_from(ENCODINGS))
def test_fuzz_arbitrary_bytes(body: bytes, ctype: str) -> None:
    only_protocol_errors(decode_request, body, ctype)
    only_protocol_errors(decode_safetensors, body)
    only_protocol_errors(decode_response, body, ctype)


@FUZZ
@given(header_len=st.integers(0, 300), rest=st.binary(max_size=300))
def test_fuzz_bytes_after_a_valid_length_prefix(header_len: int, rest: bytes) -> None:
    body = struct.pack("<Q", header_len) + rest
    only_protocol_errors(decode_request, body, SAFETENSORS_MEDIA_TYPE)
    only_protocol_errors(decode_response, body, SAFETENSORS_MEDIA_TYPE)


@FUZZ
@given(obj=near_json, data=st.binary(max_size=64))
def test_fuzz_arbitrary_json(obj: object, data: bytes) -> None:
    text = json.dumps(obj).encode()
    only_protocol_errors(decode_request, text, JSON_MEDIA_TYPE)
    only_protocol_errors(decode_response, text, JSON_MEDIA_TYPE)
    # the same JSON as a safetensors header, with some data behind it
    blob = struct.pack("<Q", len(text)) + text + data
    only_protocol_errors(decode_request, blob, SAFETENSORS_MEDIA_TYPE)
    only_protocol_errors(decode_response, blob, SAFETENSORS_MEDIA_TYPE)


@st.composite
def mutated_requests(draw: st.DrawFn) -> tuple[bytes, str]:
    """A valid request with a few bytes flipped, cut or inserted."""
    encoding = draw(st.sampled_from(ENCODINGS))
    anchors = draw(st.sampled_from([GOOD_ANCHORS, np.zeros((1, 2, 2, 2), np.float32)]))
    body = bytearray(encode_request(anchors, None, {"steps": 3}, encoding=encoding)[0])
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "cut", "insert"]))
        at = draw(st.integers(0, max(len(body) - 1, 0)))
        if op == "flip" and body:
            body[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "cut":
            del body[at : at + draw(st.integers(1, 16))]
        else:
            body[at:at] = draw(st.binary(min_size=1, max_size=8))
    return bytes(body), encoding


@FUZZ
@given(req=mutated_requests())
def test_fuzz_mutated_valid_requests(req: tuple[bytes, str]) -> None:
    body, encoding = req
    only_protocol_errors(
        decode_request, body, encoding, model=ModelShapes((3, 4, 4)), max_anchors=8
    )


@pytest.mark.parametrize("encoding", [SAFETENSORS_MEDIA_TYPE, JSON_MEDIA_TYPE])
def test_anchor_latents_round_trip_and_answers_carry_latents(encoding: str) -> None:
    latents = np.random.default_rng(3).normal(size=(2, 4, 8, 8)).astype(np.float16)
    shapes = ModelShapes((3, 32, 32), (4, 8, 8))
    body, ctype = encode_request(
        latents, params={"k": 2, "output": "latents"}, encoding=encoding, latents=True
    )
    req = decode_request(body, ctype, model=shapes)
    assert req.anchor_space == "latent" and req.anchors.dtype == np.float16
    assert np.array_equal(req.anchors, latents) and req.candidates.tolist() == [0, 1, 0, 1]
    out = np.zeros((2, 2, 4, 8, 8), np.float32)
    reply = ResponseArrays(out, np.zeros((2, 2), np.uint8), "fp", req.params)
    back = decode_response(*encode_response(reply, encoding=encoding))
    assert back.positives.dtype == np.float32 and back.positives.shape == out.shape
    # an answer whose kind does not match params.output is malformed
    wrong = ResponseArrays(out.astype(np.uint8), reply.cache_hit, "fp", req.params)
    expect_error(
        decode_response,
        *encode_response(wrong, encoding=encoding),
        status=400,
        words=("float32 [N, k, c, h, w]",),
    )
    # picture anchors on the same model are still pictures
    body, ctype = encode_request(np.zeros((1, 32, 32, 3), np.uint8), encoding=encoding)
    assert decode_request(body, ctype, model=shapes).anchor_space == "image"


@pytest.mark.parametrize("encoding", [SAFETENSORS_MEDIA_TYPE, JSON_MEDIA_TYPE])
def test_the_expired_mask_travels_only_when_set(encoding: str) -> None:
    params = GenerationParams(k=2, deadline_ms=100)
    positives = np.zeros((3, 2, 4, 4, 1), np.uint8)
    hit = np.zeros((3, 2), np.uint8)
    mask = np.array([[0, 1], [0, 0], [1, 1]], np.uint8)
    back = decode_response(
        *encode_response(ResponseArrays(positives, hit, "fp", params, mask), encoding=encoding)
    )
    assert back.expired is not None and np.array_equal(back.expired, mask)
    assert (
        decode_response(
            *encode_response(ResponseArrays(positives, hit, "fp", params), encoding=encoding)
        ).expired
        is None
    )
    wrong = ResponseArrays(positives, hit, "fp", params, mask[:, :1])
    expect_error(
        decode_response, *encode_response(wrong, encoding=encoding), status=400, words=("expired",)
    )


def test_a_request_carries_only_the_params_its_caller_set() -> None:
    """Unset params are left to the service, which gives them the model's stored
    settings (docs/api.md, "Params"); a param set to its own default is still sent."""
    anchors = np.zeros((1, 8, 8, 3), np.uint8)
    params = GenerationParams(k=4, sampling="authors")
    body, _ = encode_request(anchors, params=params, encoding=JSON_MEDIA_TYPE)
    assert json.loads(body)["params"] == {"k": 4, "sampling": "authors"}
    body, _ = encode_request(anchors, encoding=JSON_MEDIA_TYPE)
    assert json.loads(body)["params"] == {}
