"""The request pipeline: every proxied request goes through `Pipeline.handle`.

    reject tunnels -> identify (which app?) -> route (which upstream, which path?)
      -> authorize (may it?) -> credential (least privilege) -> forward -> relay

The security-critical order is visible here and nowhere else. Any stage may
answer the request itself by raising a ProxyError; `errors.render` turns it into
the JSON envelope. Exactly one access line is written per request.
"""

from __future__ import annotations

import logging
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp
from aiohttp import web

from .authorize import authorize, required_scope
from .config import ListenAddress
from .errors import (
    BadRequest,
    CredentialUnavailable,
    MethodNotAllowed,
    ProxyError,
    RequestTooLarge,
    render,
)
from .forward import (
    BodyCounter,
    UpstreamClients,
    request_headers,
    send,
    start_response,
    stream_body,
)
from .guard import check_request
from .identify import identify
from .logs import query_keys
from .metrics import Metrics
from .route import Target, candidates, resolve
from .runtime import Snapshot
from .secret import Secret
from .vault import Vault

access_log = logging.getLogger("credproxy.access")
log = logging.getLogger("credproxy.pipeline")

_TUNNELS = frozenset({"CONNECT"})
_NEVER = frozenset({"TRACE", "TRACK"})


@dataclass
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


def peer_uid(request: web.BaseRequest) -> int | None:
    """The uid of the process at the other end of a unix socket; None over TCP."""
    transport = request.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


class Pipeline:
    """Runs the stages for each request against the current snapshot."""

    def __init__(
        self,
        snapshot: Callable[[], Snapshot],
        vault: Callable[[], Vault],
        clients: UpstreamClients,
        metrics: Metrics,
    ) -> None:
        self._snapshot = snapshot
        self._vault = vault
        self.clients = clients
        self.metrics = metrics

    async def handle(
        self, request: web.BaseRequest, mode: str, address: ListenAddress | None = None
    ) -> web.StreamResponse:
        started = time.perf_counter()
        ex = Exchange(method=request.method)
        try:
            response = await self._run(request, mode, address, ex)
        except ProxyError as err:
            ex.error = err.code
            response = render(err)
        ex.status = response.status
        self._log(ex, started)
        return response

    async def _run(
        self,
        request: web.BaseRequest,
        mode: str,
        address: ListenAddress | None,
        ex: Exchange,
    ) -> web.StreamResponse:
        snap = self._snapshot()
        config = snap.config
        method = request.method
        if method in _TUNNELS:
            raise MethodNotAllowed(
                "CONNECT tunnels are not supported: send plain HTTP to credproxy"
            )
        if method in _NEVER:
            raise MethodNotAllowed(f"{method} is not allowed")

        check_request(request.headers, request.raw_path, address)

        vault = self._vault()
        tokens = {**vault.app_tokens(), **snap.config_tokens}
        caller = identify(request.headers, request.remote, config.apps, tokens, peer_uid(request))
        ex.app = caller.name

        target = resolve(request.raw_path, mode, config.upstreams, snap.hosts)
        ex.upstream = target.upstream_name
        ex.path = target.path + query_keys(target.query)

        needed = required_scope(method, target.path, snap.rules.get(target.upstream_name, ()))
        authorize(caller.name, caller.app, target.upstream_name, needed)

        cred_name, secret = self._credential(vault, target, needed)
        ex.credential = cred_name

        body = self._body(request, config.limits.max_body_bytes)
        if body is not None and request.headers.get("Expect", "").lower() == "100-continue":
            # Only now, with the app identified and authorised, ask it for the body.
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        auth = target.upstream.auth_header
        headers = request_headers(request.headers, auth.name, auth.prefix + secret.reveal())
        with self.clients.lease(target.upstream_name, target.upstream) as session:
            sent_at = time.perf_counter()
            upstream_resp = await send(
                session, method, target.url(), target.upstream, headers, body
            )
            self.metrics.upstream_seconds.labels(target.upstream_name).observe(
                time.perf_counter() - sent_at
            )
            ex.bytes_in = body.sent if body is not None else 0
            try:
                response = await start_response(request, upstream_resp)
                ex.status = response.status
                await self._stream(request, response, upstream_resp, ex)
            finally:
                upstream_resp.release()
        return response

    @staticmethod
    def _credential(vault: Vault, target: Target, needed: str) -> tuple[str, Secret]:
        refs = candidates(target.upstream_name, target.upstream, needed)
        for ref in refs:
            secret = vault.secret(ref.name)
            if secret is not None:
                return ref.name, secret
        names = ", ".join(r.name for r in refs)
        raise CredentialUnavailable(
            f"no stored credential for upstream '{target.upstream_name}' covers the "
            f"'{needed}' scope: add one with `credproxy keys add NAME` ({names})"
        )

    @staticmethod
    def _body(request: web.BaseRequest, limit: int) -> BodyCounter | None:
        length = request.headers.get("Content-Length")
        if length is not None:
            if not length.isdigit():
                raise BadRequest("invalid Content-Length")
            if int(length) > limit:
                raise RequestTooLarge(f"request body is over {limit} bytes")
        if not request.body_exists:
            return None
        return BodyCounter(request.content, limit)

    @staticmethod
    async def _stream(
        request: web.BaseRequest,
        response: web.StreamResponse,
        upstream_resp: aiohttp.ClientResponse,
        ex: Exchange,
    ) -> None:
        try:
            ex.bytes_out = await stream_body(request, response, upstream_resp)
        except (ConnectionError, aiohttp.ClientError, TimeoutError) as exc:
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
        ms = (time.perf_counter() - started) * 1000
        self.metrics.requests.labels(ex.app, ex.upstream, str(ex.status)).inc()
        access_log.info(
            "%s %s %s %s app=%s status=%d %.1fms in=%d out=%d%s",
            ex.method,
            ex.upstream,
            ex.path,
            "-" if ex.credential is None else f"cred={ex.credential}",
            ex.app,
            ex.status,
            ms,
            ex.bytes_in,
            ex.bytes_out,
            f" error={ex.error}" if ex.error else "",
            extra={
                "app": ex.app,
                "upstream": ex.upstream,
                "method": ex.method,
                "path": ex.path,
                "status": ex.status,
                "duration_ms": round(ms, 2),
                "bytes_in": ex.bytes_in,
                "bytes_out": ex.bytes_out,
                "credential": ex.credential,
                "error": ex.error,
            },
        )
