"""Request-path normalisation: the one path that is both authorised and sent.

A raw request path is decoded only where decoding cannot change its meaning
(unreserved characters), dot-segments are resolved and repeated slashes folded.
Anything that could make two components disagree about the path (an encoded
slash or backslash, a NUL, a climb above the root, a dot-segment carrying
";parameters") is refused, never repaired.
"""

from __future__ import annotations

from .errors import BadRequest

_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
# Characters allowed to stand unencoded in a path (RFC 3986 pchar plus "/").
_PCHAR = frozenset(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~!$&'()*+,;=:@/%"
)
_HEX = frozenset("0123456789ABCDEFabcdef")


def _decode_unreserved(raw: str) -> str:
    """Decode %XX only for unreserved characters; upper-case every other escape."""
    out: list[str] = []
    i = 0
    n = len(raw)
    while i < n:
        ch = raw[i]
        if ch == "%":
            pair = raw[i + 1 : i + 3]
            if len(pair) != 2 or pair[0] not in _HEX or pair[1] not in _HEX:
                raise BadRequest("malformed percent-encoding in the request path")
            code = int(pair, 16)
            if code in (0x2F, 0x5C):
                raise BadRequest("an encoded slash or backslash is not allowed in the path")
            if code == 0:
                raise BadRequest("a NUL byte is not allowed in the path")
            if code == 0x25:
                # "%25" stays encoded; a later decoder must never see a fresh escape.
                out.append("%25")
            elif chr(code) in _UNRESERVED:
                out.append(chr(code))
            else:
                out.append("%" + pair.upper())
            i += 3
            continue
        if ch == "\\":
            raise BadRequest("a backslash is not allowed in the path")
        if ch not in _PCHAR:
            raise BadRequest("the request path has a character that must be percent-encoded")
        out.append(ch)
        i += 1
    return "".join(out)


def normalise_path(raw: str) -> str:
    """Return the normal form of an origin-form path (no query), or raise BadRequest.

    The result starts with "/", has no "." or ".." segments, no empty segments
    except a trailing slash, and only unreserved characters decoded.
    """
    if not raw.startswith("/"):
        raise BadRequest("the request path must start with '/'")
    decoded = _decode_unreserved(raw)
    segments: list[str] = []
    parts = decoded.split("/")[1:]
    for index, seg in enumerate(parts):
        last = index == len(parts) - 1
        if ";" in seg and seg.partition(";")[0] in (".", ".."):
            # Tomcat, Jetty and Spring drop ";params" first and then read "..;x" as "..".
            raise BadRequest(
                "a dot-segment with parameters (like '..;') is not allowed in the path"
            )
        if seg == "" and not last:
            continue
        if seg == ".":
            if last:
                segments.append("")
            continue
        if seg == "..":
            if not segments or segments == [""]:
                raise BadRequest("the request path climbs above its root")
            segments.pop()
            if last:
                segments.append("")
            continue
        segments.append(seg)
    return "/" + "/".join(segments)


def within(path: str, base: str) -> bool:
    """True when a normalised `path` lies at or under the normalised `base` path."""
    if not base or base == "/":
        return True
    return path == base or path.startswith(base + "/")
