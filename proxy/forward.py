"""The upstream side: pooled HTTPS clients, header hygiene, streaming both ways.

One aiohttp ClientSession per upstream, TLS always verified (system CAs plus the
upstream's `ca_bundle`), proxy variables from the environment ignored, redirects
never followed, bodies never decompressed or buffered. Lower-layer client errors
are mapped here, once, to `upstream_unreachable` / `upstream_timeout`; raw
library errors never reach an app.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import ssl
from collections import deque
from collections.abc import AsyncIterator, Coroutine, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import hdrs, web
from multidict import CIMultiDict, CIMultiDictProxy

from .config import TimeoutsConfig, UpstreamConfig
from .errors import ProxyError, RequestTooLarge, UpstreamTimeout, UpstreamUnreachable
from .identify import TOKEN_PREFIX

log = logging.getLogger("credproxy.forward")

# Requests per upstream sent and waiting for the head of their answer at once; more wait for
# a slot (within the connect timeout). Streams hold no slot once their head has come, so this
# bounds the connections a burst opens (10,000 requests released from a hold) and not the
# number of open streams, which only the pool size bounds.
SENDING = 256

# RFC 9110 §7.6.1 hop-by-hop fields, plus the proxy's own and the legacy ones.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "proxy-authorization",
        "proxy-authenticate",
    }
)
# Request fields the app must not control upstream: identity, routing, overrides.
_STRIP_REQUEST = HOP_BY_HOP | {
    "host",
    "authorization",
    "expect",
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-forwarded-port",
    "x-real-ip",
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
    "x-original-url",
    "x-rewrite-url",
}
# Whole families: credproxy's own fields, and every X-Forwarded-* (host, prefix, scheme, …).
_STRIP_REQUEST_PREFIXES = ("x-credproxy-", "x-forwarded-")
# RFC 9110 §5.1 field-name = token
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")
# An app token in any other field (an SDK's own key header, a cookie) stays on this machine.
_APP_TOKEN = re.compile(re.escape(TOKEN_PREFIX) + r"[A-Za-z0-9_-]{40,}")


@functools.lru_cache(maxsize=1024)
def _is_token(name: str) -> bool:
    return _TOKEN.match(name) is not None


def _connection_tokens(value: str) -> frozenset[str]:
    return frozenset(t.strip().lower() for t in value.split(",") if t.strip())


# The values nearly every message carries, split once (no value a message sends is kept).
_COMMON_CONNECTION = {
    v: _connection_tokens(v) for v in ("keep-alive", "Keep-Alive", "close", "Close")
}


def _connection_named(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> frozenset[str]:
    """The field names a message's `Connection` header lists."""
    named: frozenset[str] = frozenset()
    for value in headers.getall(hdrs.CONNECTION, ()):
        tokens = _COMMON_CONNECTION.get(value)
        named |= _connection_tokens(value) if tokens is None else tokens
    return named


# What a field's name alone decides, per spelling of the name (names only, never values):
# its lower-case form if the name may pass, "" if the name alone removes the field.
_REQUEST_NAMES: dict[str, str] = {}
_RESPONSE_NAMES: dict[str, str] = {}
_NAMES_KEPT = 4096  # spellings remembered per table; others are decided each time
_NO_NAMES: frozenset[str] = frozenset()


def _request_name(name: str) -> str:
    lname = name.lower()
    passes = lname not in _STRIP_REQUEST and not lname.startswith(_STRIP_REQUEST_PREFIXES)
    if len(_REQUEST_NAMES) < _NAMES_KEPT:
        _REQUEST_NAMES[name] = lname if passes else ""
    return lname if passes else ""


def _response_name(name: str) -> str:
    lname = name.lower()
    passes = (
        lname not in HOP_BY_HOP
        and lname != "content-length"
        and not lname.startswith("x-credproxy-")
        and _is_token(name)
    )
    if len(_RESPONSE_NAMES) < _NAMES_KEPT:
        _RESPONSE_NAMES[name] = lname if passes else ""
    return lname if passes else ""


def request_headers(
    incoming: CIMultiDictProxy[str], auth_name: str, auth_value: str
) -> CIMultiDict[str]:
    """The headers sent upstream: the app's, cleaned, with exactly one credential.

    The credential is added after every removal, so no header the app names in
    `Connection` (or sends itself) can remove or duplicate it. A field carrying an app
    token (`cpx_…`) is never sent on, whatever its name.
    """
    named = _connection_named(incoming) if hdrs.CONNECTION in incoming else _NO_NAMES
    auth = auth_name.lower()
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in incoming.items():
        lname = _REQUEST_NAMES.get(name)
        if lname is None:
            lname = _request_name(name)
        if (
            not lname
            or lname == auth
            or lname in named
            or (TOKEN_PREFIX in value and _APP_TOKEN.search(value))
        ):
            continue
        out.add(name, value)
    out[auth_name] = auth_value
    return out


def response_headers(
    upstream: CIMultiDictProxy[str], out: CIMultiDict[str] | None = None
) -> CIMultiDict[str]:
    """The upstream's headers for the app, minus hop-by-hop ones and any `X-Credproxy-*`.

    `X-Credproxy-Error` marks credproxy's own answers; an upstream must not be able to forge it.
    A field whose name is not a token (`Content-Length : 5`, which a lenient parser let
    through) is dropped: relayed, it would sit beside credproxy's own framing. Added to
    `out` (a response's own headers) when given.
    """
    named = _connection_named(upstream) if hdrs.CONNECTION in upstream else _NO_NAMES
    if out is None:
        out = CIMultiDict()
    for name, value in upstream.items():
        lname = _RESPONSE_NAMES.get(name)
        if lname is None:
            lname = _response_name(name)
        if not lname or lname in named:
            continue
        out.add(name, value)
    return out


def make_ssl_context(ca_bundle: Path | None) -> ssl.SSLContext:
    """System trust store plus the upstream's extra CA file; TLS 1.2 at least."""
    ctx = ssl.create_default_context()
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca_bundle is not None:
        ctx.load_verify_locations(cafile=str(ca_bundle))
    return ctx


class Slots:
    """A counting semaphore whose free path is a plain call: no coroutine, no future.

    `take()` spends a slot if one is free and nobody waits (first come, first served);
    else the caller awaits `wait()`, which returns holding a slot. `give()` hands a slot
    to the longest waiter, or frees it.
    """

    __slots__ = ("_waiters", "free")

    def __init__(self, count: int) -> None:
        self.free = count
        self._waiters: deque[asyncio.Future[None]] = deque()

    def take(self) -> bool:
        if self.free > 0 and not self._waiters:
            self.free -= 1
            return True
        return False

    async def wait(self) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await fut
        except BaseException:
            if fut.done() and not fut.cancelled():
                self.give()  # handed a slot in the tick it was cancelled: pass it on
            else:
                fut.cancel()
                with suppress(ValueError):
                    self._waiters.remove(fut)
            raise

    def give(self) -> None:
        waiters = self._waiters
        while waiters:
            fut = waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return
        self.free += 1


class _StrictConnector(aiohttp.TCPConnector):
    """A connector that never reuses a pooled connection the upstream has spoken on.

    Bytes arriving on an idle keep-alive connection (a late or unsolicited response)
    would otherwise be handed to the next request on it, perhaps another app's
    (aiohttp issue #13656). Such a connection is closed instead of reused.

    `slots` bounds the requests waiting for their answer's head at once (see SENDING): a
    burst of released requests then reuses a few hundred connections instead of opening
    thousands, while open streams, whose heads have come, hold no slot.
    """

    def __init__(self, *args: Any, sending: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.slots = Slots(sending)

    def _get(self, key: Any, traces: list[Any]) -> Coroutine[Any, Any, Any]:
        # A plain method handing back aiohttp's own coroutine: no coroutine frame of its own.
        conns = self._conns.get(key)
        # aiohttp reuses from the left: drop spoken-on connections until a clean one leads.
        while conns and conns[0][0].should_close:
            proto, _t0 = conns.popleft()
            proto.close()
        if conns is not None and not conns:
            del self._conns[key]
        return super()._get(key, traces)


@dataclass(eq=False)
class _Pool:
    key: tuple[str, str | None]
    session: aiohttp.ClientSession
    active: int = 0
    retired: bool = False
    closing: asyncio.Task[None] | None = field(default=None, repr=False)


class UpstreamClients:
    """One pooled ClientSession per upstream, kept across reloads while unchanged.

    A session whose upstream changed or went away is retired: new requests get a
    fresh one, and the old one closes once its last request in flight finishes.
    """

    def __init__(self, *, pool_size: int = 4096, sending: int | None = None) -> None:
        self._pools: dict[str, _Pool] = {}
        self._retired: set[_Pool] = set()
        self._pool_size = pool_size
        self._sending = SENDING if sending is None else sending

    @staticmethod
    def _key(upstream: UpstreamConfig) -> tuple[str, str | None]:
        return (upstream.origin, str(upstream.ca_bundle) if upstream.ca_bundle else None)

    def _new(self, upstream: UpstreamConfig) -> _Pool:
        connector = _StrictConnector(
            ssl=make_ssl_context(upstream.ca_bundle),
            limit=self._pool_size,
            sending=self._sending,
            limit_per_host=0,
            ttl_dns_cache=60,
            keepalive_timeout=30,
        )
        session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,
            trust_env=False,
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
            cookie_jar=aiohttp.DummyCookieJar(),
            timeout=aiohttp.ClientTimeout(total=None),
        )
        return _Pool(self._key(upstream), session)

    def acquire(self, name: str, upstream: UpstreamConfig) -> _Pool:
        """The upstream's pool, counted as in use until `release(pool)` (call it exactly once)."""
        pool = self._pools.get(name)
        if pool is None or pool.key != _facts(upstream)[1]:
            if pool is not None:
                self._retire(pool)
            pool = self._pools[name] = self._new(upstream)
        pool.active += 1
        return pool

    def release(self, pool: _Pool) -> None:
        pool.active -= 1
        if pool.retired and pool.active == 0:
            self._close_later(pool)

    @contextmanager
    def lease(self, name: str, upstream: UpstreamConfig) -> Iterator[aiohttp.ClientSession]:
        pool = self.acquire(name, upstream)
        try:
            yield pool.session
        finally:
            self.release(pool)

    def sync(self, upstreams: dict[str, UpstreamConfig]) -> None:
        """Retire the sessions of upstreams that were removed or changed origin/CA."""
        for name, pool in list(self._pools.items()):
            upstream = upstreams.get(name)
            if upstream is None or self._key(upstream) != pool.key:
                del self._pools[name]
                self._retire(pool)

    def _retire(self, pool: _Pool) -> None:
        pool.retired = True
        self._retired.add(pool)
        if pool.active == 0:
            self._close_later(pool)

    def _close_later(self, pool: _Pool) -> None:
        if pool.closing is None:
            pool.closing = asyncio.get_running_loop().create_task(pool.session.close())
            pool.closing.add_done_callback(lambda _t: self._retired.discard(pool))

    async def close(self) -> None:
        pools = list(self._pools.values()) + list(self._retired)
        self._pools.clear()
        await asyncio.gather(*(p.session.close() for p in pools), return_exceptions=True)


class BodyCounter:
    """Streams the app's body upstream (after any bytes already read), refusing it past the limit."""

    def __init__(self, source: aiohttp.StreamReader, limit: int, prefix: bytes = b"") -> None:
        self.source = source
        self.limit = limit
        self.prefix = prefix
        self.sent = 0
        self.too_large = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        if self.prefix:
            self.sent += len(self.prefix)
            yield self.prefix
        async for chunk in self.source.iter_any():
            self.sent += len(chunk)
            if self.sent > self.limit:
                self.too_large = True
                raise RequestTooLarge(f"request body is over {self.limit} bytes")
            yield chunk


Body = bytes | BodyCounter | None


def _host_of(upstream: UpstreamConfig) -> str:
    return upstream.origin.split("://", 1)[1]


# id(upstream) -> (upstream, pool key, host, client timeout): what a request needs of its
# upstream's config (`origin` parses base_url; a pydantic model hashes field by field), taken
# once per config object. The object is kept in the entry, so a reused id never matches.
_FACTS: dict[int, tuple[UpstreamConfig, tuple[str, str | None], str, aiohttp.ClientTimeout]] = {}


def _facts(
    upstream: UpstreamConfig,
) -> tuple[UpstreamConfig, tuple[str, str | None], str, aiohttp.ClientTimeout]:
    entry = _FACTS.get(id(upstream))
    if entry is None or entry[0] is not upstream:
        if len(_FACTS) >= 256:  # old config versions' upstreams
            _FACTS.clear()
        entry = _FACTS[id(upstream)] = (
            upstream,
            UpstreamClients._key(upstream),
            _host_of(upstream),
            _client_timeout(upstream.timeouts),
        )
    return entry


@functools.lru_cache(maxsize=64)
def _client_timeout(t: TimeoutsConfig) -> aiohttp.ClientTimeout:
    # connect: the wait for a pool slot plus the connection, so no request waits forever
    return aiohttp.ClientTimeout(
        total=t.total, connect=t.connect * 6, sock_connect=t.connect, sock_read=t.idle
    )


async def send(
    session: aiohttp.ClientSession,
    method: str,
    url: str | object,
    upstream: UpstreamConfig,
    headers: CIMultiDict[str],
    body: Body,
) -> aiohttp.ClientResponse:
    """Send one attempt upstream; map every client failure to a ProxyError.

    Failures before the connection was established are marked `reached=False`: the
    request provably never reached the server, so any method may be tried again.
    """
    _upstream, _key, host, timeout = _facts(upstream)
    streamed = body if isinstance(body, BodyCounter) else None
    connector = session.connector
    slots = connector.slots if type(connector) is _StrictConnector else None
    try:
        if slots is not None and not slots.take():
            try:
                async with asyncio.timeout(timeout.connect):
                    await slots.wait()
            except TimeoutError:
                raise UpstreamTimeout(
                    f"no connection to {host} became free in time", reached=False
                ) from None
        try:
            return await session.request(
                method,
                url,  # type: ignore[arg-type]
                headers=headers,
                data=streamed.__aiter__() if streamed is not None else body,
                allow_redirects=False,
                timeout=timeout,
                proxy=None,
            )
        finally:
            if slots is not None:
                slots.give()
    except ProxyError:
        raise
    except aiohttp.ClientConnectorCertificateError as exc:
        reason = getattr(exc.certificate_error, "verify_message", None) or str(
            exc.certificate_error
        )
        raise UpstreamUnreachable(
            f"TLS certificate verification failed for {host}: {reason}",
            reached=False,
            transient=False,
        ) from None
    except aiohttp.ClientConnectorSSLError as exc:
        raise UpstreamUnreachable(
            f"TLS handshake with {host} failed: {exc.strerror}", reached=False, transient=False
        ) from None
    except aiohttp.ClientConnectorError as exc:
        raise UpstreamUnreachable(
            f"cannot connect to {host}: {exc.strerror}", reached=False
        ) from None
    except aiohttp.ConnectionTimeoutError:
        raise UpstreamTimeout(f"connecting to {host} timed out", reached=False) from None
    except (TimeoutError, aiohttp.ServerTimeoutError):
        raise UpstreamTimeout(f"{host} did not answer in time") from None
    except aiohttp.ServerDisconnectedError:
        if streamed is not None and streamed.too_large:
            raise RequestTooLarge(f"request body is over {streamed.limit} bytes") from None
        raise UpstreamUnreachable(f"{host} closed the connection before answering") from None
    except aiohttp.ClientResponseError as exc:
        # aiohttp's message quotes the offending bytes (a header value, body bytes): say only
        # what kind of answer it was.
        raise UpstreamUnreachable(
            f"{host} sent a malformed HTTP response ({type(exc).__name__})"
        ) from None
    except (aiohttp.ClientError, OSError) as exc:
        if streamed is not None and streamed.too_large:
            raise RequestTooLarge(f"request body is over {streamed.limit} bytes") from None
        raise UpstreamUnreachable(f"request to {host} failed: {type(exc).__name__}") from None


def _complete(content: aiohttp.StreamReader) -> bool:
    """Whether the upstream's whole body has arrived, without error."""
    return content.is_eof() and content.exception() is None


async def start_response(
    request: web.BaseRequest, upstream_resp: aiohttp.ClientResponse
) -> web.StreamResponse:
    """Send the upstream's status line and headers to the app."""
    resp = web.StreamResponse(status=upstream_resp.status, reason=upstream_resp.reason)
    response_headers(upstream_resp.headers, resp.headers)
    length = upstream_resp.headers.get(hdrs.CONTENT_LENGTH)
    if length is not None and length.isdigit():
        resp.content_length = int(length)
    if _complete(upstream_resp.content):
        # The whole body is already here: the head goes out with it in one write (one
        # system call, not two) as soon as stream_body runs, with no wait in between. A
        # body still arriving (a stream) gets its head at once, as before.
        resp._send_headers_immediately = False
    await resp.prepare(request)
    return resp


async def stream_body(
    request: web.BaseRequest, resp: web.StreamResponse, upstream_resp: aiohttp.ClientResponse
) -> int:
    """Copy the body chunk by chunk as it arrives (an SSE event is never held back)."""
    sent = 0
    if request.method != "HEAD" and upstream_resp.status not in (204, 304):
        content = upstream_resp.content
        if _complete(content):
            # All of it is buffered: one write with the head (see start_response).
            data = content.read_nowait()
            await resp.write_eof(data)
            return len(data)
        async for chunk in content.iter_any():
            sent += len(chunk)
            await resp.write(chunk)
    await resp.write_eof()
    return sent
