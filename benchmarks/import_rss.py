"""Where credproxy's idle memory goes: the resident set after each dependency is imported.

    python benchmarks/import_rss.py [--config PATH]

Each step runs in the same fresh process, in order, so a line shows what that import adds on
top of the ones above it (a shared library's pages count once they are touched). The last
steps import credproxy's own modules and, with --config, validate that config file: the
daemon's idle resident set is about the total plus its sockets, pools and caches.
Linux only (reads /proc/self/status).
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

STEPS: list[tuple[str, list[str]]] = [
    ("python", []),
    ("asyncio + ssl", ["asyncio", "ssl"]),
    ("aiohttp (client and server)", ["aiohttp", "aiohttp.web"]),
    ("uvloop", ["uvloop"]),
    ("pyyaml", ["yaml"]),
    ("cryptography (AES-GCM, HKDF, scrypt)", ["cryptography.hazmat.primitives.ciphers.aead"]),
    ("pydantic", ["pydantic"]),
    ("prometheus-client", ["prometheus_client"]),
    ("watchfiles", ["watchfiles"]),
    ("sqlite3", ["sqlite3"]),
    ("proxy.config (the config models)", ["proxy.config"]),
    ("the rest of proxy (server, pipeline, store, admin)", ["proxy.serve", "proxy.admin"]),
]


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, help="also validate this credproxy config")
    args = parser.parse_args()
    print(f"{'step':52} {'adds MB':>8} {'total MB':>9}")
    for label, modules in STEPS:
        before = rss_mb()
        for name in modules:
            importlib.import_module(name)
        after = rss_mb()
        print(f"{label:52} {after - before:8.1f} {after:9.1f}")
    if args.config is not None:
        from proxy.config import parse_config

        before = rss_mb()
        parse_config(args.config.read_text(), source=str(args.config), base_dir=args.config.parent)
        after = rss_mb()
        print(f"{'validating ' + str(args.config):52} {after - before:8.1f} {after:9.1f}")


if __name__ == "__main__":
    main()
