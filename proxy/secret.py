"""A wrapper for secret values that cannot print itself.

Every API key, token, client secret and master key travels through credproxy as
a `Secret`. Its `repr`, `str` and `format` show only a fixed mask, so a secret
that reaches a log call, an f-string, an exception or a status page by mistake
shows up as `Secret('***')` instead of its value. Code that really needs the
value (header injection, encryption) calls `reveal()`, which is easy to grep for.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any, NoReturn

_MASK = "***"


class Secret:
    """An immutable secret string; `reveal()` is the only way to read it."""

    __slots__ = ("_value",)

    _value: str

    def __init__(self, value: str) -> None:
        if not isinstance(value, str):
            raise TypeError("Secret wraps a str")
        object.__setattr__(self, "_value", value)

    def reveal(self) -> str:
        """Return the plain value. Call it only where the value must leave the process."""
        return self._value

    def fingerprint(self) -> str:
        """A short, non-reversible identifier (never a prefix of the value)."""
        digest = hashlib.sha256(b"credproxy-fingerprint:" + self._value.encode()).hexdigest()
        return f"sha256:{digest[:12]}"

    def __repr__(self) -> str:
        return f"Secret({_MASK!r})"

    def __str__(self) -> str:
        return _MASK

    def __format__(self, spec: str) -> str:
        return _MASK

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        return hmac.compare_digest(self._value.encode(), other._value.encode())

    def __hash__(self) -> int:
        return hash(("Secret", hashlib.sha256(self._value.encode()).digest()))

    def __bool__(self) -> bool:
        return bool(self._value)

    def __len__(self) -> int:
        return len(self._value)

    def __setattr__(self, name: str, value: Any) -> NoReturn:
        raise AttributeError("Secret is immutable")

    def __reduce__(self) -> NoReturn:
        raise TypeError("a Secret cannot be pickled")
