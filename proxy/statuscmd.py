"""`credproxy status`: the running daemon's /status, as a table for a person."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

import aiohttp

from .config import Config


async def fetch_status(config: Config, timeout: float = 3.0) -> dict[str, Any]:
    admin = config.admin_listen
    if admin.kind == "unix":
        connector: aiohttp.BaseConnector = aiohttp.UnixConnector(path=str(admin.path))
        url = "http://localhost/status"
    else:
        connector = aiohttp.TCPConnector()
        host = f"[{admin.host}]" if admin.host and ":" in admin.host else admin.host
        url = f"http://{host}:{admin.port}/status"
    async with (
        aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=timeout), trust_env=False
        ) as session,
        session.get(url) as resp,
    ):
        resp.raise_for_status()
        doc: dict[str, Any] = await resp.json()
        return doc


def _ago(ts: float | None) -> str:
    if not ts:
        return "-"
    return f"{time.strftime('%H:%M:%S', time.localtime(ts))} ({int(time.time() - ts)}s ago)"


def show_status(config: Config, *, as_json: bool = False) -> int:
    try:
        doc = asyncio.run(fetch_status(config))
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        print(
            f"credproxy: no daemon answers on {config.admin_listen} ({type(exc).__name__}): "
            "start it with `credproxy serve`",
            file=sys.stderr,
        )
        return 1
    if as_json:
        print(json.dumps(doc, indent=2))
        return 0
    cfg = doc.get("config", {})
    print(
        f"credproxy {doc.get('version')}  pid {doc.get('pid')}  up since {_ago(doc.get('started_at'))}"
    )
    print(
        f"config   {cfg.get('path')}  version {cfg.get('version')}  loaded {_ago(cfg.get('loaded_at'))}"
    )
    last = cfg.get("last_reload")
    if last:
        state = "ok" if last.get("ok") else f"FAILED: {last.get('error')}"
        print(f"reload   {_ago(last.get('at'))} {state}")
    print(f"listen   {', '.join(doc.get('listeners', []))}")
    print()
    print(f"{'UPSTREAM':<16}{'QUEUE':<12}{'HOLD UNTIL':<12}CREDENTIALS")
    for name, up in doc.get("upstreams", {}).items():
        queue = up.get("queue", {})
        creds = ", ".join(f"{c} ({v.get('state')})" for c, v in up.get("credentials", {}).items())
        hold = up.get("hold_until")
        hold_s = time.strftime("%H:%M:%S", time.localtime(hold)) if hold else "-"
        print(
            f"{name:<16}{queue.get('depth', 0)}/{queue.get('max_size', '-'):<10}{hold_s:<12}{creds}"
        )
    print()
    print(f"{'APP':<16}{'TOKENS':<8}UPSTREAMS")
    for name, app in doc.get("apps", {}).items():
        ups = "; ".join(f"{u}: {','.join(s)}" for u, s in app.get("upstreams", {}).items())
        print(f"{name:<16}{app.get('tokens', 0):<8}{ups}")
    return 0
