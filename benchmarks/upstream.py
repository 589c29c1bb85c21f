"""A small TLS upstream for the benchmark: a bearer-checked JSON endpoint and an SSE stream.

    python benchmarks/upstream.py --port P --cert cert.pem --key key.pem

The expected bearer keys come from the environment (BENCH_KEYS, comma-separated), never
argv. Endpoints (any other path: 404):

- GET /v1/auth/test: 200 {"ok": true, ...} with a known key, else 401 (the JSON endpoint
  used when nginx is not installed).
- GET /v1/stream?events=N&interval=S: an SSE stream of N events, `interval` seconds apart
  (0: as fast as the socket takes them); each event carries the epoch time it was written,
  so a client can tell how long it spent in between (same machine, same clock).

Loopback only: the address is 127.0.0.1 whatever is asked.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import ssl
import time

from aiohttp import web

OK_BODY = b'{"ok":true,"user_id":"user_bench","scopes":["read"]}'
DENIED_BODY = b'{"error":{"code":"unauthorized","message":"Invalid or missing API key"}}'
MAX_EVENTS = 1_000_000
MAX_INTERVAL = 60.0


def build_app(keys: frozenset[str]) -> web.Application:
    expected = frozenset(f"Bearer {k}" for k in keys)

    def allowed(request: web.Request) -> bool:
        values = request.headers.getall("Authorization", [])
        return len(values) == 1 and values[0] in expected

    async def auth_test(request: web.Request) -> web.Response:
        if not allowed(request):
            return web.Response(status=401, body=DENIED_BODY, content_type="application/json")
        return web.Response(body=OK_BODY, content_type="application/json")

    async def stream(request: web.Request) -> web.StreamResponse:
        if not allowed(request):
            return web.Response(status=401, body=DENIED_BODY, content_type="application/json")
        events = min(max(int(request.query.get("events", "5")), 0), MAX_EVENTS)
        interval = min(max(float(request.query.get("interval", "0.1")), 0.0), MAX_INTERVAL)
        pad = "x" * min(max(int(request.query.get("pad", "0")), 0), 65536)
        resp = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await resp.prepare(request)
        try:
            for i in range(1, events + 1):
                if i > 1 and interval > 0:
                    await asyncio.sleep(interval)
                data = json.dumps({"i": i, "t": time.time(), "pad": pad})
                await resp.write(f"id: {i}\ndata: {data}\n\n".encode())
            await resp.write(b"event: done\ndata: {}\n\n")
            await resp.write_eof()
        except (ConnectionError, asyncio.CancelledError):
            pass  # the client (or the proxy) went away mid-stream
        return resp

    app = web.Application()
    app.router.add_get("/v1/auth/test", auth_test)
    app.router.add_get("/v1/stream", stream)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    args = parser.parse_args()
    keys = frozenset(k for k in os.environ.get("BENCH_KEYS", "").split(",") if k)
    if not keys:
        raise SystemExit("set BENCH_KEYS to the accepted bearer keys (comma-separated)")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(args.cert, args.key)
    web.run_app(
        build_app(keys),
        host="127.0.0.1",
        port=args.port,
        ssl_context=ctx,
        access_log=None,
        print=None,
        backlog=4096,
        shutdown_timeout=0.5,
    )


if __name__ == "__main__":
    main()
