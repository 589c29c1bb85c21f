"""Bodies stream through the daemon: a 50 MB upload and download leave its memory flat."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import psutil

from tests.conftest import DaemonProcess, start_user_daemon, upstream_doc
from tests.fakeapi import fake_api

SIZE = 50 * 1024 * 1024
# Growth allowed over the idle baseline; a buffered 50 MB body alone would exceed it.
RSS_BOUND = 25 * 1024 * 1024


async def _watch_rss(pid: int, peak: list[int], stop: asyncio.Event) -> None:
    proc = psutil.Process(pid)
    while not stop.is_set():
        peak[0] = max(peak[0], proc.memory_info().rss)
        await asyncio.sleep(0.02)


async def test_50mb_up_and_down_with_flat_memory(
    tmp_path: Path, tls_upstream, ca_file: Path, daemon_procs: list[DaemonProcess]
) -> None:
    """RSS of the daemon grows by less than 25 MB while 50 MB go up and 50 MB come down."""
    upstream = await tls_upstream(fake_api())
    doc = {
        "limits": {"max_body_bytes": 200 * 1024 * 1024},
        "upstreams": {"api": upstream_doc(upstream.url, ca_file)},
        "apps": {"app": {"upstreams": {"api": {"scopes": ["read", "write"]}}}},
    }
    secrets = {name: f"sk_{name}_0123456789" for name in ("key-read", "key-rw")}
    d = await start_user_daemon(
        tmp_path, daemon_procs, doc, secrets, args=("serve", "--log-level", "warning")
    )
    proc = d.proc
    headers = d.auth()
    base = f"{d.url}/api"

    async with aiohttp.ClientSession(trust_env=False) as session:
        async with session.get(f"{base}/big?size=1024", headers=headers) as resp:
            assert resp.status == 200  # warm up the pool
            await resp.read()
        baseline = psutil.Process(proc.proc.pid).memory_info().rss
        peak = [baseline]
        stop = asyncio.Event()
        watcher = asyncio.create_task(_watch_rss(proc.proc.pid, peak, stop))

        digest = hashlib.sha256()

        async def body() -> AsyncIterator[bytes]:
            block = bytes(range(256)) * 256  # 64 KiB
            for _ in range(SIZE // len(block)):
                digest.update(block)
                yield block

        async with session.post(
            f"{base}/upload", headers={**headers, "Content-Length": str(SIZE)}, data=body()
        ) as resp:
            assert resp.status == 200
            doc = await resp.json()
        assert doc == {"size": SIZE, "sha256": digest.hexdigest()}

        received = 0
        async with session.get(f"{base}/big?size={SIZE}", headers=headers) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Length"] == str(SIZE)
            async for chunk in resp.content.iter_chunked(1 << 16):
                received += len(chunk)
                await asyncio.sleep(0)  # a reader no faster than the network
        assert received == SIZE
        stop.set()
        await watcher
    growth = peak[0] - baseline
    print(f"daemon RSS growth: {growth / 1e6:.1f} MB")
    assert growth < RSS_BOUND, f"daemon RSS grew by {growth / 1e6:.1f} MB"
