"""A/B: credproxy variants and the reference forwarder, interleaved in one run.

Each variant is a directory holding a `proxy/` package (a checkout, `git archive`, or a
patched copy); it runs as `python -m proxy serve` with that directory on PYTHONPATH, so run
this script from outside the repository (the current directory comes first on sys.path).
Every variant gets its own HOME, config (one listener, the same upstream block as run.py)
and store; all run at once, pinned like run.py's, and take turns under wrk in a rotating
order. Reported per variant and connection count: median req/s, CPU us per request (min and
median over rounds; the min is the steadiest on a busy machine) and the per-round ratio
to the reference's req/s.

    git archive HEAD~3 proxy | tar -x -C /tmp/base
    cd /tmp && python /work/main/benchmarks/ab.py --rounds 3 --duration 5 --conns 16,64 \\
        base=/tmp/base new=/work/main

Options --profile NAME writes a cProfile of that variant to /tmp/cprof_NAME.out.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import psutil
import run as R

PROFILE_SHIM = (
    "import atexit, cProfile, sys; from proxy.cli import main; p = cProfile.Profile(); "
    "atexit.register(lambda: (p.disable(), p.dump_stats({out!r}))); p.enable(); "
    "sys.exit(main(sys.argv[1:]))"
)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=float, default=5.0, help="seconds per wrk cell")
    p.add_argument("--conns", default="16,64")
    p.add_argument("--profile", action="append", default=[], help="variant to run under cProfile")
    p.add_argument("--keep", action="store_true", help="keep the work directory (configs, logs)")
    p.add_argument("variants", nargs="+", help="name=directory holding proxy/")
    a = p.parse_args()
    conns = [int(c) for c in a.conns.split(",")]
    variants = dict(v.split("=", 1) for v in a.variants)

    args = R.parse_args(["--quick"])
    work = Path(tempfile.mkdtemp(prefix="credproxy-bench-ab-"))
    bench = R.Bench(args, work)
    try:
        bench.certs()
        bench.aio_port = bench.start_aio_upstream()
        bench.json_port = bench.start_nginx()
        procs: dict[str, Any] = {}
        urls: dict[str, tuple[str, str]] = {}
        for name, path in variants.items():
            port, admin = R.free_port(), R.free_port()
            config = {
                "listen": [f"127.0.0.1:{port}"],
                "admin_listen": f"127.0.0.1:{admin}",
                "shutdown_grace": "1s",
                "upstreams": {"api": bench.upstream_block(bench.json_port, bench.ca)},
                "apps": {"bench": {"upstreams": {"api": {"scopes": ["read", "write"]}}}},
            }
            run_it = (
                f"-c {PROFILE_SHIM.format(out=f'/tmp/cprof_{name}.out')!r}"
                if name in a.profile
                else "-m proxy"
            )
            bench.args.credproxy_cmd = f"env PYTHONPATH={path} {sys.executable} {run_it}"
            env, token = bench.setup_credproxy(f"home-{name}", config)
            procs[name] = bench.start_credproxy(env, admin, f"{name}.log")
            urls[name] = (f"http://127.0.0.1:{port}/api/auth/test", token)
        ref_port = R.free_port()
        procs["ref"] = bench.start_reference(ref_port, {"api": bench.json_port})
        urls["ref"] = (f"http://127.0.0.1:{ref_port}/api/auth/test", "cpx_not_checked")
        ps = {k: psutil.Process(proc.pid) for k, proc in procs.items()}
        names = ["ref", *variants]
        for n in names:  # warm-up: pools, code paths
            R.wrk(urls[n][0], 16, 1, f"Authorization: Bearer {urls[n][1]}", ps[n])
        res: dict[tuple[str, int], list[tuple[float, float, float]]] = {
            (n, c): [] for n in names for c in conns
        }
        for r in range(a.rounds):
            for c in conns:
                k = r % len(names)
                for n in names[k:] + names[:k]:
                    out = R.wrk(
                        urls[n][0], c, a.duration, f"Authorization: Bearer {urls[n][1]}", ps[n]
                    )
                    res[(n, c)].append((out["rps"], out["cpu_us_per_req"], out["p50_ms"]))
            R.log(f"round {r + 1} of {a.rounds} done")
        for c in conns:
            print(f"c={c}")
            for n in names:
                v = res[(n, c)]
                ratios = " ".join(
                    f"{x[0] / y[0]:.2f}" for x, y in zip(v, res[("ref", c)], strict=True)
                )
                print(
                    f"  {n:10s} req/s {statistics.median(x[0] for x in v):7.0f}"
                    f"  CPU us/req min {min(x[1] for x in v):4.0f}"
                    f" median {statistics.median(x[1] for x in v):4.0f}"
                    f"  p50 {statistics.median(x[2] for x in v):.2f} ms  req/s / ref: {ratios}"
                )
    finally:
        R.PROCS.stop_all()  # every process also has a parent-death signal
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
