"""Generation params: defaults, ranges, strict types, the k limit and the
readable messages of ``parse_params``."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from clsp_positives.proto import DEFAULT_MAX_K, GenerationParams, ProtocolError, parse_params

ALLOWED = (
    "anchor_refresh, cache, deadline_ms, eta, expect_model, interpolate, interpolate_until, "
    "interpolation_weight, k, "
    "method, output, priority, sampling, share_anchor, steps"
)


def refused(raw: object, *words: str, max_k: int = DEFAULT_MAX_K) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        parse_params(raw, max_k=max_k)
    err = info.value
    assert (err.status, err.code) == (422, "invalid_params")
    for word in words:
        assert word in err.detail, (word, err.detail)
    return err


def test_defaults_are_the_papers() -> None:
    p = parse_params(None)
    assert p == parse_params({}) == parse_params("{}") == parse_params(b"{}")
    assert (p.interpolation_weight, p.steps, p.eta, p.method, p.k, p.cache) == (
        0.1,
        100,
        0.1,
        "ddim",
        None,
        "use",
    )


@pytest.mark.parametrize(
    "field,low,high,step",
    [
        ("interpolation_weight", 0, 1, 1e-9),
        ("eta", 0, 1, 1e-9),
        ("steps", 1, 1000, 1),
        ("k", 1, 64, 1),
    ],
)
def test_range_ends_are_accepted_and_beyond_is_refused(
    field: str, low: int, high: int, step: float
) -> None:
    assert getattr(parse_params({field: low}), field) == low
    assert getattr(parse_params({field: high}), field) == high
    refused({field: low - step}, f"{field}: Input should be greater than or equal to {low}")
    if field == "k":
        refused({field: high + 1}, f"k={high + 1} is above this service's limit of {high}")
    else:
        refused({field: high + step}, f"{field}: Input should be less than or equal to {high}")


@pytest.mark.parametrize(
    "raw,words",
    [
        ({"steps": True}, ("steps: Input should be a valid integer", "(got True)")),
        ({"steps": "5"}, ("steps: Input should be a valid integer", "(got '5')")),
        ({"steps": 5.5}, ("steps: Input should be a valid integer", "(got 5.5)")),
        ({"steps": None}, ("steps",)),
        ({"k": True}, ("k",)),
        ({"k": 2.5}, ("k: Input should be a valid integer",)),
        ({"k": 0.0}, ("k: Input should be greater than or equal to 1",)),
        ({"steps": 1e300}, ("steps: Input should be less than or equal to 1000", "...)")),
        ({"eta": "0.1"}, ("eta: Input should be a valid number",)),
        ({"eta": True}, ("eta",)),
        ({"interpolation_weight": float("nan")}, ("interpolation_weight", "finite")),
        ({"interpolation_weight": float("inf")}, ("interpolation_weight",)),
        ({"method": "DDIM"}, ("method: Input should be 'ddim', 'ddpm' or 'dpmpp-2m'",)),
        ({"cache": "off"}, ("cache: Input should be 'use', 'refresh' or 'bypass'",)),
    ],
)
def test_types_are_strict(raw: dict, words: tuple[str, ...]) -> None:
    refused(raw, *words)


def test_integral_floats_are_accepted_for_int_fields() -> None:
    """JSON Schema calls 5.0 an integer, and so does the decoder."""
    p = parse_params({"steps": 5.0, "k": 2.0})
    assert (p.steps, p.k) == (5, 2) and isinstance(p.steps, int) and isinstance(p.k, int)
    assert p.canonical() == parse_params({"steps": 5, "k": 2}).canonical()


def test_int_is_accepted_for_float_fields() -> None:
    p = parse_params({"interpolation_weight": 1, "eta": 0})
    assert p.interpolation_weight == 1.0 and isinstance(p.interpolation_weight, float)
    assert isinstance(p.eta, float)


def test_unknown_field_lists_the_allowed_ones() -> None:
    err = refused({"stpes": 10}, "stpes: unknown field", f"allowed fields are {ALLOWED}")
    assert "got" not in err.detail


def test_every_problem_is_reported_at_once() -> None:
    err = refused({"steps": 0, "eta": 2, "seed": 1}, "steps:", "eta:", "seed: unknown field")
    assert err.detail.count(";") >= 2


def test_max_k_comes_from_the_caller() -> None:
    assert parse_params({"k": 200}, max_k=256).k == 200
    refused({"k": 65}, "k=65", "limit of 64")
    refused({"k": 9}, "limit of 8", max_k=8)
    assert GenerationParams.model_validate({"k": 100}, context={"max_k": 100}).k == 100
    with pytest.raises(ValidationError):
        GenerationParams.model_validate({"k": 100})


@pytest.mark.parametrize(
    "raw,words",
    [
        ("{steps: 5}", ("params is not valid JSON",)),
        (b"\xff\xfe", ("params is not valid JSON",)),
        ('{"steps": ' + "1" * 5000 + "}", ("params is not valid JSON",)),
        ("[" * 100000, ("params is not valid JSON",)),
        ("[1, 2]", ("params must be a JSON object, got list",)),
        (5, ("params must be a JSON object, got int",)),
    ],
)
def test_raw_params_that_are_not_an_object(raw: object, words: tuple[str, ...]) -> None:
    refused(raw, *words)


def test_params_are_frozen() -> None:
    p = GenerationParams()
    with pytest.raises(ValidationError):
        p.steps = 5  # type: ignore[misc]


@settings(max_examples=60, deadline=None)
@given(
    raw=st.dictionaries(
        st.sampled_from(["interpolation_weight", "steps", "eta", "method", "k", "cache", "x"]),
        st.none() | st.booleans() | st.integers(-5, 2000) | st.floats() | st.text(max_size=6),
    )
)
def test_parse_params_either_validates_or_explains(raw: dict) -> None:
    try:
        p = parse_params(raw)
    except ProtocolError as err:
        assert err.status == 422 and err.detail.startswith("invalid params: ")
        return
    assert parse_params(json.loads(p.model_dump_json())) == p
    assert 0 <= p.interpolation_weight <= 1 and 1 <= p.steps <= 1000


def test_canonical_and_group() -> None:
    ddim = GenerationParams(steps=50, eta=0.3, interpolation_weight=0.5)
    assert json.loads(ddim.canonical()) == {
        "interpolation_weight": 0.5,
        "method": "ddim",
        "sampling": "authors",
        "steps": 50,
        "eta": 0.3,
    }
    assert ddim.group() == (50, 0.3, "ddim", "authors", "bottleneck", 1.0, False, 1, "images")
    # the output form splits sampler calls but not keys' canonical params
    latents = GenerationParams(steps=50, eta=0.3, interpolation_weight=0.5, output="latents")
    assert latents.canonical() == ddim.canonical() and latents.group().output == "latents"
    # the weight may differ within one sampler call; ddpm ignores eta
    assert GenerationParams(steps=50, eta=0.3, interpolation_weight=0.9).group() == ddim.group()
    assert GenerationParams(method="ddpm", eta=0.7).group() == (
        100,
        0.0,
        "ddpm",
        "authors",
        "bottleneck",
        1.0,
        False,
        1,
        "images",
    )
    assert "eta" not in json.loads(GenerationParams(method="ddpm").canonical())
    # dpmpp-2m is deterministic: eta enters neither its key nor its group
    dpmpp = GenerationParams(method="dpmpp-2m", eta=0.7)
    assert dpmpp.sampler_eta is None and "eta" not in json.loads(dpmpp.canonical())
    assert json.loads(dpmpp.canonical())["method"] == "dpmpp-2m"
    assert dpmpp.group() == (100, 0.0, "dpmpp-2m", "authors", "bottleneck", 1.0, False, 1, "images")
    assert dpmpp.group() == GenerationParams(method="dpmpp-2m", eta=0.0).group()
    # the sampling mode: None counts as the default, and always enters key and group
    model = GenerationParams(steps=50, eta=0.3, interpolation_weight=0.5, sampling="model")
    assert json.loads(model.canonical())["sampling"] == "model"
    assert model.group() == (50, 0.3, "ddim", "model", "bottleneck", 1.0, False, 1, "images")
    assert ddim.resolved("model") == model and model.resolved("authors") is model
    with pytest.raises(ValidationError):
        GenerationParams(sampling="diffusers")
    # interpolate: in key and group only when not the paper's bottleneck, so the keys of
    # positives cached before the option existed are unchanged
    low = ddim.model_copy(update={"interpolate": "bottleneck+low-skips"})
    assert json.loads(low.canonical()) == {
        **json.loads(ddim.canonical()),
        "interpolate": "bottleneck+low-skips",
    }
    assert low.group() != ddim.group() and low.group().interpolate == "bottleneck+low-skips"
    with pytest.raises(ProtocolError, match="interpolate"):
        parse_params({"interpolate": "everything"})
    # expect_model checks, it does not change a positive: neither key nor group
    pinned = ddim.model_copy(update={"expect_model": "abc"})
    assert pinned.canonical() == ddim.canonical() and pinned.group() == ddim.group()
    with pytest.raises(ProtocolError, match="expect_model"):
        parse_params({"expect_model": ""})
    # the reuse options likewise: keyed and grouped only when they are not the paper's
    shared = ddim.model_copy(update={"share_anchor": True, "anchor_refresh": 4})
    assert json.loads(shared.canonical()) == {
        **json.loads(ddim.canonical()),
        "share_anchor": True,
        "anchor_refresh": 4,
    }
    assert shared.group()[-3:-1] == (True, 4) and ddim.group()[-3:-1] == (False, 1)
    assert parse_params({"anchor_refresh": 2.0}).anchor_refresh == 2
    for bad in ({"anchor_refresh": 0}, {"anchor_refresh": 1.5}, {"share_anchor": "yes"}):
        with pytest.raises(ProtocolError, match=next(iter(bad))):
            parse_params(bad)


def test_deadline_and_priority_schedule_but_never_key() -> None:
    plain = GenerationParams(steps=7)
    timed = GenerationParams(steps=7, deadline_ms=250, priority=1)
    assert timed.canonical() == plain.canonical() and timed.group() == plain.group()
    assert GenerationParams.model_validate({"priority": 1.0}).priority == 1
    refused({"priority": 2}, "priority:")
    refused({"deadline_ms": 0}, "deadline_ms:")
    refused({"deadline_ms": 4e6}, "deadline_ms:")
