"""Raw-socket tools for the security tests and the front-end fuzz target.

`RawUpstream` is a TLS server on 127.0.0.1 that parses what reaches it by hand
(so nothing is sanitised by an HTTP library), records every request and every
connection, and answers with whatever bytes a test scripts. `exchange` speaks to
the daemon over a plain socket, so an attack is sent byte for byte.
"""

from __future__ import annotations

import asyncio
import re
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from proxy.identify import new_app_token, token_hash
from proxy.masterkey import create_key_file, load_key_file
from proxy.secret import Secret
from proxy.server import free_port
from proxy.store import Store
from tests.conftest import DaemonProcess, cli_env, write_config

_STATUS_LINE = re.compile(rb"^HTTP/[0-9]\.[0-9] [1-5][0-9][0-9] [^\r\n]*\r\n")


@dataclass
class RawRequest:
    """One request as the upstream parsed it from the wire."""

    conn: int
    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


# An answer is bytes, or a list of byte strings written PAUSE seconds apart (late bytes).
Responder = Callable[[RawRequest], "bytes | list[bytes]"]
PAUSE = 0.2


def ok_response(body: bytes = b'{"ok": true}', *, head: bool = False) -> bytes:
    """A clean 200 with `body` (its length announced, the body left out when `head`)."""
    return (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + (b"" if head else body)
    )


class FramingError(Exception):
    """The bytes that reached the upstream were not one well-framed HTTP/1.1 request."""


async def _read_request(reader: asyncio.StreamReader, conn: int) -> RawRequest | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise FramingError(f"truncated head: {exc.partial[:80]!r}") from None
        return None
    lines = head[:-4].split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
        raise FramingError(f"bad request line {lines[0][:80]!r}")
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not name or name != name.strip() or b"\r" in line or b"\n" in line:
            raise FramingError(f"bad header line {line[:80]!r}")
        headers.append((name.decode("latin-1"), value.strip().decode("latin-1")))
    lengths = [v for k, v in headers if k.lower() == "content-length"]
    codings = [v for k, v in headers if k.lower() == "transfer-encoding"]
    if lengths and codings:
        raise FramingError("both Content-Length and Transfer-Encoding")
    if len(lengths) > 1 or len(codings) > 1:
        raise FramingError("repeated framing header")
    body = b""
    if codings:
        if codings[0].lower() != "chunked":
            raise FramingError(f"transfer coding {codings[0]!r}")
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line[:-2].split(b";")[0], 16)
            if size == 0:
                # trailers, if any, up to the empty line
                while (await reader.readuntil(b"\r\n")) != b"\r\n":
                    pass
                break
            body += await reader.readexactly(size)
            if await reader.readexactly(2) != b"\r\n":
                raise FramingError("chunk not followed by CRLF")
    elif lengths:
        if not lengths[0].isdigit():
            raise FramingError(f"Content-Length {lengths[0]!r}")
        body = await reader.readexactly(int(lengths[0]))
    return RawRequest(conn, parts[0].decode("latin-1"), parts[1].decode("latin-1"), headers, body)


@dataclass
class RawUpstream:
    """A hand-parsing TLS upstream on 127.0.0.1 that records what reaches it."""

    context: ssl.SSLContext
    responder: Responder = lambda req: ok_response(head=req.method == "HEAD")
    requests: list[RawRequest] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    aborted: list[bytes] = field(default_factory=list)  # requests cut short by the sender
    connections: int = 0
    port: int = 0
    _server: asyncio.Server | None = None
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    async def start(self) -> RawUpstream:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.context)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        conn = self.connections
        self._writers.add(writer)
        try:
            while True:
                try:
                    request = await _read_request(reader, conn)
                except FramingError as exc:
                    self.errors.append(str(exc))
                    return
                if request is None:
                    return
                self.requests.append(request)
                answer = self.responder(request)
                pieces = answer if isinstance(answer, list) else [answer]
                for index, piece in enumerate(pieces):
                    if index:
                        await asyncio.sleep(PAUSE)
                    writer.write(piece)
                    await writer.drain()
                answer = pieces[0]
                if b"\r\nconnection: close\r\n" in answer.split(b"\r\n\r\n")[0].lower() + b"\r\n":
                    return
        except ValueError as exc:  # a chunk size that is not hex
            self.errors.append(f"bad chunk size: {exc}")
            return
        except asyncio.IncompleteReadError as exc:
            self.aborted.append(exc.partial[:80])
            return
        except (ConnectionError, ssl.SSLError):
            return
        finally:
            self._writers.discard(writer)
            writer.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in list(self._writers):
                writer.close()
            await self._server.wait_closed()


async def exchange(port: int, data: bytes, timeout: float = 5.0, *, idle: float = 1.0) -> bytes:
    """Send raw bytes to 127.0.0.1:port; return all that comes back until close or quiet."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    out = b""
    try:
        writer.write(data)
        await writer.drain()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            try:
                chunk = await asyncio.wait_for(
                    reader.read(65536), min(idle, max(0.01, deadline - loop.time()))
                )
            except TimeoutError:
                break
            if not chunk:
                break
            out += chunk
    except ConnectionError:
        pass
    finally:
        writer.close()
    return out


def status_codes(data: bytes) -> list[int]:
    """Status codes of the responses in `data`, in order (heads located by their status line)."""
    return [int(m.group(1)) for m in re.finditer(rb"HTTP/[0-9]\.[0-9] ([1-5][0-9][0-9]) ", data)]


def well_formed(data: bytes) -> bool:
    """True when `data` starts with a valid HTTP/1.x status line (or is empty: a close)."""
    return data == b"" or _STATUS_LINE.match(data) is not None


# ---- the daemon as a child process, set up without the CLI (fast) -------------------------


@dataclass
class SpawnedDaemon:
    """A `credproxy serve` child process with its listener, admin address and app tokens."""

    proc: DaemonProcess
    port: int
    admin: str
    tokens: dict[str, str]
    home: Path

    @property
    def pid(self) -> int:
        return int(self.proc.proc.pid)

    def alive(self) -> bool:
        return self.proc.proc.poll() is None

    def log(self) -> str:
        return self.proc.log()


def spawn_daemon(
    home: Path,
    doc: dict[str, Any],
    secrets: dict[str, str],
    procs: list[DaemonProcess],
    *,
    env_extra: dict[str, str] | None = None,
    log_level: str = "info",
) -> SpawnedDaemon:
    """Write key, store, tokens and config under `home`, then start `credproxy serve` on them.

    Every app in `doc` gets a stored token. The caller waits with `proc.wait_ready`.
    """
    home.mkdir(parents=True, exist_ok=True)
    key = home / "keys" / "master.key"
    create_key_file(key)
    data = home / "data"
    port, admin = free_port(), free_port()
    doc = {
        "listen": f"127.0.0.1:{port}",
        "admin_listen": f"127.0.0.1:{admin}",
        "store": str(data / "store.db"),
        **doc,
    }
    tokens: dict[str, str] = {}
    with Store.create(data / "store.db", load_key_file(key)) as store:
        for name, value in secrets.items():
            store.put(name, "api_key", Secret(value))
        for app in doc.get("apps", {}):
            tokens[app] = new_app_token()
            store.add_app_token(app, token_hash(tokens[app]))
    config = write_config(home / "config.yaml", doc)
    env = cli_env(home, CREDPROXY_MASTER_KEY_FILE=str(key), **(env_extra or {}))
    proc = DaemonProcess(
        ["serve", "--config", str(config), "--log-level", log_level], env, home / "daemon.log"
    )
    procs.append(proc)
    return SpawnedDaemon(proc, port, f"http://127.0.0.1:{admin}", tokens, home)


class UpstreamThread:
    """A RawUpstream running on its own event loop in a thread, for synchronous tests."""

    def __init__(self, context: ssl.SSLContext) -> None:
        import threading

        self.loop = asyncio.new_event_loop()
        self.upstream = RawUpstream(context)
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.upstream.start(), self.loop).result(10)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.upstream.close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()
