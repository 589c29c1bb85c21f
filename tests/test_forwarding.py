"""The forwarding path: injection in all three addressing modes, TLS, streaming, hygiene."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp
import trustme
from aiohttp import web

from proxy.server import free_port
from tests.conftest import api_doc
from tests.fakeapi import GZIP_BODY, fake_api

READ_KEY = "sk_read_0123456789abcdef"
RW_KEY = "sk_rw_fedcba9876543210"
SECRETS = {"key-read": READ_KEY, "key-rw": RW_KEY}


async def _setup(tls_upstream: Any, start_daemon: Any, ca_file: Path, **up: Any) -> Any:
    upstream = await tls_upstream(fake_api())
    running = await start_daemon(api_doc(upstream.url, ca_file, **up), SECRETS)
    return upstream, running


async def test_path_prefix_injects_least_privileged_key(
    tls_upstream, start_daemon, ca_file, client
):
    """GET via /<upstream>/<rest> reaches base_url/<rest> with the read-only key, query intact."""
    upstream, d = await _setup(tls_upstream, start_daemon, ca_file)
    async with client.get(f"{d.url}/api/echo?limit=5&x=a%20b", headers=d.auth()) as resp:
        assert resp.status == 200
        doc = await resp.json()
    assert doc["path"] == "/v1/echo?limit=5&x=a%20b"
    assert doc["headers"]["authorization"] == [f"Bearer {READ_KEY}"]
    assert doc["headers"]["host"] == [upstream.url.removeprefix("https://")]


async def test_write_uses_the_key_that_covers_write(tls_upstream, start_daemon, ca_file, client):
    """POST needs the write scope, so the read-write key is injected and the body arrives."""
    _, d = await _setup(tls_upstream, start_daemon, ca_file)
    async with client.post(f"{d.url}/api/echo", headers=d.auth(), data=b'{"a":1}') as resp:
        doc = await resp.json()
    assert doc["headers"]["authorization"] == [f"Bearer {RW_KEY}"]
    assert doc["body"] == '{"a":1}'


async def test_dedicated_listener_keeps_the_path_whole(tls_upstream, start_daemon, ca_file, client):
    """A per-upstream listener stands in for the origin: /v1/... goes to origin/v1/..."""
    port = free_port()
    _, d = await _setup(tls_upstream, start_daemon, ca_file, listen=f"127.0.0.1:{port}")
    async with client.get(f"http://127.0.0.1:{port}/v1/echo?q=1", headers=d.auth()) as resp:
        doc = await resp.json()
    assert doc["path"] == "/v1/echo?q=1"
    assert doc["headers"]["authorization"] == [f"Bearer {READ_KEY}"]


async def test_dedicated_listener_refuses_paths_outside_base(
    tls_upstream, start_daemon, ca_file, client
):
    """A path outside base_url's path on a dedicated listener is 403 and never sent."""
    port = free_port()
    upstream, d = await _setup(tls_upstream, start_daemon, ca_file, listen=f"127.0.0.1:{port}")
    for path in ("/other/x", "/v1/../other/x", "/v10/echo"):
        async with client.get(f"http://127.0.0.1:{port}{path}", headers=d.auth()) as resp:
            assert resp.status in (400, 403), path
            assert resp.headers["X-Credproxy-Error"] in ("forbidden", "bad_request")
    assert upstream.seen == []


async def test_forward_proxy_form_goes_to_the_configured_origin(
    tls_upstream, start_daemon, ca_file, client
):
    """With HTTP_PROXY set, http://api.example.test/v1/... is sent over HTTPS to base_url's origin."""
    upstream, d = await _setup(tls_upstream, start_daemon, ca_file, hosts=["api.example.test"])
    async with client.get(
        "http://api.example.test/v1/echo?z=9", proxy=d.url, headers=d.auth()
    ) as resp:
        assert resp.status == 200
        doc = await resp.json()
    assert doc["path"] == "/v1/echo?z=9"
    assert doc["headers"]["authorization"] == [f"Bearer {READ_KEY}"]
    assert len(upstream.seen) == 1


async def test_forward_proxy_refuses_unknown_hosts(tls_upstream, start_daemon, ca_file, client):
    """credproxy is never an open proxy: an unconfigured host is 403 unknown_upstream."""
    upstream, d = await _setup(tls_upstream, start_daemon, ca_file, hosts=["api.example.test"])
    async with client.get(
        "http://evil.example.test/v1/echo", proxy=d.url, headers=d.auth()
    ) as resp:
        assert resp.status == 403
        assert resp.headers["X-Credproxy-Error"] == "unknown_upstream"
        doc = await resp.json()
    assert doc["error"]["code"] == "unknown_upstream"
    assert upstream.seen == []


async def test_connect_is_refused(tls_upstream, start_daemon, ca_file):
    """CONNECT tunnels get 405 method_not_allowed."""
    _, d = await _setup(tls_upstream, start_daemon, ca_file, hosts=["api.example.test"])
    host, port = d.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"CONNECT api.example.test:443 HTTP/1.1\r\nHost: api.example.test:443\r\n\r\n")
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    writer.close()
    assert head.startswith(b"HTTP/1.1 405")
    assert b"X-Credproxy-Error: method_not_allowed" in head


async def test_app_authorization_never_forwarded(tls_upstream, start_daemon, ca_file, client):
    """The app token (in either header) and any Proxy-Authorization stay on this machine."""
    upstream, d = await _setup(tls_upstream, start_daemon, ca_file)
    token = d.tokens["app"]
    headers = {
        "X-Credproxy-App-Token": token,
        "Authorization": "Bearer sk_app_own_key_should_vanish",
        "Proxy-Authorization": "Basic dXNlcjpwYXNz",
    }
    async with client.get(f"{d.url}/api/echo", headers=headers) as resp:
        doc = await resp.json()
    hdrs = doc["headers"]
    assert hdrs["authorization"] == [f"Bearer {READ_KEY}"]
    assert "proxy-authorization" not in hdrs
    assert "x-credproxy-app-token" not in hdrs
    assert token not in str(hdrs)


async def test_hop_by_hop_and_connection_named_headers_dropped(
    tls_upstream, start_daemon, ca_file, client
):
    """Hop-by-hop headers and those named in Connection are not forwarded; Authorization survives."""
    _, d = await _setup(tls_upstream, start_daemon, ca_file)
    headers = {
        **d.auth(),
        "Connection": "keep-alive, X-Secret-Hop, Authorization",
        "X-Secret-Hop": "1",
        "Keep-Alive": "timeout=5",
        "TE": "trailers",
        "X-HTTP-Method-Override": "DELETE",
        "X-Kept": "yes",
    }
    async with client.get(f"{d.url}/api/echo", headers=headers) as resp:
        doc = await resp.json()
    hdrs = doc["headers"]
    for gone in ("x-secret-hop", "keep-alive", "te", "x-http-method-override"):
        assert gone not in hdrs, gone
    assert hdrs["x-kept"] == ["yes"]
    assert hdrs["authorization"] == [f"Bearer {READ_KEY}"]


async def test_custom_auth_header(tls_upstream, start_daemon, ca_file, client):
    """An x-api-key style upstream gets the key in its own header with no prefix, and no Authorization."""
    _, d = await _setup(
        tls_upstream, start_daemon, ca_file, auth_header={"name": "x-api-key", "prefix": ""}
    )
    async with client.get(
        f"{d.url}/api/echo", headers={**d.auth(), "x-api-key": "app-supplied"}
    ) as resp:
        doc = await resp.json()
    assert doc["headers"]["x-api-key"] == [READ_KEY]
    assert "authorization" not in doc["headers"]


async def test_untrusted_certificate_refused(tls_upstream, start_daemon, ca_file, client):
    """An upstream whose certificate does not chain to a trusted CA: 502 that says so, nothing sent."""
    other = trustme.CA()
    upstream = await tls_upstream(fake_api(), cert_ca=other)
    d = await start_daemon(api_doc(upstream.url, ca_file), SECRETS)
    async with client.get(f"{d.url}/api/echo", headers=d.auth()) as resp:
        assert resp.status == 502
        assert resp.headers["X-Credproxy-Error"] == "upstream_unreachable"
        doc = await resp.json()
    assert "certificate" in doc["error"]["message"].lower()
    assert upstream.seen == []


async def test_sse_events_arrive_before_the_stream_ends(
    tls_upstream, start_daemon, ca_file, client
):
    """Each SSE event reaches the app as soon as the upstream sends it."""
    _, d = await _setup(tls_upstream, start_daemon, ca_file)
    arrivals: list[float] = []
    start = time.monotonic()
    async with client.get(f"{d.url}/api/sse?n=4&interval=0.4", headers=d.auth()) as resp:
        assert resp.headers["Content-Type"] == "text/event-stream"
        buf = b""
        async for chunk in resp.content.iter_any():
            buf += chunk
            while b"\n\n" in buf:
                _, buf = buf.split(b"\n\n", 1)
                arrivals.append(time.monotonic() - start)
    assert len(arrivals) == 4
    # the first event arrives long before the last one is even sent (~1.2 s later)
    assert arrivals[0] < 0.5
    assert arrivals[-1] - arrivals[0] > 0.8


async def test_redirects_passed_back_not_followed(tls_upstream, start_daemon, ca_file, client):
    """A 302 goes back to the app as-is; the offsite server never hears from credproxy."""
    offsite_hits: list[Any] = []

    async def offsite(request: web.Request) -> web.Response:
        offsite_hits.append(request)
        return web.Response(text="should not be reached")

    off_app = web.Application()
    off_app.router.add_get("/{tail:.*}", offsite)
    off = await tls_upstream(off_app)
    _, d = await _setup(tls_upstream, start_daemon, ca_file)
    async with client.get(
        f"{d.url}/api/redirect?to={off.url}/steal", headers=d.auth(), allow_redirects=False
    ) as resp:
        assert resp.status == 302
        assert resp.headers["Location"] == f"{off.url}/steal"
    await asyncio.sleep(0.1)
    assert offsite_hits == []


async def test_compressed_body_passes_byte_for_byte(tls_upstream, start_daemon, ca_file, client):
    """A gzip body is relayed untouched, with its Content-Encoding and Content-Length."""
    _, d = await _setup(tls_upstream, start_daemon, ca_file)
    async with client.get(f"{d.url}/api/compressed", headers=d.auth()) as resp:
        body = await resp.read()
        assert resp.headers["Content-Encoding"] == "gzip"
        assert resp.headers["Content-Length"] == str(len(GZIP_BODY))
    assert body == GZIP_BODY


async def test_idle_timeout_gives_504(tls_upstream, start_daemon, ca_file, client):
    """An upstream silent for longer than timeouts.idle gives 504 upstream_timeout."""
    _, d = await _setup(tls_upstream, start_daemon, ca_file, timeouts={"idle": "300ms"})
    async with client.get(f"{d.url}/api/slow?s=2", headers=d.auth()) as resp:
        assert resp.status == 504
        assert resp.headers["X-Credproxy-Error"] == "upstream_timeout"


async def test_stall_mid_stream_cuts_the_connection(tls_upstream, start_daemon, ca_file, client):
    """Silence mid-body past the idle timeout ends the response early, never as a clean body."""
    _, d = await _setup(tls_upstream, start_daemon, ca_file, timeouts={"idle": "300ms"})
    got = b""
    failed = False
    try:
        async with client.get(f"{d.url}/api/stall?s=2", headers=d.auth()) as resp:
            assert resp.status == 200
            async for chunk in resp.content.iter_any():
                got += chunk
    except aiohttp.ClientPayloadError:
        failed = True
    assert got == b"first"
    assert failed


async def test_unreachable_upstream_gives_502(start_daemon, ca_file, client):
    """Nothing listening upstream: 502 upstream_unreachable in the JSON envelope."""
    port = free_port()
    d = await start_daemon(api_doc(f"https://127.0.0.1:{port}", ca_file), SECRETS)
    async with client.get(f"{d.url}/api/echo", headers=d.auth()) as resp:
        assert resp.status == 502
        doc = await resp.json()
    assert doc["error"]["code"] == "upstream_unreachable"


async def test_body_over_limit_is_413(tls_upstream, start_daemon, ca_file, client):
    """A declared body over limits.max_body_bytes is refused before anything is sent."""
    upstream = await tls_upstream(fake_api())
    doc = api_doc(upstream.url, ca_file)
    doc["limits"] = {"max_body_bytes": 1000}
    d = await start_daemon(doc, SECRETS)
    async with client.post(f"{d.url}/api/upload", headers=d.auth(), data=b"x" * 5000) as resp:
        assert resp.status == 413
        assert resp.headers["X-Credproxy-Error"] == "request_too_large"
    assert upstream.seen == []


async def test_missing_credential_is_503(tls_upstream, start_daemon, ca_file, client):
    """A credential named in the config but absent from the store: 503 credential_unavailable."""
    upstream = await tls_upstream(fake_api())
    d = await start_daemon(api_doc(upstream.url, ca_file), {})
    async with client.get(f"{d.url}/api/echo", headers=d.auth()) as resp:
        assert resp.status == 503
        doc = await resp.json()
    assert doc["error"]["code"] == "credential_unavailable"
    assert "credproxy keys add" in doc["error"]["message"]
    assert upstream.seen == []


async def test_key_added_while_running_is_used(
    tls_upstream, start_daemon, ca_file, client, key_env
):
    """A key written to the store by another process is used within 2 s, without a restart."""
    from proxy.masterkey import load_key_file
    from proxy.secret import Secret
    from proxy.store import Store

    upstream = await tls_upstream(fake_api())
    d = await start_daemon(api_doc(upstream.url, ca_file), {})
    async with client.get(f"{d.url}/api/echo", headers=d.auth()) as resp:
        assert resp.status == 503
    with Store.open(d.store.path, load_key_file(key_env)) as cli_store:
        cli_store.put("key-read", "api_key", Secret("sk_added_later_123456"))
    deadline = time.monotonic() + 2.0
    status = 0
    while time.monotonic() < deadline:
        async with client.get(f"{d.url}/api/echo", headers=d.auth()) as resp:
            status = resp.status
            if status == 200:
                doc = await resp.json()
                assert doc["headers"]["authorization"] == ["Bearer sk_added_later_123456"]
                break
        await asyncio.sleep(0.1)
    assert status == 200


async def test_expect_100_continue(tls_upstream, start_daemon, ca_file):
    """A client that waits for 100 Continue gets it once authorised, and its body goes through."""
    _, d = await _setup(tls_upstream, start_daemon, ca_file)
    host, port = d.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        f"POST /api/upload HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Authorization: Bearer {d.tokens['app']}\r\nContent-Length: 5\r\n"
        "Expect: 100-continue\r\n\r\n".encode()
    )
    await writer.drain()
    interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)
    assert interim.startswith(b"HTTP/1.1 100")
    writer.write(b"hello")
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    writer.close()
    assert head.startswith(b"HTTP/1.1 200")
