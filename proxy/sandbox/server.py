"""Run the AImyChats sandbox over HTTPS on loopback with a throwaway `trustme` CA.

`Sandbox` starts and stops the server and exposes its URL, CA certificate, keys, OAuth server
(`Sandbox.oauth`) and test hooks (forced 429s, an exhausted hourly budget, the log of received
requests);
`run_sandbox` is what `credproxy sandbox` runs in the foreground.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shlex
import shutil
import ssl
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType

import trustme
from aiohttp import web

from proxy.sandbox.app import (
    KEY_PREFIX,
    ReceivedRequest,
    SandboxKey,
    SandboxState,
    create_app,
)
from proxy.sandbox.oauth import SandboxOAuth

CERT_IDENTITIES = ("127.0.0.1", "::1", "localhost", "api.aimychats.com")
SHUTDOWN_TIMEOUT = 0.5  # seconds open streams get to finish when the sandbox stops

DEFAULT_KEYS: Mapping[str, frozenset[str]] = {
    "read": frozenset({"read"}),
    "read-write-delete": frozenset({"read", "write", "delete"}),
    "admin": frozenset({"admin"}),
}


class Sandbox:
    """An AImyChats-compatible HTTPS server on loopback, for users' first steps and tests."""

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self._requested_port = port
        self._ca = trustme.CA(organization_name="credproxy sandbox")
        self._cert = self._ca.issue_cert(*CERT_IDENTITIES)
        self.ca_pem: bytes = self._ca.cert_pem.bytes()
        self.state = SandboxState()
        # The OAuth 2.0 server at /oauth/authorize and /oauth/token, with its test hooks.
        self.oauth = SandboxOAuth(self.state)
        self._runner: web.AppRunner | None = None
        self._port: int | None = None

    # lifecycle

    async def start(self) -> None:
        if self._runner is not None:
            raise RuntimeError("the sandbox is already running")
        app = create_app(self.state)
        self.oauth.mount(app)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT)
        await runner.setup()
        try:
            site = web.TCPSite(
                runner, self.host, self._requested_port, ssl_context=self.server_ssl_context()
            )
            await site.start()
            self._port = int(runner.addresses[0][1])
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> Sandbox:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # what reached it

    @property
    def received(self) -> list[ReceivedRequest]:
        """Every request that reached the app (after TLS), in arrival order."""
        return self.state.received

    @property
    def processed(self) -> list[ReceivedRequest]:
        """The received requests that were served with anything but a 429."""
        return self.state.processed

    # where it is and how to trust it

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the sandbox has not been started")
        return self._port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"https://{host}:{self.port}"

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def server_ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        self._cert.configure_cert(ctx)
        return ctx

    def client_ssl_context(self) -> ssl.SSLContext:
        """A client context that trusts this sandbox's CA and nothing else."""
        ctx = ssl.create_default_context(cadata=self.ca_pem.decode("ascii"))
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        return ctx

    def write_ca(self, path: Path) -> Path:
        """Write the CA certificate (PEM) to `path`, atomically, and return the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        tmp.write_bytes(self.ca_pem)
        os.replace(tmp, path)
        return path

    # keys

    @property
    def keys(self) -> Mapping[str, SandboxKey]:
        return self.state.keys

    def add_key(
        self,
        value: str,
        scopes: Iterable[str],
        plan: str = "standard",
        *,
        user_id: str = "user_123",
    ) -> None:
        self.state.add_key(value, scopes, plan, user_id)

    def new_key(
        self, scopes: Iterable[str], plan: str = "standard", *, user_id: str = "user_123"
    ) -> str:
        value = KEY_PREFIX + secrets.token_urlsafe(24)
        self.state.add_key(value, scopes, plan, user_id)
        return value

    # test hooks

    def force_429(
        self,
        key: str | None = None,
        retry_after: float = 2,
        count: int = 1,
        http_date: bool = False,
    ) -> None:
        """Answer the next `count` /v1 requests (bearing `key`, or any if None) with 429.

        `Retry-After` is whole seconds (rounded up), or an HTTP-date when `http_date`.
        """
        self.state.force_429(key, retry_after, count, http_date)

    def force_remaining_zero(self, key: str, reset_in: float) -> None:
        """Make `key`'s next served response the last of its hourly window.

        That response shows `X-RateLimit-Remaining: 0` and `X-RateLimit-Reset` = now +
        `reset_in`; requests before then get 429; afterwards a fresh window begins.
        """
        self.state.force_remaining_zero(key, reset_in)


def _print_banner(sandbox: Sandbox, ca_path: Path, created: Mapping[str, str]) -> None:
    print(f"AImyChats sandbox: {sandbox.url}  (base URL {sandbox.base_url})", flush=True)
    print(f"CA certificate: {ca_path}", flush=True)
    print("Throwaway sandbox keys (not real credentials):", flush=True)
    for label, value in created.items():
        scopes = ",".join(sorted(sandbox.keys[value].scopes))
        print(f"  {label}: {value}  scopes={scopes}", flush=True)
    if created:
        first = next(iter(created.values()))
        curl = shlex.join(
            [
                "curl",
                "--cacert",
                str(ca_path),
                "-H",
                f"Authorization: Bearer {first}",
                f"{sandbox.base_url}/auth/test",
            ]
        )
        print(f"Try: {curl}", flush=True)


async def run_sandbox(
    host: str,
    port: int,
    ca_out: Path | None,
    keys: dict[str, frozenset[str]] | None,
) -> None:
    """Serve the sandbox until cancelled, after printing its URL, CA file and keys.

    `keys` maps a label to scopes; each gets a fresh random key (default: read,
    read-write-delete and admin). Without `ca_out` the CA goes to a temporary file that is
    removed on exit.
    """
    sandbox = Sandbox(host=host, port=port)
    created = {label: sandbox.new_key(scopes) for label, scopes in (keys or DEFAULT_KEYS).items()}
    tmpdir: str | None = None
    try:
        if ca_out is None:
            tmpdir = tempfile.mkdtemp(prefix="credproxy-sandbox-")
            ca_out = Path(tmpdir) / "ca.pem"
        ca_path = sandbox.write_ca(ca_out)
        async with sandbox:
            _print_banner(sandbox, ca_path, created)
            await asyncio.Event().wait()
    finally:
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)
