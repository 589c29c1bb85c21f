"""Tests for the built-in AImyChats sandbox upstream, over real TLS sockets on loopback."""

from __future__ import annotations

import asyncio
import json
import re
import ssl
import time
from collections.abc import AsyncIterator
from email.utils import parsedate_to_datetime
from pathlib import Path

import aiohttp
import pytest
import trustme
from multidict import CIMultiDict
from yarl import URL

from proxy.sandbox import Sandbox, run_sandbox


@pytest.fixture
async def sandbox() -> AsyncIterator[Sandbox]:
    async with Sandbox() as sb:
        yield sb


@pytest.fixture
async def client(sandbox: Sandbox) -> AsyncIterator[aiohttp.ClientSession]:
    ctx = ssl.create_default_context(cadata=sandbox.ca_pem.decode())
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as session:
        yield session


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def test_auth_test_with_good_key(sandbox: Sandbox, client: aiohttp.ClientSession) -> None:
    """A valid key gets the seed's auth-test body with its scopes and rate-limit figures."""
    key = sandbox.new_key(["read", "write"])
    assert key.startswith("aimy_sk_")
    async with client.get(f"{sandbox.base_url}/auth/test", headers=bearer(key)) as resp:
        assert resp.status == 200
        body = await resp.json()
    assert body["authenticated"] is True
    assert body["user"] == {"id": "user_123", "email": "user@example.com"}
    assert body["scopes"] == ["read", "write"]
    assert body["rate_limit"]["limit"] == 2000
    assert body["rate_limit"]["remaining"] == 1999
    assert body["rate_limit"]["reset"] == int(resp.headers["X-RateLimit-Reset"])
    assert "X-Credproxy-Error" not in resp.headers


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer aimy_sk_not_a_key"},
        {"Authorization": "Basic dXNlcjpwYXNz"},
    ],
    ids=["missing", "unknown", "not-bearer"],
)
async def test_401_without_a_valid_key(
    sandbox: Sandbox, client: aiohttp.ClientSession, headers: dict[str, str]
) -> None:
    """A missing, unknown or non-bearer credential gets 401 in the seed's envelope."""
    sandbox.new_key(["admin"])
    async with client.get(f"{sandbox.base_url}/conversations", headers=headers) as resp:
        assert resp.status == 401
        assert await resp.json() == {
            "error": {"code": "unauthorized", "message": "Invalid or missing API key"}
        }


async def test_two_authorization_headers_are_refused(
    sandbox: Sandbox, client: aiohttp.ClientSession
) -> None:
    """A request carrying two Authorization headers is not authenticated, even if one is valid."""
    key = sandbox.new_key(["admin"])
    headers = CIMultiDict([("Authorization", f"Bearer {key}")] * 2)
    async with client.get(f"{sandbox.base_url}/auth/test", headers=headers) as resp:
        assert resp.status == 401


async def test_403_when_the_scope_lacks(sandbox: Sandbox, client: aiohttp.ClientSession) -> None:
    """Each endpoint demands its scope, and admin allows everything."""
    read, write = sandbox.new_key(["read"]), sandbox.new_key(["write"])
    admin = sandbox.new_key(["admin"])
    forbidden = {"code": "forbidden", "message": "Insufficient permissions for this operation"}
    url = f"{sandbox.base_url}/conversations"
    async with client.post(url, json={"title": "x"}, headers=bearer(read)) as resp:
        assert resp.status == 403
        assert (await resp.json())["error"] == forbidden
    async with client.get(url, headers=bearer(write)) as resp:
        assert resp.status == 403
    async with client.post(url, json={"title": "x"}, headers=bearer(write)) as resp:
        assert resp.status == 201
        conv_id = (await resp.json())["id"]
    async with client.delete(f"{url}/{conv_id}", headers=bearer(write)) as resp:
        assert resp.status == 403
    async with client.delete(f"{url}/{conv_id}", headers=bearer(admin)) as resp:
        assert resp.status == 204


async def test_conversation_crud_round_trip(
    sandbox: Sandbox, client: aiohttp.ClientSession
) -> None:
    """Create, read, list, update, add a message, summarise and delete a conversation."""
    key = sandbox.new_key(["read", "write", "delete"])
    url, h = f"{sandbox.base_url}/conversations", bearer(key)
    body = {"title": "Support", "messages": [{"role": "user", "content": "hello there"}]}
    async with client.post(url, json=body, headers=h) as resp:
        assert resp.status == 201
        conv = await resp.json()
    conv_url = f"{url}/{conv['id']}"
    assert conv["title"] == "Support" and conv["messages"][0]["content"] == "hello there"

    async with client.get(conv_url, headers=h) as resp:
        assert resp.status == 200 and (await resp.json())["id"] == conv["id"]
    async with client.post(url, json={"title": "Second"}, headers=h) as resp:
        assert resp.status == 201
    async with client.get(url, params={"limit": "1"}, headers=h) as resp:
        page = await resp.json()
    assert [c["title"] for c in page["data"]] == ["Second"] and page["has_more"] is True
    async with client.get(url, params={"limit": "10"}, headers=h) as resp:
        page = await resp.json()
    assert [c["title"] for c in page["data"]] == ["Second", "Support"]
    assert page["has_more"] is False

    async with client.patch(conv_url, json={"title": "Renamed"}, headers=h) as resp:
        assert resp.status == 200 and (await resp.json())["title"] == "Renamed"
    async with client.put(conv_url, json={"title": "Replaced"}, headers=h) as resp:
        assert resp.status == 200
        assert (await resp.json())["messages"] == []
    msg = {"role": "user", "content": "summarise me please"}
    async with client.post(f"{conv_url}/messages", json=msg, headers=h) as resp:
        assert resp.status == 201 and (await resp.json())["content"] == msg["content"]
    async with client.post(f"{conv_url}/summaries", headers=h) as resp:
        assert resp.status == 201
        summary = await resp.json()
    async with client.get(f"{conv_url}/summaries", headers=h) as resp:
        assert (await resp.json())["data"] == [summary]

    async with client.delete(conv_url, headers=h) as resp:
        assert resp.status == 204
    async with client.get(conv_url, headers=h) as resp:
        assert resp.status == 404
        assert (await resp.json())["error"]["code"] == "not_found"
    async with client.post(url, data=b"{not json", headers=h) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["code"] == "bad_request"


async def test_conversations_are_per_user(sandbox: Sandbox, client: aiohttp.ClientSession) -> None:
    """One user's conversations are invisible to another user's key."""
    alice = sandbox.new_key(["admin"], user_id="user_alice")
    bob = sandbox.new_key(["admin"], user_id="user_bob")
    url = f"{sandbox.base_url}/conversations"
    async with client.post(url, json={"title": "secret"}, headers=bearer(alice)) as resp:
        conv_id = (await resp.json())["id"]
    async with client.get(f"{url}/{conv_id}", headers=bearer(bob)) as resp:
        assert resp.status == 404
    async with client.get(url, headers=bearer(bob)) as resp:
        assert (await resp.json())["data"] == []


async def test_sse_events_arrive_one_by_one(
    sandbox: Sandbox, client: aiohttp.ClientSession
) -> None:
    """Stream events are flushed separately: the first arrives well before the last is sent."""
    key = sandbox.new_key(["read", "write"])
    url = f"{sandbox.base_url}/chat/stream"
    arrivals: list[tuple[float, str, dict[str, object]]] = []
    event = ""
    async with client.post(
        url, params={"events": "3", "interval": "0.25"}, json={}, headers=bearer(key)
    ) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        assert resp.headers["X-RateLimit-Remaining"] == "1999"
        async for raw in resp.content:
            line = raw.decode().rstrip("\n")
            if line.startswith("event: "):
                event = line.removeprefix("event: ")
            elif line.startswith("data: "):
                arrivals.append((time.time(), event, json.loads(line.removeprefix("data: "))))
    assert [e for _, e, _ in arrivals] == ["message", "message", "message", "done"]
    first_at, _, first = arrivals[0]
    last_sent = arrivals[2][2]["sent_at"]
    assert isinstance(last_sent, float)
    assert first_at < last_sent - 0.3  # event 1 was in hand before event 3 was written
    assert first["index"] == 1


async def test_conversation_stream_needs_read_and_an_existing_conversation(
    sandbox: Sandbox, client: aiohttp.ClientSession
) -> None:
    """GET .../stream streams a known conversation for a read key and 404s an unknown one."""
    rw = sandbox.new_key(["read", "write"])
    url = f"{sandbox.base_url}/conversations"
    body = {"title": "t", "messages": [{"content": "alpha beta"}]}
    async with client.post(url, json=body, headers=bearer(rw)) as resp:
        conv_id = (await resp.json())["id"]
    params = {"events": "2", "interval": "0"}
    async with client.get(f"{url}/{conv_id}/stream", params=params, headers=bearer(rw)) as resp:
        text = await resp.text()
    assert text.count("event: message") == 2
    assert text.rstrip("\n").split("\n\n")[-1].startswith("event: done\n")
    assert '"delta": "alpha"' in text and '"delta": "beta"' in text
    async with client.get(f"{url}/conv_nope/stream", headers=bearer(rw)) as resp:
        assert resp.status == 404


async def test_rate_limit_headers_present_and_decreasing(
    sandbox: Sandbox, client: aiohttp.ClientSession
) -> None:
    """Every keyed response, errors included, carries X-RateLimit-* with Remaining going down."""
    key = sandbox.new_key(["read"], plan="starter")
    seen: list[int] = []
    before = time.time()
    for path in ("/auth/test", "/conversations", "/conversations/conv_x", "/nope"):
        async with client.get(sandbox.base_url + path, headers=bearer(key)) as resp:
            assert resp.headers["X-RateLimit-Limit"] == "500"
            seen.append(int(resp.headers["X-RateLimit-Remaining"]))
            reset = int(resp.headers["X-RateLimit-Reset"])
            assert before < reset <= before + 3601
    assert seen == [499, 498, 497, 496]


async def test_forced_429_with_retry_after_seconds(
    sandbox: Sandbox, client: aiohttp.ClientSession
) -> None:
    """force_429 answers the next requests of that key with 429, Retry-After seconds and JSON."""
    key, other = sandbox.new_key(["read"]), sandbox.new_key(["read"])
    sandbox.force_429(key, retry_after=3, count=2)
    url = f"{sandbox.base_url}/auth/test"
    async with client.get(url, headers=bearer(other)) as resp:
        assert resp.status == 200
    for _ in range(2):
        async with client.get(url, headers=bearer(key)) as resp:
            assert resp.status == 429
            assert resp.headers["Retry-After"] == "3"
            assert "X-RateLimit-Remaining" in resp.headers
            error = (await resp.json())["error"]
            assert error["code"] == "rate_limit_exceeded" and error["retry_after"] == 3
    async with client.get(url, headers=bearer(key)) as resp:
        assert resp.status == 200
    assert len(sandbox.received) == 4
    assert [r.key for r in sandbox.processed] == [other, key]


async def test_forced_429_with_http_date(sandbox: Sandbox, client: aiohttp.ClientSession) -> None:
    """With http_date, Retry-After is an HTTP-date about retry_after seconds ahead."""
    key = sandbox.new_key(["read"])
    sandbox.force_429(retry_after=5, http_date=True)
    async with client.get(f"{sandbox.base_url}/auth/test", headers=bearer(key)) as resp:
        assert resp.status == 429
        when = parsedate_to_datetime(resp.headers["Retry-After"]).timestamp()
        assert resp.headers["Retry-After"].endswith(" GMT")
    assert 4 <= when - time.time() <= 6.5


async def test_free_plan_burst_gives_429_on_the_11th_request(
    sandbox: Sandbox, client: aiohttp.ClientSession
) -> None:
    """A free key may make 10 requests in a minute; the 11th gets 429 and is not counted."""
    key = sandbox.new_key(["read"], plan="free")
    url = f"{sandbox.base_url}/auth/test"
    for i in range(10):
        async with client.get(url, headers=bearer(key)) as resp:
            assert resp.status == 200, i
    async with client.get(url, headers=bearer(key)) as resp:
        assert resp.status == 429
        assert 1 <= int(resp.headers["Retry-After"]) <= 60
        assert resp.headers["X-RateLimit-Limit"] == "100"
        assert resp.headers["X-RateLimit-Remaining"] == "90"
        assert (await resp.json())["error"]["retry_after"] == int(resp.headers["Retry-After"])
    assert len(sandbox.processed) == 10 and len(sandbox.received) == 11


async def test_force_remaining_zero_then_fresh_window(
    sandbox: Sandbox, client: aiohttp.ClientSession
) -> None:
    """After force_remaining_zero the next response shows Remaining 0, then 429 until the reset."""
    key = sandbox.new_key(["read"])
    url = f"{sandbox.base_url}/auth/test"
    sandbox.force_remaining_zero(key, reset_in=0.5)
    async with client.get(url, headers=bearer(key)) as resp:
        assert resp.status == 200
        assert resp.headers["X-RateLimit-Remaining"] == "0"
        assert int(resp.headers["X-RateLimit-Reset"]) <= time.time() + 2
    async with client.get(url, headers=bearer(key)) as resp:
        assert resp.status == 429
        assert resp.headers["Retry-After"] == "1"
    await asyncio.sleep(0.6)
    async with client.get(url, headers=bearer(key)) as resp:
        assert resp.status == 200
        assert resp.headers["X-RateLimit-Remaining"] == "1999"


async def test_client_that_does_not_trust_the_ca_fails(sandbox: Sandbox) -> None:
    """A client trusting the system store, or another CA, fails certificate verification."""
    other_ca = ssl.create_default_context(cadata=trustme.CA().cert_pem.bytes().decode())
    for ctx in (ssl.create_default_context(), other_ca):
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as session:
            with pytest.raises(aiohttp.ClientConnectorCertificateError):
                async with session.get(sandbox.url + "/"):
                    pass


async def test_plain_http_is_not_served(sandbox: Sandbox) -> None:
    """Plain HTTP to the sandbox's port gets no HTTP answer at all."""
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientError):
            async with session.get(f"http://127.0.0.1:{sandbox.port}/") as resp:
                await resp.read()


async def test_certificate_names(sandbox: Sandbox, client: aiohttp.ClientSession) -> None:
    """The certificate is valid for localhost and api.aimychats.com as well as 127.0.0.1."""
    for name in ("localhost", "api.aimychats.com"):
        async with client.get(sandbox.url + "/", server_hostname=name) as resp:
            assert resp.status == 200


async def test_index_404_and_405(sandbox: Sandbox, client: aiohttp.ClientSession) -> None:
    """GET / needs no key; unknown paths are 404 and wrong methods 405, both in the envelope."""
    async with client.get(sandbox.url + "/") as resp:
        assert resp.status == 200
        assert (await resp.json())["base_url"].endswith("/v1")
    async with client.get(sandbox.url + "/elsewhere") as resp:
        assert resp.status == 404
        assert (await resp.json())["error"]["code"] == "not_found"
    key = sandbox.new_key(["admin"])
    async with client.get(f"{sandbox.base_url}/nothing/here", headers=bearer(key)) as resp:
        assert resp.status == 404
        assert (await resp.json())["error"]["code"] == "not_found"
    async with client.delete(f"{sandbox.base_url}/auth/test", headers=bearer(key)) as resp:
        assert resp.status == 405
        assert (await resp.json())["error"]["code"] == "method_not_allowed"
        assert "GET" in resp.headers["Allow"]
    async with client.get(f"{sandbox.base_url}/nothing/here") as resp:
        assert resp.status == 401  # the key is checked before the route


async def test_received_records_requests(sandbox: Sandbox, client: aiohttp.ClientSession) -> None:
    """`received` logs method, raw path with query, headers, body size, bearer and time in order."""
    key = sandbox.new_key(["admin"])
    start = time.time()
    url = f"{sandbox.base_url}/conversations?limit=5&x=%41"
    async with client.get(URL(url, encoded=True), headers=bearer(key)) as resp:
        assert resp.status == 200
    async with client.post(
        f"{sandbox.base_url}/conversations", data=b'{"title": "abc"}', headers=bearer(key)
    ) as resp:
        assert resp.status == 201
    async with client.get(sandbox.url + "/"):
        pass
    first, second, third = sandbox.received
    assert (first.method, first.path, first.key, first.body_size) == (
        "GET",
        "/v1/conversations?limit=5&x=%41",
        key,
        0,
    )
    assert ("Authorization", f"Bearer {key}") in first.headers
    assert (second.method, second.body_size) == ("POST", 16)
    assert third.key is None and third.path == "/"
    assert start <= first.at <= second.at <= third.at <= time.time()
    assert sandbox.processed == sandbox.received


async def test_stop_ends_open_streams_quickly() -> None:
    """Stopping the sandbox does not wait for a long stream to finish."""
    sandbox = Sandbox()
    await sandbox.start()
    key = sandbox.new_key(["read", "write"])
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=sandbox.client_ssl_context())
    ) as session:
        resp = await session.post(
            f"{sandbox.base_url}/chat/stream",
            params={"events": "100", "interval": "10"},
            headers=bearer(key),
        )
        await resp.content.readline()
        started = time.monotonic()
        await sandbox.stop()
        assert time.monotonic() - started < 3
        resp.release()


async def test_run_sandbox_prints_url_ca_and_keys(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """run_sandbox prints a working URL, the CA file and its keys, and stops when cancelled."""
    ca_out = tmp_path / "sandbox-ca.pem"
    task = asyncio.create_task(run_sandbox("127.0.0.1", 0, ca_out, {"reader": frozenset({"read"})}))
    out = ""
    for _ in range(100):
        out += capsys.readouterr().out
        if "Try: " in out:
            break
        await asyncio.sleep(0.02)
    url = re.search(r"https://127\.0\.0\.1:\d+/v1", out)
    key = re.search(r"reader: (aimy_sk_\S+)", out)
    assert url and key and str(ca_out) in out
    ctx = ssl.create_default_context(cafile=str(ca_out))
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as session,
        session.get(url[0] + "/auth/test", headers=bearer(key[1])) as resp,
    ):
        assert resp.status == 200
        assert (await resp.json())["scopes"] == ["read"]
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
