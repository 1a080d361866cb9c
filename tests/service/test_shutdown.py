"""``clsp serve`` stopping as Kubernetes stops it: SIGTERM, then SIGKILL after the grace
period (docs/reliability.md, Shutdown; docs/deployment.md).

A real ``clsp serve`` subprocess on a loopback port. A signal during the warm-up's
compile stops the process within seconds, never having said ready; a signal after
ready finishes the work in flight; either way the process exits 0.
"""

from __future__ import annotations

import signal
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import httpx
import pytest

from tests.service.test_serve_cli import serve
from tests.support.servers import ServerProcess
from tests.support.service import anchors_u8, post_positives, scrape

STOPS_WITHIN_S = 20.0
"""Generous: the service waits 2 s for the warm-up's sampler call, then exits."""


class ReadinessWatch:
    """Polls /readyz in a thread and keeps every status it answered."""

    def __init__(self, url: str) -> None:
        self.url = url + "/readyz"
        self.statuses: list[int] = []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._done.is_set():
            try:
                with urllib.request.urlopen(self.url, timeout=1) as r:
                    self.statuses.append(r.status)
            except urllib.error.HTTPError as exc:
                self.statuses.append(exc.code)
            except OSError:
                pass  # not listening (yet, or any more)
            time.sleep(0.05)

    def close(self) -> list[int]:
        self._done.set()
        self._thread.join(5)
        return self.statuses


def stop_and_time(server: ServerProcess, sig: signal.Signals) -> tuple[int, float]:
    """Send ``sig`` and wait for the exit: its code and the seconds it took."""
    assert server.proc is not None
    t0 = time.monotonic()
    server.proc.send_signal(sig)
    code = server.proc.wait(60)
    return code, time.monotonic() - t0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_during_the_compile_stops_the_server_unready_and_exits_0(
    tiny_model_dir: Path, tmp_path: Path, sig: signal.Signals
) -> None:
    """A fresh inductor cache makes the warm-up compile (tens of seconds on a CPU); the
    signal lands in it, yet the process is gone within seconds, exit 0, and /readyz
    never answered 200 in between."""
    env = {"CLSP_WARMUP_STEPS": "1", "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    server = serve(tiny_model_dir, env, "--compile", "--device", "cpu", "--max-batch", "4")
    server.health_path = "/healthz"  # up, not ready: the warm-up is under way
    with server:
        watch = ReadinessWatch(server.url)
        r = httpx.get(server.url + "/readyz", timeout=10)
        assert r.status_code == 503 and "warming up" in r.json()["detail"], r.text
        time.sleep(1.0)  # well into the first compile
        code, seconds = stop_and_time(server, sig)
        statuses = watch.close()
    log = server.log()
    assert code == 0, log
    assert seconds < STOPS_WITHIN_S, log
    assert 503 in statuses and 200 not in statuses, statuses
    assert "ready: model" not in log and "Traceback" not in log, log


def test_a_sigterm_after_ready_finishes_in_flight_work_and_exits_0(tiny_model_dir: Path) -> None:
    """Ready, one request served, one more in flight when SIGTERM comes: it is answered,
    the process exits 0 (not killed by the signal uvicorn would re-raise)."""
    server = serve(tiny_model_dir, {"CLSP_WARMUP_STEPS": "1"}, "--device", "cpu")
    with server, httpx.Client(base_url=server.url, timeout=60, trust_env=False) as client:
        r, _ = post_positives(client, anchors_u8(2, seed=30), {"steps": 2, "k": 1})
        assert r.status_code == 200, r.text
        answers: list[httpx.Response] = []
        slow = threading.Thread(
            target=lambda: answers.append(
                post_positives(client, anchors_u8(4, seed=31), {"steps": 200, "k": 1})[0]
            )
        )
        slow.start()
        while not scrape(server.url).get("clsp_items_in_flight"):
            assert slow.is_alive(), answers  # it must still be waiting for its items
            time.sleep(0.01)
        code, seconds = stop_and_time(server, signal.SIGTERM)
        slow.join(30)
    log = server.log()
    assert code == 0, log
    assert seconds < STOPS_WITHIN_S, log
    assert answers and answers[0].status_code == 200, (answers, log)
    assert "stopped: in-flight batches finished" in log, log
