"""Prometheus metrics of one daemon, in a registry of its own.

Labels carry app, upstream, status and credential NAMES only; a metric never
holds a secret or a request path (paths may carry identifiers and are unbounded).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


class Metrics:
    """The daemon's counters, gauges and histograms."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "credproxy_requests",
            "Requests answered, by app, upstream and status.",
            ("app", "upstream", "status"),
            registry=r,
        )
        self.upstream_seconds = Histogram(
            "credproxy_upstream_seconds",
            "Time from sending a request upstream to its response headers.",
            ("upstream",),
            buckets=_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "credproxy_queue_depth", "Requests waiting per upstream.", ("upstream",), registry=r
        )
        self.queue_wait = Histogram(
            "credproxy_queue_wait_seconds",
            "Time a request waited for budget or a hold before being sent.",
            ("upstream",),
            buckets=(0.001, 0.01, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
            registry=r,
        )
        self.retries = Counter(
            "credproxy_retries",
            "Requests sent again, by reason: 429 (after the hold), 401 (after a refresh), "
            "5xx, or connect (never reached the server).",
            ("upstream", "reason"),
            registry=r,
        )
        self.holds = Counter(
            "credproxy_holds",
            "Holds started after a 429 or Remaining 0.",
            ("upstream",),
            registry=r,
        )
        self.token_refreshes = Counter(
            "credproxy_token_refreshes",
            "OAuth token refreshes by credential and result.",
            ("credential", "result"),
            registry=r,
        )
        self.config_reloads = Counter(
            "credproxy_config_reloads", "Config reloads by result.", ("result",), registry=r
        )
        self.config_reloads.labels("ok")
        self.config_reloads.labels("failed")

    def render(self) -> bytes:
        return generate_latest(self.registry)
