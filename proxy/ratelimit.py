"""Pacing, 429 holds and a fair, bounded wait queue for one upstream credential.

A `Limiter` lets a request go only when the credential's budget (a token bucket per
`rate_limit` window, corrected by the upstream's `X-RateLimit-*` headers) allows it and no
429 hold is in force; waiting requests queue FIFO per app and are served round-robin between
apps. It must never send during a hold, never keep a request past its deadline without an
answer, and never poll: it keeps one timer at most, for the next thing that can happen. In fleet
mode a `SharedBudget` (proxy/fleet.py) takes the place of the local windows and shares holds.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import json
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Mapping
from datetime import UTC
from email.utils import parsedate_to_datetime
from typing import Any, Final, Protocol

from multidict import CIMultiDict, CIMultiDictProxy, istr

from proxy.config import QueueConfig, RateLimitConfig
from proxy.errors import ProxyError, QueueFull, RateLimitExceeded

__all__ = [
    "BACKOFF_CAP",
    "EPS",
    "FLEET_HOLD",
    "MAX_HOLD",
    "PACE_MARGIN",
    "WINDOWS",
    "Limiter",
    "SharedBudget",
    "parse_retry_after",
]

log = logging.getLogger("credproxy.ratelimit")

# Longest hold any upstream hint may impose; longer (absurd) values are capped to it.
MAX_HOLD: Final = 86_400.0
# A 429 without any usable hint holds for BACKOFF_BASE * 2**(n-1) s after the n-th in a row.
BACKOFF_BASE: Final = 1.0
BACKOFF_CAP: Final = 60.0
# Paced requests are spaced this much wider than count/window, so the jitter of the network
# cannot make a sliding-window upstream see one request too many in a window.
PACE_MARGIN: Final = 0.01
# RateLimitConfig field -> window length in seconds (tests shorten these).
WINDOWS: tuple[tuple[str, float], ...] = (("per_minute", 60.0), ("per_hour", 3600.0))

# X-RateLimit-Reset values below this cannot be epoch seconds (2001): they count from now.
_EPOCH_FLOOR: Final = 1e9
# A 429 body larger than this is not parsed for `retry_after`.
_MAX_BODY: Final = 65_536
# Timers may fire a hair early; anything due within this is due now.
EPS: Final = 1e-6
_REMAINING_ZERO: Final = "X-RateLimit-Remaining: 0"
# The source of a hold another instance of the fleet started.
FLEET_HOLD: Final = "another instance of the fleet"


class SharedBudget(Protocol):
    """A credential's budget and holds shared with other instances (proxy/fleet.py).

    It replaces the limiter's own windows. Calls are synchronous; the budget does its I/O
    in the background and calls `wake` when what it said may have changed.
    """

    def bind(self, wake: Callable[[], None], hold: Callable[[float, str], None]) -> None:
        """`wake()`: re-evaluate now; `hold(seconds, source)`: the fleet is on hold."""
        ...

    def reconfigure(self, limit: RateLimitConfig | None) -> None: ...

    def ready_at(self, now: float, demand: int) -> float:
        """When one unit could be taken; math.inf while an answer is pending (then `wake`).

        The limiter takes a unit when this is within EPS of now (timers fire a hair early),
        so anything it returns at or before now + EPS must mean a unit is there to take."""
        ...

    def take(self, now: float) -> None: ...

    def give_back(self, now: float) -> None: ...

    def reached(self, now: float) -> None:
        """A granted request reached the upstream by `now` (its answer came, or sending it
        failed part way): count it from `now`, since the upstream counts it when it arrives."""
        ...

    def nth_at(self, now: float, n: int) -> float:
        """An estimate of when the n-th of n units asked for now could be taken."""
        ...

    def unavailable(self) -> ProxyError | None:
        """The error to answer with when the budget cannot be had at all (fail closed)."""
        ...

    def started_hold(self, seconds: float) -> float:
        """This instance holds for `seconds`: tell the fleet; returns the jitter to add."""
        ...

    def jitter(self, seconds: float) -> float:
        """Extra seconds to hold past a fleet hold, so the fleet does not resume at once."""
        ...

    def left(self, now: float) -> int | None: ...

    def snapshot(self) -> dict[str, Any]: ...


class _Window:
    """One budget window as a GCRA: `count` back to back, then one per `interval` seconds."""

    __slots__ = ("count", "interval", "name", "tat", "tau")

    def __init__(self, name: str, count: int, seconds: float, now: float) -> None:
        self.name = name
        self.tat = now  # theoretical arrival time; <= now means the bucket is full
        self.count = count
        self.interval = seconds * (1 + PACE_MARGIN) / count
        self.tau = (count - 1) * self.interval

    def resize(self, count: int, seconds: float, now: float) -> None:
        """Take new figures; what was used in the window stays used."""
        used = max(0.0, self.tat - now) / self.interval
        self.count = count
        self.interval = seconds * (1 + PACE_MARGIN) / count
        self.tau = (count - 1) * self.interval
        self.tat = now + used * self.interval

    def ready_at(self) -> float:
        return self.tat - self.tau

    def nth_at(self, now: float, n: int) -> float:
        """When the n-th of n requests asked for now could go (n >= 1)."""
        return max(self.tat, now) + (n - 1) * self.interval - self.tau

    def take(self, now: float) -> None:
        self.tat = max(self.tat, now) + self.interval

    def give_back(self) -> None:
        self.tat -= self.interval

    def drain(self, at: float) -> None:
        """Leave exactly one request of budget at `at`, then pace."""
        self.tat = max(self.tat, at + self.tau)

    def left(self, now: float) -> int:
        return max(0, math.floor(self.count - max(0.0, self.tat - now) / self.interval + 1e-9))


def _build_windows(limit: RateLimitConfig | None, now: float, old: list[_Window]) -> list[_Window]:
    if limit is None:
        return []
    kept = {w.name: w for w in old}
    windows = []
    for name, seconds in WINDOWS:
        count = getattr(limit, name)
        if count is None:
            continue
        window = kept.get(name)
        if window is None:
            window = _Window(name, count, seconds, now)
        elif window.count != count:
            window.resize(count, seconds, now)
        windows.append(window)
    return windows


class _App:
    """One app's waiters (FIFO) and its own budget on this upstream credential."""

    __slots__ = ("limit", "live", "name", "queue", "ringed", "windows")

    def __init__(self, name: str) -> None:
        self.name = name
        self.queue: deque[_Waiter] = deque()  # may hold settled entries, dropped lazily
        self.live = 0  # waiters still waiting
        self.ringed = False  # in the round-robin ring
        self.limit: RateLimitConfig | None = None
        self.windows: list[_Window] = []

    def ready_at(self, now: float) -> float:
        t = now
        for window in self.windows:
            t = max(t, window.ready_at())
        return t


class _Waiter:
    """A request waiting for budget: a future, its app and its deadline. No task."""

    __slots__ = ("app", "deadline", "fut", "live", "seq")

    def __init__(self, fut: asyncio.Future[None], app: _App, deadline: float, seq: int) -> None:
        self.fut = fut
        self.app = app
        self.deadline = deadline
        self.seq = seq
        self.live = True  # False once granted, failed or cancelled (and counted out)

    def __lt__(self, other: _Waiter) -> bool:  # heap order: earliest deadline first
        return (self.deadline, self.seq) < (other.deadline, other.seq)


def _late(bound: float, deadline: float) -> bool:
    """Whether a request whose earliest moment is `bound` misses `deadline`.

    math.inf means a shared budget's answer is pending: the request waits for it (or for its
    deadline), it is not refused before anyone knows.
    """
    return bound != math.inf and bound > deadline


# aiohttp's header types: `get` ignores the case of the name.
_CASELESS = (CIMultiDict, CIMultiDictProxy)
_REMAINING = istr("X-RateLimit-Remaining")  # look-ups by istr skip lower-casing the name


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    if value is None and not isinstance(headers, _CASELESS):
        # A plain mapping (a test's dict): look for the name in any case.
        lowered = name.lower()
        for key, item in headers.items():
            if key.lower() == lowered:
                return item
    return value


def _check_seconds(seconds: float) -> tuple[float | None, str | None]:
    if not math.isfinite(seconds):
        return None, "unparsable"
    if seconds < 0:
        return None, "negative"
    if seconds > MAX_HOLD:
        return MAX_HOLD, f"over a day, capped at {MAX_HOLD:.0f} s"
    return seconds, None


def _parse_retry_after(value: str, now: float) -> tuple[float | None, str | None]:
    """Seconds to wait and what was wrong with the value, if anything."""
    text = value.strip()
    if not text:
        return None, "empty"
    try:
        return _check_seconds(float(text))
    except ValueError:
        pass
    try:
        moment = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None, "unparsable"
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return _check_seconds(max(0.0, moment.timestamp() - now))


def parse_retry_after(value: str | None, *, now: float) -> float | None:
    """`Retry-After` (delay-seconds or HTTP-date; `now` is epoch seconds) as seconds to wait.

    None when absent, unparsable or negative; more than a day is capped to a day; a date
    already past gives 0.
    """
    if value is None:
        return None
    return _parse_retry_after(value, now)[0]


def _body_retry_after(body: bytes | None) -> tuple[float | None, str | None]:
    """`retry_after` from a JSON error body (`{"error": {"retry_after": N}}` or top level)."""
    if not body or len(body) > _MAX_BODY:
        return None, None
    try:
        doc = json.loads(body)
    except ValueError:  # UnicodeDecodeError and JSONDecodeError both are
        return None, None
    if not isinstance(doc, dict):
        return None, None
    error = doc.get("error")
    value = error.get("retry_after") if isinstance(error, dict) else None
    if value is None:
        value = doc.get("retry_after")
    if value is None:
        return None, None
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None, "unparsable"
    try:
        return _check_seconds(float(value))
    except (ValueError, OverflowError):
        return None, "unparsable"


def _parse_reset(value: str, wall: float) -> tuple[float | None, str | None]:
    """`X-RateLimit-Reset` as epoch seconds (small values count from now), capped a day ahead."""
    try:
        number = float(value.strip())
    except ValueError:
        return None, "unparsable"
    if not math.isfinite(number) or number < 0:
        return None, "unparsable" if not math.isfinite(number) else "negative"
    epoch = wall + number if number < _EPOCH_FLOOR else number
    if epoch - wall > MAX_HOLD:
        return wall + MAX_HOLD, f"over a day ahead, capped at {MAX_HOLD:.0f} s"
    return epoch, None


def _parse_remaining(value: str) -> int | None:
    try:
        number = float(value.strip())
    except ValueError:
        return None
    if not math.isfinite(number):
        return None
    return max(0, math.floor(number))


class Limiter:
    """Budget, hold and fair queue for one upstream credential.

    `acquire` returns when a request may be sent now, having spent one unit of budget;
    `observe` takes every upstream response to follow the server's own count and to hold
    after a 429. One asyncio loop only; not thread-safe. Times given to and kept by the
    limiter are on `clock` (monotonic); `hold_until` and `reset` are epoch seconds (`wall`).
    """

    def __init__(
        self,
        name: str,
        limit: RateLimitConfig | None,
        queue: QueueConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        on_hold: Callable[[float], None] | None = None,
        budget: SharedBudget | None = None,
    ) -> None:
        self.name = name
        self._clock = clock
        self._wall = wall
        self._on_hold = on_hold
        self._budget = budget
        # With a shared budget the fleet's windows replace this process's own.
        self._windows = _build_windows(limit, clock(), []) if budget is None else []
        self.max_size = queue.max_size
        self._max_wait = queue.max_wait
        self._apps: dict[str, _App] = {}
        self._ring: deque[_App] = deque()  # apps with queued entries, in round-robin order
        self._heap: list[_Waiter] = []  # by deadline; may hold settled entries
        self._stored = 0  # entries in all app queues, settled or not
        self._depth = 0  # live waiters
        self._seq = itertools.count()
        # hold: nothing is sent before _hold_end (clock); _hold_until is the same as epoch
        self._hold_end: float | None = None
        self._hold_until: float | None = None
        self._hold_started = 0.0
        self._strikes = 0  # 429s in a row, for the backoff
        # the server's count: remaining until _reset_at (clock) / _reset (epoch)
        self._remaining: int | None = None
        self._reset_at: float | None = None
        self._reset: float | None = None
        self._warned: set[str] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        if budget is not None:
            budget.bind(self.wake, self._fleet_hold)

    # ------------------------------------------------------------------ public

    def try_acquire(
        self, app: str, *, app_limit: RateLimitConfig | None = None, retry: bool = False
    ) -> bool:
        """`acquire`'s path for a request that may go now, without a coroutine or a future.

        True: one unit of budget is spent, exactly as `acquire` would have. False: nothing
        was spent, and the caller awaits `acquire`, which queues it (or refuses it).
        With a fleet budget it always says False: asking the shared budget may lease units,
        so that is left to `acquire` alone.
        """
        if self._budget is not None:
            return False
        now = self._clock()
        state = self._app(app, app_limit, now)
        if (
            self._hold_end is None
            and self._reset_at is None
            and self._remaining is None
            and self._timer is None
            and not (self._depth or self._heap or self._stored)
        ):
            # The common case: no hold, no server count, nobody queued, no timer. What the
            # general path below would do comes down to the windows alone.
            ready = now + EPS
            for window in self._windows:
                if window.ready_at() > ready:
                    return False
            if state.ready_at(now) > ready:
                return False
            self._charge(now, state)
            return True
        return self._try_acquire(now, state, retry)

    def _try_acquire(self, now: float, state: _App, retry: bool) -> bool:
        """`try_acquire` in full: every state may take this path and get the same answer."""
        if self._depth or self._heap or self._stored:
            self._pump(now)
        else:
            self._refresh(now)  # all _pump does with nobody queued, but for _schedule below
        if (retry or state.live == 0) and self._bound(now, state) <= now + EPS:
            self._charge(now, state)
            self._schedule(now)
            return True
        return False

    async def acquire(
        self,
        app: str,
        *,
        deadline: float,
        app_limit: RateLimitConfig | None = None,
        retry: bool = False,
    ) -> None:
        """Wait until one request of `app` may be sent now, and spend its budget.

        `deadline` is on `clock` and is never later than now + `queue.max_wait`. With `retry`
        (the request already waited and got a 429) it goes to the front of its app's queue
        and is not refused for a full queue. Raises RateLimitExceeded (at once when the
        deadline is before the earliest moment it could go) or QueueFull.
        """
        now = self._clock()
        deadline = min(deadline, now + self._max_wait)
        state = self._app(app, app_limit, now)
        self._pump(now)
        if self._budget is not None:
            closed = self._budget.unavailable()
            if closed is not None:
                raise closed
        if (retry or state.live == 0) and self._bound(now, state) <= now + EPS:
            self._charge(now, state)
            self._schedule(now)
            return
        if _late(self._bound(now, state), deadline):
            raise self._too_late(now, state, extra=1)
        if not retry and self._depth >= self.max_size:
            raise QueueFull(
                f"upstream {self.name}: {self._depth} requests are already waiting "
                f"(queue.max_size {self.max_size}); try again later"
            )
        waiter = _Waiter(
            asyncio.get_running_loop().create_future(), state, deadline, next(self._seq)
        )
        if retry:
            state.queue.appendleft(waiter)
        else:
            state.queue.append(waiter)
        if not state.ringed:
            state.ringed = True
            if retry:
                self._ring.appendleft(state)
            else:
                self._ring.append(state)
        self._stored += 1
        state.live += 1
        self._depth += 1
        heapq.heappush(self._heap, waiter)
        self._schedule(now)
        try:
            await waiter.fut
        except asyncio.CancelledError:
            fut = waiter.fut
            if waiter.live:
                self._settle(waiter)
            elif fut.done() and not fut.cancelled() and fut.exception() is None:
                self._refund(state)  # granted in the very tick it was cancelled: never sent
            self._pump(self._clock())
            raise

    def observe(
        self, status: int, headers: Mapping[str, str], body: bytes | None = None
    ) -> float | None:
        """Learn from one upstream response; on a 429, hold and return the hold in seconds."""
        if (
            status != 429
            and self._budget is None
            and not (self._depth or self._heap or self._stored)
            and _header(headers, _REMAINING) is None
        ):
            # The common answer: no 429, no count from the server, nobody queued and no fleet.
            # `_observe` would refresh, clear the strikes, find no header to follow and pump
            # an empty queue; the pump's only work then is `_schedule`, which has nothing to
            # do without a hold or a timer.
            now = self._clock()
            self._refresh(now)
            self._strikes = 0
            if self._hold_end is not None or self._timer is not None:
                self._schedule(now)
            return None
        return self._observe(status, headers, body)

    def _observe(self, status: int, headers: Mapping[str, str], body: bytes | None) -> float | None:
        """`observe` in full: every response may take this path and get the same state."""
        now = self._clock()
        wall = self._wall()
        self._refresh(now)
        held: float | None = None
        if status == 429:
            if self._hold_end is None:
                self._strikes += 1
            seconds, source = self._hold_seconds(headers, body, wall)
            self._start_hold(now, wall, now + seconds, source)
        else:
            self._strikes = 0
        self._follow_headers(headers, now, wall)
        if status == 429 and self._hold_end is not None:
            held = self._hold_end - now
        self._pump(now)
        return held

    def reconfigure(self, limit: RateLimitConfig | None, queue: QueueConfig) -> None:
        """Take new figures after a config reload, keeping budget spent, holds and waiters."""
        now = self._clock()
        if self._budget is None:
            self._windows = _build_windows(limit, now, self._windows)
        else:
            self._budget.reconfigure(limit)
        self.max_size = queue.max_size
        self._max_wait = queue.max_wait
        self._pump(now)

    def release(self, app: str) -> None:
        """Give back the budget of a granted request that never reached the upstream."""
        self._refund(self._apps.get(app))
        self._pump(self._clock())

    def reached(self) -> None:
        """A granted request has reached the upstream (an answer came, or sending failed part
        way). The local windows are paced and need nothing; a fleet budget counts it from now,
        as late as the upstream can have counted it."""
        if self._budget is not None:
            self._budget.reached(self._clock())

    def _fleet_hold(self, seconds: float, source: str) -> None:
        """Another instance (or the fleet's record) says the credential is on hold."""
        now = self._clock()
        self._refresh(now)
        if seconds > 0:
            self._start_hold(now, self._wall(), now + seconds, source)
        self._pump(now)

    def wake(self) -> None:
        """Grant what is due and fail what can no longer make it, now.

        The limiter's own timer calls this; call it after moving an injected clock.
        """
        self._pump(self._clock())

    @property
    def depth(self) -> int:
        """Requests waiting now."""
        return self._depth

    @property
    def hold_until(self) -> float | None:
        """Epoch seconds when the current hold ends; None when not holding."""
        if self._hold_end is None or self._hold_end <= self._clock() + EPS:
            return None
        return self._hold_until

    @property
    def remaining(self) -> int | None:
        """Requests left: the server's count if it sent one, else this limiter's own budget."""
        now = self._clock()
        if self._server_known(now) and self._remaining is not None:
            return max(0, self._remaining)
        if self._windows:
            return min(w.left(now) for w in self._windows)
        if self._budget is not None:
            return self._budget.left(now)
        return None

    @property
    def reset(self) -> float | None:
        """Epoch seconds when `remaining` refills: the server's reset, else when all is back."""
        now = self._clock()
        if self._server_known(now):
            return self._reset
        if self._windows:
            return self._wall() + max(0.0, max(w.tat - now for w in self._windows))
        return None

    def snapshot(self) -> dict[str, Any]:
        """State for /status: queue, hold and budget; never a secret."""
        reset = self.reset
        snapshot: dict[str, Any] = {
            "queue": {"depth": self.depth, "max_size": self.max_size},
            "hold_until": self.hold_until,
            "rate_limit": {
                "remaining": self.remaining,
                "reset": None if reset is None else math.ceil(reset),
            },
        }
        if self._budget is not None:
            snapshot["fleet"] = self._budget.snapshot()
        return snapshot

    # ------------------------------------------------------------------ budget

    def _app(self, name: str, limit: RateLimitConfig | None, now: float) -> _App:
        state = self._apps.get(name)
        if state is None:
            state = self._apps[name] = _App(name)
        if limit is not state.limit and limit != state.limit:  # a model compares field by field
            state.limit = limit
            state.windows = _build_windows(limit, now, state.windows)
        return state

    def _server_known(self, now: float) -> bool:
        return self._remaining is not None and (
            self._reset_at is None or self._reset_at > now + EPS
        )

    def _upstream_ready(self, now: float) -> float:
        """Earliest time the credential could send one request (after _refresh(now))."""
        t = now
        if self._hold_end is not None:
            t = max(t, self._hold_end)
        if self._remaining is not None and self._remaining <= 0 and self._reset_at is not None:
            t = max(t, self._reset_at)
        for window in self._windows:
            t = max(t, window.ready_at())
        if self._budget is not None and t <= now + EPS:
            # Asked only when nothing else holds the request back: asking may lease budget.
            t = max(t, self._budget.ready_at(now, self._depth + 1))
        return t

    def _bound(self, now: float, state: _App) -> float:
        """Earliest time a request of this app could go: no waiter can go before it."""
        return max(self._upstream_ready(now), state.ready_at(now))

    def _charge(self, now: float, state: _App) -> None:
        if self._budget is not None:
            self._budget.take(now)
        for window in self._windows:
            window.take(now)
        for window in state.windows:
            window.take(now)
        if self._remaining is not None:
            self._remaining -= 1

    def _refund(self, state: _App | None) -> None:
        if self._budget is not None:
            self._budget.give_back(self._clock())
        for window in self._windows:
            window.give_back()
        for window in state.windows if state is not None else ():
            window.give_back()
        if self._remaining is not None:
            self._remaining += 1

    def _too_late(self, now: float, state: _App, *, extra: int) -> RateLimitExceeded:
        """The error for a request that cannot go in time, with when one could go instead."""
        n = self._depth + extra  # a retry joins the back of the whole queue
        t = max(now, self._hold_end or now)
        if (
            self._remaining is not None
            and self._reset_at is not None
            and self._reset_at > now
            and self._remaining < n
        ):
            t = max(t, self._reset_at)
        for window in self._windows:
            t = max(t, window.nth_at(now, n))
        if self._budget is not None:
            t = max(t, self._budget.nth_at(now, n))
        for window in state.windows:
            t = max(t, window.nth_at(now, state.live + extra))
        wait = t - now
        if self._hold_end is not None and self._hold_end > now + EPS:
            message = (
                f"upstream {self.name} is on hold for {self._hold_end - now:.0f} s more; "
                "the request could not be sent within its wait budget"
            )
        else:
            message = (
                f"upstream {self.name}: the rate limit leaves no room for this request "
                "within its wait budget"
            )
        return RateLimitExceeded(message, retry_after=wait)

    # ------------------------------------------------------------------ holds

    def _hold_seconds(
        self, headers: Mapping[str, str], body: bytes | None, wall: float
    ) -> tuple[float, str]:
        """How long a 429 holds: Retry-After, body retry_after, X-RateLimit-Reset, backoff."""
        value = _header(headers, "Retry-After")
        if value is not None:
            seconds, problem = _parse_retry_after(value, wall)
            if problem:
                self._warn_once("Retry-After", problem, value)
            if seconds:
                return seconds, "Retry-After"
        seconds, problem = _body_retry_after(body)
        if problem:
            self._warn_once("retry_after in the body", problem, None)
        if seconds:
            return seconds, "retry_after in the body"
        value = _header(headers, "X-RateLimit-Reset")
        if value is not None:
            epoch, problem = _parse_reset(value, wall)
            if problem:
                self._warn_once("X-RateLimit-Reset", problem, value)
            if epoch is not None and epoch > wall:
                return epoch - wall, "X-RateLimit-Reset"
        backoff = min(BACKOFF_CAP, BACKOFF_BASE * 2 ** (max(1, self._strikes) - 1))
        return backoff, "backoff, no usable hint"

    def _start_hold(self, now: float, wall: float, end: float, source: str) -> None:
        end = min(end, now + MAX_HOLD)
        if self._budget is not None and end > now:
            # Tell the fleet (unless it told us), and resume a little after the others.
            seconds = end - now
            if source == FLEET_HOLD:
                end += self._budget.jitter(seconds)
            else:
                end += self._budget.started_hold(seconds)
        if self._windows:
            # The server says the budget is spent: resume paced, not with a burst that a
            # sliding-window upstream would answer with a 429 one interval later.
            min(self._windows, key=lambda w: w.interval * w.count).drain(end)
        if self._hold_end is not None:
            if end > self._hold_end:
                self._hold_end = end
                self._hold_until = wall + (end - now)
                log.debug("upstream %s: hold now ends in %.1f s (%s)", self.name, end - now, source)
            return
        self._hold_end = end
        self._hold_until = wall + (end - now)
        self._hold_started = now
        log.log(
            logging.WARNING if source != _REMAINING_ZERO else logging.INFO,
            "upstream %s: on hold for %.1f s (%s); nothing is sent until then",
            self.name,
            end - now,
            source,
        )
        if self._on_hold is not None:
            try:
                self._on_hold(end - now)
            except Exception:
                log.exception("upstream %s: on_hold callback failed", self.name)

    def _follow_headers(self, headers: Mapping[str, str], now: float, wall: float) -> None:
        """Correct the budget from X-RateLimit-Remaining / X-RateLimit-Reset."""
        raw_remaining = _header(headers, "X-RateLimit-Remaining")
        if raw_remaining is None:
            return
        remaining = _parse_remaining(raw_remaining)
        if remaining is None:
            self._warn_once("X-RateLimit-Remaining", "unparsable", raw_remaining)
            return
        raw_reset = _header(headers, "X-RateLimit-Reset")
        reset: float | None = None
        if raw_reset is not None:
            reset, problem = _parse_reset(raw_reset, wall)
            if problem:
                self._warn_once("X-RateLimit-Reset", problem, raw_reset)
        if reset is None:
            self._remaining, self._reset, self._reset_at = remaining, None, None
            return
        if reset <= wall:
            return  # about a window that has already ended
        if self._reset is not None and reset < self._reset - 1:
            return  # a late answer about an older window
        # The server's count wins (grants after this answer are spent from it again); a
        # late answer may overstate it by the requests in flight, and a 429 corrects that.
        self._remaining, self._reset, self._reset_at = remaining, reset, now + (reset - wall)
        if remaining <= 0:
            self._start_hold(now, wall, self._reset_at, _REMAINING_ZERO)

    def _warn_once(self, source: str, problem: str, value: str | None) -> None:
        key = f"{source}:{problem}"
        shown = "" if value is None else f" {value[:40]!r}"
        if key in self._warned:
            log.debug("upstream %s: %s%s is %s", self.name, source, shown, problem)
            return
        self._warned.add(key)
        log.warning("upstream %s: %s%s is %s (logged once)", self.name, source, shown, problem)

    # ------------------------------------------------------------------ scheduling

    def _refresh(self, now: float) -> None:
        """End a hold and forget the server's count once their time has come."""
        if self._hold_end is not None and self._hold_end <= now + EPS:
            log.info(
                "upstream %s: hold ended after %.1f s",
                self.name,
                self._hold_end - self._hold_started,
            )
            self._hold_end = self._hold_until = None
        if self._reset_at is not None and self._reset_at <= now + EPS:
            self._remaining, self._reset, self._reset_at = None, None, None

    def _settle(self, waiter: _Waiter) -> None:
        waiter.live = False
        waiter.app.live -= 1
        self._depth -= 1

    def _alive(self, waiter: _Waiter) -> bool:
        if waiter.live and waiter.fut.cancelled():
            self._settle(waiter)  # cancelled; its task has not run its cleanup yet
        return waiter.live

    def _next(self, now: float) -> _Waiter | None:
        """The head of the next app in round-robin order whose own budget allows it now."""
        ring = self._ring
        i = 0
        while i < len(ring):
            state = ring[i]
            queue = state.queue
            while queue and not self._alive(queue[0]):
                queue.popleft()
                self._stored -= 1
            if not queue:
                del ring[i]
                state.ringed = False
                continue
            if state.ready_at(now) <= now + EPS:
                waiter = queue.popleft()
                self._stored -= 1
                del ring[i]
                if queue:
                    ring.append(state)
                else:
                    state.ringed = False
                return waiter
            i += 1  # app-limited: skipped, keeps its turn
        return None

    def _pump(self, now: float) -> None:
        """Grant everything due now, fail what cannot make its deadline, set the timer."""
        self._refresh(now)
        closed = self._budget.unavailable() if self._budget is not None else None
        if closed is not None and self._depth:
            self._fail_all(closed)
        while self._depth and self._upstream_ready(now) <= now + EPS:
            waiter = self._next(now)
            if waiter is None:
                break
            self._settle(waiter)
            self._charge(now, waiter.app)
            waiter.fut.set_result(None)
        heap = self._heap
        while heap:
            waiter = heap[0]
            if not self._alive(waiter):
                heapq.heappop(heap)
                continue
            if waiter.deadline > now and not _late(self._bound(now, waiter.app), waiter.deadline):
                break
            heapq.heappop(heap)
            error = self._too_late(now, waiter.app, extra=0)
            self._settle(waiter)
            waiter.fut.set_exception(error)
        self._compact()
        self._schedule(now)

    def _fail_all(self, error: ProxyError) -> None:
        """Answer every waiter with `error` (the fleet's budget cannot be had: fail closed)."""
        for waiter in self._heap:
            if self._alive(waiter):
                self._settle(waiter)
                waiter.fut.set_exception(error)

    def _compact(self) -> None:
        """Drop settled entries once they outnumber live ones (amortised O(1))."""
        if self._depth == 0:
            if self._stored or self._heap:
                for state in self._ring:
                    state.queue.clear()
                    state.ringed = False
                self._ring.clear()
                self._heap.clear()
                self._stored = 0
            return
        if self._stored > 2 * self._depth + 64:
            self._stored = 0
            for state in self._ring:
                state.queue = deque(w for w in state.queue if self._alive(w))
                self._stored += len(state.queue)
        if len(self._heap) > 2 * self._depth + 64:
            self._heap = [w for w in self._heap if self._alive(w)]
            heapq.heapify(self._heap)

    def _schedule(self, now: float) -> None:
        """Keep one timer, at the next grant, deadline or hold end; none when idle."""
        wake = self._hold_end
        if self._depth:
            upstream = self._upstream_ready(now)
            for state in self._ring:
                if state.live:
                    at = max(upstream, state.ready_at(now))
                    wake = at if wake is None else min(wake, at)
            if self._heap:
                deadline = self._heap[0].deadline  # maybe settled: an early, harmless wake-up
                wake = deadline if wake is None else min(wake, deadline)
        if wake is None or wake == math.inf:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            return
        if self._timer is not None:
            if self._timer_at == wake:
                return
            self._timer.cancel()
            self._timer = None
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop, so no waiter: the hold's end is noticed on the next call
        self._timer = loop.call_later(max(0.0, wake - now), self._on_timer)
        self._timer_at = wake

    def _on_timer(self) -> None:
        self._timer = None
        self._pump(self._clock())
