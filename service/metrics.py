"""Prometheus metrics of one service instance.

Every app gets its own ``CollectorRegistry``, so several apps in one process
(tests, an embedded service beside a trainer) never clash over metric names.
Cache counters are read from the cache's own ``CacheStats`` at scrape time
rather than mirrored, so the two can never drift apart. The registry also
carries what the default one would (the process's CPU, memory and file
descriptors, the interpreter), and on a CUDA generator the GPU's memory and
utilisation, read at scrape time too (docs/deployment.md, "Metrics and
autoscaling").
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from clsp_positives.service.cache import CacheStats

log = logging.getLogger(__name__)

ROUTES = (
    "/v1/positives",
    "/positives",
    "/v1/model",
    "/healthz",
    "/readyz",
    "/metrics",
    "/docs",
    "/openapi.json",
)

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 512, 1024)


def route_label(path: str) -> str:
    """The route a path belongs to; anything else is ``other`` (bounded label values)."""
    return path if path in ROUTES else "other"


class _CacheCollector(Collector):
    def __init__(self, stats: Callable[[], CacheStats]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        s = self._stats()
        for name, value, doc in (
            ("clsp_cache_hits", s.hits, "Positives served from the cache."),
            ("clsp_cache_misses", s.misses, "Lookups that found nothing usable."),
            ("clsp_cache_errors", s.errors, "Failed cache calls (Redis down or slow)."),
            (
                "clsp_cache_skipped",
                s.skipped,
                "Keys not looked up or written while the cache backs off after an error.",
            ),
            (
                "clsp_cache_corrupt",
                s.corrupt,
                "Cached values refused (layout or MAC failed), served as misses.",
            ),
            (
                "clsp_cache_untrusted",
                s.untrusted,
                "Refused values that were well-formed but failed their MAC: copied from "
                "another key, forged, or written with another cache secret.",
            ),
            ("clsp_cache_writes", s.writes, "Positives written to the cache."),
        ):
            family = CounterMetricFamily(name, doc)
            family.add_metric([], value)
            yield family


@dataclass(frozen=True)
class CudaFigures:
    """One reading of the generator's GPU, taken at scrape time."""

    allocated_bytes: int
    """Bytes of live tensors (``torch.cuda.memory_allocated``)."""
    reserved_bytes: int
    """Bytes the caching allocator holds, live or kept for reuse (``memory_reserved``)."""
    utilization: float | None
    """Fraction of NVML's last sample period in which a kernel ran; None where NVML
    cannot be read (no nvidia-ml-py, no driver library in the container)."""


def cuda_reader(device: str) -> Callable[[], CudaFigures]:
    """The reading of ``device`` through torch, imported when first read: a scrape
    happens in a running service, which has torch loaded for its generator, while
    importing this module must stay torch-free."""
    said = False

    def read() -> CudaFigures:
        nonlocal said
        import torch

        allocated = int(torch.cuda.memory_allocated(device))
        reserved = int(torch.cuda.memory_reserved(device))
        try:
            utilization: float | None = torch.cuda.utilization(device) / 100.0
        except Exception as exc:  # ModuleNotFoundError without nvidia-ml-py, NVML errors
            utilization = None
            if not said:
                said = True
                log.info("no GPU utilisation in /metrics (%s); memory is still exported", exc)
        return CudaFigures(allocated, reserved, utilization)

    return read


class _CudaCollector(Collector):
    def __init__(self, device: str, read: Callable[[], CudaFigures]) -> None:
        self._device = device
        self._read = read
        self._warned = False

    def collect(self) -> Iterator[Metric]:
        try:
            figures = self._read()
        except Exception as exc:
            # A failing GPU reading must not fail the scrape: the queue depth the
            # autoscaler reads comes in the same response.
            if not self._warned:
                self._warned = True
                log.warning("cannot read %s for /metrics: %r", self._device, exc)
            return
        rows: list[tuple[str, float | None, str]] = [
            (
                "clsp_gpu_memory_allocated_bytes",
                figures.allocated_bytes,
                "Bytes of tensors PyTorch holds on the generator's GPU "
                "(torch.cuda.memory_allocated).",
            ),
            (
                "clsp_gpu_memory_reserved_bytes",
                figures.reserved_bytes,
                "Bytes PyTorch's caching allocator holds on the GPU, in use or cached for "
                "reuse (torch.cuda.memory_reserved): what no other process can have.",
            ),
            (
                "clsp_gpu_utilization_ratio",
                figures.utilization,
                "Fraction of NVML's last sample period (1/6 to 1 s) in which a kernel ran "
                "on the GPU (torch.cuda.utilization / 100); absent without nvidia-ml-py.",
            ),
        ]
        for name, value, doc in rows:
            if value is None:
                continue
            family = GaugeMetricFamily(name, doc, labels=["device"])
            family.add_metric([self._device], value)
            yield family


class ServiceMetrics:
    """The service's metrics, in a registry of their own."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "clsp_requests", "HTTP requests by route and status.", ["route", "status"], registry=r
        )
        self.latency = Histogram(
            "clsp_request_seconds",
            "HTTP request latency by route.",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge("clsp_queue_depth", "Items waiting for the sampler.", registry=r)
        self.in_flight = Gauge(
            "clsp_items_in_flight", "Items queued or in the sampler.", registry=r
        )
        self.batch_size = Histogram(
            "clsp_batch_size", "Items per sampler call.", buckets=_BATCH_BUCKETS, registry=r
        )
        self.sampler_seconds = Histogram(
            "clsp_sampler_seconds",
            "Seconds per sampler call.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.sampler_errors = Counter(
            "clsp_sampler_errors", "Sampler calls that raised.", registry=r
        )
        self.cold_calls = Counter(
            "clsp_sampler_cold_calls",
            "Sampler calls for requests that ran a path the warm-up had not run, so "
            "paid for its lazy initialisation or compilation; should stay 0.",
            registry=r,
        )
        self.generated = Counter(
            "clsp_positives_generated", "Positives the sampler made.", registry=r
        )
        self.served = Counter("clsp_positives_served", "Positives returned to clients.", registry=r)
        self.deduplicated = Counter(
            "clsp_deduplicated_items",
            "Items that shared a generation already in flight.",
            registry=r,
        )
        self.dropped = Counter(
            "clsp_dropped_items", "Queued items dropped because their client went away.", registry=r
        )
        self.expired = Counter(
            "clsp_deadline_expired_items",
            "Positives answered as expired: their request's deadline_ms passed before a "
            "sampler call took them (never generated for that request, never cached).",
            registry=r,
        )
        self.expired_dropped = Counter(
            "clsp_deadline_dropped_items",
            "Queued items dropped unrun because every request wanting them had passed its "
            "deadline: sampler work saved.",
            registry=r,
        )
        self.rejected = Counter(
            "clsp_rejected_requests",
            "Requests refused with 429 because the queue was full.",
            registry=r,
        )
        # What the default registry carries, in this one: process_* (CPU seconds,
        # resident and virtual memory, open and maximum file descriptors, start
        # time), python_info and python_gc_*. A registry that has them already
        # (the global one, passed in) keeps its own.
        for collector in (ProcessCollector, PlatformCollector, GCCollector):
            with contextlib.suppress(ValueError):  # duplicated timeseries
                collector(registry=r)

    def watch_cache(self, stats: Callable[[], CacheStats]) -> None:
        """Export the cache's counters (read at every scrape)."""
        self.registry.register(_CacheCollector(stats))

    def watch_queue(self, depth: Callable[[], float], in_flight: Callable[[], float]) -> None:
        """Export the batcher's queue depth and in-flight items (read at every scrape)."""
        self.queue_depth.set_function(depth)
        self.in_flight.set_function(in_flight)

    def watch_device(self, device: object, read: Callable[[], CudaFigures] | None = None) -> bool:
        """Export the GPU's memory and utilisation (read at every scrape) when the
        generator runs on CUDA; a CPU generator exports no GPU series at all rather
        than zeros. ``read`` replaces the torch reading (tests). Returns whether the
        GPU is watched."""
        name = str(device)
        if name.partition(":")[0] != "cuda":
            return False
        self.registry.register(_CudaCollector(name, read or cuda_reader(name)))
        return True

    def render(self) -> tuple[bytes, str]:
        """(body, content type) of the Prometheus text exposition."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
