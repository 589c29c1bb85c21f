"""The cheap paths of a proxied request give what the full paths give.

- `Limiter.observe` answers a plain response (no 429, no rate-limit headers, nobody queued)
  without its full path: the limiter's state must be the same as after the full path.
  `Limiter.try_acquire` likewise decides on the windows alone when nothing else is in play.
- The upstream send slots are a plain counter: a free slot is taken without a coroutine,
  a waiter is handed the next slot, and a cancelled waiter neither keeps nor loses one.
- A complete upstream body goes out in the same write as its head; a stream's head still
  goes out before its body has come.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.http_writer import StreamWriter
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.config import QueueConfig, RateLimitConfig
from proxy.forward import Slots
from proxy.ratelimit import Limiter
from tests.conftest import api_doc
from tests.test_ratelimit import EPOCH, FakeClock

KEY = "sk_sendpath_0123456789abcdef"

# ---------------------------------------------------------------------------- observe


def _state(lim: Limiter) -> tuple[Any, ...]:
    timer = lim._timer
    return (
        lim.snapshot(),
        lim._strikes,
        lim._remaining,
        lim._reset,
        lim._reset_at,
        lim._hold_end,
        lim._hold_until,
        lim._depth,
        lim._stored,
        len(lim._heap),
        None if timer is None else lim._timer_at,
        [w.tat for w in lim._windows],
        {name: [w.tat for w in app.windows] for name, app in lim._apps.items()},
    )


def _headers(pairs: dict[str, str], caseless: bool) -> Any:
    return CIMultiDictProxy(CIMultiDict(pairs)) if caseless else dict(pairs)


# (seconds to move the clock, status, headers): plain answers, the server's count, a count of
# zero (a hold), a 429 with Retry-After and without, answers during and after holds.
_SCRIPT: list[tuple[float, int, dict[str, str]]] = [
    (0.0, 200, {}),
    (0.1, 200, {"Content-Type": "application/json"}),
    (0.1, 200, {"X-RateLimit-Remaining": "5", "X-RateLimit-Reset": str(int(EPOCH + 1060))}),
    (0.1, 200, {}),
    (0.1, 201, {"x-ratelimit-remaining": "3"}),
    (0.1, 200, {}),
    (0.1, 429, {"Retry-After": "2"}),
    (0.5, 200, {}),  # an answer sent before the hold, arriving during it
    (2.0, 200, {}),  # after the hold: it ends here
    (0.1, 429, {}),  # backoff
    (0.1, 429, {}),  # a second strike
    (5.0, 204, {}),
    (0.1, 200, {"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": str(int(EPOCH + 1070))}),
    (1.0, 200, {}),
    (70.0, 200, {}),  # past the server's reset: its count is forgotten
    (0.1, 500, {"X-RateLimit-Remaining": "junk"}),
    (0.1, 200, {}),
]


@pytest.mark.parametrize("caseless", [True, False])
@pytest.mark.parametrize("limit", [None, RateLimitConfig(per_minute=30)])
async def test_observe_fast_path_leaves_the_state_the_full_path_leaves(
    caseless: bool, limit: RateLimitConfig | None
) -> None:
    clocks = (FakeClock(), FakeClock())
    fast, full = (
        Limiter("api/k", limit, QueueConfig(max_wait=3600.0), clock=c, wall=c.wall) for c in clocks
    )
    taken = 0
    for move, status, pairs in _SCRIPT:
        for clock in clocks:
            clock.now += move
        for lim in (fast, full):
            if lim.try_acquire("app"):
                taken += 1
            lim.reached()
        headers = _headers(pairs, caseless)
        assert fast.observe(status, headers) == full._observe(status, headers, None)
        assert _state(fast) == _state(full), (move, status, pairs)
    assert taken > 2  # the script did spend budget on both
    for lim in (fast, full):
        if lim._timer is not None:
            lim._timer.cancel()


@pytest.mark.parametrize("app_limit", [None, RateLimitConfig(per_minute=2)])
@pytest.mark.parametrize("limit", [None, RateLimitConfig(per_minute=3)])
async def test_try_acquire_fast_path_answers_as_the_full_path(
    limit: RateLimitConfig | None, app_limit: RateLimitConfig | None
) -> None:
    """With no hold, count, queue or timer, `try_acquire` decides on the windows alone: the
    same answer and the same state as its full path, through holds and server counts."""
    clocks = (FakeClock(), FakeClock())
    fast, full = (
        Limiter("api/k", limit, QueueConfig(max_wait=3600.0), clock=c, wall=c.wall) for c in clocks
    )
    answers = []
    for move, status, pairs in _SCRIPT:
        for clock in clocks:
            clock.now += move
        for _ in range(3):
            now = clocks[1].now
            got = fast.try_acquire("app", app_limit=app_limit)
            assert got == full._try_acquire(now, full._app("app", app_limit, now), False)
            assert _state(fast) == _state(full), (move, status, pairs)
            answers.append(got)
        headers = _headers(pairs, True)
        assert fast.observe(status, headers) == full.observe(status, headers)
    assert True in answers and False in answers
    for lim in (fast, full):
        if lim._timer is not None:
            lim._timer.cancel()


async def test_observe_with_waiters_takes_the_full_path() -> None:
    """With someone queued, a plain answer still pumps: the waiter is granted as before."""
    clock = FakeClock()
    lim = Limiter(
        "api/k",
        RateLimitConfig(per_minute=1),
        QueueConfig(max_wait=3600.0),
        clock=clock,
        wall=clock.wall,
    )
    assert lim.try_acquire("a")
    waiter = asyncio.create_task(lim.acquire("a", deadline=clock.now + 3600))
    await asyncio.sleep(0)
    assert lim.depth == 1
    clock.now += 61.0
    lim.observe(200, CIMultiDictProxy(CIMultiDict()))
    await asyncio.wait_for(waiter, 1)
    assert lim.depth == 0


# ---------------------------------------------------------------------------- slots


async def test_slots_hand_over_in_order_and_survive_cancellation() -> None:
    slots = Slots(1)
    assert slots.take()
    assert not slots.take()
    first = asyncio.create_task(slots.wait())
    second = asyncio.create_task(slots.wait())
    await asyncio.sleep(0)
    slots.give()  # to the first waiter, not freed
    assert slots.free == 0
    await asyncio.wait_for(first, 1)
    # A waiter cancelled before its turn leaves the line; the slot is not lost.
    second.cancel()
    await asyncio.gather(second, return_exceptions=True)
    slots.give()
    assert slots.free == 1
    assert slots.take()
    # A waiter handed the slot in the tick it is cancelled passes the slot on.
    third = asyncio.create_task(slots.wait())
    await asyncio.sleep(0)
    slots.give()
    third.cancel()
    await asyncio.gather(third, return_exceptions=True)
    assert slots.free == 1
    # Nobody waiting and a slot free: a new request does not wait.
    assert slots.take()
    assert slots.free == 0


async def test_a_timed_out_slot_wait_keeps_the_count() -> None:
    slots = Slots(1)
    assert slots.take()
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.01):
            await slots.wait()
    assert not slots._waiters
    slots.give()
    assert slots.take()


# ---------------------------------------------------------------------------- daemon


async def test_a_complete_body_goes_out_with_its_head_in_one_write(
    tls_upstream: Any,
    start_daemon: Any,
    ca_file: Path,
    client: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    heads: list[bytes] = []
    write, writelines = StreamWriter._write, StreamWriter._writelines

    def note(data: bytes) -> None:
        if bytes(data[:9]) == b"HTTP/1.1 ":
            heads.append(bytes(data))

    def _write(self: StreamWriter, chunk: Any) -> None:
        note(chunk)
        write(self, chunk)

    def _writelines(self: StreamWriter, chunks: Any) -> None:
        chunks = list(chunks)
        note(b"".join(chunks))
        writelines(self, chunks)

    async def plain(_request: web.Request) -> web.Response:
        return web.json_response({"answer": 42})

    app = web.Application()
    app.router.add_get("/v1/plain", plain)
    upstream = await tls_upstream(app)
    d = await start_daemon(api_doc(upstream.url, ca_file), {"key-read": KEY})
    monkeypatch.setattr(StreamWriter, "_write", _write)
    monkeypatch.setattr(StreamWriter, "_writelines", _writelines)
    async with client.get(f"{d.url}/api/plain", headers=d.auth()) as resp:
        assert resp.status == 200
        assert await resp.json() == {"answer": 42}
    # The upstream's answer and credproxy's: each head carries its whole body.
    assert len(heads) == 2, heads
    assert all(h.endswith(b'{"answer": 42}') for h in heads), heads


async def test_a_stream_head_goes_out_before_its_body(
    tls_upstream: Any, start_daemon: Any, ca_file: Path, client: aiohttp.ClientSession
) -> None:
    release = asyncio.Event()

    async def stream(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b"")  # the head only
        await release.wait()
        await resp.write(b"data: late\n\n")
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_get("/v1/stream", stream)
    upstream = await tls_upstream(app)
    d = await start_daemon(api_doc(upstream.url, ca_file), {"key-read": KEY})
    try:
        resp = await asyncio.wait_for(client.get(f"{d.url}/api/stream", headers=d.auth()), 5)
        assert resp.status == 200
        release.set()
        assert await asyncio.wait_for(resp.content.read(), 5) == b"data: late\n\n"
        resp.release()
    finally:
        release.set()


# ---------------------------------------------------------------------------- gc


def test_the_serving_process_freezes_start_up_objects_and_collects_young_ones_less_often() -> None:
    """`Daemon.run` tunes the collector of the serving process only (checked in a child
    process: a test process must keep its own collector settings)."""
    code = (
        "import gc; from proxy.server import GC_THRESHOLD, tune_gc; tune_gc(); "
        "assert gc.get_threshold() == GC_THRESHOLD, gc.get_threshold(); "
        "assert gc.get_freeze_count() > 1000, gc.get_freeze_count(); print('ok')"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
