"""How many torch CPU threads to run: the cores that are idle now.

torch's CPU thread pool synchronises after every small operation; on a machine whose
cores are busy with other work each of those waits costs a time slice, and a 16x16
model runs ten times slower with two threads than with one (docs/demo.md, "Budgets").
So a run that was not told a thread count takes the cores idle at its start.

"Idle now" is measured, not estimated: the idle time of each usable core over a short
window, from ``/proc/stat``. The 1-minute load average is not used: it lags, and right
after a test suite it still counts the finished suite's processes, so an idle 2-core
machine looked fully busy and the demo chose one thread.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

PROC_STAT = Path("/proc/stat")
"""Per-core CPU time since boot, in clock ticks (Linux; absent elsewhere)."""
CPU_MAX = Path("/sys/fs/cgroup/cpu.max")
"""The cgroup v2 CPU quota of a container: ``QUOTA PERIOD``, or ``max PERIOD``."""
IDLE_FIELDS = (3, 4)
"""idle and iowait in a ``cpuN`` line's times: a core waiting on a disk runs nothing."""
COUNTED_FIELDS = 8
"""user .. steal; guest and guest_nice are already counted in user and nice."""


def usable_cores() -> int:
    """The cores this process may run on: its affinity, capped by a container's quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    quota = _quota_cores()
    return max(1, min(cores, quota) if quota else cores)


def _quota_cores() -> int | None:
    try:
        quota, period = CPU_MAX.read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    return max(1, math.ceil(int(quota) / int(period)))


def _core_times() -> dict[int, tuple[int, int]]:
    """Core number -> (idle ticks, all ticks) since boot."""
    times = {}
    for line in PROC_STAT.read_text().splitlines():
        name, *fields = line.split()
        if not name.startswith("cpu") or name == "cpu":
            continue
        ticks = [int(f) for f in fields[:COUNTED_FIELDS]]
        times[int(name[3:])] = (sum(ticks[i] for i in IDLE_FIELDS), sum(ticks))
    return times


def idle_cpu(window_s: float = 0.5) -> float:
    """Idle cores over the next ``window_s`` seconds, as a fraction (1.5: one core and a
    half idle), counting only the cores this process may run on.

    Where ``/proc/stat`` does not exist (not Linux), every usable core counts as idle.
    """
    try:
        allowed = os.sched_getaffinity(0)
    except (AttributeError, OSError):
        allowed = None
    try:
        start = _core_times()
        time.sleep(window_s)
        end = _core_times()
    except (OSError, ValueError):
        return float(usable_cores())
    idle = 0.0
    for core, (idle_end, all_end) in end.items():
        if core not in start or (allowed is not None and core not in allowed):
            continue
        ticks = all_end - start[core][1]
        idle += (idle_end - start[core][0]) / ticks if ticks > 0 else 1.0
    return min(idle, float(usable_cores()))


def idle_cores(window_s: float = 0.5) -> int:
    """The cores idle now, rounded to whole cores (0 on a saturated machine)."""
    return round(idle_cpu(window_s))


def resolve_threads(requested: int | None, *, at_most: int | None = None) -> int:
    """The torch thread count of a run: ``requested`` when given, else
    ``OMP_NUM_THREADS`` when set (what the reader of the troubleshooting advice set),
    else the idle cores, capped by ``at_most``; at least 1.
    """
    if requested is not None:
        if requested < 1:
            raise ValueError(f"a thread count is at least 1, not {requested}")
        return requested
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) >= 1:
        return int(env)
    if at_most is not None and at_most <= 1:
        return 1  # nothing to measure
    idle = idle_cores()
    return max(1, min(idle, at_most) if at_most else idle)
