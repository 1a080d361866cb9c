"""Service settings from the environment, and response encoding negotiation."""

from __future__ import annotations

import pytest

from clsp_positives.service.requests import response_encoding
from clsp_positives.service.settings import ServiceSettings

ST, JS = "application/x-safetensors", "application/json"


def test_settings_from_env_parse_types_and_token():
    s = ServiceSettings.from_env(
        {
            "CLSP_MODEL": "m",
            "CLSP_MAX_BATCH": "32",
            "CLSP_MAX_WAIT_MS": "2.5",
            "CLSP_LOG_JSON": "true",
            "CLSP_API_TOKEN": "t0k",
            "CLSP_REDIS": "",
        }
    )
    assert (s.model, s.max_batch, s.max_wait_ms, s.log_json, s.token, s.redis) == (
        "m",
        32,
        2.5,
        True,
        "t0k",
        None,
    )
    assert s.max_body_bytes == 64 * 1024 * 1024


def test_overrides_win_over_env_and_none_overrides_do_not():
    s = ServiceSettings.from_env({"CLSP_MODEL": "m", "CLSP_PORT": "9000"}, port=9001, redis=None)
    assert s.port == 9001 and s.redis is None


def test_each_field_resolves_flag_then_variable_then_default():
    env = {"CLSP_MODEL": "m", "CLSP_MAX_BATCH": "32", "CLSP_MAX_QUEUE": "10", "CLSP_LOG_JSON": "0"}
    s = ServiceSettings.from_env(env, max_batch=8, log_json=None)
    assert (s.max_batch, s.max_queue, s.log_json) == (8, 10, False)
    assert s.max_anchors == ServiceSettings.model_fields["max_anchors"].default


def test_max_k_defaults_to_the_wire_contracts_limit():
    from clsp_positives.proto.params import DEFAULT_MAX_K

    assert ServiceSettings(model="m").max_k == DEFAULT_MAX_K


def test_public_settings_hide_the_token_and_the_redis_password():
    s = ServiceSettings(model="m", token="t0k", redis="redis://:pw@cache:6379/0")
    shown = repr(s.public())
    assert "t0k" not in shown and "pw" not in shown
    assert s.public()["token"] == "set" and s.public()["redis"] == "redis://***@cache:6379/0"


def test_the_cache_secret_comes_from_its_variable_and_is_never_shown():
    s = ServiceSettings.from_env({"CLSP_MODEL": "m", "CLSP_CACHE_SECRET": "s3cr3t-pool"})
    assert s.cache_secret == "s3cr3t-pool"
    assert "s3cr3t-pool" not in repr(s.public()) and s.public()["cache_secret"] == "set"
    assert ServiceSettings(model="m").public()["cache_secret"] is None


def test_a_bad_flag_is_named_as_a_flag_and_a_bad_variable_as_a_variable():
    with pytest.raises(ValueError, match=r"--max-batch: .*\(got 0\)") as flagged:
        ServiceSettings.from_env({"CLSP_MODEL": "m"}, max_batch=0)
    assert "CLSP_MAX_BATCH" not in str(flagged.value)
    with pytest.raises(ValueError, match=r"CLSP_LOG_JSON: .*\(got 'maybe'\)"):
        ServiceSettings.from_env({"CLSP_MODEL": "m", "CLSP_LOG_JSON": "maybe"})


@pytest.mark.parametrize(
    "env,fragment",
    [
        ({}, "CLSP_MODEL"),
        ({"CLSP_MODEL": "m", "CLSP_MAX_BATCH": "0"}, "CLSP_MAX_BATCH"),
        ({"CLSP_MODEL": "m", "CLSP_DTYPE": "int8"}, "CLSP_DTYPE"),
        ({"CLSP_MODEL": "m", "CLSP_SAMPLING": "diffusers"}, "CLSP_SAMPLING"),
        ({"CLSP_MODEL": "m", "CLSP_MAX_QUEUE": "many"}, "CLSP_MAX_QUEUE"),
    ],
)
def test_bad_settings_name_the_variable(env, fragment):
    with pytest.raises(ValueError, match=fragment):
        ServiceSettings.from_env(env)


@pytest.mark.parametrize(
    "accept,content_type,expected",
    [
        (None, ST, ST),
        (None, JS, JS),
        ("*/*", ST, ST),
        (ST, JS, ST),
        (f"{JS};q=0.9, {ST}", ST, JS),
        ("text/html", JS, JS),
        (None, "text/plain", JS),
    ],
)
def test_response_encoding_follows_accept_else_the_request(accept, content_type, expected):
    assert response_encoding(accept, content_type) == expected


def test_clsp_serve_without_a_loadable_model_says_why(tmp_path):
    import subprocess
    import sys

    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "clsp_positives.cli",
            "serve",
            "--model",
            str(tmp_path / "missing"),
            "--port",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2
    assert "does not exist" in r.stderr and "Traceback" not in r.stderr
