"""docs/deployment.md's pool example runs as written against ``clsp serve``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.examples import doc_example, run_example
from tests.support.servers import ServerProcess
from tests.support.service import clsp_serve

DEPLOYMENT_DOC = Path(__file__).resolve().parents[2] / "docs" / "deployment.md"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def service(tiny_model_dir: Path) -> Iterator[ServerProcess]:
    with clsp_serve(tiny_model_dir) as server:
        yield server


def test_pool_example(service: ServerProcess, tmp_path: Path) -> None:
    script = doc_example(DEPLOYMENT_DOC, "pool-python", "doc-example")
    assert run_example(script, service.url, tmp_path).splitlines() == [
        "(4, 2, 16, 16, 1) expired: 0",
        "504 deadline_exceeded",
    ]
