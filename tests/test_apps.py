"""Apps and scopes, black-box: who may call what, with which credential, from where."""

from __future__ import annotations

import hashlib
import itertools
import os
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.server import free_port
from tests.conftest import upstream_doc
from tests.fakeapi import fake_api

KEYS = {
    "k-read": "sk_r_000000000000",
    "k-write": "sk_w_111111111111",
    "k-rwd": "sk_rwd_22222222222",
    "k-admin": "sk_adm_3333333333",
}

METHODS = ["GET", "HEAD", "OPTIONS", "POST", "PUT", "PATCH", "DELETE"]
METHOD_SCOPE = {
    "GET": "read",
    "HEAD": "read",
    "OPTIONS": "read",
    "POST": "write",
    "PUT": "write",
    "PATCH": "write",
    "DELETE": "delete",
}
APP_SCOPES = {
    "r": ["read"],
    "w": ["write"],
    "d": ["delete"],
    "rw": ["read", "write"],
    "adm": ["admin"],
}


def _doc(url: str, ca_file: Path, **apps: Any) -> dict[str, Any]:
    up = upstream_doc(url, ca_file)
    up["credentials"] = [
        {"name": "k-admin", "scopes": ["admin"]},
        {"name": "k-rwd", "scopes": ["read", "write", "delete"]},
        {"name": "k-write", "scopes": ["write"]},
        {"name": "k-read", "scopes": ["read"]},
    ]
    up["path_rules"] = [
        {"method": "POST", "path": "/v1/echo/*/summaries", "scope": "read"},
        {"method": "*", "path": "/v1/echo/admin/**", "scope": "admin"},
    ]
    return {
        "upstreams": {"api": up, "other": upstream_doc(url, ca_file)},
        "apps": apps
        or {
            name: {"upstreams": {"api": {"scopes": scopes}}} for name, scopes in APP_SCOPES.items()
        },
    }


@pytest.fixture
async def env(tls_upstream: Any, start_daemon: Any, ca_file: Path) -> Any:
    upstream = await tls_upstream(fake_api())
    d = await start_daemon(_doc(upstream.url, ca_file), KEYS)
    return upstream, d


async def test_scope_table(env: Any, client: aiohttp.ClientSession) -> None:
    """Every app x method: allowed exactly when the app's scopes cover the method's scope."""
    upstream, d = env
    for app, method in itertools.product(APP_SCOPES, METHODS):
        seen_before = len(upstream.seen)
        async with client.request(method, f"{d.url}/api/echo/x", headers=d.auth(app)) as resp:
            needed = METHOD_SCOPE[method]
            allowed = needed in APP_SCOPES[app] or "admin" in APP_SCOPES[app]
            if allowed:
                assert resp.status == 200, (app, method)
            else:
                assert resp.status == 403, (app, method)
                assert resp.headers["X-Credproxy-Error"] == "forbidden"
                if method != "HEAD":
                    assert needed in (await resp.json())["error"]["message"]
                assert len(upstream.seen) == seen_before, "denied request reached upstream"


@pytest.mark.parametrize(
    ("app", "method", "path", "status"),
    [
        ("r", "POST", "/api/echo/c1/summaries", 200),  # rule: summaries need read only
        ("w", "POST", "/api/echo/c1/summaries", 403),
        ("r", "POST", "/api/echo/c1/c2/summaries", 403),  # * stays in one segment
        ("rw", "GET", "/api/echo/admin/users", 403),  # ** rule needs admin
        ("adm", "GET", "/api/echo/admin/users", 200),
        ("rw", "GET", "/api/echo/x/../admin/users", 403),  # normalised before the check
        ("rw", "GET", "/api/echo//admin/users", 403),
        ("rw", "GET", "/api/echo/%61dmin/users", 403),  # %61 = a
        ("rw", "GET", "/api/echo/x%2F..%2Fadmin", 400),
    ],
)
async def test_path_rules(
    env: Any, client: aiohttp.ClientSession, app: str, method: str, path: str, status: int
) -> None:
    """Path rules apply to the normalised path; no spelling of a path slips past a rule."""
    _, d = env
    async with client.request(method, f"{d.url}{path}", headers=d.auth(app)) as resp:
        assert resp.status == status


async def test_normalised_path_is_the_one_sent(env: Any, client: aiohttp.ClientSession) -> None:
    """The path checked is byte-for-byte the path the upstream receives."""
    _, d = env
    async with client.get(f"{d.url}/api/echo/a/./b//c/../%7Ed?q=1", headers=d.auth("r")) as resp:
        doc = await resp.json()
    assert doc["path"] == "/v1/echo/a/b/~d?q=1"


@pytest.mark.parametrize(
    ("app", "method", "key"),
    [
        ("r", "GET", "k-read"),
        ("w", "POST", "k-write"),
        ("d", "DELETE", "k-rwd"),
        ("adm", "PROPFIND", "k-admin"),
        ("adm", "GET", "k-read"),
    ],
)
async def test_least_privilege(
    env: Any, client: aiohttp.ClientSession, app: str, method: str, key: str
) -> None:
    """The credential injected is the one with the fewest scopes that covers the request."""
    _, d = env
    async with client.request(method, f"{d.url}/api/echo", headers=d.auth(app)) as resp:
        assert resp.status == 200
        doc = await resp.json()
    assert doc["headers"]["authorization"] == [f"Bearer {KEYS[key]}"]


async def test_no_token_unknown_token(env: Any, client: aiohttp.ClientSession) -> None:
    """No token or an unknown one: 401 and the upstream is not contacted."""
    upstream, d = env
    for headers in (
        {},
        {"Authorization": "Bearer cpx_" + "A" * 43},
        {"Authorization": "Bearer sk_some_real_key"},
        {"X-Credproxy-App-Token": "nope"},
    ):
        async with client.get(f"{d.url}/api/echo", headers=headers) as resp:
            assert resp.status == 401
            assert resp.headers["X-Credproxy-Error"] == "unauthorized"
    assert upstream.seen == []


async def test_token_only_from_headers(env: Any, client: aiohttp.ClientSession) -> None:
    """A token in the query string or a cookie is ignored (a web page cannot carry one)."""
    _, d = env
    token = d.tokens["r"]
    for url, kw in (
        (f"{d.url}/api/echo?access_token={token}", {}),
        (f"{d.url}/api/echo", {"headers": {"Cookie": f"token={token}"}}),
    ):
        async with client.get(url, **kw) as resp:
            assert resp.status == 401


async def test_app_without_upstream_entry(env: Any, client: aiohttp.ClientSession) -> None:
    """An app with no entry for an upstream gets 403 forbidden there."""
    _, d = env
    async with client.get(f"{d.url}/other/echo", headers=d.auth("rw")) as resp:
        assert resp.status == 403
        assert resp.headers["X-Credproxy-Error"] == "forbidden"


async def test_anonymous_only_when_configured(
    tls_upstream: Any, start_daemon: Any, ca_file: Path, client: aiohttp.ClientSession
) -> None:
    """`anonymous` is an app like any other: with it configured, token-less requests get its scopes."""
    upstream = await tls_upstream(fake_api())
    d = await start_daemon(
        _doc(upstream.url, ca_file, anonymous={"upstreams": {"api": {"scopes": ["read"]}}}), KEYS
    )
    async with client.get(f"{d.url}/api/echo") as resp:
        assert resp.status == 200
    async with client.post(f"{d.url}/api/echo") as resp:
        assert resp.status == 403


async def test_allow_from(
    tls_upstream: Any, start_daemon: Any, ca_file: Path, client: aiohttp.ClientSession
) -> None:
    """An app bound to CIDRs is refused from elsewhere and accepted from inside them."""
    upstream = await tls_upstream(fake_api())
    d = await start_daemon(
        _doc(
            upstream.url,
            ca_file,
            inside={"allow_from": ["127.0.0.0/8"], "upstreams": {"api": {"scopes": ["read"]}}},
            outside={"allow_from": ["10.9.0.0/16"], "upstreams": {"api": {"scopes": ["read"]}}},
        ),
        KEYS,
    )
    async with client.get(f"{d.url}/api/echo", headers=d.auth("inside")) as resp:
        assert resp.status == 200
    async with client.get(f"{d.url}/api/echo", headers=d.auth("outside")) as resp:
        assert resp.status == 403
        assert "not allowed from 127.0.0.1" in (await resp.json())["error"]["message"]
    assert len(upstream.seen) == 1


async def test_config_token_hash(
    tls_upstream: Any, start_daemon: Any, ca_file: Path, client: aiohttp.ClientSession
) -> None:
    """A token whose SHA-256 is in the config (token_sha256) identifies its app."""
    upstream = await tls_upstream(fake_api())
    token = "cpx_" + "Z" * 43
    digest = hashlib.sha256(token.encode()).hexdigest()
    d = await start_daemon(
        _doc(
            upstream.url,
            ca_file,
            gitops={"token_sha256": [digest], "upstreams": {"api": {"scopes": ["read"]}}},
        ),
        KEYS,
    )
    async with client.get(
        f"{d.url}/api/echo", headers={"Authorization": f"Bearer {token}"}
    ) as resp:
        assert resp.status == 200


async def test_revoke_takes_effect_live(
    env: Any, client: aiohttp.ClientSession, key_env: Path
) -> None:
    """Revoking an app's tokens in the store locks it out within 2 s, without a restart."""
    import asyncio
    import time

    from proxy.masterkey import load_key_file
    from proxy.store import Store

    _, d = env
    async with client.get(f"{d.url}/api/echo", headers=d.auth("r")) as resp:
        assert resp.status == 200
    with Store.open(d.store.path, load_key_file(key_env)) as other:
        assert other.revoke_app_tokens("r") == 1
    deadline = time.monotonic() + 2.0
    status = 200
    while time.monotonic() < deadline and status == 200:
        await asyncio.sleep(0.1)
        async with client.get(f"{d.url}/api/echo", headers=d.auth("r")) as resp:
            status = resp.status
    assert status == 401


@pytest.mark.skipif(not hasattr(os, "getuid"), reason="unix only")
async def test_unix_socket_peer_uid(
    tls_upstream: Any, start_daemon: Any, ca_file: Path, tmp_path: Path
) -> None:
    """On a unix-socket listener an app bound to a peer uid is accepted from that uid only."""
    upstream = await tls_upstream(fake_api())
    sock = tmp_path / "run" / "proxy.sock"
    doc = _doc(
        upstream.url,
        ca_file,
        mine={"peer_uid": os.getuid(), "upstreams": {"api": {"scopes": ["read"]}}},
        theirs={"peer_uid": os.getuid() + 4242, "upstreams": {"api": {"scopes": ["read"]}}},
    )
    doc["listen"] = [f"127.0.0.1:{free_port()}", f"unix:{sock}"]
    d = await start_daemon(doc, KEYS)
    conn = aiohttp.UnixConnector(path=str(sock))
    async with aiohttp.ClientSession(connector=conn) as unix_client:
        async with unix_client.get("http://localhost/api/echo", headers=d.auth("mine")) as resp:
            assert resp.status == 200
        async with unix_client.get("http://localhost/api/echo", headers=d.auth("theirs")) as resp:
            assert resp.status == 403
    async with (
        aiohttp.ClientSession() as tcp,
        tcp.get(f"{d.url}/api/echo", headers=d.auth("mine")) as resp,
    ):
        assert resp.status == 403  # bound to a uid: never over TCP
