"""Lifecycle: SIGTERM drains requests in flight, a second signal exits at once."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp

from tests.conftest import DaemonProcess, start_user_daemon, upstream_doc
from tests.fakeapi import fake_api


async def _daemon(
    tmp_path: Path, tls_upstream: Any, ca_file: Path, procs: list[DaemonProcess], grace: str = "10s"
) -> tuple[DaemonProcess, str, dict[str, str]]:
    upstream = await tls_upstream(fake_api())
    doc = {
        "shutdown_grace": grace,
        "upstreams": {"api": upstream_doc(upstream.url, ca_file)},
        "apps": {"app": {"upstreams": {"api": {"scopes": ["read"]}}}},
    }
    secrets = {name: f"sk_{name}_lifecycle0" for name in ("key-read", "key-rw")}
    d = await start_user_daemon(tmp_path, procs, doc, secrets)
    return d.proc, d.url, d.auth()


async def test_sigterm_drains_streams_in_flight(
    tmp_path, tls_upstream, ca_file, daemon_procs
) -> None:
    """A stream in flight at SIGTERM runs to its end; new connections are refused; exit 0."""
    proc, url, auth = await _daemon(tmp_path, tls_upstream, ca_file, daemon_procs)
    events = 0
    async with (
        aiohttp.ClientSession() as s,
        s.get(f"{url}/api/sse?n=5&interval=0.3", headers=auth) as resp,
    ):
        assert resp.status == 200
        first = await resp.content.readuntil(b"\n\n")
        events += 1
        proc.proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.3)
        try:
            async with (
                aiohttp.ClientSession() as other,
                other.get(f"{url}/api/echo", headers=auth),
            ):
                refused = False
        except aiohttp.ClientConnectionError:
            refused = True
        async for chunk in resp.content.iter_any():
            events += chunk.count(b"\n\n")
    assert first.startswith(b"data: event 0")
    assert events == 5
    assert refused
    code = await asyncio.to_thread(proc.proc.wait, 10)
    assert code == 0
    assert "Traceback" not in proc.log()


async def test_second_signal_exits_at_once(tmp_path, tls_upstream, ca_file, daemon_procs) -> None:
    """While draining a long stream, a second SIGTERM ends the daemon immediately."""
    proc, url, auth = await _daemon(tmp_path, tls_upstream, ca_file, daemon_procs, grace="60s")
    async with (
        aiohttp.ClientSession() as s,
        s.get(f"{url}/api/sse?n=100&interval=0.5", headers=auth) as resp,
    ):
        await resp.content.readuntil(b"\n\n")
        proc.proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.5)
        assert proc.proc.poll() is None  # still draining
        start = time.monotonic()
        proc.proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(proc.proc.wait, 5)
    assert time.monotonic() - start < 2
    assert code == 1
    assert "second stop signal" in proc.log()


async def test_a_request_before_the_listener_is_registered_is_served(
    tls_upstream: Any, start_daemon: Any, ca_file: Path, monkeypatch: Any
) -> None:
    """The socket accepts as soon as it is bound: a request that arrives before the daemon
    has registered the listener is served like any other, not answered 500."""
    import proxy.server

    real = proxy.server.start_site
    early: list[tuple[int, str]] = []

    async def start_then_request(address: Any, handler: Any, **kw: Any) -> Any:
        runner = await real(address, handler, **kw)
        if not isinstance(handler, aiohttp.web.Application):  # a proxy listener
            async with (
                aiohttp.ClientSession(trust_env=False) as session,
                session.get(f"http://{address}/api/thing") as resp,
            ):
                early.append((resp.status, resp.headers.get("X-Credproxy-Error", "")))
        return runner

    monkeypatch.setattr(proxy.server, "start_site", start_then_request)
    upstream = await tls_upstream(fake_api())
    doc = {
        "upstreams": {"api": upstream_doc(upstream.url, ca_file)},
        "apps": {"app": {"upstreams": {"api": {"scopes": ["read"]}}}},
    }
    await start_daemon(doc, {"key-read": "sk_read_0123456789abcdef"})
    assert early == [(401, "unauthorized")], early  # no app token: the pipeline's answer
