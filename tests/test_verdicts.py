"""The pipeline's verdict table: a remembered verdict never lets through what the stages refuse.

`Pipeline._decide` remembers what guard, identify, route and authorize decided for a request
shape. Each test here first gets a request allowed (so its verdict is in the table), then sends
the same request changed in one thing those stages read, and expects what the stages alone
would answer. Everything goes over real sockets to a running daemon.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from proxy.secret import Secret
from proxy.server import free_port
from tests.conftest import api_doc, write_config
from tests.fakeapi import fake_api
from tests.fuzz.harness import exchange, status_codes

KEYS = {"key-read": "sk_read_verdict_0000", "key-rw": "sk_rw_verdict_1111"}


@pytest.fixture
async def daemon(tls_upstream: Any, start_daemon: Any, ca_file: Path) -> Any:
    """`app` may read `api` (main listener and a dedicated one); `other` may read and write."""
    upstream = await tls_upstream(fake_api())
    doc = api_doc(upstream.url, ca_file, scopes=["read"], listen=f"127.0.0.1:{free_port()}")
    doc["apps"]["other"] = {"upstreams": {"api": {"scopes": ["read", "write"]}}}
    d = await start_daemon(doc, KEYS)
    return upstream, d


def _port(d: Any) -> int:
    return int(d.url.rsplit(":", 1)[1])


def _get(
    port: int, token: str | None, *extra: str, method: str = "GET", path: str = "/api/echo"
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{port}"]
    if token is not None:
        lines.append(f"Authorization: Bearer {token}")
    lines += [*extra, "Content-Length: 0", "Connection: close", "", ""]
    return "\r\n".join(lines).encode()


async def _status(port: int, data: bytes) -> int:
    codes = status_codes(await exchange(port, data))
    assert len(codes) == 1, codes
    return codes[0]


async def test_same_request_changed_in_one_read_thing_gets_the_stages_answer(daemon: Any) -> None:
    upstream, d = daemon
    port, token = _port(d), d.tokens["app"]
    assert await _status(port, _get(port, token)) == 200
    assert await _status(port, _get(port, token)) == 200  # from the table
    # guard: a browser's headers, a foreign or second Host
    assert await _status(port, _get(port, token, "Origin: https://evil.example")) == 403
    assert await _status(port, _get(port, token, "Sec-Fetch-Site: cross-site")) == 403
    rebound = _get(port, token).replace(b"Host: 127.0.0.1", b"Host: evil.example")
    assert await _status(port, rebound) == 403
    assert await _status(port, _get(port, token, f"Host: 127.0.0.1:{port}")) == 400
    # identify: another, an unknown, a doubled or no token
    assert await _status(port, _get(port, d.tokens["other"])) == 200
    assert await _status(port, _get(port, "cpx_" + "U" * 43)) == 401
    assert (
        await _status(
            port,
            _get(port, token, f"X-Credproxy-App-Token: {token}", f"X-Credproxy-App-Token: {token}"),
        )
        == 401
    )
    assert await _status(port, _get(port, None)) == 401
    # authorize: the method decides the scope
    assert await _status(port, _get(port, token, method="POST")) == 403
    assert await _status(port, _get(port, d.tokens["other"], method="POST")) == 200
    # route: another upstream name
    assert await _status(port, _get(port, token, path="/nope/echo")) == 403
    assert len(upstream.seen) == 4


async def test_dedicated_listener_routes_the_same_target_its_own_way(daemon: Any) -> None:
    """`/api/echo` is `api`'s /v1/echo on the main listener and outside /v1 on `api`'s own."""
    upstream, d = daemon
    token = d.tokens["app"]
    main = _port(d)
    dedicated = int(d.daemon.snapshot.config.upstreams["api"].listen.port)
    assert await _status(main, _get(main, token)) == 200
    assert await _status(dedicated, _get(dedicated, token)) == 403
    assert await _status(dedicated, _get(dedicated, token, path="/v1/echo")) == 200
    assert [r.path for r in upstream.seen] == ["/v1/echo", "/v1/echo"]


async def test_allow_from_is_checked_per_source_address(
    tls_upstream: Any, start_daemon: Any, ca_file: Path
) -> None:
    """An app allowed from 127.0.0.1 only is refused from 127.0.0.2 after a request from .1."""
    upstream = await tls_upstream(fake_api())
    doc = api_doc(upstream.url, ca_file, scopes=["read"])
    doc["apps"]["app"]["allow_from"] = ["127.0.0.1/32"]
    d = await start_daemon(doc, KEYS)
    for source, expected in (("127.0.0.1", 200), ("127.0.0.2", 403), ("127.0.0.1", 200)):
        connector = aiohttp.TCPConnector(local_addr=(source, 0), force_close=True)
        async with (
            aiohttp.ClientSession(connector=connector, trust_env=False) as session,
            session.get(f"{d.url}/api/echo", headers=d.auth()) as resp,
        ):
            assert resp.status == expected, source
    assert len(upstream.seen) == 2


async def test_reload_and_store_changes_empty_the_table(daemon: Any) -> None:
    upstream, d = daemon
    port, token = _port(d), d.tokens["other"]
    assert await _status(port, _get(port, token, method="POST")) == 200
    doc = yaml.safe_load(d.config_path.read_text())
    doc["apps"]["other"]["upstreams"]["api"]["scopes"] = ["read"]
    write_config(d.config_path, doc)
    assert await d.daemon.reload("test")
    assert await _status(port, _get(port, token, method="POST")) == 403
    assert await _status(port, _get(port, token)) == 200
    d.store.revoke_app_tokens("other")
    d.daemon.vault.check()
    assert await _status(port, _get(port, token)) == 401


async def test_table_holds_token_hashes_never_tokens(daemon: Any) -> None:
    _, d = daemon
    port = _port(d)
    for app in ("app", "other"):
        assert await _status(port, _get(port, d.tokens[app])) == 200
    table = d.daemon.pipeline._verdicts
    assert len(table) == 2
    held = repr(list(table)) + repr(list(table.values()))
    for app in ("app", "other"):
        assert d.tokens[app] not in held
        assert d.tokens[app].encode() not in held.encode()
    first, second = list(table)
    differ = [(a, b) for a, b in zip(first, second, strict=True) if a != b]
    assert len(differ) == 1  # the two requests differ in the token alone
    assert all(isinstance(x, bytes) and len(x) == 32 for x in differ[0])  # a BLAKE2s-256 digest


async def test_store_changes_reach_a_remembered_credential(
    tls_upstream: Any, start_daemon: Any, ca_file: Path
) -> None:
    """The credential a verdict keeps follows keys added and removed while the daemon runs."""
    upstream = await tls_upstream(fake_api())
    d = await start_daemon(api_doc(upstream.url, ca_file), {"key-rw": KEYS["key-rw"]})
    port, token = _port(d), d.tokens["app"]

    async def used() -> str:
        assert await _status(port, _get(port, token)) == 200
        return upstream.headers[-1]["authorization"][0].removeprefix("Bearer ")

    assert await used() == KEYS["key-rw"]
    assert await used() == KEYS["key-rw"]  # from the table
    d.store.put("key-read", "api_key", Secret(KEYS["key-read"]))
    d.daemon.vault.check()
    assert await used() == KEYS["key-read"]  # the least privileged key, now that it exists
    d.store.remove("key-read")
    d.daemon.vault.check()
    assert await used() == KEYS["key-rw"]
    d.store.remove("key-rw")
    d.daemon.vault.check()
    assert await _status(port, _get(port, token)) == 503
