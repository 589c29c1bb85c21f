"""The request pipeline: every proxied request goes through `Pipeline.handle`.

    guard (Host, Origin, tunnels) -> identify (which app?) -> route (which upstream,
      which path?) -> authorize (may it?) -> credential (least privilege)
      -> gate (pace / queue / hold) -> forward (retry a 429, a 401 once, 5xx) -> relay

The security-critical order is visible here and nowhere else. Any stage may
answer the request itself by raising a ProxyError; `errors.render` turns it into
the JSON envelope. Exactly one access line is written per request.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import socket
import struct
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import aiohttp
from aiohttp import hdrs, web
from multidict import istr
from yarl import URL

from .authorize import authorize, required_scope
from .config import AppUpstream, Limits, ListenAddress
from .errors import (
    BadRequest,
    CredentialUnavailable,
    MethodNotAllowed,
    ProxyError,
    RequestTooLarge,
    UpstreamUnreachable,
    render,
)
from .forward import (
    Body,
    BodyCounter,
    UpstreamClients,
    request_headers,
    send,
    start_response,
    stream_body,
)
from .gate import Gates
from .guard import check_request
from .identify import TOKEN_FIELD, Caller, identify, token_key
from .logs import PRE_REDACTED, direct_handler, query_keys, redactor, write_direct
from .metrics import Metrics
from .ratelimit import Limiter
from .route import OAUTH_CREDENTIAL, Target, candidates, resolve
from .runtime import Snapshot
from .secret import Secret
from .vault import Vault

if TYPE_CHECKING:
    from .oauth import TokenManager  # imported only where an upstream uses OAuth

access_log = logging.getLogger("credproxy.access")
log = logging.getLogger("credproxy.pipeline")

_TUNNELS = frozenset({"CONNECT"})
_NEVER = frozenset({"TRACE", "TRACK"})


@dataclass(slots=True)
class Exchange:
    """What the access line reports about one request."""

    method: str
    app: str = "-"
    upstream: str = "-"
    path: str = "-"
    status: int = 0
    error: str | None = None
    bytes_in: int = 0
    bytes_out: int = 0
    credential: str | None = None
    retries: int = 0


_RETRY_STATUSES = frozenset({502, 503, 504})
CLIENT_GONE = 499  # logged (never sent) when the app disconnects before its answer
_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
MAX_WAIT_HEADER = "X-Credproxy-Max-Wait"
_MAX_WAIT_FIELD = istr(MAX_WAIT_HEADER)  # look-ups by istr skip lower-casing the name
VERDICTS_KEPT = 1024  # request shapes whose verdict _decide remembers (emptied when full)
_BACKOFF_BASE = 0.2
_BACKOFF_CAP = 5.0


class Credential(Protocol):
    """What the pipeline needs of a credential: its name and a current value."""

    @property
    def name(self) -> str: ...

    async def value(self) -> Secret: ...

    async def after_unauthorized(self, used: Secret) -> Secret | None:
        """A fresh value after the upstream refused `used` with 401, or None if none can be had."""
        ...


@dataclass(frozen=True, slots=True)
class StoredKey:
    """An API key from the store: its value does not change by itself."""

    name: str
    secret: Secret

    async def value(self) -> Secret:
        return self.secret

    async def after_unauthorized(self, used: Secret) -> Secret | None:
        return None


@dataclass(frozen=True, slots=True)
class OAuthCredential:
    """An OAuth access token, kept fresh by the upstream's TokenManager."""

    manager: TokenManager
    name: str = OAUTH_CREDENTIAL

    async def value(self) -> Secret:
        return await self.manager.access_token()

    async def after_unauthorized(self, used: Secret) -> Secret | None:
        return await self.manager.after_unauthorized(used)


def _max_wait(request: web.BaseRequest, configured: float) -> float:
    """The wait budget: the upstream's max_wait, lowered (never raised) by the app's header."""
    asked = request.headers.get(_MAX_WAIT_FIELD)
    if asked is None:
        return configured
    try:
        value = float(asked)
    except ValueError:
        raise BadRequest(f"{MAX_WAIT_HEADER} must be a number of seconds") from None
    if not math.isfinite(value) or value < 0:
        raise BadRequest(f"{MAX_WAIT_HEADER} must be a number of seconds")
    return min(value, configured)


async def _read_body(request: web.BaseRequest, limits: Limits) -> Body:
    """The app's body: kept whole (so it can be replayed) up to replay_buffer_bytes, else streamed."""
    length = request.headers.get(hdrs.CONTENT_LENGTH)
    if length is not None:
        if not length.isdigit():
            raise BadRequest("invalid Content-Length")
        if int(length) > limits.max_body_bytes:
            raise RequestTooLarge(f"request body is over {limits.max_body_bytes} bytes")
    if not request.body_exists:
        return None
    keep = min(limits.replay_buffer_bytes, limits.max_body_bytes)
    if length is not None and int(length) > keep:
        return BodyCounter(request.content, limits.max_body_bytes)
    parts: list[bytes] = []
    size = 0
    while size <= keep:
        chunk = await request.content.readany()
        if not chunk:
            return b"".join(parts)
        parts.append(chunk)
        size += len(chunk)
    # Larger than the replay buffer: what was read goes first, the rest streams.
    return BodyCounter(request.content, limits.max_body_bytes, prefix=b"".join(parts))


def _may_retry(policy: str, method: str) -> bool:
    return policy == "always" or (policy == "idempotent" and method in _IDEMPOTENT)


async def _backoff(attempt: int, deadline: float) -> bool:
    """Sleep a capped, jittered exponential delay; False (no sleep) if it would pass the deadline."""
    delay = min(_BACKOFF_CAP, _BACKOFF_BASE * 2**attempt) * random.uniform(0.5, 1.0)  # noqa: S311
    if time.monotonic() + delay > deadline:
        return False
    await asyncio.sleep(delay)
    return True


async def _small_body(resp: aiohttp.ClientResponse, cap: int = 65536) -> bytes:
    """Up to `cap` bytes of an error body (a 429's retry_after lives there)."""
    data = bytearray()
    try:
        async for chunk in resp.content.iter_any():
            data += chunk
            if len(data) >= cap:
                break
    except (aiohttp.ClientError, TimeoutError):
        pass
    return bytes(data[:cap])


def peer_uid(request: web.BaseRequest) -> int | None:
    """The uid of the process at the other end of a unix socket; None over TCP."""
    transport = request.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


@dataclass(slots=True)
class Verdict:
    """What `Pipeline._decide` decided for a request shape, and what follows from it."""

    address: ListenAddress | None  # the listener it was decided on
    caller: Caller
    target: Target
    needed: str  # the scope
    path: str  # as the access line gives it
    grant: AppUpstream  # the caller's grant on the target's upstream
    url: URL
    # The stored key chosen for it while the upstream had no OAuth grant, and its gate.
    stored: tuple[StoredKey, Limiter] | None = None


class Pipeline:
    """Runs the stages for each request against the current snapshot."""

    def __init__(
        self,
        snapshot: Callable[[], Snapshot],
        vault: Callable[[], Vault],
        clients: UpstreamClients,
        metrics: Metrics,
        gates: Gates,
        oauth: Callable[[], Mapping[str, TokenManager]] = dict,
    ) -> None:
        self._snapshot = snapshot
        self._vault = vault
        self.clients = clients
        self.metrics = metrics
        self.gates = gates
        self._oauth = oauth
        self._tallies = metrics.tallies
        self._series: dict[str, tuple[Any, Any]] = {}
        self._verdicts: dict[tuple[object, ...], Verdict] = {}  # see _decide
        self._verdicts_snap: Snapshot | None = None
        self._verdicts_tokens: Mapping[str, str] | None = None

    async def handle(
        self, request: web.BaseRequest, mode: str, address: ListenAddress | None = None
    ) -> web.StreamResponse:
        """Run every stage for one request; always one access line and one count.

        The stages run in this one coroutine (no nested `_run`): every suspension of a
        request (the upstream's answer, the body) resumes through each coroutine frame
        on the way, so fewer frames cost less on each of them.
        """
        started = time.perf_counter()
        ex = Exchange(request.method)
        try:
            snap = self._snapshot()
            config = snap.config
            method = ex.method
            if method in _TUNNELS:
                raise MethodNotAllowed(
                    "CONNECT tunnels are not supported: send plain HTTP to credproxy"
                )
            if method in _NEVER:
                raise MethodNotAllowed(f"{method} is not allowed")

            headers_in = request.headers
            vault = self._vault()
            verdict = self._decide(ex, request, snap, vault, mode, address)
            caller, target = verdict.caller, verdict.target
            upstream_name = target.upstream_name
            upstream = target.upstream

            manager = self._oauth().get(upstream_name)
            stored = verdict.stored
            if (
                stored is not None
                and manager is None
                and vault.secret(stored[0].name) is stored[0].secret
            ):
                credential: Credential
                credential, limiter = stored
            else:
                credential = self._credential(snap, vault, target, verdict.needed, manager)
                limiter = self.gates.limiter(upstream_name, credential.name, upstream)
                if manager is None and type(credential) is StoredKey:
                    # The choice holds while the store and the config stay as they are, and
                    # both empty the verdict table when they change.
                    verdict.stored = (credential, limiter)
            ex.credential = credential.name
            grant = verdict.grant
            deadline = time.monotonic() + _max_wait(request, upstream.queue.max_wait)

            body_exists = request.body_exists
            if body_exists and headers_in.get(hdrs.EXPECT, "").lower() == "100-continue":
                # Only now, with the app identified and authorised, ask it for the body.
                await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            body = (
                await _read_body(request, config.limits)
                if body_exists or hdrs.CONTENT_LENGTH in headers_in
                else None  # what _read_body says without a body or a length to check
            )
            replayable = not isinstance(body, BodyCounter)
            retries = upstream.retries
            attempt = 0  # retries spent on 5xx and connection failures
            after_429 = False
            refreshed = False
            waited, latency = self._upstream_series(upstream_name)
            retried = self.metrics.retries
            auth = upstream.auth_header
            url = verdict.url
            pool = self.clients.acquire(upstream_name, upstream)
            session = pool.session
            try:
                while True:
                    if not limiter.try_acquire(
                        caller.name, app_limit=grant.rate_limit, retry=after_429
                    ):
                        queued_at = time.monotonic()
                        await limiter.acquire(
                            caller.name,
                            deadline=deadline,
                            app_limit=grant.rate_limit,
                            retry=after_429,
                        )
                        wait = time.monotonic() - queued_at
                        if wait > 0.0005:  # the histogram describes requests that waited
                            waited.observe(wait)
                    try:
                        # A stored key's value is at hand: no coroutine for it.
                        secret = (
                            credential.secret
                            if type(credential) is StoredKey
                            else await credential.value()
                        )
                    except BaseException:
                        limiter.release(caller.name)
                        raise
                    headers = request_headers(headers_in, auth.name, auth.prefix + secret.reveal())
                    sent_at = time.perf_counter()
                    try:
                        upstream_resp = await send(session, method, url, upstream, headers, body)
                    except UpstreamUnreachable as err:
                        if err.reached:
                            limiter.reached()
                        else:
                            limiter.release(caller.name)
                        if (
                            replayable
                            and err.transient
                            and attempt < retries.max
                            and (not err.reached or _may_retry(retries.on_5xx, method))
                            and await _backoff(attempt, deadline)
                        ):
                            attempt += 1
                            ex.retries += 1
                            retried.labels(
                                upstream_name, "connect" if not err.reached else "5xx"
                            ).inc()
                            continue
                        raise
                    except BaseException:
                        limiter.reached()  # cancelled or failed mid-send: it may have arrived
                        raise
                    limiter.reached()
                    latency.observe(time.perf_counter() - sent_at)
                    status = upstream_resp.status
                    if status == 429 and replayable:
                        # The server did not process it: hold, then send the same request again.
                        limiter.observe(
                            status, upstream_resp.headers, await _small_body(upstream_resp)
                        )
                        upstream_resp.release()
                        after_429 = True
                        ex.retries += 1
                        retried.labels(upstream_name, "429").inc()
                        continue
                    limiter.observe(status, upstream_resp.headers)
                    after_429 = False
                    if status == 401 and replayable and not refreshed:
                        try:
                            fresh = await credential.after_unauthorized(secret)
                        except BaseException:
                            upstream_resp.release()
                            raise
                        if fresh is not None:
                            upstream_resp.release()
                            refreshed = True
                            ex.retries += 1
                            retried.labels(upstream_name, "401").inc()
                            continue
                    if (
                        status in _RETRY_STATUSES
                        and replayable
                        and attempt < retries.max
                        and _may_retry(retries.on_5xx, method)
                        and await _backoff(attempt, deadline)
                    ):
                        upstream_resp.release()
                        attempt += 1
                        ex.retries += 1
                        retried.labels(upstream_name, "5xx").inc()
                        continue
                    break
                ex.bytes_in = len(body) if isinstance(body, bytes) else body.sent if body else 0
                try:
                    response = await start_response(request, upstream_resp)
                    ex.status = response.status
                    try:
                        ex.bytes_out = await stream_body(request, response, upstream_resp)
                    except (ConnectionError, aiohttp.ClientError, TimeoutError) as exc:
                        self._stream_cut(request, ex, exc)
                finally:
                    upstream_resp.release()
            finally:
                self.clients.release(pool)
        except ProxyError as err:
            ex.error = err.code
            response = render(err)
        except Exception as exc:
            if request.transport is None or (ex.status and ex.bytes_out):
                raise  # the answer is already under way: only aiohttp can cut it now
            # A bug of ours: the app gets the bare envelope and the log one line naming the
            # exception type; neither gets a traceback or the exception's text (it may hold a
            # header or a token).
            log.error("internal error on %s %s: %s", ex.method, ex.path, type(exc).__name__)
            internal = ProxyError("internal error")
            ex.error = internal.code
            response = render(internal)
        except asyncio.CancelledError:
            # The app went away (while queued, waiting or streaming): nothing more is sent.
            ex.status = ex.status or CLIENT_GONE
            ex.error = ex.error or "client_disconnected"
            self._log(ex, started)
            raise
        ex.status = response.status
        self._log(ex, started)
        return response

    def _decide(
        self,
        ex: Exchange,
        request: web.BaseRequest,
        snap: Snapshot,
        vault: Vault,
        mode: str,
        address: ListenAddress | None,
    ) -> Verdict:
        """guard -> identify -> route -> authorize: who calls, where to, with which scope.

        What these stages decide depends only on the request's method, target, Host, app
        token, source (address or peer uid) and listener, and on the config version and
        the store's app tokens. A request like one already allowed under the same config
        and tokens gets that verdict again from a table, without running them; the table
        is emptied when either changes. It is keyed by a hash of the token (`token_key`),
        never the token, and holds allowed requests only: a refused one runs every stage
        again, so it is refused for the same reason, in the same order. Requests carrying
        a browser's Origin or Sec-Fetch-Site, or other than one Host, always run every
        stage.
        """
        headers = request.headers
        raw_path = request.raw_path
        method = ex.method
        uid = peer_uid(request) if address is not None and address.kind == "unix" else None
        tokens = vault.app_tokens()
        key: tuple[object, ...] | None = None
        hosts = headers.getall(hdrs.HOST, ())
        if len(hosts) == 1 and hdrs.ORIGIN not in headers and hdrs.SEC_FETCH_SITE not in headers:
            if self._verdicts_snap is not snap or self._verdicts_tokens is not tokens:
                self._verdicts.clear()
                self._verdicts_snap, self._verdicts_tokens = snap, tokens
            # identify reads these two fields and nothing else of the headers: a fingerprint
            # of their values stands for the token it finds (values hold no line breaks).
            own = headers.getall(TOKEN_FIELD, ())
            auth = headers.getall(hdrs.AUTHORIZATION, ())
            key = (
                method,
                raw_path,
                hosts[0],
                token_key("\n".join(own) + "\0" + "\n".join(auth)) if own or auth else None,
                request.remote,
                uid,
                mode,
                id(address),
            )
            verdict = self._verdicts.get(key)
            if verdict is not None and verdict.address is address:
                ex.app = verdict.caller.name
                ex.upstream = verdict.target.upstream_name
                ex.path = verdict.path
                return verdict
        config = snap.config
        check_request(headers, raw_path, address)
        caller = identify(headers, request.remote, config.apps, snap.config_tokens, uid, tokens)
        ex.app = caller.name
        target = resolve(raw_path, mode, config.upstreams, snap.hosts)
        ex.upstream = target.upstream_name
        ex.path = target.path + query_keys(target.query) if target.query else target.path
        needed = required_scope(method, target.path, snap.rules.get(target.upstream_name, ()))
        authorize(caller.name, caller.app, target.upstream_name, needed)
        verdict = Verdict(
            address,
            caller,
            target,
            needed,
            ex.path,
            caller.app.upstreams[target.upstream_name],
            target.url(),
        )
        if key is not None:
            if len(self._verdicts) >= VERDICTS_KEPT:
                self._verdicts.clear()
            self._verdicts[key] = verdict
        return verdict

    def _upstream_series(self, upstream: str) -> tuple[Any, Any]:
        """The queue-wait and latency histograms of an upstream, labelled once."""
        series = self._series.get(upstream)
        if series is None:
            series = self._series[upstream] = (
                self.metrics.queue_wait.labels(upstream),
                self._tallies.upstream(upstream),
            )
        return series

    def _credential(
        self,
        snap: Snapshot,
        vault: Vault,
        target: Target,
        needed: str,
        manager: TokenManager | None,
    ) -> Credential:
        """The least privileged credential that covers `needed` and can be used now.

        The candidates, in order, come from the snapshot's table (built once per config
        version); whether each one is in the store is asked whenever the store changed
        (a verdict keeps the choice until then), so a key added or removed at run time
        counts within the store's poll interval.
        """
        refs = snap.credentials.get((target.upstream_name, needed, manager is not None))
        if refs is None:  # no credential covers it (or a scope outside the table): say why
            refs = tuple(
                candidates(target.upstream_name, target.upstream, needed, oauth=manager is not None)
            )
        for ref in refs:
            if ref.name == OAUTH_CREDENTIAL and manager is not None:
                if manager.state in ("ok", "refreshing") or ref is refs[-1]:
                    return OAuthCredential(manager)
                continue
            secret = vault.secret(ref.name)
            if secret is not None:
                return StoredKey(ref.name, secret)
        names = ", ".join(r.name for r in refs)
        raise CredentialUnavailable(
            f"no stored credential for upstream '{target.upstream_name}' covers the "
            f"'{needed}' scope: add one with `credproxy keys add NAME` ({names})"
        )

    @staticmethod
    def _stream_cut(request: web.BaseRequest, ex: Exchange, exc: BaseException) -> None:
        """The body stream broke after the status line went out."""
        # The status line is already out: the only honest signal left is to cut
        # the connection, so the app sees a truncated body, not a clean one.
        ex.error = "stream_aborted"
        log.warning(
            "stream %s %s for app %s cut short: %s",
            ex.upstream,
            ex.path,
            ex.app,
            type(exc).__name__,
        )
        if request.transport is not None:
            request.transport.close()

    def _log(self, ex: Exchange, started: float) -> None:
        """One access line and one request count; built without the generic logging path."""
        self._tallies.count(ex.app, ex.upstream, ex.status)
        if not access_log.isEnabledFor(logging.INFO):
            return
        ms = (time.perf_counter() - started) * 1000
        path = redactor.path(ex.path) if ex.path != "-" else ex.path
        cred = "-" if ex.credential is None else f"cred={ex.credential}"
        tail = (f" retries={ex.retries}" if ex.retries else "") + (
            f" error={ex.error}" if ex.error else ""
        )
        message = (
            f"{ex.method} {ex.upstream} {path} {cred} app={ex.app} status={ex.status} "
            f"{ms:.1f}ms in={ex.bytes_in} out={ex.bytes_out}{tail}"
        )
        handler = direct_handler(access_log)
        if handler is not None and not handler.json:
            # Only the daemon's own handler listens: format and write the line as it would,
            # without a LogRecord and the generic logging path.
            write_direct(handler, access_log, message)
            return
        extra = {
            "app": ex.app,
            "upstream": ex.upstream,
            "method": ex.method,
            "path": path,
            "status": ex.status,
            "duration_ms": round(ms, 2),
            "bytes_in": ex.bytes_in,
            "bytes_out": ex.bytes_out,
            "credential": ex.credential,
            "error": ex.error,
            "retries": ex.retries,
        }
        if handler is not None:
            write_direct(handler, access_log, message, extra)
            return
        extra[PRE_REDACTED] = True
        record = access_log.makeRecord(
            access_log.name, logging.INFO, "", 0, message, (), None, extra=extra
        )
        access_log.handle(record)
