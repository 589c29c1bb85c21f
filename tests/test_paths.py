"""Path normalisation and scope decisions: the path checked is the path sent."""

from __future__ import annotations

import pytest

from proxy.authorize import CompiledRule, covers, glob_to_regex, required_scope
from proxy.errors import BadRequest
from proxy.paths import normalise_path, within


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("/v1/conversations", "/v1/conversations"),
        ("/v1//conversations", "/v1/conversations"),
        ("//v1///x", "/v1/x"),
        ("/v1/./x/../y", "/v1/y"),
        ("/v1/%2e%2e/v2", "/v2"),
        ("/v1/%2E/x", "/v1/x"),
        ("/%7Euser/%41%62", "/~user/Ab"),
        ("/a%20b/%e2%82%ac", "/a%20b/%E2%82%AC"),
        ("/v1/x/", "/v1/x/"),
        ("/v1/x/..", "/v1/"),
        ("/v1/%252e%252e/x", "/v1/%252e%252e/x"),
        ("/", "/"),
    ],
)
def test_normalises(raw: str, expected: str) -> None:
    """Unreserved escapes are decoded, dot-segments resolved, repeated slashes folded."""
    assert normalise_path(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [
        "/v1/a%2Fb",
        "/v1/a%2fb",
        "/v1/a%5Cb",
        "/v1/a\\b",
        "/..",
        "/v1/../..",
        "/%2e%2e/x",
        "/v1/%00",
        "/v1/%zz",
        "/v1/%4",
        "/v1/a b",
        "v1/x",
    ],
)
def test_refuses(raw: str) -> None:
    """Encoded slashes, backslashes, NUL, bad escapes and climbs above the root are 400."""
    with pytest.raises(BadRequest):
        normalise_path(raw)


def test_normal_form_is_stable() -> None:
    """Normalising twice changes nothing (no double-decoding surprises)."""
    for raw in ("/v1/%41/%2e%2e/b", "/x/%25/y", "/a/./b//c/../d"):
        once = normalise_path(raw)
        assert normalise_path(once) == once


def test_within() -> None:
    """A path is within its base only at a segment boundary."""
    assert within("/v1/x", "/v1")
    assert within("/v1", "/v1")
    assert not within("/v10/x", "/v1")
    assert within("/anything", "")


@pytest.mark.parametrize(
    ("method", "path", "scope"),
    [
        ("GET", "/v1/conversations", "read"),
        ("HEAD", "/v1/x", "read"),
        ("OPTIONS", "/v1/x", "read"),
        ("POST", "/v1/conversations", "write"),
        ("PUT", "/v1/conversations/1", "write"),
        ("PATCH", "/v1/conversations/1", "write"),
        ("DELETE", "/v1/conversations/1", "delete"),
        ("PROPFIND", "/v1/x", "admin"),
        ("POST", "/v1/conversations/abc/summaries", "read"),
        ("POST", "/v1/conversations/abc/def/summaries", "write"),
        ("GET", "/v1/admin/users", "admin"),
        ("GET", "/v1/admin/a/b/c", "admin"),
    ],
)
def test_required_scope(method: str, path: str, scope: str) -> None:
    """First matching path rule wins, else the method's scope; `*` stays in one segment."""
    from proxy.config import PathRule

    rules = tuple(
        CompiledRule.of(PathRule(method=m, path=p, scope=s))  # type: ignore[arg-type]
        for m, p, s in [
            ("POST", "/v1/conversations/*/summaries", "read"),
            ("*", "/v1/admin/**", "admin"),
        ]
    )
    assert required_scope(method, path, rules) == scope


def test_glob() -> None:
    """Globs are anchored at both ends."""
    assert glob_to_regex("/v1/*").match("/v1/x")
    assert not glob_to_regex("/v1/*").match("/v1/x/y")
    assert not glob_to_regex("/v1/x").match("/v1/xy")


def test_admin_covers_everything() -> None:
    """The admin scope covers every other scope."""
    assert covers(frozenset({"admin"}), "delete")
    assert not covers(frozenset({"read"}), "write")
