"""The request hot path's shortcuts give exactly the answers of the general code they skip.

The credential table is `route.candidates` computed once per config version, `try_acquire` is
`acquire` for a request that may go at once, and the access line written directly is the line
the logging formatter would have written.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import time
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from proxy import logs
from proxy.config import SCOPES, QueueConfig, RateLimitConfig, parse_config
from proxy.errors import CredentialUnavailable, RateLimitExceeded
from proxy.metrics import Metrics
from proxy.pipeline import Pipeline, access_log
from proxy.ratelimit import Limiter
from proxy.route import MAIN, candidates, resolve
from proxy.runtime import Snapshot
from proxy.secret import Secret


def _config(credentials: list[dict[str, Any]], *, oauth: bool = False) -> Any:
    upstream: dict[str, Any] = {
        "base_url": "https://api.example.com/v1",
        "credentials": credentials,
    }
    if oauth:
        upstream["oauth"] = {
            "grant": "client_credentials",
            "token_url": "https://api.example.com/oauth/token",
            "client_id": "c",
            "client_secret": "oauth-client",
            "scopes": ["read", "write"],
        }
    doc = {
        "upstreams": {"api": upstream},
        "apps": {"app": {"upstreams": {"api": {"scopes": ["read", "write", "delete"]}}}},
    }
    return parse_config(yaml.safe_dump(doc))


CREDENTIALS = [
    {"name": "k-admin", "scopes": ["admin"]},
    {"name": "k-rwd", "scopes": ["read", "write", "delete"]},
    {"name": "k-read", "scopes": ["read"]},
    {"name": "k-write", "scopes": ["write"]},
]


@pytest.mark.parametrize("oauth", [False, True])
def test_credential_table_is_candidates(oauth: bool) -> None:
    """Every (scope, OAuth in play) entry is `candidates`' list; uncovered ones are left out."""
    config = _config(CREDENTIALS[1:3], oauth=oauth)
    snap = Snapshot.build(config, 1)
    upstream = config.upstreams["api"]
    for needed in SCOPES:
        for with_oauth in (False, True):
            try:
                expected: tuple[Any, ...] | None = tuple(
                    candidates("api", upstream, needed, oauth=with_oauth)
                )
            except CredentialUnavailable:
                expected = None
            assert snap.credentials.get(("api", needed, with_oauth)) == expected, (
                needed,
                with_oauth,
            )


class _Vault:
    def __init__(self, names: set[str]) -> None:
        self.names = names

    def secret(self, name: str) -> Secret | None:
        return Secret(f"sk_{name}_000000") if name in self.names else None


def _pick(snap: Snapshot, vault: _Vault, needed: str) -> str:
    pipeline = Pipeline(
        lambda: snap,
        lambda: vault,  # type: ignore[arg-type,return-value]
        None,  # type: ignore[arg-type]
        Metrics(),
        None,  # type: ignore[arg-type]
    )
    target = resolve("/api/things", MAIN, snap.config.upstreams, snap.hosts)
    manager = pipeline._oauth().get(target.upstream_name)
    return pipeline._credential(snap, vault, target, needed, manager).name  # type: ignore[arg-type]


def test_least_privileged_present_key_across_reloads_and_store_changes() -> None:
    """The table changes with the config version; presence in the store is asked each time."""
    vault = _Vault({"k-rwd", "k-admin"})
    v1 = Snapshot.build(_config(CREDENTIALS[:2]), 1)
    assert _pick(v1, vault, "read") == "k-rwd"
    assert _pick(v1, vault, "admin") == "k-admin"
    v2 = Snapshot.build(_config(CREDENTIALS), 2)  # a reload adds k-read and k-write
    assert _pick(v2, vault, "read") == "k-rwd"  # not in the store yet
    vault.names.add("k-read")  # `keys add` while the daemon runs
    assert _pick(v2, vault, "read") == "k-read"
    assert _pick(v2, vault, "write") == "k-rwd"
    vault.names.add("k-write")
    assert _pick(v2, vault, "write") == "k-write"
    vault.names.discard("k-read")  # `keys rm`
    assert _pick(v2, vault, "read") == "k-rwd"
    with pytest.raises(CredentialUnavailable, match="no credential with the 'admin'"):
        _pick(Snapshot.build(_config(CREDENTIALS[1:]), 3), vault, "admin")
    with pytest.raises(CredentialUnavailable, match="credproxy keys add"):
        _pick(v2, _Vault(set()), "read")


# --------------------------------------------------------------------------- limiter


def _limiter(per_minute: int) -> Limiter:
    return Limiter("api/k", RateLimitConfig(per_minute=per_minute), QueueConfig(max_wait=3600.0))


async def test_try_acquire_spends_what_acquire_spends() -> None:
    fast, slow = _limiter(3), _limiter(3)
    for _ in range(3):
        assert fast.try_acquire("a")
        await slow.acquire("a", deadline=1e18)
    assert fast.snapshot() == slow.snapshot()
    # The budget binds: nothing is spent, and acquire refuses as it would have.
    before = fast.snapshot()
    assert not fast.try_acquire("a")
    assert fast.snapshot() == before
    with pytest.raises(RateLimitExceeded):
        await fast.acquire("a", deadline=0.0)


async def test_try_acquire_never_jumps_a_queue() -> None:
    lim = _limiter(1)
    assert lim.try_acquire("a")
    waiter = asyncio.create_task(lim.acquire("a", deadline=1e18))
    await asyncio.sleep(0)
    assert lim.depth == 1
    assert not lim.try_acquire("a")  # its own app has a waiter ahead
    waiter.cancel()
    await asyncio.gather(waiter, return_exceptions=True)


def test_try_acquire_leaves_a_fleet_budget_to_acquire() -> None:
    class Budget:
        def bind(self, *_a: Any) -> None:
            pass

    lim = Limiter("api/k", None, QueueConfig(), budget=Budget())  # type: ignore[arg-type]
    assert not lim.try_acquire("a")


# --------------------------------------------------------------------------- access line


@pytest.fixture
def installed() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    saved = (list(root.handlers), root.level, logs._installed)
    stream = io.StringIO()
    yield stream
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in saved[0]:
        root.addHandler(handler)
    root.setLevel(saved[1])
    logs._installed = saved[2]


EXTRA = {
    "app": "a",
    "upstream": "api",
    "method": "GET",
    "path": "/v1/x",
    "status": 200,
    "duration_ms": 1.25,
    "bytes_in": 0,
    "bytes_out": 12,
    "credential": "k-read",
    "error": None,
    "retries": 0,
}


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_direct_access_line_is_the_formatters_line(installed: io.StringIO, fmt: str) -> None:
    logs.setup_logging("info", fmt, installed)
    handler = logs.direct_handler(access_log)
    assert handler is not None
    message = "GET api /v1/x cred=k-read app=a status=200 1.2ms in=0 out=12"
    logs.write_direct(handler, access_log, message, dict(EXTRA))
    record = access_log.makeRecord(
        access_log.name,
        logging.INFO,
        "",
        0,
        message,
        (),
        None,
        extra={**EXTRA, logs.PRE_REDACTED: True},
    )
    access_log.handle(record)
    direct, generic = installed.getvalue().splitlines()
    if fmt == "json":
        a, b = json.loads(direct), json.loads(generic)
        assert list(a) == list(b)
        assert abs(a.pop("ts") - b.pop("ts")) < 1
        assert a == b
    else:
        assert direct[20:] == generic[20:]  # the timestamp may have turned a second


def test_direct_access_line_only_when_nothing_else_listens(installed: io.StringIO) -> None:
    logs.setup_logging("info", "text", installed)
    assert logs.direct_handler(access_log) is not None
    extra = logging.StreamHandler(io.StringIO())
    logging.getLogger().addHandler(extra)  # a second listener, as pytest's caplog adds
    assert logs.direct_handler(access_log) is None
    logging.getLogger().removeHandler(extra)
    access_log.addFilter(lambda _r: True)
    try:
        assert logs.direct_handler(access_log) is None
    finally:
        access_log.filters.clear()
    logging.getLogger().setLevel(logging.WARNING)
    assert logs.direct_handler(access_log) is None


async def test_direct_lines_are_written_at_the_end_of_the_loop_turn_in_order(
    installed: io.StringIO,
) -> None:
    """Lines written directly in one loop iteration go out together at its end; a record
    logged the generic way meanwhile comes after them, and flush() writes what is pending."""
    logs.setup_logging("info", "text", installed)
    handler = logs.direct_handler(access_log)
    assert handler is not None
    logs.write_direct(handler, access_log, "first")
    logs.write_direct(handler, access_log, "second")
    assert installed.getvalue() == ""
    await asyncio.sleep(0)
    assert [line.split(": ", 1)[1] for line in installed.getvalue().splitlines()] == [
        "first",
        "second",
    ]
    logs.write_direct(handler, access_log, "third")
    logging.getLogger("credproxy").warning("then a warning")
    logs.write_direct(handler, access_log, "fourth")
    handler.flush()
    tail = [line.split(": ", 1)[1] for line in installed.getvalue().splitlines()[2:]]
    assert tail == ["third", "then a warning", "fourth"]


def _four_passes(r: logs.Redactor, text: str) -> str:
    """The redaction without the one-search shortcut."""
    pattern = r._compiled()
    if pattern is not None:
        text = pattern.sub(logs.MASK, text)
    text = logs._PATTERNS[0].sub(lambda m: f"{m.group(1)} {logs.MASK}", text)
    text = logs._PATTERNS[1].sub("cpx_" + logs.MASK, text)
    return logs._PATTERNS[2].sub(lambda m: f"{m.group(1)}{m.group(2)}{logs.MASK}", text)


def test_redactor_shortcut_changes_nothing() -> None:
    """A line no pass would change is returned after one search; every other line is
    redacted by the same passes as before."""
    r = logs.Redactor()
    samples = [
        "/v1/auth/test",
        "/v1/conversations/123/messages?limit=10",
        "/v1/x?api_key=abc&b=2",
        "Authorization: Bearer abc.def",
        "BASIC dXNlcjpwYXNz",
        "tok cpx_abcdefghijkl and cpx_short",
        'PASSWORD: "p" Client_Secret=zz',
        "path/sk_live_secret_123/x",
        "sk_live_secret_12",
        "",
    ]
    for text in samples:
        assert r(text) == _four_passes(r, text), text
    r.add("sk_live_secret_123")
    r.add('quo"te\\secret')
    samples += ['{"k": "quo\\"te\\\\secret"}', "'sk_live_secret_123'"]
    for text in samples:
        assert r(text) == _four_passes(r, text), text
    assert r("path/sk_live_secret_123/x") == "path/[REDACTED]/x"
    assert r("/v1/auth/test") == "/v1/auth/test"


def test_remembered_paths_are_redacted_again_once_a_secret_is_added() -> None:
    """`Redactor.path` answers as the redactor does, also after a path became secret-bearing."""
    r = logs.Redactor()
    path = "/v1/keys/abcdef123456/rotate"
    assert r.path(path) == path
    assert r.path(path) == path  # remembered
    r.add("abcdef123456")
    assert r.path(path) == r(path) == "/v1/keys/[REDACTED]/rotate"
    for i in range(logs.PATHS_KEPT + 5):  # bounded: emptied when full
        assert r.path(f"/v1/items/{i}") == f"/v1/items/{i}"
    assert len(r._paths) <= logs.PATHS_KEPT


# --------------------------------------------------------------------------- metrics


def test_tallies_render_what_prometheus_client_children_render() -> None:
    """The plain counts behind credproxy_requests and credproxy_upstream_seconds give the same
    samples as a prometheus_client Counter and Histogram fed the same requests."""
    from prometheus_client import CollectorRegistry, Counter, Histogram
    from prometheus_client.parser import text_string_to_metric_families

    from proxy.metrics import _BUCKETS, Metrics, generate_latest

    metrics = Metrics()
    registry = CollectorRegistry()
    counter = Counter("credproxy_requests", "x", ("app", "upstream", "status"), registry=registry)
    histogram = Histogram(
        "credproxy_upstream_seconds", "x", ("upstream",), buckets=_BUCKETS, registry=registry
    )
    answers = [("a", "api", 200), ("a", "api", 200), ("b", "api", 429), ("a", "other", 503)]
    for app, upstream, status in answers:
        metrics.tallies.count(app, upstream, status)
        counter.labels(app, upstream, str(status)).inc()
    latencies = [0.0, 0.004, 0.005, 0.0051, 1, 2.4999, 300, 300.5, 1e6]
    for i, seconds in enumerate(latencies):
        upstream = "api" if i % 3 else "other"
        metrics.tallies.upstream(upstream).observe(seconds)
        histogram.labels(upstream).observe(seconds)

    def samples(text: bytes) -> dict[str, set[tuple[Any, ...]]]:
        return {
            f.name: {(s.name, tuple(sorted(s.labels.items())), s.value) for s in f.samples}
            for f in text_string_to_metric_families(text.decode())
        }

    ours, theirs = samples(metrics.render()), samples(generate_latest(registry))
    for family in ("credproxy_requests", "credproxy_upstream_seconds"):
        assert ours[family] == theirs[family]
    # A counter's `_created` is the time of its first count: both within this test's run.
    now = time.time()
    created = [
        {(labels, v) for _n, labels, v in f["credproxy_requests_created"]} for f in (ours, theirs)
    ]
    assert {labels for labels, _v in created[0]} == {labels for labels, _v in created[1]}
    assert len(created[0]) == 3 and all(now - 60 < v <= now for _l, v in created[0])
