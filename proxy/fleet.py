"""Fleet mode: credproxy instances that share one account keep its budgets, 429 holds and OAuth
tokens in Redis (`state: {backend: redis}`), so that together they never exceed the plan.

Every rule runs as a Lua script on keys that share one `{hash tag}` per credential, budgets are
leased in small batches and returned, and values are sealed like the store's (AES-256-GCM, a key
of their own, associated data naming the Redis key). When Redis is unreachable each instance
keeps serving on a conservative share of each budget (or fails closed) and re-joins without a
burst; docs/FLEET.md describes the design and how to deploy it.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import itertools
import logging
import math
import os
import random
import socket
import time
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import parse_qs, unquote, urlsplit

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from proxy import ratelimit
from proxy.config import Config, RateLimitConfig, StateConfig
from proxy.errors import ProxyError
from proxy.logs import redactor
from proxy.oauth import OAUTH_CREDENTIAL, SharedTokens, ShareUnavailable
from proxy.ratelimit import EPS, FLEET_HOLD, PACE_MARGIN
from proxy.secret import Secret
from proxy.store import NONCE_BYTES, _encrypt, _hkdf

__all__ = ["Fleet", "FleetBudget", "FleetTokens", "StateUnavailable", "connect", "public_url"]

log = logging.getLogger("credproxy.fleet")

# Seconds between heartbeats: membership, the fleet's holds and a picture of each budget.
HEARTBEAT: Final = 0.5
# An instance not heard from for this long is not live: the others keep its local share back,
# and an instance cut off from Redis waits this long before it uses that share.
MEMBER_TTL: Final = 2.0
# Without `instances`, a member that stopped (without leaving) is kept in reserve this long.
MEMBER_FORGET: Final = 600.0
# Leased budget is used within this long or returned: at most a sixtieth of the shortest window.
LEASE_TTL_MAX: Final = 1.0
# A lease is at most this many units, and at most this fraction of the smallest window.
LEASE_MAX: Final = 16
LEASE_FRACTION: Final = 0.05
# Reached units are sent to the log in batches gathered for up to this long (or a lease TTL, if
# shorter): re-counting them is not urgent, it only has to land well within the window.
REACHED_BATCH: Final = 0.1
# Budget entries count this much longer than their window (network and scheduling jitter).
WINDOW_SLACK: Final = 0.25
# Instances resume after a fleet hold within min(max, fraction * hold) seconds of each other.
HOLD_JITTER_MAX: Final = 1.0
HOLD_JITTER_FRACTION: Final = 0.1
# Reconnect backoff while Redis is unreachable: doubling, with jitter, between these.
RECONNECT_MIN: Final = 0.1
RECONNECT_MAX: Final = 2.0
# Connect and command timeout; past it Redis counts as unreachable.
REDIS_TIMEOUT: Final = 2.0
# After Redis lost the OAuth record (a restart without persistence) no instance refreshes
# until every instance had time to reconnect and offer the tokens it holds.
SETTLE: Final = 3.0
# Points of the picture of a budget kept for the case Redis goes away.
QUANTILES: Final = 8
# Another outage within this many seconds of a logged one is logged at debug level.
FLAP_QUIET: Final = 60.0

_AD_PREFIX: Final = b"credproxy/v1\0redis\0"
_SEAL_VERSION: Final = b"\x01"

Client = Redis | RedisCluster


class StateUnavailable(ProxyError):
    """503 state_unavailable: Redis is unreachable and `state.on_failure` is closed."""

    status, code = 503, "state_unavailable"


class _Down(Exception):
    """A Redis call failed (the fleet is now degraded) or the fleet is not connected."""


# --- Lua: each script touches the keys of one {tag}, so one Redis Cluster slot ------------------

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# Every call that counts as a sign of life carries the Redis time after which its caller has
# given up on it (0: unknown); executed later (a stalled server), it does nothing.
_ALIVE = """
local valid = tonumber(ARGV[1])
if valid > 0 and now > valid then return {-2, now, 0, 0} end
"""

# The caller must have joined this epoch of the fleet; its call is a sign of life.
_MEMBER = """
if redis.call('GET', KEYS[1]) ~= ARGV[3] then return {-1, now, 0, 0} end
redis.call('ZADD', KEYS[3], now, ARGV[2])
redis.call('PEXPIRE', KEYS[3], 86400000)
"""

# Members not heard from within member_ttl_ms: with `instances` configured, those missing from
# it; otherwise those that stopped without leaving, for forget_ms. Their shares are kept back.
_ABSENT = """
local instances, mttl = tonumber(ARGV[7]), tonumber(ARGV[6])
local absent = 0
if instances > 0 then
  absent = math.max(0, instances - redis.call('ZCOUNT', KEYS[3], now - mttl, '+inf'))
else
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now - tonumber(ARGV[8]))
  absent = redis.call('ZCOUNT', KEYS[3], '-inf', '(' .. (now - mttl))
end
"""

# KEYS: epoch, hold, members, log...; ARGV: valid_until, instance, epoch, want, ttl_ms,
# member_ttl_ms, instances (0: not configured), forget_ms, first sequence number, then
# (count, window_ms, reserve) per log. Returns {granted (-1: join first, -2: too late), now,
# hold_until, next_free, entries per log...}.
_LEASE = (
    _NOW
    + _ALIVE
    + _MEMBER
    + """
local hold = tonumber(redis.call('GET', KEYS[2]) or '0')
if hold > now then return {0, now, hold, hold} end
local want, ttl = tonumber(ARGV[4]), tonumber(ARGV[5])
"""
    + _ABSENT
    + """
local granted, nextat, counts = want, 0, {}
for i = 4, #KEYS do
  local a = 10 + (i - 4) * 3
  local count, win, reserve = tonumber(ARGV[a]), tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now - win)
  local n = redis.call('ZCARD', KEYS[i])
  local cap = count - absent * reserve
  local free = cap - n
  if free < granted then granted = math.max(free, 0) end
  if free <= 0 then
    if cap <= 0 then
      nextat = math.max(nextat, now + 1000)
    else
      local e = redis.call('ZRANGE', KEYS[i], n - cap, n - cap, 'WITHSCORES')
      nextat = math.max(nextat, tonumber(e[2]) + win)
    end
  end
  counts[#counts + 1] = n
end
if granted > 0 then
  local score, seq = now + ttl, tonumber(ARGV[9])
  for i = 4, #KEYS do
    local args = {}
    for j = 0, granted - 1 do
      args[#args + 1] = score
      args[#args + 1] = ARGV[2] .. ':' .. (seq + j)
    end
    redis.call('ZADD', KEYS[i], unpack(args))
    redis.call('PEXPIRE', KEYS[i], tonumber(ARGV[11 + (i - 4) * 3]) + ttl + 60000)
    counts[i - 3] = counts[i - 3] + granted
  end
end
local out = {granted, now, 0, nextat}
for i = 1, #counts do out[#out + 1] = counts[i] end
return out
"""
)

# KEYS: epoch, hold, members, log...; ARGV: valid_until, instance, epoch, quantiles, (unused),
# member_ttl_ms, instances, forget_ms, then window_ms per log. Returns {1 (-1: join first, -2:
# too late), now, hold_until, live instances, then per log its entries and the scores at
# `quantiles` ranks from the newest}.
_HEARTBEAT = (
    _NOW
    + _ALIVE
    + _MEMBER
    + _ABSENT
    + """
local hold = tonumber(redis.call('GET', KEYS[2]) or '0')
local live = redis.call('ZCOUNT', KEYS[3], now - mttl, '+inf')
local q = tonumber(ARGV[4])
local out = {1, now, hold, live}
for i = 4, #KEYS do
  local win = tonumber(ARGV[9 + i - 4])
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now - win)
  local n = redis.call('ZCARD', KEYS[i])
  out[#out + 1] = n
  for j = 0, q - 1 do
    local rank = n - 1 - math.floor(j * n / q)
    if rank >= 0 then
      local e = redis.call('ZRANGE', KEYS[i], rank, rank, 'WITHSCORES')
      out[#out + 1] = tonumber(e[2])
    else
      out[#out + 1] = 0
    end
  end
end
return out
"""
)

# KEYS: epoch, hold, members, log...; ARGV: valid_until, instance, the epoch it knew ('' none),
# a new epoch, its own hold in ms (0: none), then per log: window_ms, m, and m triples (age_ms,
# member, phantom). Own entries are added back (NX); phantoms (its share of what the fleet had
# used when Redis went away) only if Redis lost the logs since. Returns {epoch, lost, now}.
_JOIN = (
    _NOW
    + _ALIVE
    + """
local cur = redis.call('GET', KEYS[1])
local lost = (not cur) or (ARGV[3] ~= '' and cur ~= ARGV[3])
if not cur then
  redis.call('SET', KEYS[1], ARGV[4])
  cur = ARGV[4]
end
local a = 6
for i = 4, #KEYS do
  local win, m = tonumber(ARGV[a]), tonumber(ARGV[a + 1])
  a = a + 2
  for j = 1, m do
    local score = now - tonumber(ARGV[a])
    if score > now - win and (ARGV[a + 2] == '0' or lost) then
      redis.call('ZADD', KEYS[i], 'NX', score, ARGV[a + 1])
    end
    a = a + 3
  end
  if m > 0 then redis.call('PEXPIRE', KEYS[i], win + 120000) end
end
local hold_ms = tonumber(ARGV[5])
if hold_ms > 0 then
  local h = tonumber(redis.call('GET', KEYS[2]) or '0')
  if now + hold_ms > h then redis.call('SET', KEYS[2], now + hold_ms, 'PX', hold_ms + 1000) end
end
redis.call('ZADD', KEYS[3], now, ARGV[2])
redis.call('PEXPIRE', KEYS[3], 86400000)
if lost then return {cur, 1, now} end
return {cur, 0, now}
"""
)

# KEYS: hold; ARGV: ms. Returns {hold_until, now}: the later of the fleet's and this one.
_HOLD = (
    _NOW
    + """
local untilv = now + tonumber(ARGV[1])
local h = tonumber(redis.call('GET', KEYS[1]) or '0')
if untilv > h then
  redis.call('SET', KEYS[1], untilv, 'PX', tonumber(ARGV[1]) + 1000)
else
  untilv = h
end
return {untilv, now}
"""
)

# KEYS: log...; ARGV: members leased and never used.
_RETURN = """
for i = 1, #KEYS do
  for j = 1, #ARGV, 500 do
    redis.call('ZREM', KEYS[i], unpack(ARGV, j, math.min(j + 499, #ARGV)))
  end
end
return 1
"""

# KEYS: log...; ARGV: window_ms per log, then members whose requests reached the upstream by
# now. Each is counted from now at the earliest (added back if it already left the log), since
# the upstream counts a request when it arrives, which may be well after it was leased.
_REACHED = (
    _NOW
    + """
local n = #KEYS
for i = 1, n do
  for j = n + 1, #ARGV do
    local s = redis.call('ZSCORE', KEYS[i], ARGV[j])
    if (not s) or tonumber(s) < now then redis.call('ZADD', KEYS[i], now, ARGV[j]) end
  end
  local keep = tonumber(ARGV[i]) + 60000
  if redis.call('PTTL', KEYS[i]) < keep then redis.call('PEXPIRE', KEYS[i], keep) end
end
return 1
"""
)

# KEYS: tokens, fence; ARGV: sealed record, generation (0: a login), issued_ms, settle_ms.
# Takes the record if newer (by generation; a login by age); returns {1, gen} or {0, gen}.
_OFFER = (
    _NOW
    + """
local sg = tonumber(redis.call('HGET', KEYS[1], 'gen') or '-1')
local si = tonumber(redis.call('HGET', KEYS[1], 'issued') or '0')
local gen, issued = tonumber(ARGV[2]), tonumber(ARGV[3])
if not (sg < 0 or gen > sg or (gen == 0 and issued > si)) then return {0, sg} end
local f = tonumber(redis.call('GET', KEYS[2]) or '0')
if gen == 0 then gen = math.max(f, sg) + 1 end
if f < gen then redis.call('SET', KEYS[2], gen) end
redis.call('HSET', KEYS[1], 'blob', ARGV[1], 'gen', gen, 'issued', issued)
if sg < 0 then redis.call('HSET', KEYS[1], 'settle', now + tonumber(ARGV[4])) end
return {1, gen}
"""
)

# KEYS: lock, fence, tokens; ARGV: valid_until, owner, lease_ms. Returns {fence, 0} or {0, ms
# to wait}. The fence only grows, past any generation already written (Redis may have lost it).
_LOCK = (
    _NOW
    + """
local valid = tonumber(ARGV[1])
if valid > 0 and now > valid then return {0, 1000} end
local settle = tonumber(redis.call('HGET', KEYS[3], 'settle') or '0')
if settle > now then return {0, settle - now} end
if redis.call('EXISTS', KEYS[1]) == 1 then return {0, redis.call('PTTL', KEYS[1])} end
local sg = tonumber(redis.call('HGET', KEYS[3], 'gen') or '0')
local f = redis.call('INCR', KEYS[2])
if f <= sg then
  f = sg + 1
  redis.call('SET', KEYS[2], f)
end
redis.call('SET', KEYS[1], ARGV[2] .. ':' .. f, 'PX', tonumber(ARGV[3]))
return {f, 0}
"""
)

# KEYS: tokens, lock; ARGV: owner, fence, sealed record, issued_ms. Writes the record unless a
# newer generation is there already (then 0), and releases the lock if it is still ours.
_COMMIT = """
local mine = ARGV[1] .. ':' .. ARGV[2]
if redis.call('GET', KEYS[2]) == mine then redis.call('DEL', KEYS[2]) end
local f = tonumber(ARGV[2])
if f <= tonumber(redis.call('HGET', KEYS[1], 'gen') or '0') then return 0 end
redis.call('HSET', KEYS[1], 'blob', ARGV[3], 'gen', f, 'issued', ARGV[4])
redis.call('HDEL', KEYS[1], 'settle')
return 1
"""

# KEYS: lock; ARGV: owner:fence.
_UNLOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# KEYS: lock; ARGV: owner. A lock this instance took in a call it gave up on (a timeout).
_RELEASE_MINE = """
local holder = redis.call('GET', KEYS[1])
if holder and string.sub(holder, 1, #ARGV[1] + 1) == ARGV[1] .. ':' then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


# --- connecting ----------------------------------------------------------------------------------


def public_url(url: str) -> str:
    """`url` without user, password and query: what logs and /status may show."""
    scheme, _, rest = url.partition("://")
    netloc, slash, path = rest.partition("/")
    host = netloc.rpartition("@")[2]
    return f"{scheme}://{host}{slash}{path.split('?', 1)[0]}"


def _secrets_of(url: str) -> None:
    """Register the password (and user) of a Redis URL with the log redactor."""
    netloc = url.partition("://")[2].partition("/")[0]
    userinfo = netloc.rpartition("@")[0]
    for part in userinfo.split(":"):
        if part:
            redactor.add(unquote(part))
    for key, values in parse_qs(urlsplit(url.replace("+sentinel", "")).query).items():
        if "password" in key:
            for value in values:
                redactor.add(value)


def connect(state: StateConfig) -> tuple[Client, list[Redis]]:
    """A redis-py asyncio client for `state.url` (no I/O yet), and the clients of the
    Sentinels behind it (closed with it).

    redis:// rediss:// unix:// one server; redis+sentinel://[user:pass@]h1:p1,h2:p2/service[/db]
    a Sentinel-monitored master (query: sentinel_username, sentinel_password); redis+cluster://
    a Redis Cluster reached through one node. rediss+ forms use TLS (state.ca_bundle: extra CA).
    """
    url = state.url
    if url is None:
        raise ValueError("state.url is required for the redis backend")
    _secrets_of(url)
    scheme = url.partition("://")[0]
    tls = scheme.startswith("rediss")
    common: dict[str, Any] = {
        "socket_timeout": REDIS_TIMEOUT,
        "socket_connect_timeout": REDIS_TIMEOUT,
    }
    if tls and state.ca_bundle is not None:
        common["ssl_ca_certs"] = str(state.ca_bundle)
    if scheme.endswith("+cluster"):
        return RedisCluster.from_url(url.replace("+cluster", "", 1), **common), []
    # One immediate retry (a pooled connection to a restarted server fails once), then the
    # failure is the fleet's to handle.
    common["retry"] = Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,))
    if scheme.endswith("+sentinel"):
        return _sentinel_master(url, tls, common)
    return Redis.from_url(url, **common), []


def _sentinel_master(url: str, tls: bool, common: dict[str, Any]) -> tuple[Redis, list[Redis]]:
    rest = url.partition("://")[2]
    rest, _, query = rest.partition("?")
    netloc, _, path = rest.partition("/")
    userinfo, _, hosts = netloc.rpartition("@")
    username, _, password = userinfo.partition(":")
    parts = [p for p in path.split("/") if p]
    if not parts:
        raise ValueError("a redis+sentinel:// URL names the master: …/<service>[/<db>]")
    service, db = parts[0], int(parts[1]) if len(parts) > 1 else 0
    nodes: list[tuple[str, int]] = []
    for item in hosts.split(","):
        host, _, port = item.rpartition(":") if item.count(":") == 1 else (item, "", "")
        nodes.append((host or item, int(port) if port else 26379))
    params = {k: v[0] for k, v in parse_qs(query).items() if v}
    node_kwargs = dict(common)
    if tls:
        node_kwargs["ssl"] = True
    sentinel_kwargs = dict(node_kwargs)
    if "sentinel_password" in params:
        sentinel_kwargs["password"] = params["sentinel_password"]
        sentinel_kwargs["username"] = params.get("sentinel_username")
    sentinel = Sentinel(nodes, sentinel_kwargs=sentinel_kwargs, **node_kwargs)  # type: ignore[no-untyped-call]
    master: Redis = sentinel.master_for(
        service,
        db=db,
        username=unquote(username) or None,
        password=unquote(password) or None,
    )
    return master, list(sentinel.sentinels)


class _Sealer:
    """AES-256-GCM under a key of its own (HKDF of the master key), bound to the Redis key."""

    def __init__(self, master_key: bytes) -> None:
        self._aead = AESGCM(_hkdf(master_key, b"credproxy/v1 redis"))

    def seal(self, key: str, plaintext: bytes) -> bytes:
        nonce, sealed = _encrypt(self._aead, plaintext, _AD_PREFIX + key.encode())
        return _SEAL_VERSION + nonce + sealed

    def open(self, key: str, blob: bytes) -> bytes:
        """The plaintext; InvalidTag if `blob` was not sealed for `key` under this master key."""
        if len(blob) <= 1 + NONCE_BYTES or blob[:1] != _SEAL_VERSION:
            raise InvalidTag
        nonce, sealed = blob[1 : 1 + NONCE_BYTES], blob[1 + NONCE_BYTES :]
        return self._aead.decrypt(nonce, sealed, _AD_PREFIX + key.encode())


def _describe(error: BaseException) -> str:
    text = redactor(str(error).strip().splitlines()[0] if str(error).strip() else "")
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _instance_id() -> str:
    host = socket.gethostname().split(".")[0][:32] or "host"
    return f"{host}-{os.getpid()}-{os.urandom(3).hex()}"


# --- budgets ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Win:
    """One rate-limit window: `count` units per `seconds` (its length plus margin and slack)."""

    name: str
    count: int
    seconds: float

    @property
    def ms(self) -> int:
        return math.ceil(self.seconds * 1000)


class _LocalLog:
    """A sliding log of send times (this process's clock) for the local share of one window."""

    __slots__ = ("count", "seconds", "times")

    def __init__(self, count: int, seconds: float) -> None:
        self.count = count
        self.seconds = seconds
        self.times: list[float] = []

    def _prune(self, now: float) -> None:
        cut = bisect.bisect_right(self.times, now - self.seconds)
        if cut:
            del self.times[:cut]

    def add(self, t: float) -> None:
        bisect.insort(self.times, t)

    def remove(self, t: float) -> None:
        i = bisect.bisect_left(self.times, t)
        if i < len(self.times) and self.times[i] == t:
            del self.times[i]

    def ready_at(self, now: float) -> float:
        return self.nth_at(now, 1)

    def nth_at(self, now: float, n: int) -> float:
        self._prune(now)
        if self.count <= 0:
            return now + self.seconds
        k = len(self.times) + n - self.count  # entries that must leave the window first
        if k <= 0:
            return now
        if k <= len(self.times):
            return max(now, self.times[k - 1] + self.seconds)
        return now + math.ceil(k / self.count) * self.seconds

    def left(self, now: float) -> int:
        self._prune(now)
        return max(0, self.count - len(self.times))


def _noop() -> None:
    return None


def _noop_hold(_seconds: float, _source: str) -> None:
    return None


class FleetBudget:
    """One credential's share of the fleet's budget: leases, the local share, holds.

    Implements ratelimit.SharedBudget. The fleet's windows are sliding logs in Redis (one
    sorted set per window, an entry per request); a lease of a few units is added at once with
    the time it expires, so a unit used any time before then is counted from no later than its
    use. While Redis is unreachable the budget is a local log holding a share of each window.
    """

    def __init__(self, fleet: Fleet, tag: str, limit: RateLimitConfig | None) -> None:
        self._fleet = fleet
        self.tag = tag
        base = fleet.key(tag)
        self._keys = [base + "epoch", base + "hold", base + "members"]
        self._wins: list[_Win] = []
        self._clock = time.monotonic
        self._wake: Callable[[], None] = _noop
        self._hold: Callable[[float, str], None] = _noop_hold
        self._pool: deque[tuple[str, float]] = deque()  # leased units: (member, usable until)
        # Units taken for requests not yet known to have reached the upstream, oldest first:
        # (member, counted from, leased). Which request holds which unit does not matter, only
        # that the ones kept are the newest: a reached request settles the oldest.
        self._open: deque[tuple[str, float, bool]] = deque()
        self._history: deque[tuple[float, str]] = deque()  # own units in the last window
        self._returns: list[str] = []  # leased and never used: removed from the log
        self._reached: list[str] = []  # used and answered: counted from now in the log
        self._lease_task: asyncio.Task[None] | None = None
        self._sync_task: asyncio.Task[None] | None = None
        self._retry_at: float | None = None
        self._epoch: str | None = None  # joined under this epoch; None: join first
        self._known_epoch = ""  # the last epoch seen ('' never)
        self._joining = False
        self._snap: dict[str, tuple[float, int, list[float]]] = {}  # heartbeat picture
        self._latest: dict[str, tuple[float, int]] = {}  # entries after the last lease
        self._local: dict[str, _LocalLog] | None = None
        self._phantoms: dict[str, list[tuple[float, str]]] = {}
        self._grants: deque[float] = deque()
        self._hold_end = 0.0  # this instance's own hold (clock), pushed on re-joining
        self._contact = 0.0  # when Redis last counted this instance live (clock); 0: never
        self._local_from = 0.0  # the local share is used from then (the others reserve it)
        self._live: int | None = None
        self._seq = itertools.count()
        self._episode = 0
        self.reconfigure(limit)
        if not fleet.connected:
            self.degrade()

    # -- ratelimit.SharedBudget --------------------------------------------------------------

    def bind(self, wake: Callable[[], None], hold: Callable[[float, str], None]) -> None:
        self._wake, self._hold = wake, hold

    def reconfigure(self, limit: RateLimitConfig | None) -> None:
        wins = []
        for name, seconds in ratelimit.WINDOWS:
            count = None if limit is None else getattr(limit, name)
            if count is not None:
                wins.append(_Win(name, count, seconds * (1 + PACE_MARGIN) + WINDOW_SLACK))
        self._wins = wins
        if self._local is not None:
            share = self._fleet.share
            old = self._local
            self._local = {}
            for w in wins:
                log_ = old.get(w.name) or _LocalLog(0, w.seconds)
                log_.count, log_.seconds = math.floor(w.count * share + 1e-9), w.seconds
                self._local[w.name] = log_

    def ready_at(self, now: float, demand: int) -> float:
        if not self._wins:
            return now
        if self._joining:
            return math.inf
        # The limiter takes a unit for anything due by now + EPS: decide as of then, so an
        # answer "a hair from now" never lets it take a unit that is not there.
        due = now + EPS
        if self._local is not None:
            logs = (log_.ready_at(due) for log_ in self._local.values())
            return max(self._local_from, *logs)
        self._expire(due)
        if self._pool:
            return now
        if self._lease_task is not None:
            return math.inf
        if self._retry_at is not None and due < self._retry_at:
            return self._retry_at
        self._retry_at = None
        self._lease_task = self._fleet.spawn(self._lease(self._want(now, demand)))
        return math.inf

    def take(self, now: float) -> None:
        if not self._wins:
            return
        self._forget(now)
        self._grants.append(now)
        if self._local is not None or not self._pool:
            member = f"{self._fleet.instance}:{next(self._seq)}"
            for log_ in (self._local or {}).values():
                log_.add(now)
            self._open.append((member, now, False))
            if self._local is None:
                # Shared, yet nothing leased (ready_at said no unit was due): never sent
                # unseen by the fleet, it is counted in the log from now.
                log.debug("fleet: budget %s: a unit taken without a lease", self.tag)
                self._reached.append(member)
                self._flush()
            self._history.append((now, member))
            return
        member, until = self._pool.popleft()
        self._open.append((member, until, True))
        self._history.append((until, member))  # counted in the log from no later than this

    def _forget(self, now: float) -> None:
        """Drop own entries older than the longest window, and grants older than a lease;
        stop tracking units taken a whole window ago (their request never said it ended)."""
        longest = max(w.seconds for w in self._wins)
        while self._history and self._history[0][0] <= now - longest:
            self._history.popleft()
        while self._open and self._open[0][1] <= now - longest:
            self._open.popleft()
        while self._grants and self._grants[0] < now - LEASE_TTL_MAX:
            self._grants.popleft()

    def give_back(self, now: float) -> None:
        if not self._wins or not self._open:
            return
        member, t, leased = self._open.popleft()
        for i in range(len(self._history) - 1, -1, -1):
            if self._history[i][1] == member:
                del self._history[i]
                break
        if not leased:
            for log_ in (self._local or {}).values():
                log_.remove(t)
        elif t > now and self._local is None:
            self._pool.appendleft((member, t))
        else:
            self._returns.append(member)
            self._flush()

    def reached(self, now: float) -> None:
        if not self._wins or not self._open:
            return
        member, t, leased = self._open.popleft()
        self._history.append((now, member))
        if self._local is not None:
            for log_ in self._local.values():
                if not leased:
                    log_.remove(t)
                log_.add(now)
        else:
            self._reached.append(member)
            self._flush()

    def nth_at(self, now: float, n: int) -> float:
        if not self._wins:
            return now
        if self._local is not None:
            logs = (log_.nth_at(now, n) for log_ in self._local.values())
            return max(self._local_from, *logs)
        if n <= len(self._pool):
            return now
        start = max(now, self._retry_at or now)
        pace = max(w.seconds / max(1, w.count) for w in self._wins)
        return start + (n - len(self._pool) - 1) * pace

    def unavailable(self) -> ProxyError | None:
        if self._local is None or not self._fleet.fails_closed:
            return None
        return StateUnavailable(
            f"the fleet's shared state (Redis) is unreachable and state.on_failure is closed: "
            f"credential {self.tag} is not used until it is back"
        )

    def started_hold(self, seconds: float) -> float:
        self._hold_end = max(self._hold_end, self._clock() + seconds)
        self._drop_pool()
        if self._fleet.connected and self._local is None:
            self._fleet.spawn(self._publish_hold(seconds))
        return self.jitter(seconds)

    def jitter(self, seconds: float) -> float:
        spread = min(HOLD_JITTER_MAX, HOLD_JITTER_FRACTION * seconds)
        return random.uniform(0, spread)  # noqa: S311 - spreading releases, not a secret

    def left(self, now: float) -> int | None:
        if not self._wins:
            return None
        if self._local is not None:
            return min(log_.left(now) for log_ in self._local.values())
        known = [w.count - self._latest[w.name][1] for w in self._wins if w.name in self._latest]
        return max(0, min(known)) + len(self._pool) if known else None

    def snapshot(self) -> dict[str, Any]:
        mode = "shared" if self._local is None else "local"
        if mode == "local" and self._fleet.fails_closed:
            mode = "closed"
        out: dict[str, Any] = {"mode": mode, "leased": len(self._pool)}
        if self._live is not None:
            out["live_instances"] = self._live
        if self._local is not None:
            out["local_share"] = self._fleet.share
        return out

    # -- leases --------------------------------------------------------------------------------

    @property
    def lease_ttl(self) -> float:
        return min(LEASE_TTL_MAX, min(w.seconds for w in self._wins) / 60)

    def _want(self, now: float, demand: int) -> int:
        smallest = min(w.count for w in self._wins)
        cap = max(1, min(LEASE_MAX, math.floor(smallest * LEASE_FRACTION)))
        ttl = self.lease_ttl
        while self._grants and self._grants[0] < now - ttl:
            self._grants.popleft()
        return max(1, min(cap, max(demand, len(self._grants))))

    def _expire(self, now: float) -> None:
        expired = False
        while self._pool and self._pool[0][1] <= now:
            self._returns.append(self._pool.popleft()[0])
            expired = True
        if expired:
            self._flush()

    def _drop_pool(self) -> None:
        self._returns.extend(member for member, _ in self._pool)
        self._pool.clear()
        self._flush()

    def _flush(self) -> None:
        """Send returned and reached units to the log, in one task at a time (batched)."""
        if (self._returns or self._reached) and self._sync_task is None and self._fleet.connected:
            self._sync_task = self._fleet.spawn(self._sync_log())

    async def _sync_log(self) -> None:
        try:
            while (self._returns or self._reached) and self._fleet.connected and self._wins:
                if not self._returns and len(self._reached) < LEASE_MAX:
                    await asyncio.sleep(min(REACHED_BATCH, self.lease_ttl))
                    if not self._fleet.connected or not self._wins:
                        break
                logs = [self._log_key(w) for w in self._wins]
                if self._returns:
                    members, self._returns = self._returns, []
                    await self._fleet.call(_RETURN, logs, members)
                if self._reached:
                    members, self._reached = self._reached, []
                    await self._fleet.call(_REACHED, logs, [*(w.ms for w in self._wins), *members])
        except _Down:
            self._returns.clear()  # left to expire in the log: counted a little too long
            self._reached.clear()  # counted from when they were leased: re-joining adds them
        finally:
            self._sync_task = None

    def _log_key(self, w: _Win) -> str:
        return f"{self._fleet.key(self.tag)}log:{w.name}"

    async def _lease(self, want: int) -> None:
        try:
            if self._epoch is None:
                await self.join()
                if self._epoch is None or self._local is not None:
                    return
            wins = self._wins
            share = self._fleet.share
            ttl = self.lease_ttl
            seq = next(self._seq)
            for _ in range(want - 1):
                next(self._seq)
            t0 = self._clock()
            args: list[Any] = [
                self._fleet.valid_until(t0),
                self._fleet.instance,
                self._epoch,
                want,
                math.floor(ttl * 1000),
                *self._fleet.membership_args(),
                seq,
            ]
            for w in wins:
                args += [w.count, w.ms, math.floor(w.count * share + 1e-9)]
            reply = await self._fleet.call(
                _LEASE, [*self._keys, *(self._log_key(w) for w in wins)], args
            )
            t1 = self._clock()
            granted, now_ms, hold_ms, next_ms = (int(x) for x in reply[:4])
            if granted == -1:
                self._epoch = None  # Redis lost our join (a restart): join again first
                return
            if granted < 0:
                return  # executed after we had given up on it: it did nothing
            self._contact = t1
            self._fleet.sample(now_ms, t0, t1)
            if hold_ms > now_ms:
                self._hold((hold_ms - now_ms) / 1000, FLEET_HOLD)
                return
            if self._local is not None:
                return
            for w, n in zip(wins, reply[4:], strict=False):
                self._latest[w.name] = (t1, int(n))
            if granted > 0:
                # Usable until a little before the entry's time in the log.
                until = t0 + ttl * 0.9
                self._pool.extend(
                    (f"{self._fleet.instance}:{seq + j}", until) for j in range(granted)
                )
            else:
                wait = max(0.001, (next_ms - now_ms) / 1000)
                self._retry_at = t1 + wait + random.uniform(0, 0.01)  # noqa: S311
        except _Down:
            pass
        finally:
            self._lease_task = None
            self._wake()

    async def _publish_hold(self, seconds: float) -> None:
        with contextlib.suppress(_Down):
            reply = await self._fleet.call(_HOLD, [self._keys[1]], [math.ceil(seconds * 1000)])
            until_ms, now_ms = int(reply[0]), int(reply[1])
            await self._fleet.publish(f"hold {self.tag} {until_ms} {now_ms}")

    def fleet_hold(self, until_ms: int, now_ms: int) -> None:
        """Another instance started a hold (a message on the fleet's channel)."""
        if until_ms > now_ms:
            self._drop_pool()
            self._hold((until_ms - now_ms) / 1000, FLEET_HOLD)

    # -- membership and degradation ----------------------------------------------------------

    async def join(self) -> None:
        """(Re-)join the fleet: add back our own entries (and, if Redis lost the logs, our
        share of what it had), our hold; then take budget from the fleet again."""
        if self._joining:
            return
        self._joining = True
        try:
            now = self._clock()
            if self._wins:
                self._forget(now)
            hold_ms = max(0, math.ceil((self._hold_end - now) * 1000))
            args: list[Any] = [
                self._fleet.valid_until(now),
                self._fleet.instance,
                self._known_epoch,
                os.urandom(8).hex(),
                hold_ms,
            ]
            own: dict[str, float] = {}  # a reached unit is there twice: its latest time counts
            for t, member in self._history:
                own[member] = max(t, own.get(member, t))
            for w in self._wins:
                entries = [(t, m, "0") for m, t in own.items() if t > now - w.seconds]
                entries += [(t, m, "1") for t, m in self._phantoms.get(w.name, ())]
                args += [w.ms, len(entries)]
                for t, member, phantom in entries:
                    args += [math.floor((now - t) * 1000), member, phantom]
            reply = await self._fleet.call(
                _JOIN, [*self._keys, *(self._log_key(w) for w in self._wins)], args
            )
            if isinstance(reply[0], int):
                return  # executed after we had given up on it: it did nothing
            self._contact = self._clock()
            epoch = reply[0].decode() if isinstance(reply[0], bytes) else str(reply[0])
            if int(reply[1]) and self._known_epoch:
                log.info("fleet: budget %s re-joined a Redis that had lost it", self.tag)
            self._epoch = self._known_epoch = epoch
            self._local = None
            self._phantoms = {}
            self._retry_at = None
        except _Down:
            pass
        finally:
            self._joining = False
            self._wake()

    async def heartbeat(self) -> None:
        """Stay live, learn the fleet's hold, and keep a picture of each window."""
        if self._epoch is None or self._local is not None:
            await self.join()
            return
        t0 = self._clock()
        args: list[Any] = [
            self._fleet.valid_until(t0),
            self._fleet.instance,
            self._epoch,
            QUANTILES,
            0,  # unused: the membership arguments sit where _LEASE has them
            *self._fleet.membership_args(),
            *(w.ms for w in self._wins),
        ]
        reply = await self._fleet.call(
            _HEARTBEAT, [*self._keys, *(self._log_key(w) for w in self._wins)], args
        )
        t1 = self._clock()
        if int(reply[0]) == -2:
            return
        if int(reply[0]) < 0:
            self._epoch = None
            await self.join()
            return
        self._contact = t1
        now_ms, hold_ms = int(reply[1]), int(reply[2])
        self._fleet.sample(now_ms, t0, t1)
        self._live = int(reply[3])
        if hold_ms > now_ms:
            self._hold((hold_ms - now_ms) / 1000, FLEET_HOLD)
        at = 4
        for w in self._wins:
            n = int(reply[at])
            scores = [int(x) for x in reply[at + 1 : at + 1 + QUANTILES]]
            at += 1 + QUANTILES
            self._snap[w.name] = (t1, n, [self._fleet.to_local(s) for s in scores])
        self._expire(self._clock())
        self._flush()

    def degrade(self) -> None:
        """Redis is unreachable: serve on the local share, counting what the fleet had used."""
        if self._local is not None:
            return
        now = self._clock()
        self._epoch = None
        self._pool.clear()  # leased units stay counted in the fleet's log until they expire
        self._returns.clear()
        self._reached.clear()
        self._retry_at = None
        self._episode += 1
        # The others count this instance live until MEMBER_TTL after its last contact, and
        # only then keep its share back: until then that share is not this instance's to use.
        self._local_from = self._contact + MEMBER_TTL + 0.1 if self._contact else now
        share = self._fleet.share
        local: dict[str, _LocalLog] = {}
        self._phantoms = {}
        for w in self._wins:
            log_ = _LocalLog(math.floor(w.count * share + 1e-9), w.seconds)
            times = self._phantom_times(w, now, share)
            for t in times:
                log_.add(t)
            local[w.name] = log_
            tag = f"{self._fleet.instance}:p{self._episode}:"
            self._phantoms[w.name] = [(t, f"{tag}{w.name}:{j}") for j, t in enumerate(times)]
        self._local = local
        self._wake()

    def _phantom_times(self, w: _Win, now: float, share: float) -> list[float]:
        """This instance's share of what the fleet had used of window `w`, placed no earlier
        than it really was (so it stays counted at least as long)."""
        snap, latest = self._snap.get(w.name), self._latest.get(w.name)
        if snap is None and latest is None:
            # Nothing known (a start without Redis): assume the fleet was steady at the full
            # rate, so this instance paces at its share from the start, without a burst.
            c = math.floor(w.count * share + 1e-9)
            return [now - w.seconds + (j + 1) * w.seconds / c for j in range(c)]
        times: list[float] = []
        groups: list[tuple[float, float, int]] = []  # (newest, oldest bound, entries)
        known_at = 0.0
        if snap is not None:
            known_at, n, quantiles = snap
            q = len(quantiles)
            for j, t in enumerate(quantiles):
                size = math.floor((j + 1) * n / q) - math.floor(j * n / q)
                older = quantiles[j + 1] if j + 1 < q else -math.inf
                groups.append((t, older, size))
                times += [min(t, now)] * math.ceil(size * share - 1e-9)
        if latest is not None and latest[0] > known_at:
            # Entries the last lease saw that the picture does not show as still counted then.
            at, n_latest = latest
            still = sum(size for _t, older, size in groups if older > at - w.seconds)
            extra = max(0, n_latest - still)
            times += [min(at + self.lease_ttl, now)] * math.ceil(extra * share - 1e-9)
        return times


# --- OAuth tokens -------------------------------------------------------------------------------


class FleetTokens:
    """One upstream's OAuth tokens in Redis: a sealed record, a fenced refresh lock, events.

    Implements oauth.TokenShare.
    """

    def __init__(self, fleet: Fleet, upstream: str) -> None:
        self._fleet = fleet
        self.tag = f"{upstream}/{OAUTH_CREDENTIAL}"
        base = fleet.key(self.tag)
        self._tokens_key, self._lock_key, self._fence_key = (
            base + "tokens",
            base + "lock",
            base + "fence",
        )
        self._event = asyncio.Event()
        self._provider: Callable[[], SharedTokens | None] | None = None
        self._notify: Callable[[], None] = _noop
        self._holding: int | None = None  # the fence of the lock this instance holds

    def attach(
        self, provider: Callable[[], SharedTokens | None], notify: Callable[[], None]
    ) -> None:
        self._provider, self._notify = provider, notify

    async def _call(self, script: str, keys: list[str], args: list[Any]) -> Any:
        try:
            return await self._fleet.call(script, keys, args)
        except _Down as error:
            raise ShareUnavailable(str(error)) from None

    def _seal(self, tokens: SharedTokens) -> bytes:
        return self._fleet.sealer.seal(self._tokens_key, tokens.record.reveal().encode())

    async def read(self) -> SharedTokens | None:
        try:
            blob, gen, issued = await self._fleet.command(
                "hmget", self._tokens_key, "blob", "gen", "issued"
            )
        except _Down as error:
            raise ShareUnavailable(str(error)) from None
        if blob is None or gen is None:
            return None
        try:
            plaintext = self._fleet.sealer.open(self._tokens_key, bytes(blob))
        except InvalidTag:
            raise ShareUnavailable(
                f"the fleet's OAuth record {self._tokens_key} does not decrypt: every instance "
                "must use the same master key"
            ) from None
        record = Secret(plaintext.decode())
        return SharedTokens(record, int(gen), float(issued or 0) / 1000)

    async def offer(self, tokens: SharedTokens) -> int | None:
        reply = await self._call(
            _OFFER,
            [self._tokens_key, self._fence_key],
            [
                self._seal(tokens),
                tokens.gen,
                math.floor(tokens.issued_at * 1000),
                math.floor(SETTLE * 1000),
            ],
        )
        if not int(reply[0]):
            return None
        gen = int(reply[1])
        await self._fleet.publish(f"tokens {self.tag} {gen}")
        return gen

    async def lock(self, lease: float) -> tuple[int | None, float]:
        reply = await self._call(
            _LOCK,
            [self._lock_key, self._fence_key, self._tokens_key],
            [
                self._fleet.valid_until(time.monotonic()),
                self._fleet.instance,
                math.ceil(lease * 1000),
            ],
        )
        fence, wait_ms = int(reply[0]), int(reply[1])
        if fence > 0:
            self._holding = fence
            return fence, 0.0
        return None, max(0.0, wait_ms / 1000)

    async def commit(self, fence: int, tokens: SharedTokens) -> bool:
        self._holding = None  # released by the script, or given up if the call fails
        reply = await self._call(
            _COMMIT,
            [self._tokens_key, self._lock_key],
            [
                self._fleet.instance,
                fence,
                self._seal(tokens),
                math.floor(tokens.issued_at * 1000),
            ],
        )
        if not int(reply):
            return False
        await self._fleet.publish(f"tokens {self.tag} {fence}")
        return True

    async def unlock(self, fence: int) -> None:
        self._holding = None
        await self._call(_UNLOCK, [self._lock_key], [f"{self._fleet.instance}:{fence}"])

    async def changed(self, timeout: float) -> None:
        self._event.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._event.wait(), timeout)

    def published(self) -> None:
        """Another instance wrote tokens, or the fleet is reachable again."""
        self._event.set()
        self._notify()

    async def rejoin(self) -> None:
        """Offer the tokens this instance holds (Redis may have lost newer ones than its own),
        and drop a lock Redis granted to a call of ours that timed out: no refresh of ours is
        in flight under it, and the fleet would otherwise wait for its lease to run out."""
        with contextlib.suppress(ShareUnavailable):
            if self._holding is None:
                await self._call(_RELEASE_MINE, [self._lock_key], [self._fleet.instance])
            tokens = self._provider() if self._provider is not None else None
            if tokens is not None:
                await self.offer(tokens)


# --- the fleet ----------------------------------------------------------------------------------


class Fleet:
    """This instance's link to the fleet: the Redis client, membership, holds, degradation.

    One per daemon. `budget()` and `tokens()` hand out the per-credential parts; `start()`
    connects (never fails: an unreachable Redis means serving degraded and reconnecting).
    """

    def __init__(
        self,
        state: StateConfig,
        master_key: bytes,
        *,
        client: Client | None = None,
        instance: str | None = None,
    ) -> None:
        self.state = state
        self.instance = instance or _instance_id()
        self.sealer = _Sealer(master_key)
        self.url = public_url(state.url or "")
        self._others: list[Redis] = []
        if client is None:
            client, self._others = connect(state)
        self._client: Client = client
        self._scripts: dict[str, AsyncScript] = {}
        self._budgets: dict[str, FleetBudget] = {}
        self._tokens: dict[str, FleetTokens] = {}
        self.connected = False
        self._since: float | None = time.time()  # degraded since (epoch s); None: connected
        self._error = "not connected yet"
        self._offset: float | None = None  # Redis time minus monotonic time, seconds
        self._trouble = asyncio.Event()
        self._up = asyncio.Event()
        self._tried = asyncio.Event()  # the first attempt to connect is over
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False
        self._announced = False
        self._loud_until = 0.0  # an outage before then is logged at debug level (flapping)
        self._loud = False  # the current outage was logged as a warning

    # -- configuration -------------------------------------------------------------------------

    @property
    def share(self) -> float:
        return self.state.share

    @property
    def instances(self) -> int | None:
        return self.state.instances

    @property
    def fails_closed(self) -> bool:
        return self.state.on_failure == "closed"

    def key(self, tag: str) -> str:
        """The prefix of a credential's keys: the hash tag keeps them in one Cluster slot."""
        return f"{self.state.key_prefix}{{{tag}}}:"

    @property
    def channel(self) -> str:
        return f"{self.state.key_prefix}events"

    def budget(self, upstream: str, credential: str, limit: RateLimitConfig | None) -> FleetBudget:
        tag = f"{upstream}/{credential}"
        budget = self._budgets.get(tag)
        if budget is None:
            budget = self._budgets[tag] = FleetBudget(self, tag, limit)
        return budget

    def tokens(self, upstream: str) -> FleetTokens:
        shared = self._tokens.get(upstream)
        if shared is None:
            shared = self._tokens[upstream] = FleetTokens(self, upstream)
        return shared

    def sync(self, config: Config) -> None:
        """A reload: `state` itself is read at start only."""
        if config.state != self.state:
            log.warning("config: changes under `state:` take effect at the next restart")

    # -- Redis calls ---------------------------------------------------------------------------

    def spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def call(self, source: str, keys: list[str], args: list[Any]) -> Any:
        """Run a Lua script; any Redis failure degrades the fleet and raises _Down."""
        if not self.connected:
            raise _Down(self._error)
        script = self._scripts.get(source)
        if script is None:
            script = self._scripts[source] = self._client.register_script(source)
        try:
            return await script(keys=keys, args=args)
        except (RedisError, OSError) as error:
            self.failed(error)
            raise _Down(_describe(error)) from None

    async def command(self, name: str, *args: Any) -> Any:
        if not self.connected:
            raise _Down(self._error)
        try:
            return await getattr(self._client, name)(*args)
        except (RedisError, OSError) as error:
            self.failed(error)
            raise _Down(_describe(error)) from None

    async def publish(self, message: str) -> None:
        with contextlib.suppress(_Down):
            await self.command("publish", self.channel, f"{message} {self.instance}")

    def valid_until(self, t0: float) -> int:
        """Redis time (ms) after which a call started at `t0` is given up (0: unknown)."""
        if self._offset is None:
            return 0
        return math.floor((t0 + REDIS_TIMEOUT * 0.9 + self._offset) * 1000)

    def membership_args(self) -> list[int]:
        """member_ttl_ms, instances (0: not configured), forget_ms."""
        return [
            math.floor(MEMBER_TTL * 1000),
            self.instances or 0,
            math.floor(MEMBER_FORGET * 1000),
        ]

    def sample(self, now_ms: int, t0: float, t1: float) -> None:
        """Redis's clock against ours, from a reply's TIME and the call's start and end."""
        self._offset = now_ms / 1000 - (t0 + t1) / 2

    def to_local(self, score_ms: int) -> float:
        """A Redis time (ms) on this process's monotonic clock."""
        offset = self._offset if self._offset is not None else time.time() - time.monotonic()
        return score_ms / 1000 - offset

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect, or start degraded and keep trying; returns within a few seconds."""
        self.spawn(self._supervise())
        self.spawn(self._listen())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._tried.wait(), REDIS_TIMEOUT * 2)
        if not self.connected and not self._announced:
            self._announce_down()

    async def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.connected:
            for budget in self._budgets.values():
                with contextlib.suppress(RedisError, OSError):
                    await self._client.zrem(budget._keys[2], self.instance)
        for each in (self._client, *self._others):
            with contextlib.suppress(RedisError, OSError):
                await each.aclose()

    def failed(self, error: BaseException) -> None:
        """A Redis call failed: serve on the local share (or closed) until it is back."""
        self._error = _describe(error)
        if not self.connected:
            return
        self.connected = False
        self._up.clear()
        self._since = time.time()
        self._announce_down()
        for budget in self._budgets.values():
            budget.degrade()
        self._trouble.set()

    def _announce_down(self) -> None:
        """One warning per outage (at most one a minute while it flaps; the others at debug)."""
        self._announced = True
        now = time.monotonic()
        self._loud = now >= self._loud_until
        if self._loud:
            self._loud_until = now + FLAP_QUIET
        if self.fails_closed:
            what = "failing closed (503 state_unavailable) until it is back"
        else:
            what = f"serving on a local share ({self.share:.3g}) of each budget until it is back"
        log.log(
            logging.WARNING if self._loud else logging.DEBUG,
            "fleet: Redis at %s is unreachable (%s): %s; reconnecting with backoff",
            self.url,
            self._error,
            what,
        )

    async def _connect(self) -> None:
        pool = getattr(self._client, "connection_pool", None)
        try:
            if pool is not None:
                await pool.disconnect()  # connections to a server that went away
            await self._client.ping()
        except (RedisError, OSError) as error:
            self._error = _describe(error)
            raise _Down(self._error) from None
        was_down = self._since
        self.connected = True
        for budget in list(self._budgets.values()):
            await budget.join()
            if not self.connected:
                raise _Down(self._error)
        for shared in list(self._tokens.values()):
            await shared.rejoin()
        if not self.connected:
            raise _Down(self._error)
        self._since = None
        self._error = ""
        self._up.set()
        if self._announced and was_down is not None:
            log.log(
                logging.INFO if self._loud else logging.DEBUG,
                "fleet: Redis at %s is reachable again after %.1f s; re-joined the fleet",
                self.url,
                time.time() - was_down,
            )
        else:
            log.info("fleet: connected to Redis at %s as instance %s", self.url, self.instance)
        for shared in self._tokens.values():
            shared.published()

    async def _supervise(self) -> None:
        backoff = RECONNECT_MIN
        while not self._closing:
            try:
                if self.connected:
                    self._trouble.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._trouble.wait(), HEARTBEAT)
                    if self.connected:
                        for budget in list(self._budgets.values()):
                            await budget.heartbeat()
                    continue
                await self._connect()
                backoff = RECONNECT_MIN
                self._tried.set()
            except _Down:
                self._tried.set()
                if not self.connected:
                    await asyncio.sleep(random.uniform(backoff / 2, backoff))  # noqa: S311
                    backoff = min(RECONNECT_MAX, backoff * 2)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("fleet: supervisor failed; restarting it")
                await asyncio.sleep(1)

    async def _listen(self) -> None:
        """Holds and token news from the other instances, as they happen."""
        while not self._closing:
            await self._up.wait()
            try:
                pubsub = self._client.pubsub()
            except (AttributeError, NotImplementedError):
                # The asyncio RedisCluster of redis-py 5.0.1 (pyproject's floor) has no pubsub()
                # (8.1 has): holds and token news then travel by the 0.5 s heartbeats alone.
                log.info("fleet: no pub/sub with this client; relying on heartbeats")
                return
            try:
                await pubsub.subscribe(self.channel)
                while self.connected:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if message is not None:
                        self._dispatch(message.get("data"))
            except (RedisError, OSError) as error:
                # Commands and heartbeats notice a Redis that is really gone; here, listen again.
                log.debug("fleet: pub/sub interrupted (%s)", _describe(error))
                await asyncio.sleep(RECONNECT_MIN)
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]

    def _dispatch(self, data: object) -> None:
        if not isinstance(data, bytes | str):
            return
        text = data.decode(errors="replace") if isinstance(data, bytes) else data
        parts = text.split()
        if len(parts) < 3 or parts[-1] == self.instance:
            return
        kind, tag = parts[0], parts[1]
        if kind == "hold" and len(parts) == 5:
            budget = self._budgets.get(tag)
            if budget is not None:
                budget.fleet_hold(int(parts[2]), int(parts[3]))
        elif kind == "tokens":
            upstream = tag.rpartition("/")[0]
            shared = self._tokens.get(upstream)
            if shared is not None:
                shared.published()

    # -- what the admin listener shows ---------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """For /status: where, as whom, and whether the fleet is joined; never a secret."""
        return {
            "backend": "redis",
            "url": self.url,
            "instance": self.instance,
            "state": "connected" if self.connected else "degraded",
            "since": self._since,
            "error": self._error or None,
            "on_failure": self.state.on_failure,
            "local_share": self.share,
            "instances": self.instances,
        }

    def readiness(self) -> tuple[bool, str | None]:
        """(ready, note): degraded with on_failure local is ready, but says so."""
        if self.connected:
            return True, None
        since = "" if self._since is None else f" since {time.ctime(self._since)}"
        if self.fails_closed:
            return False, (
                f"state: Redis at {self.url} is unreachable{since} ({self._error}); failing "
                "closed (state.on_failure: closed)"
            )
        return True, (
            f"state: Redis at {self.url} is unreachable{since} ({self._error}); serving on a "
            f"local share ({self.share:.3g}) of each budget"
        )
