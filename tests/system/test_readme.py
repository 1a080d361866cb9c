"""The README's examples run as written against a real ``clsp serve``.

Each example is a fenced block carrying a ``# readme-example: NAME`` line and is written
against ``http://localhost:8000``; the test points it at a service on a free loopback port
(the tiny random model: the shapes and the status are what a reader checks) and runs it.
"""

from __future__ import annotations

import base64
import json
import math
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.examples import DOCUMENTED_URL, doc_example
from tests.support.servers import ServerProcess, free_port

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_example(name: str) -> str:
    """The body of the fenced block marked ``# readme-example: NAME``."""
    return doc_example(README, name, "readme-example")


@pytest.fixture(scope="module")
def service(tiny_model_dir: Path) -> Iterator[ServerProcess]:
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "clsp_positives.cli",
        "serve",
        "--model",
        str(tiny_model_dir),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "warning",
    ]
    with ServerProcess(cmd, port, health_path="/readyz") as server:
        yield server


def _decoded(tensor: dict, dtype: str, shape: list[int]) -> bytes:
    assert tensor["dtype"] == dtype
    assert tensor["shape"] == shape
    raw = base64.b64decode(tensor["data"], validate=True)
    assert len(raw) == math.prod(shape)
    return raw


def test_curl_example_returns_positives(service: ServerProcess, tmp_path: Path) -> None:
    if shutil.which("curl") is None:
        pytest.fail(
            "curl is not installed: the README's API example needs it "
            "(Debian: apt-get install -y curl)"
        )
    script = readme_example("curl").replace(DOCUMENTED_URL, service.url)
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    assert "HTTP 200" in done.stdout.splitlines()
    reply = json.loads((tmp_path / "positives.json").read_text())
    _decoded(reply["positives"], "uint8", [2, 4, 16, 16, 1])
    hits = _decoded(reply["cache_hit"], "uint8", [2, 4])
    assert set(hits) <= {0, 1}
    fingerprint = httpx.get(service.url + "/v1/model", trust_env=False).json()["fingerprint"]
    assert reply["model"] == fingerprint
    # What the README says the example prints.
    assert f"[2, 4, 16, 16, 1] [2, 4] {fingerprint}" in done.stdout.splitlines()


def test_python_example_returns_positives(service: ServerProcess, tmp_path: Path) -> None:
    script = readme_example("python").replace(DOCUMENTED_URL, service.url)
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    assert done.stdout.startswith("(8, 4, 16, 16, 1) ")


def test_configuration_tables_are_the_models_own() -> None:
    """The README's reference tables are what ``clsp_positives.config_docs`` renders
    from ServiceSettings and TrainConfig (run it with --write after changing a field)."""
    from clsp_positives.config_docs import render

    text = README.read_text()
    assert render(text) == text, (
        "README.md's configuration tables are stale: "
        ".venv/bin/python -m clsp_positives.config_docs --write"
    )


@pytest.mark.parametrize("command", ["serve", "train"])
def test_configuration_reference_lists_every_flag(command: str) -> None:
    """Every flag the command line really has (aliases included) is in the README."""
    import typer

    from clsp_positives.cli import app

    cli = typer.main.get_command(app).commands[command]  # type: ignore[attr-defined]
    text = README.read_text()
    options = [p for p in cli.params if p.param_type_name == "option" and p.name != "help"]
    assert len(options) > 15
    missing = [o for p in options for o in p.opts if f"`{o}`" not in text]
    assert not missing, f"README.md's reference lacks these clsp {command} flags: {missing}"
