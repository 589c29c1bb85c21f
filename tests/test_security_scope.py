"""Never an open proxy, never a scope bypass: black-box over raw sockets.

The destination of every request is fixed by the config: nothing in the request
(authority, absolute URI, Host, X-Forwarded-*, `//host`, `/http://host`, encoded
slashes or backslashes, NUL, double encoding, dot-segments) may make credproxy
connect anywhere else, the path that is authorised is byte for byte the path that
is sent, and one app's token never opens another app's upstream.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme

from proxy.server import free_port
from tests.conftest import DaemonProcess, server_context, upstream_doc
from tests.fuzz.harness import RawUpstream, exchange, spawn_daemon, status_codes

KEYS = {
    "key-read": "sk_read_scope_00000",
    "key-rw": "sk_rw_scope_1111111",
    "k-adm": "sk_adm_scope_22222",
}


@dataclass
class Listener:
    """A plain TCP listener on 127.0.0.1 that only counts who connects to it."""

    port: int
    server: asyncio.Server
    connections: int = 0


@pytest.fixture
async def elsewhere() -> AsyncIterator[Listener]:
    """The place an attacker would like credproxy to connect to."""
    listener = Listener(0, None)  # type: ignore[arg-type]

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        listener.connections += 1
        writer.close()

    listener.server = await asyncio.start_server(accept, "127.0.0.1", 0)
    listener.port = listener.server.sockets[0].getsockname()[1]
    yield listener
    listener.server.close()
    await listener.server.wait_closed()


@dataclass
class Env:
    a: RawUpstream
    b: RawUpstream
    d: Any
    port: int
    listen_a: int
    listen_b: int

    def token(self, app: str) -> str:
        return str(self.d.tokens[app])


def _upstream(url: str, ca_file: Path, host: str, listen: int) -> dict[str, Any]:
    doc = upstream_doc(url, ca_file, hosts=[host], listen=f"127.0.0.1:{listen}")
    doc["credentials"].append({"name": "k-adm", "scopes": ["admin"]})
    doc["retries"] = {"max": 0}
    doc["path_rules"] = [{"method": "*", "path": "/v1/echo/admin/**", "scope": "admin"}]
    return doc


@pytest.fixture
async def env(ca: trustme.CA, start_daemon: Any, ca_file: Path) -> AsyncIterator[Env]:
    """Two upstreams, each with a dedicated listener and a forward-proxy alias, and three apps."""
    a = await RawUpstream(server_context(ca)).start()
    b = await RawUpstream(server_context(ca)).start()
    la, lb = free_port(), free_port()
    d = await start_daemon(
        {
            "upstreams": {
                "a": _upstream(a.url, ca_file, "api-a.example.test", la),
                "b": _upstream(b.url, ca_file, "api-b.example.test", lb),
            },
            "apps": {
                "alice": {"upstreams": {"a": {"scopes": ["admin"]}}},
                "bob": {"upstreams": {"b": {"scopes": ["read"]}}},
                "reader": {"upstreams": {"a": {"scopes": ["read", "write", "delete"]}}},
            },
        },
        KEYS,
    )
    yield Env(a, b, d, int(d.url.rsplit(":", 1)[1]), la, lb)
    await a.close()
    await b.close()


def _request(
    method: str, target: str, host: str, token: str | None, extra: str = "", body: bytes = b""
) -> bytes:
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    length = f"Content-Length: {len(body)}\r\n" if body else ""
    return (
        f"{method} {target} HTTP/1.1\r\nHost: {host}\r\n{auth}{extra}{length}"
        "Connection: close\r\n\r\n"
    ).encode() + body


def _assert_stayed_home(env: Env, evil: Listener) -> None:
    assert evil.connections == 0, "credproxy connected to a place the request named"
    for up in (env.a, env.b):
        assert up.errors == []
        for request in up.requests:
            assert request.target.startswith("/v1/") or request.target == "/v1"
            assert request.header("host") == [f"127.0.0.1:{up.port}"]


# The request line and Host an attacker controls; {evil} is a port that must never be dialled.
STEERING = [
    ("http://127.0.0.1:{evil}/v1/echo", "127.0.0.1:{evil}"),
    ("https://127.0.0.1:{evil}/v1/echo", "127.0.0.1:{evil}"),
    ("http://localhost:{evil}/v1/echo", "localhost:{evil}"),
    ("http://api-a.example.test@127.0.0.1:{evil}/v1/echo", "127.0.0.1:{evil}"),
    ("http://127.0.0.1:{evil}#@api-a.example.test/v1/echo", "127.0.0.1:{evil}"),
    ("http://127.0.0.1:{evil}?@api-a.example.test/v1/echo", "127.0.0.1:{evil}"),
    ("http://api-a.example.test:{evil}/v1/echo", "api-a.example.test:{evil}"),
    ("http://api-a.example.test.127.0.0.1.nip.io/v1/echo", "api-a.example.test.127.0.0.1.nip.io"),
    ("http://[::ffff:127.0.0.1]:{evil}/v1/echo", "[::ffff:127.0.0.1]:{evil}"),
    ("http://API-A.EXAMPLE.TEST./v1/echo", "api-a.example.test."),
    ("//127.0.0.1:{evil}/v1/echo", "127.0.0.1:{main}"),
    ("/a//127.0.0.1:{evil}/v1/echo", "127.0.0.1:{main}"),
    ("/a/http://127.0.0.1:{evil}/v1/echo", "127.0.0.1:{main}"),
    ("/a/https:/127.0.0.1:{evil}", "127.0.0.1:{main}"),
    ("/a/%2F%2F127.0.0.1:{evil}/x", "127.0.0.1:{main}"),
    ("/a/%2f127.0.0.1:{evil}", "127.0.0.1:{main}"),
    ("/a/\\\\127.0.0.1:{evil}/x", "127.0.0.1:{main}"),
    ("/a/%5C%5C127.0.0.1:{evil}/x", "127.0.0.1:{main}"),
    ("/a/%00@127.0.0.1:{evil}", "127.0.0.1:{main}"),
    ("/a/%252F%252F127.0.0.1:{evil}", "127.0.0.1:{main}"),
    ("/a/%25252F127.0.0.1:{evil}", "127.0.0.1:{main}"),
    ("/a/../b/echo", "127.0.0.1:{main}"),
    ("/a/..%2Fb/echo", "127.0.0.1:{main}"),
    ("/a/%2e%2e/b/echo", "127.0.0.1:{main}"),
    ("/a/.%2E/%2e./x", "127.0.0.1:{main}"),
    ("/a/echo?x=1@127.0.0.1:{evil}", "127.0.0.1:{main}"),
    ("/a/echo#@127.0.0.1:{evil}", "127.0.0.1:{main}"),
    ("/a@127.0.0.1:{evil}/echo", "127.0.0.1:{main}"),
    ("/a:{evil}/echo", "127.0.0.1:{main}"),
    ("/v1/echo", "127.0.0.1:{evil}"),
    ("*", "127.0.0.1:{evil}"),
    ("127.0.0.1:{evil}", "127.0.0.1:{evil}"),
]


@pytest.mark.parametrize(("target", "host"), STEERING)
async def test_request_cannot_choose_where_credproxy_connects(
    env: Env, elsewhere: Listener, target: str, host: str
) -> None:
    """However the target and Host are spelled, credproxy dials only a configured origin, within its base path."""
    fill = {"evil": elsewhere.port, "main": env.port}
    raw = _request("GET", target.format(**fill), host.format(**fill), env.token("alice"))
    for listener in (env.port, env.listen_a):
        answer = await exchange(listener, raw)
        codes = status_codes(answer)
        assert len(codes) == 1 and codes[0] in (200, 400, 403, 404), answer[:300]
    _assert_stayed_home(env, elsewhere)
    assert env.b.requests == [], "a path trick reached another upstream"


@pytest.mark.parametrize(
    "extra",
    [
        "X-Forwarded-Host: 127.0.0.1:{evil}\r\n",
        "X-Forwarded-Proto: http\r\nX-Forwarded-Port: {evil}\r\n",
        "X-Forwarded-Server: 127.0.0.1\r\nX-Forwarded-Prefix: //127.0.0.1:{evil}\r\n",
        "X-Forwarded-Scheme: http\r\nX-Forwarded-Ssl: off\r\n",
        "Forwarded: for=1.2.3.4;host=127.0.0.1:{evil};proto=http\r\n",
        "X-Original-URL: /v1/echo/admin/users\r\n",
        "X-Rewrite-URL: /v1/echo/admin/users\r\n",
        "X-Real-IP: 10.0.0.1\r\nX-Forwarded-For: 10.0.0.1\r\n",
        "Proxy-Connection: keep-alive\r\nKeep-Alive: timeout=99\r\n",
    ],
)
async def test_routing_headers_neither_steer_nor_reach_upstream(
    env: Env, elsewhere: Listener, extra: str
) -> None:
    """Forwarding and URL-rewrite headers change nothing: the request goes to the origin, and they are not sent on."""
    fill = {"evil": elsewhere.port}
    headers = extra.format(**fill)
    raw = _request("GET", "/a/echo", f"127.0.0.1:{env.port}", env.token("reader"), headers)
    answer = await exchange(env.port, raw)
    assert status_codes(answer) == [200], answer[:300]
    _assert_stayed_home(env, elsewhere)
    (seen,) = env.a.requests
    sent = {name.lower() for name, _ in seen.headers}
    for line in headers.split("\r\n"):
        if line:
            assert line.partition(":")[0].lower() not in sent, line


@pytest.mark.parametrize(
    "override",
    [
        "X-HTTP-Method-Override: DELETE",
        "x-http-method-override: DELETE",
        "X-HTTP-Method: DELETE",
        "X-Method-Override: DELETE",
        "X-HTTP-Method-Override: GET\r\nX-HTTP-Method-Override: DELETE",
    ],
)
async def test_method_override_headers_stripped(env: Env, override: str) -> None:
    """A read-only app's GET carrying a method-override header arrives upstream as a plain GET, header gone."""
    raw = _request("GET", "/b/echo", f"127.0.0.1:{env.port}", env.token("bob"), override + "\r\n")
    answer = await exchange(env.port, raw)
    assert status_codes(answer) == [200], answer[:300]
    (seen,) = env.b.requests
    assert seen.method == "GET"
    assert not any("method" in name.lower() for name, _ in seen.headers), seen.headers


@pytest.mark.parametrize("method", ["TRACE", "TRACK", "trace", "Track", "CONNECT"])
async def test_trace_track_connect_refused_everywhere(env: Env, method: str) -> None:
    """TRACE/TRACK (any case) and CONNECT are refused on every listener and in every form, even for an admin app."""
    forms = [
        (env.port, "/a/echo", f"127.0.0.1:{env.port}"),
        (env.listen_a, "/v1/echo", f"127.0.0.1:{env.listen_a}"),
        (env.port, "http://api-a.example.test/v1/echo", "api-a.example.test"),
        (env.port, "api-a.example.test:443", "api-a.example.test:443"),
    ]
    for listener, target, host in forms:
        answer = await exchange(listener, _request(method, target, host, env.token("alice")))
        codes = status_codes(answer)
        assert codes and codes[0] in (400, 405), (target, answer[:200])
        assert env.token("alice").encode() not in answer
    assert env.a.requests == []


@pytest.mark.parametrize(
    ("app", "listener", "target", "host"),
    [
        ("alice", "main", "/b/echo", "127.0.0.1:{main}"),
        ("alice", "b", "/v1/echo", "127.0.0.1:{b}"),
        ("alice", "main", "http://api-b.example.test/v1/echo", "api-b.example.test"),
        ("alice", "a", "http://api-b.example.test/v1/echo", "api-b.example.test"),
        ("alice", "main", "/a/../b/echo", "127.0.0.1:{main}"),
        ("alice", "main", "/a/%2e%2e/b/echo", "127.0.0.1:{main}"),
        ("alice", "main", "/a/..%2fb/echo", "127.0.0.1:{main}"),
        ("alice", "a", "/v1/../../b/v1/echo", "127.0.0.1:{a}"),
        ("bob", "main", "/a/echo", "127.0.0.1:{main}"),
        ("bob", "a", "/v1/echo", "127.0.0.1:{a}"),
        ("bob", "main", "http://api-a.example.test/v1/echo", "api-a.example.test"),
    ],
)
async def test_one_apps_token_never_opens_another_upstream(
    env: Env, app: str, listener: str, target: str, host: str
) -> None:
    """An app granted only upstream X is refused on upstream Y in every addressing mode and path spelling."""
    ports = {"main": env.port, "a": env.listen_a, "b": env.listen_b}
    fill = {"main": env.port, "a": env.listen_a, "b": env.listen_b}
    raw = _request("GET", target, host.format(**fill), env.token(app))
    answer = await exchange(ports[listener], raw)
    assert status_codes(answer)[0] in (400, 403), answer[:300]
    denied = env.b if app == "alice" else env.a
    assert denied.requests == []


async def test_token_confusion_between_apps(env: Env) -> None:
    """Two app tokens in one request never combine: two dedicated headers are 401; each token keeps its own scopes."""
    alice, bob = env.token("alice"), env.token("bob")
    both = f"X-Credproxy-App-Token: {alice}\r\nX-Credproxy-App-Token: {bob}\r\n"
    answer = await exchange(
        env.port, _request("GET", "/b/echo", f"127.0.0.1:{env.port}", None, both)
    )
    assert status_codes(answer) == [401]
    glued = f"Authorization: Bearer {alice}, Bearer {bob}\r\n"
    answer = await exchange(
        env.port, _request("GET", "/b/echo", f"127.0.0.1:{env.port}", None, glued)
    )
    assert status_codes(answer) == [401]
    # bob's token in the dedicated header wins over alice's in Authorization: bob cannot write
    mixed = f"X-Credproxy-App-Token: {bob}\r\n"
    answer = await exchange(
        env.port, _request("POST", "/b/echo", f"127.0.0.1:{env.port}", alice, mixed, b"x")
    )
    assert status_codes(answer) == [403]
    assert env.a.requests == [] and env.b.requests == []


# Spellings of a path, and the exact path the upstream must receive (None: refused, never sent).
SPELLINGS = [
    ("/a/echo/x", "/v1/echo/x"),
    ("/a/echo/./x", "/v1/echo/x"),
    ("/a/echo//x///y", "/v1/echo/x/y"),
    ("/a/echo/%78", "/v1/echo/x"),
    ("/a/echo/%7e%7E", "/v1/echo/~~"),
    ("/a/echo/%e2%82%ac", "/v1/echo/%E2%82%AC"),
    ("/a/echo/%252e%252e/admin", "/v1/echo/%252e%252e/admin"),
    ("/a/echo/x/%2e%2e/y", "/v1/echo/y"),
    ("/a/echo/x/.%2e/admin/users", None),  # resolves to /v1/echo/admin/users: admin scope
    ("/a/echo/%61dmin/users", None),
    ("/a/echo/ADMIN/users", "/v1/echo/ADMIN/users"),  # a different path: paths are case-sensitive
    ("/a/echo/x/..;/admin/users", None),  # Tomcat/Spring read `..;` as `..`
    ("/a/echo/x/%2e%2e;jsessionid=1/admin/users", None),
    ("/a/echo/x/.;/admin", None),
    ("/a/echo/admin%2Fusers", None),
    ("/a/echo/admin%5Cusers", None),
    ("/a/echo/admin%00", None),
    ("/a/echo/%C0%AE%C0%AE/x", "/v1/echo/%C0%AE%C0%AE/x"),
    ("/a/echo/x;a=b/y", "/v1/echo/x;a=b/y"),
    ("/a/echo/%3B/y", "/v1/echo/%3B/y"),
]


@pytest.mark.parametrize(("spelling", "expected"), SPELLINGS)
async def test_path_authorised_is_the_path_sent(
    env: Env, spelling: str, expected: str | None
) -> None:
    """An app without admin gets each spelling refused or sent as exactly the normalised path its scope was checked on."""
    raw = _request("GET", spelling + "?q=%2F..", f"127.0.0.1:{env.port}", env.token("reader"))
    answer = await exchange(env.port, raw)
    if expected is None:
        assert status_codes(answer)[0] in (400, 403), answer[:300]
        assert env.a.requests == []
    else:
        assert status_codes(answer) == [200], answer[:300]
        (seen,) = env.a.requests
        assert seen.target == expected + "?q=%2F.."


async def test_proxy_environment_is_ignored(
    tmp_path: Path,
    ca: trustme.CA,
    ca_file: Path,
    elsewhere: Listener,
    daemon_procs: list[DaemonProcess],
) -> None:
    """HTTP(S)_PROXY/ALL_PROXY in the daemon's environment are never used: upstream traffic goes direct."""
    up = await RawUpstream(server_context(ca)).start()
    proxy_url = f"http://127.0.0.1:{elsewhere.port}"
    env_extra = {
        name: proxy_url
        for name in (
            "HTTP_PROXY",
            "HTTPS_PROXY",
            "ALL_PROXY",
            "http_proxy",
            "https_proxy",
            "all_proxy",
        )
    }
    spawned = spawn_daemon(
        tmp_path / "home",
        {
            "upstreams": {"api": upstream_doc(up.url, ca_file, hosts=["api.example.test"])},
            "apps": {"app": {"upstreams": {"api": {"scopes": ["read"]}}}},
        },
        KEYS,
        daemon_procs,
        env_extra=env_extra,
    )
    try:
        await asyncio.to_thread(spawned.proc.wait_ready, spawned.admin)
        token = spawned.tokens["app"]
        for target, host in (
            ("/api/echo", f"127.0.0.1:{spawned.port}"),
            ("http://api.example.test/v1/echo", "api.example.test"),
        ):
            answer = await exchange(spawned.port, _request("GET", target, host, token), 10)
            assert status_codes(answer) == [200], answer[:300]
        seen = list(up.requests)
    finally:
        await up.close()
    assert len(seen) == 2
    assert elsewhere.connections == 0, "the daemon used a proxy from its environment"
