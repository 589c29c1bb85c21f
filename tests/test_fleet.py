"""Fleet mode end to end: three `credproxy serve` processes, one real Redis, one sandbox.

They share the plan's budget (the sandbox never counts more in a window, never says 429),
a 429 seen by one holds all three, one refresh serves the fleet at token expiry, and Redis
killed and restarted mid-run loses no request and reuses no refresh token. The per-minute
window is shortened to 3 s in the sandbox and in the daemons (ratelimit.WINDOWS, set before
`serve` runs) so that several windows pass within a test.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from proxy.identify import new_app_token, token_hash
from proxy.masterkey import create_key_file, load_key_file
from proxy.sandbox import Sandbox
from proxy.secret import Secret
from proxy.server import free_port
from proxy.store import Store
from tests.test_fleet_support import (
    RedisServer,
    env_without_proxies,
    max_in_window,
    needs_redis,
    running_redis,
)

pytestmark = needs_redis


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    yield from running_redis(tmp_path)


WINDOW = 3.0  # the per-minute window, shortened in the sandbox and in the daemons
CLIENT = "credproxy-fleet"
CLIENT_SECRET = "sandbox-fleet-client-secret-0123456789"

# Run `credproxy serve` with the shortened window: the same code, a shorter minute.
_BOOT = (
    "import sys, proxy.ratelimit as r; "
    f"r.WINDOWS = (('per_minute', {WINDOW}), ('per_hour', 3600.0)); "
    "from proxy.cli import main; sys.exit(main(sys.argv[1:]))"
)


@dataclass
class FleetDaemon:
    """One `credproxy serve` process of the fleet."""

    name: str
    proc: subprocess.Popen[bytes]
    url: str
    admin_url: str
    log_path: Path
    store_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@dataclass
class Fleet:
    daemons: list[FleetDaemon]
    token: str
    key_file: Path

    def auth(self, tag: str = "") -> dict[str, str]:
        headers = {"Authorization": f"Bearer {self.token}"}
        if tag:
            headers["X-Fleet-Tag"] = tag
        return headers


@pytest.fixture
async def sandbox(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Sandbox]:
    monkeypatch.setattr("proxy.sandbox.app.MINUTE", WINDOW)
    async with Sandbox() as sb:
        yield sb


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(
        connector=connector, trust_env=False, timeout=aiohttp.ClientTimeout(total=60)
    ) as session:
        yield session


@pytest.fixture
async def start_fleet(
    tmp_path: Path, sandbox: Sandbox, client: aiohttp.ClientSession
) -> AsyncIterator[Callable[..., Any]]:
    """Factory: n daemons sharing one Redis, master key and app token, each with its store."""
    started: list[FleetDaemon] = []
    key_file = tmp_path / "shared" / "master.key"
    create_key_file(key_file)
    master = load_key_file(key_file)
    ca = sandbox.write_ca(tmp_path / "shared" / "sandbox-ca.pem")

    async def start(
        redis: RedisServer,
        upstream: dict[str, Any],
        secrets_: dict[str, tuple[str, str]],
        *,
        n: int = 3,
        state: dict[str, Any] | None = None,
    ) -> Fleet:
        token = new_app_token()
        for i in range(n):
            home = tmp_path / f"d{i}"
            data = home / "data"
            data.mkdir(parents=True, mode=0o700)
            store_path = data / "store.db"
            with Store.create(store_path, master) as store:
                for name, (kind, value) in secrets_.items():
                    store.put(name, kind, Secret(value))
            port, admin = free_port(), free_port()
            doc = {
                "listen": f"127.0.0.1:{port}",
                "admin_listen": f"127.0.0.1:{admin}",
                "store": str(store_path),
                "state": {
                    "backend": "redis",
                    "url": redis.url,
                    "key_prefix": "fleet-test:",
                    "instances": n,
                    **(state or {}),
                },
                "upstreams": {
                    "aimychats": {"base_url": sandbox.base_url, "ca_bundle": str(ca), **upstream}
                },
                "apps": {
                    "app": {
                        "token_sha256": [token_hash(token)],
                        "upstreams": {"aimychats": {"scopes": ["read", "write"]}},
                    }
                },
            }
            config = home / "config.yaml"
            config.write_text(yaml.safe_dump(doc, sort_keys=False))
            os.chmod(config, 0o600)
            env = env_without_proxies(
                {
                    "HOME": str(home),
                    "CREDPROXY_MASTER_KEY_FILE": str(key_file),
                    "PYTHONUNBUFFERED": "1",
                }
            )
            log_path = tmp_path / "logs" / f"d{i}.log"  # outside the watched config dir
            log_path.parent.mkdir(exist_ok=True)
            with open(log_path, "wb") as log_file:
                proc = subprocess.Popen(
                    [sys.executable, "-c", _BOOT, "serve", "--config", str(config)],
                    stdout=subprocess.DEVNULL,
                    stderr=log_file,
                    env=env,
                )
            started.append(
                FleetDaemon(
                    f"d{i}",
                    proc,
                    f"http://127.0.0.1:{port}",
                    f"http://127.0.0.1:{admin}",
                    log_path,
                    store_path,
                )
            )
        daemons = started[-n:]
        await asyncio.gather(*(_ready(client, d) for d in daemons))
        return Fleet(daemons, token, key_file)

    yield start
    for daemon in started:
        daemon.stop()


async def _ready(client: aiohttp.ClientSession, daemon: FleetDaemon, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if daemon.proc.poll() is not None:
            raise AssertionError(f"{daemon.name} exited: {daemon.log()}")
        try:
            async with client.get(f"{daemon.admin_url}/status") as resp:
                if resp.status == 200 and (await resp.json())["state"]["state"] == "connected":
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.05)
    raise AssertionError(f"{daemon.name} not ready: {daemon.log()}")


async def _status(client: aiohttp.ClientSession, daemon: FleetDaemon) -> dict[str, Any]:
    async with client.get(f"{daemon.admin_url}/status") as resp:
        doc: dict[str, Any] = await resp.json()
        return doc


def _tag(request: Any) -> str:
    return next((v for k, v in request.headers if k.lower() == "x-fleet-tag"), "")


async def test_fleet_shares_the_plan_budget(
    sandbox: Sandbox, redis_server: RedisServer, start_fleet: Any, client: aiohttp.ClientSession
) -> None:
    """Three instances under several times the plan rate: the sandbox never counts more than
    the plan in a window and never answers 429; every instance gets its turn."""
    key = sandbox.new_key(["read", "write", "delete"], plan="starter")  # 50 per window
    fleet = await start_fleet(
        redis_server,
        {
            "credentials": [{"name": "rw", "scopes": ["read", "write", "delete"]}],
            "rate_limit": {"plan": "starter"},
            "queue": {"max_size": 1000, "max_wait": "10s"},
        },
        {"rw": ("api_key", key)},
    )
    statuses: dict[str, list[int]] = {d.name: [] for d in fleet.daemons}
    stop = time.monotonic() + 3 * WINDOW
    started = time.time()

    async def hammer(daemon: FleetDaemon) -> None:
        headers = {**fleet.auth(daemon.name), "X-Credproxy-Max-Wait": "1"}
        while time.monotonic() < stop:
            async with client.get(f"{daemon.url}/aimychats/auth/test", headers=headers) as resp:
                statuses[daemon.name].append(resp.status)
                if resp.status == 429:
                    assert resp.headers["X-Credproxy-Error"] == "rate_limit_exceeded"
                    await asyncio.sleep(0.05)

    # 12 clients per instance, each sending back to back: far above 50 per 3 s.
    await asyncio.gather(*(hammer(d) for d in fleet.daemons for _ in range(12)))
    received = [r for r in sandbox.received if r.key == key]
    assert received, "nothing reached the sandbox"
    assert len(sandbox.processed) == len(sandbox.received), "the sandbox answered 429"
    times = [r.at for r in received]
    assert max_in_window(times, WINDOW) <= 50
    ok = {name: s.count(200) for name, s in statuses.items()}
    assert sum(ok.values()) == len(received)
    assert all(count >= 5 for count in ok.values()), ok
    # The plan was used, not starved: a full window at the start, then more as it slides.
    elapsed = time.time() - started
    assert len(received) >= 50 * int(elapsed // (WINDOW * 1.01 + 0.25)), (len(received), elapsed)
    offered = sum(len(s) for s in statuses.values())
    assert offered >= 3 * len(received), "the load was not several times the plan"


async def test_a_429_on_one_instance_holds_all(
    sandbox: Sandbox, redis_server: RedisServer, start_fleet: Any, client: aiohttp.ClientSession
) -> None:
    """A forced 429 (Retry-After 2) at one instance: none sends before it ends, all resume
    within the jitter, and every request is answered once."""
    key = sandbox.new_key(["read", "write", "delete"], plan="pro")
    fleet = await start_fleet(
        redis_server,
        {"credentials": [{"name": "rw", "scopes": ["read", "write", "delete"]}]},
        {"rw": ("api_key", key)},
    )
    a, b, c = fleet.daemons
    for daemon in fleet.daemons:
        async with client.get(f"{daemon.url}/aimychats/auth/test", headers=fleet.auth()) as resp:
            assert resp.status == 200
    sandbox.received.clear()
    sandbox.processed.clear()
    sandbox.force_429(key, retry_after=2)

    async def one(daemon: FleetDaemon, tag: str) -> int:
        url = f"{daemon.url}/aimychats/auth/test"
        async with client.get(url, headers=fleet.auth(tag)) as resp:
            return resp.status

    first = asyncio.create_task(one(a, "first"))
    while not sandbox.received:
        await asyncio.sleep(0.005)
    t429 = sandbox.received[0].at
    await asyncio.sleep(0.3)
    status = await _status(client, b)
    assert status["upstreams"]["aimychats"]["hold_until"] is not None, "b did not hear the hold"
    others = [one(d, f"{d.name}-{i}") for d in (b, c) for i in range(10)]
    results = await asyncio.gather(first, *others)
    assert results == [200] * 21
    assert len(sandbox.received) == 22 and len(sandbox.processed) == 21  # one 429, no copies
    later = sandbox.received[1:]
    assert sorted(_tag(r) for r in later) == sorted(
        ["first"] + [f"{d.name}-{i}" for d in (b, c) for i in range(10)]
    )
    starts = [r.at - t429 for r in later]
    assert min(starts) >= 2.0 - 0.05, starts  # nobody sent during the hold
    assert max(starts) <= 2.0 + 0.2 + 1.0, starts  # released within the jitter (plus a margin)


def _pkce() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    digest = hashlib.sha256(verifier.encode()).digest()
    return verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


async def _login(sandbox: Sandbox) -> dict[str, Any]:
    """The authorization-code flow against the sandbox, as `credproxy login` does it."""
    verifier, challenge = _pkce()
    redirect = "http://127.0.0.1:9/callback"
    ctx = sandbox.client_ssl_context()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as browser:
        params = {
            "response_type": "code",
            "client_id": CLIENT,
            "redirect_uri": redirect,
            "scope": "read write",
            "state": "s",
            "code_challenge": challenge,
            "code_challenge_method": "S256",
        }
        async with browser.get(
            f"{sandbox.url}/oauth/authorize", params=params, allow_redirects=False
        ) as resp:
            location = resp.headers["Location"]
        code = dict(kv.split("=", 1) for kv in location.split("?", 1)[1].split("&") if "=" in kv)[
            "code"
        ]
        form = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": redirect,
            "code_verifier": verifier,
            "client_id": CLIENT,
            "client_secret": CLIENT_SECRET,
        }
        async with browser.post(f"{sandbox.url}/oauth/token", data=form) as resp:
            assert resp.status == 200, await resp.text()
            tokens: dict[str, Any] = await resp.json()
    tokens["received_at"] = time.time()
    return tokens


def _store_login(fleet: Fleet, daemon: FleetDaemon, tokens: dict[str, Any]) -> None:
    """What `credproxy login` writes, into one instance's store while it runs."""
    master = load_key_file(fleet.key_file)
    record = {
        "access_token": tokens["access_token"],
        "expires_at": tokens["received_at"] + tokens["expires_in"],
        "scope": tokens["scope"],
        "issued_at": tokens["received_at"],
    }
    with Store.open(daemon.store_path, master) as store:
        store.put("aimychats.oauth-refresh", "oauth_refresh_token", Secret(tokens["refresh_token"]))
        store.put("aimychats.oauth-access", "oauth_access_token", Secret(json.dumps(record)))


def _oauth_upstream(sandbox: Sandbox, **extra: Any) -> dict[str, Any]:
    return {
        "oauth": {
            "grant": "authorization_code",
            "authorize_url": f"{sandbox.url}/oauth/authorize",
            "token_url": f"{sandbox.url}/oauth/token",
            "client_id": CLIENT,
            "client_secret": "oauth-client",
            "scopes": ["read", "write"],
            "redirect_port": free_port(),
        },
        **extra,
    }


async def _oauth_state(client: aiohttp.ClientSession, daemon: FleetDaemon) -> dict[str, Any]:
    status = await _status(client, daemon)
    state: dict[str, Any] = status["upstreams"]["aimychats"]["credentials"]["oauth"]
    return state


async def _all_have_tokens(client: aiohttp.ClientSession, fleet: Fleet, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = [await _oauth_state(client, d) for d in fleet.daemons]
        if all(s["state"] == "ok" and s["expires_at"] for s in states):
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"not every instance got the fleet's tokens: {states}")


async def test_one_refresh_serves_the_fleet(
    sandbox: Sandbox, redis_server: RedisServer, start_fleet: Any, client: aiohttp.ClientSession
) -> None:
    """A login on one instance reaches all three; 100 concurrent requests across them at token
    expiry, during a slow refresh, give exactly one call to the token endpoint."""
    sandbox.oauth.register_client(
        CLIENT, CLIENT_SECRET, ["http://127.0.0.1/callback"], ["read", "write", "delete"]
    )
    fleet = await start_fleet(
        redis_server,
        _oauth_upstream(sandbox),
        {"oauth-client": ("client_secret", CLIENT_SECRET)},
    )
    sandbox.oauth.access_token_lifetime = 8.0  # refreshed 6 s after issue, unusable after 7.2 s
    tokens = await _login(sandbox)
    issued = tokens["received_at"]
    _store_login(fleet, fleet.daemons[0], tokens)
    await _all_have_tokens(client, fleet, timeout=5.5)
    sandbox.oauth.token_delay = 2.0  # the refresh at 6 s lands at about 8 s
    before = sandbox.oauth.token_calls["refresh_token"]
    await asyncio.sleep(max(0.0, issued + 7.4 - time.time()))

    async def one(daemon: FleetDaemon, i: int) -> int:
        url = f"{daemon.url}/aimychats/auth/test"
        async with client.get(url, headers=fleet.auth(f"{daemon.name}-{i}")) as resp:
            return resp.status

    results = await asyncio.gather(*(one(fleet.daemons[i % 3], i) for i in range(100)))
    assert results == [200] * 100
    assert sandbox.oauth.token_calls["refresh_token"] == before + 1
    assert sandbox.oauth.refresh_token_of(CLIENT) is not None, "the grant was revoked"
    states = [await _oauth_state(client, d) for d in fleet.daemons]
    assert len({s["expires_at"] for s in states}) == 1, states  # one token for the fleet
    for daemon in fleet.daemons:
        log = daemon.log()
        for value in sandbox.oauth.issued_tokens():
            assert value not in log


async def test_redis_killed_and_restarted(
    sandbox: Sandbox, redis_server: RedisServer, start_fleet: Any, client: aiohttp.ClientSession
) -> None:
    """Redis dies under load and comes back empty: every request is answered 200, /readyz and
    /status say so, the fleet re-joins without a burst, and the refresh after it is done once,
    with the current refresh token."""
    sandbox.oauth.register_client(
        CLIENT,
        CLIENT_SECRET,
        ["http://127.0.0.1/callback"],
        ["read", "write", "delete"],
        plan="starter",
    )
    fleet = await start_fleet(
        redis_server,
        _oauth_upstream(
            sandbox,
            rate_limit={"plan": "starter"},
            queue={"max_size": 1000, "max_wait": "20s"},
        ),
        {"oauth-client": ("client_secret", CLIENT_SECRET)},
    )
    sandbox.oauth.access_token_lifetime = 10.0  # refresh due 7.5 s after issue
    tokens = await _login(sandbox)
    issued = tokens["received_at"]
    _store_login(fleet, fleet.daemons[0], tokens)
    await _all_have_tokens(client, fleet, timeout=5.5)
    before = sandbox.oauth.token_calls["refresh_token"]
    statuses: list[int] = []
    stop = issued + 13.0

    async def steady(daemon: FleetDaemon, i: int) -> None:
        n = 0
        while time.time() < stop:
            n += 1
            url = f"{daemon.url}/aimychats/auth/test"
            async with client.get(url, headers=fleet.auth(f"{daemon.name}-{i}-{n}")) as resp:
                statuses.append(resp.status)
                assert resp.status == 200, await resp.text()
            await asyncio.sleep(0.5)

    async def chaos() -> None:
        await asyncio.sleep(max(0.0, issued + 4.5 - time.time()))
        redis_server.kill()
        d = fleet.daemons[1]
        deadline = time.monotonic() + 3
        while (await _status(client, d))["state"]["state"] != "degraded":
            assert time.monotonic() < deadline, "the fleet did not notice"
            await asyncio.sleep(0.05)
        async with client.get(f"{d.admin_url}/readyz") as resp:
            ready = await resp.json()
        assert resp.status == 200 and "unreachable" in ready["degraded"][0], ready
        status = await _status(client, d)
        assert status["upstreams"]["aimychats"]["credentials"]["oauth"]["fleet"]["mode"] == "local"
        await asyncio.sleep(max(0.0, issued + 6.5 - time.time()))
        redis_server.start()
        for daemon in fleet.daemons:
            await _ready(client, daemon, timeout=10)

    await asyncio.gather(chaos(), *(steady(d, i) for d in fleet.daemons for i in range(2)))
    assert statuses and set(statuses) == {200}
    assert len(sandbox.processed) == len(sandbox.received), "the sandbox answered 429"
    assert sandbox.oauth.token_calls["refresh_token"] == before + 1
    assert sandbox.oauth.refresh_token_of(CLIENT) is not None, "a refresh token was reused"
    by_key: dict[str | None, list[float]] = {}
    for r in sandbox.received:
        by_key.setdefault(r.key, []).append(r.at)
    for times in by_key.values():
        assert max_in_window(times, WINDOW) <= 50
    for daemon in fleet.daemons:
        log = daemon.log()
        lines = "\n".join(ln for ln in log.splitlines() if "credproxy.access" not in ln)
        assert log.count("credproxy.fleet: fleet: Redis at") == 2, lines  # lost, then back
        assert log.count("is unreachable") - log.count("shared state is unreachable") == 1, lines
        assert "reachable again" in log, lines
        assert "Traceback" not in log, lines
