"""The per-credential limiter: pacing, 429 holds, the server's count and the fair bounded queue.

Most tests drive a fake clock and call `Limiter.wake()` after moving it; a few run on the
real clock with shortened windows to prove the limiter's own timer does the work.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import math
import time
import tracemalloc
from collections.abc import Callable
from email.utils import formatdate
from typing import Any

import pytest

from proxy import ratelimit
from proxy.config import QueueConfig, RateLimitConfig
from proxy.errors import QueueFull, RateLimitExceeded
from proxy.ratelimit import BACKOFF_CAP, MAX_HOLD, PACE_MARGIN, Limiter, parse_retry_after

EPOCH = 1_760_000_000.0
LOGGER = "credproxy.ratelimit"


class FakeClock:
    """A monotonic clock and a wall clock that move only when a test moves them."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def wall(self) -> float:
        return EPOCH + self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def make(
    clock: FakeClock,
    limit: RateLimitConfig | None = None,
    *,
    max_size: int = 1000,
    max_wait: float = 3600.0,
    on_hold: Callable[[float], None] | None = None,
) -> Limiter:
    return Limiter(
        "aimychats",
        limit,
        QueueConfig(max_size=max_size, max_wait=max_wait),
        clock=clock,
        wall=clock.wall,
        on_hold=on_hold,
    )


def per_minute(n: int) -> RateLimitConfig:
    return RateLimitConfig(per_minute=n)


def step(count: int, seconds: float = 60.0) -> float:
    """Spacing of paced requests for `count` per `seconds`."""
    return seconds * (1 + PACE_MARGIN) / count


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def advance(lim: Limiter, clock: FakeClock, seconds: float) -> None:
    clock.now += seconds
    lim.wake()
    await settle()


def spawn(
    lim: Limiter,
    clock: FakeClock,
    app: str,
    grants: list[str],
    label: str | None = None,
    *,
    wait: float = 3600.0,
    **kwargs: Any,
) -> asyncio.Task[None]:
    async def run() -> None:
        await lim.acquire(app, deadline=clock() + wait, **kwargs)
        grants.append(label or app)

    return asyncio.create_task(run())


def hold_until_reset(lim: Limiter, clock: FakeClock, seconds: int) -> None:
    """Hold by the server's count: Remaining 0 with the reset `seconds` ahead."""
    reset = str(int(clock.wall()) + seconds)
    lim.observe(200, {"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": reset})


# --------------------------------------------------------------------------- pacing


async def test_burst_then_pacing(clock: FakeClock) -> None:
    """per_minute N lets N go back to back, then one every 60/N s (plus the pacing margin)."""
    lim = make(clock, per_minute(4))
    for _ in range(4):
        await lim.acquire("a", deadline=clock())
    grants: list[str] = []
    tasks = [spawn(lim, clock, "a", grants, f"r{i}") for i in range(3)]
    await settle()
    assert grants == [] and lim.depth == 3
    await advance(lim, clock, step(4) - 0.01)
    assert grants == []
    await advance(lim, clock, 0.01)
    assert grants == ["r0"]
    await advance(lim, clock, step(4))
    assert grants == ["r0", "r1"]
    await advance(lim, clock, step(4))
    assert grants == ["r0", "r1", "r2"] and lim.depth == 0
    await asyncio.gather(*tasks)


async def test_burst_then_pacing_real_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """On the real clock the limiter's own timer releases 5 at once, then one per window/5."""
    monkeypatch.setattr(ratelimit, "WINDOWS", (("per_minute", 0.5), ("per_hour", 30.0)))
    lim = Limiter("aimychats", per_minute(5), QueueConfig())
    started = time.monotonic()
    times: list[float] = []

    async def one() -> None:
        await lim.acquire("a", deadline=time.monotonic() + 5)
        times.append(time.monotonic() - started)

    await asyncio.gather(*(one() for _ in range(8)))
    assert all(t < 0.05 for t in times[:5]), times
    for i, t in enumerate(times[5:], 1):
        assert i * step(5, 0.5) - 0.005 <= t <= i * step(5, 0.5) + 0.15, times
    assert lim.depth == 0 and lim._timer is None


async def test_both_windows_hold_together(clock: FakeClock) -> None:
    """per_minute 3 and per_hour 5: 3 at once, 2 paced by the minute, the 6th waits for the hour."""
    lim = make(clock, RateLimitConfig(per_minute=3, per_hour=5))
    t0 = clock()
    for _ in range(3):
        await lim.acquire("a", deadline=clock())
    grants: list[str] = []
    tasks = [spawn(lim, clock, "a", grants, f"r{i}") for i in range(3)]
    await settle()
    await advance(lim, clock, step(3))
    assert grants == ["r0"]
    await advance(lim, clock, step(3))
    assert grants == ["r0", "r1"]
    hour_step = step(5, 3600.0)  # the hour's 5 are spent: the 6th goes one hour-step after t0
    await advance(lim, clock, t0 + hour_step - 1 - clock())
    assert grants == ["r0", "r1"]
    await advance(lim, clock, 1)
    assert grants == ["r0", "r1", "r2"]
    await asyncio.gather(*tasks)


async def test_no_limit_means_no_pacing(clock: FakeClock) -> None:
    """Without rate_limit every request goes at once and nothing is reported as budget."""
    lim = make(clock)
    for _ in range(1000):
        await lim.acquire("a", deadline=clock())
    assert lim.depth == 0
    assert lim.snapshot()["rate_limit"] == {"remaining": None, "reset": None}


# --------------------------------------------------------------------------- server's count


async def test_remaining_zero_holds_until_reset(clock: FakeClock) -> None:
    """X-RateLimit-Remaining 0 with the reset ahead: nothing goes before the reset."""
    holds: list[float] = []
    lim = make(clock, per_minute(100), on_hold=holds.append)
    hold_until_reset(lim, clock, 30)
    assert holds == [30.0]
    assert lim.hold_until == clock.wall() + 30
    grants: list[str] = []
    task = spawn(lim, clock, "a", grants)
    await settle()
    hold_until_reset(lim, clock, 30)  # another answer of the same window: same hold
    assert holds == [30.0]
    await advance(lim, clock, 29.9)
    assert grants == []
    await advance(lim, clock, 0.1)
    assert grants == ["a"] and lim.hold_until is None
    await task


async def test_server_count_is_spent_locally(clock: FakeClock) -> None:
    """Remaining N lets exactly N go before the next answer; then nothing goes before the reset."""
    lim = make(clock, per_minute(100))
    reset = int(clock.wall()) + 20
    lim.observe(200, {"X-RateLimit-Remaining": "2", "X-RateLimit-Reset": str(reset)})
    await lim.acquire("a", deadline=clock())
    await lim.acquire("a", deadline=clock())
    assert lim.remaining == 0
    lim.observe(200, {"X-RateLimit-Remaining": "1", "X-RateLimit-Reset": str(reset)})
    assert lim.remaining == 1  # the server's count wins over the local one
    await lim.acquire("a", deadline=clock())
    lim.observe(200, {"X-RateLimit-Remaining": "9", "X-RateLimit-Reset": str(reset - 30)})
    assert lim.remaining == 0  # an answer about an older window is ignored
    grants: list[str] = []
    task = spawn(lim, clock, "a", grants)
    await advance(lim, clock, 19.5)
    assert grants == []
    await advance(lim, clock, 0.5)
    assert grants == ["a"]
    await task


@pytest.mark.parametrize(("plan", "hours"), [("free", 3), ("standard", 1.5)])
async def test_sandbox_sees_no_429_in_steady_state(
    clock: FakeClock, plan: str, hours: float
) -> None:
    """Saturating demand against the sandbox's own limits meets one 429 after the first burst, then none."""
    from proxy.sandbox.app import SandboxState  # here, so the rest of the file never depends on it

    sandbox = SandboxState(clock=clock.wall)
    sandbox.add_key("key", ["read"], plan=plan)
    lim = make(clock, RateLimitConfig(plan=plan), max_wait=10**6)
    t0, end = clock(), clock() + hours * 3600
    refused: list[float] = []
    sent = 0
    retry = False
    while clock() < end:
        task = asyncio.create_task(lim.acquire("a", deadline=clock() + 10**6, retry=retry))
        await settle()
        while not task.done():  # jump straight to the limiter's one timer
            clock.now = max(clock.now, lim._timer_at)
            lim.wake()
            await settle()
        await task
        sent += 1
        decision = sandbox.charge("key")
        headers = decision.headers()
        retry = not decision.allowed
        if retry:
            refused.append(clock() - t0)
            headers["Retry-After"] = str(math.ceil(decision.retry_after))
        lim.observe(429 if retry else 200, headers)
    hourly = RateLimitConfig(plan=plan).per_hour
    assert hourly is not None
    # The per-minute window of the sandbox slides: a burst then pacing meets it once, after
    # which the limiter resumes paced after every hold and is never refused again.
    assert len(refused) == 1 and refused[0] < 60, refused
    assert sent - 1 >= math.floor(hours) * hourly


# --------------------------------------------------------------------------- 429 holds


def _date_in(seconds: int) -> str:
    return formatdate(EPOCH + 1000 + seconds, usegmt=True)


def _body(retry_after: object) -> bytes:
    return json.dumps(
        {"error": {"code": "rate_limit_exceeded", "retry_after": retry_after}}
    ).encode()


@pytest.mark.parametrize(
    ("headers", "body", "expected"),
    [
        ({"Retry-After": "7"}, None, 7),
        ({"retry-after": "5"}, None, 5),
        ({"Retry-After": _date_in(12)}, None, 12),
        ({"Retry-After": "4"}, _body(9), 4),
        ({}, _body(9), 9),
        (
            {"X-RateLimit-Remaining": "3", "X-RateLimit-Reset": str(int(EPOCH + 1000 + 15))},
            None,
            15,
        ),
        ({"X-RateLimit-Reset": "15"}, None, 15),
        ({}, b"not json", 1),
        ({}, None, 1),
    ],
    ids=[
        "seconds",
        "lowercase",
        "http-date",
        "header-first",
        "body",
        "reset",
        "reset-delta",
        "junk",
        "backoff",
    ],
)
async def test_429_hold_duration(
    clock: FakeClock, headers: dict[str, str], body: bytes | None, expected: float
) -> None:
    """A 429 holds for Retry-After, else the body's retry_after, else the reset, else backoff."""
    lim = make(clock)
    assert lim.observe(429, headers, body) == pytest.approx(expected)
    assert lim.hold_until == pytest.approx(clock.wall() + expected)
    grants: list[str] = []
    task = spawn(lim, clock, "a", grants)
    await advance(lim, clock, expected - 0.01)
    assert grants == []
    await advance(lim, clock, 0.01)
    assert grants == ["a"]
    await task


async def test_backoff_doubles_and_is_capped(clock: FakeClock) -> None:
    """429s in a row without a hint back off 1, 2, 4 … 60 s; a success starts again at 1."""
    lim = make(clock)
    seen = []
    for _ in range(9):
        seen.append(lim.observe(429, {}))
        assert lim.observe(429, {}) == seen[-1]  # an in-flight 429 during the hold: no escalation
        clock.now += seen[-1]
    assert seen == [1, 2, 4, 8, 16, 32, BACKOFF_CAP, BACKOFF_CAP, BACKOFF_CAP]
    lim.observe(200, {})
    assert lim.observe(429, {}) == 1


async def test_absurd_hints_are_capped_and_logged_once(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """Over a day is capped to a day; negative or unparsable hints fall through; each warned once."""
    caplog.set_level(logging.WARNING, logger=LOGGER)
    lim = make(clock)

    def next_429(headers: dict[str, str], body: bytes | None = None) -> float | None:
        held = lim.observe(429, headers, body)
        assert held is not None
        clock.now += held  # let the hold end before the next one
        lim.wake()
        return held

    far_reset = str(int(clock.wall()) + 10 * 86_400)
    assert next_429({"Retry-After": "99999999"}) == MAX_HOLD
    assert next_429({"Retry-After": "99999999"}) == MAX_HOLD
    assert next_429({"Retry-After": "-5"}, _body(3)) == 3
    assert next_429({"Retry-After": "-5"}, _body(3)) == 3
    reset = str(int(clock.wall()) + 20)
    assert next_429({"Retry-After": "soon", "X-RateLimit-Reset": reset}) == 20
    reset = str(int(clock.wall()) + 20)
    assert next_429({"Retry-After": "soon", "X-RateLimit-Reset": reset}) == 20
    assert next_429({}, _body(-1)) == pytest.approx(BACKOFF_CAP)
    assert next_429({}, _body(-1)) == pytest.approx(BACKOFF_CAP)
    far_reset = str(int(clock.wall()) + 10 * 86_400)
    assert next_429({"X-RateLimit-Reset": far_reset}) == MAX_HOLD
    far_reset = str(int(clock.wall()) + 10 * 86_400)
    assert next_429({"X-RateLimit-Reset": far_reset}) == MAX_HOLD
    problems = [r.getMessage() for r in caplog.records if "logged once" in r.getMessage()]
    assert len(problems) == 5, problems
    assert sum("over a day" in m for m in problems) == 2
    assert sum("negative" in m for m in problems) == 2
    assert sum("unparsable" in m for m in problems) == 1


def test_parse_retry_after() -> None:
    """Delay-seconds and HTTP-dates become seconds; the rest is None; more than a day is capped."""
    now = EPOCH
    assert parse_retry_after("120", now=now) == 120
    assert parse_retry_after(" 1.5 ", now=now) == 1.5
    assert parse_retry_after(formatdate(now + 30, usegmt=True), now=now) == 30
    assert parse_retry_after(formatdate(now - 30, usegmt=True), now=now) == 0
    assert parse_retry_after("99999999", now=now) == MAX_HOLD
    assert parse_retry_after(formatdate(now + 9 * 86_400, usegmt=True), now=now) == MAX_HOLD
    for bad in (None, "", "soon", "-1", "nan", "inf", "0x10"):
        assert parse_retry_after(bad, now=now) is None, bad


async def test_one_log_line_per_hold(clock: FakeClock, caplog: pytest.LogCaptureFixture) -> None:
    """A hold logs once when it starts and once when it ends, however many requests it touches."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    lim = make(clock)
    for _ in range(5):
        lim.observe(429, {"Retry-After": "10"})
    grants: list[str] = []
    tasks = [spawn(lim, clock, "a", grants) for _ in range(5)]
    await settle()
    await advance(lim, clock, 10)
    assert len(grants) == 5
    messages = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert sum("on hold" in m for m in messages) == 1, messages
    assert sum("hold ended" in m for m in messages) == 1, messages
    await asyncio.gather(*tasks)


async def test_429_restarts_the_burst_paced(clock: FakeClock) -> None:
    """After a 429 the budget is spent: one goes at the hold's end, the rest are paced."""
    lim = make(clock, per_minute(60))
    lim.observe(429, {"Retry-After": "5"})
    grants: list[str] = []
    tasks = [spawn(lim, clock, "a", grants, f"r{i}") for i in range(3)]
    await advance(lim, clock, 5)
    assert grants == ["r0"]
    await advance(lim, clock, step(60))
    assert grants == ["r0", "r1"]
    await advance(lim, clock, step(60))
    await asyncio.gather(*tasks)


async def test_hold_ends_on_its_own_timer() -> None:
    """On the real clock a waiter held by Retry-After 0.3 goes after 0.3 s, by the limiter's timer."""
    lim = Limiter("aimychats", None, QueueConfig())
    lim.observe(429, {"Retry-After": "0.3"})
    started = time.monotonic()
    with pytest.raises(RateLimitExceeded):
        await lim.acquire("a", deadline=time.monotonic() + 0.1)
    assert time.monotonic() - started < 0.05  # refused at once, not after 0.1 s
    await lim.acquire("a", deadline=time.monotonic() + 2)
    assert 0.29 <= time.monotonic() - started < 0.5
    assert lim.hold_until is None and lim._timer is None


# --------------------------------------------------------------------------- the queue


@pytest.mark.parametrize("limit", [None, per_minute(60)], ids=["unpaced", "paced"])
async def test_round_robin_between_apps(clock: FakeClock, limit: RateLimitConfig | None) -> None:
    """During a hold three apps queue; grants interleave the apps, FIFO within each app."""
    lim = make(clock, limit)
    lim.observe(429, {"Retry-After": "5"})
    grants: list[str] = []
    tasks = [spawn(lim, clock, app, grants, f"{app}{i}") for app in "abc" for i in range(3)]
    await settle()
    assert lim.depth == 9
    await advance(lim, clock, 5)
    for _ in range(10):
        await advance(lim, clock, step(60))
    assert grants == ["a0", "b0", "c0", "a1", "b1", "c1", "a2", "b2", "c2"]
    await asyncio.gather(*tasks)


async def test_retry_goes_to_the_front(clock: FakeClock) -> None:
    """A request that got a 429 re-queues at the front of its app and is not refused as full."""
    lim = make(clock, max_size=3)
    lim.observe(429, {"Retry-After": "5"})
    grants: list[str] = []
    tasks = [spawn(lim, clock, "a", grants, f"a{i}") for i in range(2)]
    tasks.append(spawn(lim, clock, "b", grants, "b0"))
    await settle()
    assert lim.depth == 3
    tasks.append(spawn(lim, clock, "a", grants, "retried", retry=True))
    await settle()
    assert lim.depth == 4
    await advance(lim, clock, 5)
    assert grants == ["retried", "b0", "a0", "a1"]
    await asyncio.gather(*tasks)


async def test_queue_full(clock: FakeClock) -> None:
    """One request more than queue.max_size gets QueueFull at once."""
    lim = make(clock, max_size=2)
    hold_until_reset(lim, clock, 5)
    grants: list[str] = []
    tasks = [spawn(lim, clock, "a", grants) for _ in range(2)]
    await settle()
    with pytest.raises(QueueFull):
        await lim.acquire("b", deadline=clock() + 30)
    assert lim.depth == 2
    await advance(lim, clock, 5)
    assert grants == ["a", "a"]
    await asyncio.gather(*tasks)


async def test_hold_past_the_deadline_fails_at_once(clock: FakeClock) -> None:
    """A hold ending after a request's deadline refuses it at once with Retry-After = the hold."""
    lim = make(clock)
    lim.observe(429, {"Retry-After": "2"})
    grants: list[str] = []
    short = spawn(lim, clock, "a", grants, "short", wait=5)
    long = spawn(lim, clock, "a", grants, "long", wait=20)
    await settle()
    assert lim.depth == 2
    lim.observe(429, {"Retry-After": "10"})  # the hold now ends after `short`'s deadline
    await settle()
    assert short.done() and lim.depth == 1
    with pytest.raises(RateLimitExceeded) as info:
        await short
    assert info.value.retry_after == 10
    with pytest.raises(RateLimitExceeded) as info:
        await lim.acquire("b", deadline=clock() + 9)
    assert info.value.retry_after == 10
    await advance(lim, clock, 10)
    assert grants == ["long"]
    await long


async def test_max_wait_exceeded_behind_others(clock: FakeClock) -> None:
    """A waiter that cannot make it behind others is refused by its deadline, Retry-After after the queue."""
    lim = make(clock, per_minute(2))
    for _ in range(2):
        await lim.acquire("a", deadline=clock())
    t0, gap = clock(), step(2)
    grants: list[str] = []
    first = spawn(lim, clock, "a", grants, "first", wait=100)
    second = spawn(lim, clock, "a", grants, "second", wait=100)
    late = spawn(lim, clock, "a", grants, "late", wait=gap + 10)
    await settle()
    assert lim.depth == 3
    await advance(lim, clock, gap)
    assert grants == ["first"] and late.done()  # clear now that it cannot go before 2 gaps
    with pytest.raises(RateLimitExceeded) as info:
        await late
    # the next request at the back would go after `second`: two gaps from now
    assert info.value.retry_after == pytest.approx(2 * gap, abs=1)
    assert clock() - t0 < gap + 10
    await advance(lim, clock, gap)
    await asyncio.gather(first, second)


async def test_deadline_is_capped_by_max_wait(clock: FakeClock) -> None:
    """A deadline later than queue.max_wait is cut to it."""
    lim = make(clock, max_wait=5)
    lim.observe(429, {"Retry-After": "10"})
    with pytest.raises(RateLimitExceeded):
        await lim.acquire("a", deadline=clock() + 100)
    lim.reconfigure(None, QueueConfig(max_wait=0))
    with pytest.raises(RateLimitExceeded):
        await lim.acquire("a", deadline=clock() + 100)
    clock.now += 10
    await lim.acquire("a", deadline=clock() + 100)  # max_wait 0: fine when it can go now


async def test_cancelled_waiter_leaves_and_spends_nothing(clock: FakeClock) -> None:
    """A waiter whose client went away leaves the queue at once and uses no budget."""
    lim = make(clock, per_minute(2))
    for _ in range(2):
        await lim.acquire("a", deadline=clock())
    grants: list[str] = []
    tasks = [spawn(lim, clock, "a", grants, f"r{i}") for i in range(3)]
    await settle()
    assert lim.depth == 3
    tasks[1].cancel()
    await settle()
    assert lim.depth == 2 and tasks[1].cancelled()
    await advance(lim, clock, step(2))
    assert grants == ["r0"]
    await advance(lim, clock, step(2))
    assert grants == ["r0", "r2"]  # the cancelled one did not take the second slot
    await asyncio.gather(tasks[0], tasks[2])


async def test_granted_then_cancelled_gives_budget_back(clock: FakeClock) -> None:
    """A waiter cancelled in the tick it was granted gives its unit back."""
    lim = make(clock, per_minute(1))
    hold_until_reset(lim, clock, 5)
    grants: list[str] = []
    task = spawn(lim, clock, "a", grants)
    await settle()
    clock.now += 5
    lim.wake()  # grants: the future is done, the task has not run yet
    task.cancel()
    await settle()
    assert task.cancelled() and grants == []
    assert lim.remaining == 1
    await lim.acquire("a", deadline=clock())


async def test_release_gives_budget_back(clock: FakeClock) -> None:
    """release() returns the unit of a granted request that never reached the upstream."""
    lim = make(clock, per_minute(1))
    await lim.acquire("a", deadline=clock())
    with pytest.raises(RateLimitExceeded):
        await lim.acquire("a", deadline=clock())
    lim.release("a")
    await lim.acquire("a", deadline=clock())


async def test_app_limit_does_not_block_other_apps(clock: FakeClock) -> None:
    """An app over its own limit waits, while other apps keep the upstream's budget and turns."""
    lim = make(clock, per_minute(100))
    slow = per_minute(1)
    await lim.acquire("a", deadline=clock(), app_limit=slow)
    grants: list[str] = []
    tasks = [spawn(lim, clock, "a", grants, "a1", app_limit=slow)]
    await settle()
    assert lim.depth == 1
    for _ in range(5):
        await lim.acquire("b", deadline=clock())  # not stuck behind a's waiter
    lim.observe(429, {"Retry-After": "5"})
    tasks += [spawn(lim, clock, "b", grants, f"b{i}") for i in range(2)]
    tasks += [spawn(lim, clock, "c", grants, "c0")]
    await settle()
    await advance(lim, clock, 5)
    await advance(lim, clock, step(100))
    await advance(lim, clock, step(100))
    assert grants == ["b0", "c0", "b1"]  # a is skipped in the round-robin, not waited for
    await advance(lim, clock, step(1) - 5 - 2 * step(100))
    assert grants == ["b0", "c0", "b1", "a1"]
    await asyncio.gather(*tasks)


# --------------------------------------------------------------------------- reload and status


async def test_reconfigure_keeps_state(clock: FakeClock) -> None:
    """A reload keeps the budget spent, the hold and the waiters; new figures apply at once."""
    lim = make(clock, per_minute(5), max_size=10)
    for _ in range(5):
        await lim.acquire("a", deadline=clock())
    lim.reconfigure(per_minute(10), QueueConfig(max_size=10))
    for _ in range(5):
        await lim.acquire("a", deadline=clock())  # 5 of the 10 were spent already
    with pytest.raises(RateLimitExceeded):
        await lim.acquire("a", deadline=clock())

    held = make(clock, None, max_size=10)
    held.observe(429, {"Retry-After": "10"})
    hold_until = held.hold_until
    grants: list[str] = []
    tasks = [spawn(held, clock, "a", grants) for _ in range(2)]
    await settle()
    held.reconfigure(per_minute(100), QueueConfig(max_size=1, max_wait=60))
    assert held.hold_until == hold_until and held.depth == 2 and held.max_size == 1
    with pytest.raises(QueueFull):
        await held.acquire("b", deadline=clock() + 30)
    await advance(held, clock, 10)
    assert grants == ["a", "a"]
    await asyncio.gather(*tasks)


async def test_snapshot_shape(clock: FakeClock) -> None:
    """snapshot() has the /status shape: queue, hold_until and the server's remaining/reset."""
    lim = make(clock, RateLimitConfig(plan="standard"), max_size=1000)
    assert lim.snapshot() == {
        "queue": {"depth": 0, "max_size": 1000},
        "hold_until": None,
        "rate_limit": {"remaining": 100, "reset": int(clock.wall())},
    }
    reset = int(clock.wall()) + 60
    lim.observe(
        200,
        {
            "X-RateLimit-Limit": "2000",
            "X-RateLimit-Remaining": "97",
            "X-RateLimit-Reset": str(reset),
        },
    )
    assert lim.snapshot() == {
        "queue": {"depth": 0, "max_size": 1000},
        "hold_until": None,
        "rate_limit": {"remaining": 97, "reset": reset},
    }
    lim.observe(429, {"Retry-After": "30"})
    task = asyncio.create_task(lim.acquire("a", deadline=clock() + 60))
    await settle()
    snap = lim.snapshot()
    assert snap["queue"] == {"depth": 1, "max_size": 1000}
    assert snap["hold_until"] == clock.wall() + 30
    json.dumps(snap)
    await advance(lim, clock, 30)
    await task


async def test_idle_limiter_keeps_no_timer(clock: FakeClock) -> None:
    """Nothing waiting and no hold: the limiter has no timer at all (no polling)."""
    lim = make(clock, per_minute(2))
    await lim.acquire("a", deadline=clock())
    await lim.acquire("a", deadline=clock())
    assert lim._timer is None
    lim.observe(429, {"Retry-After": "3"})
    assert lim._timer is not None  # one, for the end of the hold
    await advance(lim, clock, 3)
    assert lim._timer is None and lim.hold_until is None


async def test_ten_thousand_waiters_are_cheap(clock: FakeClock) -> None:
    """10,000 requests held by a 429 cost little memory each and all go when the hold ends."""
    n = 10_000
    lim = make(clock, max_size=2 * n)
    lim.observe(429, {"Retry-After": "60"})
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        tasks = [
            asyncio.create_task(lim.acquire(f"app{i % 10}", deadline=clock() + 120))
            for i in range(n)
        ]
        await settle()
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    assert lim.depth == n
    stats = after.compare_to(before, "filename")
    total = sum(s.size_diff for s in stats)
    limiter = sum(s.size_diff for s in stats if s.traceback[0].filename == ratelimit.__file__)
    print(
        f"\n{n} waiters: {total / n:.0f} B each in all (caller's task and coroutine included), "
        f"{limiter / n:.0f} B each in the limiter"
    )
    assert limiter / n < 512
    assert total / n < 2048
    await advance(lim, clock, 60)
    await asyncio.gather(*tasks)
    assert lim.depth == 0 and not lim._heap
