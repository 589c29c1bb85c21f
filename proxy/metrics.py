"""Prometheus metrics of one daemon, in a registry of its own.

Labels carry app, upstream, status and credential NAMES only; a metric never
holds a secret or a request path (paths may carry identifiers and are unbounded).
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


class Latency:
    """One upstream's latency histogram, as plain numbers (see `Tallies`)."""

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(_BUCKETS) + 1)  # per bucket, not cumulative; the last is +Inf
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        # bisect_left: a value equal to a bound belongs to that bucket (le = "less or equal")
        self.counts[bisect_left(_BUCKETS, seconds)] += 1
        self.sum += seconds


class Tallies(Collector):
    """What every request counts, kept as plain ints and floats and read at scrape time.

    `credproxy_requests` and `credproxy_upstream_seconds` change on every request: a
    prometheus_client child would take a lock and a few calls each time. These are
    only ever touched on the event loop (requests and /metrics alike), so they need
    no lock; the registry turns them into the same families when /metrics is read.
    """

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, int], int] = {}
        self.created: dict[tuple[str, str, int], float] = {}  # `_created`, as a Counter child has
        self.latency: dict[str, Latency] = {}

    def count(self, app: str, upstream: str, status: int) -> None:
        key = (app, upstream, status)
        n = self.requests.get(key)
        if n is None:
            self.created[key] = time.time()
            n = 0
        self.requests[key] = n + 1

    def upstream(self, name: str) -> Latency:
        latency = self.latency.get(name)
        if latency is None:
            latency = self.latency[name] = Latency()
        return latency

    def describe(self) -> Iterator[Metric]:
        return self._families()

    def collect(self) -> Iterator[Metric]:
        return self._families()

    def _families(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "credproxy_requests",
            "Requests answered, by app, upstream and status.",
            labels=("app", "upstream", "status"),
        )
        for key, n in self.requests.items():
            app, upstream, status = key
            requests.add_metric((app, upstream, str(status)), n, created=self.created.get(key))
        yield requests
        seconds = HistogramMetricFamily(
            "credproxy_upstream_seconds",
            "Time from sending a request upstream to its response headers.",
            labels=("upstream",),
        )
        bounds = [repr(float(b)) for b in _BUCKETS] + ["+Inf"]  # as prometheus_client writes `le`
        for name, latency in self.latency.items():
            cumulative, total = [], 0
            for bound, n in zip(bounds, latency.counts, strict=True):
                total += n
                cumulative.append((bound, total))
            seconds.add_metric((name,), cumulative, latency.sum)
        yield seconds


class Metrics:
    """The daemon's counters, gauges and histograms."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        # credproxy_requests and credproxy_upstream_seconds
        self.tallies = Tallies()
        r.register(self.tallies)
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
