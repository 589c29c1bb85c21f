"""Where a proxied request's CPU goes inside credproxy, measured under load (in situ).

A stage's cost measured alone, in a loop, is a fraction of what it costs inside the daemon
under load, where every request runs through aiohttp, uvloop, TLS and the kernel between
two of its stages and finds its code and data out of the CPU's caches. So this script
copies `proxy/` to a temporary directory, inserts `perf_counter_ns()` marks between the
synchronous stretches of `Pipeline.handle` (none spans an await but `start_response` and
`stream_body`, whose awaits complete without waiting on a complete answer), runs that copy
under `ab.py` beside the reference forwarder, and prints the median of each stretch over
every request. Each mark costs ~0.3 us, which every stretch includes once.

    python benchmarks/stage_times.py [--source DIR] [--duration 10] [--conns 16]

`--source` is a directory holding the `proxy/` to measure (default: this checkout). The
marks are placed by matching lines of the pipeline; if one no longer matches, the script
stops and names it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent

RECORDER = """
import atexit as _atexit, os as _os
from time import perf_counter_ns as _ns
_T: dict[str, list[int]] = {}
def _rec(stretch, ns):
    _T.setdefault(stretch, []).append(ns)
def _dump():
    import json, statistics
    out = {k: [statistics.median(v), len(v)] for k, v in _T.items()}
    with open(_os.environ["STAGE_TIMES_OUT"], "w") as fh:
        json.dump(out, fh)
_atexit.register(_dump)
"""

# (line as it is in pipeline.py, the same line with marks); each must match exactly once.
MARKS: list[tuple[str, str]] = [
    (
        'access_log = logging.getLogger("credproxy.access")\n',
        RECORDER + 'access_log = logging.getLogger("credproxy.access")\n',
    ),
    (
        "        started = time.perf_counter()\n",
        "        started = time.perf_counter()\n        _a = _ns()\n",
    ),
    (
        "            verdict = self._decide(ex, request, snap, vault, mode, address)\n",
        "            _b = _ns()\n            verdict = self._decide(ex, request, snap, vault, mode, address)\n"
        "            _c = _ns(); _rec('1 method checks, snapshot', _b - _a); _rec('2 decide (guard, identify, route, authorize)', _c - _b)\n",
    ),
    (
        "            deadline = time.monotonic() + _max_wait(request, upstream.queue.max_wait)\n",
        "            deadline = time.monotonic() + _max_wait(request, upstream.queue.max_wait)\n"
        "            _d = _ns(); _rec('3 credential, gate, deadline', _d - _c)\n",
    ),
    (
        "            pool = self.clients.acquire(upstream_name, upstream)\n",
        "            pool = self.clients.acquire(upstream_name, upstream)\n"
        "            _e = _ns(); _rec('4 body, retry policy, series, pool', _e - _d)\n",
    ),
    (
        "                    headers = request_headers(",
        "                    _f = _ns(); _rec('5 limiter try_acquire, secret', _f - _e)\n"
        "                    headers = request_headers(",
    ),
    (
        "                    sent_at = time.perf_counter()\n",
        "                    sent_at = time.perf_counter()\n"
        "                    _g = _ns(); _rec('6 request headers', _g - _f)\n",
    ),
    (
        "                    limiter.reached()\n                    latency.observe",
        "                    _h = _ns()\n                    limiter.reached()\n                    latency.observe",
    ),
    (
        "                    after_429 = False\n",
        "                    after_429 = False\n"
        "                    _i = _ns(); _rec('7 reached, latency, observe', _i - _h)\n",
    ),
    (
        "                    response = await start_response(request, upstream_resp)\n",
        "                    _j = _ns()\n"
        "                    response = await start_response(request, upstream_resp)\n"
        "                    _k = _ns(); _rec('8 start_response (aiohttp head)', _k - _j)\n",
    ),
    (
        "                        ex.bytes_out = await stream_body(request, response, upstream_resp)\n",
        "                        ex.bytes_out = await stream_body(request, response, upstream_resp)\n"
        "                        _l = _ns(); _rec('9 stream_body (the write)', _l - _k)\n",
    ),
    (
        "        ex.status = response.status\n        self._log(ex, started)\n        return response",
        "        ex.status = response.status\n        _m = _ns()\n        self._log(ex, started)\n"
        "        _rec('A release upstream and pool', _m - _l); _rec('B access line, count', _ns() - _m)\n"
        "        return response",
    ),
]


def instrument(source: Path, dest: Path) -> None:
    shutil.copytree(source / "proxy", dest / "proxy")
    path = dest / "proxy" / "pipeline.py"
    text = path.read_text()
    for line, marked in MARKS:
        if text.count(line) != 1:
            sys.exit(
                f"stage_times: this line of proxy/pipeline.py has moved; update MARKS:\n{line}"
            )
        text = text.replace(line, marked)
    path.write_text(text)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", type=Path, default=HERE.parent, help="directory holding proxy/")
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--conns", default="16")
    a = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="credproxy-stages-"))
    try:
        instrument(a.source.resolve(), work / "variant")
        out = work / "stages.json"
        env = {**os.environ, "STAGE_TIMES_OUT": str(out)}
        subprocess.run(
            [
                sys.executable,
                str(HERE / "ab.py"),
                "--rounds",
                "1",
                "--duration",
                str(a.duration),
                "--conns",
                a.conns,
                f"stages={work / 'variant'}",
            ],
            check=True,
            cwd=work,  # not the checkout: its proxy/ would come first on sys.path
            env=env,
        )
        stages = json.loads(out.read_text())
        total = 0.0
        print(f"\n{'stretch of Pipeline.handle':48s} {'median us':>10s} {'requests':>9s}")
        for name in sorted(stages):
            median, count = stages[name]
            total += median
            print(f"{name:48s} {median / 1000:10.2f} {count:9d}")
        print(f"{'sum of the medians':48s} {total / 1000:10.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
