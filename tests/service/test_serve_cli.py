"""``clsp serve`` as a user runs it: a subprocess on a free loopback port, real HTTP.

Every setting resolves as flag > ``CLSP_<FIELD>`` > default (docs/design.md §8);
the start-up log line ``settings: {...}`` shows what each one resolved to.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from clsp_positives.service.settings import ServiceSettings, env_var
from tests.support.servers import RedisServer, ServerProcess, free_port
from tests.support.service import anchors_u8, post_positives

PARAMS = {"steps": 2, "k": 1}
ENV = {
    "CLSP_MAX_BATCH": "7",
    "CLSP_MAX_ANCHORS": "3",
    "CLSP_REDIS_TIMEOUT_S": "0.7",  # a field that had no flag before
    "CLSP_WARMUP_STEPS": "1",
    "CLSP_LOG_LEVEL": "info",
    "CLSP_SAMPLING": "model",
}


def serve(model_dir: Path, env: dict[str, str], *flags: str) -> ServerProcess:
    port = free_port()
    cmd = [sys.executable, "-m", "clsp_positives.cli", "serve", "--model", str(model_dir)]
    cmd += ["--host", "127.0.0.1", "--port", str(port), *flags]
    return ServerProcess(cmd, port, health_path="/readyz", env=env)


def resolved(server: ServerProcess) -> dict:
    """The settings the process logged at start-up."""
    lines = [line for line in server.log().splitlines() if "settings: {" in line]
    assert len(lines) == 1, server.log()
    return json.loads(lines[0].split("settings: ", 1)[1])


@pytest.fixture(scope="module")
def from_env(tiny_model_dir: Path, own_redis: RedisServer) -> Iterator[ServerProcess]:
    """Every setting but the model, host and port from the environment."""
    with serve(tiny_model_dir, {**ENV, "CLSP_REDIS": own_redis.url}) as server:
        yield server


def test_variables_fill_what_the_flags_leave_out(from_env: ServerProcess, own_redis) -> None:
    settings = resolved(from_env)
    assert settings["max_batch"] == 7
    assert settings["max_anchors"] == 3
    assert settings["redis_timeout_s"] == 0.7
    assert settings["redis"] == own_redis.url
    assert settings["max_queue"] == ServiceSettings.model_fields["max_queue"].default
    assert settings["sampling"] == "model"


def test_sampling_from_the_environment_is_the_default_mode(from_env: ServerProcess) -> None:
    with httpx.Client(base_url=from_env.url, timeout=120, trust_env=False) as client:
        assert client.get("/v1/model").json()["sampling"] == "model"
        r, answer = post_positives(client, anchors_u8(1, seed=4), PARAMS)
        assert r.status_code == 200, r.text
        assert answer is not None and answer.params.sampling == "model"


def test_max_anchors_from_the_environment_answers_413(from_env: ServerProcess) -> None:
    with httpx.Client(base_url=from_env.url, timeout=120, trust_env=False) as client:
        r, _ = post_positives(client, anchors_u8(4, seed=1), PARAMS)
        assert r.status_code == 413, r.text
        assert r.json()["error"] == "too_many_anchors" and "limit is 3" in r.json()["detail"]
        assert client.get("/v1/model").json()["max_anchors"] == 3


def test_redis_from_the_environment_is_the_cache(from_env: ServerProcess, own_redis) -> None:
    own_redis.command("FLUSHALL")
    with httpx.Client(base_url=from_env.url, timeout=120, trust_env=False) as client:
        r, answer = post_positives(client, anchors_u8(2, seed=2), PARAMS)
        assert r.status_code == 200, r.text
        assert answer is not None and not answer.cache_hit.any()
    assert own_redis.command("DBSIZE").strip() == b":2"


def test_a_flag_wins_over_its_variable(tiny_model_dir: Path, own_redis: RedisServer) -> None:
    env = {**ENV, "CLSP_REDIS": own_redis.url}
    flags = ("--max-anchors", "5", "--max-batch", "9", "--sampling", "authors")
    with serve(tiny_model_dir, env, *flags) as server:
        settings = resolved(server)
        assert (settings["max_anchors"], settings["max_batch"]) == (5, 9)
        assert settings["sampling"] == "authors"  # the flag over CLSP_SAMPLING=model
        assert settings["redis_timeout_s"] == 0.7  # no flag given: still the variable
        with httpx.Client(base_url=server.url, timeout=120, trust_env=False) as client:
            r, answer = post_positives(client, anchors_u8(4, seed=3), PARAMS)
            assert r.status_code == 200, r.text
            assert answer is not None and answer.positives.shape[:2] == (4, 1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_from_the_environment_is_refused_on_a_cpu_machine(tiny_model_dir: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "clsp_positives.cli", "serve", "--model", str(tiny_model_dir)],
        env={**os.environ, "CLSP_DEVICE": "cuda", "CLSP_PORT": str(free_port())},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0
    assert "CUDA" in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_every_setting_has_a_flag_and_a_variable_in_help() -> None:
    from typer.testing import CliRunner

    from clsp_positives.cli import app

    result = CliRunner().invoke(app, ["serve", "--help"], env={"COLUMNS": "400"})
    text = " ".join(result.output.replace("│", " ").split())  # the help, unwrapped
    for name, field in ServiceSettings.model_fields.items():
        assert "--" + name.replace("_", "-") in text
        assert env_var(name) in text
        assert f"{field.description} (" in text, name
    assert "Most items in one sampler call. (default: 64; env CLSP_MAX_BATCH)" in text


@pytest.mark.slow
def test_compiled_service_warms_the_full_batch_and_serves_it(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """``--compile``: the warm-up compiles the single-item and the full-batch shapes, so
    a full batch afterwards runs without a cold call (docs/performance.md)."""
    env = {"CLSP_WARMUP_STEPS": "1", "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    with serve(tiny_model_dir, env, "--compile", "--max-batch", "4") as server:
        assert resolved(server)["compile"] is True
        client = httpx.Client(base_url=server.url, timeout=120)
        r, answer = post_positives(client, anchors_u8(2, seed=5), {"steps": 2, "k": 2})
        assert r.status_code == 200, r.text
        assert answer.positives.shape[:2] == (2, 2)
        metrics = client.get("/metrics").text
        client.close()
    cold = [line for line in metrics.splitlines() if line.startswith("clsp_sampler_cold_calls")]
    assert cold and float(cold[0].split()[-1]) == 0.0, cold


def test_metrics_port_serves_metrics_without_the_token_and_nothing_else(
    tiny_model_dir: Path,
) -> None:
    """``--metrics-port``: a scraper reads /metrics there without the token, the API
    stays behind it, and SIGTERM stops both ports. The process's own series come
    with the service's; a CPU generator exports no GPU series."""
    metrics_port = free_port()
    env = {"CLSP_WARMUP_STEPS": "1", "CLSP_API_TOKEN": "s3cret"}
    server = serve(tiny_model_dir, env, "--device", "cpu", "--metrics-port", str(metrics_port))
    with server:
        scrape = f"http://127.0.0.1:{metrics_port}"
        assert httpx.get(server.url + "/metrics", timeout=10).status_code == 401
        r = httpx.get(scrape + "/metrics", timeout=10)
        assert r.status_code == 200 and "clsp_queue_depth" in r.text
        series = {line.split("{")[0].split()[0] for line in r.text.splitlines() if line[:1] != "#"}
        assert {"process_cpu_seconds_total", "process_resident_memory_bytes"} <= series
        assert {"process_open_fds", "python_info"} <= series
        assert not [name for name in series if name.startswith("clsp_gpu_")]
        assert httpx.get(scrape + "/v1/model", timeout=10).status_code == 404
        assert resolved(server)["metrics_port"] == metrics_port
    # a clean stop on SIGTERM exits 0 (docs/reliability.md), the metrics port's too
    assert server.proc.returncode == 0, server.log()
    with pytest.raises(httpx.ConnectError):
        httpx.get(scrape + "/metrics", timeout=2)
