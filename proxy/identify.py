"""Which app is calling: its local app token, its source address, its peer uid.

Apps present a `cpx_` token as `Authorization: Bearer …` or in
`X-Credproxy-App-Token`. Only hashes of tokens are ever held (SHA-256 in the
store and config, a BLAKE2s fingerprint in the pipeline's in-memory verdicts), and
a token is looked up by its hash, so neither the comparison nor the table reveals
through timing which tokens exist. Tokens are read from headers only, never
from a query string or cookie.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from ipaddress import IPv6Address, ip_address

from aiohttp import hdrs
from multidict import CIMultiDictProxy, istr

from .config import AppConfig
from .errors import Forbidden, Unauthorized

TOKEN_HEADER = "X-Credproxy-App-Token"  # noqa: S105 - a header name
TOKEN_PREFIX = "cpx_"  # noqa: S105 - the public token prefix
TOKEN_FIELD = istr(TOKEN_HEADER)  # look-ups by istr skip lower-casing the name
ANONYMOUS = "anonymous"


def new_app_token() -> str:
    """A fresh app token: `cpx_` + 32 random bytes, URL-safe base64 (43 characters)."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def token_key(token: str) -> bytes:
    """A token's fingerprint for in-memory tables (the pipeline's verdicts): BLAKE2s-256.

    Never stored and never compared with `token_hash`; BLAKE2s because CPython computes it
    itself, which costs a request less than a SHA-256 through OpenSSL.
    """
    return hashlib.blake2s(token.encode()).digest()


def presented_token(headers: CIMultiDictProxy[str]) -> str | None:
    """The app token the request carries, if any (the dedicated header wins)."""
    if TOKEN_FIELD in headers:
        values = headers.getall(TOKEN_FIELD)
        if len(values) > 1:
            raise Unauthorized(f"more than one {TOKEN_HEADER} header")
        return values[0].strip()
    auth = headers.getall(hdrs.AUTHORIZATION, ())
    if len(auth) == 1:
        scheme, _, value = auth[0].strip().partition(" ")
        if scheme.lower() == "bearer" and value.strip().startswith(TOKEN_PREFIX):
            return value.strip()
    return None


@dataclass(frozen=True, slots=True)
class Caller:
    """The app a request was identified as."""

    name: str
    app: AppConfig


def identify(
    headers: CIMultiDictProxy[str],
    remote: str | None,
    apps: Mapping[str, AppConfig],
    tokens: Mapping[str, str],
    peer_uid: int | None = None,
    more_tokens: Mapping[str, str] | None = None,
) -> Caller:
    """Find the calling app or raise Unauthorized / Forbidden.

    `tokens` and then `more_tokens` map token hash -> app name (the config's hashes
    and the store's).
    """
    token = presented_token(headers)
    if token is None:
        app = apps.get(ANONYMOUS)
        if app is None:
            raise Unauthorized(
                "no app token: send 'Authorization: Bearer cpx_…' or "
                f"'{TOKEN_HEADER}' (create one with `credproxy apps token APP`)"
            )
        caller = Caller(ANONYMOUS, app)
    else:
        digest = token_hash(token)
        name = tokens.get(digest)
        if name is None and more_tokens is not None:
            name = more_tokens.get(digest)
        app = apps.get(name) if name is not None else None
        if name is None or app is None:
            raise Unauthorized("unknown or revoked app token")
        caller = Caller(name, app)
    _check_source(caller, remote, peer_uid)
    return caller


def _check_source(caller: Caller, remote: str | None, peer_uid: int | None) -> None:
    """`peer_uid` is set exactly when the request came over a unix socket."""
    app = caller.app
    if app.peer_uid is not None and peer_uid != app.peer_uid:
        # An app bound to a uid is reachable only over a unix socket, from that uid.
        where = "over TCP" if peer_uid is None else f"from uid {peer_uid}"
        raise Forbidden(f"app '{caller.name}' is not allowed {where}")
    if peer_uid is not None or not app.allow_from:
        # Unix-socket peers have no address; they are bound by peer uid instead.
        return
    if not remote:
        raise Forbidden(f"app '{caller.name}' is not allowed from an unknown address")
    try:
        addr = ip_address(remote.split("%", 1)[0])
    except ValueError:
        raise Forbidden(f"app '{caller.name}' is not allowed from this address") from None
    if isinstance(addr, IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    if not any(addr in net for net in app.allow_from):
        raise Forbidden(f"app '{caller.name}' is not allowed from {addr}")
