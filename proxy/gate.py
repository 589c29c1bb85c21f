"""One rate-limit gate (a `Limiter`) per upstream credential, kept across reloads.

The gates outlive config versions: a reload re-sizes budgets and queues but keeps
what was spent, the holds in force and every waiting request. /status and
/metrics read their state from here. In fleet mode each gate draws on a budget
shared through Redis (proxy/fleet.py).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from .config import Config, UpstreamConfig
from .metrics import Metrics
from .ratelimit import Limiter

if TYPE_CHECKING:
    from .fleet import Fleet

log = logging.getLogger("credproxy")


class Gates:
    """Limiters by (upstream, credential name)."""

    def __init__(self, metrics: Metrics, fleet: Fleet | None = None) -> None:
        self._metrics = metrics
        self._fleet = fleet
        self._limiters: dict[tuple[str, str], Limiter] = {}

    def limiter(self, upstream_name: str, credential: str, upstream: UpstreamConfig) -> Limiter:
        key = (upstream_name, credential)
        limiter = self._limiters.get(key)
        if limiter is None:
            holds = self._metrics.holds.labels(upstream_name)
            budget = None
            if self._fleet is not None:
                budget = self._fleet.budget(upstream_name, credential, upstream.rate_limit)
            limiter = Limiter(
                f"{upstream_name}/{credential}",
                upstream.rate_limit,
                upstream.queue,
                on_hold=lambda _seconds: holds.inc(),
                budget=budget,
            )
            self._limiters[key] = limiter
        return limiter

    def sync(self, config: Config) -> None:
        """Apply a reloaded config; forget idle gates of upstreams that are gone."""
        if self._fleet is not None:
            self._fleet.sync(config)
        elif config.state is not None and config.state.backend != "memory":
            log.warning("config: changes under `state:` take effect at the next restart")
        for (name, credential), limiter in list(self._limiters.items()):
            upstream = config.upstreams.get(name)
            if upstream is None:
                if limiter.depth == 0:
                    del self._limiters[(name, credential)]
                continue
            limiter.reconfigure(upstream.rate_limit, upstream.queue)

    def credential_state(self, upstream: str, credential: str) -> dict[str, Any] | None:
        limiter = self._limiters.get((upstream, credential))
        return limiter.snapshot() if limiter is not None else None

    def upstream_state(self, name: str, upstream: UpstreamConfig) -> dict[str, Any]:
        """The upstream-level view SPEC's /status shows: summed queue, latest hold, tightest budget."""
        limiters = [lim for (up, _c), lim in self._limiters.items() if up == name]
        holds = [lim.hold_until for lim in limiters if lim.hold_until is not None]
        budgets = [lim.snapshot()["rate_limit"] for lim in limiters]
        known = [b for b in budgets if b["remaining"] is not None]
        tightest = min(known, key=lambda b: b["remaining"]) if known else None
        return {
            "queue": {
                "depth": sum(lim.depth for lim in limiters),
                "max_size": upstream.queue.max_size,
            },
            "hold_until": max(holds) if holds else None,
            "rate_limit": tightest,
        }

    def update_metrics(self) -> None:
        depth: dict[str, int] = {}
        for (name, _credential), limiter in self._limiters.items():
            depth[name] = depth.get(name, 0) + limiter.depth
        for name, value in depth.items():
            self._metrics.queue_depth.labels(name).set(value)
