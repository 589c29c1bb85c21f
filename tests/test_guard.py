"""Browser and localhost attacks: DNS rebinding, web-page origins, Host tricks (raw sockets)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import upstream_doc
from tests.fakeapi import fake_api


@pytest.fixture
async def daemon(tls_upstream: Any, start_daemon: Any, ca_file: Path) -> Any:
    upstream = await tls_upstream(fake_api())
    d = await start_daemon(
        {
            "upstreams": {"api": upstream_doc(upstream.url, ca_file, hosts=["api.example.test"])},
            "apps": {"app": {"upstreams": {"api": {"scopes": ["read", "write"]}}}},
        },
        {"key-read": "sk_read_guard_00000", "key-rw": "sk_rw_guard_111111"},
    )
    return upstream, d


async def raw(d: Any, request: bytes) -> bytes:
    host, port = d.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(request)
    await writer.drain()
    try:
        return await asyncio.wait_for(reader.read(65536), 5)
    finally:
        writer.close()


def _req(d: Any, host_lines: str, target: str = "/api/echo", extra: str = "") -> bytes:
    return (
        f"GET {target} HTTP/1.1\r\n{host_lines}"
        f"Authorization: Bearer {d.tokens['app']}\r\n{extra}Connection: close\r\n\r\n"
    ).encode()


@pytest.mark.parametrize(
    ("host", "status"),
    [
        ("127.0.0.1:{port}", b"200"),
        ("localhost:{port}", b"200"),
        ("evil.example:{port}", b"403"),  # DNS rebinding
        ("127.0.0.1:1", b"403"),  # not this listener
        ("127.0.0.1", b"403"),  # port 80 is not this listener
        ("bad host:{port}", b"400"),
        ("[::1:{port}", b"400"),
    ],
)
async def test_host_allow_list(daemon: Any, host: str, status: bytes) -> None:
    """Only loopback names with this listener's port pass; a rebinding name is 403, junk 400."""
    upstream, d = daemon
    port = d.url.rsplit(":", 1)[1]
    answer = await raw(d, _req(d, f"Host: {host.format(port=port)}\r\n"))
    assert answer.split(b" ", 2)[1] == status, answer[:200]
    if status != b"200":
        assert upstream.seen == []


async def test_missing_or_duplicate_host(daemon: Any) -> None:
    """No Host, or two of them: 400 and nothing forwarded."""
    upstream, d = daemon
    port = d.url.rsplit(":", 1)[1]
    two = f"Host: 127.0.0.1:{port}\r\nHost: evil.example:{port}\r\n"
    for lines in ("", two):
        answer = await raw(d, _req(d, lines))
        assert answer.split(b" ", 2)[1] == b"400", answer[:200]
    assert upstream.seen == []


async def test_browser_origin_refused(daemon: Any) -> None:
    """A request carrying an Origin header (a web page) is 403, with no CORS header in reply."""
    upstream, d = daemon
    port = d.url.rsplit(":", 1)[1]
    for extra in (
        "Origin: https://evil.example\r\n",
        "Origin: null\r\n",
        "Origin: http://127.0.0.1:3000\r\n",
    ):
        answer = await raw(d, _req(d, f"Host: 127.0.0.1:{port}\r\n", extra=extra))
        assert answer.startswith(b"HTTP/1.1 403"), answer[:200]
        assert b"access-control-" not in answer.lower()
    preflight = (
        f"OPTIONS /api/echo HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        "Origin: https://evil.example\r\nAccess-Control-Request-Method: POST\r\n"
        "Access-Control-Request-Private-Network: true\r\nConnection: close\r\n\r\n"
    ).encode()
    answer = await raw(d, preflight)
    assert answer.startswith(b"HTTP/1.1 403")
    assert b"access-control-" not in answer.lower()
    assert upstream.seen == []


async def test_forward_proxy_host_must_match_uri(daemon: Any) -> None:
    """In forward-proxy form the Host header must agree with the absolute URI."""
    upstream, d = daemon
    ok = await raw(
        d, _req(d, "Host: api.example.test\r\n", target="http://api.example.test/v1/echo")
    )
    assert ok.startswith(b"HTTP/1.1 200"), ok[:200]
    bad = await raw(d, _req(d, "Host: evil.example\r\n", target="http://api.example.test/v1/echo"))
    assert bad.startswith(b"HTTP/1.1 400")
    assert len(upstream.seen) == 1


@pytest.mark.parametrize(
    "target",
    [
        "http://api.example.test@evil.example/v1/echo",
        "http://evil.example/v1/echo",
        "//evil.example/v1/echo",
        "/api/http://evil.example/v1",
        "/api/%2F%2Fevil.example/x",
        "/api/..%2F..%2Fx",
        "/api/%252e%252e/x",
    ],
)
async def test_destination_is_fixed_by_configuration(daemon: Any, target: str) -> None:
    """No request target can make credproxy connect anywhere but the configured origin."""
    upstream, d = daemon
    port = d.url.rsplit(":", 1)[1]
    host = target.split("/")[2] if target.startswith("http://") else f"127.0.0.1:{port}"
    answer = await raw(d, _req(d, f"Host: {host}\r\n", target=target))
    status = answer.split(b" ", 2)[1]
    # either refused, or served by the one configured upstream (never elsewhere)
    assert status in (b"400", b"403", b"404", b"200"), answer[:200]
    for request in upstream.seen:
        assert request.path.startswith("/v1/")
