"""docs/deployment.md's pool example runs as written against ``clsp serve``."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.examples import DOCUMENTED_URL, doc_example
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
    done = subprocess.run(
        [sys.executable, "-c", script.replace(DOCUMENTED_URL, service.url)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    assert done.stdout.splitlines() == ["(4, 2, 16, 16, 1) expired: 0", "504 deadline_exceeded"]
