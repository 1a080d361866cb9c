"""docs/latent.md's examples run as written against ``clsp serve`` of a tiny latent
model (64x64x3 pictures, 4x16x16 latents, an AutoencoderKL)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.examples import doc_example, run_example
from tests.support.models import latent_model_dir
from tests.support.servers import ServerProcess
from tests.support.service import clsp_serve

LATENT_DOC = Path(__file__).resolve().parents[2] / "docs" / "latent.md"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    model = latent_model_dir(tmp_path_factory.mktemp("latent-doc") / "model", "kl")
    with clsp_serve(model) as server:
        yield server


def test_curl_example(service: ServerProcess, tmp_path: Path) -> None:
    if shutil.which("curl") is None:
        pytest.fail("curl is not installed: docs/latent.md's example needs it")
    script = doc_example(LATENT_DOC, "latent-curl", "doc-example")
    lines = run_example(script, service.url, tmp_path, shell=True).splitlines()
    assert "latents float32 [1, 2, 4, 16, 16]" in lines
    assert "pictures uint8 [2, 64, 64, 3]" in lines


def test_python_example(service: ServerProcess, tmp_path: Path) -> None:
    script = doc_example(LATENT_DOC, "latent-python", "doc-example")
    assert run_example(script, service.url, tmp_path).splitlines() == [
        "(8, 2, 4, 16, 16) float32",
        "(8, 64, 64, 3) uint8",
    ]
