"""The test helpers own their processes: one start per process, and a run that
leaves a process behind is found out (tests/support/servers.py, tests/support/leftovers.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import psutil
import pytest

from tests.support import leftovers
from tests.support.servers import RedisServer, ServerProcess, free_port

# Set by tests/conftest.py for the whole run (read back, not imported: one token per run).
SESSION_TOKEN = os.environ[leftovers.MARKER]


def test_a_second_redis_start_is_refused_and_a_restart_after_kill_works() -> None:
    server = RedisServer().start()
    try:
        first = server.proc
        assert first is not None
        with pytest.raises(RuntimeError, match="already running"):
            server.start()
        assert server.proc is first and server.ping()  # the running one is untouched
        server.kill()
        server.start()  # the same port again, as after a crash
        assert server.proc is not first and server.ping()
    finally:
        server.close()
    assert server.proc is not None and server.proc.poll() is not None


def test_with_on_a_started_server_process_is_refused() -> None:
    port = free_port()
    cmd = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"]
    server = ServerProcess(cmd, port, health_path="/", start_timeout=30)
    with server:
        pid = server.proc.pid if server.proc else None
        with pytest.raises(RuntimeError, match="already running"), server:
            pass
        assert server.proc is not None and server.proc.pid == pid
        assert server.proc.poll() is None  # the refused second start stopped nothing
    assert server.proc.poll() is not None


def _orphan(seconds: float) -> int:
    """Start ``sleep`` from a child that exits at once: the sleeper is re-parented
    away from pytest, as a service left by a killed parent would be."""
    # The sleeper must not hold our pipes, or run() waits for it to end.
    code = (
        "import subprocess as s; "
        f"p = s.Popen(['sleep', '{seconds}'], stdout=s.DEVNULL, stderr=s.DEVNULL); print(p.pid)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=30
    )
    return int(done.stdout)


def test_leftovers_finds_an_orphan_that_carries_the_marker() -> None:
    pid = _orphan(60)
    orphan = psutil.Process(pid)
    try:
        assert pid not in {p.pid for p in psutil.Process().children(recursive=True)}
        found = leftovers.leftovers(SESSION_TOKEN, grace_s=0.2)
        assert pid in {p.pid for p in found}
        assert "sleep 60" in leftovers.describe(orphan)
    finally:
        leftovers.kill([orphan])
    assert pid not in {p.pid for p in leftovers.started_processes(SESSION_TOKEN)}


def test_leftovers_waits_for_a_process_that_is_exiting() -> None:
    pid = _orphan(1)
    assert pid in {p.pid for p in leftovers.started_processes(SESSION_TOKEN)}
    # Other processes of this run (the session's redis-server) keep running: the
    # wait is the whole grace, and only the exiting one is not reported.
    assert pid not in {p.pid for p in leftovers.leftovers(SESSION_TOKEN, grace_s=3)}


def test_a_process_without_the_marker_or_parentage_is_not_ours() -> None:
    other = psutil.Process(1)
    assert not leftovers._carries(other, SESSION_TOKEN)
    assert 1 not in {p.pid for p in leftovers.started_processes(SESSION_TOKEN)}
