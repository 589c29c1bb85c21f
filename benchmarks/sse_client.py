"""SSE measurements through a proxy (or straight to the upstream), one JSON object on stdout.

    python benchmarks/sse_client.py ttfe  --url URL [--n 200]          time to first event
    python benchmarks/sse_client.py rate  --url URL [--events 20000]   events/s of one stream
    python benchmarks/sse_client.py flush --url URL [--events 40]      per-event delay
    python benchmarks/sse_client.py many  --hosts H:P,H:P --path P [--streams 2000]

The Authorization header value comes from $BENCH_AUTH (never argv); --ca names the CA file
when the URL is https (the direct baseline). `many` opens the streams, prints
{"open": n, ...} once every stream has its first event (or --open-timeout passed), then
keeps them open until a line arrives on stdin or --hold-timeout passes, and closes them.
Every loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import ssl
import statistics
import sys
import time

import aiohttp


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def _session(ca: str | None) -> aiohttp.ClientSession:
    ctx: ssl.SSLContext | bool = ssl.create_default_context(cafile=ca) if ca else False
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=1, ssl=ctx),
        auto_decompress=False,
        headers={"Authorization": os.environ.get("BENCH_AUTH", "")},
        timeout=aiohttp.ClientTimeout(total=60),
    )


async def ttfe(args: argparse.Namespace) -> dict[str, object]:
    """Sequential one-event streams on a kept-alive connection: request sent -> first event."""
    url = f"{args.url}?events=1&interval=0"
    times: list[float] = []
    errors = 0
    async with _session(args.ca) as session:
        for i in range(args.n + args.warmup):
            t0 = time.perf_counter()
            first = None
            try:
                async with session.get(url) as resp:
                    if resp.status != 200:
                        errors += 1
                        await resp.read()
                        continue
                    buf = b""
                    async for chunk in resp.content.iter_any():
                        if first is None:
                            buf += chunk
                            if b"\n\n" in buf:
                                first = time.perf_counter()
            except (aiohttp.ClientError, TimeoutError):
                errors += 1
                continue
            if first is not None and i >= args.warmup:
                times.append((first - t0) * 1000)
    return {
        "n": len(times),
        "errors": errors,
        "p50_ms": statistics.median(times) if times else None,
        "p99_ms": _pct(times, 0.99),
    }


async def rate(args: argparse.Namespace) -> dict[str, object]:
    """One stream of --events events written back to back: events per second received."""
    url = f"{args.url}?events={args.events}&interval=0"
    async with _session(args.ca) as session:
        t0 = time.perf_counter()
        async with session.get(url) as resp:
            if resp.status != 200:
                return {"error": f"status {resp.status}"}
            events = 0
            first = last = None
            tail = b""
            async for chunk in resp.content.iter_any():
                now = time.perf_counter()
                first = first or now
                last = now
                data = tail + chunk
                events += data.count(b"\n\n")
                tail = data[-1:]
        events -= 1  # the closing "done" event
    span = (last or t0) - (first or t0)
    return {
        "events": events,
        "seconds": span,
        "events_per_s": events / span if span > 0 else None,
        "total_s": time.perf_counter() - t0,
    }


async def flush(args: argparse.Namespace) -> dict[str, object]:
    """Events --interval apart: delay from the upstream's write to arrival, and any coalescing."""
    url = f"{args.url}?events={args.events}&interval={args.interval}"
    delays: list[float] = []
    reads_with_several = 0
    async with _session(args.ca) as session, session.get(url) as resp:
        if resp.status != 200:
            return {"error": f"status {resp.status}"}
        buf = b""
        async for chunk in resp.content.iter_any():
            now = time.time()
            buf += chunk
            parts = buf.split(b"\n\n")
            buf = parts.pop()
            events = [p for p in parts if b'"t":' in p]
            if len(events) > 1:
                reads_with_several += 1
            for part in events:
                data = part.split(b"data: ", 1)[1]
                delays.append((now - json.loads(data)["t"]) * 1000)
    return {
        "events": len(delays),
        "delay_p50_ms": statistics.median(delays) if delays else None,
        "delay_max_ms": max(delays) if delays else None,
        "reads_with_several_events": reads_with_several,
    }


async def _open_stream(
    host: str,
    port: int,
    path: str,
    auth: str,
    opened: list[float],
    deadline: float,
    gate: asyncio.Semaphore,
) -> asyncio.StreamWriter | None:
    """Open one raw HTTP/1.1 SSE stream and wait for its first event (bounded by `deadline`).

    `gate` bounds how many connections are being set up at once (the listen backlog).
    """
    async with gate:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host, port), max(0.1, deadline - time.monotonic())
            )
        except (OSError, TimeoutError):
            return None
        writer.write(
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: {auth}\r\n"
            "Accept: text/event-stream\r\n\r\n".encode()
        )
    buf = b""
    try:
        while time.monotonic() < deadline and len(buf) < 65536:
            chunk = await asyncio.wait_for(
                reader.read(4096), max(0.05, deadline - time.monotonic())
            )
            if not chunk:
                break
            buf += chunk
            head, sep, body = buf.partition(b"\r\n\r\n")
            if sep and not head.startswith(b"HTTP/1.1 200"):
                break
            if sep and b"\n\n" in body:
                opened.append(time.monotonic())
                _DRAINS.add(asyncio.get_running_loop().create_task(_drain(reader)))
                return writer
    except (OSError, TimeoutError):
        pass
    writer.close()
    return None


_DRAINS: set[asyncio.Task[None]] = set()


async def _drain(reader: asyncio.StreamReader) -> None:
    try:
        for _ in range(1_000_000):  # bounded; ends at EOF or when the writer closes
            if not await reader.read(65536):
                return
    except (OSError, asyncio.CancelledError):
        return


async def many(args: argparse.Namespace) -> dict[str, object]:
    hosts = [(h.rpartition(":")[0], int(h.rpartition(":")[2])) for h in args.hosts.split(",")]
    auth = os.environ.get("BENCH_AUTH", "")
    opened: list[float] = []
    start = time.monotonic()
    deadline = start + args.open_timeout
    gate = asyncio.Semaphore(args.connect_concurrency)
    writers = await asyncio.gather(
        *(
            _open_stream(*hosts[i % len(hosts)], args.path, auth, opened, deadline, gate)
            for i in range(args.streams)
        )
    )
    live = [w for w in writers if w is not None]
    report = {
        "streams": args.streams,
        "open": len(live),
        "open_s": (max(opened) - start) if opened else None,
    }
    print(json.dumps(report), flush=True)
    # Hold them open until the caller writes a line (or closes stdin), at most --hold-timeout.
    loop = asyncio.get_running_loop()
    told = asyncio.Event()
    loop.add_reader(sys.stdin.fileno(), told.set)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(told.wait(), args.hold_timeout)
    loop.remove_reader(sys.stdin.fileno())
    for w in live:
        w.close()
    await asyncio.sleep(0.2)
    return {"closed": len(live)}


def main() -> None:
    parser = argparse.ArgumentParser(description="SSE measurements")
    sub = parser.add_subparsers(dest="mode", required=True)
    for name in ("ttfe", "rate", "flush"):
        p = sub.add_parser(name)
        p.add_argument("--url", required=True)
        p.add_argument("--ca")
    sub.choices["ttfe"].add_argument("--n", type=int, default=200)
    sub.choices["ttfe"].add_argument("--warmup", type=int, default=20)
    sub.choices["rate"].add_argument("--events", type=int, default=20000)
    sub.choices["flush"].add_argument("--events", type=int, default=40)
    sub.choices["flush"].add_argument("--interval", type=float, default=0.025)
    m = sub.add_parser("many")
    m.add_argument("--hosts", required=True, help="host:port[,host:port...] spread round-robin")
    m.add_argument("--path", required=True)
    m.add_argument("--streams", type=int, default=2000)
    m.add_argument("--open-timeout", type=float, default=30.0)
    m.add_argument("--hold-timeout", type=float, default=60.0)
    m.add_argument("--connect-concurrency", type=int, default=200)
    args = parser.parse_args()
    func = {"ttfe": ttfe, "rate": rate, "flush": flush, "many": many}[args.mode]
    print(json.dumps(asyncio.run(func(args))), flush=True)


if __name__ == "__main__":
    main()
