"""Reference forwarder: the least an aiohttp credential proxy can do, as a floor to compare with.

`/<name>/<rest>` goes to `<route base>/<rest>` with the app's Authorization replaced by the
key, streaming both ways through one pooled ClientSession per route. No identification,
scopes, limits, logs or metrics. The key comes from $REF_KEY (never argv).

    REF_KEY=... python benchmarks/reference_forwarder.py --port 9000 \
        --route api=https://127.0.0.1:8443/v1 --ca ca.pem [--pool 0] [--uvloop]
"""

import argparse
import asyncio
import os
import signal
import ssl

import aiohttp
from aiohttp import web
from yarl import URL

DROP = frozenset(
    {
        *("connection", "keep-alive", "proxy-connection", "te", "trailer", "upgrade"),
        *("transfer-encoding", "proxy-authorization", "proxy-authenticate"),
        *("host", "authorization", "content-length"),
    }
)


async def serve(args: argparse.Namespace, key: str) -> None:
    ctx = ssl.create_default_context(cafile=args.ca)
    routes = {}
    for spec in args.route:
        name, _, base = spec.partition("=")
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=ctx, limit=args.pool, keepalive_timeout=30),
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=120),
        )
        routes[name] = (session, base.rstrip("/"))
    auth = "Bearer " + key

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        name, _, rest = request.raw_path[1:].partition("/")
        if name not in routes:
            return web.Response(status=404)
        session, base = routes[name]
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in DROP]
        if request.content_length is not None:
            headers.append(("Content-Length", str(request.content_length)))
        headers.append(("Authorization", auth))
        body = request.content.iter_any() if request.body_exists else None
        url = URL(f"{base}/{rest}", encoded=True)
        async with session.request(
            request.method, url, headers=headers, data=body, allow_redirects=False
        ) as up:
            resp = web.StreamResponse(status=up.status, reason=up.reason)
            for k, v in up.headers.items():
                if k.lower() not in DROP:
                    resp.headers.add(k, v)
            if up.content_length is not None:
                resp.content_length = up.content_length
            await resp.prepare(request)
            if request.method != "HEAD":
                async for chunk in up.content.iter_any():
                    await resp.write(chunk)
            await resp.write_eof()
            return resp

    runner = web.ServerRunner(web.Server(handler, auto_decompress=False), handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", args.port, backlog=4096).start()
    print(f"reference forwarder on 127.0.0.1:{args.port}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
        for session, _ in routes.values():
            await session.close()


def main() -> None:
    parser = argparse.ArgumentParser(description="reference aiohttp forwarder")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--route", action="append", required=True, help="name=https://host/base")
    parser.add_argument("--ca", help="CA file the upstream's certificate chains to")
    parser.add_argument("--pool", type=int, default=0, help="connections per route (0: no cap)")
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop (if installed)")
    args = parser.parse_args()
    if args.uvloop:
        import uvloop

        uvloop.install()
    asyncio.run(serve(args, os.environ["REF_KEY"]))


if __name__ == "__main__":
    main()
