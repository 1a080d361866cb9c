"""The examples and docs/library.md's example run as a reader would run them, on banks of the
right shape or against a real ``clsp serve``: a plain PyTorch loop, lightly's SimCLR and a
LightningModule train with the CLSP term (docs/library.md, "Your own training loop", "With
lightly", "With Lightning")."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from clsp_positives.images import load_images
from clsp_positives.torch import clsp_contrastive_loss, nt_xent
from tests.support.examples import DOCUMENTED_URL, doc_example, run_example
from tests.support.servers import ServerProcess
from tests.support.service import clsp_serve

ROOT = Path(__file__).resolve().parents[1]
STEP = re.compile(r"^step (\d+) loss (\S+) clsp (\S+)(?: positives (\d+)/(\d+))?$")


def digits_bank(folder: Path) -> Path:
    """A bank of the digits training set's shape, as `clsp generate --out` writes it."""
    digits = load_images("digits")
    bank = folder / "digits-k2.npy"
    shape = (len(digits), 2, *digits.images.shape[1:])  # [1437, 2, 16, 16, 1]
    np.save(bank, np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8))
    return bank


def run_steps(example: str, *args: str, cwd: Path, steps: int = 3) -> list[re.Match[str]]:
    """Run ``examples/{example}`` for ``steps`` steps; its step lines, each checked: the
    loss finite and positive, the CLSP term's share finite and not zero."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / example), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stdout.splitlines() if line.startswith("step ")]
    found = [STEP.match(line) for line in lines]
    assert len(found) == steps and all(found), done.stdout
    for number, match in enumerate(found, 1):
        assert match is not None and int(match[1]) == number
        loss, clsp = float(match[2]), float(match[3])
        assert math.isfinite(loss) and loss > 0
        assert math.isfinite(clsp) and abs(clsp) > 1e-4, "the positives changed nothing"
    return [m for m in found if m is not None]


def test_the_plain_loop_trains_simclr_with_the_clsp_term_on_a_digits_bank(
    tmp_path: Path,
) -> None:
    run_steps("plain_loop.py", str(digits_bank(tmp_path)), "--steps", "3", cwd=tmp_path)


@pytest.mark.parametrize("mode", ["similarity", "contrastive"])
def test_lightlys_simclr_trains_with_our_positives_and_clsp_term(tmp_path: Path, mode: str) -> None:
    bank = str(digits_bank(tmp_path))
    run_steps("lightly_simclr.py", bank, "--steps", "3", "--clsp-mode", mode, cwd=tmp_path)


def test_lightlys_ntxent_is_our_nt_xent() -> None:
    """What "With lightly" says: its NTXentLoss (no memory bank) is nt_xent, so the
    contrastive form without positives is lightly's loss."""
    from lightly.loss import NTXentLoss

    torch.manual_seed(0)
    z1, z2, z3 = torch.randn(3, 16, 8).unbind()
    theirs = NTXentLoss(temperature=0.2)(z1, z2)
    torch.testing.assert_close(nt_xent(z1, z2, 0.2), theirs)
    none = torch.zeros(16, dtype=torch.bool)
    torch.testing.assert_close(clsp_contrastive_loss(z1, z2, z3, none, 0.2), theirs)


@pytest.fixture(scope="module")
def pool(tiny_model_dir: Path) -> Iterator[ServerProcess]:
    """A real ``clsp serve`` of a 16x16 grey model, the digits' size."""
    with clsp_serve(tiny_model_dir) as server:
        yield server


def test_the_lightning_module_trains_on_positives_from_a_real_pool(
    tmp_path: Path, pool: ServerProcess
) -> None:
    found = run_steps(
        "lightning_module.py", pool.url, "--max-steps", "3", "--batch-size", "64",
        "--gen-steps", "2", "--deadline-ms", "20000", cwd=tmp_path,
    )  # fmt: skip
    for match in found:
        assert match[4] == match[5] == "64", "a positive missed a 20 s deadline"


def test_the_stream_example_runs_as_pasted(tmp_path: Path, pool: ServerProcess) -> None:
    script = doc_example(ROOT / "docs" / "library.md", "positives-stream", "doc-example")
    out = run_example(script, pool.url, tmp_path)
    epochs = re.findall(r"^epoch (\d): (\d+) anchors, (\d+)% positives$", out, flags=re.M)
    assert [e[:2] for e in epochs] == [("0", "256"), ("1", "256")], out
    assert all(0 <= int(e[2]) <= 100 for e in epochs)


def test_the_library_example_runs_as_pasted(tmp_path: Path) -> None:
    script = doc_example(
        ROOT / "docs" / "library.md", "with-positives", "doc-example", service=False
    )
    out = run_example(script, DOCUMENTED_URL, tmp_path)
    found = re.fullmatch(r"similarity form (\S+), contrastive form (\S+)\n", out)
    assert found is not None, out
    assert all(math.isfinite(float(value)) for value in found.groups())
