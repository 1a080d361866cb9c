"""``clsp serve`` as a child process on a free loopback port: what the demo and
``clsp diffusion train``'s closing calibration run their positives through, so that they
measure the very service users run (docs/training.md, "Choosing w: clsp calibrate").

The child gets its own process group, so that stopping it stops everything it started,
and Linux stops it when its parent dies, even by SIGKILL.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path


class LocalServiceError(RuntimeError):
    """The service exited or stayed unready; the message carries its log's tail."""


def _die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that has Linux send the child SIGTERM when the demo dies, even by
    SIGKILL (when no ``finally`` can run). Resolved before the fork: the child only calls
    a C function."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig, sigterm = 1, int(signal.SIGTERM)

    def set_parent_death_signal() -> None:
        prctl(pr_set_pdeathsig, sigterm)

    return set_parent_death_signal


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class ServiceProcess:
    """``clsp serve`` in its own process group, so that stopping it stops everything it
    started, and a Ctrl-C in the terminal reaches the demo first (which then stops it)."""

    def __init__(
        self,
        model_dir: Path,
        *,
        log_path: Path,
        device: str,
        threads: int,
        host: str = "127.0.0.1",
        port: int | None = None,
    ) -> None:
        self.model_dir = model_dir
        self.log_path = log_path
        self.device = device
        self.threads = threads
        self.host = host
        self.port = port or free_port(host)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "clsp_positives.cli",
            "serve",
            "--model",
            str(self.model_dir),
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--device",
            self.device,
            "--max-batch",
            "128",
            "--max-wait-ms",
            "20",
            "--log-level",
            "warning",
        ]

    def start(self, timeout_s: float = 300.0) -> ServiceProcess:
        env = {
            **os.environ,
            "OMP_NUM_THREADS": str(self.threads),
            "MKL_NUM_THREADS": str(self.threads),
            "HF_HUB_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1",
        }
        env.pop("CLSP_REDIS", None)  # the demo always uses the in-process cache
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                self.command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
                preexec_fn=_die_with_parent(),
            )
        self._wait_ready(timeout_s)
        return self

    def _wait_ready(self, timeout_s: float) -> None:
        import httpx

        assert self.proc is not None
        deadline = time.monotonic() + timeout_s
        with httpx.Client(timeout=2.0, trust_env=False) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise LocalServiceError(
                        f"the service exited with code {self.proc.returncode} "
                        f"before it was ready; its log:\n{self.log_tail()}"
                    )
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(self.url + "/readyz").status_code == 200:
                        return
                time.sleep(0.2)
        raise LocalServiceError(
            f"the service was not ready after {timeout_s:.0f} s; its log:\n{self.log_tail()}"
        )

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def metrics(self) -> dict[str, float]:
        """The service's Prometheus counters and gauges (samples without labels)."""
        import httpx
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(self.url + "/metrics", timeout=10.0, trust_env=False).text
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if not sample.labels:
                    out[sample.name] = float(sample.value)
        return out

    def stop(self, timeout_s: float = 20.0) -> int | None:
        """SIGTERM to the whole group (graceful), SIGKILL if it lingers; idempotent."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            for sig, wait in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 10.0)):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, sig)
                try:
                    proc.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        # Anything the service itself started is in its group too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        return proc.returncode
