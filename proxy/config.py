"""Load credproxy's YAML config into frozen, typed settings and say exactly what is wrong.

The loader keeps the line of every YAML node, so an invalid config is refused with every
problem at once, each named by its dotted path (`upstreams.x.base_url`, `apps.x.allow_from[0]`)
and line. No raw YAML dict gets past `parse_config`, and no message echoes a value that could
be a secret (URLs, durations, addresses and names are fine to show).
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path
from types import MappingProxyType
from typing import Annotated, Any, Final, Literal, Self, TypeVar, get_args
from urllib.parse import urlsplit

import yaml
from annotated_types import Ge, Gt
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PositiveInt,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

__all__ = [
    "PLAN_LIMITS",
    "SCOPES",
    "AppConfig",
    "AppUpstream",
    "AuthHeader",
    "Config",
    "ConfigError",
    "CredentialRef",
    "Limits",
    "ListenAddress",
    "OAuthConfig",
    "PathRule",
    "Problem",
    "QueueConfig",
    "RateLimitConfig",
    "RetriesConfig",
    "Scope",
    "StateConfig",
    "TimeoutsConfig",
    "UpstreamConfig",
    "credential_warnings",
    "default_config_path",
    "load_config",
    "parse_config",
    "parse_duration",
]

Scope = Literal["read", "write", "delete", "admin"]
SCOPES: Final[tuple[Scope, ...]] = get_args(Scope)

Plan = Literal["free", "starter", "standard", "pro"]
# (per_hour, per_minute) for each AImyChats plan: hourly limit and per-minute burst.
PLAN_LIMITS: Final[Mapping[Plan, tuple[int, int]]] = MappingProxyType(
    {"free": (100, 10), "starter": (500, 50), "standard": (2000, 100), "pro": (10000, 500)}
)

# Where `credproxy` looks when neither --config nor $CREDPROXY_CONFIG says.
USER_CONFIG_PATH: Final = Path("~/.config/credproxy/config.yaml")
SYSTEM_CONFIG_PATH: Final = Path("/etc/credproxy/config.yaml")

# A path into the YAML document: mapping keys and sequence indexes.
Loc = tuple[str | int, ...]

_FROZEN = ConfigDict(frozen=True, extra="forbid")
_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]*")
_HTTP_TOKEN_RE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_HOSTNAME_RE = re.compile(rf"(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*")
_HEX64_RE = re.compile(r"[0-9a-fA-F]{64}")
_DURATION_PART_RE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|s|m|h)")
_DURATION_RE = re.compile(rf"([-+]?)((?:{_DURATION_PART_RE.pattern})+)")
_DURATION_UNITS: Final = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_ENV_RE = re.compile(r"\$\$\{|\$\{([^}]*)\}|\$\{")
_ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_MAX_UNIX_PATH = 107  # sun_path holds 108 bytes including the terminating NUL
_MAX_YAML_NODES = 100_000  # a bound on alias expansion ("billion laughs")
_CHECK = "config_check"  # pydantic error type of the checks the loader also runs on raw data
_EMPTY = "config is empty: write at least `upstreams:` and `apps:` (see config.example.yaml)"
_T = TypeVar("_T")


# --- small parsers shared by the models and the loader's raw checks -----------------------------


def parse_duration(value: str | int | float) -> float:
    """Seconds in `value`: "500ms", "30s", "5m", "1h", "1m30s", or a bare number of seconds."""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ValueError("expected a duration such as 500ms, 30s, 5m or 1h")
    if isinstance(value, str):
        text = value.strip()
        try:
            seconds = float(text)
        except ValueError:
            match = _DURATION_RE.fullmatch(text)
            if match is None:
                shown = text if len(text) <= 40 else text[:37] + "..."
                raise ValueError(
                    f"invalid duration {shown!r}: use a number of seconds or a number with "
                    "a unit ms, s, m or h (500ms, 30s, 5m, 1h)"
                ) from None
            sign, parts = match.group(1, 2)
            seconds = sum(
                float(number) * _DURATION_UNITS[unit]
                for number, unit in _DURATION_PART_RE.findall(parts)
            )
            seconds = -seconds if sign == "-" else seconds
    else:
        seconds = float(value)
    if not math.isfinite(seconds):
        raise ValueError("a duration must be a finite number of seconds")
    if seconds < 0:
        raise ValueError("a duration must not be negative")
    return seconds


def _duration(value: Any) -> Any:
    return None if value is None else parse_duration(value)


def _one_or_many(value: Any) -> Any:
    """Let a list field be written as a single value."""
    return value if isinstance(value, list | tuple | set | frozenset) else [value]


def _words(value: Any) -> Any:
    """Let a list of scopes be written as one space-separated string."""
    return value.split() if isinstance(value, str) else value


def _check_name(value: str) -> str:
    if not _NAME_RE.fullmatch(value):
        raise ValueError(
            "invalid name: use lowercase letters, digits, '-' and '_', "
            "starting with a letter or digit"
        )
    return value


def _check_secret_name(value: str) -> str:
    if not value or len(value) > 128 or any(c.isspace() or not c.isprintable() for c in value):
        raise ValueError(
            "must be the name of a secret in the store (no spaces, at most 128 characters), "
            "never the secret itself"
        )
    return value


def _non_empty_word(value: str) -> str:
    if not value or any(c.isspace() for c in value):
        raise ValueError("must be a non-empty word without spaces")
    return value


def _normalize_host(value: str) -> str:
    """A bare host name or IP address, lowercased, as an upstream alias."""
    host = value.strip().lower().rstrip(".")
    if not host:
        raise ValueError("must not be empty")
    if "/" in host or "@" in host:
        raise ValueError("must be a bare host name, without scheme, path or user")
    try:
        return ipaddress.ip_address(host.removeprefix("[").removesuffix("]")).compressed
    except ValueError:
        pass
    if ":" in host:
        raise ValueError("must be a bare host name, without a port")
    if not _HOSTNAME_RE.fullmatch(host):
        raise ValueError("is not a valid host name")
    return host


def _normalize_token_hash(value: str) -> str:
    if value.startswith("cpx_"):
        raise ValueError(
            "this is an app token, not its hash: keep the token out of the config and put "
            'its SHA-256 here (printf %s "$TOKEN" | sha256sum)'
        )
    if not _HEX64_RE.fullmatch(value):
        raise ValueError("must be 64 hex digits: the SHA-256 of the whole app token, cpx_ included")
    return value.lower()


def _parse_network(value: Any) -> Any:
    if isinstance(value, IPv4Network | IPv6Network):
        return value
    if not isinstance(value, str):
        raise ValueError("must be an IP address or a CIDR network such as 172.18.0.0/16")
    try:
        return ipaddress.ip_network(value.strip(), strict=False)
    except ValueError:
        raise ValueError("must be an IP address or a CIDR network such as 172.18.0.0/16") from None


def _https_url(value: str, *, allow_query: bool) -> str:
    """`value` checked and normalized: https, a host, no userinfo or fragment, no trailing '/'."""
    try:
        parts = urlsplit(value.strip())
        port = parts.port
    except ValueError:
        raise ValueError("is not a valid URL (a port out of range, or a malformed host)") from None
    scheme = parts.scheme.lower()
    if scheme == "http":
        raise ValueError("must be https")
    if scheme != "https":
        raise ValueError("must be an https:// URL")
    if "@" in parts.netloc:
        # The userinfo may hold a password: never echo it, and send it to the store instead.
        raise ValueError("must not contain user:password@; credentials belong in the store")
    if not parts.hostname:
        raise ValueError("must name a host")
    if parts.fragment or value.rstrip().endswith("#"):
        raise ValueError("must not have a #fragment")
    if (parts.query or value.rstrip().endswith("?")) and not allow_query:
        raise ValueError("must not have a ?query")
    host = parts.hostname
    netloc = f"[{host}]" if ":" in host else host
    if port is not None and port != 443:
        netloc += f":{port}"
    path = parts.path.rstrip("/")
    query = f"?{parts.query}" if parts.query else ""
    return f"https://{netloc}{path}{query}"


def _context(info: ValidationInfo) -> tuple[Path | None, Mapping[str, str]]:
    """The loader's base directory and environment, or none and os.environ."""
    context = info.context if isinstance(info.context, dict) else {}
    base_dir = context.get("base_dir")
    env = context.get("env")
    return (
        base_dir if isinstance(base_dir, Path) else None,
        env if isinstance(env, Mapping) else os.environ,
    )


def _expand_user(text: str, env: Mapping[str, str]) -> str:
    if text == "~" or text.startswith("~/"):
        home = env.get("HOME") or str(Path.home())
        return home + text[1:]
    if text.startswith("~"):
        try:
            return str(Path(text).expanduser())
        except RuntimeError:
            raise ValueError("names an unknown user after '~'") from None
    return text


def _resolve_path(value: Path, info: ValidationInfo) -> Path:
    """`~` expanded; a relative path taken from the config file's directory."""
    base_dir, env = _context(info)
    path = Path(_expand_user(str(value), env))
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    return path


def _existing_file(value: Path, info: ValidationInfo) -> Path:
    """`_resolve_path`, which must name a file that exists."""
    path = _resolve_path(value, info)
    if not path.is_file():
        raise ValueError(f"file not found: {path}")
    return path


def _checked(found: list[tuple[Loc, str]]) -> None:
    """Raise the problems a model finds in itself (the loader reports them with exact paths)."""
    if found:
        message = "; ".join(message for _, message in found)
        raise PydanticCustomError(_CHECK, "{message}", {"message": message})


# --- field types ----------------------------------------------------------------------------

# Seconds, written as a duration ("500ms", "30s", "5m", "1h") or a bare number.
Duration = Annotated[float, BeforeValidator(_duration)]
# A set of scopes, written as a list or one space-separated string.
ScopeSet = Annotated[frozenset[Scope], BeforeValidator(_words)]
# A list field that may also be written as one string.
OneOrMany = BeforeValidator(_one_or_many)
# An upstream or app name: the first path segment on the main listener, so URL-safe.
Name = Annotated[str, AfterValidator(_check_name)]
# The name of a secret in the store (never the secret itself).
SecretName = Annotated[str, AfterValidator(_check_secret_name)]
# One word: no spaces (an OAuth client id or scope).
Word = Annotated[str, AfterValidator(_non_empty_word)]
# A forward-proxy host alias, lowercased, without scheme or port.
HostName = Annotated[str, AfterValidator(_normalize_host)]
# Lowercase hex SHA-256 of an app token.
TokenHash = Annotated[str, AfterValidator(_normalize_token_hash)]
# A source network; a bare address is a /32 or /128, host bits are ignored.
Network = Annotated[IPv4Network | IPv6Network, BeforeValidator(_parse_network)]


# --- models ---------------------------------------------------------------------------------


class ListenAddress(BaseModel):
    """A socket to listen on, written `127.0.0.1:8787`, `[::1]:8787` or `unix:/path`."""

    model_config = _FROZEN

    # "tcp" (host and port) or "unix" (path).
    kind: Literal["tcp", "unix"]
    # Lowercased host name or compressed IP literal, without brackets; None for unix.
    host: str | None = None
    # TCP port; 0 lets the OS pick a free one (tests). None for unix.
    port: int | None = Field(default=None, ge=0, le=65535)
    # Absolute socket path; None for tcp.
    path: str | None = None

    @classmethod
    def parse(cls, text: str) -> ListenAddress:
        """The address written as in the config (raises pydantic.ValidationError)."""
        return cls.model_validate(text)

    @model_validator(mode="before")
    @classmethod
    def _from_text(cls, data: Any) -> Any:
        if isinstance(data, int):  # bool included
            raise ValueError("give a host and a port, e.g. 127.0.0.1:8787")
        if not isinstance(data, str):
            return data
        text = data.strip()
        if text.startswith("unix:"):
            return {"kind": "unix", "path": text.removeprefix("unix:")}
        if "://" in text:
            raise ValueError("must be host:port (e.g. 127.0.0.1:8787) or unix:/path, not a URL")
        if text.startswith("["):
            host, bracket, rest = text[1:].partition("]")
            if not bracket or not rest.startswith(":"):
                raise ValueError("must be [IPv6 address]:port, e.g. [::1]:8787")
            port_text = rest[1:]
        else:
            host, colon, port_text = text.rpartition(":")
            if not colon:
                raise ValueError("must be host:port (e.g. 127.0.0.1:8787) or unix:/path")
            if ":" in host:
                raise ValueError("put an IPv6 address in brackets, e.g. [::1]:8787")
        if not host:
            raise ValueError("give a host, e.g. 127.0.0.1:8787 (0.0.0.0:8787 for every interface)")
        if not port_text.isdigit() or int(port_text) > 65535:
            raise ValueError("the port must be a number from 0 to 65535")
        return {"kind": "tcp", "host": host, "port": int(port_text)}

    @field_validator("host")
    @classmethod
    def _host(cls, value: str | None) -> str | None:
        if value is None:
            return None
        host = value.strip().lower().removeprefix("[").removesuffix("]").rstrip(".")
        try:
            return ipaddress.ip_address(host).compressed
        except ValueError:
            pass
        if not _HOSTNAME_RE.fullmatch(host):
            raise ValueError("must be an IP address or a host name")
        return host

    @field_validator("path")
    @classmethod
    def _path(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return None
        path = _expand_user(value, _context(info)[1])
        if not path.startswith("/"):
            raise ValueError(
                "a unix socket path must be absolute, e.g. unix:/run/credproxy/proxy.sock"
            )
        if len(os.fsencode(path)) > _MAX_UNIX_PATH:
            raise ValueError(f"a unix socket path must be at most {_MAX_UNIX_PATH} bytes long")
        return os.path.normpath(path)

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.kind == "tcp" and (self.host is None or self.port is None or self.path):
            raise ValueError("a tcp address needs host and port, and no path")
        if self.kind == "unix" and (self.path is None or self.host or self.port is not None):
            raise ValueError("a unix address needs a path, and no host or port")
        return self

    def is_loopback(self) -> bool:
        """True when only this machine can connect: unix sockets, 127.0.0.0/8, ::1, localhost."""
        if self.kind == "unix":
            return True
        if self.host == "localhost":
            return True
        try:
            address = ipaddress.ip_address(self.host or "")
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return address.is_loopback

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"{host}:{self.port}"


_DEFAULT_LISTEN: Final = ListenAddress(kind="tcp", host="127.0.0.1", port=8787)
_DEFAULT_ADMIN_LISTEN: Final = ListenAddress(kind="tcp", host="127.0.0.1", port=8786)


class AuthHeader(BaseModel):
    """The header the real credential goes in: `<name>: <prefix><secret>`."""

    model_config = _FROZEN

    # Header name; e.g. "x-api-key" for APIs that do not use Authorization.
    name: str = "Authorization"
    # Put before the secret; "" for APIs that want the bare key.
    prefix: str = "Bearer "

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _HTTP_TOKEN_RE.fullmatch(value):
            raise ValueError("must be an HTTP header name (letters, digits and - only)")
        return value

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        # A control character here would let a config split headers.
        if any(not c.isprintable() for c in value):
            raise ValueError("must not contain control characters or line breaks")
        return value


class CredentialRef(BaseModel):
    """A secret in the store that may be injected, and the scopes it covers upstream."""

    model_config = _FROZEN

    # Name of the secret in the store (`credproxy keys add NAME`); never the secret itself.
    name: SecretName
    # What the key may do upstream; the route picks the credential with the fewest that suffice.
    scopes: ScopeSet

    @field_validator("scopes")
    @classmethod
    def _some_scope(cls, value: frozenset[Scope]) -> frozenset[Scope]:
        if not value:
            raise ValueError("list at least one scope: read, write, delete or admin")
        return value


class OAuthConfig(BaseModel):
    """How credproxy obtains OAuth 2.0 access tokens for an upstream."""

    model_config = _FROZEN

    # authorization_code: a person runs `credproxy login` once; client_credentials: no person.
    grant: Literal["authorization_code", "client_credentials"]
    # Where `credproxy login` sends the browser; required for authorization_code.
    authorize_url: str | None = None
    # Where codes and refresh tokens are exchanged for access tokens.
    token_url: str
    # Public client identifier, sent as is.
    client_id: Word
    # NAME of the client secret in the store; None for a public client using PKCE alone.
    client_secret: SecretName | None = None
    # Requested scopes, joined by spaces in the authorize/token requests.
    scopes: Annotated[tuple[Word, ...], BeforeValidator(_words)] = ()
    # Loopback port of the login redirect: http://127.0.0.1:<port>/callback.
    redirect_port: int = Field(default=8789, ge=1, le=65535)
    # How the client authenticates to the token endpoint (RFC 6749 section 2.3.1).
    token_auth_method: Literal["client_secret_post", "client_secret_basic"] = Field(
        default="client_secret_post"
    )

    @field_validator("authorize_url", "token_url")
    @classmethod
    def _https(cls, value: str | None) -> str | None:
        return None if value is None else _https_url(value, allow_query=True)

    @model_validator(mode="after")
    def _complete(self) -> Self:
        _checked(_oauth_checks(dict(self)))
        return self


def _oauth_checks(oauth: Mapping[str, Any]) -> list[tuple[Loc, str]]:
    found: list[tuple[Loc, str]] = []
    grant = oauth.get("grant")
    if grant == "authorization_code" and oauth.get("authorize_url") is None:
        found.append((("authorize_url",), "required for grant authorization_code"))
    if grant == "client_credentials" and oauth.get("client_secret") is None:
        found.append(
            (
                ("client_secret",),
                "required for grant client_credentials: the name of the client secret "
                "in the store (`credproxy keys add NAME`)",
            )
        )
    return found


class RateLimitConfig(BaseModel):
    """Requests allowed back to back per window, then paced; both windows hold together."""

    model_config = _FROZEN

    # A known plan fills per_hour and per_minute from PLAN_LIMITS (explicit values win).
    plan: Plan | None = None
    # Requests per rolling hour; None: no hourly window.
    per_hour: PositiveInt | None = None
    # Requests per rolling minute (the burst); None: no minute window.
    per_minute: PositiveInt | None = None

    @model_validator(mode="before")
    @classmethod
    def _fill_from_plan(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("plan") in PLAN_LIMITS:
            per_hour, per_minute = PLAN_LIMITS[data["plan"]]
            data = dict(data)
            if data.get("per_hour") is None:
                data["per_hour"] = per_hour
            if data.get("per_minute") is None:
                data["per_minute"] = per_minute
        return data

    @model_validator(mode="after")
    def _some_limit(self) -> Self:
        if self.per_hour is None and self.per_minute is None:
            raise ValueError("set plan, per_hour or per_minute (or remove rate_limit)")
        return self


class QueueConfig(BaseModel):
    """How many requests may wait for budget or a 429 hold, and for how long."""

    model_config = _FROZEN

    # Requests waiting at once; one more gets 503 queue_full.
    max_size: int = Field(default=1000, ge=1)
    # Longest a request waits before 429 rate_limit_exceeded (an app may ask for less).
    max_wait: Annotated[Duration, Ge(0)] = 30.0


class RetriesConfig(BaseModel):
    """Retries of a request that got a 5xx or could not connect."""

    model_config = _FROZEN

    # Retries after the first attempt; 0 disables them.
    max: int = Field(default=3, ge=0)
    # Which methods are retried on 5xx: idempotent (GET HEAD OPTIONS PUT DELETE), never, always.
    on_5xx: Literal["idempotent", "never", "always"] = "idempotent"


class TimeoutsConfig(BaseModel):
    """Time limits of one upstream attempt, in seconds (durations in the YAML)."""

    model_config = _FROZEN

    # Connect plus TLS handshake.
    connect: Annotated[Duration, Gt(0)] = 5.0
    # Silence allowed between two bytes from the upstream, so a stalled stream ends.
    idle: Annotated[Duration, Gt(0)] = 120.0
    # Whole attempt; off by default because a chat stream may last an hour.
    total: Annotated[Duration, Gt(0)] | None = None


class PathRule(BaseModel):
    """A scope required for a method and path glob, checked before the method's own scope."""

    model_config = _FROZEN

    # "*" or an uppercase HTTP method (lowercase is uppercased).
    method: str = "*"
    # fnmatch glob against the normalised path as sent upstream, e.g. /v1/conversations/*.
    path: str
    # Scope the app needs when this rule is the first to match.
    scope: Scope

    @field_validator("method")
    @classmethod
    def _method(cls, value: str) -> str:
        if value == "*":
            return value
        if not _HTTP_TOKEN_RE.fullmatch(value):
            raise ValueError('must be "*" or an HTTP method such as GET or POST')
        return value.upper()

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError(
                "must start with '/': a glob matched against the path sent upstream, "
                "e.g. /v1/conversations/*"
            )
        return value


class UpstreamConfig(BaseModel):
    """One real API: where it is, which secrets it takes and how hard it may be driven."""

    model_config = _FROZEN

    # https origin plus optional base path; normalized without a trailing '/'.
    base_url: str
    # Forward-proxy aliases: requests for these hosts go to base_url (never looked up in DNS).
    hosts: Annotated[tuple[HostName, ...], OneOrMany] = ()
    # Optional dedicated listener that stands in for the upstream's origin.
    listen: ListenAddress | None = None
    # Extra CA file trusted for this upstream only (private APIs); must exist.
    ca_bundle: Path | None = None
    # Where the secret goes in the upstream request.
    auth_header: AuthHeader = AuthHeader()
    # Stored API keys that may be injected, each with the scopes it covers.
    credentials: tuple[CredentialRef, ...] = ()
    # OAuth 2.0 instead of or beside API keys.
    oauth: OAuthConfig | None = None
    # The upstream account's limits; None: no pacing, only 429 holds.
    rate_limit: RateLimitConfig | None = None
    # Bound on requests waiting for budget or a hold.
    queue: QueueConfig = QueueConfig()
    # Retries on 5xx and connect failures.
    retries: RetriesConfig = RetriesConfig()
    # Time limits of one attempt.
    timeouts: TimeoutsConfig = TimeoutsConfig()
    # Scope overrides for method+path globs; the first match wins.
    path_rules: tuple[PathRule, ...] = ()

    @field_validator("base_url")
    @classmethod
    def _base_url(cls, value: str) -> str:
        return _https_url(value, allow_query=False)

    @field_validator("ca_bundle")
    @classmethod
    def _ca_bundle(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        return None if value is None else _existing_file(value, info)

    @field_validator("credentials")
    @classmethod
    def _distinct(cls, value: tuple[CredentialRef, ...]) -> tuple[CredentialRef, ...]:
        seen: set[str] = set()
        for credential in value:
            if credential.name in seen:
                raise ValueError(f"credential '{credential.name}' is listed twice")
            seen.add(credential.name)
        return value

    @model_validator(mode="after")
    def _has_credential(self) -> Self:
        _checked(_upstream_checks(dict(self)))
        return self

    @property
    def host(self) -> str:
        """Host of base_url, lowercased; an IPv6 literal without brackets."""
        return urlsplit(self.base_url).hostname or ""

    @property
    def port(self) -> int:
        """Port of base_url (443 unless given)."""
        return urlsplit(self.base_url).port or 443

    @property
    def origin(self) -> str:
        """`https://host[:port]`, the port left out when it is 443."""
        parts = urlsplit(self.base_url)
        return f"https://{parts.netloc}"

    @property
    def base_path(self) -> str:
        """Path of base_url without a trailing '/': "/v1", or "" at the root."""
        return urlsplit(self.base_url).path


def _upstream_checks(upstream: Mapping[str, Any]) -> list[tuple[Loc, str]]:
    if not upstream.get("credentials") and upstream.get("oauth") is None:
        return [
            (
                (),
                "needs credentials (names of secrets in the store) or an oauth block: "
                "there is nothing to inject otherwise",
            )
        ]
    return []


class AppUpstream(BaseModel):
    """What one app may do on one upstream."""

    model_config = _FROZEN

    # Scopes the app holds here; a request needing another gets 403.
    scopes: ScopeSet
    # This app's own share of the upstream, on top of the upstream's limit.
    rate_limit: RateLimitConfig | None = None

    @field_validator("scopes")
    @classmethod
    def _some_scope(cls, value: frozenset[Scope]) -> frozenset[Scope]:
        if not value:
            raise ValueError("list at least one scope, or remove the entry to give no access")
        return value


class AppConfig(BaseModel):
    """A local caller: how it is recognised and what it may reach."""

    model_config = _FROZEN

    # Lowercase hex SHA-256 of app tokens kept in the config (GitOps), besides those in the store.
    token_sha256: Annotated[tuple[TokenHash, ...], OneOrMany] = ()
    # Source networks allowed to use this app's token; empty: any local caller.
    allow_from: Annotated[tuple[Network, ...], OneOrMany] = ()
    # On a unix-socket listener, the peer uid that identifies this app without a token.
    peer_uid: int | None = Field(default=None, ge=0)
    # Upstream name -> what the app may do there; an upstream not listed is forbidden.
    upstreams: dict[str, AppUpstream] = {}


class Limits(BaseModel):
    """Bounds on what a caller may send, so one request cannot exhaust memory."""

    model_config = _FROZEN

    # Request line plus headers; over it: 414/431 request_too_large.
    max_header_bytes: PositiveInt = 16384
    # Request body; over it: 413 request_too_large.
    max_body_bytes: PositiveInt = 10485760
    # Body bytes kept to resend a request after a 429 or a 5xx; larger bodies are not retried.
    replay_buffer_bytes: PositiveInt = 1048576


class StateConfig(BaseModel):
    """Where instances that share an upstream account keep shared state (docs/FLEET.md)."""

    model_config = _FROZEN

    # memory: this process alone; redis: budgets, holds and tokens shared between instances.
    backend: Literal["memory", "redis"] = "memory"
    # redis://, rediss:// (TLS) or unix:// URL, or redis+sentinel:// / redis+cluster:// (and
    # their rediss+ forms); may hold user:password, so write it as ${REDIS_URL}.
    url: str | None = None
    # Prefix of every key credproxy writes, so instances of unrelated accounts can share a server.
    key_prefix: str = "credproxy:"
    # Extra CA file trusted for a rediss:// server with a private CA; must exist.
    ca_bundle: Path | None = None
    # While Redis is unreachable: local (serve on local_share of each budget) or closed (503).
    on_failure: Literal["local", "closed"] = "local"
    # How many instances share the account; sets local_share to 1/instances, and a running
    # fleet keeps the shares of configured instances it cannot see in reserve.
    instances: PositiveInt | None = None
    # Fraction of each budget one instance uses alone while Redis is unreachable; default
    # 1/instances, or 0.1 when instances is not set either.
    local_share: Annotated[float, Gt(0), Field(le=1)] | None = None

    @field_validator("url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not value.startswith(_REDIS_SCHEMES):
            raise ValueError(
                "must be a redis://, rediss://, unix://, redis+sentinel://, "
                "rediss+sentinel://, redis+cluster:// or rediss+cluster:// URL"
            )
        _check_redis_url(value)
        return value

    @field_validator("key_prefix")
    @classmethod
    def _key_prefix(cls, value: str) -> str:
        if "{" in value or "}" in value or any(c.isspace() for c in value):
            raise ValueError(
                "must not contain braces or spaces: credproxy adds its own {hash tags} so "
                "each script touches one Redis Cluster slot"
            )
        return value

    @field_validator("ca_bundle")
    @classmethod
    def _ca_bundle(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        return None if value is None else _existing_file(value, info)

    @model_validator(mode="after")
    def _complete(self) -> Self:
        _checked(_state_checks(dict(self)))
        return self

    @property
    def share(self) -> float:
        """The fraction of each budget one instance uses alone while Redis is unreachable."""
        if self.local_share is not None:
            return self.local_share
        if self.instances is not None:
            return 1.0 / self.instances
        return DEFAULT_LOCAL_SHARE


_REDIS_SCHEMES: Final = (
    "redis://",
    "rediss://",
    "unix://",
    "redis+sentinel://",
    "rediss+sentinel://",
    "redis+cluster://",
    "rediss+cluster://",
)
# local_share when neither it nor `instances` is configured.
DEFAULT_LOCAL_SHARE: Final = 0.1


def _check_redis_url(value: str) -> None:
    """Hosts, ports and (for Sentinel) the service name; never echoes the URL (a password)."""
    scheme, _, rest = value.partition("://")
    if scheme == "unix":
        return
    netloc, _, path = rest.split("?", 1)[0].partition("/")
    hosts = netloc.rpartition("@")[2]
    for item in hosts.split(",") if scheme.endswith("+sentinel") else [hosts]:
        try:
            parts = urlsplit(f"redis://{item}")
            parts.port  # noqa: B018 - parsing is the check
        except ValueError:
            raise ValueError("has a malformed host or port") from None
        if not parts.hostname:
            raise ValueError("must name a host")
    segments = [part for part in path.split("/") if part]
    if scheme.endswith("+sentinel"):
        if not segments:
            raise ValueError(
                "must name the Sentinel service: redis+sentinel://host:26379[,host:26379]/mymaster"
            )
        segments = segments[1:]
    if len(segments) > 1 or not all(part.isdigit() for part in segments):
        raise ValueError("may end with a database number only, e.g. /0")


def _state_checks(state: Mapping[str, Any]) -> list[tuple[Loc, str]]:
    if state.get("backend") == "redis" and state.get("url") is None:
        return [(("url",), "required when backend is redis, e.g. url: ${REDIS_URL}")]
    return []


class Config(BaseModel):
    """The whole daemon configuration: one immutable snapshot, swapped whole on reload."""

    model_config = _FROZEN

    # Main listeners (path-prefix and forward-proxy forms); one address or a list.
    listen: Annotated[tuple[ListenAddress, ...], OneOrMany] = (_DEFAULT_LISTEN,)
    # Health, metrics, status and reload: unauthenticated, so loopback or unix only.
    admin_listen: ListenAddress = _DEFAULT_ADMIN_LISTEN
    # Encrypted store; `~` expanded, a relative path taken from the config file's directory.
    store: Path = Field(default=Path("~/.local/share/credproxy/store.db"), validate_default=True)
    # Request size bounds.
    limits: Limits = Limits()
    # Upstream name (first path segment on the main listener) -> upstream.
    upstreams: dict[Name, UpstreamConfig] = {}
    # App name -> app.
    apps: dict[Name, AppConfig] = {}
    # Shared state between instances; None: everything in-process.
    state: StateConfig | None = None
    # On SIGTERM, how long requests in flight (streams included) may take to finish.
    shutdown_grace: Annotated[Duration, Field(ge=0)] = 30.0
    # The file this was loaded from; set by load_config, never read from the YAML.
    source: Path | None = None

    # Line of each YAML path, kept for warnings reported after loading.
    _lines: dict[Loc, int] = PrivateAttr(default_factory=dict)

    @field_validator("admin_listen")
    @classmethod
    def _admin_local(cls, value: ListenAddress) -> ListenAddress:
        if not value.is_loopback():
            raise ValueError(
                "must be a loopback address (127.0.0.1, [::1], localhost) or a unix: socket, "
                "because the admin listener has no authentication"
            )
        return value

    @field_validator("store")
    @classmethod
    def _store(cls, value: Path, info: ValidationInfo) -> Path:
        return _resolve_path(value, info)


_ALL_FIELDS: Final = frozenset(
    name
    for model in (
        Config,
        ListenAddress,
        AuthHeader,
        CredentialRef,
        OAuthConfig,
        RateLimitConfig,
        QueueConfig,
        RetriesConfig,
        TimeoutsConfig,
        PathRule,
        UpstreamConfig,
        AppUpstream,
        AppConfig,
        Limits,
        StateConfig,
    )
    for name in model.model_fields
)


# --- problems -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a config, named by its YAML path and line."""

    # Dotted YAML path, list items as [i]; "" for the document as a whole.
    path: str
    # What is wrong and, where it helps, how to fix it; never a secret value.
    message: str
    # 1-based line in the file, when known.
    line: int | None = None
    # Errors refuse the config; warnings are reported and the config is used.
    severity: Literal["error", "warning"] = "error"

    def __str__(self) -> str:
        text = f"{self.path}: {self.message}" if self.path else self.message
        return text if self.line is None else f"{text} (line {self.line})"


class ConfigError(Exception):
    """A config that cannot be used, with every problem found in it."""

    def __init__(self, problems: Sequence[Problem], source: str = "<config>") -> None:
        self.problems = list(problems)
        self.source = source
        super().__init__(str(self))

    def __str__(self) -> str:
        return "\n".join(f"{self.source}: {problem}" for problem in self.problems)


@dataclass(frozen=True)
class _Issue:
    loc: Loc
    message: str
    line: int | None = None  # when the path's own line is not the right one (duplicate keys)


def _format_loc(loc: Loc) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else part
    return text


def _line_of(lines: Mapping[Loc, int], loc: Loc) -> int | None:
    """Line of `loc`, or of its nearest ancestor present in the YAML."""
    for end in range(len(loc), -1, -1):
        line = lines.get(loc[:end])
        if line is not None:
            return line
    return None


# --- YAML with lines ------------------------------------------------------------------------


class _YamlTooBig(Exception):
    pass


class _Document:
    """A YAML document turned into plain data, with the line of every key and item."""

    _MAP = "tag:yaml.org,2002:map"
    _SEQ = "tag:yaml.org,2002:seq"
    _MERGE = "tag:yaml.org,2002:merge"
    _NUMBER = ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")

    def __init__(self, loader: yaml.SafeLoader, env: Mapping[str, str]) -> None:
        self.loader = loader
        self.env = env
        self.lines: dict[Loc, int] = {}
        self.issues: list[_Issue] = []
        # Paths whose value was already reported; what pydantic says of them is noise.
        self.reported: list[Loc] = []
        self._active: set[int] = set()
        self._count = 0

    def build(self, node: yaml.Node, loc: Loc) -> Any:
        self._count += 1
        if self._count > _MAX_YAML_NODES:
            raise _YamlTooBig
        if isinstance(node, yaml.ScalarNode):
            return self._scalar(node, loc)
        if id(node) in self._active:
            self._report(loc, "a YAML alias refers to itself")
            return None
        self._active.add(id(node))
        try:
            if isinstance(node, yaml.MappingNode) and node.tag == self._MAP:
                return self._mapping(node, loc)
            if isinstance(node, yaml.SequenceNode) and node.tag == self._SEQ:
                return [self._item(item, (*loc, index)) for index, item in enumerate(node.value)]
            self._report(loc, f"unsupported YAML tag {node.tag}")
            return None
        finally:
            self._active.discard(id(node))

    def _report(self, loc: Loc, message: str) -> None:
        self.issues.append(_Issue(loc, message))
        self.reported.append(loc)

    def _item(self, node: yaml.Node, loc: Loc) -> Any:
        self.lines[loc] = node.start_mark.line + 1
        return self.build(node, loc)

    def _mapping(self, node: yaml.MappingNode, loc: Loc) -> dict[str, Any]:
        first_line: dict[str, int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == self._MERGE:
                continue
            line = key_node.start_mark.line + 1
            if key_node.value in first_line:
                self.issues.append(
                    _Issue(
                        (*loc, key_node.value),
                        f"duplicate key '{key_node.value}' (first at line "
                        f"{first_line[key_node.value]})",
                        line,
                    )
                )
            else:
                first_line[key_node.value] = line
        try:
            self.loader.flatten_mapping(node)  # resolves `<<: *anchor` merge keys
        except yaml.MarkedYAMLError as error:
            self._report(loc, f"invalid YAML merge: {error.problem}")
            return {}
        result: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                self.issues.append(
                    _Issue(loc, "keys must be plain strings", key_node.start_mark.line + 1)
                )
                continue
            # The key's text, so `on:` or `123:` stay names instead of becoming bool or int.
            key = key_node.value
            self.lines[(*loc, key)] = key_node.start_mark.line + 1
            result[key] = self.build(value_node, (*loc, key))
        return result

    def _scalar(self, node: yaml.ScalarNode, loc: Loc) -> Any:
        if node.tag in self._NUMBER and ":" in node.value:
            # YAML 1.1 reads 1:30 as base 60 (90); keep what was written, as YAML 1.2 does.
            return self._expand(node.value, loc)
        try:
            value = self.loader.construct_object(node, deep=True)
        except yaml.MarkedYAMLError as error:
            self._report(loc, f"unsupported YAML value: {error.problem}")
            return None
        return self._expand(value, loc) if isinstance(value, str) else value

    def _expand(self, text: str, loc: Loc) -> str:
        """`${NAME}` replaced from the environment; `$${` is a literal `${`."""
        problems: list[str] = []

        def replace(match: re.Match[str]) -> str:
            if match.group(0) == "$${":
                return "${"
            name = match.group(1)
            if name is None:
                problems.append("unterminated ${ (write $${ for a literal ${)")
            elif not _ENV_NAME_RE.fullmatch(name):
                problems.append(
                    "invalid ${...}: an environment variable name is letters, digits and _"
                )
            elif name not in self.env:
                problems.append(f"environment variable {name} is not set")
            else:
                return self.env[name]
            return ""

        expanded = _ENV_RE.sub(replace, text)
        for problem in problems:
            self._report(loc, problem)
        return expanded


def _compose(text: str, env: Mapping[str, str]) -> tuple[Any, _Document | None, list[_Issue]]:
    """The data of `text` and its line map, or the issue that makes it unreadable."""
    loader: yaml.SafeLoader | None = None
    try:
        loader = yaml.SafeLoader(text)  # checks every character up front
        node = loader.get_single_node()
        if node is None:
            return None, None, []
        document = _Document(loader, env)
        document.lines[()] = node.start_mark.line + 1
        return document.build(node, ()), document, document.issues
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        where = f", at column {mark.column + 1}" if mark else ""
        line = mark.line + 1 if mark else None
        what = f"{error.context}, {error.problem}" if error.context else error.problem
        return None, None, [_Issue((), f"invalid YAML: {what}{where}", line)]
    except yaml.reader.ReaderError as error:  # a control character: an offset, no mark
        line = text.count("\n", 0, error.position) + 1
        message = f"invalid YAML: control character #x{error.character:04x} is not allowed"
        return None, None, [_Issue((), message, line)]
    except _YamlTooBig:
        return None, None, [_Issue((), "the config expands to too many YAML nodes (aliases?)")]
    finally:
        if loader is not None:
            loader.dispose()


# --- checks that span models -----------------------------------------------------------------


def _entries(value: Any, loc: Loc) -> list[tuple[Loc, Any]]:
    """The items of a list field (or the one string written in its place), with their paths."""
    if isinstance(value, str):
        return [(loc, value)]
    if isinstance(value, list):
        return [((*loc, index), item) for index, item in enumerate(value)]
    return []


def _items(value: Any) -> Iterator[tuple[str, dict[str, Any]]]:
    if isinstance(value, dict):
        for name, item in value.items():
            if isinstance(item, dict):
                yield name, item


def _try(parse: Callable[[Any], _T], value: Any) -> _T | None:
    try:
        return parse(value)
    except (ValueError, TypeError, ValidationError):
        return None


def _where(loc: Loc, lines: Mapping[Loc, int]) -> str:
    line = lines.get(loc)
    return (
        f"{_format_loc(loc)} on line {line}"
        if line is not None
        else f"{_format_loc(loc)} (default)"
    )


def _host_families(host: str | None) -> set[int]:
    try:
        return {ipaddress.ip_address(host or "").version}
    except ValueError:
        return {4, 6}  # a name may resolve to either


def _overlaps(a: ListenAddress, b: ListenAddress) -> bool:
    """Whether binding both would fail (asyncio binds "::" as IPv6-only)."""
    if a.kind != b.kind:
        return False
    if a.kind == "unix":
        return a.path == b.path
    if a.port != b.port or not a.port:
        return False
    if a.host == b.host:
        return True
    loopbacks = {"127.0.0.1", "::1"}
    if {a.host, b.host} & {"localhost"} and {a.host, b.host} & loopbacks:
        return True
    for wildcard, other in ((a.host, b.host), (b.host, a.host)):
        if wildcard == "0.0.0.0" and 4 in _host_families(other):  # noqa: S104
            return True
        if wildcard == "::" and 6 in _host_families(other):
            return True
    return False


class _Raw:
    """The parts of the raw data that checks spanning several models look at."""

    def __init__(self, data: dict[str, Any], lines: Mapping[Loc, int], context: dict[str, Any]):
        self.data = data
        self.lines = lines
        self.context = context
        upstreams, apps = data.get("upstreams"), data.get("apps")
        self.upstreams: dict[str, Any] = upstreams if isinstance(upstreams, dict) else {}
        self.apps: dict[str, Any] = apps if isinstance(apps, dict) else {}
        self.listeners = self._listeners()

    def listen_address(self, value: Any) -> ListenAddress | None:
        return _try(lambda v: ListenAddress.model_validate(v, context=self.context), value)

    def _listeners(self) -> list[tuple[Loc, ListenAddress]]:
        """Every listener that parses, with its path; defaults stand where a key is absent."""
        found: list[tuple[Loc, Any]] = []
        if "listen" in self.data:
            found += _entries(self.data["listen"], ("listen",))
        else:
            found.append((("listen",), _DEFAULT_LISTEN))
        found.append((("admin_listen",), self.data.get("admin_listen", _DEFAULT_ADMIN_LISTEN)))
        for name, upstream in _items(self.upstreams):
            if upstream.get("listen") is not None:
                found.append((("upstreams", name, "listen"), upstream["listen"]))
        parsed = [(loc, self.listen_address(value)) for loc, value in found]
        return [(loc, address) for loc, address in parsed if address is not None]


def _duplicate_listeners(raw: _Raw) -> Iterator[_Issue]:
    """Two listeners on one socket: the one further down the file is reported."""
    ordered = sorted(raw.listeners, key=lambda entry: raw.lines.get(entry[0], 0))
    for index, (loc, address) in enumerate(ordered):
        for other_loc, other in ordered[:index]:
            if _overlaps(address, other):
                yield _Issue(loc, f"{address} is already used by {_where(other_loc, raw.lines)}")
                break


def _exposed_listeners(raw: _Raw) -> Iterator[_Issue]:
    """A listener other machines can reach needs every app bound to source networks."""
    open_apps = sorted(
        name
        for name, app in raw.apps.items()
        if not (isinstance(app, dict) and _entries(app.get("allow_from"), ()))
    )
    if not open_apps:
        return
    for loc, address in raw.listeners:
        if loc != ("admin_listen",) and not address.is_loopback():
            yield _Issue(
                loc,
                f"{address} can be reached from other machines, and these apps accept callers "
                f"from any address: {', '.join(open_apps)}; listen on 127.0.0.1 or a unix: "
                "socket, or give every app an allow_from list",
            )


def _redirect_ports(raw: _Raw) -> Iterator[_Issue]:
    """`credproxy login` must be able to bind its redirect port while the daemon runs."""
    for name, upstream in _items(raw.upstreams):
        oauth = upstream.get("oauth")
        if not isinstance(oauth, dict) or oauth.get("grant") != "authorization_code":
            continue
        port = _try(int, oauth.get("redirect_port", 8789))
        probe = raw.listen_address(f"127.0.0.1:{port}") if port else None
        for other_loc, other in raw.listeners:
            if probe is not None and _overlaps(probe, other):
                yield _Issue(
                    ("upstreams", name, "oauth", "redirect_port"),
                    f"port {port} is also used by {_where(other_loc, raw.lines)}; "
                    "`credproxy login` needs it free",
                )
                break


def _model_checks(raw: _Raw) -> Iterator[_Issue]:
    """Checks inside one model, run here too so they report beside its field errors."""
    for name, upstream in _items(raw.upstreams):
        loc: Loc = ("upstreams", name)
        for sub, message in _upstream_checks(upstream):
            yield _Issue((*loc, *sub), message)
        if isinstance(upstream.get("oauth"), dict):
            for sub, message in _oauth_checks(upstream["oauth"]):
                yield _Issue((*loc, "oauth", *sub), message)
    if isinstance(raw.data.get("state"), dict):
        for sub, message in _state_checks(raw.data["state"]):
            yield _Issue(("state", *sub), message)


def _app_upstreams(raw: _Raw) -> Iterator[_Issue]:
    """An app may only name configured upstreams."""
    known = ", ".join(raw.upstreams) or "none"
    for app_name, app in _items(raw.apps):
        wanted = app.get("upstreams")
        for name in wanted if isinstance(wanted, dict) else {}:
            if name not in raw.upstreams:
                yield _Issue(
                    ("apps", app_name, "upstreams", name),
                    f"no upstream named '{name}' is configured (configured: {known})",
                )


def _claimed_once(
    raw: _Raw,
    section: str,
    field: str,
    normalize: Callable[[str], str],
    clash: Callable[[str, str, str], str],
) -> Iterator[_Issue]:
    """Each value of `section.*.field` may belong to one owner only; later claims are issues."""
    owners: dict[str, tuple[str, Loc]] = {}
    for name, entry in _items(getattr(raw, section)):
        for loc, item in _entries(entry.get(field), (section, name, field)):
            value = _try(normalize, item) if isinstance(item, str) else None
            if value is None:
                continue
            owner, owner_loc = owners.setdefault(value, (name, loc))
            if owner != name:
                yield _Issue(loc, clash(value, owner, _where(owner_loc, raw.lines)))


def _shared_hosts(raw: _Raw) -> Iterator[_Issue]:
    """A forward-proxy host is an alias of one upstream only."""
    return _claimed_once(
        raw,
        "upstreams",
        "hosts",
        _normalize_host,
        lambda host, owner, where: (
            f"host '{host}' is already claimed by upstream '{owner}' ({where})"
        ),
    )


def _shared_tokens(raw: _Raw) -> Iterator[_Issue]:
    """A token identifies exactly one app."""
    return _claimed_once(
        raw,
        "apps",
        "token_sha256",
        _normalize_token_hash,
        lambda _digest, owner, where: (
            f"app '{owner}' has the same token hash ({where}); "
            "a token must identify exactly one app"
        ),
    )


_CROSS_CHECKS: Final = (
    _duplicate_listeners,
    _exposed_listeners,
    _redirect_ports,
    _model_checks,
    _app_upstreams,
    _shared_hosts,
    _shared_tokens,
)


def _cross_checks(
    data: dict[str, Any], lines: Mapping[Loc, int], context: dict[str, Any]
) -> list[_Issue]:
    """Checks that span models, run on the raw data so they report even when pydantic fails.

    Each looks only at the pieces that parse on their own and skips the rest, which
    pydantic reports.
    """
    raw = _Raw(data, lines, context)
    return [issue for check in _CROSS_CHECKS for issue in check(raw)]


# --- pydantic errors to issues ----------------------------------------------------------------


def _has(container: Any, part: int | str) -> bool:
    if isinstance(container, dict):
        return isinstance(part, str) and part in container
    return isinstance(container, list) and isinstance(part, int) and 0 <= part < len(container)


def _data_loc(loc: tuple[int | str, ...], data: Any) -> Loc:
    """Pydantic's loc reduced to the part that exists in the YAML (or a missing field)."""
    path: list[str | int] = []
    current = data
    for part in loc:
        if _has(current, part):
            path.append(part)
            current = current[part]
        elif (
            isinstance(current, dict)
            and isinstance(part, str)
            and re.fullmatch(r"[a-z_][a-z0-9_]*", part)
        ):
            path.append(part)  # a missing field
            break
        elif not isinstance(current, dict | list):
            break  # pydantic looked inside a value the YAML wrote as one scalar
        # anything else is a union member or validator tag that the YAML does not have
    return tuple(path)


def _message(error: Mapping[str, Any], loc: Loc) -> str:
    kind = error["type"]
    if kind == "value_error":
        return str(error.get("ctx", {}).get("error", error["msg"]))
    if kind == "missing":
        return "required"
    if kind == "extra_forbidden":
        key = str(loc[-1]) if loc else ""
        close = [name for name in difflib.get_close_matches(key, _ALL_FIELDS, n=1) if name != key]
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return f"unknown key '{key}'{hint}"
    return str(error["msg"])


def _pydantic_issues(
    error: ValidationError, data: Any, raw: list[_Issue], reported: list[Loc]
) -> list[_Issue]:
    issues: list[_Issue] = []
    for item in error.errors(include_url=False):
        loc = _data_loc(item["loc"], data)
        if any(loc[: len(bad)] == bad for bad in reported):
            continue
        if item["type"] == _CHECK and any(found.loc[: len(loc)] == loc for found in raw):
            continue  # already reported by _cross_checks with a precise path
        issues.append(_Issue(loc, _message(item, loc)))
    return issues


# --- entry points -----------------------------------------------------------------------------


def _parse(
    text: str, source: str, base_dir: Path | None, env: Mapping[str, str], path: Path | None
) -> Config:
    data, document, issues = _compose(text, env)
    lines = document.lines if document else {}
    if not issues and data is None:
        issues = [_Issue((), _EMPTY)]
    elif not issues and not isinstance(data, dict):
        issues = [_Issue((), "the config must be a YAML mapping (listen:, upstreams:, apps:, ...)")]
    if document is None or not isinstance(data, dict):
        raise ConfigError(_problems(issues, lines), source)
    if "source" in data:
        issues.append(_Issue(("source",), "unknown key 'source'"))
    # Top-level x-* keys hold YAML anchors for reuse, as in compose files.
    data = {
        key: value for key, value in data.items() if key != "source" and not key.startswith("x-")
    }
    context: dict[str, Any] = {"base_dir": base_dir, "env": env}
    issues += _cross_checks(data, lines, context)
    config: Config | None = None
    try:
        config = Config.model_validate({**data, "source": path}, context=context)
    except ValidationError as error:
        issues += _pydantic_issues(error, data, list(issues), document.reported)
    if issues or config is None:
        raise ConfigError(_problems(issues, lines), source)
    config._lines = dict(lines)
    return config


def _problems(issues: list[_Issue], lines: Mapping[Loc, int]) -> list[Problem]:
    problems: dict[tuple[str, str], Problem] = {}
    for issue in issues:
        line = issue.line if issue.line is not None else _line_of(lines, issue.loc)
        problem = Problem(_format_loc(issue.loc), issue.message, line)
        problems.setdefault((problem.path, problem.message), problem)
    return sorted(
        problems.values(),
        key=lambda p: (p.line is None, p.line or 0, p.path),
    )


def parse_config(
    text: str,
    *,
    source: str = "<config>",
    base_dir: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> Config:
    """The config in `text`, or ConfigError listing every problem with its path and line.

    `source` names the text in messages; relative paths are taken from `base_dir`;
    `${NAME}` is expanded from `env` (os.environ by default).
    """
    return _parse(text, source, base_dir, os.environ if env is None else env, None)


def load_config(path: Path, env: Mapping[str, str] | None = None) -> Config:
    """The config in the file at `path`, or ConfigError saying what is wrong and how to fix it."""
    path = Path(path)
    source = str(path)
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except FileNotFoundError:
        message = (
            "config file not found; create one with `credproxy init` "
            f"(or `credproxy init --config {path}`), or pass --config PATH"
        )
        raise ConfigError([Problem("", message)], source) from None
    except IsADirectoryError:
        message = "this is a directory; pass the config file itself with --config PATH"
        raise ConfigError([Problem("", message)], source) from None
    except PermissionError:
        message = "cannot read the config file (permission denied); fix its owner or mode"
        raise ConfigError([Problem("", message)], source) from None
    except UnicodeDecodeError as error:
        message = (
            f"the config file is not UTF-8 text (bad byte at offset {error.start}); "
            "save it as UTF-8"
        )
        raise ConfigError([Problem("", message)], source) from None
    except OSError as error:
        message = f"cannot read the config file ({error.strerror or type(error).__name__})"
        raise ConfigError([Problem("", message)], source) from None
    environment = os.environ if env is None else env
    return _parse(text, source, path.absolute().parent, environment, path.absolute())


def credential_warnings(config: Config, stored_names: set[str]) -> list[Problem]:
    """Warnings for secrets the config names that the store does not hold (yet)."""
    warnings: list[Problem] = []

    def warn(loc: Loc, name: str, what: str) -> None:
        message = f"no {what} named '{name}' in the store; add it with `credproxy keys add {name}`"
        warnings.append(Problem(_format_loc(loc), message, _line_of(config._lines, loc), "warning"))

    for upstream_name, upstream in config.upstreams.items():
        for index, credential in enumerate(upstream.credentials):
            if credential.name not in stored_names:
                loc: Loc = ("upstreams", upstream_name, "credentials", index, "name")
                warn(loc, credential.name, "secret")
        secret = upstream.oauth.client_secret if upstream.oauth else None
        if secret is not None and secret not in stored_names:
            warn(("upstreams", upstream_name, "oauth", "client_secret"), secret, "client secret")
    return warnings


def default_config_path(env: Mapping[str, str]) -> Path:
    """$CREDPROXY_CONFIG, else the first of ~/.config/credproxy/config.yaml and
    /etc/credproxy/config.yaml that exists, else the ~/.config one (where `init` writes)."""
    explicit = env.get("CREDPROXY_CONFIG")
    if explicit:
        return Path(_expand_user(explicit, env))
    user = Path(_expand_user(str(USER_CONFIG_PATH), env))
    for candidate in (user, SYSTEM_CONFIG_PATH):
        if candidate.is_file():
            return candidate
    return user
