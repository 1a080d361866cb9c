"""The foundation every other test stands on: a torch-free contract package,
the ``clsp`` command, and the real-server fixtures."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import redis
import typer.main

from tests.support.servers import RedisServer, uvicorn_app

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"}


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=120
    )


def test_proto_does_not_import_torch() -> None:
    done = run_python(
        "import clsp_positives.proto, sys; assert 'torch' not in sys.modules, "
        "sorted(m for m in sys.modules if m.startswith('torch'))"
    )
    assert done.returncode == 0, done.stderr


def test_the_cli_module_does_not_import_torch() -> None:
    """`clsp --help` stays instant and works on a torch-free client install."""
    done = run_python("import clsp_positives.cli, sys; assert 'torch' not in sys.modules")
    assert done.returncode == 0, done.stderr


def _clsp() -> list[str]:
    script = Path(sys.executable).with_name("clsp")
    return [str(script)] if script.exists() else [sys.executable, "-m", "clsp_positives.cli"]


def test_clsp_help_lists_the_registered_commands() -> None:
    from clsp_positives.cli import app

    registered = sorted(typer.main.get_command(app).commands)
    assert "serve" in registered
    done = subprocess.run(
        [*_clsp(), "--help"], capture_output=True, text=True, env=ENV, timeout=120
    )
    assert done.returncode == 0, done.stderr
    for name in registered:
        assert name in done.stdout, (name, done.stdout)
    version = subprocess.run(
        [*_clsp(), "--version"], capture_output=True, text=True, env=ENV, timeout=120
    )
    assert version.returncode == 0 and version.stdout.startswith("clsp-positives ")


def test_redis_fixture_answers(redis_server: RedisServer, redis_url: str) -> None:
    assert redis_server.ping()
    assert redis_server.command("PING").startswith(b"+PONG")
    client = redis.Redis.from_url(redis_url)
    try:
        assert client.ping() is True
        client.set("foundation", b"x")
        assert client.get("foundation") == b"x"
        assert client.config_get("maxmemory-policy")["maxmemory-policy"] == "allkeys-lru"
    finally:
        client.close()


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_uvicorn_app_starts_answers_and_stops() -> None:
    server = uvicorn_app("tests.support.echo_app:create_app").start(timeout=60)
    try:
        answer = httpx.get(server.url + "/healthz", timeout=5)
        assert answer.status_code == 200 and answer.json() == {"status": "ok"}
        assert httpx.get(server.url + "/nope", timeout=5).status_code == 404
    finally:
        code = server.stop()
    assert code is not None  # the process has exited
    assert not _port_open(server.port)


def test_a_failing_server_reports_its_log() -> None:
    server = uvicorn_app("tests.support.echo_app:does_not_exist")
    with pytest.raises(RuntimeError, match="exited with code"):
        server.start(timeout=60)
