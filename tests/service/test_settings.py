"""Service settings from the environment, and response encoding negotiation."""

from __future__ import annotations

import pytest

from clsp_positives.service.app import response_encoding
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


@pytest.mark.parametrize(
    "env,fragment",
    [
        ({}, "CLSP_MODEL"),
        ({"CLSP_MODEL": "m", "CLSP_MAX_BATCH": "0"}, "CLSP_MAX_BATCH"),
        ({"CLSP_MODEL": "m", "CLSP_DTYPE": "int8"}, "CLSP_DTYPE"),
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
