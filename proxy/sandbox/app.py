"""The AImyChats-compatible web application behind the sandbox upstream, and its state.

`SandboxState` holds the keys, per-user conversations, per-key rate-limit budgets, forced
429s and the log of received requests; `create_app` builds the aiohttp application that
serves the seed's API from it (bearer keys with scopes, per-plan limits, SSE streams).
"""

from __future__ import annotations

import asyncio
import json
import math
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import formatdate
from typing import Any

from aiohttp import web

SCOPES = frozenset({"read", "write", "delete", "admin"})

# plan -> (requests per hour, burst requests per minute), from the seed's table.
PLANS: Mapping[str, tuple[int, int]] = {
    "free": (100, 10),
    "starter": (500, 50),
    "standard": (2000, 100),
    "pro": (10000, 500),
}

HOUR = 3600.0
MINUTE = 60.0
MAX_BODY_BYTES = 64 * 1024 * 1024
MAX_STREAM_EVENTS = 10_000
MAX_STREAM_INTERVAL = 60.0
KEY_PREFIX = "aimy_sk_"

Clock = Callable[[], float]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class SandboxKey:
    """An API key the sandbox accepts: its scopes, plan and the user it belongs to."""

    scopes: frozenset[str]
    plan: str = "standard"
    user_id: str = "user_123"
    expires_at: float | None = None  # epoch seconds; OAuth access tokens expire, API keys don't

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and now >= self.expires_at


@dataclass(frozen=True)
class ReceivedRequest:
    """One request as it reached the app (after TLS), for tests to inspect."""

    method: str
    path: str  # the raw request target: path and query exactly as received
    headers: tuple[tuple[str, str], ...]  # in order, duplicates kept
    body_size: int
    key: str | None  # the bearer value seen, if any
    at: float  # epoch seconds at arrival


class SandboxError(Exception):
    """An error answer in the seed's `{"error": {"code", "message"}}` envelope."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        headers: Mapping[str, str] | None = None,
        extra: Mapping[str, object] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})
        self.extra = dict(extra or {})

    def response(self) -> web.Response:
        error: dict[str, object] = {"code": self.code, "message": self.message, **self.extra}
        return web.json_response({"error": error}, status=self.status, headers=self.headers)


def _unauthorized() -> SandboxError:
    return SandboxError(
        401,
        "unauthorized",
        "Invalid or missing API key",
        headers={"WWW-Authenticate": 'Bearer realm="aimychats"'},
    )


def _forbidden() -> SandboxError:
    return SandboxError(403, "forbidden", "Insufficient permissions for this operation")


def _not_found(what: str = "Resource") -> SandboxError:
    return SandboxError(404, "not_found", f"{what} not found")


def _bad_request(message: str) -> SandboxError:
    return SandboxError(400, "bad_request", message)


# --------------------------------------------------------------------------- rate limits


@dataclass(frozen=True)
class RateDecision:
    """The outcome of charging one request to a key's budget."""

    allowed: bool
    limit: int
    remaining: int
    reset: float  # epoch seconds when the hourly window starts afresh
    retry_after: float = 0.0

    def headers(self) -> dict[str, str]:
        return {
            "X-RateLimit-Limit": str(self.limit),
            "X-RateLimit-Remaining": str(self.remaining),
            "X-RateLimit-Reset": str(math.ceil(self.reset)),
        }


@dataclass
class _Budget:
    hour_count: int = 0
    hour_reset: float = 0.0  # 0: no window open yet
    minute: deque[float] = field(default_factory=deque)  # arrival times in the last minute


@dataclass
class _Forced429:
    key: str | None  # None: any request under /v1
    count: int
    retry_after: float
    http_date: bool


def _plan_limits(plan: str) -> tuple[int, int]:
    try:
        return PLANS[plan]
    except KeyError:
        raise ValueError(f"unknown plan {plan!r}; expected one of {sorted(PLANS)}") from None


class SandboxState:
    """Everything the sandbox remembers; one instance per running sandbox."""

    def __init__(self, clock: Clock = time.time) -> None:
        self.clock = clock
        self.keys: dict[str, SandboxKey] = {}
        self.received: list[ReceivedRequest] = []
        self.processed: list[ReceivedRequest] = []
        self.conversations: dict[str, dict[str, Conversation]] = {}
        self._budgets: dict[str, _Budget] = {}
        self._forced: list[_Forced429] = []

    # keys

    def add_key(
        self,
        value: str,
        scopes: Iterable[str],
        plan: str = "standard",
        user_id: str = "user_123",
        *,
        expires_at: float | None = None,
    ) -> SandboxKey:
        scope_set = frozenset(scopes)
        unknown = scope_set - SCOPES
        if unknown:
            raise ValueError(f"unknown scopes {sorted(unknown)}; expected some of {sorted(SCOPES)}")
        _plan_limits(plan)
        if not value:
            raise ValueError("a sandbox key must not be empty")
        key = SandboxKey(scopes=scope_set, plan=plan, user_id=user_id, expires_at=expires_at)
        self.keys[value] = key
        self._budgets.pop(value, None)
        return key

    def remove_key(self, value: str) -> bool:
        """Stop accepting `value` (a revoked OAuth grant); False if it was not a key."""
        self._budgets.pop(value, None)
        return self.keys.pop(value, None) is not None

    # rate limits

    def _budget(self, value: str, now: float) -> _Budget:
        budget = self._budgets.setdefault(value, _Budget())
        if now >= budget.hour_reset:
            budget.hour_count = 0
            budget.hour_reset = now + HOUR
        while budget.minute and budget.minute[0] <= now - MINUTE:
            budget.minute.popleft()
        return budget

    def charge(self, value: str) -> RateDecision:
        """Count one request against the key's hourly and per-minute budgets."""
        key = self.keys[value]
        hourly, burst = _plan_limits(key.plan)
        now = self.clock()
        budget = self._budget(value, now)
        if budget.hour_count >= hourly:
            wait = budget.hour_reset - now
            return RateDecision(False, hourly, 0, budget.hour_reset, wait)
        remaining = hourly - budget.hour_count
        if len(budget.minute) >= burst:
            wait = budget.minute[0] + MINUTE - now
            return RateDecision(False, hourly, remaining, budget.hour_reset, wait)
        budget.hour_count += 1
        budget.minute.append(now)
        return RateDecision(True, hourly, remaining - 1, budget.hour_reset)

    def peek(self, value: str) -> RateDecision:
        """The key's budget as it stands, without counting a request."""
        key = self.keys[value]
        hourly, _ = _plan_limits(key.plan)
        budget = self._budget(value, self.clock())
        return RateDecision(True, hourly, hourly - budget.hour_count, budget.hour_reset)

    def force_remaining_zero(self, value: str, reset_in: float) -> None:
        """Leave one request in the key's hourly window, which now ends in `reset_in` s."""
        if value not in self.keys:
            raise KeyError("no such sandbox key")
        if reset_in <= 0:
            raise ValueError("reset_in must be positive")
        hourly, _ = _plan_limits(self.keys[value].plan)
        now = self.clock()
        budget = self._budget(value, now)
        budget.hour_count = hourly - 1
        budget.hour_reset = now + reset_in

    def force_429(self, key: str | None, retry_after: float, count: int, http_date: bool) -> None:
        if count < 1:
            raise ValueError("count must be at least 1")
        if retry_after < 0:
            raise ValueError("retry_after must not be negative")
        self._forced.append(_Forced429(key, count, retry_after, http_date))

    def take_forced(self, key: str | None) -> _Forced429 | None:
        for i, forced in enumerate(self._forced):
            if forced.key is None or forced.key == key:
                forced.count -= 1
                if forced.count <= 0:
                    del self._forced[i]
                return forced
        return None

    def too_many_requests(
        self,
        retry_after: float,
        *,
        http_date: bool = False,
        headers: Mapping[str, str] | None = None,
    ) -> SandboxError:
        seconds = max(0, math.ceil(retry_after))
        if http_date:
            retry_header = formatdate(math.ceil(self.clock() + retry_after), usegmt=True)
        else:
            retry_header = str(seconds)
        return SandboxError(
            429,
            "rate_limit_exceeded",
            "Rate limit exceeded. Please try again later.",
            headers={**(headers or {}), "Retry-After": retry_header},
            extra={"retry_after": seconds},
        )


# --------------------------------------------------------------------------- conversations


def _iso(epoch: float) -> str:
    return (
        datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    )


def _new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(8)}"


@dataclass
class Message:
    id: str
    role: str
    content: str
    created_at: float

    def to_json(self) -> dict[str, object]:
        return {
            "id": self.id,
            "role": self.role,
            "content": self.content,
            "created_at": _iso(self.created_at),
        }


@dataclass
class Summary:
    id: str
    conversation_id: str
    content: str
    created_at: float

    def to_json(self) -> dict[str, object]:
        return {
            "id": self.id,
            "conversation_id": self.conversation_id,
            "content": self.content,
            "created_at": _iso(self.created_at),
        }


@dataclass
class Conversation:
    id: str
    title: str
    created_at: float
    updated_at: float
    messages: list[Message] = field(default_factory=list)
    summaries: list[Summary] = field(default_factory=list)

    def to_json(self, *, full: bool = True) -> dict[str, object]:
        out: dict[str, object] = {
            "id": self.id,
            "object": "conversation",
            "title": self.title,
            "message_count": len(self.messages),
            "created_at": _iso(self.created_at),
            "updated_at": _iso(self.updated_at),
        }
        if full:
            out["messages"] = [m.to_json() for m in self.messages]
        return out


# --------------------------------------------------------------------------- request keys

STATE = web.AppKey("sandbox_state", SandboxState)
CURRENT_KEY = web.RequestKey("sandbox_key", SandboxKey)
BODY = web.RequestKey("sandbox_body", bytes)
RATE_HEADERS = web.RequestKey[dict[str, str]]("sandbox_rate_headers")


# --------------------------------------------------------------------------- helpers


def _bearer(request: web.Request) -> tuple[str | None, int]:
    """The bearer value of the first Authorization header, and how many there were."""
    values = request.headers.getall("Authorization", [])
    if not values:
        return None, 0
    scheme, _, token = values[0].strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None, len(values)
    return token, len(values)


async def _read_body(request: web.Request) -> tuple[bytes, bool]:
    """The whole body (and whether it stayed within MAX_BODY_BYTES)."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_any():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            return b"", False
        chunks.append(chunk)
    return b"".join(chunks), True


def _require(request: web.Request, scope: str) -> SandboxKey:
    key = request[CURRENT_KEY]
    if scope not in key.scopes and "admin" not in key.scopes:
        raise _forbidden()
    return key


def _json_object(request: web.Request) -> dict[str, Any]:
    raw = request[BODY]
    if not raw.strip():
        return {}
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        raise _bad_request("Request body must be valid JSON") from None
    if not isinstance(data, dict):
        raise _bad_request("Request body must be a JSON object")
    return data


def _messages_from(value: object, now: float) -> list[Message]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise _bad_request("'messages' must be a list")
    return [_message_from(item, now) for item in value]


def _message_from(item: object, now: float) -> Message:
    if not isinstance(item, dict):
        raise _bad_request("each message must be an object with 'role' and 'content'")
    role = item.get("role", "user")
    content = item.get("content")
    if not isinstance(role, str) or not isinstance(content, str):
        raise _bad_request("each message needs a string 'content' (and an optional 'role')")
    return Message(_new_id("msg"), role, content, now)


def _title_from(data: Mapping[str, Any], *, required: bool) -> str | None:
    title = data.get("title")
    if title is None and not required:
        return None
    if not isinstance(title, str) or not title.strip():
        raise _bad_request("'title' must be a non-empty string")
    return title


def _number_param(
    request: web.Request, name: str, default: float, low: float, high: float
) -> float:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise _bad_request(f"'{name}' must be a number") from None
    if not (low <= value <= high):
        raise _bad_request(f"'{name}' must be between {low:g} and {high:g}")
    return value


def _int_param(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise _bad_request(f"'{name}' must be an integer") from None
    if not (low <= value <= high):
        raise _bad_request(f"'{name}' must be between {low} and {high}")
    return value


def _user_conversations(request: web.Request) -> dict[str, Conversation]:
    key = request[CURRENT_KEY]
    return request.app[STATE].conversations.setdefault(key.user_id, {})


def _conversation(request: web.Request) -> Conversation:
    conv = _user_conversations(request).get(request.match_info["id"])
    if conv is None:
        raise _not_found("Conversation")
    return conv


# --------------------------------------------------------------------------- handlers


async def index(request: web.Request) -> web.Response:
    return web.json_response(
        {
            "name": "credproxy AImyChats sandbox",
            "description": "A local, throwaway imitation of the AImyChats API for testing.",
            "base_url": f"https://{request.host}/v1",
            "auth": "Authorization: Bearer <sandbox key>",
            "endpoints": [
                "GET /v1/auth/test",
                "GET|POST /v1/conversations",
                "GET|PATCH|PUT|DELETE /v1/conversations/{id}",
                "GET|POST /v1/conversations/{id}/summaries",
                "POST /v1/conversations/{id}/messages",
                "GET /v1/conversations/{id}/stream?events=N&interval=S",
                "POST /v1/chat/stream?events=N&interval=S",
                "GET /oauth/authorize (authorization code + PKCE S256)",
                "POST /oauth/token (authorization_code, refresh_token, client_credentials)",
            ],
        }
    )


async def auth_test(request: web.Request) -> web.Response:
    key = request[CURRENT_KEY]
    rate = request[RATE_HEADERS]
    email = "user@example.com" if key.user_id == "user_123" else f"{key.user_id}@example.com"
    return web.json_response(
        {
            "authenticated": True,
            "user": {"id": key.user_id, "email": email},
            "scopes": sorted(key.scopes),
            "plan": key.plan,
            "rate_limit": {
                "limit": int(rate["X-RateLimit-Limit"]),
                "remaining": int(rate["X-RateLimit-Remaining"]),
                "reset": int(rate["X-RateLimit-Reset"]),
            },
        }
    )


async def list_conversations(request: web.Request) -> web.Response:
    _require(request, "read")
    limit = _int_param(request, "limit", 20, 1, 100)
    newest_first = list(reversed(_user_conversations(request).values()))
    after = request.query.get("after")
    if after is not None:
        ids = [c.id for c in newest_first]
        if after not in ids:
            raise _bad_request("'after' must be the id of a conversation")
        newest_first = newest_first[ids.index(after) + 1 :]
    page = newest_first[:limit]
    return web.json_response(
        {"data": [c.to_json(full=False) for c in page], "has_more": len(newest_first) > limit}
    )


async def create_conversation(request: web.Request) -> web.Response:
    _require(request, "write")
    data = _json_object(request)
    title = _title_from(data, required=True)
    assert title is not None
    now = request.app[STATE].clock()
    conv = Conversation(_new_id("conv"), title, now, now, _messages_from(data.get("messages"), now))
    _user_conversations(request)[conv.id] = conv
    return web.json_response(conv.to_json(), status=201)


async def get_conversation(request: web.Request) -> web.Response:
    _require(request, "read")
    return web.json_response(_conversation(request).to_json())


async def update_conversation(request: web.Request) -> web.Response:
    _require(request, "write")
    conv = _conversation(request)
    data = _json_object(request)
    now = request.app[STATE].clock()
    replace = request.method == "PUT"
    title = _title_from(data, required=replace)
    if title is not None:
        conv.title = title
    if replace or "messages" in data:
        conv.messages = _messages_from(data.get("messages"), now)
    conv.updated_at = now
    return web.json_response(conv.to_json())


async def delete_conversation(request: web.Request) -> web.Response:
    _require(request, "delete")
    conv = _conversation(request)
    del _user_conversations(request)[conv.id]
    return web.Response(status=204)


async def add_message(request: web.Request) -> web.Response:
    _require(request, "write")
    conv = _conversation(request)
    now = request.app[STATE].clock()
    message = _message_from(_json_object(request), now)
    conv.messages.append(message)
    conv.updated_at = now
    return web.json_response(message.to_json(), status=201)


async def create_summary(request: web.Request) -> web.Response:
    _require(request, "write")
    conv = _conversation(request)
    words = " ".join(m.content for m in conv.messages).split()
    gist = " ".join(words[:12]) + (" …" if len(words) > 12 else "")
    text = f"{conv.title}: {len(conv.messages)} message(s)." + (f" {gist}" if gist else "")
    summary = Summary(_new_id("sum"), conv.id, text, request.app[STATE].clock())
    conv.summaries.append(summary)
    return web.json_response(summary.to_json(), status=201)


async def list_summaries(request: web.Request) -> web.Response:
    _require(request, "read")
    conv = _conversation(request)
    return web.json_response({"data": [s.to_json() for s in conv.summaries], "has_more": False})


_FILLER = ["the", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog"]


async def _sse(request: web.Request, words: list[str]) -> web.StreamResponse:
    events = _int_param(request, "events", 5, 0, MAX_STREAM_EVENTS)
    interval = _number_param(request, "interval", 0.2, 0.0, MAX_STREAM_INTERVAL)
    words = words or _FILLER
    resp = web.StreamResponse(
        status=200,
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"},
    )
    await resp.prepare(request)
    try:
        for index in range(1, events + 1):
            if index > 1 and interval > 0:
                await asyncio.sleep(interval)
            payload = {
                "index": index,
                "of": events,
                "delta": words[(index - 1) % len(words)],
                "sent_at": time.time(),
            }
            await resp.write(
                f"id: {index}\nevent: message\ndata: {json.dumps(payload)}\n\n".encode()
            )
        done = json.dumps({"events": events, "sent_at": time.time()})
        await resp.write(f"event: done\ndata: {done}\n\n".encode())
        await resp.write_eof()
    except ConnectionResetError:
        pass  # the client went away mid-stream; nothing left to do
    return resp


async def conversation_stream(request: web.Request) -> web.StreamResponse:
    _require(request, "read")
    conv = _conversation(request)
    return await _sse(request, " ".join(m.content for m in conv.messages).split())


async def chat_stream(request: web.Request) -> web.StreamResponse:
    _require(request, "write")
    data = _json_object(request)
    messages = _messages_from(data.get("messages"), request.app[STATE].clock())
    words = messages[-1].content.split() if messages else []
    return await _sse(request, words)


# --------------------------------------------------------------------------- middleware


def _is_api(path: str) -> bool:
    return path == "/v1" or path.startswith("/v1/")


async def _routed(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Run the matched handler, turning routing failures and SandboxErrors into envelopes."""
    routing_error = request.match_info.http_exception
    if isinstance(routing_error, web.HTTPMethodNotAllowed):
        allow = ", ".join(sorted(routing_error.allowed_methods))
        raise SandboxError(
            405,
            "method_not_allowed",
            f"Method {request.method} is not allowed on this path",
            headers={"Allow": allow},
        )
    if routing_error is not None:
        raise _not_found()
    return await handler(request)


@web.middleware
async def sandbox_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    state = request.app[STATE]
    arrived = time.time()
    key_value, n_auth = _bearer(request)
    body, body_ok = await _read_body(request)
    record = ReceivedRequest(
        method=request.method,
        path=request.raw_path,
        headers=tuple(
            (name.decode("latin-1"), value.decode("latin-1")) for name, value in request.raw_headers
        ),
        body_size=len(body) if body_ok else (request.content_length or MAX_BODY_BYTES + 1),
        key=key_value,
        at=arrived,
    )
    state.received.append(record)
    request[BODY] = body
    try:
        if not body_ok:
            state.processed.append(record)
            raise SandboxError(413, "request_too_large", "Request body is too large")
        if not _is_api(request.path):
            state.processed.append(record)
            return await _routed(request, handler)

        known = (
            key_value is not None
            and n_auth == 1
            and key_value in state.keys
            and not state.keys[key_value].expired(state.clock())
        )
        forced = state.take_forced(key_value)
        if forced is not None:
            headers = state.peek(key_value).headers() if known and key_value else {}
            raise state.too_many_requests(
                forced.retry_after, http_date=forced.http_date, headers=headers
            )
        if not known or key_value is None:
            state.processed.append(record)
            raise _unauthorized()

        decision = state.charge(key_value)
        request[RATE_HEADERS] = decision.headers()
        if not decision.allowed:
            raise state.too_many_requests(decision.retry_after)
        request[CURRENT_KEY] = state.keys[key_value]
        state.processed.append(record)
        return await _routed(request, handler)
    except SandboxError as error:
        return error.response()


async def _add_rate_headers(request: web.Request, response: web.StreamResponse) -> None:
    headers = request.get(RATE_HEADERS)
    if headers:
        for name, value in headers.items():
            response.headers.setdefault(name, value)


def create_app(state: SandboxState) -> web.Application:
    """The sandbox's aiohttp application, serving from `state`."""
    app = web.Application(middlewares=[sandbox_middleware], client_max_size=MAX_BODY_BYTES)
    app[STATE] = state
    app.on_response_prepare.append(_add_rate_headers)
    conv = "/v1/conversations/{id}"
    app.router.add_get("/", index)
    app.router.add_get("/v1/auth/test", auth_test)
    app.router.add_get("/v1/conversations", list_conversations)
    app.router.add_post("/v1/conversations", create_conversation)
    app.router.add_get(conv, get_conversation)
    app.router.add_patch(conv, update_conversation)
    app.router.add_put(conv, update_conversation)
    app.router.add_delete(conv, delete_conversation)
    app.router.add_post(conv + "/messages", add_message)
    app.router.add_get(conv + "/summaries", list_summaries)
    app.router.add_post(conv + "/summaries", create_summary)
    app.router.add_get(conv + "/stream", conversation_stream)
    app.router.add_post("/v1/chat/stream", chat_stream)
    return app
