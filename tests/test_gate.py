"""Rate limits end to end against the sandbox: pace, hold on 429, queue fairly, lose nothing."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy.sandbox import Sandbox
from tests.conftest import upstream_doc


@pytest.fixture
async def sandbox() -> AsyncIterator[Sandbox]:
    async with Sandbox() as sb:
        yield sb


def _doc(sandbox: Sandbox, ca: Path, apps: list[str], **upstream: Any) -> dict[str, Any]:
    up: dict[str, Any] = {
        "base_url": sandbox.base_url,
        "ca_bundle": str(ca),
        "credentials": [{"name": "rw", "scopes": ["read", "write", "delete"]}],
    }
    up.update(upstream)
    return {
        "upstreams": {"aimychats": up},
        "apps": {a: {"upstreams": {"aimychats": {"scopes": ["read", "write"]}}} for a in apps},
    }


async def _start(
    sandbox: Sandbox,
    start_daemon: Any,
    tmp_path: Path,
    apps: list[str],
    plan: str = "pro",
    **upstream: Any,
) -> tuple[Any, str]:
    ca = sandbox.write_ca(tmp_path / "sandbox-ca.pem")
    key = sandbox.new_key(["read", "write", "delete"], plan=plan)
    d = await start_daemon(_doc(sandbox, ca, apps, **upstream), {"rw": key})
    return d, key


async def test_429_is_held_and_resent_once(sandbox, start_daemon, tmp_path, client) -> None:
    """A forced 429 with Retry-After 2: the app sees success after ~2 s; the sandbox processed one copy."""
    d, key = await _start(sandbox, start_daemon, tmp_path, ["app"])
    sandbox.force_429(key, retry_after=2)
    start = time.monotonic()
    async with client.post(
        f"{d.url}/aimychats/conversations", headers=d.auth("app"), json={"title": "once"}
    ) as resp:
        assert resp.status == 201, await resp.text()
    took = time.monotonic() - start
    assert 1.8 <= took < 4.0
    posts = [r for r in sandbox.processed if r.method == "POST"]
    assert len(posts) == 1
    async with client.get(f"{d.admin_url}/metrics") as resp:
        metrics = await resp.text()
    assert 'credproxy_retries_total{reason="429",upstream="aimychats"} 1.0' in metrics
    assert 'credproxy_holds_total{upstream="aimychats"} 1.0' in metrics
    assert "credproxy_queue_wait_seconds_bucket" in metrics
    async with client.get(f"{d.url}/aimychats/conversations", headers=d.auth("app")) as resp:
        titles = [c["title"] for c in (await resp.json())["data"]]
    assert titles.count("once") == 1


async def test_http_date_retry_after(sandbox, start_daemon, tmp_path, client) -> None:
    """A Retry-After given as an HTTP-date holds until that date."""
    d, key = await _start(sandbox, start_daemon, tmp_path, ["app"])
    sandbox.force_429(key, retry_after=2, http_date=True)
    start = time.monotonic()
    async with client.get(f"{d.url}/aimychats/auth/test", headers=d.auth("app")) as resp:
        assert resp.status == 200
    assert 0.9 <= time.monotonic() - start < 4.0


async def test_many_apps_during_a_hold(sandbox, start_daemon, tmp_path, client) -> None:
    """200 requests from 3 apps during a hold all succeed, none is duplicated, apps alternate."""
    apps = ["a", "b", "c"]
    d, key = await _start(sandbox, start_daemon, tmp_path, apps)
    sandbox.force_429(key, retry_after=2)
    async with client.get(f"{d.url}/aimychats/auth/test", headers=d.auth("a")) as first:
        pass  # starts the hold (and succeeds after it)
    assert first.status == 200
    sandbox.received.clear()
    sandbox.force_429(key, retry_after=1)

    async def one(app: str, i: int) -> int:
        headers = {**d.auth(app), "X-Test": f"{app}-{i}"}
        async with client.get(f"{d.url}/aimychats/auth/test", headers=headers) as resp:
            return resp.status

    jobs = [one(apps[i % 3] if i < 150 else "a", i) for i in range(200)]
    statuses = await asyncio.gather(*jobs)
    assert statuses == [200] * 200
    served = [
        dict(r.headers).get("X-Test") or dict(r.headers).get("x-test") for r in sandbox.processed
    ]
    served = [s for s in served if s]
    assert len(served) == 200 and len(set(served)) == 200
    # round-robin: among the first 60 served, each app has its fair third
    head = [s.split("-")[0] for s in served[:60]]
    for app in apps:
        assert head.count(app) >= 15, head


async def test_remaining_zero_holds_until_reset(sandbox, start_daemon, tmp_path, client) -> None:
    """After a response with Remaining 0, nothing is sent before its Reset."""
    d, key = await _start(sandbox, start_daemon, tmp_path, ["app"])
    sandbox.force_remaining_zero(key, reset_in=2)
    async with client.get(f"{d.url}/aimychats/auth/test", headers=d.auth("app")) as resp:
        assert resp.headers["X-RateLimit-Remaining"] == "0"
        reset = int(resp.headers["X-RateLimit-Reset"])
    sandbox.received.clear()
    async with client.get(f"{d.url}/aimychats/auth/test", headers=d.auth("app")) as resp:
        assert resp.status == 200
    assert sandbox.received and all(r.at >= reset - 1.0 for r in sandbox.received)
    assert not [r for r in sandbox.received if r.at < reset - 1.0]
    assert all(r in sandbox.processed for r in sandbox.received)


async def test_max_wait_exceeded(sandbox, start_daemon, tmp_path, client) -> None:
    """A request that cannot be sent within its wait budget gets 429 with a Retry-After, at once."""
    d, key = await _start(sandbox, start_daemon, tmp_path, ["app"])
    sandbox.force_429(key, retry_after=5)
    hold = asyncio.create_task(client.get(f"{d.url}/aimychats/auth/test", headers=d.auth("app")))
    await asyncio.sleep(0.5)
    start = time.monotonic()
    async with client.get(
        f"{d.url}/aimychats/auth/test", headers={**d.auth("app"), "X-Credproxy-Max-Wait": "1"}
    ) as resp:
        assert resp.status == 429
        assert resp.headers["X-Credproxy-Error"] == "rate_limit_exceeded"
        assert 3 <= int(resp.headers["Retry-After"]) <= 6
        assert (await resp.json())["error"]["retry_after"] >= 3
    assert time.monotonic() - start < 0.5
    async with client.get(f"{d.admin_url}/status") as resp:
        status = await resp.json()
    assert status["upstreams"]["aimychats"]["hold_until"] is not None
    (await hold).release()


async def test_queue_bound(sandbox, start_daemon, tmp_path, client) -> None:
    """With the queue at max_size, the next request is 503 queue_full at once."""
    d, key = await _start(
        sandbox, start_daemon, tmp_path, ["app"], queue={"max_size": 3, "max_wait": "10s"}
    )
    sandbox.force_429(key, retry_after=2)

    def later() -> Any:
        return asyncio.create_task(
            client.get(f"{d.url}/aimychats/auth/test", headers=d.auth("app"))
        )

    waiting = [later()]  # gets the 429 and waits at the front of the queue
    await asyncio.sleep(0.3)
    waiting += [later(), later()]
    await asyncio.sleep(0.3)
    async with client.get(f"{d.url}/aimychats/auth/test", headers=d.auth("app")) as resp:
        assert resp.status == 503
        assert resp.headers["X-Credproxy-Error"] == "queue_full"
    for task in waiting:
        r = await task
        assert r.status == 200
        r.release()


async def test_disconnect_while_queued_sends_nothing(sandbox, start_daemon, tmp_path) -> None:
    """A client that disconnects while queued is removed; nothing is sent for it."""
    d, key = await _start(sandbox, start_daemon, tmp_path, ["app"])
    sandbox.force_429(key, retry_after=2)
    async with aiohttp.ClientSession() as s:
        first = asyncio.create_task(s.get(f"{d.url}/aimychats/auth/test", headers=d.auth("app")))
        await asyncio.sleep(0.3)
    async with aiohttp.ClientSession() as gone:
        task = asyncio.create_task(
            gone.post(
                f"{d.url}/aimychats/conversations", headers=d.auth("app"), json={"title": "ghost"}
            )
        )
        await asyncio.sleep(0.3)
        task.cancel()
    await asyncio.sleep(0.1)
    limiter = d.daemon.gates.limiter(
        "aimychats", "rw", d.daemon.snapshot.config.upstreams["aimychats"]
    )
    assert limiter.depth <= 1
    await asyncio.sleep(2.5)
    assert not [r for r in sandbox.received if r.method == "POST"]
    first.cancel()


async def test_pacing_keeps_a_burst_under_the_limit(
    sandbox, start_daemon, tmp_path, client
) -> None:
    """per_minute 10 against a free-plan key: 10 go back to back, the sandbox never says 429."""
    d, _key = await _start(
        sandbox, start_daemon, tmp_path, ["app"], plan="free", rate_limit={"per_minute": 10}
    )
    statuses = []
    for _ in range(10):
        async with client.get(f"{d.url}/aimychats/auth/test", headers=d.auth("app")) as resp:
            statuses.append(resp.status)
    assert statuses == [200] * 10
    async with client.get(
        f"{d.url}/aimychats/auth/test", headers={**d.auth("app"), "X-Credproxy-Max-Wait": "0"}
    ) as resp:
        assert resp.status == 429
        assert resp.headers["X-Credproxy-Error"] == "rate_limit_exceeded"
        assert 1 <= int(resp.headers["Retry-After"]) <= 7
    assert len(sandbox.processed) == len(sandbox.received) == 10


async def test_5xx_retried_for_idempotent_only(tls_upstream, start_daemon, ca_file, client) -> None:
    """A 503 is retried for GET (up to retries.max) but passed back at once for POST."""
    calls: dict[str, int] = {"GET": 0, "POST": 0}

    async def flaky(request: web.Request) -> web.Response:
        calls[request.method] += 1
        if calls[request.method] <= 2:
            return web.json_response({"error": {"code": "down"}}, status=503)
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_route("*", "/v1/flaky", flaky)
    upstream = await tls_upstream(app)
    d = await start_daemon(
        {
            "upstreams": {"api": upstream_doc(upstream.url, ca_file)},
            "apps": {"app": {"upstreams": {"api": {"scopes": ["read", "write"]}}}},
        },
        {"key-read": "sk_read_5xx_000000", "key-rw": "sk_rw_5xx_11111111"},
    )
    async with client.get(f"{d.url}/api/flaky", headers=d.auth("app")) as resp:
        assert resp.status == 200
    assert calls["GET"] == 3
    async with client.post(f"{d.url}/api/flaky", headers=d.auth("app")) as resp:
        assert resp.status == 503
    assert calls["POST"] == 1


async def test_connect_failure_retried_for_post(
    start_daemon, ca_file, client, tls_upstream
) -> None:
    """A POST whose connection was refused (it never reached the server) is tried again."""
    from proxy.server import free_port
    from tests.fakeapi import fake_api

    port = free_port()
    d = await start_daemon(
        {
            "upstreams": {
                "api": upstream_doc(
                    f"https://127.0.0.1:{port}", ca_file, retries={"max": 6, "on_5xx": "never"}
                )
            },
            "apps": {"app": {"upstreams": {"api": {"scopes": ["read", "write"]}}}},
        },
        {"key-read": "sk_read_conn_000000", "key-rw": "sk_rw_conn_11111111"},
    )

    async def bring_up() -> None:
        await asyncio.sleep(0.4)
        from tests.conftest import server_context

        runner = web.AppRunner(fake_api())
        await runner.setup()
        import trustme  # noqa: F401

        site = web.TCPSite(runner, "127.0.0.1", port, ssl_context=server_context(_CA[0]))
        await site.start()
        _RUNNERS.append(runner)

    task = asyncio.create_task(bring_up())
    async with client.post(f"{d.url}/api/echo", headers=d.auth("app"), data=b"payload") as resp:
        assert resp.status == 200
        assert (await resp.json())["body"] == "payload"
    await task
    for runner in _RUNNERS:
        await runner.cleanup()


_CA: list[Any] = []
_RUNNERS: list[web.AppRunner] = []


@pytest.fixture(autouse=True)
def _remember_ca(ca: Any) -> None:
    _CA[:] = [ca]
