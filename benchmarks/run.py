#!/usr/bin/env python3
"""credproxy benchmark: credproxy with everything on against a bare aiohttp forwarder.

    python benchmarks/run.py            # full run: 3 runs x 10 s per cell (about 10 minutes)
    python benchmarks/run.py --quick    # 1 run x 3 s per cell (about 3 minutes)
    python benchmarks/run.py --report-only   # short same-run comparison; never fails

Needs wrk (Debian: `apt-get install wrk`); uses nginx and hyperfine when installed. Starts a
TLS upstream (nginx, else an aiohttp server), the reference forwarder, and credproxy set up
through its own CLI, pins the proxy under test to CPU 1 (load generator and upstream on
CPU 0), and prints every number side by side with the ratio credproxy / reference.
Everything binds 127.0.0.1, every loop is bounded in count and time, and every process it
starts is stopped on exit, error or Ctrl-C. See benchmarks/README.md for what each number
means.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime as dt
import json
import os
import platform
import re
import secrets
import select
import shlex
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import trustme
import yaml

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
LOAD_CPU = 0  # wrk, the upstreams, the clients and this script
PROXY_CPU = 1  # the proxy under test
MB = 1024 * 1024

TARGETS = {
    "throughput_ratio_min": 0.9,  # credproxy / reference at c=16 and c=64
    "added_p50_ms_max": 0.4,  # credproxy - direct at c=1
    "added_p99_ms_max": 1.0,
    "sse_ttfe_over_ref_ms_max": 1.0,
    "idle_rss_mb_max": 45.0,
    "busy256_rss_mb_max": 70.0,
    "queued_rss_mb_max": 150.0,
    "idle_cpu_s_per_60s_max": 0.1,
    "cli_ms_max": 300.0,
}


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------ processes


def _child_setup() -> None:
    """In each child: its own session (Ctrl-C reaches only us; we stop it) and SIGTERM if we die."""
    os.setsid()
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG


class Procs:
    """Every process this run starts, stopped (with its whole process group) on the way out."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, argv: list[str], **kw: Any) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(argv, preexec_fn=_child_setup, **kw)
        self.procs.append((name, proc))
        return proc

    @staticmethod
    def stop(proc: subprocess.Popen[bytes], timeout: float = 8.0) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
        # Anything left in its group (nginx workers) goes too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)

    def stop_all(self) -> None:
        while self.procs:
            _name, proc = self.procs.pop()
            self.stop(proc)


PROCS = Procs()


def _on_signal(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pin(pid: int, cpu: int) -> None:
    """Pin every thread of `pid` to `cpu` (taskset -a -pc), when the machine has that CPU."""
    if cpu >= (os.cpu_count() or 1):
        return
    if shutil.which("taskset"):
        subprocess.run(
            ["taskset", "-a", "-pc", str(cpu), str(pid)],
            check=True,
            stdout=subprocess.DEVNULL,
            timeout=10,
        )
        return
    for tid in os.listdir(f"/proc/{pid}/task"):
        os.sched_setaffinity(int(tid), {cpu})


def http_get(
    url: str, headers: dict[str, str] | None = None, timeout: float = 5.0, ca: Path | None = None
) -> tuple[int, bytes]:
    ctx = ssl.create_default_context(cafile=str(ca)) if ca else None
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=ctx) as resp:
            return int(resp.status), resp.read()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read()


def wait_ok(
    url: str,
    proc: subprocess.Popen[bytes],
    *,
    headers: dict[str, str] | None = None,
    timeout: float = 30.0,
    ca: Path | None = None,
    what: str = "",
) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what or url}: exited with {proc.returncode} before it was ready")
        try:
            code, body = http_get(url, headers, 2.0, ca)
            if code == 200:
                return
            last = f"HTTP {code}: {body[:200]!r}"
        except OSError as exc:
            last = str(exc)
        time.sleep(0.1)
    raise RuntimeError(f"{what or url} not ready after {timeout:.0f}s ({last})")


def tail(path: Path, n: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


# ------------------------------------------------------------------------ measurements


def cpu_s(p: psutil.Process) -> float:
    t = p.cpu_times()
    return float(t.user + t.system)


def rss_mb(p: psutil.Process) -> float:
    return float(p.memory_info().rss) / MB


def ctx_switches(pid: int) -> int:
    """Context switches of every thread of `pid` (each one is a wake-up)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/task/{tid}/status").read_text().splitlines():
                if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                    total += int(line.split()[1])
    return total


class LineReader:
    """JSON lines from a child's stdout with a timeout, calling `tick` while waiting."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        self.proc = proc
        self.fd = proc.stdout.fileno()
        self.buf = b""

    def next(self, timeout: float, tick: Callable[[], None] = lambda: None) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if b"\n" in self.buf:
                line, _, self.buf = self.buf.partition(b"\n")
                text = line.decode(errors="replace").strip()
                if text.startswith("{"):
                    doc: dict[str, Any] = json.loads(text)
                    return doc
                continue
            ready, _, _ = select.select([self.fd], [], [], 0.1)
            tick()
            if ready:
                chunk = os.read(self.fd, 65536)
                if not chunk:
                    raise RuntimeError("helper closed its output")
                self.buf += chunk
        raise TimeoutError(f"no line from the helper within {timeout:.0f}s")


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def parse_wrk(text: str) -> dict[str, Any]:
    rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
    total = re.search(r"(\d+) requests in", text)
    if rps is None or total is None:
        raise RuntimeError(f"cannot read wrk's output:\n{text}")
    lat = {
        q: float(v) * _UNITS[u]
        for q, v, u in re.findall(r"^\s+(50|75|90|99)%\s+([\d.]+)(us|ms|s|m)\s*$", text, re.M)
    }
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    return {
        "rps": float(rps.group(1)),
        "requests": int(total.group(1)),
        "p50_ms": lat.get("50"),
        "p99_ms": lat.get("99"),
        "non2xx": int(non2xx.group(1)) if non2xx else 0,
        "socket_errors": sum(int(x) for x in sock.groups()) if sock else 0,
    }


def wrk(
    url: str, conns: int, duration: float, header: str, target: psutil.Process | None
) -> dict[str, Any]:
    """One wrk cell; CPU seconds and peak RSS of `target` (the proxy) while it ran."""
    seconds = max(1, round(duration))  # wrk takes whole seconds
    argv = ["wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "--latency", "--timeout", "10s"]
    argv += ["-H", header, url]
    cpu0 = cpu_s(target) if target else 0.0
    peak = rss_mb(target) if target else 0.0
    proc = PROCS.start("wrk", argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + seconds + 30
    while proc.poll() is None and time.monotonic() < deadline:
        if target:
            peak = max(peak, rss_mb(target))
        time.sleep(0.2)
    if proc.poll() is None:
        PROCS.stop(proc)
        raise RuntimeError(f"wrk did not finish within {seconds + 30}s")
    assert proc.stdout is not None
    out = proc.stdout.read().decode(errors="replace")
    res = parse_wrk(out)
    res["conns"] = conns
    if target:
        res["cpu_s"] = cpu_s(target) - cpu0
        res["cpu_us_per_req"] = res["cpu_s"] / max(1, res["requests"]) * 1e6
        res["rss_peak_mb"] = peak
        res["rss_end_mb"] = rss_mb(target)
    if res["non2xx"] or res["socket_errors"]:
        log(
            f"  warning: {url} c={conns}: {res['non2xx']} non-2xx, {res['socket_errors']} socket errors"
        )
    return res


def combine_halves(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One cell from its halves: totals for requests and CPU, the mean of the percentiles."""
    requests = sum(p["requests"] for p in parts)
    seconds = sum(p["requests"] / p["rps"] for p in parts if p["rps"])
    cpu = sum(p["cpu_s"] for p in parts)

    def mean(key: str) -> float | None:
        vals = [p[key] for p in parts if p.get(key) is not None]
        return sum(vals) / len(vals) if vals else None

    return {
        "rps": requests / seconds if seconds else 0.0,
        "requests": requests,
        "p50_ms": mean("p50_ms"),
        "p99_ms": mean("p99_ms"),
        "non2xx": sum(p["non2xx"] for p in parts),
        "socket_errors": sum(p["socket_errors"] for p in parts),
        "conns": parts[0]["conns"],
        "cpu_s": cpu,
        "cpu_us_per_req": cpu / max(1, requests) * 1e6,
        "rss_peak_mb": max(p["rss_peak_mb"] for p in parts),
        "rss_end_mb": parts[-1]["rss_end_mb"],
        "halves": parts,
    }


def median(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


# ------------------------------------------------------------------------ set-up


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.read_key = "bench_sk_" + secrets.token_urlsafe(24)
        self.rw_key = "bench_sk_" + secrets.token_urlsafe(24)
        self.results: dict[str, Any] = {"targets": TARGETS}
        self.base_env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("CREDPROXY_") and k != "CREDENTIALS_DIRECTORY"
        }
        self.base_env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p
        )
        self.base_env.pop("HTTP_PROXY", None)
        self.base_env.pop("http_proxy", None)

    # ---- certificates and upstreams ------------------------------------------------
    def certs(self) -> None:
        ca = trustme.CA(organization_name="credproxy bench")
        cert = ca.issue_cert("127.0.0.1", "localhost")
        self.ca = self.work / "ca.pem"
        ca.cert_pem.write_to_path(str(self.ca))
        self.cert = self.work / "server.pem"
        self.key = self.work / "server.key"
        self.cert.write_bytes(b"".join(b.bytes() for b in cert.cert_chain_pems))
        cert.private_key_pem.write_to_path(str(self.key))

    def start_nginx(self) -> int:
        port = free_port()
        prefix = self.work / "nginx"
        prefix.mkdir()
        ok_body = '{"ok":true,"user_id":"user_bench","scopes":["read"]}'
        denied = '{"error":{"code":"unauthorized","message":"Invalid or missing API key"}}'
        temp = "".join(
            f"    {kind}_temp_path {prefix}/{kind};\n"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        conf = f"""\
worker_processes 1;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
{temp}    keepalive_requests 100000000;
    keepalive_timeout 300s;
    server {{
        listen 127.0.0.1:{port} ssl backlog=4096;
        ssl_certificate {self.cert};
        ssl_certificate_key {self.key};
        ssl_protocols TLSv1.2 TLSv1.3;
        location = /v1/auth/test {{
            default_type application/json;
            if ($http_authorization = "Bearer {self.read_key}") {{ return 200 '{ok_body}'; }}
            if ($http_authorization = "Bearer {self.rw_key}") {{ return 200 '{ok_body}'; }}
            return 401 '{denied}';
        }}
        location / {{ return 404; }}
    }}
}}
"""
        (prefix / "nginx.conf").write_text(conf)
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        out = open(prefix / "stdout.log", "wb")  # noqa: SIM115 - lives as long as nginx
        proc = PROCS.start(
            "nginx",
            [
                nginx,
                "-p",
                str(prefix),
                "-c",
                str(prefix / "nginx.conf"),
                "-e",
                str(prefix / "error.log"),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        wait_ok(
            f"https://127.0.0.1:{port}/v1/auth/test",
            proc,
            headers={"Authorization": f"Bearer {self.read_key}"},
            ca=self.ca,
            what="nginx",
        )
        return port

    def start_aio_upstream(self) -> int:
        port = free_port()
        env = {**self.base_env, "BENCH_KEYS": f"{self.read_key},{self.rw_key}"}
        out = open(self.work / "upstream.log", "wb")  # noqa: SIM115
        proc = PROCS.start(
            "upstream",
            [
                *(sys.executable, str(BENCH / "upstream.py"), "--port", str(port)),
                *("--cert", str(self.cert), "--key", str(self.key)),
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        wait_ok(
            f"https://127.0.0.1:{port}/v1/auth/test",
            proc,
            headers={"Authorization": f"Bearer {self.read_key}"},
            ca=self.ca,
            what="aiohttp upstream",
        )
        return port

    # ---- credproxy, set up as a user would ----------------------------------------------
    def credproxy_argv(self) -> list[str]:
        if self.args.credproxy_cmd:
            return shlex.split(self.args.credproxy_cmd)
        if self.args.uvloop:
            shim = "import sys, uvloop; uvloop.install(); from proxy.cli import main; sys.exit(main(sys.argv[1:]))"
            return [sys.executable, "-c", shim]
        script = Path(sys.executable).with_name("credproxy")
        return [str(script)] if script.exists() else [sys.executable, "-m", "proxy"]

    def cli(self, env: dict[str, str], *argv: str, stdin: str | None = None) -> str:
        done = subprocess.run(
            [*self.credproxy_argv(), *argv],
            env=env,
            input=stdin.encode() if stdin is not None else None,
            capture_output=True,
            timeout=120,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"credproxy {' '.join(argv)} exited {done.returncode}: {done.stderr.decode()}"
            )
        return done.stdout.decode()

    def setup_credproxy(self, name: str, config: dict[str, Any]) -> tuple[dict[str, str], str]:
        """A HOME of its own: config, `init`, `keys add --stdin` x2, `apps token`, `check`."""
        home = self.work / name
        cfg_dir = home / ".config" / "credproxy"
        cfg_dir.mkdir(parents=True, mode=0o700)
        os.chmod(home, 0o700)
        config["store"] = str(home / ".local" / "share" / "credproxy" / "store.db")
        cfg = cfg_dir / "config.yaml"
        fd = os.open(cfg, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(yaml.safe_dump(config, sort_keys=False))
        env = {**self.base_env, "HOME": str(home), "CREDPROXY_CONFIG": str(cfg)}
        self.cli(env, "init")
        self.cli(env, "keys", "add", "bench-read", "--stdin", stdin=self.read_key + "\n")
        self.cli(env, "keys", "add", "bench-rw", "--stdin", stdin=self.rw_key + "\n")
        token = self.cli(env, "apps", "token", "bench").strip()
        self.cli(env, "check")
        return env, token

    def upstream_block(self, port: int, ca: Path) -> dict[str, Any]:
        return {
            "base_url": f"https://127.0.0.1:{port}/v1",
            "ca_bundle": str(ca),
            "credentials": [
                {"name": "bench-read", "scopes": ["read"]},
                {"name": "bench-rw", "scopes": ["read", "write", "delete"]},
            ],
            # A budget that never binds: the limiter runs on every request, never waits.
            "rate_limit": {"per_minute": 10_000_000, "per_hour": 100_000_000},
            "path_rules": [{"method": "*", "path": "/v1/admin/**", "scope": "admin"}],
        }

    def start_credproxy(
        self, env: dict[str, str], admin_port: int, logname: str
    ) -> subprocess.Popen[bytes]:
        logfile = self.work / logname
        out = open(logfile, "wb")  # noqa: SIM115 - the access log, lives as long as credproxy
        proc = PROCS.start(
            "credproxy",
            [*self.credproxy_argv(), "serve", "--log-level", "info"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_ok(f"http://127.0.0.1:{admin_port}/readyz", proc, what="credproxy")
        except RuntimeError:
            log(tail(logfile))
            raise
        pin(proc.pid, PROXY_CPU)
        return proc

    def start_reference(self, port: int, routes: dict[str, int]) -> subprocess.Popen[bytes]:
        argv = [sys.executable, str(BENCH / "reference_forwarder.py"), "--port", str(port)]
        for name, up in routes.items():
            argv += ["--route", f"{name}=https://127.0.0.1:{up}/v1"]
        argv += ["--ca", str(self.ca), "--pool", str(self.args.ref_pool)]
        if self.args.uvloop:
            argv.append("--uvloop")
        out = open(self.work / "reference.log", "wb")  # noqa: SIM115
        proc = PROCS.start(
            "reference",
            argv,
            env={**self.base_env, "REF_KEY": self.read_key},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        wait_ok(
            f"http://127.0.0.1:{port}/api/auth/test",
            proc,
            headers={"Authorization": "Bearer cpx_not_checked"},
            what="reference forwarder",
        )
        pin(proc.pid, PROXY_CPU)
        return proc

    # ---- the run ---------------------------------------------------------------------
    def run(self) -> None:
        a = self.args
        self.certs()
        self.results["machine"] = machine()
        self.results["command"] = " ".join(["python", "benchmarks/run.py", *sys.argv[1:]])
        self.results["date"] = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")

        self.aio_port = self.start_aio_upstream()
        if shutil.which("nginx") or Path("/usr/sbin/nginx").exists():
            self.json_port = self.start_nginx()
            self.results["upstream"] = "nginx " + nginx_version()
        else:
            self.json_port = self.aio_port
            self.results["upstream"] = "aiohttp (nginx not installed)"
        log(f"upstream for JSON: {self.results['upstream']}; SSE: aiohttp")

        self.cpx_ports = [free_port() for _ in range(3)]
        self.cpx_admin = free_port()
        config = {
            # Three listeners: credproxy keeps at most 1024 connections per listener, and the
            # 2,000-stream test spreads over them.
            "listen": [f"127.0.0.1:{p}" for p in self.cpx_ports],
            "admin_listen": f"127.0.0.1:{self.cpx_admin}",
            "shutdown_grace": "1s",
            "upstreams": {
                "api": self.upstream_block(self.json_port, self.ca),
                "sse": self.upstream_block(self.aio_port, self.ca),
            },
            "apps": {
                "bench": {
                    "upstreams": {
                        "api": {"scopes": ["read", "write"]},
                        "sse": {"scopes": ["read", "write"]},
                    }
                }
            },
        }
        env, self.token = self.setup_credproxy("home", config)
        self.cpx_env = env
        self.cpx = self.start_credproxy(env, self.cpx_admin, "credproxy.log")
        self.ref_port = free_port()
        self.ref = self.start_reference(
            self.ref_port, {"api": self.json_port, "sse": self.aio_port}
        )
        self.auth = f"Bearer {self.token}"
        for url in (self.url("cpx", "api"), self.url("ref", "api")):
            code, body = http_get(url, {"Authorization": self.auth})
            if code != 200:
                raise RuntimeError(f"{url}: {code} {body[:200]!r}")
        self.p = {"cpx": psutil.Process(self.cpx.pid), "ref": psutil.Process(self.ref.pid)}
        time.sleep(1.0)
        self.results["idle_rss_mb"] = {k: rss_mb(p) for k, p in self.p.items()}
        idle_rss = self.results["idle_rss_mb"]
        log(
            f"idle RSS (one request served): credproxy {idle_rss['cpx']:.1f} MB,"
            f" reference {idle_rss['ref']:.1f} MB"
        )

        if "idle" not in a.skip:
            self.idle()
        if "cli" not in a.skip:
            self.cli_times()
        if "http" not in a.skip:
            self.throughput()
        if "sse" not in a.skip:
            self.sse()
        if "streams" not in a.skip:
            self.streams()
        with open(self.work / "credproxy.log", errors="replace") as fh:
            self.results["access_log_lines"] = sum(1 for line in fh if "credproxy.access" in line)
        code, body = http_get(f"http://127.0.0.1:{self.cpx_admin}/metrics")
        self.results["metrics_requests_total"] = sum(
            float(line.rsplit(" ", 1)[1])
            for line in body.decode().splitlines()
            if line.startswith("credproxy_requests_total{")
        )
        PROCS.stop(self.cpx)
        PROCS.stop(self.ref)
        if "queue" not in a.skip:
            self.queue()

    def url(self, which: str, upstream: str, index: int = 0) -> str:
        port = self.cpx_ports[index] if which == "cpx" else self.ref_port
        path = "/auth/test" if upstream == "api" else "/stream"
        return f"http://127.0.0.1:{port}/{upstream}{path}"

    # ---- phases ----------------------------------------------------------------------
    def idle(self) -> None:
        secs = self.args.idle_seconds
        log(f"idle: {secs:g} s with no traffic")
        before = {k: (cpu_s(p), ctx_switches(p.pid)) for k, p in self.p.items()}
        time.sleep(secs)
        out = {}
        for k, p in self.p.items():
            cpu = cpu_s(p) - before[k][0]
            wakes = ctx_switches(p.pid) - before[k][1]
            out[k] = {
                "seconds": secs,
                "cpu_s": cpu,
                "cpu_s_per_60s": cpu * 60 / secs,
                "wakeups_per_s": wakes / secs,
                "rss_mb": rss_mb(p),
            }
        self.results["idle"] = out
        cpx, ref = out["cpx"], out["ref"]
        log(
            f"idle: credproxy {cpx['cpu_s']:.3f} s CPU ({cpx['wakeups_per_s']:.1f} wake-ups/s),"
            f" reference {ref['cpu_s']:.3f} s CPU ({ref['wakeups_per_s']:.1f} wake-ups/s)"
        )

    def cli_times(self) -> None:
        cmds = {"--help": ["--help"], "check": ["check"], "keys list": ["keys", "list"]}
        base = self.credproxy_argv()
        out: dict[str, Any] = {}
        for label, argv in {"python -c pass": None, **cmds}.items():
            full = [sys.executable, "-c", "pass"] if argv is None else [*base, *argv]
            out[label] = time_command(full, self.cpx_env, self.work)
        self.results["cli_ms"] = out
        log("CLI (median ms): " + ", ".join(f"{k} {v['median_ms']:.0f}" for k, v in out.items()))

    def throughput(self) -> None:
        a = self.args
        log(f"HTTP: {a.runs} run(s) x {len(a.conns)} connection counts x {a.duration:g} s")
        for which in ("ref", "cpx"):  # warm both: upstream pool, code paths
            wrk(self.url(which, "api"), 16, 1, f"Authorization: {self.auth}", self.p[which])
        runs: list[dict[str, Any]] = []
        direct_url = f"https://127.0.0.1:{self.json_port}/v1/auth/test"
        for r in range(a.runs):
            run: dict[str, Any] = {}
            for i, c in enumerate(a.conns):
                # Each proxy's cell is two halves, run A B B A: a drift of the machine, or
                # whatever the cell before left behind, weighs on both alike.
                order = ["ref", "cpx"] if (r + i) % 2 == 0 else ["cpx", "ref"]
                halves: dict[str, list[dict[str, Any]]] = {"ref": [], "cpx": []}
                for which in order + order[::-1]:
                    halves[which].append(
                        wrk(
                            self.url(which, "api"),
                            c,
                            a.duration / 2,
                            f"Authorization: {self.auth}",
                            self.p[which],
                        )
                    )
                for which in order:
                    res = run[f"{which}_c{c}"] = combine_halves(halves[which])
                    log(
                        f"  run {r + 1} {which} c={c}: {res['rps']:.0f} req/s, p50 {res['p50_ms']:.2f} ms,"
                        f" p99 {res['p99_ms']:.2f} ms, {res['cpu_us_per_req']:.0f} us CPU/req,"
                        f" RSS {res['rss_peak_mb']:.1f} MB"
                    )
                if c == 1:
                    res = wrk(
                        direct_url, 1, a.duration, f"Authorization: Bearer {self.read_key}", None
                    )
                    run["direct_c1"] = res
                    log(
                        f"  run {r + 1} direct c=1: p50 {res['p50_ms']:.3f} ms, p99 {res['p99_ms']:.3f} ms"
                    )
            runs.append(run)
        self.results["http_runs"] = runs

    def sse_client(
        self, mode: str, url: str, auth: str, extra: list[str], ca: bool = False
    ) -> dict[str, Any]:
        argv = [sys.executable, str(BENCH / "sse_client.py"), mode, "--url", url, *extra]
        if ca:
            argv += ["--ca", str(self.ca)]
        proc = PROCS.start(
            "sse-client",
            argv,
            env={**self.base_env, "BENCH_AUTH": auth},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        try:
            out, _ = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            PROCS.stop(proc)
            raise
        lines = [ln for ln in out.decode(errors="replace").splitlines() if ln.startswith("{")]
        if not lines:
            raise RuntimeError(f"sse_client {mode}: {out.decode(errors='replace')[-2000:]}")
        doc: dict[str, Any] = json.loads(lines[-1])
        return doc

    def sse(self) -> None:
        a = self.args
        targets = {
            "direct": (
                f"https://127.0.0.1:{self.aio_port}/v1/stream",
                f"Bearer {self.read_key}",
                True,
            ),
            "ref": (self.url("ref", "sse"), self.auth, False),
            "cpx": (self.url("cpx", "sse"), self.auth, False),
        }
        log(f"SSE: {a.runs} run(s) of time to first event, events/s and per-event delay")
        runs = []
        for r in range(a.runs):
            run: dict[str, Any] = {}
            for which, (url, auth, ca) in targets.items():
                cpu0 = cpu_s(self.p[which]) if which in self.p else 0.0
                ttfe = self.sse_client("ttfe", url, auth, ["--n", str(a.ttfe_n)], ca)
                rate = self.sse_client("rate", url, auth, ["--events", str(a.sse_events)], ca)
                flush = self.sse_client("flush", url, auth, [], ca)
                run[which] = {"ttfe": ttfe, "rate": rate, "flush": flush}
                if which in self.p:
                    run[which]["cpu_s"] = cpu_s(self.p[which]) - cpu0
                log(
                    f"  run {r + 1} {which}: first event p50 {ttfe['p50_ms']:.2f} ms p99 {ttfe['p99_ms']:.2f} ms,"
                    f" {rate.get('events_per_s') or 0:.0f} events/s,"
                    f" per-event delay p50 {flush.get('delay_p50_ms') or 0:.2f} ms"
                    f" max {flush.get('delay_max_ms') or 0:.2f} ms, reads with >1 event {flush.get('reads_with_several_events')}"
                )
            runs.append(run)
        self.results["sse_runs"] = runs

    def streams(self) -> None:
        a = self.args
        out = {}
        events = int(a.open_timeout + 90)
        for which in ("ref", "cpx"):
            ports = self.cpx_ports if which == "cpx" else [self.ref_port]
            hosts = ",".join(f"127.0.0.1:{p}" for p in ports)
            p = self.p[which]
            argv = [sys.executable, str(BENCH / "sse_client.py"), "many", "--hosts", hosts]
            argv += [
                "--path",
                f"/sse/stream?events={events}&interval=1",
                "--streams",
                str(a.streams),
            ]
            argv += ["--open-timeout", str(a.open_timeout), "--hold-timeout", "60"]
            rss0 = rss_mb(p)
            peak = [rss0]

            def tick(p: psutil.Process = p, peak: list[float] = peak) -> None:
                peak.append(rss_mb(p))

            log(
                f"streams: opening {a.streams} SSE streams through {which} ({len(ports)} listener(s))"
            )
            proc = PROCS.start(
                "sse-many",
                argv,
                env={**self.base_env, "BENCH_AUTH": self.auth},
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
            try:
                reader = LineReader(proc)
                report = reader.next(a.open_timeout + 60, tick)
                time.sleep(1.0)  # every open stream has had an event since
                up_port = self.aio_port
                upstream_conns = sum(
                    1
                    for c in p.net_connections("tcp")
                    if c.raddr and c.raddr.port == up_port and c.status == psutil.CONN_ESTABLISHED
                )
                report.update(
                    rss_before_mb=rss0,
                    rss_open_mb=rss_mb(p),
                    rss_peak_mb=max(peak),
                    upstream_connections=upstream_conns,
                )
                assert proc.stdin is not None
                proc.stdin.write(b"close\n")
                proc.stdin.flush()
                proc.wait(30)
            finally:
                PROCS.stop(proc)
            out[which] = report
            log(
                f"  {which}: {report['open']}/{report['streams']} streams got their first event"
                f" (in {report['open_s'] or 0:.1f} s), {upstream_conns} upstream connections,"
                f" RSS {report['rss_open_mb']:.1f} MB (before {rss0:.1f} MB)"
            )
            time.sleep(2.0)
        self.results["streams"] = out

    def queue(self) -> None:
        a = self.args
        sb_port = free_port()
        sb_ca = self.work / "sandbox-ca.pem"
        helper = PROCS.start(
            "queue-helper",
            [
                sys.executable,
                str(BENCH / "queue_load.py"),
                "--port",
                str(sb_port),
                "--ca-out",
                str(sb_ca),
            ],
            env={**self.base_env, "BENCH_KEYS": f"{self.read_key},{self.rw_key}"},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        reader = LineReader(helper)
        ready = reader.next(30)
        if not ready.get("ready"):
            raise RuntimeError(f"queue helper: {ready}")
        # Listeners: at most 1024 connections each, so 12 of them for 10,000 waiting requests.
        n_listen = max(2, a.queue_requests // 900 + 2)
        ports = [free_port() for _ in range(n_listen)]
        admin = free_port()
        block = self.upstream_block(sb_port, sb_ca)
        block["queue"] = {"max_size": a.queue_requests + 1000, "max_wait": "10m"}
        config = {
            "listen": [f"127.0.0.1:{p}" for p in ports],
            "admin_listen": f"127.0.0.1:{admin}",
            "shutdown_grace": "1s",
            "upstreams": {"sb": block},
            "apps": {"bench": {"upstreams": {"sb": {"scopes": ["read"]}}}},
        }
        env, token = self.setup_credproxy("home-queue", config)
        cpx = self.start_credproxy(env, admin, "credproxy-queue.log")
        p = psutil.Process(cpx.pid)
        rss0 = rss_mb(p)
        log(f"queue: {a.queue_requests} requests behind a {a.hold:g} s 429 hold (sandbox upstream)")
        assert helper.stdin is not None
        helper.stdin.write(
            json.dumps(
                {
                    "token": token,
                    "ports": ports,
                    "admin_port": admin,
                    "upstream": "sb",
                    "requests": a.queue_requests,
                    "hold": a.hold,
                }
            ).encode()
            + b"\n"
        )
        helper.stdin.flush()
        peak = [rss0]

        def tick() -> None:
            with contextlib.suppress(psutil.Error):
                peak.append(rss_mb(p))

        holding = reader.next(60, tick)
        if "error" in holding:
            raise RuntimeError(f"queue helper: {holding}")
        cpu_start = cpu_s(p)
        queued = reader.next(a.hold + 120, tick)
        if "error" in queued:
            raise RuntimeError(f"queue helper: {queued}")
        queued_rss = rss_mb(p)
        cpu_queued = cpu_s(p)
        log(
            f"  {queued.get('queued')} queued after {queued.get('queued_after_s')} s; credproxy RSS {queued_rss:.1f} MB"
        )
        done = reader.next(a.hold + 900, tick)
        if "error" in done:
            raise RuntimeError(f"queue helper: {done}")
        cpu_end = cpu_s(p)
        self.results["queue"] = {
            **queued,
            **done,
            "rss_idle_mb": rss0,
            "rss_queued_mb": queued_rss,
            "rss_peak_mb": max(peak),
            "cpu_s_queueing": cpu_queued - cpu_start,
            "cpu_s_total": cpu_end - cpu_start,
            "listeners": n_listen,
        }
        log(
            f"  drained in {done.get('drain_s')} s after the hold ended; statuses {done.get('statuses')};"
            f" peak RSS {max(peak):.1f} MB"
        )
        PROCS.stop(helper)
        PROCS.stop(cpx)


# ------------------------------------------------------------------------ helpers


def nginx_version() -> str:
    try:
        out = subprocess.run(["nginx", "-v"], capture_output=True, timeout=10, check=False)
        return out.stderr.decode().strip().rpartition("/")[2]
    except OSError:
        return "?"


def machine() -> dict[str, Any]:
    import aiohttp

    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    tools = {}
    for tool, flag in (("wrk", "-v"), ("nginx", "-v"), ("hyperfine", "--version")):
        if shutil.which(tool):
            out = subprocess.run([tool, flag], capture_output=True, timeout=10, check=False)
            text = (out.stdout + out.stderr).decode(errors="replace").strip().splitlines()
            tools[tool] = text[0] if text else "?"
    uv = "not installed"
    with contextlib.suppress(ImportError):
        import uvloop

        uv = uvloop.__version__
    commit = "?"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        # Read-only: which code was measured (the tree may hold uncommitted changes).
        head = (
            subprocess.run(
                ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                capture_output=True,
                timeout=10,
                check=True,
            )
            .stdout.decode()
            .strip()
        )
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--", "proxy"],
            capture_output=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        commit = head + (" with uncommitted changes in proxy/" if dirty else "")
    return {
        "commit": commit,
        "nproc": os.cpu_count(),
        "cpu": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
        "uvloop": uv,
        "tools": tools,
    }


def time_command(
    argv: list[str], env: dict[str, str], work: Path, runs: int = 10
) -> dict[str, Any]:
    """Median wall time of a command: hyperfine when installed, else repeated timing."""
    if shutil.which("hyperfine"):
        out = work / "hyperfine.json"
        cmd = " ".join(_quote(x) for x in argv)
        subprocess.run(
            [
                "hyperfine",
                "--shell=none",
                "--warmup",
                "2",
                "--runs",
                str(runs),
                "--export-json",
                str(out),
                "--style",
                "none",
                cmd,
            ],
            env=env,
            capture_output=True,
            timeout=300,
            check=True,
        )
        res = json.loads(out.read_text())["results"][0]
        return {
            "median_ms": res["median"] * 1000,
            "min_ms": res["min"] * 1000,
            "runs": runs,
            "tool": "hyperfine",
        }
    times = []
    for _ in range(runs + 2):
        t0 = time.perf_counter()
        subprocess.run(argv, env=env, capture_output=True, timeout=60, check=False)
        times.append((time.perf_counter() - t0) * 1000)
    times = times[2:]
    return {
        "median_ms": statistics.median(times),
        "min_ms": min(times),
        "runs": runs,
        "tool": "subprocess",
    }


def _quote(s: str) -> str:
    return s if re.fullmatch(r"[\w./:=+-]+", s) else "'" + s.replace("'", "'\\''") + "'"


# ------------------------------------------------------------------------ report


def summarize(res: dict[str, Any], conns: list[int]) -> dict[str, Any]:
    """Medians over runs of every number, and of the per-run ratios."""
    s: dict[str, Any] = {"cells": {}}
    runs = res.get("http_runs", [])
    for c in conns:
        cell: dict[str, Any] = {}
        for which in ("ref", "cpx"):
            rows = [r[f"{which}_c{c}"] for r in runs if f"{which}_c{c}" in r]
            for key in ("rps", "p50_ms", "p99_ms", "cpu_s", "cpu_us_per_req"):
                cell[f"{which}_{key}"] = median([row.get(key) for row in rows])
            # Memory is not given back between cells: each run raises connections 1 -> 256,
            # so the first run's peak is the one that belongs to this connection count.
            cell[f"{which}_rss_peak_mb"] = rows[0].get("rss_peak_mb") if rows else None
        for key in ("rps", "p50_ms", "p99_ms", "cpu_us_per_req"):
            cell[f"ratio_{key}"] = median(
                [
                    r[f"cpx_c{c}"][key] / r[f"ref_c{c}"][key]
                    for r in runs
                    if f"cpx_c{c}" in r and r[f"ref_c{c}"].get(key)
                ]
            )
        s["cells"][c] = cell
    if runs and "direct_c1" in runs[0]:
        s["direct_p50_ms"] = median([r["direct_c1"]["p50_ms"] for r in runs])
        s["direct_p99_ms"] = median([r["direct_c1"]["p99_ms"] for r in runs])
        for which in ("ref", "cpx"):
            s[f"{which}_added_p50_ms"] = median(
                [r[f"{which}_c1"]["p50_ms"] - r["direct_c1"]["p50_ms"] for r in runs]
            )
            s[f"{which}_added_p99_ms"] = median(
                [r[f"{which}_c1"]["p99_ms"] - r["direct_c1"]["p99_ms"] for r in runs]
            )
    sse = res.get("sse_runs", [])
    if sse:
        s["sse"] = {}
        for which in ("direct", "ref", "cpx"):
            s["sse"][which] = {
                "ttfe_p50_ms": median([r[which]["ttfe"]["p50_ms"] for r in sse]),
                "ttfe_p99_ms": median([r[which]["ttfe"]["p99_ms"] for r in sse]),
                "events_per_s": median([r[which]["rate"].get("events_per_s") for r in sse]),
                "delay_p50_ms": median([r[which]["flush"].get("delay_p50_ms") for r in sse]),
                "delay_max_ms": median([r[which]["flush"].get("delay_max_ms") for r in sse]),
                "coalesced_reads": max(
                    r[which]["flush"].get("reads_with_several_events", 0) for r in sse
                ),
            }
        s["sse"]["ttfe_over_ref_ms"] = median(
            [r["cpx"]["ttfe"]["p50_ms"] - r["ref"]["ttfe"]["p50_ms"] for r in sse]
        )
        s["sse"]["rate_ratio"] = median(
            [
                r["cpx"]["rate"]["events_per_s"] / r["ref"]["rate"]["events_per_s"]
                for r in sse
                if r["ref"]["rate"].get("events_per_s") and r["cpx"]["rate"].get("events_per_s")
            ]
        )
    return s


def verdicts(res: dict[str, Any], s: dict[str, Any]) -> list[tuple[str, str, bool | None]]:
    """(target, measured, met?) for each target; None where not measured in this run."""
    t = TARGETS
    out: list[tuple[str, str, bool | None]] = []
    cells = s.get("cells", {})
    for c in (16, 64):
        r = cells.get(c, {}).get("ratio_rps")
        out.append(
            (
                f"throughput c={c} >= {t['throughput_ratio_min']}x reference",
                "-" if r is None else f"{r:.2f}x",
                None if r is None else r >= t["throughput_ratio_min"],
            )
        )
    for q, key in (("p50", "added_p50_ms_max"), ("p99", "added_p99_ms_max")):
        v = s.get(f"cpx_added_{q}_ms")
        out.append(
            (
                f"added latency c=1 {q} <= {t[key]} ms",
                "-" if v is None else f"{v:+.2f} ms",
                None if v is None else v <= t[key],
            )
        )
    v = s.get("sse", {}).get("ttfe_over_ref_ms")
    out.append(
        (
            f"SSE first event within {t['sse_ttfe_over_ref_ms_max']} ms of reference",
            "-" if v is None else f"{v:+.2f} ms",
            None if v is None else v <= t["sse_ttfe_over_ref_ms_max"],
        )
    )
    v = res.get("idle_rss_mb", {}).get("cpx")
    out.append(
        (
            f"idle RSS <= {t['idle_rss_mb_max']:.0f} MB",
            "-" if v is None else f"{v:.1f} MB",
            None if v is None else v <= t["idle_rss_mb_max"],
        )
    )
    v = cells.get(256, {}).get("cpx_rss_peak_mb")
    out.append(
        (
            f"RSS with 256 busy connections <= {t['busy256_rss_mb_max']:.0f} MB",
            "-" if v is None else f"{v:.1f} MB",
            None if v is None else v <= t["busy256_rss_mb_max"],
        )
    )
    q = res.get("queue")
    v = q.get("rss_peak_mb") if q else None
    out.append(
        (
            f"RSS with {q.get('requests', 10000) if q else 10000} queued requests <= {t['queued_rss_mb_max']:.0f} MB",
            "-" if v is None else f"{v:.1f} MB",
            None if v is None else v <= t["queued_rss_mb_max"],
        )
    )
    v = res.get("idle", {}).get("cpx", {}).get("cpu_s_per_60s")
    out.append(
        (
            f"idle CPU <= {t['idle_cpu_s_per_60s_max']} s per 60 s",
            "-" if v is None else f"{v:.2f} s",
            # psutil counts CPU in clock ticks (10 ms): compare at that resolution.
            None if v is None else round(v, 2) <= t["idle_cpu_s_per_60s_max"],
        )
    )
    for label in ("--help", "check", "keys list"):
        v = res.get("cli_ms", {}).get(label, {}).get("median_ms")
        out.append(
            (
                f"`credproxy {label}` < {t['cli_ms_max']:.0f} ms",
                "-" if v is None else f"{v:.0f} ms",
                None if v is None else v < t["cli_ms_max"],
            )
        )
    return out


def _f(v: float | None, fmt: str = "{:.2f}") -> str:
    return "-" if v is None else fmt.format(v)


def render(res: dict[str, Any], s: dict[str, Any], conns: list[int]) -> str:
    """The whole report as Markdown (also readable as plain text)."""
    m = res.get("machine", {})
    lines = [
        f"Date: {res.get('date')}  ",
        f"Machine: {m.get('nproc')} CPUs ({m.get('cpu')}), Linux {m.get('kernel')}, Python {m.get('python')},"
        f" aiohttp {m.get('aiohttp')}, uvloop {m.get('uvloop')}  ",
        f"Tools: {', '.join(m.get('tools', {}).values())}  ",
        f"Upstream: {res.get('upstream')} (TLS); SSE upstream: aiohttp  ",
        f"credproxy: {m.get('commit')}  ",
        f"Command: `{res.get('command')}`",
        "",
    ]
    if s.get("cells"):
        lines += [
            "| conns | req/s ref | req/s cpx | ratio | p50 ms ref | p50 ms cpx | p99 ms ref | p99 ms cpx"
            " | CPU us/req ref | CPU us/req cpx | ratio | CPU s ref | CPU s cpx | peak RSS MB ref | peak RSS MB cpx |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for c in conns:
            x = s["cells"][c]
            lines.append(
                f"| {c} | {_f(x['ref_rps'], '{:.0f}')} | {_f(x['cpx_rps'], '{:.0f}')} | **{_f(x['ratio_rps'])}**"
                f" | {_f(x['ref_p50_ms'])} | {_f(x['cpx_p50_ms'])} | {_f(x['ref_p99_ms'])} | {_f(x['cpx_p99_ms'])}"
                f" | {_f(x['ref_cpu_us_per_req'], '{:.0f}')} | {_f(x['cpx_cpu_us_per_req'], '{:.0f}')}"
                f" | {_f(x['ratio_cpu_us_per_req'])} | {_f(x['ref_cpu_s'], '{:.1f}')} | {_f(x['cpx_cpu_s'], '{:.1f}')}"
                f" | {_f(x['ref_rss_peak_mb'], '{:.1f}')} | {_f(x['cpx_rss_peak_mb'], '{:.1f}')} |"
            )
        lines.append("")
    if "direct_p50_ms" in s:
        lines += [
            "| c=1 latency | p50 ms | p99 ms | added p50 ms | added p99 ms |",
            "|---|---:|---:|---:|---:|",
            f"| direct (wrk -> TLS upstream) | {_f(s['direct_p50_ms'], '{:.3f}')} | {_f(s['direct_p99_ms'], '{:.3f}')} | | |",
        ]
        for which, name in (("ref", "reference"), ("cpx", "credproxy")):
            x = s["cells"][1]
            lines.append(
                f"| {name} | {_f(x[f'{which}_p50_ms'], '{:.3f}')} | {_f(x[f'{which}_p99_ms'], '{:.3f}')}"
                f" | {_f(s[f'{which}_added_p50_ms'], '{:+.3f}')} | {_f(s[f'{which}_added_p99_ms'], '{:+.3f}')} |"
            )
        lines.append("")
    if "sse" in s:
        lines += [
            "| SSE | first event p50 ms | p99 ms | events/s (one stream) | per-event delay p50 ms | max ms"
            " | reads with >1 event |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for which, name in (("direct", "direct"), ("ref", "reference"), ("cpx", "credproxy")):
            x = s["sse"][which]
            lines.append(
                f"| {name} | {_f(x['ttfe_p50_ms'])} | {_f(x['ttfe_p99_ms'])} | {_f(x['events_per_s'], '{:.0f}')}"
                f" | {_f(x['delay_p50_ms'])} | {_f(x['delay_max_ms'])} | {x['coalesced_reads']} |"
            )
        lines += [
            "",
            f"credproxy first event - reference: {_f(s['sse']['ttfe_over_ref_ms'], '{:+.2f}')} ms;"
            f" events/s ratio credproxy / reference: {_f(s['sse']['rate_ratio'])}",
            "",
        ]
    st = res.get("streams")
    if st:
        lines += [
            "| open SSE streams | asked | got first event | upstream connections | RSS before MB | RSS open MB |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for which, name in (("ref", "reference"), ("cpx", "credproxy")):
            if which in st:
                x = st[which]
                lines.append(
                    f"| {name} | {x['streams']} | {x['open']} | {x['upstream_connections']}"
                    f" | {x['rss_before_mb']:.1f} | {x['rss_open_mb']:.1f} |"
                )
        lines.append("")
    q = res.get("queue")
    if q:
        lines += [
            f"Queue behind a 429 hold: {q.get('requests')} requests (+1 that got the 429) over {q.get('listeners')}"
            f" listeners; {q.get('queued')} were waiting {q.get('queued_after_s')} s after the first was sent;"
            f" credproxy RSS idle {q['rss_idle_mb']:.1f} MB, with them queued {q['rss_queued_mb']:.1f} MB,"
            f" peak {q['rss_peak_mb']:.1f} MB; drained {q.get('drain_s')} s after the hold ended;"
            f" statuses {q.get('statuses')}; CPU {q['cpu_s_queueing']:.1f} s to queue,"
            f" {q['cpu_s_total']:.1f} s in all.",
            "",
        ]
    idle = res.get("idle")
    if idle:
        lines += [
            f"Idle {idle['cpx']['seconds']:g} s: credproxy {idle['cpx']['cpu_s']:.3f} s CPU"
            f" ({idle['cpx']['cpu_s_per_60s']:.3f} s per 60 s), {idle['cpx']['wakeups_per_s']:.1f} wake-ups/s;"
            f" reference {idle['ref']['cpu_s']:.3f} s CPU, {idle['ref']['wakeups_per_s']:.1f} wake-ups/s."
            f" Idle RSS (started, one request served): credproxy {res['idle_rss_mb']['cpx']:.1f} MB,"
            f" reference {res['idle_rss_mb']['ref']:.1f} MB.",
            "",
        ]
    elif res.get("idle_rss_mb"):
        lines += [
            f"Idle RSS (started, one request served): credproxy {res['idle_rss_mb']['cpx']:.1f} MB,"
            f" reference {res['idle_rss_mb']['ref']:.1f} MB.",
            "",
        ]
    cli = res.get("cli_ms")
    if cli:
        lines.append(
            "CLI wall time (median of 10, "
            + next(iter(cli.values()))["tool"]
            + "): "
            + ", ".join(f"`{k}` {v['median_ms']:.0f} ms" for k, v in cli.items())
        )
        lines.append("")
    if "access_log_lines" in res:
        lines.append(
            f"credproxy wrote {res['access_log_lines']} access-log lines; /metrics counted"
            f" {res.get('metrics_requests_total', 0):.0f} requests."
        )
        lines.append("")
    lines += ["| target | measured | met |", "|---|---:|---|"]
    for name, measured, ok in verdicts(res, s):
        lines.append(
            f"| {name} | {measured} | {'-' if ok is None else ('yes' if ok else '**no**')} |"
        )
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="credproxy vs a bare aiohttp forwarder, same run")
    p.add_argument("--quick", action="store_true", help="1 run, 3 s cells, shorter idle and SSE")
    p.add_argument(
        "--report-only",
        action="store_true",
        help="short HTTP comparison against the targets; prints, never fails",
    )
    p.add_argument(
        "--runs", type=int, help="runs of each measurement (medians are reported); default 3"
    )
    p.add_argument("--duration", type=float, help="seconds per wrk cell (default 10, --quick 3)")
    p.add_argument("--conns", default="1,16,64,256", help="wrk connection counts")
    p.add_argument("--idle-seconds", type=float, help="idle CPU window (default 60, --quick 15)")
    p.add_argument("--streams", type=int, default=2000, help="concurrent SSE streams")
    p.add_argument(
        "--open-timeout",
        type=float,
        help="seconds to wait for all streams (default 30, --quick 10)",
    )
    p.add_argument("--queue-requests", type=int, default=10_000)
    p.add_argument("--hold", type=float, help="429 hold seconds (default 40, --quick 30)")
    p.add_argument("--skip", default="", help="comma list: idle,cli,http,sse,streams,queue")
    p.add_argument("--ref-pool", type=int, default=0, help="reference connection pool (0: no cap)")
    p.add_argument(
        "--uvloop", action="store_true", help="run both proxies on uvloop (must be installed)"
    )
    p.add_argument(
        "--credproxy-cmd",
        help="command that stands for `credproxy` (e.g. 'python my_patched_wrapper.py'); "
        "default: the credproxy script next to this Python, else python -m proxy",
    )
    p.add_argument("--json", type=Path, help="write every raw number here")
    p.add_argument("--markdown", type=Path, help="write the report here")
    p.add_argument("--from-json", type=Path, help="only print the report of a saved --json file")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs, configs)")
    a = p.parse_args(argv)
    if a.report_only:
        a.quick = True
        a.skip = "idle,cli,sse,streams,queue"
        a.conns = "1,16,64"
    a.runs = a.runs or (1 if a.quick else 3)
    a.duration = a.duration or (3.0 if a.quick else 10.0)
    a.idle_seconds = a.idle_seconds or (15.0 if a.quick else 60.0)
    a.open_timeout = a.open_timeout or (10.0 if a.quick else 30.0)
    a.hold = a.hold or (30.0 if a.quick else 40.0)
    a.ttfe_n = 60 if a.quick else 200
    a.sse_events = 5000 if a.quick else 20000
    a.conns = [int(c) for c in str(a.conns).split(",") if c]
    a.skip = {x.strip() for x in str(a.skip).split(",") if x.strip()}
    if a.runs < 1 or a.runs > 20 or a.duration <= 0 or a.duration > 600:
        p.error("--runs must be 1..20 and --duration 0..600 s")
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_json:
        res = json.loads(args.from_json.read_text())
        conns = sorted({int(k.split("_c")[1]) for r in res.get("http_runs", []) for k in r})
        conns = [c for c in conns if any(f"cpx_c{c}" in r for r in res["http_runs"])]
        report = render(res, summarize(res, conns), conns)
        print(report)
        if args.markdown:
            args.markdown.write_text(report)
        return 0
    if not shutil.which("wrk"):
        print("benchmarks/run.py needs wrk: apt-get install wrk", file=sys.stderr)
        return 0 if args.report_only else 1
    if (os.cpu_count() or 1) < 2:
        log("warning: one CPU only; the proxy is not pinned apart from the load generator")
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)
    with contextlib.suppress(OSError):
        os.sched_setaffinity(0, {LOAD_CPU})  # we, and everything we start, run on CPU 0
    work = Path(tempfile.mkdtemp(prefix="credproxy-bench-"))
    os.chmod(work, 0o700)
    bench = Bench(args, work)
    code = 0
    try:
        bench.run()
    except KeyboardInterrupt:
        log("interrupted: stopping everything")
        code = 130
    except Exception as exc:
        log(f"failed: {type(exc).__name__}: {exc}")
        for name in ("credproxy.log", "credproxy-queue.log", "reference.log", "upstream.log"):
            text = tail(work / name, 15)
            if text:
                log(f"--- last lines of {name}:\n{text}")
        code = 0 if args.report_only else 1
    finally:
        PROCS.stop_all()
        if args.keep:
            log(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    res = bench.results
    summary = summarize(res, args.conns)
    res["summary"] = summary
    report = render(res, summary, args.conns)
    print(report)
    if args.json:
        args.json.write_text(json.dumps(res, indent=1, default=str))
    if args.markdown:
        args.markdown.write_text(report)
    return code


if __name__ == "__main__":
    sys.exit(main())
