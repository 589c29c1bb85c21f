"""The daemon's live view of the encrypted store.

Decrypted secrets and app-token hashes are cached in memory and dropped as soon
as the store's generation moves (the CLI added, removed or rotated something),
so a change made by `credproxy keys add` or `apps token` is used by the next
request without a restart. Every secret loaded is registered with the log
redactor before it can be used.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from .logs import redactor
from .secret import Secret
from .store import Store, StoreError

log = logging.getLogger("credproxy.store")


class Vault:
    """Cached, change-following access to a Store from the event loop."""

    def __init__(self, store: Store, on_change: Callable[[], None] | None = None) -> None:
        self.store = store
        self._on_change = on_change
        self._secrets: dict[str, Secret | None] = {}
        self._tokens: dict[str, str] | None = None
        self._generation = store.generation()
        self._used: set[str] = set()
        self.last_error: str | None = None

    def secret(self, name: str) -> Secret | None:
        """The secret named `name`, or None when the store has no such entry."""
        if name in self._secrets:
            value = self._secrets[name]
        else:
            value = self.store.get(name)
            if value is not None:
                redactor.add(value.reveal())
            self._secrets[name] = value
        if value is not None:
            self._used.add(name)
        return value

    def kind(self, name: str) -> str | None:
        entry = self.store.get_entry(name)
        return entry[0] if entry else None

    def app_tokens(self) -> dict[str, str]:
        """Token hash -> app name, as recorded by `credproxy apps token`."""
        if self._tokens is None:
            self._tokens = self.store.app_tokens()
        return self._tokens

    def check(self) -> bool:
        """Drop the caches if the store changed since the last look; True if it did."""
        generation = self.store.generation()
        if generation == self._generation:
            return False
        self._generation = generation
        self._secrets.clear()
        self._tokens = None
        if self._on_change is not None:
            self._on_change()
        return True

    def flush_usage(self) -> None:
        if self._used:
            used, self._used = self._used, set()
            self.store.touch(used)

    async def follow(self, interval: float = 1.0, usage_every: float = 30.0) -> None:
        """Poll the store's generation; runs for the daemon's lifetime."""
        last_flush = time.monotonic()
        while True:
            await asyncio.sleep(interval)
            try:
                if self.check():
                    log.info("store changed; secrets and app tokens reloaded")
                if time.monotonic() - last_flush >= usage_every:
                    self.flush_usage()
                    last_flush = time.monotonic()
                self.last_error = None
            except StoreError as exc:
                if self.last_error != str(exc):
                    log.error("%s", exc)
                self.last_error = str(exc)
