"""Run ``clsp ARGS...`` in this process and write its peak resident memory to a JSON
file: ``python -m tests.support.peak_rss OUT.json train --dataset ...``.

The peak of the process itself (the trainer, what a data set held in memory grows:
``VmHWM`` of /proc/self/status, the high-water mark of this program's own memory) and
``ru_maxrss`` of its waited-for children (the DataLoader workers of a streamed set), in
KiB, written however the command exits. Not ``ru_maxrss`` of the process itself: Linux
carries it over from the parent across fork and exec, so under a large pytest process
every run would report the parent's peak.
"""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path


def _vm_hwm_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("/proc/self/status has no VmHWM")


def main(argv: list[str]) -> int:
    out, args = Path(argv[0]), argv[1:]
    from clsp_positives.cli import app

    code: int | str | None = 0
    try:
        app(args, prog_name="clsp")
    except SystemExit as exc:
        code = exc.code
    finally:
        usage = {
            "self_kib": _vm_hwm_kib(),
            "children_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
        }
        out.write_text(json.dumps(usage))
    return code if isinstance(code, int) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
