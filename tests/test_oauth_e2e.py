"""OAuth through the daemon and the CLI: login, 401 -> refresh + replay, needs_login, client credentials."""

from __future__ import annotations

import asyncio
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from proxy.sandbox import Sandbox
from proxy.server import free_port
from tests.conftest import cli_env, run_cli, write_config

CLIENT = "credproxy-e2e"
CLIENT_SECRET = "sandbox-e2e-client-secret-0123456789"


@pytest.fixture
async def sandbox() -> AsyncIterator[Sandbox]:
    async with Sandbox() as sb:
        sb.oauth.register_client(
            CLIENT, CLIENT_SECRET, ["http://127.0.0.1/callback"], ["read", "write", "delete"]
        )
        yield sb


def _oauth_doc(
    sandbox: Sandbox, ca: Path, grant: str = "authorization_code", port: int | None = None
) -> dict[str, Any]:
    oauth: dict[str, Any] = {
        "grant": grant,
        "token_url": f"{sandbox.url}/oauth/token",
        "client_id": CLIENT,
        "client_secret": "oauth-client",
        "scopes": ["read", "write"],
    }
    if grant == "authorization_code":
        oauth["authorize_url"] = f"{sandbox.url}/oauth/authorize"
        oauth["redirect_port"] = port or free_port()
    return {
        "upstreams": {
            "aimychats": {"base_url": sandbox.base_url, "ca_bundle": str(ca), "oauth": oauth}
        },
        "apps": {"app": {"upstreams": {"aimychats": {"scopes": ["read", "write"]}}}},
    }


async def _login_in_process(sandbox: Sandbox, d: Any) -> None:
    import io

    from proxy.oauth import login

    out = io.StringIO()
    upstream = d.daemon.snapshot.config.upstreams["aimychats"]
    task = asyncio.create_task(login("aimychats", upstream, d.store, open_browser=False, out=out))
    url = ""
    while not url:
        await asyncio.sleep(0.01)
        url = next((ln for ln in out.getvalue().splitlines() if ln.startswith("https://")), "")
    ctx = ssl.create_default_context(cadata=sandbox.ca_pem.decode())
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as browser:
        async with browser.get(url, allow_redirects=False) as resp:
            location = resp.headers["Location"]
        async with browser.get(location) as resp:
            assert resp.status == 200
    await task


async def test_daemon_uses_oauth_and_replays_after_401(
    sandbox, start_daemon, tmp_path, client
) -> None:
    """After login the daemon injects the access token; an upstream 401 gives one refresh and one replay, body intact."""
    ca = sandbox.write_ca(tmp_path / "ca.pem")
    d = await start_daemon(_oauth_doc(sandbox, ca), {"oauth-client": CLIENT_SECRET})
    async with client.get(f"{d.url}/aimychats/auth/test", headers=d.auth("app")) as resp:
        assert resp.status == 503
        doc = await resp.json()
    assert "credproxy login aimychats" in doc["error"]["message"]
    await _login_in_process(sandbox, d)

    async def ok() -> bool:
        async with client.get(f"{d.url}/aimychats/auth/test", headers=d.auth("app")) as resp:
            return resp.status == 200

    deadline = time.monotonic() + 3
    while not await ok():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)
    issued = sandbox.oauth.issued_tokens()
    seen = sandbox.received[-1].key
    assert seen in issued
    # the upstream forgets the access token: 401 -> one refresh -> replay
    sandbox.state.remove_key(seen)
    refreshes = sandbox.oauth.token_calls["refresh_token"]
    sandbox.received.clear()
    async with client.post(
        f"{d.url}/aimychats/conversations", headers=d.auth("app"), json={"title": "replayed"}
    ) as resp:
        assert resp.status == 201, await resp.text()
        assert (await resp.json())["title"] == "replayed"
    assert sandbox.oauth.token_calls["refresh_token"] == refreshes + 1
    posts = [r for r in sandbox.received if r.path == "/v1/conversations"]
    assert len(posts) == 2 and posts[0].body_size == posts[1].body_size > 0
    async with client.get(f"{d.admin_url}/status") as resp:
        status = await resp.json()
    assert status["upstreams"]["aimychats"]["credentials"]["oauth"]["state"] == "ok"


async def test_revoked_grant_needs_login(sandbox, start_daemon, tmp_path, client) -> None:
    """A revoked grant puts the credential in needs_login: 503 naming `credproxy login`, shown in /status."""
    ca = sandbox.write_ca(tmp_path / "ca.pem")
    d = await start_daemon(_oauth_doc(sandbox, ca), {"oauth-client": CLIENT_SECRET})
    await _login_in_process(sandbox, d)
    await asyncio.sleep(1.2)  # the daemon sees the store change
    sandbox.oauth.revoke_grants(CLIENT)
    async with client.get(f"{d.url}/aimychats/auth/test", headers=d.auth("app")) as resp:
        assert resp.status == 503
        assert resp.headers["X-Credproxy-Error"] == "credential_unavailable"
        assert "credproxy login aimychats" in (await resp.json())["error"]["message"]
    async with client.get(f"{d.admin_url}/status") as resp:
        status = await resp.json()
    assert status["upstreams"]["aimychats"]["credentials"]["oauth"]["state"] == "needs_login"


async def test_client_credentials_need_no_login(sandbox, start_daemon, tmp_path, client) -> None:
    """With grant client_credentials the daemon fetches its own token; no login step."""
    ca = sandbox.write_ca(tmp_path / "ca.pem")
    d = await start_daemon(
        _oauth_doc(sandbox, ca, grant="client_credentials"), {"oauth-client": CLIENT_SECRET}
    )
    async with client.get(f"{d.url}/aimychats/auth/test", headers=d.auth("app")) as resp:
        assert resp.status == 200, await resp.text()
    assert sandbox.oauth.token_calls["client_credentials"] == 1


async def test_cli_login_no_browser(sandbox, tmp_path) -> None:
    """`credproxy login --no-browser` prints the URL alone on a line, and the redirect completes it."""
    home = tmp_path / "home"
    home.mkdir()
    env = cli_env(home)
    assert run_cli("init", env=env).returncode == 0
    ca = sandbox.write_ca(tmp_path / "ca.pem")
    cfg = home / ".config" / "credproxy" / "config.yaml"
    doc = yaml.safe_load(cfg.read_text())
    port = free_port()
    doc.update(_oauth_doc(sandbox, ca, port=port))
    doc["listen"], doc["admin_listen"] = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    write_config(cfg, doc)
    assert (
        run_cli(
            "keys",
            "add",
            "oauth-client",
            "--kind",
            "client_secret",
            "--stdin",
            env=env,
            stdin=CLIENT_SECRET,
        ).returncode
        == 0
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy", "login", "aimychats", "--no-browser"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
    )
    try:
        assert proc.stdout is not None
        url = (await asyncio.to_thread(proc.stdout.readline)).strip()
        assert url.startswith(f"{sandbox.url}/oauth/authorize?")
        assert f"redirect_uri=http%3A%2F%2F127.0.0.1%3A{port}%2Fcallback" in url
        assert "code_challenge_method=S256" in url and "scope=read+write" in url
        ctx = ssl.create_default_context(cadata=sandbox.ca_pem.decode())
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as browser:
            async with browser.get(url, allow_redirects=False) as resp:
                location = resp.headers["Location"]
            for _ in range(50):
                try:
                    async with browser.get(location) as resp:
                        assert resp.status == 200
                        break
                except aiohttp.ClientConnectorError:
                    await asyncio.sleep(0.1)
        code = await asyncio.to_thread(proc.wait, 20)
        err = proc.stderr.read() if proc.stderr else ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
    assert code == 0, err
    listed = run_cli("keys", "list", env=env).stdout
    assert "aimychats.oauth-refresh" in listed and "oauth_refresh_token" in listed
    for token in sandbox.oauth.issued_tokens():
        assert token not in listed + err


async def test_hundred_requests_at_expiry_one_refresh(
    sandbox, start_daemon, tmp_path, client
) -> None:
    """100 concurrent requests arriving as the token expires all succeed on one refresh call."""
    ca = sandbox.write_ca(tmp_path / "ca.pem")
    sandbox.oauth.access_token_lifetime = 2.0
    d = await start_daemon(_oauth_doc(sandbox, ca), {"oauth-client": CLIENT_SECRET})
    await _login_in_process(sandbox, d)
    logged_in = time.monotonic()
    await asyncio.sleep(1.2)  # the daemon picks the login up from the store
    sandbox.oauth.token_delay = 1.5  # the refresh is still in flight when requests arrive
    before = sandbox.oauth.token_calls["refresh_token"]
    await asyncio.sleep(max(0.0, 2.05 - (time.monotonic() - logged_in)))

    async def one() -> int:
        async with client.get(f"{d.url}/aimychats/auth/test", headers=d.auth("app")) as resp:
            return resp.status

    statuses = await asyncio.gather(*(one() for _ in range(100)))
    assert statuses == [200] * 100
    assert sandbox.oauth.token_calls["refresh_token"] == before + 1
