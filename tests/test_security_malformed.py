"""Request smuggling and badly framed upstream responses, with a hand-parsing upstream.

The upstream here is `RawUpstream`: it parses the bytes that reach it itself, so
it sees exactly what credproxy put on the wire. Whatever framing trick an app
tries, the upstream must see only well-framed requests that were authorised, and
a broken upstream response must cost the app that asked a 502 and nobody else
anything: its connection is thrown away, never handed to the next request.
(Framing refusals by status alone are in test_malformed; this adds what reaches
the upstream, and the response side.)
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme

from tests.conftest import server_context, upstream_doc
from tests.fuzz.harness import RawRequest, RawUpstream, exchange, ok_response, status_codes

KEYS = {"key-read": "sk_read_smuggle_0000", "key-rw": "sk_rw_smuggle_111111"}


@dataclass
class Env:
    up: RawUpstream
    d: Any
    port: int

    def head(self, app: str | None = "a") -> str:
        auth = f"Authorization: Bearer {self.d.tokens[app]}\r\n" if app else ""
        return f"Host: 127.0.0.1:{self.port}\r\n{auth}"


@pytest.fixture
async def env(ca: trustme.CA, start_daemon: Any, ca_file: Path) -> AsyncIterator[Env]:
    """A daemon before a RawUpstream, two apps, no retries (each request is sent at most once)."""
    up = await RawUpstream(server_context(ca)).start()
    d = await start_daemon(
        {
            "upstreams": {
                "api": upstream_doc(up.url, ca_file, retries={"max": 0}, timeouts={"idle": "500ms"})
            },
            "apps": {
                "a": {"upstreams": {"api": {"scopes": ["read", "write"]}}},
                "b": {"upstreams": {"api": {"scopes": ["read"]}}},
            },
        },
        KEYS,
    )
    yield Env(up, d, int(d.url.rsplit(":", 1)[1]))
    await up.close()


# name -> (request bytes from a template, status codes allowed first, upstream bodies expected)
# {H} is Host + the app's token, {N} is Host alone (an unauthorised request).
SMUGGLING: dict[str, tuple[str, tuple[int, ...], list[bytes]]] = {
    "CL.TE": (
        "POST /api/echo HTTP/1.1\r\n{H}Content-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n"
        "0\r\n\r\nGET /api/smuggled HTTP/1.1\r\n{H}\r\n",
        (400,),
        [],
    ),
    "TE.CL": (
        "POST /api/echo HTTP/1.1\r\n{H}Transfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n"
        "2c\r\nGET /api/smuggled HTTP/1.1\r\n{H}\r\n\r\n0\r\n\r\n",
        (400,),
        [],
    ),
    "TE.TE duplicate": (
        "POST /api/echo HTTP/1.1\r\n{H}Transfer-Encoding: chunked\r\nTransfer-Encoding: cow\r\n\r\n"
        "0\r\n\r\nGET /api/smuggled HTTP/1.1\r\n{H}\r\n",
        (400,),
        [],
    ),
    "TE.TE vertical tab": (
        "POST /api/echo HTTP/1.1\r\n{H}Transfer-Encoding:\x0bchunked\r\nContent-Length: 3\r\n\r\n"
        "0\r\n\r\n",
        (400,),
        [],
    ),
    "TE.TE obs-fold": (
        "POST /api/echo HTTP/1.1\r\n{H}Transfer-Encoding: x\r\n chunked\r\nContent-Length: 3\r\n\r\n"
        "abc",
        (400,),
        [],
    ),
    "TE.TE quoted": (
        'POST /api/echo HTTP/1.1\r\n{H}Transfer-Encoding: "chunked"\r\n\r\n0\r\n\r\n',
        (400,),
        [],
    ),
    "TE identity": (
        "POST /api/echo HTTP/1.1\r\n{H}Transfer-Encoding: identity\r\n\r\nabc",
        (400,),
        [],
    ),
    "TE not last": (
        "POST /api/echo HTTP/1.1\r\n{H}Transfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n",
        (400,),
        [],
    ),
    "CL list": (
        "POST /api/echo HTTP/1.1\r\n{H}Content-Length: 3, 3\r\n\r\nabc",
        (400,),
        [],
    ),
    "CL twice, same value": (
        "POST /api/echo HTTP/1.1\r\n{H}Content-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
        (400,),
        [],
    ),
    "CL negative": (
        "POST /api/echo HTTP/1.1\r\n{H}Content-Length: -1\r\n\r\nabc",
        (400,),
        [],
    ),
    "CL hex": (
        "POST /api/echo HTTP/1.1\r\n{H}Content-Length: 0x3\r\n\r\nabc",
        (400,),
        [],
    ),
    "chunk size overflow": (
        "POST /api/echo HTTP/1.1\r\n{H}Transfer-Encoding: chunked\r\n\r\n"
        "FFFFFFFFFFFFFFFFF3\r\nabc\r\n0\r\n\r\n",
        (400,),
        [],
    ),
    "chunk size 0x": (
        "POST /api/echo HTTP/1.1\r\n{H}Transfer-Encoding: chunked\r\n\r\n0x3\r\nabc\r\n0\r\n\r\n",
        (400,),
        [],
    ),
    "chunk ext bare LF": (
        "POST /api/echo HTTP/1.1\r\n{H}Transfer-Encoding: chunked\r\n\r\n3;x\nabc\r\n0\r\n\r\n",
        (400,),
        [],
    ),
    "chunk data longer than size": (
        "POST /api/echo HTTP/1.1\r\n{H}Transfer-Encoding: chunked\r\n\r\n"
        "3\r\nabcGET /api/smuggled HTTP/1.1\r\n0\r\n\r\n",
        (400,),
        [],
    ),
    "bare LF line ends": (
        "GET /api/echo HTTP/1.1\n{H_LF}Connection: close\n\n",
        (400,),
        [],
    ),
    "LF inside CRLF head": (
        "POST /api/echo HTTP/1.1\r\n{H}X-A: 1\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n"
        "abc",
        (400,),
        [],
    ),
    "HTTP/0.9": ("GET /api/echo\r\n\r\n", (400,), []),
    "HTTP/2 preface": ("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", (400,), []),
    "request line trailing space": ("GET /api/echo HTTP/1.1 \r\n{H}\r\n", (400,), []),
    "NUL in target": ("GET /api/echo\x00x HTTP/1.1\r\n{H}\r\n", (400,), []),
    # accepted, and re-framed: the upstream sees one clean request per authorised one
    "chunked, mixed case": (
        "POST /api/echo HTTP/1.1\r\n{H}Transfer-Encoding: cHuNkEd\r\nConnection: close\r\n\r\n"
        "1e\r\nGET /api/smuggled HTTP/1.1\r\n\r\n\r\n0\r\n\r\n",
        (200,),
        [b"GET /api/smuggled HTTP/1.1\r\n\r\n"],
    ),
    "chunked with a trailer": (
        "POST /api/echo HTTP/1.1\r\n{H}Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        "3\r\nabc\r\n0\r\nAuthorization: Bearer trailer-key\r\nX-Smuggle: 1\r\n\r\n",
        (200,),
        [b"abc"],
    ),
    "framing field in a trailer": (
        "POST /api/echo HTTP/1.1\r\n{H}Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        "3\r\nabc\r\n0\r\nContent-Length: 99\r\n\r\n",
        (400,),
        [],
    ),
    "HTTP/1.0 chunked": (
        "POST /api/echo HTTP/1.0\r\n{H}Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        (200, 400),
        [b"abc"],
    ),
    "pipelined, second unauthorised": (
        "GET /api/echo HTTP/1.1\r\n{H}\r\nGET /api/smuggled HTTP/1.1\r\n{N}Connection: close\r\n\r\n",
        (200,),
        [b""],
    ),
    "body then unauthorised request": (
        "POST /api/echo HTTP/1.1\r\n{H}Content-Length: 3\r\n\r\nabc"
        "GET /api/smuggled HTTP/1.1\r\n{N}Connection: close\r\n\r\n",
        (200,),
        [b"abc"],
    ),
    "GET with a body": (
        "GET /api/echo HTTP/1.1\r\n{H}Content-Length: 32\r\nConnection: close\r\n\r\n"
        "GET /api/smuggled HTTP/1.1\r\n\r\n\r\n",
        (200,),
        [b"GET /api/smuggled HTTP/1.1\r\n\r\n\r\n"],
    ),
    "websocket upgrade, then unauthorised": (
        "GET /api/echo HTTP/1.1\r\n{H}Connection: Upgrade\r\nUpgrade: websocket\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        "GET /api/smuggled HTTP/1.1\r\n{N}\r\n",
        (200,),
        [b""],
    ),
    "h2c upgrade, then unauthorised": (
        "GET /api/echo HTTP/1.1\r\n{H}Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
        "HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n"
        "GET /api/smuggled HTTP/1.1\r\n{N}\r\n",
        (200,),
        [b""],
    ),
    "CONNECT, then unauthorised": (
        "CONNECT 127.0.0.1:443 HTTP/1.1\r\n{H}\r\nGET /api/smuggled HTTP/1.1\r\n{N}\r\n",
        (405,),
        [],
    ),
}

_HOP = {"transfer-encoding", "upgrade", "connection", "http2-settings", "te", "x-smuggle"}


@pytest.mark.parametrize("name", list(SMUGGLING))
async def test_smuggling_attempt_reaches_upstream_as_at_most_one_clean_request(
    env: Env, name: str
) -> None:
    """Each CL.TE / TE.CL / TE.TE / pipelining / upgrade trick yields only well-framed, authorised requests upstream."""
    template, allowed, bodies = SMUGGLING[name]
    raw = template.format(
        H=env.head("a"), N=env.head(None), H_LF=env.head("a").replace("\r\n", "\n")
    ).encode("latin-1")
    answer = await exchange(env.port, raw, idle=0.6)
    codes = status_codes(answer)
    assert codes and codes[0] in allowed, (name, answer[:300])
    assert 500 not in codes and b"Traceback" not in answer
    await asyncio.sleep(0.05)
    assert env.up.errors == [], f"the upstream saw a badly framed request: {env.up.errors}"
    assert [r.body for r in env.up.requests] == bodies, [r.target for r in env.up.requests]
    for seen in env.up.requests:
        assert seen.target == "/v1/echo", "a smuggled request reached the upstream"
        assert seen.header("Authorization") in (
            [f"Bearer {KEYS['key-read']}"],
            [f"Bearer {KEYS['key-rw']}"],
        )
        assert not _HOP & {n.lower() for n, _ in seen.headers}, seen.headers
        lengths = seen.header("Content-Length")
        assert lengths in ([], [str(len(seen.body))]), lengths


async def test_unauthorised_expect_gets_no_100_continue(env: Env) -> None:
    """A request without a token that waits for 100-continue gets 401 at once, never an interim 100."""
    raw = (
        f"POST /api/echo HTTP/1.1\r\n{env.head(None)}Expect: 100-continue\r\n"
        "Content-Length: 5\r\n\r\n"
    ).encode()
    answer = await exchange(env.port, raw, idle=0.5)
    assert status_codes(answer) == [401]
    assert env.up.requests == []


# ---- the response side --------------------------------------------------------------------

BAD_RESPONSES = {
    "conflicting Content-Length": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\nhello!!",
    "Content-Length and chunked": (
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n0\r\n\r\n"
    ),
    "Content-Length not a number": b"HTTP/1.1 200 OK\r\nContent-Length: 5x\r\n\r\nhello",
    "negative Content-Length": b"HTTP/1.1 200 OK\r\nContent-Length: -5\r\n\r\nhello",
    "garbage status line": b"SMTP ready\r\n\r\n",
    "binary junk": bytes(range(256)) * 4,
    "bad chunk size": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nZZ\r\nhello\r\n0\r\n\r\n",
    "NUL in a header": b"HTTP/1.1 200 OK\r\nX-A: a\x00b\r\nContent-Length: 0\r\n\r\n",
    "oversized header": b"HTTP/1.1 200 OK\r\nX-Big: "
    + b"x" * 70000
    + b"\r\nContent-Length: 0\r\n\r\n",
}


def _script(bad: bytes | list[bytes]) -> Any:
    """App `a` asking for /bad gets `bad`; everything else gets a clean 200 naming its app."""

    def respond(request: RawRequest) -> bytes | list[bytes]:
        if request.target.startswith("/v1/bad"):
            return bad
        return ok_response(b"good for " + request.target.encode())

    return respond


def _get(env: Env, app: str, path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\n{env.head(app)}Connection: close\r\n\r\n".encode()


@pytest.mark.parametrize("name", list(BAD_RESPONSES))
async def test_badly_framed_response_is_502_and_its_connection_discarded(
    env: Env, name: str
) -> None:
    """A malformed upstream response is a 502 for the app that asked; the next app's request gets a fresh connection and its own answer."""
    env.up.responder = _script(BAD_RESPONSES[name])
    warm = await exchange(env.port, _get(env, "b", "/api/warm"))  # leaves a pooled connection
    assert warm.endswith(b"good for /v1/warm")
    answer = await exchange(env.port, _get(env, "a", "/api/bad"), idle=3)
    assert status_codes(answer) == [502], (name, answer[:300])
    assert b"upstream_unreachable" in answer and b"Traceback" not in answer
    after = await exchange(env.port, _get(env, "b", "/api/after"))
    assert status_codes(after) == [200] and after.endswith(b"good for /v1/after"), after[-200:]
    bad = [r for r in env.up.requests if r.target == "/v1/bad"]
    later = [r for r in env.up.requests if r.target == "/v1/after"]
    assert len(bad) == 1 and len(later) == 1
    assert later[0].conn != bad[0].conn, "the connection that answered badly was reused"


@pytest.mark.parametrize(
    "lenient",
    [
        b"HTTP/1.1 200 OK\r\nX-A: a\nX-B: b\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nX-A: a\r\n b\r\nContent-Length: 2\r\n\r\nok",
    ],
    ids=["bare LF", "obs-fold"],
)
async def test_lenient_response_framing_is_relayed_clean(env: Env, lenient: bytes) -> None:
    """A response head with a bare LF or obs-fold (which RFC 9112 lets a client accept) reaches the app re-serialised with CRLF only."""
    env.up.responder = _script(lenient)
    answer = await exchange(env.port, _get(env, "a", "/api/bad"))
    head, _, body = answer.partition(b"\r\n\r\n")
    assert status_codes(answer) == [200] and body == b"ok"
    assert b"\n" not in head.replace(b"\r\n", b""), "a bare LF reached the app"
    assert not any(line[:1] in (b" ", b"\t") for line in head.split(b"\r\n")), "obs-fold relayed"
    after = await exchange(env.port, _get(env, "b", "/api/after"))
    assert after.endswith(b"good for /v1/after")


@pytest.mark.parametrize(
    "odd",
    [
        b"Content-Length : 5",
        b"Transfer-Encoding : chunked",
        b"Content-Length\t: 5",
        b"X-Fine: 1\r\nContent-Length  : 5",
    ],
)
async def test_header_names_that_are_not_tokens_are_not_relayed(env: Env, odd: bytes) -> None:
    """An upstream header whose name is not a token (`Content-Length : 5`) never reaches the app beside credproxy's own framing."""
    env.up.responder = _script(b"HTTP/1.1 200 OK\r\n" + odd + b"\r\nConnection: close\r\n\r\nhello")
    answer = await exchange(env.port, _get(env, "a", "/api/bad"), idle=3)
    codes = status_codes(answer)
    assert codes and codes[0] in (200, 502), answer[:300]
    head = answer.partition(b"\r\n\r\n")[0]
    names = [line.partition(b":")[0] for line in head.split(b"\r\n")[1:]]
    assert all(name == name.strip() and b" " not in name for name in names), head
    framing = [n.lower() for n in names if n.lower() in (b"content-length", b"transfer-encoding")]
    assert len(framing) <= 1, head
    after = await exchange(env.port, _get(env, "b", "/api/after"))
    assert after.endswith(b"good for /v1/after")


async def test_extra_bytes_after_a_response_never_reach_the_next_app(env: Env) -> None:
    """Bytes after a complete response in the same packet (a second response) never become another app's answer."""
    smuggled = b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nSMUGGLED"
    env.up.responder = _script(ok_response(b"mine") + smuggled)
    first = await exchange(env.port, _get(env, "a", "/api/bad"))
    assert status_codes(first) == [200] and first.endswith(b"mine")
    for _ in range(3):
        after = await exchange(env.port, _get(env, "b", "/api/after"))
        assert b"SMUGGLED" not in after
        assert after.endswith(b"good for /v1/after"), after[-200:]


async def test_short_body_is_cut_not_completed(env: Env) -> None:
    """An upstream that promises more body than it sends gives a visibly truncated response and poisons nothing."""
    env.up.responder = _script(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly this")
    answer = await exchange(env.port, _get(env, "a", "/api/bad"), idle=2)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"content-length: 100" in head.lower() and body == b"only this"
    after = await exchange(env.port, _get(env, "b", "/api/after"))
    assert after.endswith(b"good for /v1/after")


async def test_unsolicited_response_on_an_idle_connection_is_not_served(env: Env) -> None:
    """A response the upstream sends late, on a connection back in the pool, is never given to the next request."""
    late = b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nSMUGGLED"
    env.up.responder = _script([ok_response(b"mine"), late])
    first = await exchange(env.port, _get(env, "a", "/api/bad"))
    assert first.endswith(b"mine")
    await asyncio.sleep(0.5)  # the late bytes land while the connection idles in the pool
    after = await exchange(env.port, _get(env, "b", "/api/after"))
    assert b"SMUGGLED" not in after
    assert after.endswith(b"good for /v1/after")


@pytest.mark.parametrize(
    "bad",
    [
        b"HTTP/1.1 200 OK\r\nSet-Cookie: session=upstream-private-9f8e\x00\r\n"
        b"Content-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nupstream-private-9f8e\r\n",
    ],
    ids=["header value", "body bytes"],
)
async def test_502_does_not_quote_the_upstream_bytes(env: Env, bad: bytes) -> None:
    """The 502 for a malformed response names the problem without quoting the upstream's header values or body."""
    env.up.responder = _script(bad)
    answer = await exchange(env.port, _get(env, "a", "/api/bad"), idle=3)
    assert status_codes(answer) == [502]
    assert b"upstream-private-9f8e" not in answer
