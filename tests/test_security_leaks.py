"""No leaks: secrets stay out of reprs, logs, error bodies and tracebacks; bodies pass untouched.

Complements test_e2e (a whole debug session grepped for secrets) with the forms a
secret can take on its way to a log line or a client, one at a time.
"""

from __future__ import annotations

import asyncio
import copy
import gzip
import hashlib
import io
import json
import logging
import os
import pickle
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import trustme

import proxy.pipeline
from proxy.logs import JsonFormatter, TextFormatter, redactor
from proxy.secret import Secret
from tests.conftest import DaemonProcess, server_context, upstream_doc
from tests.fakeapi import fake_api
from tests.fuzz.harness import RawRequest, RawUpstream, exchange, spawn_daemon, status_codes

VALUE = "sk_live_leaktest_7f3a9c2e1b"
KEYS = {"key-read": "sk_read_leaks_0123456", "key-rw": "sk_rw_leaks_98765432"}

# ---- Secret ------------------------------------------------------------------------------


def test_secret_never_shows_its_value() -> None:
    """repr, str, format, f-strings, %-formatting, str.format and containers never show a Secret's value."""
    s = Secret(VALUE)
    shown = [
        repr(s),
        str(s),
        format(s),
        format(s, ">40"),
        f"{s}",
        f"{s!r}",
        f"{s!s}",
        f"{s!a}",
        f"{s:x}",
        "%s" % s,  # noqa: UP031 - the %-form is what is under test
        "%r" % s,  # noqa: UP031
        "%a" % s,  # noqa: UP031
        "{} {!r}".format(s, s),  # noqa: UP032
        str([s]),
        repr({"k": s}),
        str((s,)),
        json.dumps({"k": s}, default=str),
        str(ValueError(s)),
        repr(ValueError("x", s)),
    ]
    for text in shown:
        assert VALUE not in text, text
        assert VALUE[-8:] not in text, text


def test_secret_refuses_serialisation_without_revealing() -> None:
    """json.dumps, pickle, copy and attribute tricks fail (or mask) without the value in any message."""
    s = Secret(VALUE)
    for attempt in (
        lambda: json.dumps(s),
        lambda: json.dumps({"k": s}),
        lambda: pickle.dumps(s),
        lambda: pickle.dumps({"nested": [s]}, protocol=pickle.HIGHEST_PROTOCOL),
        lambda: copy.copy(s),
        lambda: copy.deepcopy(s),
        lambda: setattr(s, "_value", "x"),
        lambda: s.__dict__,
    ):
        with pytest.raises((TypeError, AttributeError)) as info:
            attempt()
        assert VALUE not in str(info.value) and VALUE not in repr(info.value)
    assert s.reveal() == VALUE
    assert not hasattr(s, "__dict__")
    assert VALUE not in s.fingerprint() and VALUE[:6] not in s.fingerprint()


# ---- the log redactor ---------------------------------------------------------------------


def _emit(fmt: logging.Formatter, value: str) -> str:
    """Log `value` in every way a careless call site might, through `fmt`; return the text."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(fmt)
    log = logging.getLogger(f"credproxy.test.leaks.{type(fmt).__name__}")
    log.handlers = [handler]
    log.propagate = False
    log.setLevel(logging.DEBUG)
    log.info("as arg %s", value)
    log.info("as repr %r", value)
    log.info(f"in an f-string {value}")
    log.info("mapping %(v)s", {"v": value})
    log.info("container %s %s", {"key": value}, [value])
    log.info("bytes %s %r", value.encode(), value.encode())
    log.info("header %s", f"Authorization: Bearer {value}")
    log.info("url %s", f"https://api.example.test/v1/x?api_key={value}&a=1")
    log.info("extra field", extra={"detail": value, "nested": {"k": value}})
    log.info(ValueError(value))
    log.debug("debug too %s", value)
    try:
        raise RuntimeError(f"upstream said {value}")
    except RuntimeError:
        log.exception("with a traceback")
    try:
        {"token": value}["missing"]
    except KeyError:
        log.error("exc_info", exc_info=True)
    log.handlers = []
    return stream.getvalue()


def _spellings(value: str) -> set[str]:
    """The value as it would look raw, JSON-escaped, repr-escaped and as escaped bytes."""
    return {
        value,
        json.dumps(value)[1:-1],
        repr(value)[1:-1],
        repr(value.encode())[2:-1],
    }


@pytest.mark.parametrize("fmt", [TextFormatter(), JsonFormatter()], ids=["text", "json"])
def test_redactor_masks_a_secret_in_every_log_form(fmt: logging.Formatter) -> None:
    """A loaded secret passed to a log call as arg, repr, f-string, extra, bytes or in a traceback is masked."""
    value = "sk_live_redact_" + os.urandom(8).hex()
    redactor.add(value)
    text = _emit(fmt, value)
    assert "[REDACTED]" in text
    for spelling in _spellings(value):
        assert spelling not in text, spelling
    assert value[-10:] not in text


@pytest.mark.parametrize("fmt", [TextFormatter(), JsonFormatter()], ids=["text", "json"])
def test_redactor_masks_unregistered_credential_shapes(fmt: logging.Formatter) -> None:
    """Bearer values, app tokens and key=value secrets are masked even if never registered."""
    token = "cpx_" + os.urandom(24).hex()
    bearer = "tok_" + os.urandom(16).hex()
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(fmt)
    log = logging.getLogger("credproxy.test.leaks.shapes")
    log.handlers = [handler]
    log.propagate = False
    log.warning("app sent %s", token)
    log.warning("Authorization: Bearer %s", bearer)
    log.warning("body access_token=%s&refresh_token=%s", bearer, bearer)
    log.warning("form client_secret=%s&password=%s", bearer, bearer)
    log.handlers = []
    text = stream.getvalue()
    assert token[4:] not in text
    assert bearer not in text


@pytest.mark.parametrize(
    "fmt",
    [
        pytest.param(TextFormatter(), id="text"),
        pytest.param(JsonFormatter(), id="json"),
    ],
)
def test_redactor_masks_secrets_in_a_logged_json_document(fmt: logging.Formatter) -> None:
    """An unregistered client_secret/access_token inside a logged JSON document is masked in both formats."""
    value = "tok_" + os.urandom(16).hex()
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(fmt)
    log = logging.getLogger("credproxy.test.leaks.jsondoc")
    log.handlers = [handler]
    log.propagate = False
    log.warning(
        "token endpoint said %s", json.dumps({"access_token": value, "client_secret": value})
    )
    log.handlers = []
    assert value not in stream.getvalue()


@pytest.mark.parametrize(
    "value",
    [
        'pa"ss\\word-0123',  # a quote and a backslash: escaped by json.dumps and repr
        "pässwörd-0123456",  # non-ASCII: \u00e4 in JSON, \xc3\xa4 as bytes
        "tab\tinside-01234",  # a tab: \t in JSON and repr
    ],
    ids=["quote-backslash", "non-ascii", "tab"],
)
def test_redactor_masks_escaped_spellings(value: str) -> None:
    """A secret the store accepts (quotes, backslash, tab, non-ASCII) is masked in its escaped spellings too."""
    redactor.add(value)
    text = _emit(TextFormatter(), value) + _emit(JsonFormatter(), value)
    for spelling in _spellings(value):
        assert spelling not in text, spelling


# ---- what a client sees -------------------------------------------------------------------

MARK = "zq9marker0zq9"  # a value that must never come back in an error body (any case)


@pytest.fixture
async def daemon(tls_upstream: Any, start_daemon: Any, ca_file: Path) -> Any:
    upstream = await tls_upstream(fake_api())
    nokey = upstream_doc(upstream.url, ca_file)
    nokey["credentials"] = [{"name": "absent-from-store", "scopes": ["read"]}]
    d = await start_daemon(
        {
            "upstreams": {
                "api": upstream_doc(upstream.url, ca_file, hosts=["api.example.test"]),
                "nokey": nokey,
            },
            "apps": {
                "app": {"upstreams": {"api": {"scopes": ["read"]}, "nokey": {"scopes": ["read"]}}}
            },
            "limits": {"max_header_bytes": 4096, "max_body_bytes": 100},
        },
        KEYS,
    )
    return upstream, d, int(d.url.rsplit(":", 1)[1])


def _errors(port: int, token: str) -> list[tuple[str, bytes]]:
    """Requests that each make credproxy answer with one of its own errors, all carrying MARK."""
    host = f"Host: 127.0.0.1:{port}\r\n"
    auth = f"Authorization: Bearer {token}\r\n"
    marked = f"X-Note: {MARK}\r\nCookie: s={MARK}\r\n"

    def req(head: str, method: str = "GET", target: str = "/api/echo", body: str = "") -> bytes:
        return f"{method} {target} HTTP/1.1\r\n{head}Connection: close\r\n\r\n{body}".encode()

    return [
        ("unknown token", req(host + f"Authorization: Bearer cpx_{MARK}{'A' * 30}\r\n" + marked)),
        ("odd token header", req(host + f"X-Credproxy-App-Token: {MARK}\r\n")),
        (
            "two token headers",
            req(host + f"X-Credproxy-App-Token: {token}\r\nX-Credproxy-App-Token: {MARK}\r\n"),
        ),
        ("bad max-wait", req(host + auth + f"X-Credproxy-Max-Wait: {MARK}\r\n")),
        ("origin", req(host + auth + f"Origin: https://{MARK}.example\r\n")),
        ("fetch metadata", req(host + auth + f"Sec-Fetch-Site: {MARK}\r\n")),
        ("rebinding host", req(f"Host: {MARK}.example:{port}\r\n" + auth)),
        ("malformed host", req(f"Host: {MARK} x\r\n" + auth)),
        (
            "host vs uri",
            req(f"Host: {MARK}.example\r\n" + auth, target="http://api.example.test/v1/echo"),
        ),
        ("unknown host", req(f"Host: {MARK}.test\r\n" + auth, target=f"http://{MARK}.test/")),
        ("scope", req(host + auth + marked + "Content-Length: 1\r\n", "POST", body="x")),
        ("no credential", req(host + auth + marked, target="/nokey/x")),
        ("too large", req(host + auth + marked + "Content-Length: 1000\r\n", "PUT")),
        ("encoded slash", req(host + auth + marked, target="/api/a%2Fb")),
        ("trace", req(host + auth + marked, "TRACE")),
        ("connect", req(f"Host: {MARK}:443\r\n" + auth, "CONNECT", target=f"{MARK}:443")),
        ("header too large", req(host + auth + f"X-Big: {MARK}{'b' * 5000}\r\n")),
        (
            "framing",
            req(host + auth + f"X-Note: {MARK}\r\nContent-Length: 1\r\nContent-Length: 2\r\n"),
        ),
        ("bad header", req(host + auth + f"X-Note: {MARK}\r\n bad fold {MARK}\r\n")),
    ]


async def test_error_bodies_never_echo_headers_or_tokens(daemon: Any) -> None:
    """Every error credproxy makes itself is its JSON envelope, without the app's token or any header value."""
    upstream, d, port = daemon
    token = d.tokens["app"]
    for label, raw in _errors(port, token):
        answer = await exchange(port, raw)
        head, _, body = answer.partition(b"\r\n\r\n")
        codes = status_codes(answer)
        assert codes and 400 <= codes[0] < 600, (label, answer[:200])
        assert MARK.encode() not in answer.lower(), (label, answer)
        assert token.encode() not in answer and token[4:20].encode() not in answer, label
        for secret in KEYS.values():
            assert secret.encode() not in answer, label
        assert b"Traceback" not in answer and b'File "' not in answer, label
        doc = json.loads(body)
        assert set(doc) == {"error"} and doc["error"]["code"], label
        assert b"x-credproxy-error:" in head.lower(), label
    assert upstream.seen == []


@pytest.mark.parametrize("stage", ["required_scope", "send"])
async def test_internal_error_gives_a_bare_500(
    daemon: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, stage: str
) -> None:
    """A bug inside the pipeline gives the client a bare JSON 500: no traceback, no message, no secret."""
    upstream, d, port = daemon
    token = d.tokens["app"]

    def boom(*args: Any, **kwargs: Any) -> Any:
        headers = args[4] if len(args) > 4 else {}
        raise RuntimeError(f"internal detail {MARK} {token} {dict(headers)}")

    monkeypatch.setattr(proxy.pipeline, stage, boom)
    raw = (
        f"GET /api/echo HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {token}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    with caplog.at_level(logging.DEBUG):
        answer = await exchange(port, raw)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert status_codes(answer) == [500], answer[:300]
    assert json.loads(body) == {"error": {"code": "internal_error", "message": "internal error"}}
    for leak in (MARK, token, KEYS["key-read"], "Traceback", "RuntimeError", "pipeline.py"):
        assert leak.encode() not in answer, leak
    text = "\n".join(TextFormatter().format(r) for r in caplog.records)
    for leak in (MARK, token, KEYS["key-read"]):
        assert leak not in text, leak
    assert not any(r.exc_info for r in caplog.records), "a traceback was logged"
    monkeypatch.undo()
    again = await exchange(port, raw)
    assert status_codes(again) == [200], "the daemon did not recover"


async def test_internal_error_is_still_logged_once(
    daemon: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A request that ends in an internal error still gets exactly one access line, with status 500."""
    _, d, port = daemon

    def boom(*_args: Any, **_kw: Any) -> Any:
        raise RuntimeError("bug")

    monkeypatch.setattr(proxy.pipeline, "required_scope", boom)
    raw = (
        f"GET /api/echo HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Authorization: Bearer {d.tokens['app']}\r\nConnection: close\r\n\r\n"
    ).encode()
    with caplog.at_level(logging.INFO, logger="credproxy.access"):
        await exchange(port, raw)
    lines = [r for r in caplog.records if r.name == "credproxy.access"]
    assert len(lines) == 1 and getattr(lines[0], "status", None) == 500


# ---- exactly one credential upstream ------------------------------------------------------


@pytest.fixture
async def raw_upstream(ca: trustme.CA) -> AsyncIterator[RawUpstream]:
    up = await RawUpstream(server_context(ca)).start()
    yield up
    await up.close()


@pytest.mark.parametrize(
    ("auth_header", "extra"),
    [
        (None, "Authorization: Bearer sk_app_own_1\r\nAuthorization: Bearer sk_app_own_2\r\n"),
        (None, "authorization: Bearer sk_app_own_1\r\nAUTHORIZATION: Basic eDp5\r\n"),
        (None, "Connection: Authorization\r\nAuthorization: Bearer sk_app_own_1\r\n"),
        (None, "Connection: keep-alive, authorization, x-app\r\nX-App: 1\r\n"),
        (None, "Proxy-Authorization: Basic eDp5\r\nProxy-Authorization: Bearer sk_app_own\r\n"),
        ({"name": "X-Api-Key", "prefix": ""}, "X-Api-Key: sk_app_own_1\r\nx-api-key: sk_app_2\r\n"),
        (
            {"name": "X-Api-Key", "prefix": ""},
            "Connection: X-Api-Key\r\nAuthorization: Bearer sk_app_own_1\r\nX-API-KEY: mine\r\n",
        ),
        ({"name": "Authorization", "prefix": "token "}, "Authorization: token sk_app_own\r\n"),
    ],
)
async def test_exactly_one_credential_upstream(
    raw_upstream: RawUpstream, start_daemon: Any, ca_file: Path, auth_header: Any, extra: str
) -> None:
    """Whatever the app sends (two, renamed, Connection-named), the upstream gets the real key once, in its header."""
    doc = upstream_doc(raw_upstream.url, ca_file)
    if auth_header:
        doc["auth_header"] = auth_header
    d = await start_daemon(
        {"upstreams": {"api": doc}, "apps": {"app": {"upstreams": {"api": {"scopes": ["read"]}}}}},
        KEYS,
    )
    port = int(d.url.rsplit(":", 1)[1])
    raw = (
        f"GET /api/x HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"X-Credproxy-App-Token: {d.tokens['app']}\r\n{extra}Connection: close\r\n\r\n"
    ).encode()
    answer = await exchange(port, raw)
    assert status_codes(answer) == [200], answer[:300]
    (seen,) = raw_upstream.requests
    name = (auth_header or {}).get("name", "Authorization")
    prefix = (auth_header or {}).get("prefix", "Bearer ")
    assert seen.header(name) == [prefix + KEYS["key-read"]]
    if name.lower() != "authorization":
        assert seen.header("Authorization") == []
    assert seen.header("Proxy-Authorization") == []
    assert seen.header("X-Credproxy-App-Token") == []
    everything = str(seen.headers)
    assert "sk_app_own" not in everything and d.tokens["app"] not in everything


@pytest.mark.parametrize(
    "carrier",
    [
        "api-key: {token}",  # Azure-style SDKs
        "X-Api-Key: {token}",  # Anthropic-style SDKs, upstream using Authorization
        "uthorization: Bearer {token}",
        "Cookie: session=1; token={token}",
        "X-Debug: sent with {token} inside",
    ],
)
async def test_app_token_never_leaves_in_another_header(
    raw_upstream: RawUpstream, start_daemon: Any, ca_file: Path, carrier: str
) -> None:
    """An app token the app also copied into some other header is not sent to the upstream."""
    d = await start_daemon(
        {
            "upstreams": {"api": upstream_doc(raw_upstream.url, ca_file)},
            "apps": {"app": {"upstreams": {"api": {"scopes": ["read"]}}}},
        },
        KEYS,
    )
    port = int(d.url.rsplit(":", 1)[1])
    token = d.tokens["app"]
    raw = (
        f"GET /api/x HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {token}\r\n"
        f"{carrier.format(token=token)}\r\nX-Kept: yes\r\nConnection: close\r\n\r\n"
    ).encode()
    assert status_codes(await exchange(port, raw)) == [200]
    (seen,) = raw_upstream.requests
    assert token not in str(seen.headers) and token[4:24] not in str(seen.headers)
    assert seen.header("X-Kept") == ["yes"]


# ---- bodies pass byte for byte ------------------------------------------------------------

BINARY = bytes(range(256)) * 64 + b"\r\n0\r\n\r\nHTTP/1.1 200 OK\r\n\r\n" + os.urandom(4096)


def _response(request: RawRequest) -> bytes | list[bytes]:
    kind = request.target.rsplit("/", 1)[-1].partition("?")[0]
    if kind == "br":
        return (
            b"HTTP/1.1 200 OK\r\nContent-Encoding: br\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(len(BINARY)).encode() + b"\r\n\r\n" + BINARY
        )
    if kind == "chunked":
        half = len(BINARY) // 2
        chunks = b"".join(
            f"{len(part):x}\r\n".encode() + part + b"\r\n"
            for part in (BINARY[:half], BINARY[half:])
        )
        return [
            b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip, x-custom\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n" + chunks[:1000],
            chunks[1000:] + b"0\r\n\r\n",
        ]
    if kind == "head":
        return b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\nContent-Encoding: gzip\r\n\r\n"
    if kind == "forged":
        return (
            b"HTTP/1.1 403 Forbidden\r\nX-Credproxy-Error: forbidden\r\n"
            b"x-credproxy-app: evil\r\nContent-Length: 2\r\n\r\nno"
        )
    return b"HTTP/1.1 204 No Content\r\nContent-Encoding: gzip\r\n\r\n"


async def test_bodies_and_encodings_pass_byte_for_byte(
    raw_upstream: RawUpstream, start_daemon: Any, ca_file: Path
) -> None:
    """Binary, br, chunked, HEAD and 204 responses reach the app with the same bytes and Content-Encoding."""
    raw_upstream.responder = _response
    d = await start_daemon(
        {
            "upstreams": {"api": upstream_doc(raw_upstream.url, ca_file)},
            "apps": {"app": {"upstreams": {"api": {"scopes": ["read"]}}}},
        },
        KEYS,
    )
    port = int(d.url.rsplit(":", 1)[1])

    async def get(kind: str, method: str = "GET") -> tuple[bytes, bytes]:
        raw = (
            f"{method} /api/{kind} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Authorization: Bearer {d.tokens['app']}\r\nAccept-Encoding: gzip, br\r\n"
            "Connection: close\r\n\r\n"
        ).encode()
        head, _, body = (await exchange(port, raw)).partition(b"\r\n\r\n")
        return head.lower(), body

    head, body = await get("br")
    assert b"content-encoding: br" in head and body == BINARY
    assert f"content-length: {len(BINARY)}".encode() in head
    head, body = await get("chunked")
    assert b"content-encoding: gzip, x-custom" in head
    if b"transfer-encoding: chunked" in head:
        decoded, rest = b"", body
        while True:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line, 16)
            if size == 0:
                break
            decoded, rest = decoded + rest[:size], rest[size + 2 :]
        body = decoded
    assert body == BINARY
    head, body = await get("head", "HEAD")
    assert b"content-length: 1234" in head and b"content-encoding: gzip" in head and body == b""
    head, body = await get("empty")
    assert head.startswith(b"http/1.1 204") and body == b""
    head, body = await get("forged")
    assert head.startswith(b"http/1.1 403") and body == b"no"
    assert b"x-credproxy-" not in head, "an upstream could pass itself off as credproxy"


# ---- a gzip bomb costs nothing ------------------------------------------------------------

BOMB_MEMBER = gzip.compress(b"\0" * (1 << 20), 9)  # 1 MiB of zeros in ~1 KiB
BOMB = BOMB_MEMBER * 4096  # a valid multi-member gzip: ~4 MiB that inflates to 4 GiB
RSS_BOUND = 20 * 1024 * 1024


async def test_gzip_bomb_is_relayed_not_inflated(
    tmp_path: Path, ca: trustme.CA, ca_file: Path, daemon_procs: list[DaemonProcess]
) -> None:
    """A 4 MiB gzip body that inflates to 4 GiB is relayed byte for byte while the daemon's RSS stays flat."""
    head = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Encoding: gzip\r\n"
        b"Content-Length: " + str(len(BOMB)).encode() + b"\r\n\r\n"
    )
    up = await RawUpstream(server_context(ca), lambda _r: [head, BOMB]).start()
    spawned = spawn_daemon(
        tmp_path / "home",
        {
            "upstreams": {"api": upstream_doc(up.url, ca_file)},
            "apps": {"app": {"upstreams": {"api": {"scopes": ["read"]}}}},
        },
        KEYS,
        daemon_procs,
        log_level="warning",
    )
    try:
        await asyncio.to_thread(spawned.proc.wait_ready, spawned.admin)
        process = psutil.Process(spawned.pid)
        reader, writer = await asyncio.open_connection("127.0.0.1", spawned.port)

        async def fetch() -> tuple[bytes, bytes]:
            writer.write(
                f"GET /api/bomb HTTP/1.1\r\nHost: 127.0.0.1:{spawned.port}\r\n"
                f"Authorization: Bearer {spawned.tokens['app']}\r\n"
                "Accept-Encoding: gzip\r\n\r\n".encode()
            )
            await writer.drain()
            got_head = await reader.readuntil(b"\r\n\r\n")
            digest = hashlib.sha256()
            left = len(BOMB)
            while left:
                chunk = await reader.read(min(left, 1 << 16))
                assert chunk, "body cut short"
                digest.update(chunk)
                left -= len(chunk)
                peak[0] = max(peak[0], process.memory_info().rss)
            return got_head, digest.digest()

        peak = [0]
        await fetch()  # warm up pools and buffers
        baseline = process.memory_info().rss
        peak = [baseline]
        got_head, digest = await fetch()
        writer.close()
    finally:
        await up.close()
    assert got_head.startswith(b"HTTP/1.1 200")
    assert b"content-encoding: gzip" in got_head.lower()
    assert digest == hashlib.sha256(BOMB).digest()
    growth = peak[0] - baseline
    print(f"daemon RSS growth relaying a 4 GiB gzip bomb: {growth / 1e6:.1f} MB")
    assert growth < RSS_BOUND, f"daemon RSS grew by {growth / 1e6:.1f} MB relaying a gzip bomb"
    assert spawned.alive()
