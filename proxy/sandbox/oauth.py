"""The sandbox's OAuth 2.0 authorization server: authorization code with PKCE, refresh-token
rotation with reuse detection, and client credentials, on the sandbox's own TLS app.

Access tokens it issues become bearer keys of the sandbox API with the granted scopes and an
expiry. It is written by hand, independently of the client in `proxy/oauth.py`, so a mistake
in one is not mirrored in the other. It must never accept a code without its verifier,
honour a rotated refresh token, or put a token in a log line or an error body.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import ipaddress
import re
import secrets
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final, Literal
from urllib.parse import parse_qsl, unquote_plus, urlencode, urlsplit

from aiohttp import web

from proxy.sandbox.app import BODY, SCOPES, SandboxState

AUTHORIZE_PATH: Final = "/oauth/authorize"
TOKEN_PATH: Final = "/oauth/token"  # noqa: S105 - a path, not a secret
ACCESS_PREFIX: Final = "aimy_at_"
REFRESH_PREFIX: Final = "aimy_rt_"
CODE_PREFIX: Final = "aimy_ac_"
DEFAULT_ACCESS_LIFETIME: Final = 3600.0
DEFAULT_CODE_LIFETIME: Final = 60.0

# RFC 7636 section 4.1/4.2: 43-128 unreserved characters.
_PKCE_RE = re.compile(r"[A-Za-z0-9._~-]{43,128}")
_NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}
_LOOPBACK_HOSTS = ("127.0.0.1", "::1")

AuthMethod = Literal["client_secret_basic", "client_secret_post", "none"]
GrantType = Literal["authorization_code", "refresh_token", "client_credentials"]


@dataclass(frozen=True)
class OAuthClient:
    """A registered client: its secret (None for a public client) and what it may ask for."""

    client_id: str
    secret: str | None = field(repr=False)
    redirect_uris: tuple[str, ...]
    scopes: frozenset[str]
    # None: either client_secret_basic or client_secret_post (or none for a public client).
    auth_method: AuthMethod | None = None
    plan: str = "pro"  # the seed offers OAuth on the Pro plan
    user_id: str = "user_123"


@dataclass
class _Code:
    client_id: str
    redirect_uri: str
    scopes: frozenset[str]
    challenge: str
    expires_at: float
    grant_id: str | None = None  # set when redeemed; a second redemption revokes it


@dataclass
class _Grant:
    id: str
    client: OAuthClient
    scopes: frozenset[str]
    refresh_token: str | None  # the one current refresh token; None for client_credentials
    access_tokens: set[str] = field(default_factory=set)
    revoked: bool = False


class _OAuthError(Exception):
    """An RFC 6749 section 5.2 error; the description never holds a token."""

    def __init__(self, error: str, description: str, status: int = 400) -> None:
        super().__init__(f"{error}: {description}")
        self.error = error
        self.description = description
        self.status = status

    def response(self, *, basic: bool = False) -> web.Response:
        headers = dict(_NO_STORE)
        if self.status == 401:
            scheme = "Basic" if basic else "Bearer"
            headers["WWW-Authenticate"] = f'{scheme} realm="aimychats", error="{self.error}"'
        body = {"error": self.error, "error_description": self.description}
        return web.json_response(body, status=self.status, headers=headers)


def _s256(verifier: str) -> str:
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def _single_values(pairs: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Parameters as a dict; RFC 6749 section 3.1/3.2: none may appear twice."""
    values: dict[str, str] = {}
    for name, value in pairs:
        if name in values:
            raise _OAuthError("invalid_request", f"parameter '{name}' is repeated")
        values[name] = value
    return values


def _scope_set(text: str | None, allowed: frozenset[str]) -> frozenset[str]:
    """The requested scopes (all of `allowed` when none are asked for), or invalid_scope."""
    if not text:
        return allowed
    wanted = frozenset(text.split())
    if not wanted <= allowed:
        raise _OAuthError("invalid_scope", "the requested scope exceeds what the client may have")
    return wanted


def _is_loopback_http(parts: tuple[str, str | None]) -> bool:
    scheme, host = parts
    if scheme != "http" or host is None:
        return False
    try:
        return ipaddress.ip_address(host).compressed in _LOOPBACK_HOSTS
    except ValueError:
        return False


def _redirect_matches(registered: str, given: str) -> bool:
    """Exact match; for a loopback http URI any port (RFC 8252 section 7.3)."""
    if registered == given:
        return True
    try:
        a, b = urlsplit(registered), urlsplit(given)
        _ = (a.port, b.port)  # a malformed port raises here
    except ValueError:
        return False
    return (
        _is_loopback_http((a.scheme, a.hostname))
        and (a.scheme, a.hostname, a.path, a.query) == (b.scheme, b.hostname, b.path, b.query)
        and not b.fragment
    )


def _with_query(uri: str, params: Mapping[str, str]) -> str:
    separator = "&" if "?" in uri else "?"
    return uri + separator + urlencode(params)


class SandboxOAuth:
    """The sandbox's authorization server and its test hooks; mount it with `mount(app)`."""

    def __init__(
        self,
        state: SandboxState,
        *,
        access_token_lifetime: float = DEFAULT_ACCESS_LIFETIME,
        code_lifetime: float = DEFAULT_CODE_LIFETIME,
    ) -> None:
        self.state = state
        # Seconds an access token lives (expires_in); tests use a few seconds.
        self.access_token_lifetime = access_token_lifetime
        # Seconds an authorization code may wait for its exchange.
        self.code_lifetime = code_lifetime
        # Seconds the token endpoint waits before answering (a slow endpoint).
        self.token_delay = 0.0
        # Token-endpoint calls by grant_type ("" when the request named none), failures included.
        self.token_calls: Counter[str] = Counter()
        # (epoch seconds, grant_type) of every token-endpoint call, in arrival order.
        self.token_call_log: list[tuple[float, str]] = []
        self.authorize_calls = 0
        self.clients: dict[str, OAuthClient] = {}
        self._codes: dict[str, _Code] = {}
        self._grants: dict[str, _Grant] = {}
        self._refresh_index: dict[str, str] = {}  # every refresh token ever issued -> grant id
        self._issued: list[str] = []
        self._deny: str | None = None
        self._failure: int | None = None

    # -- registration and test hooks --------------------------------------------------------

    def register_client(
        self,
        client_id: str,
        secret: str | None,
        redirect_uris: Iterable[str],
        scopes: Iterable[str],
        *,
        auth_method: AuthMethod | None = None,
        plan: str = "pro",
        user_id: str = "user_123",
    ) -> OAuthClient:
        """Register (or replace) a client; `secret=None` makes it a public client (PKCE only)."""
        scope_set = frozenset(scopes)
        if not scope_set or not scope_set <= SCOPES:
            raise ValueError(f"scopes must be a non-empty subset of {sorted(SCOPES)}")
        if not client_id or any(c.isspace() for c in client_id):
            raise ValueError("a client_id is a non-empty word")
        if secret is None and auth_method not in (None, "none"):
            raise ValueError("a public client (no secret) authenticates with 'none'")
        client = OAuthClient(
            client_id, secret, tuple(redirect_uris), scope_set, auth_method, plan, user_id
        )
        self.clients[client_id] = client
        return client

    def revoke_grants(self, client_id: str) -> int:
        """Revoke every grant of the client, with its refresh and access tokens; how many."""
        grants = [g for g in self._grants.values() if g.client.client_id == client_id]
        for grant in grants:
            self._revoke(grant)
        return len(grants)

    def deny_next_authorization(self, error: str = "access_denied") -> None:
        """The next valid authorization request redirects back with `error=` instead of a code."""
        self._deny = error

    def fail_token_endpoint(self, status: int | None = 503) -> None:
        """Answer every token request with `status` (a 5xx or 429) until called with None."""
        if status is not None and not (status == 429 or 500 <= status <= 599):
            raise ValueError("a token-endpoint failure is a 5xx or 429")
        self._failure = status

    def refresh_token_of(self, client_id: str) -> str | None:
        """The current refresh token of the client's newest live grant (tests compare it)."""
        for grant in reversed(self._grants.values()):
            if grant.client.client_id == client_id and not grant.revoked:
                return grant.refresh_token
        return None

    def issued_tokens(self) -> list[str]:
        """Every code, access token and refresh token issued so far (tests search logs for them)."""
        return list(self._issued)

    # -- the app ------------------------------------------------------------------------------

    def mount(self, app: web.Application) -> None:
        app.router.add_get(AUTHORIZE_PATH, self.authorize)
        app.router.add_post(TOKEN_PATH, self.token)

    # -- tokens --------------------------------------------------------------------------------

    def _new(self, prefix: str) -> str:
        value = prefix + secrets.token_urlsafe(32)
        self._issued.append(value)
        return value

    def _revoke(self, grant: _Grant) -> None:
        grant.revoked = True
        grant.refresh_token = None
        for token in grant.access_tokens:
            self.state.remove_key(token)
        grant.access_tokens.clear()

    def _issue(self, grant: _Grant, scopes: frozenset[str]) -> dict[str, object]:
        now = self.state.clock()
        lifetime = self.access_token_lifetime
        access = self._new(ACCESS_PREFIX)
        self.state.add_key(
            access, scopes, grant.client.plan, grant.client.user_id, expires_at=now + lifetime
        )
        grant.access_tokens.add(access)
        body: dict[str, object] = {
            "access_token": access,
            "token_type": "Bearer",
            "expires_in": int(lifetime) if float(lifetime).is_integer() else lifetime,
            "scope": " ".join(sorted(scopes)),
        }
        if grant.refresh_token is not None:
            body["refresh_token"] = grant.refresh_token
        return body

    # -- authorization endpoint ---------------------------------------------------------------

    async def authorize(self, request: web.Request) -> web.Response:
        """Auto-approve a valid request: 302 to the redirect URI with a code and the state."""
        self.authorize_calls += 1
        try:
            params = _single_values(parse_qsl(request.query_string, keep_blank_values=True))
            client = self.clients.get(params.get("client_id", ""))
            if client is None:
                raise _OAuthError("invalid_client", "unknown client_id")
            redirect_uri = params.get("redirect_uri", "")
            if not any(_redirect_matches(r, redirect_uri) for r in client.redirect_uris):
                raise _OAuthError("invalid_request", "redirect_uri is missing or not registered")
        except _OAuthError as error:
            # RFC 6749 section 4.1.2.1: never redirect to an unverified URI.
            return error.response()
        outcome: dict[str, str] = {}
        try:
            outcome = {"code": self._authorize(client, redirect_uri, params)}
        except _OAuthError as error:
            outcome = {"error": error.error, "error_description": error.description}
        if "state" in params:
            outcome["state"] = params["state"]
        return web.Response(status=302, headers={"Location": _with_query(redirect_uri, outcome)})

    def _authorize(self, client: OAuthClient, redirect_uri: str, params: Mapping[str, str]) -> str:
        if params.get("response_type") != "code":
            raise _OAuthError("unsupported_response_type", "only response_type=code is supported")
        challenge = params.get("code_challenge", "")
        if not challenge:
            raise _OAuthError("invalid_request", "PKCE is required: send code_challenge")
        if params.get("code_challenge_method") != "S256":
            raise _OAuthError("invalid_request", "code_challenge_method must be S256")
        if not _PKCE_RE.fullmatch(challenge):
            raise _OAuthError("invalid_request", "code_challenge is malformed")
        scopes = _scope_set(params.get("scope"), client.scopes)
        if self._deny is not None:
            error, self._deny = self._deny, None
            raise _OAuthError(error, "the resource owner denied the request")
        code = self._new(CODE_PREFIX)
        expires_at = self.state.clock() + self.code_lifetime
        self._codes[code] = _Code(client.client_id, redirect_uri, scopes, challenge, expires_at)
        return code

    # -- token endpoint -----------------------------------------------------------------------

    async def token(self, request: web.Request) -> web.Response:
        """RFC 6749 token endpoint: authorization_code, refresh_token, client_credentials."""
        try:
            pairs = parse_qsl(request[BODY].decode("utf-8"), keep_blank_values=True)
        except UnicodeDecodeError:
            pairs = []
        grant_type = next((value for name, value in pairs if name == "grant_type"), "")
        self.token_calls[grant_type] += 1
        self.token_call_log.append((time.time(), grant_type))
        if self.token_delay > 0:
            await asyncio.sleep(self.token_delay)
        if self._failure is not None:
            failed = {"error": "temporarily_unavailable", "error_description": "try again later"}
            return web.json_response(failed, status=self._failure, headers=_NO_STORE)
        basic = request.headers.get("Authorization", "").lower().startswith("basic ")
        try:
            if request.content_type != "application/x-www-form-urlencoded":
                raise _OAuthError("invalid_request", "send application/x-www-form-urlencoded")
            form = _single_values(pairs)
            client = self._authenticate(request, form)
            body = self._grant(client, form)
        except _OAuthError as error:
            return error.response(basic=basic)
        return web.json_response(body, headers=_NO_STORE)

    def _authenticate(self, request: web.Request, form: Mapping[str, str]) -> OAuthClient:
        """RFC 6749 section 2.3.1: exactly one of Basic, POST body, or none (public client)."""
        header = request.headers.getall("Authorization", [])
        basic_id: str | None = None
        basic_secret: str | None = None
        if header:
            scheme, _, encoded = header[0].partition(" ")
            if len(header) > 1 or scheme.lower() != "basic":
                raise _OAuthError("invalid_client", "use HTTP Basic client authentication", 401)
            try:
                decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError):
                raise _OAuthError("invalid_client", "malformed Basic credentials", 401) from None
            raw_id, colon, raw_secret = decoded.partition(":")
            if not colon:
                raise _OAuthError("invalid_client", "malformed Basic credentials", 401)
            basic_id, basic_secret = unquote_plus(raw_id), unquote_plus(raw_secret)
        if basic_id is not None and "client_secret" in form:
            raise _OAuthError("invalid_request", "use one client authentication method, not two")
        method: AuthMethod
        secret: str | None
        if basic_id is not None:
            if form.get("client_id", basic_id) != basic_id:
                raise _OAuthError("invalid_request", "client_id differs from the Basic user")
            method, client_id, secret = "client_secret_basic", basic_id, basic_secret
        elif "client_secret" in form:
            method, client_id = "client_secret_post", form.get("client_id", "")
            secret = form["client_secret"]
        else:
            method, client_id, secret = "none", form.get("client_id", ""), None
        client = self.clients.get(client_id)
        refused = _OAuthError("invalid_client", "client authentication failed", 401)
        if client is None:
            raise refused
        if client.secret is None:
            if method != "none":
                raise refused
            return client
        if method == "none" or secret is None:
            raise refused
        if not hmac.compare_digest(secret.encode(), client.secret.encode()):
            raise refused
        if client.auth_method not in (None, method):
            raise _OAuthError("invalid_client", f"this client must use {client.auth_method}", 401)
        return client

    def _grant(self, client: OAuthClient, form: Mapping[str, str]) -> dict[str, object]:
        grant_type = form.get("grant_type", "")
        if grant_type == "authorization_code":
            return self._authorization_code(client, form)
        if grant_type == "refresh_token":
            return self._refresh(client, form)
        if grant_type == "client_credentials":
            return self._client_credentials(client, form)
        if not grant_type:
            raise _OAuthError("invalid_request", "grant_type is required")
        raise _OAuthError("unsupported_grant_type", "unsupported grant_type")

    def _authorization_code(
        self, client: OAuthClient, form: Mapping[str, str]
    ) -> dict[str, object]:
        value, verifier = form.get("code", ""), form.get("code_verifier", "")
        if not value:
            raise _OAuthError("invalid_request", "code is required")
        if not verifier:
            raise _OAuthError("invalid_request", "code_verifier is required (PKCE)")
        code = self._codes.get(value)
        if code is None or code.client_id != client.client_id:
            raise _OAuthError("invalid_grant", "unknown authorization code")
        if code.grant_id is not None:
            # RFC 6749 section 4.1.2: a code used twice revokes what it granted.
            grant = self._grants.get(code.grant_id)
            if grant is not None:
                self._revoke(grant)
            raise _OAuthError("invalid_grant", "authorization code already used; grant revoked")
        if self.state.clock() >= code.expires_at:
            del self._codes[value]
            raise _OAuthError("invalid_grant", "authorization code expired")
        if form.get("redirect_uri") != code.redirect_uri:
            raise _OAuthError("invalid_grant", "redirect_uri differs from the authorization's")
        if not _PKCE_RE.fullmatch(verifier) or not hmac.compare_digest(
            _s256(verifier), code.challenge
        ):
            raise _OAuthError("invalid_grant", "code_verifier does not match code_challenge")
        grant = _Grant(secrets.token_hex(8), client, code.scopes, self._new(REFRESH_PREFIX))
        assert grant.refresh_token is not None
        self._refresh_index[grant.refresh_token] = grant.id
        self._grants[grant.id] = grant
        code.grant_id = grant.id
        return self._issue(grant, grant.scopes)

    def _refresh(self, client: OAuthClient, form: Mapping[str, str]) -> dict[str, object]:
        presented = form.get("refresh_token", "")
        if not presented:
            raise _OAuthError("invalid_request", "refresh_token is required")
        grant = self._grants.get(self._refresh_index.get(presented, ""))
        if grant is None or grant.client.client_id != client.client_id:
            raise _OAuthError("invalid_grant", "unknown refresh token")
        if grant.revoked:
            raise _OAuthError("invalid_grant", "the grant was revoked")
        if grant.refresh_token is None or not hmac.compare_digest(
            presented.encode(), grant.refresh_token.encode()
        ):
            # A rotated token came back: someone holds a copy. Revoke the whole grant.
            self._revoke(grant)
            raise _OAuthError("invalid_grant", "refresh token reused; the grant was revoked")
        scopes = _scope_set(form.get("scope"), grant.scopes)
        grant.refresh_token = self._new(REFRESH_PREFIX)
        self._refresh_index[grant.refresh_token] = grant.id
        return self._issue(grant, scopes)

    def _client_credentials(
        self, client: OAuthClient, form: Mapping[str, str]
    ) -> dict[str, object]:
        if client.secret is None:
            raise _OAuthError("unauthorized_client", "a public client cannot use this grant")
        scopes = _scope_set(form.get("scope"), client.scopes)
        grant = self._grants.setdefault(
            f"cc:{client.client_id}", _Grant(f"cc:{client.client_id}", client, scopes, None)
        )
        grant.revoked = False
        return self._issue(grant, scopes)
