"""Follow the config file: watch -> load -> validate -> swap the whole snapshot.

watchfiles watches the file's directory, so an editor that writes a new file and
renames it over the old one, or a Kubernetes ConfigMap whose `..data` symlink
is swapped, is seen like an in-place write. A version that fails to load never
replaces the one in force; each failing version is logged once.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

from watchfiles import awatch

log = logging.getLogger("credproxy.reload")


def fingerprint(path: Path) -> str | None:
    """A digest of the bytes behind `path` (through symlinks); None if unreadable."""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


async def follow_config(
    path: Path,
    reload: Callable[[str], Awaitable[bool]],
    *,
    loaded: str | None = None,
    debounce_ms: int = 150,
    recheck_ms: int = 5000,
) -> None:
    """Call `reload` whenever the bytes behind `path` differ from the version last seen.

    `loaded` is the digest of the version the daemon started with, so a change made
    between loading and watching is not missed. Events are the fast path; a quiet
    re-check every `recheck_ms` covers file systems whose events go missing.
    """
    last = loaded if loaded is not None else fingerprint(path)
    current = fingerprint(path)
    if current is not None and current != last:
        last = current
        await reload("file changed")
    async for _changes in awatch(
        path.parent,
        debounce=debounce_ms,
        step=400,  # how often the watcher thread wakes; a change lands within ~0.6 s
        recursive=False,
        rust_timeout=recheck_ms,
        yield_on_timeout=True,
    ):
        current = await asyncio.to_thread(fingerprint, path)
        if current is None or current == last:
            continue
        last = current
        await reload("file changed")
