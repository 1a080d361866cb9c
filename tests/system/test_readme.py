"""The README's curl example and docs/api.md's Python example run as written against a
real ``clsp serve``, and the README keeps what a first screen needs.

Each example is a fenced block carrying a ``# readme-example: NAME`` line (in the README)
or ``# doc-example: NAME`` (in docs/) and is written against ``http://localhost:8000``; the
test points it at a service on a free loopback port (the tiny random model: the shapes and
the status are what a reader checks) and runs it. docs/cli.md's generated option tables
are checked by tests/test_config_docs.py.
"""

from __future__ import annotations

import base64
import json
import math
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.examples import DOCUMENTED_URL, doc_example
from tests.support.servers import ServerProcess, free_port

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
API_DOC = ROOT / "docs" / "api.md"
README_MAX_LINES = 250
"""The README is the entry page; what needs more room lives in docs/ and is linked."""
FIRST_SCREEN_LINES = 25


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
    """docs/api.md's safetensors example, the fast path from Python."""
    script = doc_example(API_DOC, "python", "doc-example").replace(DOCUMENTED_URL, service.url)
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    assert done.stdout.startswith("(8, 4, 16, 16, 1) ")


def test_the_readme_is_short_and_starts_with_how_to_run_it() -> None:
    """Set-up and test commands on the first screen; the rest in linked docs/ pages."""
    lines = README.read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines: move a section to a docs/ page and link it"
    )
    first = "\n".join(lines[:FIRST_SCREEN_LINES])
    for command in ("make install", "make demo", "make test"):
        assert command in first, f"{command!r} should be on the README's first screen"
    assert "https://arxiv.org/abs/2408.16965" in first


def test_every_relative_link_of_the_docs_resolves() -> None:
    """A section moved out of the README leaves no dangling link or anchor behind."""
    pages = [README, *sorted((ROOT / "docs").glob("*.md"))]
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", target):
                continue  # https:, mailto:
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, broken


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)
    headings = re.findall(r"^#+ (.+)$", text, flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}
