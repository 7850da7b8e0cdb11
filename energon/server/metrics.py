"""Prometheus metrics of a served Engine (prometheus_client), one registry per server.

Counters and histograms are fed by the Frontend as requests pass; queue depth, running sequences,
KV-block use, health, preemptions and the recovery counters (worker failures, restarts, retried
requests) are read from `engine.stats()` when /metrics is scraped, so nothing polls.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

# Seconds. Tiny CPU runs sit at the low end, big models on GPUs at the high end.
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
HEALTH_STATES = ("ok", "degraded", "failed", "stopped")  # Engine.health


class EngineCollector:
    """Reads the scheduler's gauges at scrape time."""

    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        stats = self.engine.stats()
        used = stats.get("num_used_blocks", 0)
        total = used + stats.get("num_free_blocks", 0)
        gauges = (
            (
                "energon_queue_depth",
                "Requests waiting to be scheduled",
                stats.get("num_waiting", 0),
            ),
            (
                "energon_running_sequences",
                "Sequences holding KV blocks",
                stats.get("num_running", 0),
            ),
            (
                "energon_steps_in_flight",
                "Engine steps sent and not answered",
                stats.get("steps_in_flight", 0),
            ),
            ("energon_kv_blocks_used", "KV-cache blocks in use", used),
            ("energon_kv_blocks_total", "KV-cache blocks in all", total),
            (
                "energon_kv_block_usage",
                "Fraction of KV-cache blocks in use",
                used / total if total else 0.0,
            ),
        )
        for name, doc, value in gauges:
            yield GaugeMetricFamily(name, doc, value=value)
        counters = (
            ("energon_worker_restarts", "Restarts of the worker group after a failure", "restarts"),
            ("energon_worker_failures", "Failures of the serving worker group", "worker_failures"),
            (
                "energon_worker_restart_failures",
                "Restarts of the worker group that failed (each is retried, up to max_restarts)",
                "restart_failures",
            ),
            (
                "energon_retried_requests",
                "Requests run again after a worker failure (retry_on_failure)",
                "retried_requests",
            ),
            (
                "energon_preemptions",
                "Sequences preempted for KV blocks, to be recomputed (see kv_reserve)",
                "num_preemptions",
            ),
            (
                "energon_prefix_cache_hit_tokens",
                "Tokens admitted requests found in the prefix cache (not computed again)",
                "prefix_cache_hit_tokens",
            ),
            (
                "energon_prefix_cache_queried_tokens",
                "Tokens of the admitted requests (recomputes too) looked up in the prefix cache",
                "prefix_cache_queried_tokens",
            ),
        )
        for name, doc, key in counters:
            yield CounterMetricFamily(name, doc, value=stats.get(key, 0))
        health = GaugeMetricFamily(
            "energon_health", "1 for the Engine's current state, 0 for the others", labels=["state"]
        )
        for state in HEALTH_STATES:
            health.add_metric([state], 1.0 if stats.get("health") == state else 0.0)
        yield health

    def describe(self):
        return []  # unknown until the engine starts; describe nothing so registration is lazy-safe


class Metrics:
    """All metrics of one server. `render()` gives the exposition text and its content type."""

    def __init__(self, engine=None, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "energon_requests",
            "Requests answered, by door and outcome (ok, aborted, invalid, unauthorized, "
            "too_large, overloaded, unavailable, error)",
            ["door", "outcome"],
            registry=r,
        )
        self.prompt_tokens = Counter("energon_prompt_tokens", "Prompt tokens admitted", registry=r)
        self.generation_tokens = Counter(
            "energon_generation_tokens", "Tokens generated", registry=r
        )
        self.in_flight = Gauge(
            "energon_requests_in_flight", "Requests admitted and not yet answered", registry=r
        )
        self.time_to_first_token = Histogram(
            "energon_time_to_first_token_seconds",
            "From a request's arrival at the door to its first generated token",
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.time_per_output_token = Histogram(
            "energon_time_per_output_token_seconds",
            "Mean time between a request's generated tokens after the first",
            buckets=TPOT_BUCKETS,
            registry=r,
        )
        if engine is not None:
            r.register(EngineCollector(engine))

    def count(self, door: str, outcome: str) -> None:
        self.requests.labels(door=door, outcome=outcome).inc()

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition of every metric, and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
