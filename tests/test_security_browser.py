"""Browser and localhost attacks the guard must stop, over raw sockets (gaps left by test_guard).

A web page can make a browser send requests to 127.0.0.1 without an Origin header
(an <img>, a <script>, a top-level navigation), a rebinding DNS name can pose as
loopback, and a page can try to smuggle the app token somewhere other than a header.
None of it may reach the upstream, and no refusal may echo what the page sent.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest

from proxy.server import free_port
from tests.conftest import upstream_doc
from tests.fakeapi import fake_api
from tests.fuzz.harness import exchange, status_codes

KEYS = {"key-read": "sk_read_browser_000", "key-rw": "sk_rw_browser_1111"}


@pytest.fixture
async def daemon(tls_upstream: Any, start_daemon: Any, ca_file: Path) -> Any:
    """A daemon with `anonymous` allowed to read: the case where a page could spend a key."""
    upstream = await tls_upstream(fake_api())
    dedicated = free_port()
    d = await start_daemon(
        {
            "upstreams": {
                "api": upstream_doc(
                    upstream.url,
                    ca_file,
                    hosts=["api.example.test"],
                    listen=f"127.0.0.1:{dedicated}",
                )
            },
            "apps": {
                "anonymous": {"upstreams": {"api": {"scopes": ["read"]}}},
                "app": {"upstreams": {"api": {"scopes": ["read", "write"]}}},
            },
        },
        KEYS,
    )
    return upstream, d, int(d.url.rsplit(":", 1)[1]), dedicated


def _get(port: int, extra: str = "", target: str = "/api/echo", host: str | None = None) -> bytes:
    host = host or f"127.0.0.1:{port}"
    return (f"GET {target} HTTP/1.1\r\nHost: {host}\r\n{extra}Connection: close\r\n\r\n").encode()


def _body(answer: bytes) -> dict[str, Any]:
    return json.loads(answer.partition(b"\r\n\r\n")[2])  # type: ignore[no-any-return]


async def test_anonymous_works_for_local_programs(daemon: Any) -> None:
    """Control: a plain local request without a token is served by `anonymous` (so refusals below are the guard's)."""
    upstream, _, port, _ = daemon
    answer = await exchange(port, _get(port))
    assert status_codes(answer) == [200], answer[:200]
    assert len(upstream.seen) == 1


@pytest.mark.parametrize(
    "fetch_metadata",
    [
        # <img src="http://127.0.0.1:8787/api/..."> on an attacker's page: no Origin header at all
        "Sec-Fetch-Site: cross-site\r\nSec-Fetch-Mode: no-cors\r\nSec-Fetch-Dest: image\r\n",
        # a link or window.location to credproxy: a top-level navigation, no Origin either
        "Sec-Fetch-Site: cross-site\r\nSec-Fetch-Mode: navigate\r\nSec-Fetch-Dest: document\r\n",
        # a page on another loopback port (a dev server) is same-site with 127.0.0.1
        "Sec-Fetch-Site: same-site\r\nSec-Fetch-Mode: no-cors\r\nSec-Fetch-Dest: script\r\n",
        # a page served through credproxy itself (an upstream's HTML) fetching its own origin
        "Sec-Fetch-Site: same-origin\r\nSec-Fetch-Mode: cors\r\nSec-Fetch-Dest: empty\r\n",
    ],
)
async def test_browser_request_without_origin_is_refused(daemon: Any, fetch_metadata: str) -> None:
    """A browser request that carries no Origin (img, script, navigation) but Fetch Metadata is 403 and never forwarded."""
    upstream, _, port, dedicated = daemon
    for listener, target, host in (
        (port, "/api/echo", None),
        (dedicated, "/v1/echo", None),
        (port, "http://api.example.test/v1/echo", "api.example.test"),
    ):
        answer = await exchange(listener, _get(listener, fetch_metadata, target, host))
        assert status_codes(answer) == [403], answer[:200]
        assert b"access-control-" not in answer.lower()
    assert upstream.seen == []


async def test_typed_address_and_node_fetch_still_work(daemon: Any) -> None:
    """`Sec-Fetch-Site: none` (typed by the user) and a bare `Sec-Fetch-Mode` (Node's fetch) are not refused."""
    upstream, _, port, _ = daemon
    for extra in ("Sec-Fetch-Site: none\r\n", "Sec-Fetch-Mode: cors\r\n"):
        answer = await exchange(port, _get(port, extra))
        assert status_codes(answer) == [200], answer[:200]
    assert len(upstream.seen) == 2


@pytest.mark.parametrize(
    "host",
    [
        "localhost.:{port}",  # trailing dot: a different name to the resolver
        "127.1:{port}",  # short form that some resolvers map to 127.0.0.1
        "2130706433:{port}",  # 127.0.0.1 as one decimal number
        "0x7f000001:{port}",
        "[::ffff:127.0.0.1]:{port}",  # IPv4-mapped loopback
        "127.0.0.1.nip.io:{port}",  # public wildcard DNS that answers 127.0.0.1
        "localhost.evil.example:{port}",
        "evil.example:{port}",
    ],
)
async def test_rebinding_names_refused_on_every_listener(daemon: Any, host: str) -> None:
    """Names that may resolve to loopback but are not loopback literals are refused on the main and dedicated listeners."""
    upstream, d, port, dedicated = daemon
    token = f"Authorization: Bearer {d.tokens['app']}\r\n"
    for listener, target in ((port, "/api/echo"), (dedicated, "/v1/echo")):
        answer = await exchange(listener, _get(listener, token, target, host.format(port=listener)))
        assert status_codes(answer) in ([400], [403]), (host, answer[:200])
    assert upstream.seen == []


@pytest.mark.parametrize(
    "host",
    [
        "LOCALHOST:{port}",
        "Localhost:{port}",
        "[::1]:{port}",
        "127.0.0.2:{port}",
        "a.localhost:{port}",
    ],
)
async def test_loopback_spellings_accepted(daemon: Any, host: str) -> None:
    """Real loopback names (any case, ::1, 127/8, *.localhost) with the listener's port are accepted."""
    upstream, d, port, _ = daemon
    token = f"Authorization: Bearer {d.tokens['app']}\r\n"
    answer = await exchange(port, _get(port, token, host=host.format(port=port)))
    assert status_codes(answer) == [200], answer[:200]


async def test_host_refusals_do_not_echo_the_host(daemon: Any) -> None:
    """A refused Host header is not reflected in the error body (the page chose it)."""
    _, d, port, _ = daemon
    token = f"Authorization: Bearer {d.tokens['app']}\r\n"
    for host in (f"attacker-chosen-name.example:{port}", "127.0.0.1:7", "attacker-chosen-name"):
        answer = await exchange(port, _get(port, token, host=host))
        assert status_codes(answer) in ([400], [403]), answer[:200]
        assert b"attacker-chosen" not in answer
        assert host.encode() not in answer.partition(b"\r\n\r\n")[2]


async def test_private_network_preflight_on_dedicated_listener(daemon: Any) -> None:
    """A Private Network Access preflight to a dedicated listener is 403, grants nothing, and is never forwarded."""
    upstream, _, _, dedicated = daemon
    preflight = (
        f"OPTIONS /v1/echo HTTP/1.1\r\nHost: 127.0.0.1:{dedicated}\r\n"
        "Origin: https://evil.example\r\nAccess-Control-Request-Method: GET\r\n"
        "Access-Control-Request-Headers: authorization\r\n"
        "Access-Control-Request-Private-Network: true\r\nConnection: close\r\n\r\n"
    ).encode()
    answer = await exchange(dedicated, preflight)
    assert status_codes(answer) == [403]
    assert b"access-control-allow" not in answer.lower()
    assert upstream.seen == []


@pytest.mark.parametrize(
    "carrier",
    [
        "Proxy-Authorization: Bearer {token}\r\n",
        "Authorization: Basic {basic}\r\n",
        "Authorization: Token {token}\r\n",
        "Authorization: {token}\r\n",
        "Cookie: credproxy_token={token}; Authorization={token}\r\n",
        "X-Api-Key: {token}\r\n",
        "Referer: http://127.0.0.1/?access_token={token}\r\n",
    ],
)
async def test_app_token_counts_only_in_its_two_headers(
    tls_upstream: Any, start_daemon: Any, ca_file: Path, carrier: str
) -> None:
    """A valid app token anywhere but `Authorization: Bearer` or X-Credproxy-App-Token identifies nobody (401)."""
    upstream = await tls_upstream(fake_api())
    d = await start_daemon(
        {
            "upstreams": {"api": upstream_doc(upstream.url, ca_file)},
            "apps": {"app": {"upstreams": {"api": {"scopes": ["read"]}}}},
        },
        KEYS,
    )
    port = int(d.url.rsplit(":", 1)[1])
    token = d.tokens["app"]
    basic = base64.b64encode(f"{token}:".encode()).decode()
    extra = carrier.format(token=token, basic=basic)
    for target in ("/api/echo", f"/api/echo?access_token={token}", f"/api/{token}/echo"):
        answer = await exchange(port, _get(port, extra, target))
        assert status_codes(answer) == [401], (carrier, answer[:200])
        assert token.encode() not in answer
    body = f"access_token={token}".encode()
    post = (
        f"POST /api/echo HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        "Content-Type: application/x-www-form-urlencoded\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body
    answer = await exchange(port, post)
    assert status_codes(answer) == [401]
    assert upstream.seen == []
    assert _body(answer)["error"]["code"] == "unauthorized"


@pytest.mark.parametrize(
    ("method", "path", "headers"),
    [
        ("GET", "/status", "Host: evil.example:{port}\r\n"),
        ("GET", "/metrics", "Host: evil.example:{port}\r\n"),
        ("POST", "/reload", "Host: 127.0.0.1:{port}\r\nOrigin: https://evil.example\r\n"),
    ],
)
async def test_admin_listener_refuses_browsers(
    daemon: Any, method: str, path: str, headers: str
) -> None:
    """The admin listener, like the proxy listeners, refuses a rebinding Host and a browser Origin."""
    _, d, _, _ = daemon
    port = int(d.admin_url.rsplit(":", 1)[1])
    raw = (
        f"{method} {path} HTTP/1.1\r\n{headers.format(port=port)}"
        "Content-Length: 0\r\nConnection: close\r\n\r\n"
    ).encode()
    answer = await exchange(port, raw)
    assert status_codes(answer)[0] in (400, 403, 421), answer[:300]
