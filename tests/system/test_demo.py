"""``clsp demo --quick`` end to end, as a newcomer runs it: a subprocess, real DDPM training,
a real ``clsp serve`` subprocess, both trainings, the table, results.json and the PNG; and
the service is gone afterwards, also when the demo is interrupted."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

from clsp_positives.demo import BUDGETS, GRID_NAME, RESULTS_NAME, SERVICE_LOG
from clsp_positives.grid import grid_size
from clsp_positives.proto.model_settings import read_generation_defaults

pytestmark = pytest.mark.slow

QUICK = BUDGETS["quick"]
COLUMNS = (
    "linear acc",
    "probe acc",
    "kNN acc",
    "positives generated",
    "cache-hit rate",
    "positives/s",
    "wall time",
)


def demo_command(out: Path, cache: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "clsp_positives.cli",
        "demo",
        "--quick",
        "--out",
        str(out),
        "--cache-dir",
        str(cache),
        "--no-progress",
    ]


def demo_env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for an init that does not reap counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def _listening(url: str) -> bool:
    host, port = url.removeprefix("http://").split(":")
    try:
        with socket.create_connection((host, int(port)), timeout=1):
            return True
    except OSError:
        return False


@dataclass
class QuickRun:
    out: Path
    cache: Path
    stdout: str
    stderr: str
    results: dict


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> QuickRun:
    base = tmp_path_factory.mktemp("demo")
    out, cache = base / "out", base / "cache"
    # Under pytest-timeout's 600 s, so that a stuck run fails here with its output.
    done = subprocess.run(
        demo_command(out, cache), capture_output=True, text=True, timeout=540, env=demo_env()
    )
    assert done.returncode == 0, f"stdout:\n{done.stdout[-6000:]}\nstderr:\n{done.stderr[-6000:]}"
    results = json.loads((out / RESULTS_NAME).read_text())
    return QuickRun(out, cache, done.stdout, done.stderr, results)


def test_prints_the_results_table(quick_run: QuickRun) -> None:
    header = next((line for line in quick_run.stdout.splitlines() if "linear acc" in line), "")
    for column in COLUMNS:
        assert column in header, f"column {column!r} missing from the table:\n{quick_run.stdout}"
    rows = {
        arm: next(
            (
                line
                for line in quick_run.stdout.splitlines()
                if line.lstrip("│| ").startswith(f"{arm} (clsp-weight")
            ),
            None,
        )
        for arm in ("baseline", "clsp")
    }
    assert all(rows.values()), quick_run.stdout
    # Each row shows its three accuracies as percentages, and the CLSP row its positives.
    for line in rows.values():
        assert len(re.findall(r"\d+\.\d%", line)) >= 3, line
    assert str(quick_run.results["arms"]["clsp"]["positives_generated"]) in rows["clsp"]


def test_results_json_is_sane(quick_run: QuickRun) -> None:
    r = quick_run.results
    assert r["mode"] == "quick"
    for name, weight in (("baseline", 0.0), ("clsp", 1.0)):
        arm = r["arms"][name]
        assert arm["clsp_weight"] == weight
        assert all(0.0 <= arm[key] <= 1.0 for key in ("linear_acc", "probe_acc", "knn_acc"))
        # Ten classes: a backbone that learnt nothing sits near 0.1; these learn something.
        assert arm["linear_acc"] > 0.3 and arm["probe_acc"] > 0.3, arm
        assert arm["epochs"] == QUICK.epochs and len(arm["history"]) == QUICK.epochs
        assert arm["seconds"] > 0
    gen = r["generation"]
    assert gen["positives"] == gen["images"] * QUICK.k
    # The model's calibration, stored beside it, chose every param the demo leaves
    # unset; the quick budget sets the steps alone.
    stored = read_generation_defaults(quick_run.cache / "demo-model")
    assert stored is not None and stored.measured is not None
    assert "calibrating its generation settings" in quick_run.stdout
    assert gen["params"]["steps"] == QUICK.gen_steps
    for name, value in stored.stored().items():
        if name != "steps":
            assert gen["params"].get(name, value) == value, name
    # The positives' class is read by a probe that reads the real digits almost perfectly.
    quality = gen["quality"]
    assert quality["probe_accuracy_on_anchors"] > 0.9, quality
    assert 0.0 <= quality["class_kept"] <= 1.0 and quality["mean_abs_to_anchor"] > 0.0
    assert f"keep their anchor's class {quality['class_kept']:.0%}" in quick_run.stdout
    clsp = r["arms"]["clsp"]
    # Everything was generated ahead, so the CLSP arm trained on cache hits alone and
    # every anchor had its positive (strict prefetch).
    assert clsp["positives_generated"] >= gen["positives"]
    assert clsp["positive_fraction"] == pytest.approx(1.0)
    assert clsp["cache_hit_rate"] == pytest.approx(1.0)
    assert clsp["positives_per_s"] > 0
    assert r["service"]["training_cache_misses"] == 0
    assert r["model"]["reused"] is False and r["model"]["steps"] > 0


def test_grid_png_has_the_documented_size(quick_run: QuickRun) -> None:
    grid = quick_run.results["grid"]
    expected = grid_size(QUICK.grid_rows, QUICK.grid_k, tile=16)
    # 1 anchor + 4 candidates of 64 px, an 8 px gap, 2 px between tiles; 10 rows
    assert expected == (334, 658)
    assert (grid["width"], grid["height"]) == expected
    with Image.open(quick_run.out / GRID_NAME) as image:
        assert image.size == expected
        assert image.mode == "L"
        # Not a blank canvas: the digits and their candidates vary.
        lo, hi = image.getextrema()
        assert hi - lo > 100


def test_service_is_stopped_after_the_run(quick_run: QuickRun) -> None:
    assert not _listening(quick_run.results["service"]["url"])
    assert "service stopped" in quick_run.stdout
    assert (quick_run.out / SERVICE_LOG).is_file()


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not _alive(pid)


def _default_sigint() -> None:
    """Ctrl-C must reach the demo as a KeyboardInterrupt even when the suite runs from a
    background shell (``nohup make test &``): that shell ignores SIGINT, every child
    inherits the ignore, and Python installs its handler only over the default."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize(
    "sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=["ctrl-c", "sigterm", "sigkill"]
)
def test_stopping_the_demo_stops_the_service(
    quick_run: QuickRun, tmp_path: Path, sig: signal.Signals
) -> None:
    """Ctrl-C or SIGTERM while the service runs: the demo exits 130 and takes it down;
    SIGKILL (no cleanup can run): the kernel's parent-death signal takes it down."""
    # The quick run left its DDPM in the cache, so this run reaches the service at once.
    proc = subprocess.Popen(
        demo_command(tmp_path / "out", quick_run.cache),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=demo_env(),
        preexec_fn=_default_sigint,
    )
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        pid = url = None
        deadline = time.monotonic() + 300
        for line in proc.stdout:
            lines.append(line)
            found = re.search(r"clsp serve on (http://\S+) \(pid (\d+)", line)
            if found:
                url, pid = found.group(1), int(found.group(2))
                break
            assert time.monotonic() < deadline, "".join(lines)
        assert pid is not None and url is not None, "".join(lines)
        assert "reusing the DDPM" in "".join(lines)
        assert _alive(pid) and _listening(url)
        proc.send_signal(sig)
        rest, _ = proc.communicate(timeout=120)
        lines.append(rest)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == (-signal.SIGKILL if sig == signal.SIGKILL else 130), lines
    # After SIGKILL the service shuts down on its own, gracefully: give it the time.
    assert _wait_gone(pid, 60), "".join(lines)
    assert not _listening(url)
