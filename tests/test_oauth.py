"""OAuth in credproxy: `credproxy login` and the daemon's TokenManager against the sandbox over TLS.

Every test runs with logs captured at DEBUG; on teardown no token or secret the sandbox ever
issued may appear in them.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import json
import logging
import socket
import ssl
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

import aiohttp
import pytest
import yaml

from proxy.config import UpstreamConfig, parse_config
from proxy.errors import CredentialUnavailable
from proxy.logs import MASK, redactor
from proxy.masterkey import create_key_file, load_key_file
from proxy.metrics import Metrics
from proxy.oauth import (
    OAUTH_CREDENTIAL,
    OAuthError,
    TokenManager,
    access_name,
    login,
    refresh_name,
)
from proxy.sandbox import Sandbox
from proxy.secret import Secret
from proxy.store import Store, StoreError

UPSTREAM = "aimychats"
CLIENT = "credproxy-test"
CLIENT_SECRET = "sandbox-oauth-client-secret-0123456789"
SECRET_NAME = "aimychats-oauth-client"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Clock:
    """Wall time plus an offset the test moves, to reach expiry without sleeping."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


@dataclass
class Env:
    sandbox: Sandbox
    store: Store
    store_path: Path
    ca_path: Path
    http: aiohttp.ClientSession  # trusts the sandbox CA; for following redirects
    port: int = field(default_factory=free_port)
    managers: list[TokenManager] = field(default_factory=list)

    def upstream(self, **oauth: Any) -> UpstreamConfig:
        block: dict[str, Any] = {
            "grant": "authorization_code",
            "authorize_url": f"{self.sandbox.url}/oauth/authorize",
            "token_url": f"{self.sandbox.url}/oauth/token",
            "client_id": CLIENT,
            "client_secret": SECRET_NAME,
            "scopes": ["read", "write"],
            "redirect_port": self.port,
        }
        block.update(oauth)
        block = {k: v for k, v in block.items() if v is not None}
        doc = {
            "upstreams": {
                UPSTREAM: {
                    "base_url": self.sandbox.base_url,
                    "ca_bundle": str(self.ca_path),
                    "oauth": block,
                }
            },
            "apps": {"app": {"upstreams": {UPSTREAM: {"scopes": ["read"]}}}},
        }
        config = parse_config(yaml.safe_dump(doc), base_dir=self.ca_path.parent)
        return config.upstreams[UPSTREAM]

    def manager(
        self, upstream: UpstreamConfig | None = None, store: Store | None = None, **kw: Any
    ) -> TokenManager:
        manager = TokenManager(UPSTREAM, upstream or self.upstream(), store or self.store, **kw)
        self.managers.append(manager)
        return manager

    async def follow(
        self, out: io.StringIO, rewrite: Callable[[str], str] | None = None
    ) -> tuple[int, str]:
        """Play the browser: open the printed URL, then the loopback Location it redirects to."""
        url = await printed_url(out)
        async with self.http.get(url, allow_redirects=False) as resp:
            assert resp.status == 302, await resp.text()
            location = resp.headers["Location"]
        if rewrite is not None:
            location = rewrite(location)
        async with (
            aiohttp.ClientSession(trust_env=False) as plain,
            plain.get(location, allow_redirects=False) as resp,
        ):
            return resp.status, await resp.text()

    async def login(self, upstream: UpstreamConfig | None = None) -> str:
        """A complete `credproxy login --no-browser`; returns what it printed."""
        out = io.StringIO()
        task = asyncio.create_task(
            login(UPSTREAM, upstream or self.upstream(), self.store, open_browser=False, out=out)
        )
        status, _ = await self.follow(out)
        await task
        assert status == 200
        return out.getvalue()

    def stored(self) -> dict[str, str]:
        """name -> kind of every secret in the store."""
        return {info.name: info.kind for info in self.store.info()}

    def stored_access(self) -> dict[str, Any]:
        value = self.store.get(access_name(UPSTREAM))
        assert value is not None
        data: dict[str, Any] = json.loads(value.reveal())
        return data

    async def api_status(self, token: Secret | str) -> int:
        value = token.reveal() if isinstance(token, Secret) else token
        headers = {"Authorization": f"Bearer {value}"}
        async with self.http.get(f"{self.sandbox.base_url}/auth/test", headers=headers) as resp:
            await resp.read()
            return resp.status


async def printed_url(out: io.StringIO, timeout: float = 5) -> str:
    deadline = time.monotonic() + timeout
    while True:
        for line in out.getvalue().splitlines():
            if line.startswith("https://"):
                return line
        assert time.monotonic() < deadline, f"no URL printed: {out.getvalue()!r}"
        await asyncio.sleep(0.01)


async def wait_until(condition: Callable[[], bool], timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


@pytest.fixture
async def env(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> AsyncIterator[Env]:
    caplog.set_level(logging.DEBUG)
    key = tmp_path / "keys" / "master.key"
    create_key_file(key)
    store_path = tmp_path / "data" / "store.db"
    store = Store.create(store_path, load_key_file(key))
    store.put(SECRET_NAME, "client_secret", Secret(CLIENT_SECRET))
    async with Sandbox() as sandbox:
        sandbox.oauth.register_client(
            CLIENT, CLIENT_SECRET, ["http://127.0.0.1/callback"], ["read", "write", "delete"]
        )
        ca_path = sandbox.write_ca(tmp_path / "ca.pem")
        ctx = ssl.create_default_context(cadata=sandbox.ca_pem.decode())
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=ctx), trust_env=False
        ) as http:
            environment = Env(sandbox, store, store_path, ca_path, http)
            try:
                yield environment
            finally:
                for manager in environment.managers:
                    await manager.close()
        secrets = [*sandbox.oauth.issued_tokens(), CLIENT_SECRET]
    store.close()
    logged = caplog.text
    for value in secrets:
        assert value not in logged, "a token or secret reached the logs"


def reopen(env: Env) -> Store:
    """A second connection to the same store file, as a restarted daemon would open it."""
    return Store.open(env.store_path, env.store.master)


# --- login ------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["client_secret_post", "client_secret_basic"])
async def test_login_follows_printed_url_and_stores_tokens(env: Env, method: str) -> None:
    """--no-browser prints the authorize URL alone on a line; following it stores both tokens."""
    env.sandbox.oauth.register_client(
        CLIENT,
        CLIENT_SECRET,
        ["http://127.0.0.1/callback"],
        ["read", "write", "delete"],
        auth_method=method,  # type: ignore[arg-type]
    )
    upstream = env.upstream(token_auth_method=method)
    out = io.StringIO()
    task = asyncio.create_task(login(UPSTREAM, upstream, env.store, open_browser=False, out=out))
    url = await printed_url(out)
    assert url in out.getvalue().splitlines()  # alone on its line
    params = {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}
    assert url.startswith(f"{env.sandbox.url}/oauth/authorize?")
    assert params["response_type"] == "code"
    assert params["client_id"] == CLIENT
    assert params["redirect_uri"] == f"http://127.0.0.1:{env.port}/callback"
    assert params["scope"] == "read write"
    assert params["code_challenge_method"] == "S256"
    assert len(params["code_challenge"]) == 43
    assert len(params["state"]) >= 32
    assert env.stored() == {SECRET_NAME: "client_secret"}  # nothing before the redirect

    status, page = await env.follow(out)
    await task
    assert status == 200 and "logged in" in page
    assert env.stored() == {
        SECRET_NAME: "client_secret",
        refresh_name(UPSTREAM): "oauth_refresh_token",
        access_name(UPSTREAM): "oauth_access_token",
    }
    record = env.stored_access()
    assert set(record) >= {"access_token", "expires_at", "scope"}
    assert record["scope"] == "read write"
    assert record["expires_at"] == pytest.approx(time.time() + 3600, abs=10)
    stored_refresh = env.store.get(refresh_name(UPSTREAM))
    assert stored_refresh is not None
    assert stored_refresh.reveal() == env.sandbox.oauth.refresh_token_of(CLIENT)
    assert await env.api_status(record["access_token"]) == 200
    assert env.sandbox.oauth.token_calls["authorization_code"] == 1
    assert "Logged in" in out.getvalue()


async def test_login_with_wrong_state_stores_nothing(env: Env) -> None:
    """A redirect whose state differs ends the login with a clear message and stores nothing."""

    def forge(location: str) -> str:
        parts = urlsplit(location)
        params = {k: v[0] for k, v in parse_qs(parts.query).items()}
        params["state"] = "forged-state"
        return urlunsplit(parts._replace(query=urlencode(params)))

    out = io.StringIO()
    task = asyncio.create_task(
        login(UPSTREAM, env.upstream(), env.store, open_browser=False, out=out)
    )
    status, _ = await env.follow(out, forge)
    with pytest.raises(OAuthError, match="state") as caught:
        await task
    assert status == 400
    assert "nothing was stored" in str(caught.value)
    assert env.stored() == {SECRET_NAME: "client_secret"}
    assert env.sandbox.oauth.token_calls["authorization_code"] == 0


async def test_login_with_missing_state_stores_nothing(env: Env) -> None:
    """A redirect without a state is refused like a wrong one."""

    def drop_state(location: str) -> str:
        parts = urlsplit(location)
        params = {k: v[0] for k, v in parse_qs(parts.query).items() if k != "state"}
        return urlunsplit(parts._replace(query=urlencode(params)))

    out = io.StringIO()
    task = asyncio.create_task(
        login(UPSTREAM, env.upstream(), env.store, open_browser=False, out=out)
    )
    await env.follow(out, drop_state)
    with pytest.raises(OAuthError, match="state"):
        await task
    assert env.stored() == {SECRET_NAME: "client_secret"}


async def test_login_error_redirect_stores_nothing(env: Env) -> None:
    """An error= redirect (the user said no) ends the login naming the error; nothing is stored."""
    env.sandbox.oauth.deny_next_authorization()
    out = io.StringIO()
    task = asyncio.create_task(
        login(UPSTREAM, env.upstream(), env.store, open_browser=False, out=out)
    )
    status, page = await env.follow(out)
    with pytest.raises(OAuthError, match="access_denied"):
        await task
    assert status == 400 and "access_denied" in page
    assert env.stored() == {SECRET_NAME: "client_secret"}


async def test_login_times_out_and_frees_the_port(env: Env) -> None:
    """With no redirect in time the login fails saying so, stores nothing and frees its port."""
    started = time.monotonic()
    with pytest.raises(OAuthError, match="timed out"):
        await login(
            UPSTREAM, env.upstream(), env.store, open_browser=False, out=io.StringIO(), timeout=0.3
        )
    assert time.monotonic() - started < 3
    assert env.stored() == {SECRET_NAME: "client_secret"}
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", env.port))


async def test_login_refuses_early_without_client_secret_or_port(env: Env) -> None:
    """A missing client secret or a busy redirect port is reported before any URL is printed."""
    out = io.StringIO()
    upstream = env.upstream(client_secret="not-stored")
    with pytest.raises(OAuthError, match="credproxy keys add not-stored"):
        await login(UPSTREAM, upstream, env.store, open_browser=False, out=out)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", env.port))
        busy.listen()
        with pytest.raises(OAuthError, match="redirect_port"):
            await login(UPSTREAM, env.upstream(), env.store, open_browser=False, out=out)
    cc = env.upstream(grant="client_credentials", authorize_url=None)
    with pytest.raises(OAuthError, match="client_credentials"):
        await login(UPSTREAM, cc, env.store, open_browser=False, out=out)
    assert "https://" not in out.getvalue()


async def test_login_opens_a_browser_only_when_asked(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without --no-browser the URL goes to the webbrowser module (and is printed as well)."""
    opened: list[str] = []

    class FakeBrowser:
        def open(self, url: str) -> bool:
            opened.append(url)
            return True

    monkeypatch.setattr("webbrowser.get", lambda: FakeBrowser())
    out = io.StringIO()
    task = asyncio.create_task(
        login(UPSTREAM, env.upstream(), env.store, open_browser=True, out=out)
    )
    await env.follow(out)
    await task
    await wait_until(lambda: bool(opened))
    assert opened == [await printed_url(out)]
    opened.clear()
    await env.login()
    assert opened == []


# --- TokenManager -------------------------------------------------------------------------------


async def test_restart_reuses_the_stored_access_token(env: Env) -> None:
    """A manager started after a login uses the stored access token without calling the endpoint."""
    await env.login()
    manager = env.manager()
    assert manager.state == "ok"
    token = await manager.access_token()
    assert token.reveal() == env.stored_access()["access_token"]
    assert manager.expires_at == env.stored_access()["expires_at"]
    assert sum(env.sandbox.oauth.token_calls.values()) == 1  # the login's exchange only


async def test_concurrent_callers_at_expiry_share_one_refresh(env: Env) -> None:
    """100 requests needing a token at expiry cause exactly one token-endpoint call."""
    await env.login()
    clock = Clock()
    manager = env.manager(clock=clock)
    old = await manager.access_token()
    clock.offset = 3600  # the stored token has expired
    tokens = await asyncio.gather(*(manager.access_token() for _ in range(100)))
    assert env.sandbox.oauth.token_calls["refresh_token"] == 1
    assert len({t.reveal() for t in tokens}) == 1
    assert tokens[0] != old
    assert await env.api_status(tokens[0]) == 200
    assert manager.state == "ok"


async def test_rotated_refresh_token_is_committed_before_use_and_survives_restart(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The new refresh token is durable before the new access token is handed out; a restart uses it."""
    await env.login()
    first_refresh = env.store.get(refresh_name(UPSTREAM))
    clock = Clock()
    manager = env.manager(clock=clock)
    clock.offset = 3600

    entered, release = threading.Event(), threading.Event()
    real_put = env.store.put

    def gated_put(name: str, kind: str, value: Secret) -> None:
        if kind == "oauth_refresh_token":
            entered.set()
            release.wait(5)
        real_put(name, kind, value)

    monkeypatch.setattr(env.store, "put", gated_put)
    task = asyncio.create_task(manager.access_token())
    assert await asyncio.to_thread(entered.wait, 5)
    await asyncio.sleep(0.2)
    new_access = [t for t in env.sandbox.oauth.issued_tokens() if t.startswith("aimy_at_")][-1]
    assert not task.done()  # the refresh token is not committed yet: nobody gets the new token
    assert all(r.key != new_access for r in env.sandbox.received)
    release.set()
    token = await task
    assert token.reveal() == new_access

    second = reopen(env)  # another connection sees the committed rotation
    try:
        rotated = second.get(refresh_name(UPSTREAM))
        assert rotated is not None and rotated != first_refresh
        assert rotated.reveal() == env.sandbox.oauth.refresh_token_of(CLIENT)
        restarted_clock = Clock()
        restarted = env.manager(store=second, clock=restarted_clock)
        assert await restarted.access_token() == token  # no refresh needed after a restart
        restarted_clock.offset = 7200
        fresh = await restarted.access_token()
        assert env.sandbox.oauth.token_calls["refresh_token"] == 2
        assert await env.api_status(fresh) == 200  # the grant was not revoked: no reuse
    finally:
        for m in env.managers:
            await m.close()
        second.close()


async def test_unsaved_rotation_is_retried_without_resending_the_old_token(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If the store refuses the new refresh token, nobody gets the new access token until it is saved."""
    await env.login()
    clock = Clock()
    manager = env.manager(clock=clock, backoff_base=0.05, backoff_cap=0.1)
    clock.offset = 3600
    real_put = env.store.put
    failing = {"on": True}

    def put(name: str, kind: str, value: Secret) -> None:
        if failing["on"] and kind == "oauth_refresh_token":
            raise StoreError("disk full (simulated)")
        real_put(name, kind, value)

    monkeypatch.setattr(env.store, "put", put)
    with pytest.raises(CredentialUnavailable, match="cannot save tokens"):
        await manager.access_token()
    assert manager.state == "refreshing"
    failing["on"] = False
    await asyncio.sleep(0.15)
    token = await manager.access_token()
    assert env.sandbox.oauth.token_calls["refresh_token"] == 1  # saved, not fetched again
    assert await env.api_status(token) == 200
    stored = env.store.get(refresh_name(UPSTREAM))
    assert stored is not None and stored.reveal() == env.sandbox.oauth.refresh_token_of(CLIENT)


async def test_revoked_grant_needs_login_without_retrying(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    """invalid_grant puts the credential in needs_login, logged once, until a new login."""
    await env.login()
    clock = Clock()
    metrics = Metrics()
    manager = env.manager(clock=clock, metrics=metrics)
    manager.start()
    env.sandbox.oauth.revoke_grants(CLIENT)
    clock.offset = 3600
    for _ in range(3):
        with pytest.raises(CredentialUnavailable) as caught:
            await manager.access_token()
        assert f"credproxy login {UPSTREAM}" in caught.value.message
        assert caught.value.code == "credential_unavailable"
    await asyncio.sleep(0.2)  # the background task does not retry either
    assert env.sandbox.oauth.token_calls["refresh_token"] == 1
    assert manager.state == "needs_login"
    errors = [r for r in caplog.records if r.name == "credproxy.oauth" and r.levelname == "ERROR"]
    assert len(errors) == 1 and "invalid_grant" in errors[0].getMessage()
    label = f"{UPSTREAM}.{OAUTH_CREDENTIAL}"
    assert metrics.token_refreshes.labels(label, "invalid_grant")._value.get() == 1

    clock.offset = 0
    await env.login()  # `credproxy login` in another process, as far as the manager knows
    manager.store_changed()
    token = await manager.access_token()
    assert manager.state == "ok"
    assert await env.api_status(token) == 200


async def test_after_unauthorized_refreshes_once_for_many_callers(env: Env) -> None:
    """Many requests told 401 with the same token share one refresh; a newer token is reused."""
    await env.login()
    manager = env.manager()
    used = await manager.access_token()
    results = await asyncio.gather(*(manager.after_unauthorized(used) for _ in range(50)))
    assert env.sandbox.oauth.token_calls["refresh_token"] == 1
    fresh = results[0]
    assert all(r == fresh for r in results) and fresh != used
    assert await manager.after_unauthorized(used) == fresh  # a late 401 for the old token
    assert await manager.access_token() == fresh
    assert env.sandbox.oauth.token_calls["refresh_token"] == 1
    again = await manager.after_unauthorized(fresh)
    assert again != fresh and env.sandbox.oauth.token_calls["refresh_token"] == 2


async def test_proactive_refresh_keeps_requests_from_waiting(env: Env) -> None:
    """The background task renews before expiry, so access_token() returns at once."""
    env.sandbox.oauth.access_token_lifetime = 2
    await env.login()
    manager = env.manager()
    first = await manager.access_token()
    manager.start()
    await wait_until(lambda: env.sandbox.oauth.token_calls["refresh_token"] >= 1)
    await wait_until(lambda: manager.state == "ok")
    started = time.monotonic()
    renewed = await manager.access_token()
    assert time.monotonic() - started < 0.05
    assert renewed != first and await env.api_status(renewed) == 200
    assert env.sandbox.oauth.token_calls["refresh_token"] == 1


async def test_client_credentials_fetch_and_renew(env: Env) -> None:
    """With client_credentials the daemon fetches and renews tokens itself; no login, no refresh token."""
    env.sandbox.oauth.access_token_lifetime = 2
    upstream = env.upstream(grant="client_credentials", authorize_url=None)
    manager = env.manager(upstream)
    assert manager.state == "ok"
    manager.start()
    first = await manager.access_token()
    assert await env.api_status(first) == 200
    await wait_until(lambda: env.sandbox.oauth.token_calls["client_credentials"] >= 2)
    await wait_until(lambda: manager.state == "ok")
    second = await manager.access_token()
    assert second != first and await env.api_status(second) == 200
    assert refresh_name(UPSTREAM) not in env.stored()
    assert env.stored_access()["access_token"] == second.reveal()
    assert env.stored_access()["scope"] == "read write"


async def test_token_endpoint_down_backs_off_while_the_token_is_valid(env: Env) -> None:
    """A failing token endpoint is retried with growing, capped delays; the old token serves meanwhile."""
    env.sandbox.oauth.access_token_lifetime = 100
    await env.login()
    clock = Clock()
    metrics = Metrics()
    manager = env.manager(clock=clock, metrics=metrics, backoff_base=0.05, backoff_cap=0.2)
    old = await manager.access_token()
    env.sandbox.oauth.fail_token_endpoint(503)
    clock.offset = 80  # due for refresh (at 75 s) but valid (until 90 s)
    manager.start()
    calls = env.sandbox.oauth.token_calls
    await wait_until(lambda: calls["refresh_token"] >= 5, timeout=10)
    started = time.monotonic()
    assert await manager.access_token() == old
    assert time.monotonic() - started < 0.05
    assert manager.state == "refreshing"
    times = [at for at, grant in env.sandbox.oauth.token_call_log if grant == "refresh_token"]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert all(gap >= 0.02 for gap in gaps)  # backed off (base/2 at least), never a hot loop
    assert max(gaps) <= 0.2 + 0.1  # capped
    assert metrics.token_refreshes.labels(f"{UPSTREAM}.oauth", "error")._value.get() >= 4

    clock.offset = 95  # now the old token is too close to expiry to hand out
    with pytest.raises(CredentialUnavailable, match="token endpoint"):
        await manager.access_token()

    env.sandbox.oauth.fail_token_endpoint(None)
    await wait_until(lambda: manager.state == "ok", timeout=5)
    fresh = await manager.access_token()
    assert fresh != old and await env.api_status(fresh) == 200
    assert metrics.token_refreshes.labels(f"{UPSTREAM}.oauth", "ok")._value.get() == 1


async def test_slow_refresh_is_awaited_not_abandoned(env: Env) -> None:
    """A slow refresh keeps the old token serving and is not cut short, so its rotation is not lost."""
    env.sandbox.oauth.access_token_lifetime = 100
    await env.login()
    clock = Clock()
    manager = env.manager(clock=clock, request_timeout=0.2, backoff_base=0.05)
    old = await manager.access_token()
    env.sandbox.oauth.token_delay = 0.6  # beyond the connect timeout, within the refresh's
    clock.offset = 80
    manager.start()
    await wait_until(lambda: env.sandbox.oauth.token_calls["refresh_token"] == 1)
    started = time.monotonic()
    assert await manager.access_token() == old
    assert time.monotonic() - started < 0.05
    assert manager.state == "refreshing"
    await wait_until(lambda: manager.state == "ok", timeout=5)
    fresh = await manager.access_token()
    assert fresh != old and await env.api_status(fresh) == 200
    assert env.sandbox.oauth.token_calls["refresh_token"] == 1


async def test_slow_client_credentials_endpoint_is_retried(env: Env) -> None:
    """A client_credentials call that takes too long is abandoned and retried with backoff."""
    upstream = env.upstream(grant="client_credentials", authorize_url=None)
    manager = env.manager(upstream, request_timeout=0.2, backoff_base=0.05, backoff_cap=0.1)
    env.sandbox.oauth.token_delay = 0.5
    with pytest.raises(CredentialUnavailable, match=r"did not answer within 0\.2 s"):
        await manager.access_token()
    manager.start()
    await wait_until(lambda: env.sandbox.oauth.token_calls["client_credentials"] >= 3)
    env.sandbox.oauth.token_delay = 0
    await wait_until(lambda: manager.state == "ok", timeout=5)
    assert await env.api_status(await manager.access_token()) == 200


async def test_missing_or_refused_client_secret(env: Env) -> None:
    """A client secret absent from the store, or refused by the server, is state missing until fixed."""
    upstream = env.upstream(grant="client_credentials", authorize_url=None, client_secret="absent")
    manager = env.manager(upstream)
    assert manager.state == "missing"
    with pytest.raises(CredentialUnavailable, match="credproxy keys add absent"):
        await manager.access_token()
    assert sum(env.sandbox.oauth.token_calls.values()) == 0

    env.store.put("absent", "client_secret", Secret("not-the-right-secret"))
    manager.store_changed()
    with pytest.raises(CredentialUnavailable, match="invalid_client"):
        await manager.access_token()
    assert manager.state == "missing"
    with pytest.raises(CredentialUnavailable):
        await manager.access_token()
    assert env.sandbox.oauth.token_calls["client_credentials"] == 1  # no retry loop

    env.store.put("absent", "client_secret", Secret(CLIENT_SECRET))
    manager.store_changed()
    token = await manager.access_token()
    assert manager.state == "ok" and await env.api_status(token) == 200


async def test_never_logged_in_needs_login(env: Env) -> None:
    """An authorization_code upstream without tokens asks for `credproxy login`, calling nothing."""
    manager = env.manager()
    assert manager.state == "needs_login"
    assert manager.expires_at is None
    with pytest.raises(CredentialUnavailable, match=f"credproxy login {UPSTREAM}"):
        await manager.access_token()
    assert sum(env.sandbox.oauth.token_calls.values()) == 0


async def test_no_secret_in_logs_messages_or_reprs(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    """Across login, renewals, failures and needs_login no token shows in logs, messages or reprs."""
    env.sandbox.oauth.access_token_lifetime = 100
    printed = await env.login()
    clock = Clock()
    manager = env.manager(clock=clock, backoff_base=0.01, backoff_cap=0.02)
    clock.offset = 95
    env.sandbox.oauth.fail_token_endpoint(503)
    with pytest.raises(CredentialUnavailable) as transient:
        await manager.access_token()
    env.sandbox.oauth.fail_token_endpoint(None)
    await asyncio.sleep(0.05)
    token = await manager.access_token()
    env.sandbox.oauth.revoke_grants(CLIENT)
    with pytest.raises(CredentialUnavailable) as refused:
        await manager.after_unauthorized(token)

    secrets = [*env.sandbox.oauth.issued_tokens(), CLIENT_SECRET]
    texts = [
        caplog.text,
        printed,
        str(transient.value),
        str(refused.value),
        repr(manager),
        repr(token),
        manager.last_error,
    ]
    for value in secrets:
        assert all(value not in text for text in texts)
    for value in secrets:
        assert redactor(f"x {value} y") == f"x {MASK} y"  # registered with the redactor
