"""What fleet mode costs per request: latency and throughput through one `credproxy serve` with
and without `state: {backend: redis}`, in one run, against a local TLS upstream that never
rate-limits (so only credproxy and Redis are measured), plus Redis round trips per request.

    python benchmarks/fleet_bench.py [--requests 2000] [--concurrency 32] [--rounds 3] [--json]

The two modes run alternately, `--rounds` times each, and the medians are shown. A second part
times the limiter alone in process: its own windows, a fleet budget with leases of 1 (a Redis
round trip per request, the worst case), and a fleet budget with its normal batched leases.

Needs redis-server on PATH. Everything runs on loopback in child processes; numbers on a
shared or small machine are comparable with each other, not with another machine's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import shutil
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import trustme
import yaml
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from proxy import fleet as fleet_module
from proxy.config import QueueConfig, RateLimitConfig, StateConfig
from proxy.identify import new_app_token, token_hash
from proxy.masterkey import create_key_file, load_key_file
from proxy.ratelimit import Limiter
from proxy.secret import Secret
from proxy.server import free_port
from proxy.store import Store

KEY = "bench-upstream-key-0123456789"
NO_LIMIT = {"per_minute": 10_000_000, "per_hour": 1_000_000_000}  # budgets used, never binding


def _upstream(port: int, cert: str, key: str) -> None:
    """A TLS upstream answering every request with a small JSON body (child process)."""

    async def handle(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    web.run_app(app, host="127.0.0.1", port=port, ssl_context=ctx, print=None, access_log=None)


def _wait_port(port: int, timeout: float = 20) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on 127.0.0.1:{port}")


def _redis_scripts(port: int) -> int:
    """Scripts Redis has run (EVAL and EVALSHA): each is one round trip of credproxy's."""
    out = subprocess.run(
        ["redis-cli", "-p", str(port), "info", "commandstats"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    total = 0
    for line in out.splitlines():
        if line.startswith(("cmdstat_evalsha:", "cmdstat_eval:")):
            total += int(line.split("calls=")[1].split(",")[0])
    return total


class Daemon:
    """`credproxy serve` in a child process, with its own config and store."""

    def __init__(
        self,
        work: Path,
        name: str,
        upstream: str,
        ca: Path,
        token: str,
        state: dict[str, Any] | None,
    ) -> None:
        self.port, admin = free_port(), free_port()
        home = work / name
        data = home / "data"
        data.mkdir(parents=True, mode=0o700)
        master = load_key_file(Path(os.environ["CREDPROXY_MASTER_KEY_FILE"]))
        with Store.create(data / "store.db", master) as store:
            store.put("key", "api_key", Secret(KEY))
        doc: dict[str, Any] = {
            "listen": f"127.0.0.1:{self.port}",
            "admin_listen": f"127.0.0.1:{admin}",
            "store": str(data / "store.db"),
            "upstreams": {
                "api": {
                    "base_url": upstream,
                    "ca_bundle": str(ca),
                    "credentials": [{"name": "key", "scopes": ["read", "write"]}],
                    "rate_limit": NO_LIMIT,
                    "queue": {"max_size": 100_000, "max_wait": "60s"},
                }
            },
            "apps": {
                "bench": {
                    "token_sha256": [token_hash(token)],
                    "upstreams": {"api": {"scopes": ["read"]}},
                }
            },
        }
        if state is not None:
            doc["state"] = state
        config = home / "config.yaml"
        config.write_text(yaml.safe_dump(doc))
        config.chmod(0o600)
        self.log = open(work / f"{name}.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "proxy",
                "serve",
                "--config",
                str(config),
                "--log-level",
                "warning",
            ],
            stdout=subprocess.DEVNULL,
            stderr=self.log,
            env=os.environ.copy(),
        )
        _wait_port(self.port)
        _wait_port(admin)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/echo"

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


async def _measure(url: str, token: str, requests: int, concurrency: int) -> dict[str, float]:
    headers = {"Authorization": f"Bearer {token}"}
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, trust_env=False) as session:

        async def one() -> float:
            start = time.perf_counter()
            async with session.get(url, headers=headers) as resp:
                await resp.read()
                if resp.status != 200:
                    raise SystemExit(f"HTTP {resp.status}: {await resp.text()}")
            return time.perf_counter() - start

        for _ in range(200):  # warm up: connections, TLS to the upstream, script cache, leases
            await one()
        sequential = [await one() for _ in range(requests)]
        queue = list(range(requests * 2))

        async def worker(times: list[float]) -> None:
            while queue:
                queue.pop()
                times.append(await one())

        concurrent: list[float] = []
        start = time.perf_counter()
        await asyncio.gather(*(worker(concurrent) for _ in range(concurrency)))
        elapsed = time.perf_counter() - start

    def pct(values: list[float], p: float) -> float:
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))] * 1000

    return {
        "seq_p50_ms": pct(sequential, 50),
        "seq_p90_ms": pct(sequential, 90),
        "seq_p99_ms": pct(sequential, 99),
        "seq_mean_ms": statistics.fmean(sequential) * 1000,
        "conc_p50_ms": pct(concurrent, 50),
        "conc_p99_ms": pct(concurrent, 99),
        "throughput_rps": len(concurrent) / elapsed,
        "requests": float(requests * 3 + 200),
    }


async def _acquires(redis_url: str | None, n: int, lease_max: int | None) -> list[float]:
    """Seconds per `Limiter.acquire`, one after another, with or without a fleet budget."""
    limit = RateLimitConfig(**NO_LIMIT)
    fleet = None
    saved = fleet_module.LEASE_MAX
    if lease_max is not None:
        fleet_module.LEASE_MAX = lease_max
    try:
        budget = None
        if redis_url is not None:
            state = StateConfig(backend="redis", url=redis_url, key_prefix="bench:", instances=1)
            fleet = fleet_module.Fleet(state, b"b" * 32)
            await fleet.start()
            budget = fleet.budget("api", f"key{lease_max}", limit)
        limiter = Limiter("api/key", limit, QueueConfig(max_size=10, max_wait=10), budget=budget)
        times = []
        for i in range(n + 100):
            start = time.perf_counter()
            await limiter.acquire("bench", deadline=time.monotonic() + 10)
            if i >= 100:
                times.append(time.perf_counter() - start)
        return times
    finally:
        fleet_module.LEASE_MAX = saved
        if fleet is not None:
            await fleet.close()


def _median_of(runs: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000, help="sequential requests per mode")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="runs of each mode (medians)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    if shutil.which("redis-server") is None:
        raise SystemExit("redis-server is not installed (apt-get install -y redis-server)")
    work = Path(tempfile.mkdtemp(prefix="credproxy-fleet-bench-"))
    os.environ["CREDPROXY_MASTER_KEY_FILE"] = str(work / "master.key")
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "CREDPROXY_CONFIG"):
        os.environ.pop(var, None)
    create_key_file(work / "master.key")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert.cert_chain_pems[0].write_to_path(str(work / "cert.pem"))
    cert.private_key_pem.write_to_path(str(work / "key.pem"))
    ca.cert_pem.write_to_path(str(work / "ca.pem"))
    up_port, redis_port = free_port(), free_port()
    upstream = multiprocessing.Process(
        target=_upstream, args=(up_port, str(work / "cert.pem"), str(work / "key.pem")), daemon=True
    )
    upstream.start()
    redis = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(redis_port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ],
        stdout=subprocess.DEVNULL,
    )
    runs: dict[str, list[dict[str, float]]] = {"single": [], "fleet": []}
    micro: dict[str, float] = {}
    try:
        _wait_port(up_port)
        _wait_port(redis_port)
        token = new_app_token()
        modes: dict[str, dict[str, Any] | None] = {
            "single": None,
            "fleet": {
                "backend": "redis",
                "url": f"redis://127.0.0.1:{redis_port}/0",
                "instances": 1,
            },
        }
        for round_ in range(args.rounds):
            for name, state in modes.items():
                daemon = Daemon(
                    work,
                    f"{name}{round_}",
                    f"https://127.0.0.1:{up_port}/v1",
                    work / "ca.pem",
                    token,
                    state,
                )
                try:
                    before = _redis_scripts(redis_port)
                    result = asyncio.run(
                        _measure(daemon.url, token, args.requests, args.concurrency)
                    )
                    used = _redis_scripts(redis_port) - before
                    result["redis_scripts_per_request"] = used / result["requests"]
                    runs[name].append(result)
                finally:
                    daemon.stop()
        redis_url = f"redis://127.0.0.1:{redis_port}/0"
        for label, url, lease in (
            ("limiter_local_us", None, None),
            ("limiter_fleet_lease1_us", redis_url, 1),
            ("limiter_fleet_batched_us", redis_url, None),
        ):
            times = asyncio.run(_acquires(url, args.requests, lease))
            micro[label] = statistics.median(times) * 1e6
    finally:
        redis.terminate()
        redis.wait()
        upstream.terminate()
        upstream.join()
        shutil.rmtree(work, ignore_errors=True)
    single, fleet = _median_of(runs["single"]), _median_of(runs["fleet"])
    summary = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "requests": args.requests,
        "concurrency": args.concurrency,
        "rounds": args.rounds,
        "single": single,
        "fleet": fleet,
        "limiter": micro,
        "added_p50_ms": fleet["seq_p50_ms"] - single["seq_p50_ms"],
        "throughput_ratio": fleet["throughput_rps"] / single["throughput_rps"],
    }
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"{summary['date']}  {summary['machine']}")
    print(f"{'':28}{'single':>12}{'fleet':>12}")
    rows = [
        ("sequential p50 (ms)", "seq_p50_ms"),
        ("sequential p90 (ms)", "seq_p90_ms"),
        ("sequential p99 (ms)", "seq_p99_ms"),
        (f"concurrent({args.concurrency}) p50 (ms)", "conc_p50_ms"),
        (f"concurrent({args.concurrency}) p99 (ms)", "conc_p99_ms"),
        (f"throughput at {args.concurrency} (req/s)", "throughput_rps"),
        ("Redis scripts / request", "redis_scripts_per_request"),
    ]
    for label, key in rows:
        print(f"{label:28}{single[key]:>12.2f}{fleet[key]:>12.2f}")
    print(
        f"added p50 latency {summary['added_p50_ms']:+.2f} ms; "
        f"throughput {summary['throughput_ratio'] * 100:.0f}% of single-instance"
    )
    print(
        "Limiter.acquire alone, median: "
        f"local {micro['limiter_local_us']:.1f} us; "
        f"fleet, a Redis round trip each {micro['limiter_fleet_lease1_us']:.1f} us; "
        f"fleet, batched leases {micro['limiter_fleet_batched_us']:.1f} us"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
