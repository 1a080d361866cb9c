"""Runnable examples in the docs: fenced blocks marked ``# <marker>: NAME``."""

from __future__ import annotations

import re
from pathlib import Path

DOCUMENTED_URL = "http://localhost:8000"
"""Where the examples say the service is; a test points them at its own."""


def doc_example(path: Path, name: str, marker: str, *, service: bool = True) -> str:
    """The body of the one fenced block of ``path`` marked ``# {marker}: {name}``;
    ``service``: the block talks to the service (at ``DOCUMENTED_URL``)."""
    text = path.read_text()
    found = [
        body
        for body in re.findall(r"^```[a-z]*\n(.*?)^```", text, flags=re.S | re.M)
        if re.search(rf"^# {re.escape(marker)}: {re.escape(name)}$", body, flags=re.M)
    ]
    assert len(found) == 1, f"{path.name} needs exactly one block marked '# {marker}: {name}'"
    if service:
        assert DOCUMENTED_URL in found[0], f"the {name} example should talk to {DOCUMENTED_URL}"
    return found[0]


def run_example(script: str, url: str, cwd: Path, *, shell: bool = False) -> str:
    """Run an example (Python, or bash with ``shell``) against the service at ``url``;
    its stdout, after asserting it succeeded."""
    import subprocess
    import sys

    script = script.replace(DOCUMENTED_URL, url)
    cmd = ["bash", "-euo", "pipefail", "-c", script] if shell else [sys.executable, "-c", script]
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    return done.stdout
