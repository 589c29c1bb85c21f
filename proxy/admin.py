"""The admin listener: health, readiness, metrics, status and reload.

It is a separate aiohttp application that never goes through the proxy
pipeline, binds loopback or a unix socket only (the config refuses anything
else), and never shows a secret: /status carries names, states and numbers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from . import __version__
from .config import ListenAddress
from .errors import ProxyError, render
from .guard import check_request
from .hardening import process_state
from .store import StoreError

if TYPE_CHECKING:
    from .server import Daemon

DAEMON: web.AppKey[Daemon] = web.AppKey("daemon")


def status_document(daemon: Daemon) -> dict[str, Any]:
    """The /status JSON (SPEC "Admin listener"); names and numbers, never values."""
    snap = daemon.snapshot
    config = snap.config
    try:
        stored = {info.name for info in daemon.store.info()}
        counts = daemon.store.app_token_counts()
    except StoreError:
        stored, counts = set(), {}
    config_counts: dict[str, int] = {}
    for name, app in config.apps.items():
        config_counts[name] = len(app.token_sha256)
    upstreams: dict[str, Any] = {}
    for name, up in config.upstreams.items():
        creds: dict[str, dict[str, Any]] = {
            ref.name: {"state": "ok" if ref.name in stored else "missing", "expires_at": None}
            for ref in up.credentials
        }
        manager = daemon.oauth.get(name)
        if manager is not None:
            creds["oauth"] = {"state": manager.state, "expires_at": manager.expires_at}
            if manager.state not in ("ok", "refreshing"):
                creds["oauth"]["error"] = manager.last_error
        for ref_name, state in creds.items():
            gate = daemon.gates.credential_state(name, ref_name)
            if gate is not None:
                state["rate_limit"] = gate["rate_limit"]
                state["hold_until"] = gate["hold_until"]
                if "fleet" in gate:
                    state["fleet"] = gate["fleet"]  # shared, local (Redis down) or closed
        upstreams[name] = {
            "base_url": up.base_url,
            **daemon.gates.upstream_state(name, up),
            "credentials": creds,
        }
    apps = {
        name: {
            "tokens": counts.get(name, 0) + config_counts.get(name, 0),
            "upstreams": {u: sorted(g.scopes) for u, g in app.upstreams.items()},
        }
        for name, app in config.apps.items()
    }
    return {
        "version": __version__,
        "pid": daemon.pid,
        "process": process_state(),
        "started_at": daemon.started_at,
        "config": {
            "path": str(daemon.config_path) if daemon.config_path else None,
            "version": snap.version,
            "loaded_at": snap.loaded_at,
            "last_reload": daemon.last_reload,
        },
        "store": {"path": str(daemon.store.path), "error": daemon.vault.last_error},
        "listeners": sorted(daemon.listeners),
        "state": daemon.fleet.status() if daemon.fleet is not None else {"backend": "memory"},
        "upstreams": upstreams,
        "apps": apps,
    }


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "alive"})


async def readyz(request: web.Request) -> web.Response:
    daemon = request.app[DAEMON]
    reasons = []
    if not daemon.listeners:
        reasons.append("no proxy listener is open")
    try:
        daemon.store.generation()
    except StoreError as exc:
        reasons.append(str(exc))
    degraded: list[str] = []  # fleet mode on a local share: ready, and says so
    if daemon.fleet is not None:
        ready, note = daemon.fleet.readiness()
        if note is not None:
            (degraded if ready else reasons).append(note)
    if reasons:
        return web.json_response({"ready": False, "reasons": reasons}, status=503)
    body: dict[str, Any] = {"ready": True, "reasons": []}
    if degraded:
        body["degraded"] = degraded
    return web.json_response(body)


async def status(request: web.Request) -> web.Response:
    return web.json_response(status_document(request.app[DAEMON]))


async def metrics(request: web.Request) -> web.Response:
    daemon = request.app[DAEMON]
    daemon.gates.update_metrics()
    body = daemon.metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def reload(request: web.Request) -> web.Response:
    daemon = request.app[DAEMON]
    ok = await daemon.reload("POST /reload")
    return web.json_response(
        {"ok": ok, "last_reload": daemon.last_reload}, status=200 if ok else 422
    )


def _browser_guard(address: ListenAddress) -> Any:
    """The proxy listeners' Host/Origin rules, for the admin listener too.

    A page on a rebinding name could otherwise read /status and /metrics, and a
    cross-site form could POST /reload.
    """

    @web.middleware
    async def guard(request: web.Request, handler: Any) -> web.StreamResponse:
        try:
            check_request(request.headers, "/", address)
        except ProxyError as err:
            return render(err)
        response: web.StreamResponse = await handler(request)
        return response

    return guard


def admin_app(daemon: Daemon) -> web.Application:
    app = web.Application(middlewares=[_browser_guard(daemon.snapshot.config.admin_listen)])
    app[DAEMON] = daemon
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/status", status)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/reload", reload)
    return app
