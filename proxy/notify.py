"""Tell systemd how the daemon is doing: the sd_notify protocol, spoken directly.

Under `Type=notify` systemd passes `$NOTIFY_SOCKET` (a path, or `@name` for an
abstract socket) and, with `WatchdogSec=`, `$WATCHDOG_USEC`; `Notifier` sends
READY/RELOADING/STOPPING/STATUS/WATCHDOG datagrams there and does nothing at all
when the daemon is not run by systemd. A failed send must never crash or stall
the daemon: it is logged once at warning and otherwise ignored.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping

log = logging.getLogger("credproxy.notify")

ENV_SOCKET = "NOTIFY_SOCKET"
ENV_WATCHDOG_USEC = "WATCHDOG_USEC"
ENV_WATCHDOG_PID = "WATCHDOG_PID"
# A datagram to a wedged receiver may block; never hold the event loop longer than this.
SEND_TIMEOUT = 1.0
# Seconds allowed after the drain for closing sessions and the store.
STOP_MARGIN = 10.0


def _address(value: str | None) -> str | bytes | None:
    """The socket address in NOTIFY_SOCKET: a path, or bytes for an abstract `@name`."""
    if not value:
        return None
    if value.startswith("@"):
        return b"\0" + os.fsencode(value[1:])
    if value.startswith("/"):
        return value
    # systemd 254+ may also hand out vsock:CID:PORT (VMs); credproxy does not run there.
    log.warning("%s=%r is not a unix socket path: not notifying systemd", ENV_SOCKET, value)
    return None


def _positive_int(value: str | None) -> int | None:
    if not value:
        return None
    try:
        number = int(value)
    except ValueError:
        return None
    return number if number > 0 else None


def _one_line(text: str) -> str:
    """A STATUS= value must not carry a newline: it would start another assignment."""
    return " ".join(text.split())


class Notifier:
    """sd_notify for the daemon; every method is a no-op when `enabled` is false."""

    def __init__(self, address: str | None, *, watchdog_usec: int | None = None) -> None:
        self._address = _address(address)
        self.enabled: bool = self._address is not None
        self._watchdog_usec = watchdog_usec if self.enabled else None
        self._warned = False

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Notifier:
        """The notifier systemd asked for in the environment; disabled without NOTIFY_SOCKET."""
        usec = _positive_int(env.get(ENV_WATCHDOG_USEC))
        watchdog_pid = env.get(ENV_WATCHDOG_PID)
        if watchdog_pid and _positive_int(watchdog_pid) != os.getpid():
            usec = None  # the watchdog is meant for another process (e.g. our parent)
        return cls(env.get(ENV_SOCKET), watchdog_usec=usec)

    def __repr__(self) -> str:
        return f"Notifier(enabled={self.enabled}, watchdog_usec={self._watchdog_usec})"

    # -- what the daemon says ------------------------------------------------------------------

    def ready(self, status: str | None = None) -> None:
        """Start-up (or a reload) is complete: listeners open, config and store loaded."""
        lines = ["READY=1"]
        if status:
            lines.append(f"STATUS={_one_line(status)}")
        lines.append(f"MAINPID={os.getpid()}")
        self._send(lines)

    def reloading(self) -> None:
        """A reload begins; follow it with ready() once the new config is in force (or not)."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self._send(["RELOADING=1", f"MONOTONIC_USEC={usec}", "STATUS=reloading the config"])

    def stopping(self, grace: float | None = None) -> None:
        """Shutdown begins: requests in flight are drained, then the process exits.

        With `grace` (the drain time in seconds), systemd is also told to wait that long
        plus a margin (EXTEND_TIMEOUT_USEC) should it exceed TimeoutStopSec=.
        """
        lines = ["STOPPING=1", "STATUS=stopping: draining requests in flight"]
        if grace is not None and grace >= 0:
            lines.append(f"EXTEND_TIMEOUT_USEC={int((grace + STOP_MARGIN) * 1_000_000)}")
        self._send(lines)

    def status(self, text: str) -> None:
        """A one-line status shown by `systemctl status`."""
        self._send([f"STATUS={_one_line(text)}"])

    # -- watchdog ------------------------------------------------------------------------------

    def watchdog_interval(self) -> float | None:
        """Seconds between WATCHDOG=1 pings (half of WatchdogSec), or None without a watchdog."""
        if self._watchdog_usec is None:
            return None
        return self._watchdog_usec / 2 / 1_000_000

    async def watchdog(self, healthy: Callable[[], bool]) -> None:
        """Ping systemd every interval while `healthy()` is true; run it as a task, cancel to stop.

        While `healthy()` is false (or raises) no ping goes out, so systemd restarts the
        service once WatchdogSec passes; a stalled event loop stops the pings just the same.
        """
        interval = self.watchdog_interval()
        if interval is None:
            return
        was_healthy = True
        while True:
            try:
                ok = bool(healthy())
            except Exception as exc:
                log.warning("watchdog health check raised %s", type(exc).__name__)
                ok = False
            if ok:
                self._send(["WATCHDOG=1"])
            elif was_healthy:
                log.warning(
                    "the daemon is unhealthy: watchdog pings stop, and systemd restarts it "
                    "if this lasts %.0fs",
                    interval * 2,
                )
            was_healthy = ok
            await asyncio.sleep(interval)

    # -- plumbing ------------------------------------------------------------------------------

    def _send(self, lines: list[str]) -> bool:
        """Send one datagram; True if it went out. Never raises."""
        if self._address is None:
            return False
        data = ("\n".join(lines) + "\n").encode("utf-8", "replace")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.settimeout(SEND_TIMEOUT)
                sock.sendto(data, self._address)
        except OSError as exc:
            what = lines[0].partition("=")[0]
            if not self._warned:
                self._warned = True
                log.warning(
                    "could not notify systemd (%s via %s: %s); the daemon runs on, "
                    "further failures are logged at debug level",
                    what,
                    ENV_SOCKET,
                    exc.strerror or type(exc).__name__,
                )
            else:
                log.debug("sd_notify %s failed: %s", what, exc.strerror or type(exc).__name__)
            return False
        return True
