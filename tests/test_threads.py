"""The idle-core count follows the machine at once (clsp_positives/threads.py;
docs/demo.md, "Budgets"): no cores idle while every core spins, and the cores back
as soon as the spinning stops, where the 1-minute load average still counts it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clsp_positives import threads
from clsp_positives.threads import idle_cores, idle_cpu, resolve_threads, usable_cores

SPIN = "import sys; print('spinning', flush=True)\nwhile True: pass"
SPIN_S = 2.0
ATTEMPTS = 3
"""Other work on a shared machine can start in the window right after the spinners
stop; a real lag fails every attempt, a burst of someone else's work only one."""


def _spinners(count: int) -> list[subprocess.Popen[str]]:
    procs = [
        subprocess.Popen([sys.executable, "-c", SPIN], stdout=subprocess.PIPE, text=True)
        for _ in range(count)
    ]
    for proc in procs:  # all of them running before anything is measured
        assert proc.stdout is not None and proc.stdout.readline() == "spinning\n"
    return procs


def _stop(procs: list[subprocess.Popen[str]]) -> None:
    for proc in procs:
        proc.kill()
    for proc in procs:
        proc.wait(timeout=10)
        assert proc.stdout is not None
        proc.stdout.close()


def _one_cycle(cores: int) -> tuple[float, int, float, float]:
    """(idle before, idle cores while every core spins, idle right after, load average)."""
    before = idle_cpu()
    procs = _spinners(cores)
    try:
        during = idle_cores()
        time.sleep(max(0.0, SPIN_S - 0.5))
    finally:
        _stop(procs)
    after = idle_cpu()
    return before, during, after, os.getloadavg()[0]


def _quota_below_affinity() -> bool:
    return usable_cores() < len(os.sched_getaffinity(0))


@pytest.mark.skipif(not threads.PROC_STAT.exists(), reason="measures /proc/stat (Linux)")
@pytest.mark.skipif(_quota_below_affinity(), reason="a CPU quota throttles the spinners")
def test_idle_cores_follow_a_busy_job_at_once() -> None:
    cores = usable_cores()
    seen = []
    for _ in range(ATTEMPTS):
        before, during, after, load = _one_cycle(cores)
        seen.append((round(before, 2), during, round(after, 2), load))
        # As many spinners as cores leave none idle, whatever else runs.
        assert during == 0, f"(idle before, idle cores during, idle after, load): {seen}"
        # Back to what others left idle before (all cores on an idle machine) in the
        # first window after the spinners stopped; the load average still counts them.
        if round(after) >= round(before):
            return
    pytest.fail(
        "right after the spinners stopped the idle count stayed low, as if it lagged "
        f"(idle before, idle cores during, idle after, 1-min load average): {seen}"
    )


def test_requested_threads_win_then_the_environment_then_idle_cores(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert resolve_threads(5) == 5
    assert resolve_threads(None) == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(threads, "idle_cores", lambda: 0)
    assert resolve_threads(None) == 1  # a saturated machine still runs one
    monkeypatch.setattr(threads, "idle_cores", lambda: 12)
    assert resolve_threads(None, at_most=8) == 8
    with pytest.raises(ValueError, match="at least 1"):
        resolve_threads(0)


def test_without_proc_stat_every_usable_core_counts_as_idle(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(threads, "PROC_STAT", tmp_path / "absent")
    assert idle_cpu(0.01) == usable_cores()


def test_a_container_quota_caps_the_usable_cores(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    quota = tmp_path / "cpu.max"
    monkeypatch.setattr(threads, "CPU_MAX", quota)
    quota.write_text("100000 100000\n")
    assert usable_cores() == 1
    quota.write_text("max 100000\n")
    assert usable_cores() == len(os.sched_getaffinity(0))
