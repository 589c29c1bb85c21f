"""The sandbox's OAuth 2.0 server on its own, over real TLS: PKCE, rotation, reuse detection."""

from __future__ import annotations

import base64
import hashlib
import secrets
import ssl
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import aiohttp
import pytest

from proxy.sandbox import Sandbox

CLIENT = "sandbox-client"
SECRET = "sandbox-client-secret-0123456789"
REDIRECT = "http://127.0.0.1:8789/callback"


@pytest.fixture
async def sandbox() -> AsyncIterator[Sandbox]:
    async with Sandbox() as sb:
        sb.oauth.register_client(CLIENT, SECRET, [REDIRECT], ["read", "write", "delete"])
        yield sb


@pytest.fixture
async def client(sandbox: Sandbox) -> AsyncIterator[aiohttp.ClientSession]:
    ctx = ssl.create_default_context(cadata=sandbox.ca_pem.decode())
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=ctx), trust_env=False
    ) as session:
        yield session


def pkce() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    digest = hashlib.sha256(verifier.encode()).digest()
    return verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def query(location: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}


async def authorize(
    sandbox: Sandbox, client: aiohttp.ClientSession, **params: str
) -> aiohttp.ClientResponse:
    async with client.get(
        f"{sandbox.url}/oauth/authorize?{urlencode(params)}", allow_redirects=False
    ) as resp:
        await resp.read()
        return resp


def auth_params(challenge: str, **extra: str) -> dict[str, str]:
    params = {
        "response_type": "code",
        "client_id": CLIENT,
        "redirect_uri": REDIRECT,
        "scope": "read write",
        "state": "st-123",
        "code_challenge": challenge,
        "code_challenge_method": "S256",
    }
    params.update(extra)
    return params


async def token(
    sandbox: Sandbox,
    client: aiohttp.ClientSession,
    form: dict[str, str],
    *,
    basic: tuple[str, str] | None = None,
    post: bool = True,
) -> tuple[int, dict[str, Any], aiohttp.ClientResponse]:
    form = dict(form)
    headers = {}
    if basic is not None:
        pair = f"{basic[0]}:{basic[1]}".encode()
        headers["Authorization"] = "Basic " + base64.b64encode(pair).decode()
    elif post:
        form.setdefault("client_id", CLIENT)
        form.setdefault("client_secret", SECRET)
    async with client.post(f"{sandbox.url}/oauth/token", data=form, headers=headers) as resp:
        return resp.status, await resp.json(), resp


async def code_for(sandbox: Sandbox, client: aiohttp.ClientSession) -> tuple[str, str]:
    verifier, challenge = pkce()
    resp = await authorize(sandbox, client, **auth_params(challenge))
    return query(resp.headers["Location"])["code"], verifier


async def tokens(sandbox: Sandbox, client: aiohttp.ClientSession) -> dict[str, Any]:
    code, verifier = await code_for(sandbox, client)
    form = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": REDIRECT,
        "code_verifier": verifier,
    }
    status, body, _ = await token(sandbox, client, form)
    assert status == 200, body
    return body


async def auth_test(sandbox: Sandbox, client: aiohttp.ClientSession, bearer: str) -> int:
    headers = {"Authorization": f"Bearer {bearer}"}
    async with client.get(f"{sandbox.base_url}/auth/test", headers=headers) as resp:
        await resp.read()
        return resp.status


async def test_authorize_redirects_with_code_and_echoed_state(
    sandbox: Sandbox, client: aiohttp.ClientSession
) -> None:
    """A valid PKCE request is auto-approved with a 302 to the redirect URI carrying code and state."""
    _, challenge = pkce()
    resp = await authorize(sandbox, client, **auth_params(challenge))
    assert resp.status == 302
    location = resp.headers["Location"]
    assert location.startswith(REDIRECT + "?")
    params = query(location)
    assert params["state"] == "st-123"
    assert params["code"].startswith("aimy_ac_")


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"code_challenge": ""}, "invalid_request"),
        ({"code_challenge_method": "plain"}, "invalid_request"),
        ({"code_challenge": "short"}, "invalid_request"),
        ({"response_type": "token"}, "unsupported_response_type"),
        ({"scope": "read admin"}, "invalid_scope"),
    ],
    ids=["no-challenge", "plain", "malformed-challenge", "implicit", "scope-too-wide"],
)
async def test_authorize_errors_redirect_back_with_state(
    sandbox: Sandbox, client: aiohttp.ClientSession, change: dict[str, str], error: str
) -> None:
    """PKCE S256 is required and scopes are bounded; refusals go back to the client with its state."""
    _, challenge = pkce()
    resp = await authorize(sandbox, client, **auth_params(challenge, **change))
    assert resp.status == 302
    params = query(resp.headers["Location"])
    assert params["error"] == error
    assert params["state"] == "st-123"
    assert "code" not in params


@pytest.mark.parametrize(
    "change",
    [{"client_id": "nobody"}, {"redirect_uri": "https://evil.example/cb"}, {"redirect_uri": ""}],
    ids=["unknown-client", "foreign-redirect", "no-redirect"],
)
async def test_authorize_never_redirects_to_an_unverified_uri(
    sandbox: Sandbox, client: aiohttp.ClientSession, change: dict[str, str]
) -> None:
    """An unknown client or unregistered redirect URI gets a 400 page, never a redirect."""
    _, challenge = pkce()
    resp = await authorize(sandbox, client, **auth_params(challenge, **change))
    assert resp.status == 400
    assert "Location" not in resp.headers


async def test_loopback_redirect_may_use_any_port(
    sandbox: Sandbox, client: aiohttp.ClientSession
) -> None:
    """A registered loopback redirect URI matches on any port (RFC 8252), not on another path."""
    _, challenge = pkce()
    other_port = "http://127.0.0.1:45555/callback"
    resp = await authorize(sandbox, client, **auth_params(challenge, redirect_uri=other_port))
    assert resp.status == 302 and resp.headers["Location"].startswith(other_port + "?")
    other_path = "http://127.0.0.1:8789/elsewhere"
    resp = await authorize(sandbox, client, **auth_params(challenge, redirect_uri=other_path))
    assert resp.status == 400


async def test_deny_hook_redirects_with_access_denied(
    sandbox: Sandbox, client: aiohttp.ClientSession
) -> None:
    """The deny hook makes the next authorization come back with error=access_denied and the state."""
    sandbox.oauth.deny_next_authorization()
    _, challenge = pkce()
    resp = await authorize(sandbox, client, **auth_params(challenge))
    params = query(resp.headers["Location"])
    assert params["error"] == "access_denied" and params["state"] == "st-123"
    resp = await authorize(sandbox, client, **auth_params(challenge))
    assert "code" in query(resp.headers["Location"])


async def test_code_exchange_checks_the_verifier(
    sandbox: Sandbox, client: aiohttp.ClientSession
) -> None:
    """The code is exchanged only with the verifier of its challenge and the same redirect URI."""
    code, verifier = await code_for(sandbox, client)
    base = {"grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT}
    status, body, _ = await token(sandbox, client, base)
    assert (status, body["error"]) == (400, "invalid_request")
    wrong = pkce()[0]
    status, body, _ = await token(sandbox, client, {**base, "code_verifier": wrong})
    assert (status, body["error"]) == (400, "invalid_grant")
    other = {**base, "code_verifier": verifier, "redirect_uri": "http://127.0.0.1:1/callback"}
    status, body, _ = await token(sandbox, client, other)
    assert (status, body["error"]) == (400, "invalid_grant")
    status, body, resp = await token(sandbox, client, {**base, "code_verifier": verifier})
    assert status == 200
    assert resp.headers["Cache-Control"] == "no-store"
    assert body["token_type"] == "Bearer"
    assert body["scope"] == "read write"
    assert body["expires_in"] == 3600
    assert body["refresh_token"].startswith("aimy_rt_")
    assert await auth_test(sandbox, client, body["access_token"]) == 200


async def test_code_reuse_revokes_the_grant(
    sandbox: Sandbox, client: aiohttp.ClientSession
) -> None:
    """A code presented twice is refused and the tokens it produced stop working."""
    code, verifier = await code_for(sandbox, client)
    form = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": REDIRECT,
        "code_verifier": verifier,
    }
    status, first, _ = await token(sandbox, client, form)
    assert status == 200
    status, body, _ = await token(sandbox, client, form)
    assert (status, body["error"]) == (400, "invalid_grant")
    assert await auth_test(sandbox, client, first["access_token"]) == 401
    refresh = {"grant_type": "refresh_token", "refresh_token": first["refresh_token"]}
    status, body, _ = await token(sandbox, client, refresh)
    assert body["error"] == "invalid_grant"


async def test_access_token_carries_granted_scopes(
    sandbox: Sandbox, client: aiohttp.ClientSession
) -> None:
    """An issued access token is a bearer key of the API with exactly the granted scopes."""
    body = await tokens(sandbox, client)
    headers = {"Authorization": f"Bearer {body['access_token']}"}
    async with client.get(f"{sandbox.base_url}/auth/test", headers=headers) as resp:
        info = await resp.json()
    assert info["scopes"] == ["read", "write"]
    assert info["plan"] == "pro"
    async with client.delete(f"{sandbox.base_url}/conversations/x", headers=headers) as resp:
        assert resp.status == 403


async def test_refresh_rotates_and_reuse_revokes_the_grant(
    sandbox: Sandbox, client: aiohttp.ClientSession
) -> None:
    """Each refresh returns a new refresh token; presenting a rotated one revokes the whole grant."""
    first = await tokens(sandbox, client)
    form = {"grant_type": "refresh_token", "refresh_token": first["refresh_token"]}
    status, second, _ = await token(sandbox, client, form)
    assert status == 200
    assert second["refresh_token"] != first["refresh_token"]
    assert sandbox.oauth.refresh_token_of(CLIENT) == second["refresh_token"]
    assert await auth_test(sandbox, client, second["access_token"]) == 200

    status, body, _ = await token(sandbox, client, form)  # the rotated-out token again
    assert (status, body["error"]) == (400, "invalid_grant")
    assert "reused" in body["error_description"]
    assert await auth_test(sandbox, client, second["access_token"]) == 401
    latest = {"grant_type": "refresh_token", "refresh_token": second["refresh_token"]}
    status, body, _ = await token(sandbox, client, latest)
    assert body["error"] == "invalid_grant"
    assert sandbox.oauth.token_calls["refresh_token"] == 3


async def test_refresh_may_narrow_but_not_widen_scope(
    sandbox: Sandbox, client: aiohttp.ClientSession
) -> None:
    """A refresh may ask for fewer scopes than granted, never more."""
    first = await tokens(sandbox, client)
    wider = {"grant_type": "refresh_token", "refresh_token": first["refresh_token"]}
    status, body, _ = await token(sandbox, client, {**wider, "scope": "read delete"})
    assert (status, body["error"]) == (400, "invalid_scope")
    status, body, _ = await token(sandbox, client, {**wider, "scope": "read"})
    assert status == 200 and body["scope"] == "read"


async def test_client_credentials_issue_access_tokens_only(
    sandbox: Sandbox, client: aiohttp.ClientSession
) -> None:
    """client_credentials gives a confidential client an access token and no refresh token."""
    status, body, _ = await token(
        sandbox, client, {"grant_type": "client_credentials", "scope": "read"}
    )
    assert status == 200
    assert "refresh_token" not in body
    assert body["scope"] == "read"
    assert await auth_test(sandbox, client, body["access_token"]) == 200
    sandbox.oauth.register_client("public", None, [REDIRECT], ["read"])
    status, body, _ = await token(
        sandbox, client, {"grant_type": "client_credentials", "client_id": "public"}, post=False
    )
    assert (status, body["error"]) == (400, "unauthorized_client")
    assert sandbox.oauth.token_calls["client_credentials"] == 2


async def test_basic_and_post_client_authentication(
    sandbox: Sandbox, client: aiohttp.ClientSession
) -> None:
    """Basic and POST authentication both work, one at a time, and a client may be held to one."""
    form = {"grant_type": "client_credentials"}
    status, _, _ = await token(sandbox, client, form, basic=(CLIENT, SECRET))
    assert status == 200
    status, _, _ = await token(sandbox, client, form)
    assert status == 200
    status, body, resp = await token(sandbox, client, form, basic=(CLIENT, "wrong"))
    assert (status, body["error"]) == (401, "invalid_client")
    assert resp.headers["WWW-Authenticate"].startswith("Basic")
    status, body, _ = await token(sandbox, client, {**form, "client_secret": "wrong"})
    assert (status, body["error"]) == (401, "invalid_client")
    both = {**form, "client_secret": SECRET}
    status, body, _ = await token(sandbox, client, both, basic=(CLIENT, SECRET))
    assert (status, body["error"]) == (400, "invalid_request")

    sandbox.oauth.register_client(
        "basic-only", "basic-secret-123456", [REDIRECT], ["read"], auth_method="client_secret_basic"
    )
    as_post = {**form, "client_id": "basic-only", "client_secret": "basic-secret-123456"}
    status, body, _ = await token(sandbox, client, as_post)
    assert (status, body["error"]) == (401, "invalid_client")
    status, _, _ = await token(sandbox, client, form, basic=("basic-only", "basic-secret-123456"))
    assert status == 200


async def test_expired_access_token_answers_401(
    sandbox: Sandbox, client: aiohttp.ClientSession
) -> None:
    """Once its lifetime has passed, an access token gets the API's 401 unauthorized."""
    sandbox.oauth.access_token_lifetime = 2
    body = await tokens(sandbox, client)
    assert body["expires_in"] == 2
    assert await auth_test(sandbox, client, body["access_token"]) == 200
    sandbox.state.clock = lambda: time.time() + 2.5
    headers = {"Authorization": f"Bearer {body['access_token']}"}
    async with client.get(f"{sandbox.base_url}/auth/test", headers=headers) as resp:
        assert resp.status == 401
        assert (await resp.json())["error"]["code"] == "unauthorized"


async def test_revoke_grants_hook(sandbox: Sandbox, client: aiohttp.ClientSession) -> None:
    """revoke_grants() kills a client's access and refresh tokens at once."""
    body = await tokens(sandbox, client)
    assert sandbox.oauth.revoke_grants(CLIENT) == 1
    assert await auth_test(sandbox, client, body["access_token"]) == 401
    form = {"grant_type": "refresh_token", "refresh_token": body["refresh_token"]}
    status, answer, _ = await token(sandbox, client, form)
    assert (status, answer["error"]) == (400, "invalid_grant")


async def test_token_endpoint_failure_and_delay_switches(
    sandbox: Sandbox, client: aiohttp.ClientSession
) -> None:
    """The token endpoint can be made to fail with 503 or to answer slowly; every call is counted."""
    form = {"grant_type": "client_credentials"}
    sandbox.oauth.fail_token_endpoint(503)
    status, body, _ = await token(sandbox, client, form)
    assert (status, body["error"]) == (503, "temporarily_unavailable")
    sandbox.oauth.fail_token_endpoint(None)
    sandbox.oauth.token_delay = 0.3
    started = time.monotonic()
    status, _, _ = await token(sandbox, client, form)
    assert status == 200 and time.monotonic() - started >= 0.3
    assert sandbox.oauth.token_calls["client_credentials"] == 2
    assert [grant for _, grant in sandbox.oauth.token_call_log] == ["client_credentials"] * 2


async def test_token_errors_never_echo_a_token(
    sandbox: Sandbox, client: aiohttp.ClientSession
) -> None:
    """Error bodies name the problem, never the token or secret that was presented."""
    first = await tokens(sandbox, client)
    form = {"grant_type": "refresh_token", "refresh_token": first["refresh_token"] + "x"}
    status, body, resp = await token(sandbox, client, form)
    assert status == 400
    text = str(body)
    assert first["refresh_token"] not in text and SECRET not in text
    assert resp.headers["Cache-Control"] == "no-store"
    status, body, _ = await token(sandbox, client, {"grant_type": "password"})
    assert (status, body["error"]) == (400, "unsupported_grant_type")
