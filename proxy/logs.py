"""Logging for the daemon: one access line per request, and a redaction layer.

Secrets are kept out of logs twice over: they travel as `Secret` objects that
print as `***`, and every formatted line (tracebacks included) passes through
`Redactor`, which masks each secret value the process has loaded plus anything
shaped like a bearer credential or an app token. A log line must never carry a
secret, whatever a caller passes to it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sys
import threading
import time
from collections.abc import Iterable
from typing import Any, TextIO

MASK = "[REDACTED]"
# Shapes that are credentials whatever their value: bearer/basic values, app tokens,
# and common key=value spellings of secrets in URLs or bodies.
_PATTERNS = (
    re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]+"),
    re.compile(r"cpx_[A-Za-z0-9_-]{8,}"),
    re.compile(
        r"(?i)\b(access_token|refresh_token|client_secret|api_key|apikey|password|code_verifier)"
        r"(\"?\s*[:=]\s*\"?)[^\s\"&,}]+"
    ),
)
# All three shapes in one pattern (flags scoped to each): a line none of them (nor a
# secret value) matches anywhere is returned as it is after a single search.
_SHAPES = "|".join(
    f"(?{p.pattern[2]}:{p.pattern[4:]})" if p.pattern.startswith("(?i)") else f"(?:{p.pattern})"
    for p in _PATTERNS
)
_ANY_SHAPE = re.compile(_SHAPES)


PATHS_KEPT = 1024  # redacted paths Redactor.path remembers (emptied when full)


class Redactor:
    """Masks every registered secret value and every credential-shaped string."""

    def __init__(self) -> None:
        self._values: set[str] = set()
        self._lock = threading.Lock()
        self._pattern: re.Pattern[str] | None = None
        self._any: re.Pattern[str] = _ANY_SHAPE  # the secret values or any shape
        self._paths: dict[str, str] = {}  # see path()

    def add(self, value: str) -> None:
        """Mask `value` from now on, in every spelling a log line may give it.

        Besides the literal, the escaped forms that `%r`, bytes and `json.dumps` produce
        (quotes, backslashes, tabs, non-ASCII) are registered too.
        """
        # Very short values would mask ordinary words; such "secrets" are refused
        # at the store, so a floor of 6 characters loses nothing.
        if len(value) < 6 or value in self._values:
            return
        spellings = {
            value,
            json.dumps(value)[1:-1],
            json.dumps(value, ensure_ascii=False)[1:-1],
            repr(value)[1:-1],
            repr(value.encode())[2:-1],
        }
        with self._lock:
            self._values.update(s for s in spellings if len(s) >= 6)
            self._pattern = None
            self._paths = {}

    def add_many(self, values: Iterable[str]) -> None:
        for value in values:
            self.add(value)

    def _compiled(self) -> re.Pattern[str] | None:
        pattern = self._pattern
        if pattern is None and self._values:
            with self._lock:
                ordered = sorted(self._values, key=len, reverse=True)
                values = "|".join(re.escape(v) for v in ordered)
                pattern = re.compile(values)
                self._any = re.compile(f"(?:{values})|{_SHAPES}")
                self._pattern = pattern
        return pattern

    def path(self, text: str) -> str:
        """`self(text)` for a string that repeats (an access line's path), remembered.

        What is remembered is forgotten whenever a secret is added, so a path is never
        logged with a value that is a secret by then.
        """
        paths = self._paths  # add() replaces it: an answer computed before lands in the old one
        out = paths.get(text)
        if out is None:
            out = self(text)
            if len(paths) >= PATHS_KEPT:
                paths.clear()
            paths[text] = out
        return out

    def __call__(self, text: str) -> str:
        pattern = self._compiled()
        if self._any.search(text) is None:
            return text  # no pass below would change anything
        if pattern is not None:
            text = pattern.sub(MASK, text)
        text = _PATTERNS[0].sub(lambda m: f"{m.group(1)} {MASK}", text)
        text = _PATTERNS[1].sub("cpx_" + MASK, text)
        return _PATTERNS[2].sub(lambda m: f"{m.group(1)}{m.group(2)}{MASK}", text)


redactor = Redactor()

_RESERVED = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}


# Set on records whose every field is already safe (the access line: names from the
# config, numbers, and a path that went through the redactor), so the formatter can skip
# the full-line redaction passes on the hot path.
PRE_REDACTED = "_credproxy_pre_redacted"


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {
        k: v for k, v in record.__dict__.items() if k not in _RESERVED and not k.startswith("_")
    }


_last_second = -1
_last_stamp = ""


def _timestamp(created: float) -> str:
    """ISO-8601 UTC to the second, formatted once per second."""
    global _last_second, _last_stamp
    second = int(created)
    if second != _last_second:
        _last_stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(second))
        _last_second = second
    return _last_stamp


class TextFormatter(logging.Formatter):
    """`2026-11-23T15:09:42Z info credproxy: message key=value …`, redacted."""

    def format(self, record: logging.LogRecord) -> str:
        line = f"{_timestamp(record.created)} {record.levelname.lower()} {record.name}: {record.getMessage()}"
        if getattr(record, PRE_REDACTED, False):
            return line
        extras = _extras(record)
        if extras and not record.name.endswith(".access"):
            line += " " + " ".join(f"{k}={v}" for k, v in extras.items())
        if record.exc_info and record.exc_info[0] is not None:
            line += "\n" + self.formatException(record.exc_info)
        return redactor(line)


class JsonFormatter(logging.Formatter):
    """One JSON object per line, redacted after serialisation."""

    def format(self, record: logging.LogRecord) -> str:
        pre = getattr(record, PRE_REDACTED, False)
        message = record.getMessage()
        doc: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            # Redacted before serialising too: inside the JSON string a logged document's
            # quotes are escaped and its `"key": "value"` pairs would no longer match.
            "msg": message if pre else redactor(message),
        }
        doc.update(_extras(record))
        if record.exc_info and record.exc_info[0] is not None:
            doc["exc"] = self.formatException(record.exc_info)
        text = json.dumps(doc, default=str)
        return text if pre else redactor(text)


class DaemonHandler(logging.StreamHandler[TextIO]):
    """The daemon's one handler; it also takes pre-formatted lines (the access lines).

    Lines given to `write_line` are written together at the end of the event loop's
    current iteration (at once outside a loop, or when 512 are pending), so a busy daemon
    makes one write for many requests instead of one each. Before any other record, and
    on flush (at exit, or on a second stop signal), the pending lines go first, so the
    file keeps the order in which lines were logged.
    """

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self._pending: list[str] = []

    @property
    def json(self) -> bool:
        return type(self.formatter) is JsonFormatter

    def write_line(self, line: str) -> None:
        with self.lock or _NO_LOCK:
            pending = self._pending
            pending.append(line)
            if len(pending) == 1:
                try:
                    asyncio.get_running_loop().call_soon(self.write_pending)
                except RuntimeError:
                    self.write_pending()
            elif len(pending) >= 512:
                self.write_pending()

    def write_pending(self) -> None:
        with self.lock or _NO_LOCK:
            if not self._pending:
                return
            text = self.terminator.join(self._pending) + self.terminator
            self._pending.clear()
            try:
                self.stream.write(text)
                self.stream.flush()
            except Exception:
                self.handleError(
                    logging.LogRecord("credproxy.access", logging.INFO, "", 0, text, (), None)
                )

    def emit(self, record: logging.LogRecord) -> None:
        if self._pending:
            self.write_pending()
        super().emit(record)

    def flush(self) -> None:
        if self._pending:
            self.write_pending()
        super().flush()


_NO_LOCK = threading.RLock()

# The handler setup_logging installed: pre-redacted lines may be written to it directly.
_installed: DaemonHandler | None = None


def direct_handler(logger: logging.Logger) -> DaemonHandler | None:
    """The handler to write `logger`'s pre-redacted INFO lines to directly, if that is exact.

    That is when the only handler they would reach is the one `setup_logging` installed,
    with one of our formatters, and no filter or other handler (a test's capture, say)
    would see the record. Otherwise None: the caller goes through `Logger.handle`.
    """
    handler = _installed
    if handler is None or logger.disabled or not logger.isEnabledFor(logging.INFO):
        return None
    root = logging.root
    node: logging.Logger | None = logger
    while node is not None and node is not root:
        if node.handlers or node.filters or not node.propagate:
            return None
        node = node.parent
    handlers = root.handlers
    if (
        len(handlers) != 1
        or handlers[0] is not handler
        or root.filters
        or handler.filters
        or handler.level > logging.INFO
        or type(handler.formatter) not in (TextFormatter, JsonFormatter)
    ):
        return None
    return handler


def write_direct(
    handler: DaemonHandler,
    logger: logging.Logger,
    message: str,
    extra: dict[str, Any] | None = None,
) -> None:
    """Write one pre-redacted INFO line of `logger`, exactly as its formatter would.

    `extra` (the record's extra fields) is needed for JSON only (`handler.json`).
    """
    created = time.time()
    if handler.json:
        doc: dict[str, Any] = {
            "ts": round(created, 3),
            "level": "info",
            "logger": logger.name,
            "msg": message,
        }
        if extra:
            doc.update(extra)
        handler.write_line(json.dumps(doc, default=str))
    else:
        handler.write_line(f"{_timestamp(created)} info {logger.name}: {message}")


def setup_logging(level: str = "info", fmt: str = "text", stream: TextIO | None = None) -> None:
    """Route every logger (ours and aiohttp's) through one redacting handler."""
    global _installed
    if _installed is not None:
        _installed.flush()
    handler = DaemonHandler(stream or sys.stderr)
    _installed = handler
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # aiohttp's own access log duplicates ours and logs raw request lines.
    logging.getLogger("aiohttp.access").disabled = True


def query_keys(query_string: str) -> str:
    """A query string with its values dropped: `a=1&b=2` -> `a&b` (values may be secret)."""
    if not query_string:
        return ""
    keys = [part.split("=", 1)[0] for part in query_string.split("&") if part]
    return "?" + "&".join(keys)
