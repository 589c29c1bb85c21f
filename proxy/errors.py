"""The small tree of errors credproxy answers with itself.

    ProxyError                     status, code, message; rendered as the JSON envelope
    ├── BadRequest                 400 bad_request
    ├── Unauthorized               401 unauthorized
    ├── Forbidden                  403 forbidden
    ├── UnknownUpstream            403 unknown_upstream
    ├── MethodNotAllowed           405 method_not_allowed
    ├── RequestTooLarge            413 / 414 / 431 request_too_large
    ├── RateLimitExceeded          429 rate_limit_exceeded (+ Retry-After)
    ├── QueueFull                  503 queue_full
    ├── CredentialUnavailable      503 credential_unavailable
    └── UpstreamUnreachable        502 upstream_unreachable (+ whether it reached the server)
        └── UpstreamTimeout        504 upstream_timeout

Only `render()` turns one into an HTTP response, so every answer credproxy makes
itself carries the same envelope and the `X-Credproxy-Error` header. Messages
name fields and causes, never a secret value.
"""

from __future__ import annotations

import json
import math

from aiohttp import web

ERROR_HEADER = "X-Credproxy-Error"


class ProxyError(Exception):
    """An answer credproxy gives itself instead of the upstream's."""

    status: int = 500
    code: str = "internal_error"

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status

    def headers(self) -> dict[str, str]:
        return {}

    def body(self) -> dict[str, object]:
        return {"error": {"code": self.code, "message": self.message}}


class BadRequest(ProxyError):
    status, code = 400, "bad_request"


class Unauthorized(ProxyError):
    status, code = 401, "unauthorized"


class Forbidden(ProxyError):
    status, code = 403, "forbidden"


class UnknownUpstream(ProxyError):
    status, code = 403, "unknown_upstream"


class MethodNotAllowed(ProxyError):
    status, code = 405, "method_not_allowed"


class RequestTooLarge(ProxyError):
    status, code = 413, "request_too_large"


class RateLimitExceeded(ProxyError):
    status, code = 429, "rate_limit_exceeded"

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = max(1, math.ceil(retry_after))

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}

    def body(self) -> dict[str, object]:
        body = super().body()
        body["error"]["retry_after"] = self.retry_after  # type: ignore[index]
        return body


class QueueFull(ProxyError):
    status, code = 503, "queue_full"


class CredentialUnavailable(ProxyError):
    status, code = 503, "credential_unavailable"


class UpstreamUnreachable(ProxyError):
    status, code = 502, "upstream_unreachable"

    def __init__(self, message: str, *, reached: bool = True, transient: bool = True) -> None:
        super().__init__(message)
        self.reached = reached  # False when the request provably never reached the server
        self.transient = transient  # False when trying again cannot help (a bad certificate)


class UpstreamTimeout(UpstreamUnreachable):
    status, code = 504, "upstream_timeout"


def render(error: ProxyError) -> web.Response:
    """The one place a ProxyError becomes a response."""
    headers = {ERROR_HEADER: error.code, "Cache-Control": "no-store", **error.headers()}
    return web.Response(
        status=error.status,
        body=json.dumps(error.body()).encode(),
        content_type="application/json",
        headers=headers,
    )
