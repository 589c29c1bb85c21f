"""Fleet mode in process against real Redis servers: the scripts, leases, degradation,
fencing and sealing, and the ways to reach Redis (TLS with an ACL user, Sentinel, Cluster).

Windows are shortened (ratelimit.WINDOWS) so that several pass within a test; the Limiters
are the daemon's own, with a FleetBudget each, one Fleet per simulated instance.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from proxy import ratelimit
from proxy.config import ConfigError, QueueConfig, RateLimitConfig, StateConfig, parse_config
from proxy.errors import RateLimitExceeded
from proxy.fleet import Fleet, StateUnavailable, public_url
from proxy.oauth import SharedTokens, ShareUnavailable
from proxy.ratelimit import Limiter
from proxy.sandbox import Sandbox
from proxy.secret import Secret
from proxy.server import free_port
from tests.test_fleet_support import (
    RedisServer,
    max_in_window,
    needs_redis,
    running_redis,
    wait_port,
)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    yield from running_redis(tmp_path)


# The least an ACL user needs, as docs/FLEET.md lists it.
ACL_COMMANDS = (
    "+@scripting +get +set +incr +exists +pttl +del +time +zadd +zrem +zcard +zcount +zrange "
    "+zscore +zremrangebyscore +pexpire +hset +hget +hdel +hmget +publish +subscribe +unsubscribe +ping"
)
QUEUE = QueueConfig(max_size=10_000, max_wait=30)
KEY = b"m" * 32


# The shortened "minute": the plan's window, as the API counts it. The fleet counts each entry
# for W' = MINUTE * (1 + PACE_MARGIN) + WINDOW_SLACK; the slack is there for the jitter between
# a grant and its arrival, which the tests' own recording of grant times has too (a worker on a
# busy machine notes its grant late), so the plan is checked on MINUTE, as the API would.
MINUTE = 1.0


@pytest.fixture
def short_window(monkeypatch: pytest.MonkeyPatch) -> float:
    """A 1 s "minute", so that a window passes quickly; returns the fleet's W'."""
    monkeypatch.setattr(ratelimit, "WINDOWS", (("per_minute", MINUTE), ("per_hour", 3600.0)))
    return MINUTE * (1 + ratelimit.PACE_MARGIN) + 0.25


@pytest.fixture
async def fleets() -> AsyncIterator[list[Fleet]]:
    made: list[Fleet] = []
    yield made
    for fleet in made:
        await fleet.close()


async def _fleet(made: list[Fleet], url: str, **state: Any) -> Fleet:
    fleet = Fleet(StateConfig(backend="redis", url=url, key_prefix="t:", **state), KEY)
    await fleet.start()
    made.append(fleet)
    return fleet


def _limiter(fleet: Fleet, limit: RateLimitConfig, name: str = "c") -> Limiter:
    return Limiter(f"u/{name}", limit, QUEUE, budget=fleet.budget("u", name, limit))


async def _saturate(
    limiters: list[Limiter],
    until: float | list[float],
    sent: list[tuple[float, int]],
    per: int = 4,
    local: list[tuple[float, int]] | None = None,
) -> None:
    """Keep `per` requests waiting on each limiter until `until` (or until[0], which may move);
    what was granted goes to `sent` as (time, limiter), and to `local` if on a local share."""
    end = until if isinstance(until, list) else [until]

    async def worker(limiter: Limiter, i: int) -> None:
        while time.monotonic() < end[0]:
            try:
                await limiter.acquire("app", deadline=min(end[0], time.monotonic() + 0.5))
                sent.append((time.monotonic(), i))
                if local is not None and limiter.snapshot()["fleet"]["mode"] == "local":
                    local.append((time.monotonic(), i))
            except RateLimitExceeded:
                await asyncio.sleep(0.01)

    await asyncio.gather(*(worker(lim, i) for i, lim in enumerate(limiters) for _ in range(per)))


# --- config --------------------------------------------------------------------------------------


def test_state_config_fields() -> None:
    """The fleet's keys: URL schemes, prefix without braces, the local share and its default."""
    doc = "state: {backend: redis, url: 'redis+sentinel://h1:26379,h2:26379/mymaster'}\n"
    state = parse_config(doc).state
    assert state is not None and state.share == 0.1 and state.on_failure == "local"
    state = parse_config("state: {backend: redis, url: 'rediss://x', instances: 4}\n").state
    assert state is not None and state.share == 0.25
    doc = "state: {backend: redis, url: 'redis://x', instances: 4, local_share: 0.5}\n"
    state = parse_config(doc).state
    assert state is not None and state.share == 0.5
    for bad, where in [
        ("url: 'http://:hunter2@x'", "state.url"),
        ("url: 'redis://x', key_prefix: 'a{b}'", "state.key_prefix"),
        ("url: 'redis://x', local_share: 1.5", "state.local_share"),
        ("url: 'redis://x', local_share: 0", "state.local_share"),
        ("url: 'redis://x', instances: 0", "state.instances"),
        ("url: 'redis://x', on_failure: open", "state.on_failure"),
        ("url: 'redis://:hunter2@x:port'", "state.url"),
        ("url: 'redis+sentinel://:hunter2@s1:26379'", "state.url"),
        ("url: 'redis://:hunter2@x:6379/zero'", "state.url"),
    ]:
        with pytest.raises(ConfigError) as caught:
            parse_config(f"state: {{backend: redis, {bad}}}\n")
        assert where in str(caught.value)
        assert "hunter2" not in str(caught.value)
    assert public_url("rediss://user:pw@h:6380/0?x=1") == "rediss://h:6380/0"


# --- sealing ------------------------------------------------------------------------------------


@needs_redis
async def test_tokens_in_redis_are_sealed_and_bound_to_their_key(
    redis_server: RedisServer, fleets: list[Fleet]
) -> None:
    """The record is AES-GCM sealed: no token in Redis, no use under another key or master key."""
    fleet = await _fleet(fleets, redis_server.url)
    shared = fleet.tokens("up")
    record = Secret(
        json.dumps({"access_token": "at-very-secret-1", "refresh_token": "rt-secret-2"})
    )
    gen = await shared.offer(SharedTokens(record, 0, time.time()))
    assert gen == 1
    dump = redis_server.cli("--no-raw", "hgetall", "t:{up/oauth}:tokens")
    assert "secret" not in dump and "gen" in dump
    back = await shared.read()
    assert back is not None and back.record == record and back.gen == 1
    # The same blob under another upstream's key does not open.
    other = fleet.tokens("other")
    raw = await fleet._client.hgetall("t:{up/oauth}:tokens")
    await fleet._client.hset("t:{other/oauth}:tokens", mapping=raw)
    with pytest.raises(ShareUnavailable, match="same master key"):
        await other.read()
    # Nor under another master key.
    stranger = Fleet(StateConfig(backend="redis", url=redis_server.url, key_prefix="t:"), b"x" * 32)
    await stranger.start()
    fleets.append(stranger)
    with pytest.raises(ShareUnavailable):
        await stranger.tokens("up").read()


@needs_redis
async def test_refresh_lock_is_fenced(redis_server: RedisServer, fleets: list[Fleet]) -> None:
    """One holder at a time, a stale holder cannot overwrite, and fences outgrow a lost Redis."""
    a, b = [await _fleet(fleets, redis_server.url) for _ in range(2)]
    ta, tb = a.tokens("up"), b.tokens("up")
    record = SharedTokens(Secret('{"access_token": "a1"}'), 0, time.time())
    fence, _ = await ta.lock(30)
    assert fence == 1
    assert (await tb.lock(30))[0] is None  # held
    assert await ta.commit(1, SharedTokens(record.record, 1, time.time()))
    fence_b, _ = await tb.lock(30)
    assert fence_b == 2
    assert not await ta.commit(1, record)  # fenced out: generation 1 is not newer
    assert await tb.commit(2, SharedTokens(record.record, 2, time.time()))
    # Redis loses everything; an instance offers the generation-5 tokens it kept.
    redis_server.cli("flushall")
    assert await ta.offer(SharedTokens(record.record, 5, time.time())) == 5
    fence, wait = await tb.lock(30)
    assert fence is None and 0 < wait <= 3.0  # the fleet settles before anyone refreshes
    await asyncio.sleep(wait + 0.05)
    fence, _ = await tb.lock(30)
    assert fence == 6  # past every generation written
    # A login (generation 0) wins only if it is newer than the fleet's record.
    assert await ta.offer(SharedTokens(record.record, 0, time.time() - 3600)) is None
    assert await ta.offer(SharedTokens(record.record, 0, time.time() + 1)) == 7


# --- budgets ------------------------------------------------------------------------------------


@needs_redis
async def test_instances_share_one_sliding_window(
    redis_server: RedisServer, fleets: list[Fleet], short_window: float
) -> None:
    """Three instances far over the plan: never more than the count in any window, all served."""
    limit = RateLimitConfig(per_minute=30, per_hour=100_000)
    limiters = [_limiter(await _fleet(fleets, redis_server.url), limit) for _ in range(3)]
    sent: list[tuple[float, int]] = []
    start = time.monotonic()
    await _saturate(limiters, start + 3 * short_window, sent)
    times = [t for t, _ in sent]
    assert max_in_window(times, MINUTE) == 30
    assert len(sent) >= 30 * 3
    assert {i for _, i in sent} == {0, 1, 2}


@needs_redis
async def test_unused_leases_are_returned(
    redis_server: RedisServer, fleets: list[Fleet], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lease larger than what was used gives the rest back once it expires."""
    monkeypatch.setattr(ratelimit, "WINDOWS", (("per_minute", 30.0), ("per_hour", 3600.0)))
    fleet = await _fleet(fleets, redis_server.url)
    limiter = _limiter(fleet, RateLimitConfig(per_minute=200, per_hour=100_000))
    waiters = [limiter.acquire("app", deadline=time.monotonic() + 5) for _ in range(7)]
    await asyncio.gather(*waiters)
    counted = int(redis_server.cli("zcard", "t:{u/c}:log:per_minute"))
    assert counted >= 7
    await asyncio.sleep(0.5 + 1.2)  # the lease's time to live, then a heartbeat
    assert int(redis_server.cli("zcard", "t:{u/c}:log:per_minute")) == 7


def _scores(redis_server: RedisServer, key: str) -> list[float]:
    """The scores of a log, as seconds on Redis's clock."""
    out = redis_server.cli("zrange", key, "0", "-1", "withscores").split()
    return [int(x) / 1000 for x in out[1::2]]


def _redis_now(redis_server: RedisServer) -> float:
    sec, usec = redis_server.cli("time").split()
    return int(sec) + int(usec) / 1e6


@needs_redis
async def test_a_request_counts_from_its_answer(
    redis_server: RedisServer, fleets: list[Fleet], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The upstream counts a request when it arrives, which may be long after its unit was
    leased (a slow connection): once answered, it is counted in the log from the answer."""
    monkeypatch.setattr(ratelimit, "WINDOWS", (("per_minute", 30.0), ("per_hour", 3600.0)))
    fleet = await _fleet(fleets, redis_server.url)
    limiter = _limiter(fleet, RateLimitConfig(per_minute=200, per_hour=100_000))
    await limiter.acquire("app", deadline=time.monotonic() + 5)
    leased_at = _redis_now(redis_server)
    await asyncio.sleep(0.6)  # the request on its way
    answered_at = _redis_now(redis_server)
    limiter.reached()
    for _ in range(100):
        await asyncio.sleep(0.02)
        if max(_scores(redis_server, "t:{u/c}:log:per_minute")) >= answered_at:
            break
    for key in ("t:{u/c}:log:per_minute", "t:{u/c}:log:per_hour"):
        scores = _scores(redis_server, key)
        assert max(scores) >= answered_at, (key, scores, leased_at)
        assert max(scores) < answered_at + 0.5


@needs_redis
async def test_no_unit_is_taken_without_a_lease(
    redis_server: RedisServer, fleets: list[Fleet], monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the fleet's window is full, a retry due a hair (under EPS) after now is not "now":
    the limiter, which takes whatever is due within EPS, must not get a unit the fleet never
    leased. (A timer firing a hair early used to let a whole queue through unseen.)"""
    monkeypatch.setattr(ratelimit, "WINDOWS", (("per_minute", 30.0), ("per_hour", 3600.0)))
    fleet = await _fleet(fleets, redis_server.url)
    budget = fleet.budget("u", "c", RateLimitConfig(per_minute=2, per_hour=100_000))
    limiter = Limiter("u/c", RateLimitConfig(per_minute=2, per_hour=100_000), QUEUE, budget=budget)
    for _ in range(2):
        await limiter.acquire("app", deadline=time.monotonic() + 5)
    with pytest.raises(RateLimitExceeded):
        await limiter.acquire("app", deadline=time.monotonic() + 0.3)
    retry_at = budget._retry_at
    assert retry_at is not None, "the full window did not set a retry time"
    now = retry_at - 5e-7
    assert budget.ready_at(now, 1) > now + ratelimit.EPS  # it asks the fleet instead
    await asyncio.sleep(0.2)  # that lease is refused: the window is still full
    assert budget.ready_at(time.monotonic(), 1) > time.monotonic() + 1
    assert int(redis_server.cli("zcard", "t:{u/c}:log:per_minute")) == 2


@needs_redis
async def test_shares_of_absent_instances_are_kept(
    redis_server: RedisServer, fleets: list[Fleet], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With instances: 3 and one live, it leaves two local shares alone (those two may be cut
    off from Redis and serving on them); when a second comes, one share is released."""
    monkeypatch.setattr(ratelimit, "WINDOWS", (("per_minute", 30.0), ("per_hour", 3600.0)))
    limit = RateLimitConfig(per_minute=9, per_hour=100_000)
    first = _limiter(await _fleet(fleets, redis_server.url, instances=3), limit)

    async def grants(limiter: Limiter, n: int) -> int:
        got = 0
        for _ in range(n):
            try:
                await limiter.acquire("app", deadline=time.monotonic() + 0.3)
                got += 1
            except RateLimitExceeded:
                pass
        return got

    assert await grants(first, 9) == 9 - 2 * 3
    second = _limiter(await _fleet(fleets, redis_server.url, instances=3), limit)
    await asyncio.sleep(0.1)
    assert await grants(second, 9) == 3  # 9 - 1 * 3 for the one absent, minus the 3 used


@needs_redis
@pytest.mark.parametrize("outage", ["restart", "stall"])
async def test_redis_outage_local_share_and_rejoin_without_burst(
    redis_server: RedisServer, fleets: list[Fleet], short_window: float, outage: str
) -> None:
    """Redis killed and restarted empty, or stalled (timeouts) and back with its data: under
    full load the whole run stays within the plan, each instance within its share meanwhile."""
    limit = RateLimitConfig(per_minute=30, per_hour=100_000)
    made = [await _fleet(fleets, redis_server.url, instances=3) for _ in range(3)]
    limiters = [_limiter(f, limit) for f in made]
    sent: list[tuple[float, int]] = []
    until = [time.monotonic() + 60]
    marks: dict[str, float] = {}

    async def chaos() -> None:
        await asyncio.sleep(1.3)
        marks["down"] = time.monotonic()
        if outage == "restart":
            redis_server.kill()
        else:
            assert redis_server.proc is not None
            redis_server.proc.send_signal(signal.SIGSTOP)
        while any(f.connected for f in made):
            await asyncio.sleep(0.05)
        marks["degraded"] = time.monotonic()
        assert [lim.snapshot()["fleet"]["mode"] for lim in limiters] == ["local"] * 3
        await asyncio.sleep(2.5)  # MEMBER_TTL, then serving on the local shares
        if outage == "restart":
            redis_server.start()
        else:
            assert redis_server.proc is not None
            redis_server.proc.send_signal(signal.SIGCONT)
        while not all(f.connected for f in made):
            await asyncio.sleep(0.05)
        marks["up"] = time.monotonic()
        until[0] = marks["up"] + 2.5 * short_window

    local: list[tuple[float, int]] = []
    await asyncio.gather(chaos(), _saturate(limiters, until, sent, local=local))
    times = [t for t, _ in sent]
    assert max_in_window(times, MINUTE) <= 30
    assert local, "nothing was served on the local share"
    for i in range(3):
        assert max_in_window([t for t, j in local if j == i], MINUTE) <= 10
    after = [t for t, _ in sent if t > marks["up"] + short_window]
    assert len(after) >= 20, "the fleet did not take its budget back"
    assert [lim.snapshot()["fleet"]["mode"] for lim in limiters] == ["shared"] * 3


@needs_redis
async def test_start_without_redis_paces_then_joins(
    tmp_path: Path, fleets: list[Fleet], short_window: float
) -> None:
    """An instance that starts while Redis is down knows nothing of the fleet's traffic: it
    paces at its share from the start (no burst), and joins when Redis comes up."""
    redis = RedisServer(tmp_path / "late")
    fleet = await _fleet(fleets, redis.url, local_share=0.5)
    assert not fleet.connected
    ready, note = fleet.readiness()
    assert ready and note is not None and "local share (0.5)" in note
    limiter = _limiter(fleet, RateLimitConfig(per_minute=20, per_hour=100_000))
    sent: list[tuple[float, int]] = []
    start = time.monotonic()
    await _saturate([limiter], start + short_window, sent, per=3)
    times = [t for t, _ in sent]
    assert 8 <= len(times) <= 10  # ten per window at most,
    assert max_in_window(times, short_window / 2) <= 6, times  # and paced, not a burst
    try:
        redis.start()
        deadline = time.monotonic() + 5
        while not fleet.connected:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        assert fleet.readiness() == (True, None)
        await limiter.acquire("app", deadline=time.monotonic() + 2)
        assert limiter.snapshot()["fleet"]["mode"] == "shared"
    finally:
        redis.kill()


@needs_redis
async def test_fail_closed(fleets: list[Fleet], short_window: float) -> None:
    """on_failure: closed refuses with 503 state_unavailable while Redis is unreachable."""
    fleet = await _fleet(fleets, f"redis://127.0.0.1:{free_port()}/0", on_failure="closed")
    ready, note = fleet.readiness()
    assert not ready and note is not None and "failing closed" in note
    limiter = _limiter(fleet, RateLimitConfig(per_minute=20))
    with pytest.raises(StateUnavailable) as caught:
        await limiter.acquire("app", deadline=time.monotonic() + 1)
    assert caught.value.status == 503 and caught.value.code == "state_unavailable"


@needs_redis
async def test_a_hold_reaches_every_instance(
    redis_server: RedisServer, fleets: list[Fleet]
) -> None:
    """A 429 observed by one instance holds the others at once (pub/sub), with jitter."""
    a, b = [_limiter(await _fleet(fleets, redis_server.url), None) for _ in range(2)]
    await b.acquire("app", deadline=time.monotonic() + 1)  # b joined and listens
    a.observe(429, {"Retry-After": "1"})
    deadline = time.monotonic() + 0.5
    while b.hold_until is None:
        assert time.monotonic() < deadline, "the hold did not reach b"
        await asyncio.sleep(0.005)
    started = time.monotonic()
    await b.acquire("app", deadline=started + 5)
    assert 0.85 <= time.monotonic() - started <= 1.0 + 0.1 + 0.2


# --- the ways to reach Redis ------------------------------------------------------------------


async def _exercise(url: str, fleets: list[Fleet], **state: Any) -> None:
    """Two instances through `url`: a shared budget, a hold via pub/sub, the refresh lock."""
    a, b = [await _fleet(fleets, url, **state) for _ in range(2)]
    assert a.connected and b.connected, (a.status(), b.status())
    limit = RateLimitConfig(per_minute=4, per_hour=1000)
    la, lb = _limiter(a, limit, "k1"), _limiter(b, limit, "k1")
    got = 0
    for limiter in (la, lb, la, lb, la, lb):
        try:
            await limiter.acquire("app", deadline=time.monotonic() + 0.2)
            got += 1
        except RateLimitExceeded:
            pass
    assert got == 4
    for limiter in (la, lb):
        limiter.reached()  # counted again from the answer (REACHED), like after a real send
    await asyncio.sleep(0.2)
    assert a.connected and b.connected, (a.status(), b.status())
    ha, hb = _limiter(a, None, "k2"), _limiter(b, None, "k2")
    await hb.acquire("app", deadline=time.monotonic() + 1)
    await asyncio.sleep(0.2)
    ha.observe(429, {"Retry-After": "5"})
    deadline = time.monotonic() + 2.5  # pub/sub, or the next heartbeat
    while hb.hold_until is None:
        assert time.monotonic() < deadline, "the hold did not reach b"
        await asyncio.sleep(0.01)
    fence, _ = await a.tokens("up").lock(10)
    assert fence is not None and (await b.tokens("up").lock(10))[0] is None
    record = SharedTokens(Secret('{"access_token": "x-token-123"}'), fence, time.time())
    assert await a.tokens("up").commit(fence, record)
    got_back = await b.tokens("up").read()
    assert got_back is not None and got_back.gen == fence


@needs_redis
async def test_tls_and_acl_user(tmp_path: Path, fleets: list[Fleet]) -> None:
    """rediss:// with a private CA (state.ca_bundle) and an ACL user with only the commands
    docs/FLEET.md lists; the default user is off."""
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    port = free_port()
    server = RedisServer(
        tmp_path / "tls",
        *("--port", "0", "--tls-port", str(port), "--tls-auth-clients", "no"),
        *(
            "--tls-cert-file",
            str(tmp_path / "cert.pem"),
            "--tls-key-file",
            str(tmp_path / "key.pem"),
        ),
        *("--tls-ca-cert-file", str(tmp_path / "ca.pem")),
        *("--user", "default", "off", "--user", "fleet", "on", ">fleet-pass-123"),
        *("~t:*", "&t:*", *ACL_COMMANDS.split()),
        port=port,
    ).start()
    try:
        url = f"rediss://fleet:fleet-pass-123@127.0.0.1:{port}/0"
        await _exercise(url, fleets, ca_bundle=tmp_path / "ca.pem")
        # Without the CA, or with a wrong password, the fleet is degraded, not broken.
        wrong = await _fleet(
            fleets,
            f"rediss://fleet:nope-nope-nope@127.0.0.1:{port}/0",
            ca_bundle=tmp_path / "ca.pem",
        )
        assert not wrong.connected and "nope-nope-nope" not in json.dumps(wrong.status())
        untrusted = await _fleet(fleets, url)
        assert not untrusted.connected and "fleet-pass-123" not in json.dumps(untrusted.status())
    finally:
        server.kill()


@pytest.fixture
def sentinel(tmp_path: Path, redis_server: RedisServer) -> Iterator[int]:
    port = free_port()
    conf = tmp_path / "sentinel.conf"
    conf.write_text(
        f"port {port}\nbind 127.0.0.1\nsentinel monitor mymaster 127.0.0.1 {redis_server.port} 1\n"
    )
    proc = subprocess.Popen(
        ["redis-server", str(conf), "--sentinel"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_port(port)
    yield port
    proc.kill()
    proc.wait()


@needs_redis
async def test_sentinel(sentinel: int, fleets: list[Fleet]) -> None:
    """redis+sentinel://host:port/service finds the master through Sentinel."""
    await _exercise(f"redis+sentinel://127.0.0.1:{sentinel}/mymaster", fleets)


def _cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free too."""
    while True:
        port = free_port()
        if port <= 55535:
            with socket.socket() as probe:
                try:
                    probe.bind(("127.0.0.1", port + 10000))
                except OSError:
                    continue
            return port


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[list[RedisServer]]:
    nodes = []
    for i in range(3):
        workdir = tmp_path / f"node{i}"
        nodes.append(
            RedisServer(
                workdir,
                *("--cluster-enabled", "yes", "--cluster-node-timeout", "2000"),
                *("--cluster-config-file", "nodes.conf"),
                port=_cluster_port(),
            ).start()
        )
    try:
        subprocess.run(
            [
                "redis-cli",
                "--cluster",
                "create",
                *(f"127.0.0.1:{n.port}" for n in nodes),
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            capture_output=True,
            check=True,
            timeout=30,
        )
        deadline = time.monotonic() + 10
        while "cluster_state:ok" not in nodes[0].cli("cluster", "info"):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        yield nodes
    finally:
        for node in nodes:
            node.kill()


@needs_redis
async def test_cluster(cluster: list[RedisServer], fleets: list[Fleet]) -> None:
    """redis+cluster://: every script's keys share one {tag}, so one slot; tags spread out."""
    await _exercise(f"redis+cluster://127.0.0.1:{cluster[0].port}/0", fleets)
    slots = {
        int(cluster[0].cli("cluster", "keyslot", f"t:{{u/{name}}}:log:per_minute"))
        for name in ("k1", "k2")
    }
    assert len(slots) == 2


# --- the daemon ----------------------------------------------------------------------------------


@pytest.fixture
async def sandbox() -> AsyncIterator[Sandbox]:
    async with Sandbox() as sb:
        yield sb


def _daemon_doc(sandbox: Sandbox, ca: Path, state: dict[str, Any] | None) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "upstreams": {
            "aimychats": {
                "base_url": sandbox.base_url,
                "ca_bundle": str(ca),
                "credentials": [{"name": "rw", "scopes": ["read", "write", "delete"]}],
                "rate_limit": {"plan": "pro"},
            }
        },
        "apps": {"app": {"upstreams": {"aimychats": {"scopes": ["read"]}}}},
    }
    if state is not None:
        doc["state"] = state
    return doc


async def test_daemon_without_state_is_in_process(
    sandbox: Sandbox, start_daemon: Any, tmp_path: Path, client: Any
) -> None:
    """No `state`: no fleet, nothing to reach, /status says memory."""
    ca = sandbox.write_ca(tmp_path / "ca.pem")
    d = await start_daemon(_daemon_doc(sandbox, ca, None), {"rw": sandbox.new_key(["read"])})
    assert d.daemon.fleet is None
    async with client.get(f"{d.admin_url}/status") as resp:
        assert (await resp.json())["state"] == {"backend": "memory"}
    async with client.get(f"{d.url}/aimychats/auth/test", headers=d.auth()) as resp:
        assert resp.status == 200


@needs_redis
async def test_daemon_reports_the_fleet(
    sandbox: Sandbox,
    start_daemon: Any,
    tmp_path: Path,
    client: Any,
    redis_server: RedisServer,
) -> None:
    """/readyz and /status while Redis is up, then down (on_failure: closed): 503 with reasons,
    and requests answered 503 state_unavailable; back up, all is well again."""
    ca = sandbox.write_ca(tmp_path / "ca.pem")
    state = {"backend": "redis", "url": redis_server.url, "on_failure": "closed"}
    key = sandbox.new_key(["read"], plan="pro")
    d = await start_daemon(_daemon_doc(sandbox, ca, state), {"rw": key})
    async with client.get(f"{d.url}/aimychats/auth/test", headers=d.auth()) as resp:
        assert resp.status == 200
    async with client.get(f"{d.admin_url}/status") as resp:
        status = await resp.json()
    assert status["state"]["state"] == "connected" and status["state"]["url"] == redis_server.url
    fleet_view = status["upstreams"]["aimychats"]["credentials"]["rw"]
    assert fleet_view["rate_limit"]["remaining"] is not None
    assert fleet_view["fleet"]["mode"] == "shared"
    redis_server.kill()
    assert d.daemon.fleet is not None
    deadline = time.monotonic() + 5
    while d.daemon.fleet.connected:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    async with client.get(f"{d.admin_url}/readyz") as resp:
        assert resp.status == 503
        assert "failing closed" in " ".join((await resp.json())["reasons"])
    async with client.get(f"{d.url}/aimychats/auth/test", headers=d.auth()) as resp:
        assert resp.status == 503
        assert resp.headers["X-Credproxy-Error"] == "state_unavailable"
    redis_server.start()
    deadline = time.monotonic() + 5
    while not d.daemon.fleet.connected:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    async with client.get(f"{d.admin_url}/readyz") as resp:
        assert resp.status == 200 and "degraded" not in await resp.json()
    async with client.get(f"{d.url}/aimychats/auth/test", headers=d.auth()) as resp:
        assert resp.status == 200
