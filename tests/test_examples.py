"""examples/plain_loop.py and docs/library.md's example run as a reader would run them, on
banks of the right shape: a plain PyTorch loop with CLSP trains (docs/library.md, "Your own
training loop")."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

from clsp_positives.images import load_images
from tests.support.examples import DOCUMENTED_URL, doc_example, run_example

ROOT = Path(__file__).resolve().parents[1]
STEP = re.compile(r"^step (\d+) loss (\S+) clsp (\S+)$")


def test_the_plain_loop_trains_simclr_with_the_clsp_term_on_a_digits_bank(
    tmp_path: Path,
) -> None:
    digits = load_images("digits")
    bank = tmp_path / "digits-k2.npy"
    shape = (len(digits), 2, *digits.images.shape[1:])  # [1437, 2, 16, 16, 1]
    np.save(bank, np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8))
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "plain_loop.py"), str(bank), "--steps", "3"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    steps = [STEP.match(line) for line in done.stdout.splitlines()]
    assert all(steps) and len(steps) == 3, done.stdout
    for number, match in enumerate(steps, 1):
        assert match is not None and int(match[1]) == number
        loss, clsp = float(match[2]), float(match[3])
        assert math.isfinite(loss) and loss > 0
        assert math.isfinite(clsp) and abs(clsp) > 1e-4, "the positives changed nothing"


def test_the_library_example_runs_as_pasted(tmp_path: Path) -> None:
    script = doc_example(
        ROOT / "docs" / "library.md", "with-positives", "doc-example", service=False
    )
    out = run_example(script, DOCUMENTED_URL, tmp_path)
    found = re.fullmatch(r"similarity form (\S+), contrastive form (\S+)\n", out)
    assert found is not None, out
    assert all(math.isfinite(float(value)) for value in found.groups())
