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


def _fingerprint(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


async def follow_config(
    path: Path, reload: Callable[[str], Awaitable[bool]], *, debounce_ms: int = 150
) -> None:
    """Call `reload` whenever the bytes behind `path` change (for the daemon's lifetime)."""
    directory = path.parent
    last = _fingerprint(path)
    async for _changes in awatch(
        directory, debounce=debounce_ms, step=50, recursive=False, force_polling=False
    ):
        current = await asyncio.to_thread(_fingerprint, path)
        if current is None or current == last:
            continue
        last = current
        await reload("file changed")
