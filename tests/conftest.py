"""Shared fixtures: one real redis-server per test run, helpers for uvicorn."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.support import leftovers
from tests.support.servers import RedisServer

# One torch thread per process: the tests run servers in subprocesses beside
# the test process on two cores, and oversubscribed OpenMP pools crawl.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Every process the tests start inherits this marker, so that the check at the
# end of the session finds it even when its parent has died (tests/support/leftovers.py).
SESSION_TOKEN = leftovers.mark_session()
LEFT_RUNNING = pytest.StashKey[list[str]]()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run if a process the tests started outlives it.

    Runs after every fixture has been finalized: whatever still runs now was
    never stopped. It is reported with its command line and killed.
    """
    left = leftovers.leftovers(SESSION_TOKEN)
    if not left:
        return
    session.config.stash[LEFT_RUNNING] = [leftovers.describe(p) for p in left]
    leftovers.kill(left)
    if session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    left = config.stash.get(LEFT_RUNNING, [])
    if not left:
        return
    terminalreporter.section("processes the tests left running", sep="!", red=True)
    for line in left:
        terminalreporter.write_line(line, red=True)
    terminalreporter.write_line(
        "The run fails for these (they were killed now): stop each process in the "
        "teardown of the test or fixture that started it.",
        red=True,
    )


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A real redis-server on a free loopback port, for the whole run."""
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def own_redis() -> Iterator[RedisServer]:
    """A redis-server of the test module's own, for tests that kill or fill it."""
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture()
def redis_url(redis_server: RedisServer) -> Iterator[str]:
    """The shared server, flushed before each test so tests never see each other's keys."""
    if not redis_server.ping():  # a fault test may have killed it
        redis_server.start()
    redis_server.command("FLUSHALL")
    yield redis_server.url


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory):
    """A random "tiny" 16x16, 1-channel model directory (pipeline layout), made once."""
    from tests.support.models import random_model_dir

    return random_model_dir(
        tmp_path_factory.mktemp("tiny-model"), preset="tiny", sample_size=16, channels=1, seed=0
    )
