"""The admin listener: liveness, readiness, Prometheus metrics, /status, never a secret."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import upstream_doc
from tests.fakeapi import fake_api

KEYS = {"key-read": "sk_read_admin_test_0000", "key-rw": "sk_rw_admin_test_1111"}


async def _daemon(tls_upstream: Any, start_daemon: Any, ca_file: Path) -> Any:
    upstream = await tls_upstream(fake_api())
    up = upstream_doc(upstream.url, ca_file)
    up["credentials"].append({"name": "not-stored", "scopes": ["admin"]})
    return await start_daemon(
        {
            "upstreams": {"api": up},
            "apps": {
                "app": {"upstreams": {"api": {"scopes": ["read"]}}},
                "idle": {"upstreams": {"api": {"scopes": ["read"]}}},
            },
        },
        KEYS,
    )


async def test_health_and_ready(tls_upstream, start_daemon, ca_file, client) -> None:
    """/healthz answers alive; /readyz is 200 with config and store usable, 503 with reasons when not."""
    d = await _daemon(tls_upstream, start_daemon, ca_file)
    async with client.get(f"{d.admin_url}/healthz") as resp:
        assert resp.status == 200
    async with client.get(f"{d.admin_url}/readyz") as resp:
        assert resp.status == 200
        assert (await resp.json())["ready"] is True
    d.store.path.write_bytes(b"garbage" * 1000)
    async with client.get(f"{d.admin_url}/readyz") as resp:
        assert resp.status == 503
        doc = await resp.json()
    assert doc["ready"] is False
    assert any(str(d.store.path) in reason for reason in doc["reasons"])


async def test_metrics_parse_and_count(tls_upstream, start_daemon, ca_file, client) -> None:
    """/metrics is valid Prometheus text with per-app request counters and the latency histogram."""
    d = await _daemon(tls_upstream, start_daemon, ca_file)
    for _ in range(3):
        async with client.get(f"{d.url}/api/echo", headers=d.auth("app")) as resp:
            assert resp.status == 200
    async with client.post(f"{d.url}/api/echo", headers=d.auth("app")) as resp:
        assert resp.status == 403
    async with client.get(f"{d.admin_url}/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = await resp.text()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    requests = {
        (s.labels["app"], s.labels["upstream"], s.labels["status"]): s.value
        for s in families["credproxy_requests"].samples
        if s.name == "credproxy_requests_total"
    }
    assert requests[("app", "api", "200")] == 3
    assert requests[("app", "api", "403")] == 1
    assert "credproxy_upstream_seconds" in families
    assert "credproxy_config_reloads" in families
    for secret in KEYS.values():
        assert secret not in text


async def test_status_shape(tls_upstream, start_daemon, ca_file, client) -> None:
    """/status has SPEC's shape: version, config, upstreams with queue and credential states, apps."""
    d = await _daemon(tls_upstream, start_daemon, ca_file)
    async with client.get(f"{d.admin_url}/status") as resp:
        doc = await resp.json()
        raw = await resp.text()
    assert doc["version"] == "0.1.0"
    assert doc["config"]["path"] == str(d.config_path)
    assert isinstance(doc["config"]["loaded_at"], float)
    api = doc["upstreams"]["api"]
    assert api["queue"]["max_size"] == 1000
    assert "hold_until" in api
    creds = api["credentials"]
    assert creds["key-read"] == {"state": "ok", "expires_at": None}
    assert creds["not-stored"]["state"] == "missing"
    assert doc["apps"]["app"]["tokens"] == 1
    for secret in [*KEYS.values(), *d.tokens.values()]:
        assert secret not in raw


async def test_admin_is_not_the_proxy(tls_upstream, start_daemon, ca_file) -> None:
    """The admin listener does not forward anything: proxy paths there are 404."""
    d = await _daemon(tls_upstream, start_daemon, ca_file)
    async with (
        aiohttp.ClientSession() as s,
        s.get(f"{d.admin_url}/api/echo", headers=d.auth("app")) as resp,
    ):
        assert resp.status == 404
