"""`credproxy doctor` against the built-in sandbox, with a config and store made by the CLI."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trustme
import yaml

from proxy.cli import build_parser
from proxy.doctor import run_doctor
from proxy.sandbox import Sandbox
from proxy.server import free_port
from tests.conftest import DaemonProcess, cli_env, run_cli


@dataclass
class Setup:
    """A user's set-up: HOME, config, key and store from `credproxy init`, keys from the sandbox."""

    home: Path
    env: dict[str, str]
    config: Path
    store: Path
    key_file: Path
    sandbox: Sandbox
    ca: Path
    listen: str
    admin: str
    secrets: list[str] = field(default_factory=list)

    def doc(self, **upstream: Any) -> dict[str, Any]:
        aimychats: dict[str, Any] = {
            "base_url": self.sandbox.base_url,
            "ca_bundle": str(self.ca),
            "credentials": [
                {"name": "aimychats-read", "scopes": ["read"]},
                {"name": "aimychats-rw", "scopes": ["read", "write", "delete"]},
            ],
        }
        aimychats.update(upstream)
        return {
            "listen": self.listen,
            "admin_listen": self.admin,
            "store": str(self.store),
            "upstreams": {"aimychats": aimychats},
            "apps": {"demo": {"upstreams": {"aimychats": {"scopes": ["read"]}}}},
        }

    def write(self, doc: dict[str, Any]) -> None:
        self.config.write_text(yaml.safe_dump(doc, sort_keys=False))
        os.chmod(self.config, 0o600)

    def add_key(self, name: str, value: str) -> None:
        result = run_cli("keys", "add", name, "--stdin", env=self.env, stdin=value)
        assert result.returncode == 0, result.stderr
        self.secrets.append(value)

    async def doctor(self, *, timeout: float = 5.0) -> tuple[int, str]:
        out = io.StringIO()
        code = await run_doctor(None, self.env, out, timeout=timeout)
        text = out.getvalue()
        for secret in [*self.secrets, self.key_file.read_text().strip()]:
            assert secret not in text
        return code, text


def lines(text: str, level: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(level)]


@pytest.fixture
async def setup(tmp_path: Path) -> AsyncIterator[Setup]:
    """Sandbox running, config written, `credproxy init` done, the read-only key stored."""
    home = tmp_path / "home"
    home.mkdir()
    env = cli_env(home)
    async with Sandbox() as sandbox:
        config = home / ".config" / "credproxy" / "config.yaml"
        config.parent.mkdir(parents=True, mode=0o700)
        s = Setup(
            home=home,
            env=env,
            config=config,
            store=home / ".local" / "share" / "credproxy" / "store.db",
            key_file=home / ".config" / "credproxy" / "master.key",
            sandbox=sandbox,
            ca=sandbox.write_ca(tmp_path / "sandbox-ca.pem"),
            listen=f"127.0.0.1:{free_port()}",
            admin=f"127.0.0.1:{free_port()}",
        )
        s.write(s.doc())
        init = run_cli("init", env=env)
        assert init.returncode == 0, init.stderr
        s.add_key("aimychats-read", sandbox.new_key(["read"]))
        yield s


async def test_all_ok(setup: Setup) -> None:
    """With every credential stored and the sandbox up, each check says ok and doctor exits 0."""
    setup.add_key("aimychats-rw", setup.sandbox.new_key(["read", "write", "delete"]))
    code, text = await setup.doctor()
    assert code == 0, text
    assert not lines(text, "FAIL") and not lines(text, "warn"), text
    assert "all checks passed" in text
    assert f"opens with the master key from file {setup.key_file}" in text
    assert "TLSv1." in text and f"ca_bundle {setup.ca}" in text
    # the least-privileged key is the one tested
    auth = [line for line in lines(text, "ok") if "auth test" in line]
    assert len(auth) == 1 and "with aimychats-read (read) -> 200" in auth[0]
    assert f"listen {setup.listen}: free" in text
    assert f"admin_listen {setup.admin}: free" in text


async def test_missing_credential(setup: Setup) -> None:
    """A credential named in the config but absent from the store is a FAIL naming the fix."""
    code, text = await setup.doctor()
    assert code == 1
    fails = lines(text, "FAIL")
    assert len(fails) == 1, text
    assert "aimychats/aimychats-rw" in fails[0]
    assert "credproxy keys add aimychats-rw" in fails[0]
    assert any("aimychats/aimychats-read" in line for line in lines(text, "ok"))


async def test_bad_ca(setup: Setup, tmp_path: Path) -> None:
    """A ca_bundle that did not sign the upstream's certificate fails TLS verification, and says so."""
    setup.add_key("aimychats-rw", setup.sandbox.new_key(["read", "write", "delete"]))
    other = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    setup.write(setup.doc(ca_bundle=str(other)))
    code, text = await setup.doctor()
    assert code == 1
    (fail,) = lines(text, "FAIL")
    assert fail.startswith("FAIL  upstream aimychats:")
    assert "not trusted" in fail and f"ca_bundle {other}" in fail
    assert any("auth test: not run" in line for line in lines(text, "warn"))
    assert setup.sandbox.received == []  # no key was sent over an unverified connection


async def test_port_in_use_by_another_program(setup: Setup) -> None:
    """A listen address held by something that is not credproxy is a FAIL that says so."""
    setup.add_key("aimychats-rw", setup.sandbox.new_key(["read", "write", "delete"]))
    host, port = setup.listen.split(":")
    with socket.socket() as holder:
        holder.bind((host, int(port)))
        holder.listen()
        code, text = await setup.doctor()
    assert code == 1
    (fail,) = lines(text, "FAIL")
    assert fail.startswith(f"FAIL  listen {setup.listen}: in use by another program")
    assert "change the address" in fail


async def test_ports_held_by_running_credproxy(setup: Setup, tmp_path: Path) -> None:
    """Addresses held by a running credproxy (its admin /healthz answers) are ok, with its pid."""
    setup.add_key("aimychats-rw", setup.sandbox.new_key(["read", "write", "delete"]))
    daemon = DaemonProcess(["serve"], setup.env, tmp_path / "daemon.log")
    try:
        await asyncio.to_thread(daemon.wait_ready, f"http://{setup.admin}")
        code, text = await setup.doctor()
    finally:
        assert daemon.stop() == 0
    assert code == 0, text
    pid = daemon.proc.pid
    assert f"listen {setup.listen}: in use by the running credproxy (pid {pid})" in text
    assert f"admin_listen {setup.admin}: in use by the running credproxy (pid {pid})" in text


async def test_loose_file_modes(setup: Setup) -> None:
    """A store and a key file others can read are FAILs with the chmod that fixes them."""
    setup.add_key("aimychats-rw", setup.sandbox.new_key(["read", "write", "delete"]))
    os.chmod(setup.store, 0o644)
    os.chmod(setup.key_file, 0o644)
    code, text = await setup.doctor()
    assert code == 1
    fails = lines(text, "FAIL")
    assert len(fails) == 2, text
    assert any(f"key file: {setup.key_file}" in f and "chmod 600" in f for f in fails)
    assert any(f"store {setup.store}" in f and "chmod 600" in f for f in fails)
    # the other checks still ran against the store
    assert any("auth test" in line and "-> 200" in line for line in lines(text, "ok"))


async def test_invalid_config(setup: Setup) -> None:
    """A config that does not load is one FAIL listing each problem by its YAML path."""
    doc = setup.doc(base_url="http://127.0.0.1:1/v1")
    setup.write(doc)
    code, text = await setup.doctor()
    assert code == 1
    (fail,) = lines(text, "FAIL")
    assert fail.startswith(f"FAIL  config: {setup.config} cannot be used (1 problem)")
    assert "upstreams.aimychats.base_url" in text
    assert "listen" not in text.split(fail)[1]  # nothing else is checked


async def test_missing_store_and_wrong_key(setup: Setup, tmp_path: Path) -> None:
    """No store, or a master key that does not open it: FAILs naming the file and the fix."""
    other_key = tmp_path / "other.key"
    other_key.write_text(os.urandom(32).hex() + "\n")
    os.chmod(other_key, 0o600)
    setup.env["CREDPROXY_MASTER_KEY_FILE"] = str(other_key)
    code, text = await setup.doctor()
    assert code == 1
    assert any(f"does not open store {setup.store}" in line for line in lines(text, "FAIL")), text
    assert any("credentials: not checked" in line for line in lines(text, "warn"))

    del setup.env["CREDPROXY_MASTER_KEY_FILE"]
    setup.store.unlink()
    code, text = await setup.doctor()
    assert code == 1
    assert f"FAIL  store: no store at {setup.store}: run `credproxy init`" in text


async def test_key_refused_by_upstream(setup: Setup) -> None:
    """A stored key the upstream does not accept fails the auth test, naming the key to replace."""
    setup.write(setup.doc(credentials=[{"name": "stale", "scopes": ["read"]}]))
    setup.add_key("stale", "aimy_sk_not_a_key_the_sandbox_knows_0123")
    code, text = await setup.doctor()
    assert code == 1
    (fail,) = lines(text, "FAIL")
    assert "auth test" in fail and "-> 401" in fail and "credproxy keys add stale" in fail


async def test_oauth_not_logged_in(setup: Setup) -> None:
    """An authorization-code upstream without a stored refresh token asks for `credproxy login`."""
    setup.add_key("aimychats-rw", setup.sandbox.new_key(["read", "write", "delete"]))
    oauth = {
        "grant": "authorization_code",
        "authorize_url": setup.sandbox.url + "/oauth/authorize",
        "token_url": setup.sandbox.url + "/oauth/token",
        "client_id": "cli",
        "scopes": ["read"],
        "redirect_port": free_port(),
    }
    setup.write(setup.doc(oauth=oauth))
    code, text = await setup.doctor()
    assert code == 1
    (fail,) = lines(text, "FAIL")
    assert fail == "FAIL  oauth aimychats: not logged in: run `credproxy login aimychats`"


async def test_network_checks_are_time_bound(setup: Setup) -> None:
    """An upstream that accepts TCP but never answers TLS fails within the doctor's time bound."""
    held: list[asyncio.StreamWriter] = []

    async def silent(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    setup.write(setup.doc(base_url=f"https://127.0.0.1:{port}/v1"))
    started = time.monotonic()
    try:
        code, text = await setup.doctor(timeout=0.5)
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()
    assert time.monotonic() - started < 4
    assert code == 1
    assert any("did not answer within 0.5s" in line for line in lines(text, "FAIL")), text


def _doctor_wired() -> bool:
    with contextlib.redirect_stderr(io.StringIO()):
        try:
            build_parser().parse_args(["doctor"])
        except SystemExit:
            return False
    return True


@pytest.mark.skipif(not _doctor_wired(), reason="`credproxy doctor` is not in the CLI yet")
async def test_cli_doctor_command(setup: Setup) -> None:
    """`credproxy doctor` prints the checklist on stdout and exits 1 on a FAIL, 0 once it is fixed."""
    failing = await asyncio.to_thread(run_cli, "doctor", env=setup.env)
    assert failing.returncode == 1, failing.stdout + failing.stderr
    assert "FAIL  credential aimychats/aimychats-rw" in failing.stdout
    setup.add_key("aimychats-rw", setup.sandbox.new_key(["read", "write", "delete"]))
    passing = await asyncio.to_thread(
        run_cli, "doctor", "--config", str(setup.config), env=setup.env
    )
    assert passing.returncode == 0, passing.stdout + passing.stderr
    assert "all checks passed" in passing.stdout
    for secret in setup.secrets:
        assert secret not in failing.stdout + failing.stderr + passing.stdout + passing.stderr
