"""Start, stop and kill real server processes on 127.0.0.1.

Tests talk to a real ``redis-server`` and a real uvicorn over loopback; these
helpers own the process lifecycles so that a failing test never leaves a
server behind.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import IO


def free_port() -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_until(check, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} before it was ready")
        if check():
            return
        time.sleep(0.05)
    raise TimeoutError(f"{what} was not ready after {timeout:.0f} s")


def _refuse_second_start(proc: subprocess.Popen | None, what: str) -> None:
    """One helper owns one process: a second start while the first still runs would
    orphan the first (nothing stops it any more) and leave it running after the suite."""
    if proc is not None and proc.poll() is None:
        raise RuntimeError(
            f"{what} is already running (pid {proc.pid}): stop() or kill() it before "
            "starting it again (`with helper:` starts it; do not also call start())"
        )


class RedisServer:
    """A throwaway redis-server: no persistence, LRU eviction, loopback only."""

    def __init__(
        self, port: int | None = None, maxmemory: str = "256mb", args: Sequence[str] = ()
    ) -> None:
        """``args`` are more ``redis-server`` options (a cluster node's, say)."""
        self.binary = shutil.which("redis-server")
        if self.binary is None:
            raise RuntimeError(
                "redis-server is not installed: run `make test` (it installs "
                "Debian's redis-server) or `apt-get install -y redis-server`"
            )
        self.port = port or free_port()
        self.maxmemory = maxmemory
        self.args = list(args)
        self.proc: subprocess.Popen | None = None
        self.workdir = tempfile.mkdtemp(prefix="clsp-redis-")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        """Start it, or start it again after ``kill()``/``stop()``; never a second copy."""
        _refuse_second_start(self.proc, f"redis-server on port {self.port}")
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.workdir,
                "--maxmemory",
                self.maxmemory,
                "--maxmemory-policy",
                "allkeys-lru",
                "--protected-mode",
                "no",
                *self.args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _wait_until(self.ping, timeout, f"redis-server on port {self.port}", self.proc)
        return self

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def command(self, *args: str) -> bytes:
        """Send one inline command and return the raw first reply chunk."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
            s.sendall((" ".join(args) + "\r\n").encode())
            return s.recv(1 << 16)

    def kill(self) -> None:
        """SIGKILL, as a crashed Redis would die."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


class RedisCluster:
    """A throwaway Redis Cluster of ``masters`` masters and no replicas, each a
    ``RedisServer`` on loopback with its ``nodes-PORT.conf`` in one folder, so that a
    killed master started again rejoins with its slots (docs/deployment.md).

    Masters keep serving their own slots while another is down
    (``cluster-require-full-coverage no``, as docs/deployment.md advises)."""

    def __init__(self, masters: int = 3) -> None:
        self.cli = shutil.which("redis-cli")
        if self.cli is None:
            raise RuntimeError(
                "redis-cli is not installed: run `make system-tools` (it installs "
                "Debian's redis-tools) or `apt-get install -y redis-tools`"
            )
        self.confdir = tempfile.mkdtemp(prefix="clsp-redis-cluster-")
        self.nodes = [self._node(free_port()) for _ in range(masters)]

    def _node(self, port: int) -> RedisServer:
        conf = os.path.join(self.confdir, f"nodes-{port}.conf")
        args = ["--cluster-enabled", "yes", "--cluster-config-file", conf]
        # The bus port is its own free port: the default, port + 10000, may be taken
        # or past 65535 for a port the OS picked.
        args += ["--cluster-port", str(free_port()), "--cluster-require-full-coverage", "no"]
        return RedisServer(port, args=args)

    @property
    def url(self) -> str:
        """The service's ``--redis``: one node, the client finds the others."""
        return f"redis+cluster://127.0.0.1:{self.nodes[0].port}"

    def start(self, timeout: float = 30.0) -> RedisCluster:
        """Start every node, make them one cluster, wait until each says it is ok."""
        try:
            for node in self.nodes:
                node.start()
            addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
            create = [self.cli, "--cluster", "create", *addresses]
            subprocess.run(
                [*create, "--cluster-replicas", "0", "--cluster-yes"],
                check=True,
                capture_output=True,
                timeout=timeout,
            )
            self.wait_ok(timeout)
        except Exception:
            self.close()
            raise
        return self

    def ok(self) -> bool:
        """Every node runs and says ``cluster_state:ok``."""
        try:
            return all(b"cluster_state:ok" in n.command("CLUSTER", "INFO") for n in self.nodes)
        except OSError:
            return False

    def wait_ok(self, timeout: float = 30.0) -> None:
        _wait_until(self.ok, timeout, "redis cluster")

    def restart(self, index: int, timeout: float = 30.0) -> None:
        """Start a killed or stopped node again from its nodes.conf (empty: no
        persistence) and wait for the cluster to be ok."""
        self.nodes[index].start(timeout)
        self.wait_ok(timeout)

    def close(self) -> None:
        for node in self.nodes:
            node.close()
        shutil.rmtree(self.confdir, ignore_errors=True)


class ServerProcess:
    """Any HTTP server command in a subprocess, ready once ``health_path`` answers 200."""

    def __init__(
        self,
        cmd: Sequence[str],
        port: int,
        *,
        health_path: str = "/healthz",
        env: dict[str, str] | None = None,
        log_path: Path | None = None,
        start_timeout: float = 120.0,
    ) -> None:
        self.cmd = list(cmd)
        self.start_timeout = start_timeout
        self.port = port
        self.health_path = health_path
        self.env = {**os.environ, **(env or {})}
        self.log_path = log_path or Path(tempfile.mkstemp(prefix="clsp-server-", suffix=".log")[1])
        self.proc: subprocess.Popen | None = None
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float | None = None) -> ServerProcess:
        """Start it, or start it again after ``kill()``/``stop()``; never a second copy.

        ``timeout`` defaults to ``start_timeout``, the one the ``with`` form uses.
        """
        _refuse_second_start(self.proc, f"server {' '.join(self.cmd[:4])}...")
        self._close_log()
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            self.cmd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=self.env,
            start_new_session=True,
        )
        try:
            _wait_until(
                self._healthy,
                self.start_timeout if timeout is None else timeout,
                f"server {' '.join(self.cmd[:4])}...",
                self.proc,
            )
        except Exception as exc:
            self.stop()
            raise RuntimeError(f"{exc}; its log:\n{self.log()}") from None
        return self

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + self.health_path, timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-20000:]

    def kill(self) -> None:
        """SIGKILL the whole process group, as a crashed generator would die."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 20.0) -> int | None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._close_log()
        return self.proc.returncode if self.proc else None

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> ServerProcess:
        """Starts the server (with ``start_timeout``): write ``with ServerProcess(...)``,
        not ``with ServerProcess(...).start()``, which would start it twice."""
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def uvicorn_app(
    factory: str,
    *,
    port: int | None = None,
    env: dict[str, str] | None = None,
    health_path: str = "/healthz",
) -> ServerProcess:
    """A uvicorn app factory (``module:function``) on 127.0.0.1 and a free port."""
    port = port or free_port()
    cmd = [
        sys.executable,
        "-m",
        "uvicorn",
        "--factory",
        factory,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "warning",
    ]
    return ServerProcess(cmd, port, health_path=health_path, env=env)
