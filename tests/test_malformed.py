"""Malformed and hostile traffic: framing tricks, oversized heads, slow clients (raw sockets)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

import proxy.server
from tests.conftest import upstream_doc
from tests.fakeapi import fake_api


@pytest.fixture
async def daemon(tls_upstream: Any, start_daemon: Any, ca_file: Path) -> Any:
    upstream = await tls_upstream(fake_api())
    d = await start_daemon(
        {
            "upstreams": {"api": upstream_doc(upstream.url, ca_file)},
            "apps": {"app": {"upstreams": {"api": {"scopes": ["read", "write"]}}}},
            "limits": {"max_header_bytes": 4096},
        },
        {"key-read": "sk_read_malformed_0", "key-rw": "sk_rw_malformed_11"},
    )
    return upstream, d


async def exchange(d: Any, data: bytes, timeout: float = 5) -> bytes:
    host, port = d.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(data)
    await writer.drain()
    try:
        return await asyncio.wait_for(reader.read(65536), timeout)
    finally:
        writer.close()


def head(d: Any, lines: str, method: str = "POST", target: str = "/api/echo") -> bytes:
    port = d.url.rsplit(":", 1)[1]
    return (
        f"{method} {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Authorization: Bearer {d.tokens['app']}\r\n{lines}\r\n"
    ).encode()


@pytest.mark.parametrize(
    "lines",
    [
        "Content-Length: 5\r\nContent-Length: 6\r\n",
        "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
        "Transfer-Encoding: xchunked\r\n",
        "Transfer-Encoding: chunked, identity\r\n",
        "Transfer-Encoding : chunked\r\n",
        "Content-Length: +5\r\n",
        "X-Folded: a\r\n b\r\n",
        "X-Bare: a\rb\r\n",
        "X-Nul: a\x00b\r\n",
    ],
)
async def test_bad_framing_is_400_and_nothing_forwarded(daemon: Any, lines: str) -> None:
    """Conflicting or obfuscated framing, obs-fold, bare CR and NUL: 400, connection closed, nothing sent."""
    upstream, d = daemon
    answer = await exchange(d, head(d, lines) + b"hello")
    assert answer.split(b" ", 2)[1] == b"400", answer[:300]
    assert upstream.seen == []


async def test_oversized_request_line_is_414(daemon: Any) -> None:
    """A request line over max_header_bytes is 414 request_too_large."""
    upstream, d = daemon
    answer = await exchange(d, head(d, "", method="GET", target="/api/echo?" + "a" * 5000))
    assert answer.split(b" ", 2)[1] == b"414", answer[:300]
    assert b"request_too_large" in answer
    assert upstream.seen == []


async def test_oversized_header_is_431(daemon: Any) -> None:
    """A header over max_header_bytes is 431 request_too_large, and its bytes are not echoed."""
    upstream, d = daemon
    answer = await exchange(d, head(d, "X-Big: " + "s" * 5000 + "\r\n", method="GET"))
    assert answer.split(b" ", 2)[1] == b"431", answer[:300]
    assert b"sss" not in answer
    assert upstream.seen == []


async def test_slow_head_is_cut_off_while_others_flow(daemon: Any, monkeypatch: Any) -> None:
    """A client dribbling its request head is disconnected at the deadline; normal traffic keeps flowing."""
    monkeypatch.setattr(proxy.server, "HEAD_TIMEOUT", 0.5)
    _, d = daemon
    host, port = d.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"GET /api/echo HTTP/1.1\r\nHost: 127.0.0.1:" + port.encode() + b"\r\n")
    await writer.drain()
    start = time.monotonic()
    async with (
        aiohttp.ClientSession() as s,
        s.get(f"{d.url}/api/echo", headers={"Authorization": f"Bearer {d.tokens['app']}"}) as resp,
    ):
        assert resp.status == 200
    closed = False
    while time.monotonic() - start < 3:
        try:
            writer.write(b"X-Slow: 1\r\n")
            await writer.drain()
            data = await asyncio.wait_for(reader.read(100), 0.2)
            if data == b"":
                closed = True
                break
        except (ConnectionError, TimeoutError):
            if reader.at_eof() or writer.is_closing():
                closed = True
                break
    writer.close()
    assert closed
    assert time.monotonic() - start < 2.5


async def test_slow_head_after_a_served_request_is_cut_off(daemon: Any, monkeypatch: Any) -> None:
    """A kept-alive connection that served a request and then dribbles its next head is closed
    at that head's deadline (one timer per connection serves every request on it)."""
    monkeypatch.setattr(proxy.server, "HEAD_TIMEOUT", 0.6)
    _, d = daemon
    host, port = d.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(head(d, "", method="GET"))
    await writer.drain()
    first = await asyncio.wait_for(reader.read(65536), 5)
    assert first.startswith(b"HTTP/1.1 200"), first[:100]
    await asyncio.sleep(0.4)  # the first head's timer is still pending; the next starts later
    writer.write(b"GET /api/echo HTTP/1.1\r\nHost: 127.0.0.1:" + port.encode() + b"\r\n")
    await writer.drain()
    start = time.monotonic()
    closed_after = None
    while time.monotonic() - start < 3:
        try:
            writer.write(b"X-Slow: 1\r\n")
            await writer.drain()
            data = await asyncio.wait_for(reader.read(100), 0.05)
            if data == b"":
                closed_after = time.monotonic() - start
                break
        except (ConnectionError, TimeoutError):
            if reader.at_eof() or writer.is_closing():
                closed_after = time.monotonic() - start
                break
    writer.close()
    assert closed_after is not None
    # Cut at the second head's own deadline, not at the first one's (0.2 s from its start).
    assert 0.45 < closed_after < 1.5, closed_after
