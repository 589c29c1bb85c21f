"""OAuth 2.0 for upstreams: `credproxy login` (authorization code + PKCE over a loopback
redirect) and the daemon's `TokenManager`, which keeps one access token per upstream valid with
a single refresh in flight and writes a rotated refresh token to the store before anyone uses
the access token that came with it.

It must never put a token or client secret in a log line, an exception message, a repr or argv,
never send a rotated-out refresh token again, never follow a redirect from the token endpoint,
and never retry a refused grant in a loop. In fleet mode (`TokenShare`, proxy/fleet.py) the
tokens live in Redis too and one instance of the fleet refreshes, under a fenced lock.

    OAuthError               one line for `credproxy login`
    CredentialUnavailable    (proxy.errors) what a request gets: 503 credential_unavailable
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import json
import logging
import math
import os
import random
import sys
import time
import webbrowser
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal, Protocol, TextIO
from urllib.parse import quote

import aiohttp
from aiohttp import web

# authlib ships no type information; these helpers are small and stable across 1.x.
from authlib.common.security import generate_token  # type: ignore[import-untyped]
from authlib.oauth2.base import OAuth2Error  # type: ignore[import-untyped]
from authlib.oauth2.rfc6749.parameters import (  # type: ignore[import-untyped]
    parse_authorization_code_response,
    prepare_grant_uri,
)
from authlib.oauth2.rfc7636 import create_s256_code_challenge  # type: ignore[import-untyped]

from proxy.config import OAuthConfig, UpstreamConfig
from proxy.errors import CredentialUnavailable
from proxy.forward import make_ssl_context
from proxy.logs import redactor
from proxy.metrics import Metrics
from proxy.route import OAUTH_CREDENTIAL as OAUTH_CREDENTIAL  # the name in /status and logs
from proxy.secret import Secret
from proxy.store import Store, StoreError

__all__ = [
    "OAUTH_CREDENTIAL",
    "CredentialState",
    "OAuthError",
    "ShareUnavailable",
    "SharedTokens",
    "TokenManager",
    "TokenShare",
    "access_name",
    "login",
    "refresh_name",
]

log = logging.getLogger("credproxy.oauth")

# The OAuth credential's name in /status and access logs (beside the stored API keys' names).

CredentialState = Literal["ok", "refreshing", "needs_login", "missing"]

# Connecting to the token endpoint, and a whole client_credentials call, may take this long.
REQUEST_TIMEOUT: Final = 15.0
# A refresh_token call is given longer: once the server has it, it may have rotated the refresh
# token, and giving up then means presenting the rotated-out token next time (reuse: revoked).
REFRESH_TIMEOUT: Final = 60.0
# How long `close()` lets a refresh in flight finish so its rotated token is saved.
CLOSE_GRACE: Final = 10.0
# Refresh ahead of expiry by a quarter of the lifetime, at most 5 minutes, in the background.
REFRESH_FRACTION: Final = 0.25
REFRESH_MARGIN: Final = 300.0
# Stop handing a token out this close to its expiry (clock skew, request latency).
SKEW_FRACTION: Final = 0.1
EXPIRY_SKEW: Final = 30.0
# Retries after a transient failure: base * 2**n seconds, capped, with jitter.
BACKOFF_BASE: Final = 1.0
BACKOFF_CAP: Final = 60.0
LOGIN_TIMEOUT: Final = 300.0
# The fleet's refresh lock outlives the longest refresh call by this much (slow store, GC).
LOCK_MARGIN: Final = 15.0
# How often an instance waiting for another one's refresh looks at the fleet's record.
SHARE_POLL: Final = 0.25
# While the fleet's state is unreachable, look again this often (a reconnect also wakes us).
SHARE_RETRY: Final = 1.0

_MAX_TOKEN_RESPONSE = 1 << 20
_CLIENT_SECRET_KINDS = ("client_secret", "api_key")  # `keys add` stores api_key by default
_CALLBACK_PATH = "/callback"
# RFC 6749 error and error_description characters: %x20-21 / %x23-5B / %x5D-7E.
_ERROR_CHARS = frozenset(chr(c) for c in range(0x20, 0x7F) if chr(c) not in '"\\')


class OAuthError(Exception):
    """A login that could not be completed; `str()` is one line saying why and what to do."""


class ShareUnavailable(Exception):
    """The fleet's shared OAuth state cannot be read or written now; `str()` says why."""


@dataclass(frozen=True)
class SharedTokens:
    """The fleet's copy of one upstream's tokens: a JSON record, its generation and age."""

    record: Secret  # {"access_token", "expires_at", "issued_at", "scope", "refresh_token"}
    gen: int  # the fencing token of the refresh that wrote it; 0 for a login not yet shared
    issued_at: float  # epoch seconds the access token was issued


class TokenShare(Protocol):
    """Where the instances of a fleet keep one upstream's tokens and refresh lock (Redis).

    Every method raises ShareUnavailable when the shared state cannot be used now.
    """

    def attach(
        self, provider: Callable[[], SharedTokens | None], notify: Callable[[], None]
    ) -> None:
        """`provider()`: this instance's tokens, offered on (re)joining; `notify()`: look again."""
        ...

    async def read(self) -> SharedTokens | None: ...

    async def offer(self, tokens: SharedTokens) -> int | None:
        """Store `tokens` if newer than the fleet's (by generation, then age for a login).

        Returns the generation they got, or None when the fleet's copy stays.
        """
        ...

    async def lock(self, lease: float) -> tuple[int | None, float]:
        """The refresh lock for `lease` seconds: (fence, 0), or (None, seconds to wait)."""
        ...

    async def commit(self, fence: int, tokens: SharedTokens) -> bool:
        """Store tokens a refresh under `fence` got and release the lock; False if fenced out."""
        ...

    async def unlock(self, fence: int) -> None: ...

    async def changed(self, timeout: float) -> None:
        """Return when another instance published tokens, or after `timeout` seconds."""
        ...


def refresh_name(upstream: str) -> str:
    """Store name of the upstream's refresh token (kind oauth_refresh_token)."""
    return f"{upstream}.oauth-refresh"


def access_name(upstream: str) -> str:
    """Store name of the upstream's access token record (kind oauth_access_token).

    Its value is JSON {"access_token", "expires_at", "scope", "issued_at"}, kept so a
    restarted daemon uses the token it had instead of refreshing at once.
    """
    return f"{upstream}.oauth-access"


# --- token endpoint ------------------------------------------------------------------------


class _Transient(Exception):
    """The token endpoint could not be used this time (down, slow, garbled); worth a retry."""


@dataclass(frozen=True)
class _Tokens:
    """One successful token-endpoint answer."""

    access: Secret
    expires_in: float | None
    refresh: Secret | None
    scope: str
    received_at: float


@dataclass(frozen=True)
class _Access:
    """The access token in use, and when it stops being usable."""

    token: Secret
    expires_at: float | None  # None: the server did not say; only a 401 retires it
    issued_at: float
    scope: str

    @classmethod
    def from_tokens(cls, tokens: _Tokens) -> _Access:
        issued = tokens.received_at
        expires = None if tokens.expires_in is None else issued + tokens.expires_in
        return cls(tokens.access, expires, issued, tokens.scope)

    @classmethod
    def from_record(cls, record: Secret) -> _Access | None:
        """Parse the stored JSON record; None if it is not one of ours."""
        try:
            data = json.loads(record.reveal())
        except ValueError:
            return None
        if not isinstance(data, dict):
            return None
        token, expires, issued, scope = (
            data.get(k) for k in ("access_token", "expires_at", "issued_at", "scope")
        )
        if not isinstance(token, str) or not _header_safe(token):
            return None
        if expires is not None and not _is_number(expires):
            return None
        issued = issued if _is_number(issued) else expires
        if issued is None:
            issued = 0.0
        redactor.add(token)
        return cls(
            Secret(token),
            None if expires is None else float(expires),
            float(issued),
            scope if isinstance(scope, str) else "",
        )

    def record(self, gen: int | None = None, refresh: Secret | None = None) -> Secret:
        """The stored JSON; with `gen` the fleet's generation, with `refresh` the refresh token."""
        doc: dict[str, object] = {
            "access_token": self.token.reveal(),
            "expires_at": self.expires_at,
            "scope": self.scope,
            "issued_at": self.issued_at,
        }
        if gen is not None:
            doc["gen"] = gen
        if refresh is not None:
            doc["refresh_token"] = refresh.reveal()
        return Secret(json.dumps(doc, separators=(",", ":")))

    @property
    def _lifetime(self) -> float:
        return 0.0 if self.expires_at is None else max(0.0, self.expires_at - self.issued_at)

    @property
    def refresh_at(self) -> float | None:
        """When the background refresh should replace this token."""
        if self.expires_at is None:
            return None
        return self.expires_at - min(REFRESH_MARGIN, REFRESH_FRACTION * self._lifetime)

    def usable(self, now: float) -> bool:
        if self.expires_at is None:
            return True
        return now < self.expires_at - min(EXPIRY_SKEW, SKEW_FRACTION * self._lifetime)

    def due(self, now: float) -> bool:
        refresh_at = self.refresh_at
        return refresh_at is not None and now >= refresh_at


def _record_gen(record: Secret | None) -> int:
    """The fleet generation kept in a stored access record; 0 when it has none."""
    if record is None:
        return 0
    try:
        data = json.loads(record.reveal())
    except ValueError:
        return 0
    gen = data.get("gen") if isinstance(data, dict) else None
    return gen if isinstance(gen, int) and not isinstance(gen, bool) and gen > 0 else 0


def _shared_refresh(record: Secret) -> Secret | None:
    """The refresh token in the fleet's record, registered with the redactor; None if none."""
    try:
        data = json.loads(record.reveal())
    except ValueError:
        return None
    refresh = data.get("refresh_token") if isinstance(data, dict) else None
    if not isinstance(refresh, str) or not _header_safe(refresh):
        return None
    redactor.add(refresh)
    return Secret(refresh)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _header_safe(value: str) -> bool:
    """A token that can go in a header as is: visible ASCII, no spaces."""
    return bool(value) and len(value) <= 16384 and all("!" <= c <= "~" for c in value)


def _clean(value: object, limit: int = 160) -> str:
    """Server-supplied error text reduced to RFC 6749's character set, short, and redacted."""
    if not isinstance(value, str):
        return ""
    text = "".join(c for c in value if c in _ERROR_CHARS).strip()
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return redactor(text)


def _describe(error: Any) -> str:
    """`invalid_grant (description)` of an authlib OAuth2Error."""
    code = str(getattr(error, "error", None) or "error")
    description = getattr(error, "description", None)
    return f"{code} ({description})" if description else code


def _error_code(error: Any) -> str:
    return str(getattr(error, "error", None) or "")


def _expires_in(value: object) -> float | None:
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    if not _is_number(value):
        return None
    seconds = float(value)  # type: ignore[arg-type]
    return seconds if seconds > 0 else None


def _parse_token_response(status: int, body: bytes, requested_scope: str, now: float) -> _Tokens:
    """Tokens from a 200, authlib's OAuth2Error for a refusal, _Transient for anything else."""
    try:
        data = json.loads(body) if body else None
    except (ValueError, UnicodeDecodeError):
        data = None
    if not isinstance(data, dict):
        data = None
    error = data.get("error") if data is not None else None
    if status == 200 and data is not None and error is None:
        access = data.get("access_token")
        if not isinstance(access, str) or not _header_safe(access):
            raise _Transient("the token endpoint answered without a usable access_token")
        redactor.add(access)
        token_type = data.get("token_type", "Bearer")
        if not isinstance(token_type, str) or token_type.lower() != "bearer":
            raise _Transient(
                f"the token endpoint issued a token of type '{_clean(token_type, 20)}', not Bearer"
            )
        refresh = data.get("refresh_token")
        refresh_secret: Secret | None = None
        if isinstance(refresh, str) and refresh:
            if not _header_safe(refresh):
                raise _Transient("the token endpoint answered with a malformed refresh_token")
            redactor.add(refresh)
            refresh_secret = Secret(refresh)
        scope = data.get("scope")
        return _Tokens(
            access=Secret(access),
            expires_in=_expires_in(data.get("expires_in")),
            refresh=refresh_secret,
            scope=scope if isinstance(scope, str) else requested_scope,
            received_at=now,
        )
    code = _clean(error, 64)
    permanent = 400 <= status < 500 and status not in (408, 429)
    if code and permanent and code not in ("temporarily_unavailable", "server_error"):
        description = _clean(data.get("error_description") if data else None) or None
        raise OAuth2Error(description=description, error=code, status_code=status)
    detail = f" ({code})" if code else ""
    raise _Transient(f"the token endpoint answered HTTP {status}{detail}")


def _new_session(upstream: UpstreamConfig) -> aiohttp.ClientSession:
    """A client for the token endpoint: verified TLS, no proxy from the environment, no cookies."""
    connector = aiohttp.TCPConnector(ssl=make_ssl_context(upstream.ca_bundle), limit=4)
    return aiohttp.ClientSession(
        connector=connector,
        trust_env=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        timeout=aiohttp.ClientTimeout(total=None),
    )


async def _read_bounded(resp: aiohttp.ClientResponse) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_chunked(65536):
        size += len(chunk)
        if size > _MAX_TOKEN_RESPONSE:
            raise _Transient("the token endpoint's answer is too large")
        chunks.append(chunk)
    return b"".join(chunks)


async def _token_request(
    session: aiohttp.ClientSession,
    oauth: OAuthConfig,
    client_secret: Secret | None,
    form: Mapping[str, str],
    *,
    timeout: float,
    connect_timeout: float | None = None,
    clock: Callable[[], float] = time.time,
) -> _Tokens:
    """POST `form` to the token endpoint with the client's authentication; never redirected.

    `timeout` bounds the whole call, `connect_timeout` (default: the same) the connection, the
    one part that is always safe to retry.
    """
    if not oauth.token_url.startswith("https://"):
        raise _Transient("the token_url is not https")
    data = dict(form)
    headers = {"Accept": "application/json"}
    if client_secret is None:
        data["client_id"] = oauth.client_id  # a public client identifies itself only
    elif oauth.token_auth_method == "client_secret_basic":  # noqa: S105 - a method name
        # RFC 6749 section 2.3.1: both parts form-encoded, then Basic.
        pair = f"{quote(oauth.client_id, safe='')}:{quote(client_secret.reveal(), safe='')}"
        headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode("ascii")
    else:
        data["client_id"] = oauth.client_id
        data["client_secret"] = client_secret.reveal()
    try:
        async with session.post(
            oauth.token_url,
            data=data,
            headers=headers,
            allow_redirects=False,
            timeout=aiohttp.ClientTimeout(total=timeout, connect=connect_timeout or timeout),
        ) as resp:
            body = await _read_bounded(resp)
            status = resp.status
    except TimeoutError:
        raise _Transient(f"the token endpoint did not answer within {timeout:g} s") from None
    except aiohttp.ClientConnectorCertificateError:
        raise _Transient(
            "the token endpoint's TLS certificate failed verification (set ca_bundle for a "
            "private CA)"
        ) from None
    except aiohttp.ClientSSLError:
        raise _Transient("TLS with the token endpoint failed") from None
    except aiohttp.ClientError as error:
        raise _Transient(f"cannot reach the token endpoint ({type(error).__name__})") from None
    return _parse_token_response(status, body, " ".join(oauth.scopes), clock())


def _stored(store: Store, name: str | None, kinds: tuple[str, ...]) -> Secret | None:
    """A stored value of one of `kinds`, registered with the redactor; None if absent."""
    if name is None:
        return None
    entry = store.get_entry(name)
    if entry is None or entry[0] not in kinds:
        return None
    redactor.add(entry[1].reveal())
    return entry[1]


# --- the daemon's side -----------------------------------------------------------------------


@dataclass(frozen=True)
class _Snapshot:
    """What the store holds for one upstream's OAuth credential."""

    refresh: Secret | None
    access: Secret | None
    client_secret: Secret | None


@dataclass(frozen=True)
class _Block:
    """Why tokens cannot be had until a person acts (a login, a client secret)."""

    state: Literal["needs_login", "missing"]
    message: str


@dataclass
class _Seen:
    """The store values last read or written, so a reload can tell outside changes from ours."""

    refresh: Secret | None = None
    access: Secret | None = None
    client_secret: Secret | None = None
    loaded: bool = field(default=False)


class TokenManager:
    """Keeps one upstream's OAuth access token valid for the daemon.

    Requests call `access_token()`; in steady state it returns at once while a background
    task refreshes ahead of expiry. However many callers need a new token together, one call
    goes to the token endpoint and the rest wait for it. A rotated refresh token is committed
    to the store before the new access token is handed to anyone. With `shared` (fleet mode)
    that holds across instances: one refreshes under the fleet's lock and writes the tokens to
    the shared record before using them; the others adopt them without calling the endpoint.
    """

    def __init__(
        self,
        upstream_name: str,
        upstream: UpstreamConfig,
        store: Store,
        *,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.time,
        request_timeout: float = REQUEST_TIMEOUT,
        refresh_timeout: float = REFRESH_TIMEOUT,
        backoff_base: float = BACKOFF_BASE,
        backoff_cap: float = BACKOFF_CAP,
        shared: TokenShare | None = None,
    ) -> None:
        """Read the upstream's tokens from the store once (directly: this runs before serving)."""
        if upstream.oauth is None:
            raise ValueError(f"upstream '{upstream_name}' has no oauth block")
        self.upstream_name = upstream_name
        self._upstream = upstream
        self._oauth: OAuthConfig = upstream.oauth
        self._store = store
        self._metrics = metrics
        self._clock = clock
        self._request_timeout = request_timeout
        self._refresh_timeout = max(refresh_timeout, request_timeout)
        self._backoff_base = backoff_base
        self._backoff_cap = backoff_cap
        self._access: _Access | None = None
        self._refresh: Secret | None = None
        self._client_secret: Secret | None = None
        self._seen = _Seen()
        self._unsaved: _Tokens | None = None  # tokens received but not yet committed
        self._block: _Block | None = None
        self._flight: asyncio.Task[_Access] | None = None
        self._failures = 0
        self._retry_at: float | None = None
        self._last_error = ""
        self._dirty = False
        self._closed = False
        self._wake = asyncio.Event()
        self._io = asyncio.Lock()  # store reads and writes, in order, never interleaved
        self._task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._retired: list[aiohttp.ClientSession] = []
        # fleet mode: the shared record, the generation of the tokens in use, what to do next
        self._shared = shared
        self._gen = 0
        self._fleet_dirty = shared is not None  # read the fleet's record before the next use
        self._offer = False  # our tokens are news to the fleet (a login, a first start)
        self._fleet_wait = False  # a refresh waits for the shared state to come back
        self._apply(self._read_store())
        if shared is not None:
            shared.attach(self._shared_tokens, self._fleet_changed)

    def __repr__(self) -> str:
        return f"TokenManager({self.upstream_name!r}, state={self.state!r})"

    # -- what the daemon asks ----------------------------------------------------------------

    @property
    def state(self) -> CredentialState:
        """ok, refreshing, needs_login (run `credproxy login`) or missing (a secret is absent)."""
        blocked = self._blocked(self._clock())
        if blocked is not None:
            return blocked.state
        if self._flight is not None or self._failures or self._unsaved is not None:
            return "refreshing"
        return "ok"

    @property
    def expires_at(self) -> float | None:
        """Epoch seconds when the current access token expires; None if unknown or none."""
        return None if self._access is None else self._access.expires_at

    @property
    def last_error(self) -> str:
        """The last failure, one line without secrets ('' after a success)."""
        return self._last_error

    async def access_token(self) -> Secret:
        """A valid access token; waits for a refresh in flight; CredentialUnavailable if none."""
        await self._reload_if_dirty()
        await self._sync_if_dirty()
        now = self._clock()
        access = self._access
        if access is not None and access.usable(now):
            if access.due(now):
                self._kick(now)  # the background task normally got here first
            return access.token
        return (await self._refreshed(None if access is None else access.token)).token

    async def after_unauthorized(self, used: Secret) -> Secret:
        """The upstream answered 401 to `used`: a newer token, refreshing once if need be."""
        await self._reload_if_dirty()
        now = self._clock()
        current = self._access
        if current is not None and current.token != used and current.usable(now):
            return current.token
        if current is not None and current.token == used:
            self._access = None  # the upstream has spoken: never hand this one out again
        if self._flight is not None:
            access = await self._join()
            if access.token != used:
                return access.token
        return (await self._refreshed(used)).token

    def store_changed(self) -> None:
        """The store's generation moved: reload before the next use (a login clears needs_login)."""
        self._dirty = True
        self._wake.set()

    def update_config(self, upstream: UpstreamConfig) -> None:
        """A reload changed the upstream; tokens are kept, a block is lifted to be re-tried."""
        if upstream.oauth is None:
            raise ValueError(f"upstream '{self.upstream_name}' no longer has an oauth block")
        old_upstream, old = self._upstream, self._oauth
        self._upstream, self._oauth = upstream, upstream.oauth
        endpoint_moved = (old_upstream.ca_bundle, old.token_url) != (
            upstream.ca_bundle,
            upstream.oauth.token_url,
        )
        if endpoint_moved and self._session is not None:
            self._retired.append(self._session)
            self._session = None
        if upstream.oauth != old:
            self._block = None
            self._failures = 0
            self._retry_at = None
            self._dirty = True  # the client secret may have another name now
            self._wake.set()

    def start(self) -> None:
        """Run the background refresher (needs a running event loop)."""
        if self._task is None and not self._closed:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"oauth-refresh-{self.upstream_name}"
            )

    async def close(self) -> None:
        """Stop the refresher; a refresh in flight is let finish so a rotated token is not lost."""
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        flight = self._flight
        if flight is not None:
            try:
                with contextlib.suppress(CredentialUnavailable):
                    await asyncio.wait_for(flight, CLOSE_GRACE)
            except TimeoutError:
                log.warning(
                    "a token refresh for upstream %s was still in flight at shutdown and was "
                    "abandoned; if the server rotated the refresh token, run `credproxy login %s`",
                    self.upstream_name,
                    self.upstream_name,
                )
        sessions = [*self._retired, *([self._session] if self._session else [])]
        self._retired, self._session = [], None
        for session in sessions:
            await session.close()

    # -- store -----------------------------------------------------------------------------------

    def _read_store(self) -> _Snapshot:
        name, store = self.upstream_name, self._store
        return _Snapshot(
            refresh=_stored(store, refresh_name(name), ("oauth_refresh_token",)),
            access=_stored(store, access_name(name), ("oauth_access_token",)),
            client_secret=_stored(store, self._oauth.client_secret, _CLIENT_SECRET_KINDS),
        )

    def _apply(self, snap: _Snapshot) -> None:
        """Adopt what changed in the store since we last read or wrote it."""
        seen, first = self._seen, not self._seen.loaded
        seen.loaded = True
        if first or snap.refresh != seen.refresh:
            seen.refresh = self._refresh = snap.refresh
            self._unsaved = None  # a login (or another writer) supersedes what we could not save
            if self._block is not None and self._block.state == "needs_login":
                self._lift_block()
            self._news_for_fleet()
        if first or snap.access != seen.access:
            seen.access = snap.access
            parsed = None if snap.access is None else _Access.from_record(snap.access)
            if snap.access is not None and parsed is None:
                log.warning(
                    "the stored OAuth access token of upstream %s is unreadable; ignoring it",
                    self.upstream_name,
                )
            self._access = parsed
            self._gen = _record_gen(snap.access)
            self._news_for_fleet()
        if first or snap.client_secret != seen.client_secret:
            seen.client_secret = self._client_secret = snap.client_secret
            if self._block is not None and self._block.state == "missing":
                self._lift_block()

    def _lift_block(self) -> None:
        self._block = None
        self._failures = 0
        self._retry_at = None
        self._wake.set()

    async def _reload(self) -> None:
        async with self._io:
            try:
                snap = await asyncio.to_thread(self._read_store)
            except StoreError as error:
                log.warning(
                    "cannot reload OAuth tokens of upstream %s: %s", self.upstream_name, error
                )
                return
            self._apply(snap)

    async def _reload_if_dirty(self) -> None:
        if self._dirty:
            self._dirty = False
            await self._reload()

    def _write_tokens(self, tokens: _Tokens, access: _Access) -> None:
        """The refresh token first, then the access record: each a durable transaction."""
        self._write_pair(tokens.refresh, access)

    def _write_pair(self, refresh: Secret | None, access: _Access) -> None:
        name = self.upstream_name
        if refresh is not None and refresh != self._seen.refresh:
            self._store.put(refresh_name(name), "oauth_refresh_token", refresh)
            self._seen.refresh = refresh
        gen = self._gen if self._shared is not None and self._gen > 0 else None
        record = access.record(gen)
        self._store.put(access_name(name), "oauth_access_token", record)
        self._seen.access = record

    async def _commit(self, tokens: _Tokens) -> _Access:
        access = _Access.from_tokens(tokens)
        async with self._io:
            await asyncio.to_thread(self._write_tokens, tokens, access)
        # Only now, with the new refresh token durable, does anyone see the new access token.
        if tokens.refresh is not None:
            self._refresh = tokens.refresh
        self._access = access
        self._unsaved = None
        return access

    # -- the fleet's record ----------------------------------------------------------------------

    def _news_for_fleet(self) -> None:
        """Tokens read from the store (a start, a login) are offered to the fleet."""
        if self._shared is not None:
            self._offer = True
            self._fleet_dirty = True

    def _shared_tokens(self) -> SharedTokens | None:
        """This instance's tokens as the fleet keeps them; None without an access token."""
        access = self._access
        if access is None:
            return None
        return SharedTokens(access.record(refresh=self._refresh), self._gen, access.issued_at)

    def _fleet_changed(self) -> None:
        """Another instance published tokens, or the shared state is back: look again."""
        self._fleet_dirty = True
        if self._fleet_wait:
            self._fleet_wait = False
            self._failures = 0
            self._retry_at = None
        self._wake.set()

    async def _sync_if_dirty(self) -> None:
        if self._shared is not None and self._fleet_dirty:
            with contextlib.suppress(ShareUnavailable):
                await self._sync_shared(self._shared)

    async def _sync_shared(self, shared: TokenShare) -> None:
        """Offer our news to the fleet, then adopt the fleet's tokens if they are newer."""
        self._fleet_dirty = False
        try:
            if self._offer:
                await self._offer_ours(shared)
            theirs = await shared.read()
            if theirs is not None and theirs.gen < self._gen:
                # The fleet lost the newer tokens we hold (Redis restarted without its data).
                await self._offer_ours(shared)
                theirs = await shared.read()
        except ShareUnavailable:
            self._fleet_dirty = True
            raise
        if theirs is not None and theirs.gen > self._gen:
            await self._adopt(theirs)

    async def _offer_ours(self, shared: TokenShare) -> None:
        self._offer = False
        mine = self._shared_tokens()
        if mine is None:
            return
        gen = await shared.offer(mine)
        if gen is not None and gen != self._gen:
            self._gen = gen
            access = self._access
            if access is not None:
                await self._mirror(self._refresh, access)

    async def _adopt(self, theirs: SharedTokens) -> None:
        """Use the tokens another instance got (they are in the fleet's record already)."""
        access = _Access.from_record(theirs.record)
        if access is None:
            log.warning(
                "the fleet's OAuth record of upstream %s is unreadable; ignoring it",
                self.upstream_name,
            )
            return
        refresh = _shared_refresh(theirs.record)
        self._gen = theirs.gen
        self._access = access
        if refresh is not None:
            self._refresh = refresh
        self._unsaved = None
        if self._block is not None and self._block.state == "needs_login" and refresh is not None:
            self._lift_block()
        self._failures, self._retry_at, self._last_error = 0, None, ""
        log.debug(
            "OAuth token of upstream %s taken from the fleet (generation %d)",
            self.upstream_name,
            theirs.gen,
        )
        await self._mirror(refresh, access)

    async def _mirror(self, refresh: Secret | None, access: _Access) -> None:
        """Keep the local store in step with the fleet, so a restart without Redis has them."""
        try:
            async with self._io:
                await asyncio.to_thread(self._write_pair, refresh, access)
        except StoreError as error:
            log.warning(
                "cannot keep a local copy of the fleet's OAuth tokens of upstream %s: %s",
                self.upstream_name,
                error,
            )

    async def _fly_shared(self, shared: TokenShare, stale: Secret | None) -> _Access:
        """The fleet's refresh: adopt another instance's result, or refresh under the lock."""
        try:
            await self._sync_shared(shared)
        except ShareUnavailable as error:
            return await self._fly_degraded(stale, str(error))
        fresh = self._fresh(stale)
        if fresh is not None:
            return fresh
        blocked = self._blocked(self._clock())
        if blocked is not None:
            raise CredentialUnavailable(blocked.message)
        lease = self._refresh_timeout + self._request_timeout + LOCK_MARGIN
        give_up = self._clock() + lease + LOCK_MARGIN
        while True:
            try:
                fence, wait = await shared.lock(lease)
                if fence is not None:
                    break
                # Another instance refreshes (or the fleet settles after a Redis restart).
                await shared.changed(min(max(wait, 0.01), SHARE_POLL))
                await self._sync_shared(shared)
            except ShareUnavailable as error:
                return await self._fly_degraded(stale, str(error))
            fresh = self._fresh(stale, due_ok=True)
            if fresh is not None:
                return fresh
            if self._clock() > give_up:
                raise CredentialUnavailable(
                    self._retry_later("another instance of the fleet holds the refresh lock")
                )
        return await self._refresh_locked(shared, fence, stale)

    def _fresh(self, stale: Secret | None, *, due_ok: bool = False) -> _Access | None:
        """The token in use if it is another than `stale`, usable, and not (or no matter) due."""
        now, current = self._clock(), self._access
        if current is None or current.token == stale or not current.usable(now):
            return None
        if current.due(now) and not due_ok:
            return None
        self._failures, self._retry_at, self._last_error = 0, None, ""
        return current

    async def _refresh_locked(
        self, shared: TokenShare, fence: int, stale: Secret | None
    ) -> _Access:
        """Holding the fleet's lock: refresh, write the fleet's record, then use the tokens."""
        held = True
        try:
            try:
                await self._sync_shared(shared)  # someone may have finished just before
            except ShareUnavailable as error:
                return await self._fly_degraded(stale, str(error))
            fresh = self._fresh(stale)
            if fresh is not None:
                return fresh
            blocked = self._blocked(self._clock())
            if blocked is not None:
                raise CredentialUnavailable(blocked.message)
            tokens = await self._call_endpoint()
            self._count("ok")
            access = _Access.from_tokens(tokens)
            refresh = tokens.refresh or self._refresh
            record = SharedTokens(access.record(refresh=refresh), fence, access.issued_at)
            try:
                committed = await shared.commit(fence, record)
                held = False
            except ShareUnavailable as error:
                # The rotated refresh token goes to the local store below and to the fleet
                # when it is back (offered with this fence); no one else can refresh meanwhile.
                committed = True
                self._offer = True
                log.warning(
                    "OAuth tokens of upstream %s were renewed but could not be written to the "
                    "fleet's shared state (%s); kept in the local store, shared when it is back",
                    self.upstream_name,
                    error,
                )
            if not committed:
                log.error(
                    "OAuth refresh of upstream %s was fenced out: another instance wrote newer "
                    "tokens while this one held an expired lock; using the fleet's",
                    self.upstream_name,
                )
                with contextlib.suppress(ShareUnavailable):
                    await self._sync_shared(shared)
                fresh = self._fresh(stale, due_ok=True)
                if fresh is None:
                    raise CredentialUnavailable(
                        self._retry_later("the fleet's refresh was fenced out")
                    )
                return fresh
            self._gen = fence
            self._unsaved = tokens
            try:
                await self._commit(tokens)
            except StoreError as error:
                log.warning(
                    "cannot keep a local copy of the renewed OAuth tokens of upstream %s: %s",
                    self.upstream_name,
                    error,
                )
                self._access, self._unsaved = access, None
                if tokens.refresh is not None:
                    self._refresh = tokens.refresh
            self._succeeded(access)
            return access
        except _Transient as error:
            self._count("error")
            raise CredentialUnavailable(self._retry_later(str(error))) from None
        except OAuth2Error as error:
            raise CredentialUnavailable(self._refused(error)) from None
        finally:
            if held:
                with contextlib.suppress(ShareUnavailable):
                    await shared.unlock(fence)

    async def _fly_degraded(self, stale: Secret | None, reason: str) -> _Access:
        """The fleet's state is unreachable: refresh alone only where no token can be reused."""
        if self._oauth.grant == "client_credentials":
            return await self._fly_alone(stale)
        self._fleet_wait = True
        current = self._access
        if current is not None and current.token != stale and current.usable(self._clock()):
            self._retry_at = self._clock() + SHARE_RETRY  # the token still works: try later
            return current
        raise CredentialUnavailable(
            self._retry_later(
                f"the fleet's shared state is unreachable ({reason}); a refresh waits for it "
                "so that no instance presents a rotated-out refresh token"
            )
        )

    # -- refreshing --------------------------------------------------------------------------

    def _blocked(self, now: float) -> _Block | None:
        if self._block is not None:
            return self._block
        name, oauth = self.upstream_name, self._oauth
        if oauth.client_secret is not None and self._client_secret is None:
            return _Block(
                "missing",
                f"upstream '{name}': no client secret named '{oauth.client_secret}' in the "
                f"store; add it with `credproxy keys add {oauth.client_secret} --kind "
                "client_secret`",
            )
        no_refresh = self._refresh is None and self._unsaved is None
        if oauth.grant == "authorization_code" and no_refresh:
            access = self._access
            if access is None or not access.usable(now):
                what = "has no OAuth tokens" if access is None else "has no OAuth refresh token"
                return _Block(
                    "needs_login", f"upstream '{name}' {what}: run `credproxy login {name}`"
                )
        return None

    def _kick(self, now: float) -> None:
        """Start a background refresh unless one runs, waits for its backoff or cannot run."""
        if self._flight is not None or self._closed or self._blocked(now) is not None:
            return
        if self._retry_at is None or now >= self._retry_at:
            current = self._access
            self._start_flight(None if current is None else current.token)

    async def _refreshed(self, stale: Secret | None) -> _Access:
        """Join the refresh in flight, or start one; CredentialUnavailable when it can't be had."""
        if self._flight is None:
            now = self._clock()
            blocked = self._blocked(now)
            if blocked is not None:
                raise CredentialUnavailable(blocked.message)
            if self._closed:
                raise CredentialUnavailable(f"upstream '{self.upstream_name}': shutting down")
            if self._retry_at is not None and now < self._retry_at:
                wait = math.ceil(self._retry_at - now)
                raise CredentialUnavailable(
                    f"upstream '{self.upstream_name}': no valid OAuth token; {self._last_error}; "
                    f"retrying in {wait} s"
                )
            self._start_flight(stale)
        return await self._join()

    def _start_flight(self, stale: Secret | None) -> None:
        flight = asyncio.get_running_loop().create_task(
            self._fly(stale), name=f"oauth-token-{self.upstream_name}"
        )
        self._flight = flight
        flight.add_done_callback(self._landed)

    def _landed(self, flight: asyncio.Task[_Access]) -> None:
        if self._flight is flight:
            self._flight = None
        if not flight.cancelled():
            flight.exception()  # retrieved here; waiters got their own copy
        self._wake.set()

    async def _join(self) -> _Access:
        flight = self._flight
        assert flight is not None
        try:
            return await asyncio.shield(flight)
        except CredentialUnavailable as error:
            raise CredentialUnavailable(error.message) from None

    async def _fly(self, stale: Secret | None) -> _Access:
        """The one refresh in flight: tokens from the endpoint, committed, then installed."""
        for session in self._retired:
            await session.close()
        self._retired.clear()
        await self._reload()  # a login or an outside writer may already have moved on
        if self._shared is not None:
            return await self._fly_shared(self._shared, stale)
        return await self._fly_alone(stale)

    async def _fly_alone(self, stale: Secret | None) -> _Access:
        """A refresh by this instance alone: the only one, or a fleet's with client credentials."""
        now = self._clock()
        current = self._access
        if (
            current is not None
            and current.token != stale
            and current.usable(now)
            and not current.due(now)
        ):
            self._failures, self._retry_at, self._last_error = 0, None, ""
            return current
        blocked = self._blocked(now)
        if blocked is not None:
            raise CredentialUnavailable(blocked.message)
        try:
            for _ in range(2):  # a second round only if unsaved tokens expired meanwhile
                if self._unsaved is None:
                    self._unsaved = await self._call_endpoint()
                    self._count("ok")
                access = await self._commit(self._unsaved)
                if access.usable(self._clock()):
                    break
            self._succeeded(access)
            return access
        except _Transient as error:
            self._count("error")
            raise CredentialUnavailable(self._retry_later(str(error))) from None
        except StoreError as error:
            # The new refresh token lives only in memory until a retry commits it.
            raise CredentialUnavailable(self._retry_later(f"cannot save tokens: {error}")) from None
        except OAuth2Error as error:
            raise CredentialUnavailable(self._refused(error)) from None

    async def _call_endpoint(self) -> _Tokens:
        oauth = self._oauth
        form: dict[str, str]
        timeout = self._request_timeout
        if oauth.grant == "client_credentials":
            form = {"grant_type": "client_credentials"}
            if oauth.scopes:
                form["scope"] = " ".join(oauth.scopes)
        else:
            refresh = self._refresh
            assert refresh is not None  # _blocked() said so
            form = {"grant_type": "refresh_token", "refresh_token": refresh.reveal()}
            timeout = self._refresh_timeout
        if self._session is None:
            self._session = _new_session(self._upstream)
        return await _token_request(
            self._session,
            oauth,
            self._client_secret,
            form,
            timeout=timeout,
            connect_timeout=self._request_timeout,
            clock=self._clock,
        )

    def _succeeded(self, access: _Access) -> None:
        recovered = self._failures > 0
        self._failures = 0
        self._retry_at = None
        self._last_error = ""
        lifetime = (
            "unknown"
            if access.expires_at is None
            else f"{access.expires_at - access.issued_at:.0f} s"
        )
        level = logging.INFO if recovered else logging.DEBUG
        log.log(
            level, "OAuth token renewed for upstream %s (lifetime %s)", self.upstream_name, lifetime
        )

    def _retry_later(self, reason: str) -> str:
        self._failures += 1
        delay = min(self._backoff_cap, self._backoff_base * 2 ** (self._failures - 1))
        delay = delay / 2 + random.uniform(0, delay / 2)  # noqa: S311 - jitter, not a secret
        self._retry_at = self._clock() + delay
        self._last_error = reason
        valid = self._access is not None and self._access.usable(self._clock())
        log.warning(
            "OAuth token refresh for upstream %s failed (attempt %d): %s; retrying in %.2f s%s",
            self.upstream_name,
            self._failures,
            reason,
            delay,
            " (the current token stays in use meanwhile)" if valid else "",
        )
        return f"upstream '{self.upstream_name}': cannot renew the OAuth token: {reason}"

    def _refused(self, error: Any) -> str:
        """A refusal is final until a login or a changed secret: block, log once, say the fix."""
        name, oauth = self.upstream_name, self._oauth
        code = _error_code(error)
        why = _describe(error)
        if code in ("invalid_client", "unauthorized_client") or oauth.grant == "client_credentials":
            secret = oauth.client_secret or "the client secret"
            block = _Block(
                "missing",
                f"upstream '{name}': the token endpoint refused client '{oauth.client_id}': {why}; "
                f"check the client_id and the client secret '{secret}' "
                f"(`credproxy keys add {secret} --kind client_secret`)",
            )
        else:
            block = _Block(
                "needs_login",
                f"upstream '{name}': the OAuth grant is no longer valid: {why}; "
                f"run `credproxy login {name}`",
            )
        self._block = block
        self._failures = 0
        self._retry_at = None
        self._last_error = block.message
        self._count("invalid_grant" if code == "invalid_grant" else "rejected")
        log.error("%s", block.message)
        return block.message

    def _count(self, result: str) -> None:
        if self._metrics is not None:
            label = f"{self.upstream_name}.{OAUTH_CREDENTIAL}"
            self._metrics.token_refreshes.labels(label, result).inc()

    # -- the background task -----------------------------------------------------------------

    def _next_wake(self, now: float) -> float | None:
        """Seconds until the next refresh is due; None: nothing to do until something changes."""
        if self._flight is not None or self._blocked(now) is not None:
            return None
        if self._retry_at is not None:
            return max(0.0, self._retry_at - now)
        access = self._access
        if access is None or self._unsaved is not None:
            return 0.0
        refresh_at = access.refresh_at
        if refresh_at is None and access.usable(now):
            return None
        return max(0.0, (refresh_at or now) - now)

    async def _run(self) -> None:
        while True:
            try:
                self._wake.clear()
                await self._reload_if_dirty()
                await self._sync_if_dirty()
                delay = self._next_wake(self._clock())
                if delay is not None and delay <= 0:
                    self._kick(self._clock())
                    if self._flight is None:
                        await asyncio.sleep(0.05)  # nothing could start: never spin
                    else:
                        with contextlib.suppress(CredentialUnavailable):
                            await self._join()
                    continue
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), delay)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception(
                    "OAuth refresher of upstream %s failed; restarting it", self.upstream_name
                )
                await asyncio.sleep(1)


# --- `credproxy login` ---------------------------------------------------------------------


@dataclass
class _Callback:
    """The loopback redirect's outcome, handed from the web handler to `login`."""

    state: str
    code: asyncio.Future[str]
    done: asyncio.Future[str]  # the page the browser gets once the login has finished


def _callback_app(callback: _Callback) -> web.Application:
    def page(status: int, text: str) -> web.Response:
        headers = {"Cache-Control": "no-store", "Referrer-Policy": "no-referrer"}
        return web.Response(status=status, text=f"credproxy: {text}\n", headers=headers)

    async def handle(request: web.Request) -> web.Response:
        if callback.code.done():
            return page(409, "this login has already finished; you can close this window.")
        query = request.query
        state_ok = hmac.compare_digest(query.get("state", "").encode(), callback.state.encode())
        if "error" in query:
            error = _clean(query.get("error"), 64) or "error"
            description = _clean(query.get("error_description"))
            detail = f"{error} ({description})" if description else error
            if not state_ok:
                message = "the redirect carried a wrong or missing state (a forged request?)"
            else:
                message = f"the authorization server refused: {detail}"
            callback.code.set_exception(OAuthError(f"login failed: {message}; nothing was stored"))
            return page(400, f"login failed: {message}.")
        try:
            # Only the query matters; the Host header is the caller's and is not trusted.
            redirected = f"http://127.0.0.1/callback?{request.query_string}"
            params = parse_authorization_code_response(redirected, state=callback.state)
        except OAuth2Error as error:
            if _error_code(error) == "missing_code":
                message = "the redirect carried no authorization code"
            else:
                message = "the redirect carried a wrong or missing state (a forged request?)"
            callback.code.set_exception(OAuthError(f"login failed: {message}; nothing was stored"))
            return page(400, f"login failed: {message}.")
        code = str(params["code"])
        redactor.add(code)
        callback.code.set_result(code)
        try:
            text = await asyncio.wait_for(asyncio.shield(callback.done), REQUEST_TIMEOUT + 10)
        except TimeoutError:
            text = "the login is taking too long; see the terminal."
        return page(200, text)

    app = web.Application()
    app.router.add_get(_CALLBACK_PATH, handle)
    return app


def _open_browser(url: str) -> bool:
    """Open `url` in a graphical browser (or $BROWSER); never take over the terminal."""
    try:
        browser = webbrowser.get()
    except webbrowser.Error:
        return False
    if type(browser) is webbrowser.GenericBrowser and not os.environ.get("BROWSER"):
        return False  # a console browser such as lynx would fight the prompt for the terminal
    return bool(browser.open(url))


def _login_client_secret(store: Store, upstream_name: str, oauth: OAuthConfig) -> Secret | None:
    if oauth.client_secret is None:
        return None
    secret = _stored(store, oauth.client_secret, _CLIENT_SECRET_KINDS)
    if secret is None:
        raise OAuthError(
            f"no client secret named '{oauth.client_secret}' in the store (named by "
            f"upstreams.{upstream_name}.oauth.client_secret): add it with "
            f"`credproxy keys add {oauth.client_secret} --kind client_secret`"
        )
    return secret


def _save_login(store: Store, upstream_name: str, tokens: _Tokens) -> None:
    """The refresh token (or its absence), then the access record."""
    if tokens.refresh is not None:
        store.put(refresh_name(upstream_name), "oauth_refresh_token", tokens.refresh)
    else:
        store.remove(refresh_name(upstream_name))  # an older grant's token must not linger
    store.put(
        access_name(upstream_name), "oauth_access_token", _Access.from_tokens(tokens).record()
    )


async def login(
    upstream_name: str,
    upstream: UpstreamConfig,
    store: Store,
    *,
    open_browser: bool,
    out: TextIO = sys.stdout,
    timeout: float = LOGIN_TIMEOUT,
    notes: TextIO | None = None,
) -> None:
    """`credproxy login`: authorization code + PKCE via http://127.0.0.1:<port>/callback.

    Prints the authorize URL alone on a line (and opens a browser when asked and one exists),
    waits up to `timeout` seconds for the redirect, exchanges the code and stores the tokens.
    Anything else (wrong state, error=, time-out, refused code) raises OAuthError and stores
    nothing.
    """
    oauth = upstream.oauth
    if oauth is None:
        raise OAuthError(f"upstream '{upstream_name}' has no oauth block in the config")
    if oauth.grant != "authorization_code" or oauth.authorize_url is None:
        raise OAuthError(
            f"upstream '{upstream_name}' uses grant {oauth.grant}: the daemon fetches its tokens "
            "itself; there is nothing to log in to"
        )
    client_secret = await asyncio.to_thread(_login_client_secret, store, upstream_name, oauth)
    redirect_uri = f"http://127.0.0.1:{oauth.redirect_port}{_CALLBACK_PATH}"
    state = str(generate_token(32))
    verifier = str(generate_token(64))  # RFC 7636: 43-128 unreserved characters
    redactor.add(verifier)
    url = str(
        prepare_grant_uri(
            oauth.authorize_url,
            oauth.client_id,
            "code",
            redirect_uri=redirect_uri,
            scope=" ".join(oauth.scopes) or None,
            state=state,
            code_challenge=str(create_s256_code_challenge(verifier)),
            code_challenge_method="S256",
        )
    )
    loop = asyncio.get_running_loop()
    callback = _Callback(state, loop.create_future(), loop.create_future())
    runner = web.AppRunner(_callback_app(callback), access_log=None, shutdown_timeout=2)
    await runner.setup()
    try:
        try:
            await web.TCPSite(runner, "127.0.0.1", oauth.redirect_port).start()
        except OSError as error:
            raise OAuthError(
                f"cannot listen on 127.0.0.1:{oauth.redirect_port} for the login redirect "
                f"({error.strerror or type(error).__name__}): free the port or change "
                f"upstreams.{upstream_name}.oauth.redirect_port"
            ) from None
        await _authorize(
            callback, url, redirect_uri, upstream_name, open_browser, out, notes or out, timeout
        )
        tokens = await _exchange(
            upstream, client_secret, callback.code.result(), redirect_uri, verifier, upstream_name
        )
        try:
            await asyncio.to_thread(_save_login, store, upstream_name, tokens)
        except StoreError as error:
            raise OAuthError(
                f"the login succeeded but the tokens could not be stored: {error}"
            ) from None
        callback.done.set_result(
            f"logged in to upstream '{upstream_name}'; you can close this window."
        )
        lifetime = (
            ""
            if tokens.expires_in is None
            else f"; the access token lasts {tokens.expires_in:.0f} s"
        )
        print(
            f"Logged in: tokens for upstream '{upstream_name}' stored (scope: {tokens.scope or 'default'}{lifetime}).",
            file=notes or out,
            flush=True,
        )
        if tokens.refresh is None:
            print(
                "The server issued no refresh token: run `credproxy login` again when the access token expires.",
                file=notes or out,
                flush=True,
            )
    except BaseException:
        if not callback.done.done():
            callback.done.set_result("login failed; see the terminal for why.")
        raise
    finally:
        await runner.cleanup()


async def _authorize(
    callback: _Callback,
    url: str,
    redirect_uri: str,
    upstream_name: str,
    open_browser: bool,
    out: TextIO,
    notes: TextIO,
    timeout: float,
) -> None:
    """Show the URL alone on a line of `out` (explanations go to `notes`), then wait."""
    if open_browser:
        print(
            f"Opening a browser to authorize credproxy for upstream '{upstream_name}'. If none opens, visit:",
            file=notes,
        )
    else:
        print(
            f"To authorize credproxy for upstream '{upstream_name}', open this URL in a browser:",
            file=notes,
            flush=True,
        )
    print(url, file=out, flush=True)
    print(
        f"Waiting for the redirect to {redirect_uri} (up to {timeout:g} s)...",
        file=notes,
        flush=True,
    )
    if open_browser:
        opener = asyncio.get_running_loop().run_in_executor(None, _open_browser, url)
        opener.add_done_callback(lambda f: f.cancelled() or f.exception())
    try:
        await asyncio.wait_for(asyncio.shield(callback.code), timeout)
    except TimeoutError:
        raise OAuthError(
            f"login timed out: no redirect reached {redirect_uri} within {timeout:g} s; nothing "
            f"was stored; run `credproxy login {upstream_name}` again"
        ) from None


async def _exchange(
    upstream: UpstreamConfig,
    client_secret: Secret | None,
    code: str,
    redirect_uri: str,
    verifier: str,
    upstream_name: str,
) -> _Tokens:
    oauth = upstream.oauth
    assert oauth is not None
    form = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": redirect_uri,
        "code_verifier": verifier,
    }
    try:
        async with _new_session(upstream) as session:
            return await _token_request(
                session,
                oauth,
                client_secret,
                form,
                timeout=REFRESH_TIMEOUT,
                connect_timeout=REQUEST_TIMEOUT,
            )
    except OAuth2Error as error:
        raise OAuthError(
            f"login failed: the token endpoint refused the authorization code: "
            f"{_describe(error)}; nothing was stored"
        ) from None
    except _Transient as error:
        raise OAuthError(
            f"login failed: {error}; nothing was stored; run `credproxy login {upstream_name}` again"
        ) from None
