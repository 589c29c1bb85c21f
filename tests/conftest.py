"""Shared fixtures: real TLS upstreams on 127.0.0.1, a store, and a running daemon.

Everything listens on loopback with ephemeral ports; TLS certificates come from
trustme, so the daemon verifies upstreams exactly as it would in production.
"""

from __future__ import annotations

import asyncio
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
import yaml
from aiohttp import web

from proxy.config import parse_config
from proxy.identify import new_app_token, token_hash
from proxy.masterkey import create_key_file, load_key_file
from proxy.reload import fingerprint, follow_config
from proxy.secret import Secret
from proxy.server import Daemon, free_port
from proxy.store import Store


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def ca_file(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


def server_context(ca: trustme.CA, *names: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*(names or ("127.0.0.1", "localhost"))).configure_cert(ctx)
    return ctx


@dataclass
class Upstream:
    """A TLS test upstream that records what reached it."""

    url: str
    seen: list[web.Request] = field(default_factory=list)
    headers: list[dict[str, list[str]]] = field(default_factory=list)


@pytest.fixture
async def tls_upstream(ca: trustme.CA) -> AsyncIterator[Callable[..., Any]]:
    """Factory: start an aiohttp app over TLS on 127.0.0.1 (cert from `ca` unless given)."""
    runners: list[web.AppRunner] = []

    async def start(app: web.Application, *, cert_ca: trustme.CA | None = None) -> Upstream:
        upstream = Upstream(url="")

        @web.middleware
        async def record(request: web.Request, handler: Any) -> web.StreamResponse:
            upstream.seen.append(request)
            hdrs: dict[str, list[str]] = {}
            for k, v in request.headers.items():
                hdrs.setdefault(k.lower(), []).append(v)
            upstream.headers.append(hdrs)
            return await handler(request)  # type: ignore[no-any-return]

        app.middlewares.append(record)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await runner.setup()
        port = free_port()
        site = web.TCPSite(runner, "127.0.0.1", port, ssl_context=server_context(cert_ca or ca))
        await site.start()
        runners.append(runner)
        upstream.url = f"https://127.0.0.1:{port}"
        return upstream

    yield start
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
def key_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh master key file, named by CREDPROXY_MASTER_KEY_FILE for this test."""
    key = tmp_path / "keys" / "master.key"
    create_key_file(key)
    monkeypatch.setenv("CREDPROXY_MASTER_KEY_FILE", str(key))
    for var in ("CREDPROXY_PASSPHRASE", "CREDENTIALS_DIRECTORY", "CREDPROXY_CONFIG"):
        monkeypatch.delenv(var, raising=False)
    return key


@dataclass
class RunningDaemon:
    daemon: Daemon
    store: Store
    url: str
    admin_url: str
    config_path: Path
    tokens: dict[str, str]

    def auth(self, app: str = "app") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[app]}"}


def write_config(path: Path, doc: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    os.chmod(path, 0o600)
    return path


@pytest.fixture
async def start_daemon(tmp_path: Path, key_env: Path) -> AsyncIterator[Callable[..., Any]]:
    """Factory: write a config, create a store with the given secrets, start a Daemon.

    `secrets` maps name -> value; every app in the config gets a stored token.
    """
    started: list[RunningDaemon] = []
    watchers: list[asyncio.Task[None]] = []

    async def start(
        doc: dict[str, Any], secrets: dict[str, str] | None = None, watch: bool = False
    ) -> RunningDaemon:
        doc = dict(doc)
        port, admin = free_port(), free_port()
        doc.setdefault("listen", f"127.0.0.1:{port}")
        doc.setdefault("admin_listen", f"127.0.0.1:{admin}")
        doc.setdefault("store", str(tmp_path / "data" / "store.db"))
        path = write_config(tmp_path / "config.yaml", doc)
        loaded = fingerprint(path)
        config = parse_config(path.read_text(), source=str(path), base_dir=tmp_path)
        master = load_key_file(key_env)
        store_path = Path(doc["store"])
        store = (
            Store.open(store_path, master)
            if store_path.exists()
            else Store.create(store_path, master)
        )
        for name, value in (secrets or {}).items():
            store.put(name, "api_key", Secret(value))
        tokens = {}
        for app in doc.get("apps", {}):
            token = new_app_token()
            store.add_app_token(app, token_hash(token))
            tokens[app] = token
        daemon = Daemon(config, store, config_path=path)
        await daemon.start()
        if watch:
            watchers.append(asyncio.create_task(follow_config(path, daemon.reload, loaded=loaded)))
        listen = str(config.listen[0])
        running = RunningDaemon(
            daemon, store, f"http://{listen}", f"http://{config.admin_listen}", path, tokens
        )
        started.append(running)
        return running

    yield start
    for task in watchers:
        task.cancel()
    await asyncio.gather(*watchers, return_exceptions=True)
    for running in started:
        await running.daemon.close()
        running.store.close()


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    """A plain client for talking to the daemon (no proxy from the environment)."""
    async with aiohttp.ClientSession(
        trust_env=False, auto_decompress=False, timeout=aiohttp.ClientTimeout(total=60)
    ) as session:
        yield session


def upstream_doc(url: str, ca_file: Path, **extra: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "base_url": url + "/v1",
        "ca_bundle": str(ca_file),
        "credentials": [
            {"name": "key-read", "scopes": ["read"]},
            {"name": "key-rw", "scopes": ["read", "write", "delete"]},
        ],
    }
    doc.update(extra)
    return doc


def api_doc(
    url: str, ca_file: Path, scopes: list[str] | None = None, **upstream: Any
) -> dict[str, Any]:
    """A config with one upstream, `api` (upstream_doc, plus `upstream`), and one app, `app`,
    granted `scopes` on it (read, write and delete unless given)."""
    return {
        "upstreams": {"api": upstream_doc(url, ca_file, **upstream)},
        "apps": {"app": {"upstreams": {"api": {"scopes": scopes or ["read", "write", "delete"]}}}},
    }


@pytest.fixture
def no_proxy_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    yield


# ---- the daemon as a separate process, as users run it ------------------------------------


def cli_env(home: Path, **extra: str) -> dict[str, str]:
    """A clean environment for running `credproxy` as a user would, rooted at `home`."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("CREDPROXY_")
        and k not in ("CREDENTIALS_DIRECTORY",)
        and not k.lower().endswith("_proxy")
    }
    env["HOME"] = str(home)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def run_cli(
    *args: str, env: dict[str, str], stdin: str | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        check=False,
    )


def wait_ready(
    proc: subprocess.Popen[Any], admin_url: str, log_path: Path | None = None, timeout: float = 20
) -> None:
    """Poll the admin /readyz until 200; fail at once if the process exits."""

    def log() -> str:
        return log_path.read_text() if log_path else ""

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"daemon exited early: {log()}")
        try:
            with urllib.request.urlopen(f"{admin_url}/readyz", timeout=1) as resp:  # noqa: S310
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"daemon not ready: {log()}")


class DaemonProcess:
    """`credproxy serve` in a child process; stderr captured to a file."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "proxy", *args],
            stdout=subprocess.PIPE,
            stderr=self._log,
            env=env,
        )

    def wait_ready(self, admin_url: str, timeout: float = 20) -> None:
        wait_ready(self.proc, admin_url, self.log_path, timeout)

    def stop(self, timeout: float = 15) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self._log.close()
        if self.proc.stdout:
            self.proc.stdout.close()
        return code

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture
def daemon_procs() -> Iterator[list[DaemonProcess]]:
    procs: list[DaemonProcess] = []
    yield procs
    for proc in procs:
        proc.stop()


# ---- a user's set-up through the CLI, then `credproxy serve` in a child process ------------


def user_home(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A fresh HOME with `credproxy init` run in it; returns (home, env)."""
    home = tmp_path / "home"
    home.mkdir()
    env = cli_env(home)
    result = run_cli("init", env=env)
    assert result.returncode == 0, result.stderr
    return home, env


def user_config_path(env: dict[str, str]) -> Path:
    return Path(env["HOME"]) / ".config" / "credproxy" / "config.yaml"


def free_listeners(cfg: Path, doc: dict[str, Any] | None = None) -> tuple[str, str]:
    """Rewrite `cfg` (from `doc`, else its own content) with free listen/admin ports."""
    if doc is None:
        doc = yaml.safe_load(cfg.read_text())
    listen, admin = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    write_config(cfg, {**doc, "listen": listen, "admin_listen": admin})
    return listen, admin


@dataclass
class UserDaemon:
    """`credproxy serve` set up the way a user would, running in a child process."""

    proc: DaemonProcess
    env: dict[str, str]
    config: Path
    url: str
    admin_url: str
    tokens: dict[str, str]

    def auth(self, app: str = "app") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[app]}"}


async def start_user_daemon(
    tmp_path: Path,
    procs: list[DaemonProcess],
    doc: dict[str, Any],
    secrets: dict[str, str],
    *,
    args: tuple[str, ...] = ("serve",),
) -> UserDaemon:
    """init, write `doc` (store and free ports filled in), keys add, apps token, serve."""
    home, env = user_home(tmp_path)
    cfg = user_config_path(env)
    doc = {"store": str(home / ".local/share/credproxy/store.db"), **doc}
    listen, admin = free_listeners(cfg, doc)
    for name, value in secrets.items():
        added = run_cli("keys", "add", name, "--stdin", env=env, stdin=value)
        assert added.returncode == 0, added.stderr
    tokens = {
        app: run_cli("apps", "token", app, env=env).stdout.strip() for app in doc.get("apps", {})
    }
    proc = DaemonProcess(list(args), env, tmp_path / "daemon.log")
    procs.append(proc)
    await asyncio.to_thread(proc.wait_ready, f"http://{admin}")
    return UserDaemon(proc, env, cfg, f"http://{listen}", f"http://{admin}", tokens)
