"""The memory floor of a waiting request: a bare aiohttp server (uvloop when installed) whose
handler never answers, and N client connections each with one request in it.

    python benchmarks/bare_pending.py [--requests 2000]

Prints the server's resident set idle and with the N requests waiting, and the cost per
request: what any aiohttp design pays for a request it holds (credproxy holding requests
behind a 429 hold pays this plus its own per-request state). Linux only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import resource
import socket
import subprocess
import sys
import time

SERVER = """
import asyncio, sys
from aiohttp import web
try:
    import uvloop
except ImportError:
    uvloop = None

async def wait_forever(request):
    await asyncio.sleep(3600)
    return web.Response()

async def main():
    server = web.Server(wait_forever, access_log=None)
    await asyncio.get_running_loop().create_server(server, "127.0.0.1", int(sys.argv[1]))
    print("ready", flush=True)
    await asyncio.sleep(3600)

(uvloop.run if uvloop else asyncio.run)(main())
"""


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def hold(n: int, port: int) -> list[asyncio.StreamWriter]:
    writers = []
    for _ in range(n):
        _reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"GET /x HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
        writers.append(writer)
    for writer in writers:
        await writer.drain()
    return writers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, args.requests + 100)), hard))
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVER, str(port)], stdout=subprocess.PIPE, env=dict(os.environ)
    )
    try:
        assert proc.stdout is not None
        proc.stdout.readline()
        time.sleep(0.5)
        idle = rss_mb(proc.pid)

        async def run() -> None:
            writers = await hold(args.requests, port)
            await asyncio.sleep(3)
            held = rss_mb(proc.pid)
            per = (held - idle) * 1024 / args.requests
            print(f"bare aiohttp server: idle {idle:.1f} MB, {args.requests} requests waiting")
            print(f"{held:.1f} MB: {per:.1f} KB per waiting request")
            for writer in writers:
                writer.close()

        asyncio.run(run())
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)


if __name__ == "__main__":
    main()
