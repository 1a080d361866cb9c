"""The client extra alone: ``pip install "clsp-positives[client]"`` into a fresh virtual
environment gives ``Client`` and ``AsyncClient`` that talk to a pool and never import
torch (docs/design.md §5)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.stub_pool import stub_server
from tests.test_layout import build_wheel

pytestmark = pytest.mark.slow

SCRIPT = """
import asyncio, sys
import numpy as np
from clsp_positives import AsyncClient, Client
from clsp_positives.proto.params import GenerationParams

url = sys.argv[1]
anchors = np.zeros((3, 16, 16, 1), np.uint8)
with Client(url) as pool:
    answer = pool.positives(anchors, None, GenerationParams(k=2, steps=2))
    assert answer.positives.shape == (3, 2, 16, 16, 1), answer.positives.shape

async def main():
    async with AsyncClient(url) as pool:
        answer = await pool.positives(anchors, timeout=30)
        assert answer.positives.shape == (3, 16, 16, 1)
        assert (await pool.model_info())["fingerprint"] == answer.model

asyncio.run(main())
heavy = sorted(m for m in ("torch", "torchvision", "fastapi", "diffusers") if m in sys.modules)
assert not heavy, heavy
print("client ok")
"""


def test_the_client_extra_works_without_torch(tmp_path: Path) -> None:
    wheel = build_wheel(tmp_path)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", f"{wheel}[client]"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    listed = subprocess.run(
        [str(python), "-m", "pip", "list", "--format=freeze"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.lower()
    assert "torch" not in listed and "httpx" in listed, listed
    with stub_server() as server:
        done = subprocess.run(
            [str(python), "-c", SCRIPT, server.url],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=tmp_path,  # the installed wheel, not the source tree
        )
    assert done.returncode == 0 and "client ok" in done.stdout, done.stdout + done.stderr
