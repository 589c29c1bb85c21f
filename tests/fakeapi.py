"""A small TLS test API: echo, SSE, redirects, compressed and large bodies, uploads."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json

from aiohttp import web

GZIP_BODY = gzip.compress(json.dumps({"hello": "compressed"}).encode() * 50)


async def echo(request: web.Request) -> web.Response:
    body = await request.read()
    headers: dict[str, list[str]] = {}
    for k, v in request.headers.items():
        headers.setdefault(k.lower(), []).append(v)
    return web.json_response(
        {
            "method": request.method,
            "path": request.raw_path,
            "headers": headers,
            "body": body.decode(errors="replace"),
        }
    )


async def sse(request: web.Request) -> web.StreamResponse:
    count = int(request.query.get("n", "3"))
    interval = float(request.query.get("interval", "0.3"))
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    for i in range(count):
        await resp.write(f"data: event {i}\n\n".encode())
        await asyncio.sleep(interval)
    await resp.write_eof()
    return resp


async def redirect(request: web.Request) -> web.Response:
    target = request.query.get("to", "https://127.0.0.1:1/elsewhere")
    return web.Response(status=302, headers={"Location": target})


async def compressed(request: web.Request) -> web.Response:
    return web.Response(
        body=GZIP_BODY,
        headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
    )


async def big(request: web.Request) -> web.StreamResponse:
    size = int(request.query["size"])
    chunk = b"x" * 65536
    resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    resp.content_length = size
    await resp.prepare(request)
    left = size
    while left > 0:
        piece = chunk[: min(left, len(chunk))]
        await resp.write(piece)
        left -= len(piece)
    await resp.write_eof()
    return resp


async def upload(request: web.Request) -> web.Response:
    digest = hashlib.sha256()
    size = 0
    async for chunk in request.content.iter_any():
        digest.update(chunk)
        size += len(chunk)
    return web.json_response({"size": size, "sha256": digest.hexdigest()})


async def slow(request: web.Request) -> web.Response:
    await asyncio.sleep(float(request.query.get("s", "3")))
    return web.json_response({"slow": True})


async def stall(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse()
    await resp.prepare(request)
    await resp.write(b"first")
    await asyncio.sleep(float(request.query.get("s", "3")))
    await resp.write(b"late")
    return resp


def fake_api() -> web.Application:
    app = web.Application(client_max_size=1024**3)
    app.router.add_route("*", "/v1/echo", echo)
    app.router.add_route("*", "/v1/echo/{tail:.*}", echo)
    app.router.add_get("/v1/sse", sse)
    app.router.add_get("/v1/redirect", redirect)
    app.router.add_get("/v1/compressed", compressed)
    app.router.add_get("/v1/big", big)
    app.router.add_post("/v1/upload", upload)
    app.router.add_get("/v1/slow", slow)
    app.router.add_get("/v1/stall", stall)
    app.router.add_route("*", "/other/{tail:.*}", echo)
    return app
