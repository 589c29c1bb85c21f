"""Scopes: which scope a request needs, and whether the calling app has it.

The needed scope comes from the first matching path rule of the upstream, else
from the method. The check runs on the normalised path, the same string that
is sent upstream, so no spelling of a path can pass the check as one path and
reach the API as another.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .config import AppConfig, PathRule, Scope
from .errors import Forbidden

METHOD_SCOPES: dict[str, Scope] = {
    "GET": "read",
    "HEAD": "read",
    "OPTIONS": "read",
    "POST": "write",
    "PUT": "write",
    "PATCH": "write",
    "DELETE": "delete",
}


def glob_to_regex(glob: str) -> re.Pattern[str]:
    """`*` matches within one path segment, `**` across segments, `?` one character."""
    out: list[str] = []
    i = 0
    while i < len(glob):
        if glob.startswith("**", i):
            out.append(".*")
            i += 2
        elif glob[i] == "*":
            out.append("[^/]*")
            i += 1
        elif glob[i] == "?":
            out.append("[^/]")
            i += 1
        else:
            out.append(re.escape(glob[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


@dataclass(frozen=True, slots=True)
class CompiledRule:
    """A path rule with its glob compiled once per config version."""

    method: str
    pattern: re.Pattern[str]
    scope: Scope

    @classmethod
    def of(cls, rule: PathRule) -> CompiledRule:
        return cls(rule.method.upper(), glob_to_regex(rule.path), rule.scope)


def required_scope(method: str, path: str, rules: tuple[CompiledRule, ...]) -> Scope:
    """The scope a request needs: first matching rule, else the method's scope."""
    for rule in rules:
        if (rule.method == "*" or rule.method == method) and rule.pattern.match(path):
            return rule.scope
    return METHOD_SCOPES.get(method, "admin")


def covers(scopes: frozenset[str], needed: str) -> bool:
    return needed in scopes or "admin" in scopes


def authorize(app_name: str, app: AppConfig, upstream: str, needed: Scope) -> None:
    """Raise Forbidden unless the app may use `upstream` with scope `needed`."""
    grant = app.upstreams.get(upstream)
    if grant is None:
        raise Forbidden(f"app '{app_name}' has no access to upstream '{upstream}'")
    if not covers(grant.scopes, needed):
        raise Forbidden(f"app '{app_name}' lacks the '{needed}' scope on upstream '{upstream}'")
