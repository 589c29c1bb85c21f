"""Process and file hygiene the daemon applies to itself before it holds a secret.

The process turns off core dumps and ptrace-style dumping, so a crash or a
same-user debugger attach cannot copy decrypted keys out of memory; the config
and store must not be writable (or, for the store, readable) by other users, or
the daemon refuses to start and says which `chmod` fixes it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import resource
import shlex
import stat
import sys
from pathlib import Path

log = logging.getLogger("credproxy")

_PR_GET_DUMPABLE = 3
_PR_SET_DUMPABLE = 4


def harden_process() -> None:
    """No core dumps, and not dumpable (Linux: /proc/PID/mem and ptrace need root)."""
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (ValueError, OSError):
        log.warning("could not disable core dumps")
    if sys.platform.startswith("linux"):
        libc_name = ctypes.util.find_library("c") or "libc.so.6"
        try:
            libc = ctypes.CDLL(libc_name, use_errno=True)
            if libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
                raise OSError(ctypes.get_errno(), "prctl failed")
        except OSError:
            log.warning("could not mark the process non-dumpable")


def _mode(path: Path) -> int | None:
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return None


def file_mode_problems(config_path: Path | None, store_path: Path) -> list[str]:
    """One line per file whose mode lets other users change (or read) what it guards."""
    problems = []
    if config_path is not None:
        mode = _mode(config_path)
        if mode is not None and mode & 0o022:
            problems.append(
                f"config {config_path} is writable by other users (mode {mode:o}): "
                f"run `chmod go-w {shlex.quote(str(config_path))}`"
            )
        # In a directory others may write, the file can be swapped by a rename.
        directory = config_path.parent
        mode = _mode(directory)
        if mode is not None and mode & 0o022 and not mode & stat.S_ISVTX:
            problems.append(
                f"config directory {directory} is writable by other users (mode {mode:o}): "
                f"run `chmod go-w {shlex.quote(str(directory))}`"
            )
    mode = _mode(store_path)
    if mode is not None and mode & 0o077:
        problems.append(
            f"store {store_path} is open to other users (mode {mode:o}): "
            f"run `chmod 600 {shlex.quote(str(store_path))}`"
        )
    parent = store_path.parent
    mode = _mode(parent)
    if mode is not None and mode & 0o022:
        problems.append(
            f"store directory {parent} is writable by other users (mode {mode:o}): "
            f"run `chmod 700 {shlex.quote(str(parent))}`"
        )
    return problems


def process_state() -> dict[str, bool | None]:
    """What /status reports of the process hygiene above (None where unknown)."""
    dumpable: bool | None = None
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            dumpable = bool(libc.prctl(_PR_GET_DUMPABLE, 0, 0, 0, 0))
        except OSError:
            dumpable = None
    soft, _hard = resource.getrlimit(resource.RLIMIT_CORE)
    return {"dumpable": dumpable, "core_dumps": soft != 0}
