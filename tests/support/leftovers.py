"""Find the processes a test run started and left running.

A server a test forgets to stop keeps its port, its CPU and its memory after the
suite, and the next run on a two-core machine crawls or fails for a reason that
is nowhere in its own output. ``tests/conftest.py`` calls these at the end of
the session, after every fixture has been finalized, and fails the run if
anything is left.

Two ways to recognise "ours": a descendant of the pytest process, and any
process whose environment carries this session's marker. The second also finds
a process whose parent died first (it was re-parented to init and is no longer
a descendant), e.g. a ``clsp serve`` left by a demo killed with SIGKILL.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid

import psutil

MARKER = "CLSP_TEST_SESSION"

# Started by the interpreter itself, not by a test, and gone when pytest exits:
# multiprocessing's resource tracker / forkserver and torch.compile's worker pool.
INTERPRETER_HELPERS = (
    "multiprocessing.resource_tracker",
    "multiprocessing.forkserver",
    "torch._inductor.compile_worker",
    "_inductor/compile_worker",
)


def mark_session() -> str:
    """Put a token unique to this run in the environment every child inherits."""
    token = f"{os.getpid()}-{uuid.uuid4().hex}"
    os.environ[MARKER] = token
    return token


def _carries(proc: psutil.Process, token: str) -> bool:
    try:
        return proc.environ().get(MARKER) == token
    except (psutil.Error, OSError):  # gone, or another user's process
        return False


def _command(proc: psutil.Process) -> str:
    try:
        return " ".join(proc.cmdline()) or proc.name()
    except psutil.Error:
        return "?"


def _interpreter_helper(proc: psutil.Process, root: psutil.Process) -> bool:
    try:
        parent = proc.ppid()
    except psutil.Error:
        return False
    command = _command(proc)
    return parent == root.pid and any(h in command for h in INTERPRETER_HELPERS)


def running(proc: psutil.Process) -> bool:
    """Alive and not a zombie (a zombie has exited; only its parent's wait is missing)."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def started_processes(token: str, root: psutil.Process | None = None) -> list[psutil.Process]:
    """Every running process this session started, except the interpreter's own helpers."""
    root = root or psutil.Process()
    try:
        found = {p.pid: p for p in root.children(recursive=True)}
    except psutil.Error:
        found = {}
    for proc in psutil.process_iter():
        if proc.pid not in found and proc.pid != root.pid and _carries(proc, token):
            found[proc.pid] = proc
    return [
        p
        for p in sorted(found.values(), key=lambda p: p.pid)
        if running(p) and not _interpreter_helper(p, root)
    ]


def leftovers(
    token: str, *, grace_s: float = 5.0, root: psutil.Process | None = None
) -> list[psutil.Process]:
    """The started processes still running after ``grace_s``: one that a teardown has
    just signalled may still be flushing its log or closing its sockets."""
    procs = started_processes(token, root)
    deadline = time.monotonic() + grace_s
    while procs and time.monotonic() < deadline:
        time.sleep(0.1)
        procs = [p for p in procs if running(p)]
    return procs


def describe(proc: psutil.Process) -> str:
    return f"pid {proc.pid}: {_command(proc)}"


def kill(procs: list[psutil.Process]) -> None:
    """SIGKILL what was reported, so that one bad run does not slow down the next."""
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(procs, timeout=5)
