"""Where a request goes: which upstream, which path, which credential.

The destination is always a configured origin plus a checked path; nothing in
the request (authority, Host, absolute URI, path tricks) can name another host.
The credential chosen is the least privileged one that covers the needed scope.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from yarl import URL

from .authorize import covers
from .config import SCOPES as _SCOPES
from .config import CredentialRef, UpstreamConfig
from .errors import BadRequest, CredentialUnavailable, Forbidden, UnknownUpstream
from .paths import normalise_path, within

OAUTH_CREDENTIAL = "oauth"  # the name an upstream's OAuth grant goes by in /status and logs
MAIN = ""  # listener mode of the main listener; a dedicated listener's mode is its upstream name


@dataclass(frozen=True, slots=True)
class Target:
    """A resolved destination: the upstream and the exact path and query to send."""

    upstream_name: str
    upstream: UpstreamConfig
    path: str  # normalised, as checked and as sent
    query: str  # raw query string, without "?"

    def url(self) -> URL:
        text = _parts(self.upstream)[0] + self.path + (f"?{self.query}" if self.query else "")
        return URL(text, encoded=True)


# id(upstream) -> (upstream, origin, base_path): the config's computed properties (each parses
# base_url) taken once per config object, not on every request. The object is kept in the
# entry, so an id reused by a later object never matches.
_PARTS: dict[int, tuple[UpstreamConfig, str, str]] = {}


def _parts(upstream: UpstreamConfig) -> tuple[str, str]:
    entry = _PARTS.get(id(upstream))
    if entry is None or entry[0] is not upstream:
        if len(_PARTS) >= 256:  # old config versions' upstreams
            _PARTS.clear()
        entry = _PARTS[id(upstream)] = (upstream, upstream.origin, upstream.base_path)
    return entry[1], entry[2]


# The normal form of a path depends on the path alone; an API's paths repeat.
_normalise = functools.lru_cache(maxsize=1024)(normalise_path)


def _split(raw: str) -> tuple[str, str]:
    path, _, query = raw.partition("?")
    path = path.partition("#")[0]
    return path, query


def resolve(
    raw_target: str,
    mode: str,
    upstreams: dict[str, UpstreamConfig],
    hosts: dict[str, str],
) -> Target:
    """Map the request target (as on the request line) to a Target, or raise."""
    if raw_target.startswith("/"):
        path, query = _split(raw_target)
        if mode == MAIN:
            return _by_prefix(path, query, upstreams)
        upstream = upstreams.get(mode)
        if upstream is None:
            raise UnknownUpstream(f"upstream '{mode}' is no longer configured")
        return _whole_path(mode, upstream, path, query)
    return _absolute(raw_target, upstreams, hosts)


def _by_prefix(path: str, query: str, upstreams: dict[str, UpstreamConfig]) -> Target:
    name, _, rest = path[1:].partition("/")
    upstream = upstreams.get(name)
    if upstream is None:
        raise UnknownUpstream(
            f"no upstream named '{name}': use http://HOST:PORT/<upstream>/<path> "
            f"with one of: {', '.join(sorted(upstreams)) or '(none configured)'}"
        )
    sub = _normalise("/" + rest)
    return Target(name, upstream, _parts(upstream)[1] + sub, query)


def _whole_path(name: str, upstream: UpstreamConfig, path: str, query: str) -> Target:
    norm = _normalise(path)
    base_path = _parts(upstream)[1]
    if not within(norm, base_path):
        raise Forbidden(f"path is outside upstream '{name}' ({base_path or '/'})")
    return Target(name, upstream, norm, query)


def _absolute(raw: str, upstreams: dict[str, UpstreamConfig], hosts: dict[str, str]) -> Target:
    scheme, sep, rest = raw.partition("://")
    if not sep or scheme.lower() not in ("http", "https"):
        raise BadRequest("the request target must be a path or an http:// URL")
    authority, slash, tail = rest.partition("/")
    if "@" in authority:
        raise BadRequest("userinfo is not allowed in the request URI")
    host = authority.lower()
    if host.startswith("["):
        host = host.partition("]")[0] + "]"
    else:
        host = host.rpartition(":")[0] if ":" in host else host
    name = hosts.get(host.rstrip("."))
    if name is None:
        raise UnknownUpstream(
            "the request URI's host is not configured for any upstream "
            "(credproxy is not an open proxy)"
        )
    path, query = _split("/" + tail if slash else "/")
    return _whole_path(name, upstreams[name], path, query)


def candidates(
    upstream_name: str, upstream: UpstreamConfig, needed: str, *, oauth: bool = False
) -> list[CredentialRef]:
    """Credentials that cover `needed`, least privileged first (fewest scopes, admin last).

    The upstream's OAuth grant takes part as the credential named `oauth` with the
    grant's scopes. Scopes outside credproxy's vocabulary (another API's own names)
    say nothing credproxy can check, so such a grant is taken to cover every request
    and the upstream decides.
    """
    pool = list(upstream.credentials)
    if oauth and upstream.oauth is not None:
        known = frozenset(s for s in upstream.oauth.scopes if s in _SCOPES)
        pool.append(CredentialRef(name=OAUTH_CREDENTIAL, scopes=known or frozenset({"admin"})))
    fitting = [c for c in pool if covers(c.scopes, needed)]
    if not fitting:
        raise CredentialUnavailable(
            f"upstream '{upstream_name}' has no credential with the '{needed}' scope"
        )
    # Stable sort: among equals, API keys (listed first) come before the OAuth grant.
    return sorted(fitting, key=lambda c: ("admin" in c.scopes, len(c.scopes)))
