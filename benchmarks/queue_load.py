"""10,000 requests queued in credproxy behind a 429 hold: the sandbox upstream and the client.

Run by benchmarks/run.py, which talks to it in JSON lines:

1. It starts credproxy's own sandbox upstream (`proxy.sandbox.Sandbox`) on --port, accepts
   the two keys in $BENCH_KEYS (read key first) on a plan wide enough never to limit the
   drain, writes the sandbox CA to --ca-out and prints {"ready": true}.
2. It reads one line: {"token", "ports", "admin_port", "upstream", "requests", "hold"}.
3. It sends one request through credproxy (warm-up), then `force_429(read key,
   retry_after=hold)` and one request that gets that 429: credproxy holds the credential.
4. It opens `requests` connections (spread over `ports`: credproxy keeps at most 1024
   connections per listener) and sends one GET on each, with X-Credproxy-Max-Wait: 600.
   It polls credproxy's /status until the queue holds them all and prints
   {"queued": depth, ...} (the moment run.py samples credproxy's RSS).
5. When the hold ends, the queue drains; it prints {"done": true, "drain_s": ..., ...}:
   drain_s runs from the end of the hold to the last response.

Every loop is bounded in count and time; only 127.0.0.1 is used.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

import proxy.sandbox.app as sandbox_app
from proxy.sandbox import Sandbox

PATH = "/sb/auth/test"


def emit(doc: dict[str, object]) -> None:
    print(json.dumps(doc), flush=True)


async def http_get(
    port: int, path: str, headers: dict[str, str], timeout: float
) -> tuple[int, bytes]:
    """One raw HTTP/1.1 GET on a new connection (closed after): (status, body)."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
    try:
        lines = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        writer.write(
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{lines}Connection: close\r\n\r\n".encode()
        )
        data = await asyncio.wait_for(reader.read(-1), timeout)
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/1.") else 0
    return status, body


async def status_doc(admin_port: int) -> dict[str, object]:
    code, body = await http_get(admin_port, "/status", {}, 5.0)
    if code != 200:
        return {}
    doc: dict[str, object] = json.loads(body)
    return doc


async def run(args: argparse.Namespace) -> None:
    read_key, rw_key = os.environ["BENCH_KEYS"].split(",")[:2]
    # The sandbox's plans mirror AImyChats (Pro: 500/min); the drain must not be limited by
    # the upstream itself, so this process adds a plan without limits for these keys.
    sandbox_app.PLANS = {**sandbox_app.PLANS, "bench": (10**9, 10**9)}
    async with Sandbox(port=args.port) as sandbox:
        sandbox.add_key(read_key, ["read"], plan="bench")
        sandbox.add_key(rw_key, ["read", "write", "delete"], plan="bench")
        sandbox.write_ca(Path(args.ca_out))
        emit({"ready": True, "base_url": sandbox.base_url})

        line = await asyncio.wait_for(
            asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline), 300
        )
        cmd = json.loads(line)
        ports: list[int] = cmd["ports"]
        n: int = cmd["requests"]
        hold: float = cmd["hold"]
        auth = {"Authorization": f"Bearer {cmd['token']}", "X-Credproxy-Max-Wait": "600"}
        upstream = cmd["upstream"]

        code, _ = await http_get(ports[0], PATH, auth, 10)
        if code != 200:
            emit({"error": f"warm-up request answered {code}"})
            return
        sandbox.force_429(read_key, retry_after=hold, count=1)
        received = len(sandbox.received)
        first = asyncio.get_running_loop().create_task(http_get(ports[-1], PATH, auth, 900))
        deadline = time.monotonic() + 10
        while len(sandbox.received) == received and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        doc = await status_doc(cmd["admin_port"])
        hold_until = doc["upstreams"][upstream]["hold_until"]  # type: ignore[index]
        emit({"holding": True, "hold_until": hold_until})
        if hold_until is None:
            emit({"error": "credproxy did not hold after the 429"})
            return

        results: list[tuple[int, float]] = []
        gate = asyncio.Semaphore(256)  # connections being set up at once (listen backlog)

        async def one(i: int) -> None:
            port = ports[i % (len(ports) - 1)]  # the last listener carries the 429 request
            try:
                async with gate:
                    reader, writer = await asyncio.wait_for(
                        asyncio.open_connection("127.0.0.1", port), 30
                    )
                    lines = "".join(f"{k}: {v}\r\n" for k, v in auth.items())
                    writer.write(
                        f"GET {PATH} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{lines}"
                        "Connection: close\r\n\r\n".encode()
                    )
                data = await asyncio.wait_for(reader.read(-1), 900)
                writer.close()
                status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.") else 0
            except (OSError, TimeoutError, ValueError, IndexError):
                status = 0
            results.append((status, time.time()))

        started = time.time()
        tasks = [asyncio.get_running_loop().create_task(one(i)) for i in range(n)]
        depth = 0
        for _ in range(int(hold * 10) + 600):  # bounded: polls every 0.1 s (or 5 s timeouts)
            if time.time() >= hold_until:
                break
            try:
                doc = await status_doc(cmd["admin_port"])
                depth = int(doc["upstreams"][upstream]["queue"]["depth"])  # type: ignore[index]
            except (OSError, TimeoutError, KeyError, ValueError):
                continue  # a busy daemon may answer /status late; ask again
            if depth >= n:
                break
            await asyncio.sleep(0.1)
        emit(
            {
                "queued": depth,
                "queued_after_s": round(time.time() - started, 2),
                "hold_left_s": round(hold_until - time.time(), 2),
            }
        )
        await asyncio.wait_for(asyncio.gather(*tasks, first), hold + 900)
        statuses = Counter(code for code, _ in results)
        last = max(t for _, t in results)
        emit(
            {
                "done": True,
                "requests": n,
                "statuses": {str(k): v for k, v in statuses.items()},
                "first_request_status": first.result()[0],
                "drain_s": round(last - hold_until, 3),
                "upstream_served": len(sandbox.processed),
            }
        )


def main() -> None:
    parser = argparse.ArgumentParser(description="queue behind a 429 hold")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--ca-out", required=True)
    args = parser.parse_args()
    try:
        asyncio.run(run(args))
    except Exception as exc:  # report, never hang the orchestrator
        emit({"error": f"{type(exc).__name__}: {exc}"})
        raise


if __name__ == "__main__":
    main()
