"""The upstream send slots: a burst reuses a few connections, open streams hold none.

A burst of requests (10,000 released from a 429 hold, say) would otherwise open one upstream
TLS connection each, up to the pool size. Requests waiting for the head of their answer are
bounded per upstream (proxy.forward.SENDING, made small here); a stream whose head has come
gives its slot back, so many open streams never block a new request. When the pool itself is
full of open streams, a new request is answered upstream_timeout after the connect wait.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import api_doc

KEY = "sk_slots_0123456789abcdef"


def _held_stream(release: asyncio.Event) -> Any:
    """A handler for an SSE stream: its head and a first event at once, the last event and
    the end once `release` is set."""

    async def stream(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b"data: first\n\n")
        await release.wait()
        await resp.write(b"data: last\n\n")
        await resp.write_eof()
        return resp

    return stream


async def test_a_burst_is_sent_over_at_most_the_slot_count_of_connections(
    tls_upstream: Any,
    start_daemon: Any,
    ca_file: Path,
    client: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("proxy.forward.SENDING", 4)
    busy = 0
    most = 0
    peers: set[Any] = set()

    async def slow(request: web.Request) -> web.Response:
        nonlocal busy, most
        peers.add(request.transport.get_extra_info("peername") if request.transport else None)
        busy += 1
        most = max(most, busy)
        await asyncio.sleep(0.05)
        busy -= 1
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_get("/v1/work", slow)
    upstream = await tls_upstream(app)
    d = await start_daemon(api_doc(upstream.url, ca_file), {"key-read": KEY})

    async def one() -> int:
        async with client.get(f"{d.url}/api/work", headers=d.auth()) as resp:
            await resp.read()
            return resp.status

    statuses = await asyncio.gather(*(one() for _ in range(40)))
    assert statuses == [200] * 40
    assert most <= 4, most
    assert most >= 2, "the slots did not let requests run side by side"
    assert len(peers) <= 4, peers


async def test_open_streams_hold_no_slot(
    tls_upstream: Any,
    start_daemon: Any,
    ca_file: Path,
    client: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With 2 slots, 6 streams stay open at once and a plain request still goes through."""
    monkeypatch.setattr("proxy.forward.SENDING", 2)
    release = asyncio.Event()

    async def plain(_request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_get("/v1/stream", _held_stream(release))
    app.router.add_get("/v1/plain", plain)
    upstream = await tls_upstream(app)
    d = await start_daemon(api_doc(upstream.url, ca_file), {"key-read": KEY})

    responses = []
    try:
        for _ in range(6):
            resp = await asyncio.wait_for(
                client.get(f"{d.url}/api/stream", headers=d.auth()), timeout=10
            )
            responses.append(resp)
            assert resp.status == 200
            assert (await resp.content.readuntil(b"\n\n")) == b"data: first\n\n"
        async with client.get(f"{d.url}/api/plain", headers=d.auth()) as resp:
            assert resp.status == 200
        release.set()
        for resp in responses:
            assert (await resp.content.read()) == b"data: last\n\n"
    finally:
        release.set()
        for resp in responses:
            resp.release()


async def test_a_pool_full_of_open_streams_answers_upstream_timeout(
    tls_upstream: Any, start_daemon: Any, ca_file: Path, client: aiohttp.ClientSession
) -> None:
    """Two connections, both held by open streams: a third request waits for a connection
    at most the connect wait (connect x 6) and is answered upstream_timeout."""
    release = asyncio.Event()

    app = web.Application()
    app.router.add_get("/v1/stream", _held_stream(release))
    upstream = await tls_upstream(app)
    d = await start_daemon(
        api_doc(upstream.url, ca_file, timeouts={"connect": 0.2}, retries={"max": 0}),
        {"key-read": KEY},
    )
    d.daemon.clients._pool_size = 2  # before the first request creates the pool
    streams = []
    try:
        for _ in range(2):
            resp = await asyncio.wait_for(client.get(f"{d.url}/api/stream", headers=d.auth()), 5)
            assert resp.status == 200
            streams.append(resp)
        loop = asyncio.get_running_loop()
        started = loop.time()
        async with client.get(f"{d.url}/api/stream", headers=d.auth()) as resp:
            assert resp.status == 504
            assert resp.headers["X-Credproxy-Error"] == "upstream_timeout"
        assert 1.0 <= loop.time() - started < 4.0  # 0.2 s x 6, no retry
    finally:
        release.set()
        for resp in streams:
            resp.release()
