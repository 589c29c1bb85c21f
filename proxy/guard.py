"""The first stage: refuse what a browser or a rebinding DNS name could send.

A web page can make a browser send requests to 127.0.0.1, and a rebinding DNS
name can make it look same-origin. So before anything else, the Host header
must name this listener (a loopback name and its port on a loopback listener),
and any request carrying a browser `Origin` is refused: credproxy never answers
CORS, so no page can read what it returns or spend the keys behind it. Requests
a browser sends without an Origin (an <img>, a <script>, a navigation) are told
apart by their Fetch Metadata: any `Sec-Fetch-Site` but `none` (typed by the
user) is a page's doing and is refused too. Refusals never echo the Host sent.
"""

from __future__ import annotations

import functools
import re
from ipaddress import ip_address

from aiohttp import hdrs
from multidict import CIMultiDictProxy

from .config import ListenAddress
from .errors import BadRequest, Forbidden

_REG_NAME = re.compile(
    r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*\.?$"
)
_HOST = re.compile(r"^(?P<name>\[[0-9a-f:.]+\]|[^:\[\]]+)(?::(?P<port>[0-9]{1,5}))?$")


@functools.lru_cache(maxsize=256)
def split_host(value: str) -> tuple[str, int | None]:
    """`name[:port]` -> (lower-case name, port); BadRequest if it is not a valid authority."""
    m = _HOST.match(value.strip().lower())
    if m is None:
        raise BadRequest("malformed Host header")
    name, port_text = m.group("name"), m.group("port")
    port = int(port_text) if port_text else None
    if port is not None and not 0 < port < 65536:
        raise BadRequest("malformed Host header")
    if name.startswith("["):
        try:
            ip_address(name[1:-1])
        except ValueError:
            raise BadRequest("malformed Host header") from None
    elif not _REG_NAME.match(name):
        raise BadRequest("malformed Host header")
    return name, port


@functools.lru_cache(maxsize=256)
def is_loopback_name(name: str) -> bool:
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ip_address(name.strip("[]")).is_loopback
    except ValueError:
        return False


# id(address) -> (address, is loopback): a pydantic model hashes field by field, so the answer
# is kept per listener object. The object is kept in the entry, so a reused id never matches.
_LOOPBACK: dict[int, tuple[ListenAddress, bool]] = {}


def _loopback_listener(address: ListenAddress) -> bool:
    entry = _LOOPBACK.get(id(address))
    if entry is None or entry[0] is not address:
        if len(_LOOPBACK) >= 64:
            _LOOPBACK.clear()
        entry = _LOOPBACK[id(address)] = (address, address.is_loopback())
    return entry[1]


def check_request(
    headers: CIMultiDictProxy[str], raw_target: str, address: ListenAddress | None
) -> None:
    """Raise BadRequest/Forbidden unless Host and Origin are acceptable for this listener."""
    hosts = headers.getall(hdrs.HOST, ())
    if len(hosts) != 1:
        raise BadRequest("exactly one Host header is required")
    name, port = split_host(hosts[0])
    if hdrs.ORIGIN in headers:
        raise Forbidden(
            "requests from web pages (with an Origin header) are refused: credproxy "
            "serves local programs, not browsers"
        )
    if hdrs.SEC_FETCH_SITE in headers and any(
        v.strip().lower() != "none" for v in headers.getall(hdrs.SEC_FETCH_SITE)
    ):
        raise Forbidden(
            "requests from web pages (Sec-Fetch-Site) are refused: credproxy "
            "serves local programs, not browsers"
        )
    if not raw_target.startswith("/"):
        # Forward-proxy form: the URI names the destination, and the Host header must agree.
        authority = raw_target.partition("://")[2].partition("/")[0].partition("?")[0]
        uri_name, uri_port = split_host(authority)
        if (uri_name, uri_port or 80) != (name, port or 80):
            raise BadRequest("the Host header does not match the request URI")
        return
    if address is None or address.kind == "unix":
        return  # a unix socket cannot be reached by a browser
    expected_port = address.port
    if (port or 80) != expected_port:
        raise Forbidden(f"the Host header does not name this listener (port {expected_port})")
    if _loopback_listener(address) and not is_loopback_name(name):
        # DNS rebinding: a foreign name that resolves to 127.0.0.1.
        raise Forbidden("the Host header is not a loopback name; use 127.0.0.1 or localhost")
