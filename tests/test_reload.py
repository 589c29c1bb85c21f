"""Hot reload: edits, renames, ConfigMap symlink swaps, SIGHUP and POST /reload."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from proxy.server import free_port
from tests.conftest import api_doc, start_user_daemon, write_config
from tests.fakeapi import fake_api

KEYS = {"key-read": "sk_read_0000000000", "key-rw": "sk_rw_1111111111111"}


async def _until(check: Any, timeout: float = 3.0) -> float:
    """Poll an async predicate; return the seconds it took to hold."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if await check():
            return time.monotonic() - start
        await asyncio.sleep(0.05)
    raise AssertionError(f"not within {timeout}s")


def _rewrite(path: Path, doc: dict[str, Any], how: str) -> None:
    text = yaml.safe_dump(doc, sort_keys=False)
    if how == "edit":
        with open(path, "r+") as fh:
            fh.seek(0)
            fh.truncate()
            fh.write(text)
    elif how == "rename":
        tmp = path.with_name(".config.yaml.swp")
        tmp.write_text(text)
        os.replace(tmp, path)


async def _post_allowed(client: aiohttp.ClientSession, d: Any) -> bool:
    async with client.post(f"{d.url}/api/echo", headers=d.auth(), data=b"x") as resp:
        return resp.status == 200


async def test_reload_by_edit_and_by_rename(tls_upstream, start_daemon, ca_file, client) -> None:
    """An in-place edit and an editor-style write+rename both take effect within 3 s."""
    upstream = await tls_upstream(fake_api())
    d = await start_daemon(api_doc(upstream.url, ca_file, ["read"]), KEYS, watch=True)
    assert not await _post_allowed(client, d)
    doc = yaml.safe_load(d.config_path.read_text())
    doc["apps"]["app"]["upstreams"]["api"]["scopes"] = ["read", "write"]
    _rewrite(d.config_path, doc, "edit")
    took = await _until(lambda: _post_allowed(client, d))
    assert took < 3.0
    doc["apps"]["app"]["upstreams"]["api"]["scopes"] = ["read"]
    _rewrite(d.config_path, doc, "rename")
    await _until(lambda: _not(_post_allowed(client, d)))
    assert d.daemon.last_reload["ok"] is True


async def _not(coro: Any) -> bool:
    return not await coro


async def test_reload_by_configmap_symlink_swap(
    tls_upstream, start_daemon, ca_file, client, tmp_path: Path
) -> None:
    """A Kubernetes-style `..data` symlink swap is picked up like an edit."""
    upstream = await tls_upstream(fake_api())
    d = await start_daemon(api_doc(upstream.url, ca_file, ["read"]), KEYS)
    # Lay out the ConfigMap volume: config.yaml -> ..data/config.yaml, ..data -> ..v1
    vol = tmp_path / "cm"
    (vol / "..v1").mkdir(parents=True)
    doc = yaml.safe_load(d.config_path.read_text())
    write_config(vol / "..v1" / "config.yaml", doc)
    os.symlink("..v1", vol / "..data")
    os.symlink("..data/config.yaml", vol / "config.yaml")
    from proxy.reload import follow_config

    d.daemon.config_path = vol / "config.yaml"
    watcher = asyncio.create_task(follow_config(vol / "config.yaml", d.daemon.reload))
    try:
        await asyncio.sleep(0.3)
        doc["apps"]["app"]["upstreams"]["api"]["scopes"] = ["read", "write"]
        (vol / "..v2").mkdir()
        write_config(vol / "..v2" / "config.yaml", doc)
        os.symlink("..v2", vol / "..data_tmp")
        os.replace(vol / "..data_tmp", vol / "..data")
        await _until(lambda: _post_allowed(client, d))
    finally:
        watcher.cancel()


async def test_invalid_reload_keeps_old_config(tls_upstream, start_daemon, ca_file, client) -> None:
    """A broken new version changes nothing; /status shows the failed attempt with its line."""
    upstream = await tls_upstream(fake_api())
    d = await start_daemon(api_doc(upstream.url, ca_file, ["read", "write"]), KEYS, watch=True)
    good = d.config_path.read_text()
    d.config_path.write_text(
        good.replace(f"base_url: {upstream.url}/v1", "base_url: http://insecure.example/v1")
    )

    async def failed() -> bool:
        return d.daemon.last_reload is not None and d.daemon.last_reload["ok"] is False

    await _until(failed)
    assert await _post_allowed(client, d)
    async with client.get(f"{d.admin_url}/status") as resp:
        status = await resp.json()
    last = status["config"]["last_reload"]
    assert last["ok"] is False
    assert "base_url" in last["error"] and "https" in last["error"] and "line" in last["error"]
    assert status["config"]["version"] == 1
    # half-written YAML is refused the same way
    d.config_path.write_text(good[: len(good) // 2] + "\n  - [unclosed")
    await asyncio.sleep(1.0)
    assert d.daemon.snapshot.version == 1
    assert await _post_allowed(client, d)


async def test_post_reload_and_listener_changes(
    tls_upstream, start_daemon, ca_file, client
) -> None:
    """POST /reload applies a new version: a new dedicated listener opens, a removed one closes, pools survive."""
    upstream = await tls_upstream(fake_api())
    d = await start_daemon(api_doc(upstream.url, ca_file, ["read"]), KEYS)
    async with client.get(f"{d.url}/api/echo", headers=d.auth()) as resp:
        assert resp.status == 200
    session_before = d.daemon.clients._pools["api"].session
    port = free_port()
    doc = yaml.safe_load(d.config_path.read_text())
    doc["upstreams"]["api"]["listen"] = f"127.0.0.1:{port}"
    write_config(d.config_path, doc)
    async with client.post(f"{d.admin_url}/reload") as resp:
        assert resp.status == 200
        assert (await resp.json())["ok"] is True
    async with client.get(f"http://127.0.0.1:{port}/v1/echo", headers=d.auth()) as resp:
        assert resp.status == 200
    assert d.daemon.clients._pools["api"].session is session_before
    del doc["upstreams"]["api"]["listen"]
    write_config(d.config_path, doc)
    async with client.post(f"{d.admin_url}/reload") as resp:
        assert (await resp.json())["ok"] is True
    await asyncio.sleep(0.2)
    try:
        async with client.get(f"http://127.0.0.1:{port}/v1/echo", headers=d.auth()) as resp:
            raise AssertionError(f"listener still open: {resp.status}")
    except aiohttp.ClientConnectorError:
        pass
    bad = d.config_path.read_text().replace("scopes: [read]", "scopes: [fly]")
    d.config_path.write_text(bad.replace("- read", "- fly"))
    async with client.post(f"{d.admin_url}/reload") as resp:
        assert resp.status == 422
        assert (await resp.json())["ok"] is False


async def test_stream_survives_reload(tls_upstream, start_daemon, ca_file, client) -> None:
    """A long SSE stream started before a reload runs to its end under the old version."""
    upstream = await tls_upstream(fake_api())
    d = await start_daemon(api_doc(upstream.url, ca_file, ["read"]), KEYS)
    events = 0
    async with client.get(f"{d.url}/api/sse?n=6&interval=0.25", headers=d.auth()) as resp:
        assert resp.status == 200
        doc = yaml.safe_load(d.config_path.read_text())
        doc["apps"] = {"someone_else": {"upstreams": {"api": {"scopes": ["read"]}}}}
        write_config(d.config_path, doc)
        assert await d.daemon.reload("test")
        async for chunk in resp.content.iter_any():
            events += chunk.count(b"\n\n")
    assert events == 6
    # and the new version is in force for new requests: the old app is gone
    async with client.get(f"{d.url}/api/echo", headers=d.auth()) as resp:
        assert resp.status == 401


async def test_sighup_reloads_a_running_daemon(
    tmp_path: Path, tls_upstream, ca_file, daemon_procs
) -> None:
    """SIGHUP to `credproxy serve` reloads its config; the metrics count the reload."""
    upstream = await tls_upstream(fake_api())
    doc = api_doc(upstream.url, ca_file, ["read"])
    d = await start_user_daemon(tmp_path, daemon_procs, doc, KEYS)
    proc, cfg, headers = d.proc, d.config, d.auth()
    listen, admin = d.url.removeprefix("http://"), d.admin_url.removeprefix("http://")
    doc = yaml.safe_load(cfg.read_text())
    async with aiohttp.ClientSession() as s:
        async with s.post(f"http://{listen}/api/echo", headers=headers) as resp:
            assert resp.status == 403
        doc["apps"]["app"]["upstreams"]["api"]["scopes"] = ["read", "write"]
        write_config(cfg, doc)
        proc.proc.send_signal(signal.SIGHUP)

        async def allowed() -> bool:
            async with s.post(f"http://{listen}/api/echo", headers=headers) as resp:
                return resp.status == 200

        await _until(allowed)
        async with s.get(f"http://{admin}/metrics") as resp:
            text = await resp.text()
    assert 'credproxy_config_reloads_total{result="ok"}' in text
    assert proc.stop() == 0
