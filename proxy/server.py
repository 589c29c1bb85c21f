"""Builds the listeners and owns the daemon's lifecycle.

`Daemon` holds the current config snapshot, the store, the upstream client pool
and the listeners; it starts them, swaps snapshots on reload, and drains on
shutdown. Malformed HTTP is answered here, before any handler runs, with the
same JSON envelope as every other credproxy error and without echoing the bytes
that were sent (they may hold a token).
"""

from __future__ import annotations

import asyncio
import errno
import gc
import logging
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong
from aiohttp.web_protocol import RequestHandler

from .config import Config, ConfigError, ListenAddress, load_config
from .errors import BadRequest, ProxyError, RequestTooLarge, render
from .forward import UpstreamClients
from .gate import Gates
from .hardening import file_mode_problems
from .metrics import Metrics
from .notify import Notifier
from .pipeline import Pipeline
from .route import MAIN
from .runtime import Snapshot
from .store import Store
from .vault import Vault

if TYPE_CHECKING:
    from .fleet import Fleet
    from .oauth import TokenManager

log = logging.getLogger("credproxy")


class StartupError(Exception):
    """A start-up failure the user can fix; its message says how."""


HEAD_TIMEOUT = 10.0  # seconds a client may take to send a request line and headers
MAX_CONNECTIONS = 1024  # open client connections per listener; more are closed at once


class _ProxyRequestHandler(RequestHandler):
    """aiohttp's connection handler, with credproxy's answers to malformed requests.

    It also bounds how long a request head may take to arrive (slowloris) and how
    many connections a listener holds, so slow or numerous clients cannot starve
    the others.
    """

    _head_timer: asyncio.TimerHandle | None = None
    _head_since: float | None = None  # loop time the pending request head began to arrive

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        manager = self._manager
        if manager is not None and len(manager.connections) > MAX_CONNECTIONS:
            log.warning("connection limit (%d) reached; closing a new connection", MAX_CONNECTIONS)
            transport.close()

    def data_received(self, data: bytes) -> None:
        # One timer per connection, not one per request: a request only notes when its
        # head began; the timer, when it fires, closes the connection if that head is
        # still incomplete after HEAD_TIMEOUT, or else sleeps until the pending head's own
        # deadline (or stops, when no head is pending).
        before = self._request_count
        if data and self._head_since is None and not self._request_in_progress:
            self._head_since = now = self._loop.time()
            if self._head_timer is None:
                self._head_timer = self._loop.call_at(now + HEAD_TIMEOUT, self._head_check)
        super().data_received(data)
        if self._request_count != before:
            self._head_since = None

    def _head_check(self) -> None:
        since = self._head_since
        if since is None:
            self._head_timer = None  # no head pending: the next one starts a timer
            return
        due = since + HEAD_TIMEOUT
        if self._loop.time() < due:
            self._head_timer = self._loop.call_at(due, self._head_check)
            return
        self._head_timer = None
        self._head_too_slow()

    def _head_too_slow(self) -> None:
        self._head_timer = None
        if self.transport is not None:
            log.warning("closed a connection whose request head took over %.0fs", HEAD_TIMEOUT)
            self.transport.close()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().connection_lost(exc)

    def handle_error(
        self,
        request: Any,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        error: ProxyError
        if isinstance(exc, LineTooLong):
            limit = exc.args[1] if len(exc.args) > 1 else None
            if limit == getattr(self._manager, "max_line_size", None):
                error = RequestTooLarge("request line too long", status=414)
            else:
                error = RequestTooLarge("request header too large", status=431)
        elif isinstance(exc, BadHttpMessage):
            error = BadRequest("malformed HTTP request")
        else:
            error = ProxyError("internal error")
        log.warning(
            "refused request from %s: %s (%s)",
            getattr(request, "remote", "?"),
            error.message,
            type(exc).__name__ if exc else status,
        )
        if request.writer.output_size > 0:
            raise ConnectionError("response already started")
        resp = render(error)
        resp.force_close()
        return resp

    def log_exception(self, *args: Any, **kw: Any) -> None:
        exc = kw.get("exc_info")
        name = type(exc).__name__ if isinstance(exc, BaseException) else "error"
        log.error("connection handler error: %s", name)


class _ProxyServer(web.Server):
    def __init__(self, handler: Any, *, max_line_size: int, max_field_size: int) -> None:
        super().__init__(
            handler,
            handler_cancellation=True,
            max_line_size=max_line_size,
            max_field_size=max_field_size,
            max_headers=100,
            auto_decompress=False,
            access_log=None,
            keepalive_timeout=75,
        )
        self.max_line_size = max_line_size

    def __call__(self) -> RequestHandler:
        return _ProxyRequestHandler(self, loop=self._loop, **self._kwargs)


@dataclass
class Listener:
    address: ListenAddress
    mode: str
    runner: web.BaseRunner = field(init=False)  # set once its socket is open


def _bind_error(address: ListenAddress, exc: OSError) -> StartupError:
    if exc.errno == errno.EADDRINUSE:
        why = "the address is already in use (another credproxy, or another program)"
        fix = "stop it or change the address in the config"
    elif exc.errno in (errno.EACCES, errno.EPERM):
        why = "permission denied"
        fix = "use a port above 1023 or a path you can write"
    elif exc.errno == errno.EADDRNOTAVAIL:
        why = "this machine has no such address"
        fix = "use 127.0.0.1 or an address of this machine"
    else:
        why = exc.strerror or str(exc)
        fix = "check the address in the config"
    return StartupError(f"cannot listen on {address}: {why}; {fix}")


async def start_site(
    address: ListenAddress,
    handler: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]] | web.Application,
    *,
    max_line_size: int = 8190,
    max_field_size: int = 8190,
) -> web.BaseRunner:
    """Open one listener; raise StartupError with the cause and fix if it cannot bind."""
    runner: web.BaseRunner
    if isinstance(handler, web.Application):
        runner = web.AppRunner(handler, access_log=None, handle_signals=False)
    else:
        server = _ProxyServer(handler, max_line_size=max_line_size, max_field_size=max_field_size)
        runner = web.ServerRunner(server, handle_signals=False)
    await runner.setup()
    site: web.BaseSite
    try:
        if address.kind == "unix":
            assert address.path is not None
            path = Path(address.path)
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.is_socket():
                path.unlink()  # a stale socket from a previous run
            site = web.UnixSite(runner, str(path))
            await site.start()
            os.chmod(path, 0o660)
        else:
            site = web.TCPSite(runner, address.host, address.port, reuse_address=True)
            await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise _bind_error(address, exc) from None
    return runner


def listen_plan(config: Config) -> dict[str, tuple[ListenAddress, str]]:
    """Every proxy listener the config asks for: key -> (address, mode)."""
    plan = {str(a): (a, MAIN) for a in config.listen}
    for name, upstream in config.upstreams.items():
        if upstream.listen is not None:
            plan[str(upstream.listen)] = (upstream.listen, name)
    return plan


class Daemon:
    """The running credproxy: snapshot, store, upstream pool, listeners."""

    def __init__(self, config: Config, store: Store, *, config_path: Path | None = None) -> None:
        self.config_path = config_path
        self.snapshot = Snapshot.build(config, 1)
        self.store = store
        self.vault = Vault(store, on_change=self._store_changed)
        self.oauth: dict[str, TokenManager] = {}
        self.clients = UpstreamClients()
        self.metrics = Metrics()
        self.pid = os.getpid()
        self.fleet: Fleet | None = None  # state: {backend: redis}; see docs/FLEET.md
        if config.state is not None and config.state.backend == "redis":
            from .fleet import Fleet

            self.fleet = Fleet(config.state, store.master.key)
        self.gates = Gates(self.metrics, fleet=self.fleet)
        self.pipeline = Pipeline(
            lambda: self.snapshot,
            lambda: self.vault,
            self.clients,
            self.metrics,
            self.gates,
            lambda: self.oauth,
        )
        self.listeners: dict[str, Listener] = {}
        self.started_at = time.time()
        self.last_reload: dict[str, Any] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._closing: set[asyncio.Task[None]] = set()
        self._last_failure: str | None = None
        self._stopping = asyncio.Event()
        self._reload_lock = asyncio.Lock()
        self.admin_runner: web.BaseRunner | None = None
        self.notifier = Notifier(None)  # serve() installs one that talks to systemd

    # ---- listeners -------------------------------------------------------------
    async def _open(self, key: str, address: ListenAddress, mode: str) -> None:
        limits = self.snapshot.config.limits

        # The handler holds its own listener, not a look-up by key: a request may arrive
        # before the listener is registered (the socket accepts once bound) or on a kept-alive
        # connection of one that a reload or shutdown has just taken away.
        listener = Listener(address, mode)

        def handler(request: web.BaseRequest) -> Awaitable[web.StreamResponse]:
            # A plain function handing aiohttp the pipeline's coroutine: no coroutine frame
            # of its own to resume on every suspension of the request.
            return self.pipeline.handle(request, listener.mode, listener.address)

        listener.runner = await start_site(
            address,
            handler,
            max_line_size=limits.max_header_bytes,
            max_field_size=limits.max_header_bytes + 1,
        )
        self.listeners[key] = listener
        where = f"upstream {mode}" if mode else "all upstreams"
        log.info("listening on %s (%s)", address, where)
        if not address.is_loopback():
            # The config allows this only when every app is bound to allow_from CIDRs.
            log.warning(
                "listener %s is reachable from other machines; apps are limited by their "
                "tokens and allow_from only",
                address,
            )

    async def _sync_listeners(self) -> None:
        plan = listen_plan(self.snapshot.config)
        for key in [k for k in self.listeners if k not in plan]:
            listener = self.listeners.pop(key)
            # Stop accepting now; requests in flight on it finish in the background.
            task = asyncio.get_running_loop().create_task(listener.runner.cleanup())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
            log.info("closing listener %s (requests in flight finish first)", key)
        for key, (address, mode) in plan.items():
            if key in self.listeners:
                self.listeners[key].mode = mode
            else:
                await self._open(key, address, mode)

    # ---- OAuth -----------------------------------------------------------------
    async def _sync_oauth(self) -> None:
        """One TokenManager per upstream with an oauth block; kept across reloads."""
        upstreams = self.snapshot.config.upstreams
        for name in [
            n for n in self.oauth if upstreams.get(n) is None or upstreams[n].oauth is None
        ]:
            await self.oauth.pop(name).close()
        for name, upstream in upstreams.items():
            if upstream.oauth is None:
                continue
            manager = self.oauth.get(name)
            if manager is None:
                from .oauth import TokenManager  # authlib only where OAuth is configured

                shared = None if self.fleet is None else self.fleet.tokens(name)
                manager = TokenManager(
                    name, upstream, self.store, metrics=self.metrics, shared=shared
                )
                self.oauth[name] = manager
                manager.start()
            else:
                manager.update_config(upstream)

    def _store_changed(self) -> None:
        for manager in self.oauth.values():
            manager.store_changed()

    # ---- lifecycle -------------------------------------------------------------
    async def start(self) -> None:
        from .admin import admin_app

        try:
            if self.fleet is not None:
                await self.fleet.start()
            await self._sync_oauth()
            await self._sync_listeners()
            admin = self.snapshot.config.admin_listen
            self.admin_runner = await start_site(admin, admin_app(self))
            log.info("admin listener on %s", admin)
        except BaseException:
            await self.close()
            raise
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self.vault.follow()))

    async def reload(self, reason: str) -> bool:
        """Load, validate and swap in the config file; keep the old one on any error."""
        if self.config_path is None:
            return False
        self.notifier.reloading()
        ok = False
        try:
            ok = await self._reload(reason)
        finally:
            failed = "" if ok else "; last reload failed, old config in force"
            self.notifier.ready(f"config version {self.snapshot.version}{failed}")
        return ok

    async def _reload(self, reason: str) -> bool:
        assert self.config_path is not None
        async with self._reload_lock:
            at = time.time()
            try:
                # A config others may write could repoint an upstream: never trust it.
                loose = file_mode_problems(self.config_path, self.store.path)
                if loose:
                    raise StartupError("; ".join(loose))
                config = await asyncio.to_thread(load_config, self.config_path)
                new = Snapshot.build(config, self.snapshot.version + 1)
                old = self.snapshot
                self.snapshot = new
                try:
                    await self._sync_listeners()
                except StartupError:
                    self.snapshot = old
                    await self._sync_listeners()
                    raise
                self.clients.sync(config.upstreams)
                self.gates.sync(config)
                await self._sync_oauth()
            except (ConfigError, StartupError) as exc:
                message = str(exc).replace("\n", "; ")
                self.last_reload = {"ok": False, "at": at, "error": message, "reason": reason}
                # Logged once per broken version, however often it is retried.
                level = logging.DEBUG if message == self._last_failure else logging.ERROR
                self._last_failure = message
                log.log(
                    level,
                    "config reload (%s) failed, old config stays in force: %s",
                    reason,
                    message,
                )
                self.metrics.config_reloads.labels("failed").inc()
                return False
            self.metrics.config_reloads.labels("ok").inc()
            self._last_failure = None
            self.last_reload = {"ok": True, "at": at, "error": None, "reason": reason}
            log.info("config reloaded (%s): version %d", reason, self.snapshot.version)
            return True

    def request_stop(self) -> None:
        if self._stopping.is_set():
            # A second signal: the operator does not want to wait for the drain.
            log.warning("second stop signal: exiting at once")
            for handler in logging.getLogger().handlers:
                handler.flush()
            os._exit(1)
        self._stopping.set()

    async def run(self, *, grace: float | None = None) -> None:
        """Serve until SIGTERM/SIGINT; SIGHUP reloads."""
        tune_gc()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.request_stop)
        loop.add_signal_handler(signal.SIGINT, self.request_stop)
        loop.add_signal_handler(
            signal.SIGHUP,
            lambda: loop.create_task(self.reload("SIGHUP")),
        )
        try:
            await self._stopping.wait()
            if grace is None:
                grace = self.snapshot.config.shutdown_grace
            log.info("shutting down: draining requests in flight (up to %.0fs)", grace)
            self.notifier.stopping(grace)
            # The handlers stay while draining, so a second signal can cut it short.
            await self.close(grace=grace)
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            if self.listeners or self.admin_runner is not None:
                await self.close(grace=0)

    async def close(self, grace: float = 5.0) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        listeners = list(self.listeners.values())
        self.listeners.clear()
        for listener in listeners:
            listener.runner._shutdown_timeout = grace
        await asyncio.gather(
            *(lst.runner.cleanup() for lst in listeners), *self._closing, return_exceptions=True
        )
        if self.admin_runner is not None:
            await self.admin_runner.cleanup()
            self.admin_runner = None
        await asyncio.gather(*(m.close() for m in self.oauth.values()), return_exceptions=True)
        self.oauth.clear()
        if self.fleet is not None:
            await self.fleet.close()
        await self.clients.close()
        try:
            self.vault.flush_usage()
        except Exception:
            log.warning("could not record last-used times in the store")


# The cyclic collector's first-generation threshold while serving (CPython's default: 700).
# Each proxied request allocates a few hundred container objects, nearly all freed by
# reference counting; at 700 a young-generation pass ran every few requests. Cyclic garbage
# now waits for 20,000 allocations (a few MB at most) instead.
GC_THRESHOLD = (20_000, 20, 20)


def tune_gc() -> None:
    """For the serving process only (`Daemon.run`): collect once, move everything alive
    after start-up (modules, config models, the TLS context) out of the collector's way
    (`gc.freeze`), and collect young objects less often."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLD)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
