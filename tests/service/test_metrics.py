"""The service's Prometheus metrics (``GET /metrics``, docs/design.md §6), without a server:
label values stay bounded, each app has its own registry, and the cache, queue,
process and GPU numbers are read at scrape time."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

import pytest
import torch
from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from clsp_positives.service.cache import CacheStats
from clsp_positives.service.metrics import (
    ROUTES,
    CudaFigures,
    ServiceMetrics,
    cuda_reader,
    route_label,
)


def scrape(metrics: ServiceMetrics) -> dict[str, float]:
    """``name{label=value,...}`` -> value, from the rendered exposition."""
    body, _ = metrics.render()
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return out


@pytest.mark.parametrize("route", ROUTES)
def test_a_known_route_is_its_own_label(route: str) -> None:
    assert route_label(route) == route


@pytest.mark.parametrize(
    "path",
    ["/", "/v1/positives/", "/v1/positives/extra", "/HEALTHZ", "/metrics?x=1", "/wp-login.php"],
)
def test_any_other_path_is_other(path: str) -> None:
    """A scanner's random paths must not each create a time series."""
    assert route_label(path) == "other"


def test_render_is_the_prometheus_text_format_with_every_metric_documented() -> None:
    metrics = ServiceMetrics()
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain; version=")
    families = list(text_string_to_metric_families(body.decode()))
    names = {f.name for f in families}
    for name in (
        "clsp_requests",
        "clsp_request_seconds",
        "clsp_queue_depth",
        "clsp_items_in_flight",
        "clsp_batch_size",
        "clsp_sampler_seconds",
        "clsp_sampler_errors",
        "clsp_sampler_cold_calls",
        "clsp_positives_generated",
        "clsp_positives_served",
        "clsp_deduplicated_items",
        "clsp_dropped_items",
        "clsp_rejected_requests",
    ):
        assert name in names, sorted(names)
    assert all(f.documentation.strip() for f in families)


def test_two_instances_in_one_process_neither_clash_nor_share_counts() -> None:
    first, second = ServiceMetrics(), ServiceMetrics()
    first.requests.labels(route="/v1/model", status="200").inc(3)
    first.generated.inc(8)
    second.requests.labels(route="/v1/model", status="200").inc()
    one, two = scrape(first), scrape(second)
    assert one["clsp_requests_total{route=/v1/model,status=200}"] == 3
    assert two["clsp_requests_total{route=/v1/model,status=200}"] == 1
    assert one["clsp_positives_generated_total"] == 8
    assert two["clsp_positives_generated_total"] == 0


def test_cache_counters_are_read_from_the_cache_at_every_scrape() -> None:
    stats = CacheStats()
    metrics = ServiceMetrics()
    metrics.watch_cache(lambda: stats)
    assert scrape(metrics)["clsp_cache_hits_total"] == 0
    stats.hits, stats.misses, stats.errors = 5, 2, 1
    stats.skipped, stats.corrupt, stats.untrusted, stats.writes = 4, 3, 2, 7
    now = scrape(metrics)
    names = ("hits", "misses", "errors", "skipped", "corrupt", "untrusted", "writes")
    assert {name: now[f"clsp_cache_{name}_total"] for name in names} == {
        "hits": 5, "misses": 2, "errors": 1, "skipped": 4, "corrupt": 3, "untrusted": 2,
        "writes": 7,
    }  # fmt: skip


def test_cache_stats_replaced_by_a_new_object_are_followed() -> None:
    """The callable is asked each time: a cache that swaps its stats object is still seen."""
    holder = {"stats": CacheStats(hits=1)}
    metrics = ServiceMetrics()
    metrics.watch_cache(lambda: holder["stats"])
    holder["stats"] = CacheStats(hits=9)
    assert scrape(metrics)["clsp_cache_hits_total"] == 9


def test_queue_gauges_are_read_at_every_scrape() -> None:
    queue = {"depth": 0.0, "in_flight": 0.0}
    metrics = ServiceMetrics()
    metrics.watch_queue(lambda: queue["depth"], lambda: queue["in_flight"])
    assert scrape(metrics)["clsp_queue_depth"] == 0
    queue.update(depth=12, in_flight=20)
    now = scrape(metrics)
    assert (now["clsp_queue_depth"], now["clsp_items_in_flight"]) == (12, 20)


def test_histograms_count_their_observations_in_buckets() -> None:
    metrics = ServiceMetrics()
    for size in (1, 16, 16, 300):
        metrics.batch_size.observe(size)
    metrics.latency.labels(route="/v1/positives").observe(0.2)
    now = scrape(metrics)
    assert now["clsp_batch_size_count"] == 4
    assert now["clsp_batch_size_bucket{le=16.0}"] == 3
    assert now["clsp_batch_size_bucket{le=256.0}"] == 3
    assert now["clsp_batch_size_bucket{le=512.0}"] == 4
    assert now["clsp_request_seconds_bucket{le=0.1,route=/v1/positives}"] == 0
    assert now["clsp_request_seconds_bucket{le=0.25,route=/v1/positives}"] == 1


# --- the process and the GPU ------------------------------------------------------


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="process_* reads /proc")
def test_the_process_is_exported_and_read_at_every_scrape() -> None:
    metrics = ServiceMetrics()
    before = scrape(metrics)
    assert before["process_resident_memory_bytes"] > 0
    assert before["process_cpu_seconds_total"] > 0
    assert before["process_max_fds"] >= before["process_open_fds"] > 0
    assert any(name.startswith("python_info{") for name in before)
    with ExitStack() as stack:
        for _ in range(8):
            stack.enter_context(tempfile.TemporaryFile())
        assert scrape(metrics)["process_open_fds"] >= before["process_open_fds"] + 8


def test_a_registry_that_has_the_process_collectors_keeps_its_own() -> None:
    """A registry passed in (the global one, say) may carry them already: no clash."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    metrics = ServiceMetrics(registry)
    assert "process_cpu_seconds_total" in scrape(metrics)


@pytest.mark.parametrize("device", ["cpu", torch.device("cpu")])
def test_a_cpu_generator_exports_no_gpu_series(device: object) -> None:
    metrics = ServiceMetrics()
    assert metrics.watch_device(device, read=lambda: CudaFigures(1, 2, 0.5)) is False
    assert not [name for name in scrape(metrics) if name.startswith("clsp_gpu_")]


def test_gpu_figures_are_read_at_every_scrape() -> None:
    """The reading is injected: the collector's path runs without a GPU."""
    reading = {"now": CudaFigures(allocated_bytes=1000, reserved_bytes=4096, utilization=0.25)}
    metrics = ServiceMetrics()
    assert metrics.watch_device(torch.device("cuda", 1), read=lambda: reading["now"]) is True
    first = scrape(metrics)
    assert first["clsp_gpu_memory_allocated_bytes{device=cuda:1}"] == 1000
    assert first["clsp_gpu_memory_reserved_bytes{device=cuda:1}"] == 4096
    assert first["clsp_gpu_utilization_ratio{device=cuda:1}"] == 0.25
    reading["now"] = CudaFigures(allocated_bytes=3000, reserved_bytes=8192, utilization=None)
    now = scrape(metrics)
    assert now["clsp_gpu_memory_allocated_bytes{device=cuda:1}"] == 3000
    assert now["clsp_gpu_memory_reserved_bytes{device=cuda:1}"] == 8192
    # NVML unreadable: no utilisation series (not a made-up 0), memory still there.
    assert not [name for name in now if name.startswith("clsp_gpu_utilization")]
    body, _ = metrics.render()
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    assert families["clsp_gpu_memory_reserved_bytes"].type == "gauge"
    assert families["clsp_gpu_memory_reserved_bytes"].documentation


def test_a_failing_gpu_reading_leaves_the_rest_of_the_scrape(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The autoscaler's queue depth comes in the same response as the GPU's figures."""

    def broken() -> CudaFigures:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    metrics = ServiceMetrics()
    metrics.watch_queue(lambda: 7, lambda: 9)
    metrics.watch_device("cuda", read=broken)
    with caplog.at_level(logging.WARNING, logger="clsp_positives.service.metrics"):
        for _ in range(3):
            now = scrape(metrics)
            assert now["clsp_queue_depth"] == 7
            assert not [name for name in now if name.startswith("clsp_gpu_")]
    assert len([r for r in caplog.records if "cannot read cuda" in r.getMessage()]) == 1


def test_the_torch_reading_skips_what_it_cannot_read() -> None:
    """The real reader: memory from torch, utilisation only where NVML answers
    (without a GPU, or without nvidia-ml-py, it is None and the series is skipped)."""
    figures = cuda_reader("cuda")()
    assert 0 <= figures.allocated_bytes <= figures.reserved_bytes
    if not torch.cuda.is_available():
        assert figures == CudaFigures(0, 0, None)
    elif figures.utilization is not None:
        assert 0.0 <= figures.utilization <= 1.0


def test_importing_the_metrics_does_not_import_torch() -> None:
    """The GPU reader imports torch when it reads; the module itself stays torch-free."""
    code = (
        "import sys, clsp_positives.service.metrics as m; "
        "m.ServiceMetrics().watch_device('cuda', read=None); "
        "sys.exit('torch' in sys.modules)"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSTARTUP"}
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 0, proc.stderr or "torch was imported"
