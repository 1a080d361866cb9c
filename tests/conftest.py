"""Shared fixtures: one real redis-server per test run, helpers for uvicorn."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.support.servers import RedisServer

# One torch thread per process: the tests run servers in subprocesses beside
# the test process on two cores, and oversubscribed OpenMP pools crawl.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


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
