"""A config snapshot with the tables a request needs precomputed.

A request takes one snapshot at its start and uses it to the end, so a reload
never changes the rules under a request in flight; the snapshot is swapped
whole, never edited.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from .authorize import CompiledRule
from .config import SCOPES, Config, CredentialRef
from .errors import CredentialUnavailable
from .route import candidates

# (upstream, needed scope, OAuth grant in play) -> credentials that cover it, least privileged first
CredentialTable = dict[tuple[str, str, bool], tuple[CredentialRef, ...]]


def credential_table(config: Config) -> CredentialTable:
    """`route.candidates` for every upstream and scope, computed once per config version.

    A combination no credential covers is left out: the request path then asks
    `candidates` itself, which raises the error that says so.
    """
    table: CredentialTable = {}
    for name, upstream in config.upstreams.items():
        for needed in SCOPES:
            for oauth in (False, True):
                try:
                    refs = candidates(name, upstream, needed, oauth=oauth)
                except CredentialUnavailable:
                    continue
                table[(name, needed, oauth)] = tuple(refs)
    return table


@dataclass(frozen=True)
class Snapshot:
    """One loaded config version and its look-up tables."""

    config: Config
    version: int
    loaded_at: float = field(default_factory=time.time)
    hosts: dict[str, str] = field(default_factory=dict)  # forward-proxy host -> upstream
    rules: dict[str, tuple[CompiledRule, ...]] = field(default_factory=dict)
    config_tokens: dict[str, str] = field(default_factory=dict)  # token sha256 -> app
    credentials: CredentialTable = field(default_factory=dict)  # see credential_table

    @classmethod
    def build(cls, config: Config, version: int) -> Snapshot:
        hosts = {host: name for name, up in config.upstreams.items() for host in up.hosts}
        rules = {
            name: tuple(CompiledRule.of(rule) for rule in up.path_rules)
            for name, up in config.upstreams.items()
        }
        tokens = {h: name for name, app in config.apps.items() for h in app.token_sha256}
        return cls(
            config,
            version,
            hosts=hosts,
            rules=rules,
            config_tokens=tokens,
            credentials=credential_table(config),
        )
