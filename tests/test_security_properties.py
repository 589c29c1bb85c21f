"""Property-based tests (hypothesis): the path authorised is the path sent, for any path.

Normalisation, `within`, routing and the scope decision are checked against small
reference models written independently of the code under test, over generated
paths built from the pieces attacks are made of (dot-segments in every spelling,
encoded slashes, `;` parameters, double encoding, NUL, stray `%`). A last property
sends generated paths to a running daemon and compares what the upstream received.
"""

from __future__ import annotations

import asyncio
import re
import socket
import urllib.parse
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trustme
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.authorize import CompiledRule, authorize, covers, required_scope
from proxy.config import AppConfig, PathRule, parse_config
from proxy.errors import BadRequest, Forbidden, ProxyError
from proxy.paths import normalise_path, within
from proxy.route import MAIN, resolve
from proxy.runtime import Snapshot
from tests.conftest import server_context, upstream_doc
from tests.fuzz.harness import RawUpstream, status_codes

PROPS = settings(max_examples=400, deadline=None, database=None)

UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
PCHAR = UNRESERVED | frozenset("!$&'()*+,;=:@/%")

# ---- generated paths ----------------------------------------------------------------------

PIECES = [
    "v1", "a", "admin", "summaries", "x.y", "-_~",
    ".", "..", "...", ".%2e", "%2e.", "%2e%2e", "%2E%2E", "%2e", "..;", "..;x=1", ".;", "%2e%2e;p",
    ";", ";x", "a;b", "%3B", "%3b..",
    "%41", "%7e", "%7E", "%61dmin", "%c3%a9", "%C0%AE", "%20",
    "%25", "%252e", "%252e%252e", "%252F", "%2525",
    "%2F", "%2f", "%5C", "%5c", "\\", "%00", "%", "%4", "%zz", "%%",
    "é", " ", "\t", "\"", "<", "{", "|", "^", "`",
    "@", ":", "!$&'()*+,=", "",
]  # fmt: skip
segment = st.one_of(
    st.sampled_from(PIECES),
    st.text(alphabet="ab.%;2eEfF5cC0/", max_size=6),
)
raw_paths = st.lists(segment, max_size=10).map(lambda segs: "/" + "/".join(segs))


# ---- reference models (independent of proxy/paths.py and proxy/authorize.py) ---------------


class Refused(Exception):
    pass


def ref_normalise(raw: str) -> str:
    """RFC 3986 remove_dot_segments after folding repeated slashes, with credproxy's refusals."""
    if not raw.startswith("/") or "\\" in raw or any(c not in PCHAR for c in raw):
        raise Refused
    if re.search(r"%(?![0-9A-Fa-f]{2})", raw):
        raise Refused

    def decode(m: re.Match[str]) -> str:
        code = int(m.group(1), 16)
        if code in (0x00, 0x2F, 0x5C):
            raise Refused
        return chr(code) if chr(code) in UNRESERVED else "%" + m.group(1).upper()

    decoded = re.sub(r"%([0-9A-Fa-f]{2})", decode, raw)
    folded = re.sub(r"/+", "/", decoded)
    stack: list[str] = []
    slash_end = False
    for seg in folded[1:].split("/"):
        if seg.split(";", 1)[0] in (".", "..") and ";" in seg:
            raise Refused
        if seg in (".", ".."):
            if seg == "..":
                if not stack:
                    raise Refused
                stack.pop()
            slash_end = True
        elif seg == "":
            slash_end = True
        else:
            stack.append(seg)
            slash_end = False
    return "/" + "/".join(stack) + ("/" if slash_end and stack else "")


def ref_within(path: str, base: str) -> bool:
    base_segments = [s for s in base.split("/") if s]
    path_segments = path.split("/")[1:]
    return path_segments[: len(base_segments)] == base_segments


def ref_glob(glob: str, path: str) -> bool:
    """`**` any run, `*` a run without '/', `?` one character but '/'; anchored both ends."""
    if not glob:
        return not path
    if glob.startswith("**"):
        return any(ref_glob(glob[2:], path[i:]) for i in range(len(path) + 1))
    if glob[0] == "*":
        i = 0
        while True:
            if ref_glob(glob[1:], path[i:]):
                return True
            if i == len(path) or path[i] == "/":
                return False
            i += 1
    if glob[0] == "?":
        return bool(path) and path[0] != "/" and ref_glob(glob[1:], path[1:])
    return bool(path) and path[0] == glob[0] and ref_glob(glob[1:], path[1:])


REF_METHOD_SCOPE = {"GET": "read", "HEAD": "read", "OPTIONS": "read", "POST": "write"}
REF_METHOD_SCOPE |= {"PUT": "write", "PATCH": "write", "DELETE": "delete"}


def ref_required(method: str, path: str, rules: list[tuple[str, str, str]]) -> str:
    for rule_method, glob, scope in rules:
        if rule_method in ("*", method) and ref_glob(glob, path):
            return scope
    return REF_METHOD_SCOPE.get(method, "admin")


# ---- normalisation ------------------------------------------------------------------------


def _outcome(fn: Any, raw: str) -> str | None:
    try:
        return str(fn(raw))
    except (BadRequest, Refused):
        return None


@PROPS
@given(raw_paths)
def test_normalise_agrees_with_the_reference_model(raw: str) -> None:
    """normalise_path accepts exactly what the reference accepts, and returns the same path."""
    assert _outcome(normalise_path, raw) == _outcome(ref_normalise, raw)


@PROPS
@given(raw_paths)
def test_normal_form_is_safe_and_stable(raw: str) -> None:
    """An accepted path is idempotent and has no dot-segment, `//`, encoded slash, NUL or lower-case escape."""
    try:
        out = normalise_path(raw)
    except BadRequest:
        return
    assert normalise_path(out) == out
    assert out.startswith("/") and "//" not in out and "\\" not in out
    segments = out.split("/")[1:]
    assert all(s.split(";", 1)[0] not in (".", "..") for s in segments)
    assert not re.search(r"%(2f|5c|00)", out, re.IGNORECASE)
    for escape in re.findall(r"%(..)", out):
        assert escape == escape.upper() and chr(int(escape, 16)) not in UNRESERVED
    # one more decoding (what the upstream does) creates no new segment and no dot-segment
    decoded = [urllib.parse.unquote(s) for s in segments]
    assert all("/" not in s and s not in (".", "..") for s in decoded)
    assert [urllib.parse.unquote(s) for s in ref_normalise(raw).split("/")] == ["", *decoded]


@PROPS
@given(raw_paths, st.sampled_from(["", "/v1", "/v1/a", "/admin", "/v1/%C3%A9", "/a;b"]))
def test_within_agrees_with_segment_prefix(raw: str, base: str) -> None:
    """`within` holds exactly when the base's segments are a prefix of the path's (never mid-segment)."""
    try:
        path = normalise_path(raw)
    except BadRequest:
        return
    assert within(path, base) == ref_within(path, base)
    assert within(base + path, base) if base else within(path, base)


# ---- routing ------------------------------------------------------------------------------

CONFIG = """
listen: 127.0.0.1:1
admin_listen: 127.0.0.1:2
store: /nonexistent/store.db
upstreams:
  api:
    base_url: https://api.example.test/v1
    hosts: [api.example.test, alias.example.test]
    credentials: [{name: k, scopes: [read]}]
  deep:
    base_url: https://deep.example.test:8443/a/b
    hosts: [deep.example.test]
    credentials: [{name: k, scopes: [read]}]
  root:
    base_url: https://root.example.test
    credentials: [{name: k, scopes: [read]}]
"""
SNAP = Snapshot.build(parse_config(CONFIG), 1)
UPSTREAMS = SNAP.config.upstreams

queries = st.one_of(st.just(""), st.sampled_from(["?q=1", "?a=%2F..&b=/x", "?", "#frag", "?x#y"]))
origin_form = st.builds(
    lambda prefix, path, q: prefix + path + q,
    st.sampled_from(["/api", "/deep", "/root", "/nope", "", "/API", "/api%2F", "/api;x", "/v1"]),
    raw_paths,
    queries,
)
absolute_form = st.builds(
    lambda scheme, host, path, q: f"{scheme}://{host}{path}{q}",
    st.sampled_from(["http", "https", "HTTP", "ftp"]),
    st.sampled_from(
        [
            "api.example.test",
            "API.Example.Test.",
            "alias.example.test:8080",
            "deep.example.test",
            "root.example.test",
            "evil.example.test",
            "api.example.test@evil.example.test",
            "evil.example.test#@api.example.test",
            "[::1]",
            "127.0.0.1:9",
            "",
        ]
    ),
    raw_paths,
    queries,
)


@PROPS
@given(st.one_of(origin_form, absolute_form), st.sampled_from([MAIN, "api", "deep", "root"]))
def test_route_never_leaves_its_upstream(raw: str, mode: str) -> None:
    """A resolved target is a configured origin plus a normal path within base_path, sent byte for byte."""
    try:
        target = resolve(raw, mode, UPSTREAMS, SNAP.hosts)
    except ProxyError as err:
        assert err.status in (400, 403)
        return
    upstream = UPSTREAMS[target.upstream_name]
    assert target.upstream is upstream
    url = target.url()
    assert f"{url.scheme}://{url.raw_authority}" == upstream.origin
    assert str(url) == upstream.origin + target.path + (f"?{target.query}" if target.query else "")
    assert url.raw_path == target.path
    assert normalise_path(target.path) == target.path
    assert within(target.path, upstream.base_path)
    if raw.startswith("/"):
        if mode == MAIN:
            assert raw.split("/")[1].partition("?")[0].partition("#")[0] == target.upstream_name
        else:
            assert target.upstream_name == mode
    else:
        host = raw.split("://", 1)[1].split("/", 1)[0].lower().rsplit(":", 1)[0].rstrip(".")
        assert SNAP.hosts.get(host) == target.upstream_name


@PROPS
@given(raw_paths)
def test_prefix_route_is_base_path_plus_normal_form(raw: str) -> None:
    """On the main listener `/api<path>` goes to base_path + normalise_path(<path>), or is refused."""
    expected = _outcome(ref_normalise, raw)
    try:
        target = resolve("/api" + raw, MAIN, UPSTREAMS, SNAP.hosts)
    except BadRequest:
        assert expected is None
        return
    assert target.path == "/v1" + str(expected)


# ---- scopes -------------------------------------------------------------------------------

METHODS = ["GET", "HEAD", "OPTIONS", "POST", "PUT", "PATCH", "DELETE", "PROPFIND", "get"]
SCOPES = ["read", "write", "delete", "admin"]
glob_part = st.sampled_from(["v1", "x", "admin", "*", "**", "a?c", "summaries", "", "*.json"])
globs = st.lists(glob_part, min_size=1, max_size=5).map(lambda parts: "/" + "/".join(parts))
rules = st.lists(
    st.tuples(
        st.sampled_from(["*", "GET", "POST", "DELETE", "patch"]), globs, st.sampled_from(SCOPES)
    ),
    max_size=4,
)
paths = st.lists(
    st.sampled_from(["v1", "x", "admin", "abc", "a", "summaries", "f.json", ""]), max_size=5
).map(lambda parts: "/" + "/".join(parts))


@PROPS
@given(st.sampled_from(METHODS), paths, rules)
def test_required_scope_agrees_with_the_reference(
    method: str, path: str, rule_list: list[tuple[str, str, str]]
) -> None:
    """The needed scope is the first matching rule's (method and glob), else the method's: as the reference says."""
    compiled = tuple(
        CompiledRule.of(PathRule(method=m, path=g, scope=s))  # type: ignore[arg-type]
        for m, g, s in rule_list
    )
    normal_rules = [(m.upper(), g, s) for m, g, s in rule_list]
    assert required_scope(method, path, compiled) == ref_required(method, path, normal_rules)


@PROPS
@given(st.frozensets(st.sampled_from(SCOPES)), st.sampled_from(SCOPES), st.sampled_from(METHODS))
def test_covers_and_authorize_agree_with_the_reference(
    held: frozenset[str], needed: str, method: str
) -> None:
    """An app is allowed exactly when it holds the needed scope or admin, and authorize() says the same."""
    assert covers(held, needed) == (needed in held or "admin" in held)
    app = AppConfig.model_validate({"upstreams": {"api": {"scopes": sorted(held) or ["read"]}}})
    granted = frozenset(sorted(held) or ["read"])
    try:
        authorize("app", app, "api", needed)  # type: ignore[arg-type]
        allowed = True
    except Forbidden:
        allowed = False
    assert allowed == (needed in granted or "admin" in granted)


# ---- the same property through a running daemon -------------------------------------------

wire_segment = st.sampled_from(
    [p for p in PIECES if all(33 <= ord(c) < 127 for c in p) and not set(p) & set("?#")]
)
wire_paths = st.lists(wire_segment, max_size=8).map(lambda segs: "/" + "/".join(segs))


@pytest.fixture
async def raw_daemon(ca: trustme.CA, start_daemon: Any, ca_file: Path) -> AsyncIterator[Any]:
    up = await RawUpstream(server_context(ca)).start()
    d = await start_daemon(
        {
            "upstreams": {"api": upstream_doc(up.url, ca_file, retries={"max": 0})},
            "apps": {"app": {"upstreams": {"api": {"scopes": ["read"]}}}},
        },
        {"key-read": "sk_read_property_000", "key-rw": "sk_rw_property_11111"},
    )
    yield up, d
    await up.close()


def _blocking_exchange(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(data)
        out = b""
        while chunk := sock.recv(65536):
            out += chunk
    return out


async def test_daemon_sends_exactly_the_normal_form(raw_daemon: Any) -> None:
    """For generated paths, the daemon refuses with 400 exactly when the model does, else the upstream receives base + normal form."""
    up, d = raw_daemon
    port = int(d.url.rsplit(":", 1)[1])
    head = f"Host: 127.0.0.1:{port}\r\nAuthorization: Bearer {d.tokens['app']}\r\n"

    @settings(
        max_examples=60,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(wire_paths)
    def check(raw: str) -> None:
        before = len(up.requests)
        request = f"GET /api{raw}?k=%2F HTTP/1.1\r\n{head}Connection: close\r\n\r\n"
        answer = _blocking_exchange(port, request.encode())
        expected = _outcome(ref_normalise, raw)
        seen = up.requests[before:]
        if expected is None:
            assert status_codes(answer) == [400], (raw, answer[:200])
            assert seen == []
        else:
            assert status_codes(answer) == [200], (raw, answer[:200])
            assert [r.target for r in seen] == ["/v1" + expected + "?k=%2F"]

    await asyncio.to_thread(check)
    assert up.errors == []


def test_config_yaml_is_what_the_routes_use() -> None:
    """Control: the routing properties above run against the upstreams the YAML declares."""
    doc = yaml.safe_load(CONFIG)
    assert set(UPSTREAMS) == set(doc["upstreams"])
    assert UPSTREAMS["deep"].base_path == "/a/b" and UPSTREAMS["root"].base_path == ""
