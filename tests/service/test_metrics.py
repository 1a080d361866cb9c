"""The service's Prometheus metrics (``GET /metrics``, docs/design.md §6), without a server:
label values stay bounded, each app has its own registry, and the cache and queue
numbers are read at scrape time."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from clsp_positives.service.cache import CacheStats
from clsp_positives.service.metrics import ROUTES, ServiceMetrics, route_label


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
