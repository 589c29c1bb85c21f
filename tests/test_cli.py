"""Every CLI command: its happy path and its clear-error path, run as a user runs them."""

from __future__ import annotations

import os
import re
import socket
import sqlite3
import stat
from pathlib import Path

import pytest
import yaml

from proxy.sandbox import Sandbox
from proxy.server import free_port
from tests.conftest import DaemonProcess, cli_env, free_listeners, run_cli, write_config

TOKEN_RE = re.compile(r"^cpx_[A-Za-z0-9_-]{43,}$")


@pytest.fixture
def home(tmp_path: Path) -> Path:
    h = tmp_path / "home"
    h.mkdir()
    return h


@pytest.fixture
def env(home: Path) -> dict[str, str]:
    return cli_env(home)


def _config(home: Path) -> Path:
    return home / ".config" / "credproxy" / "config.yaml"


def _serve(
    env: dict[str, str], procs: list[DaemonProcess], tmp_path: Path
) -> tuple[DaemonProcess, str]:
    """init, free ports in the starter config, `serve` until ready; returns it and the admin address."""
    _init(env)
    _listen, admin = free_listeners(_config(Path(env["HOME"])))
    proc = DaemonProcess(["serve"], env, tmp_path / "serve.log")
    procs.append(proc)
    proc.wait_ready(f"http://{admin}")
    return proc, admin


def _init(env: dict[str, str]) -> None:
    result = run_cli("init", env=env)
    assert result.returncode == 0, result.stderr


def test_init_creates_key_store_and_config(home: Path, env: dict[str, str]) -> None:
    """`init` writes a 0600 key, a 0600 store in a 0700 dir and a starter config that `check` accepts."""
    result = run_cli("init", env=env)
    assert result.returncode == 0, result.stderr
    key = home / ".config" / "credproxy" / "master.key"
    store = home / ".local" / "share" / "credproxy" / "store.db"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE(store.stat().st_mode) == 0o600
    assert stat.S_IMODE(store.parent.stat().st_mode) == 0o700
    assert _config(home).exists()
    # key kept apart from the data dir
    assert key.parent != store.parent
    again = run_cli("init", env=env)
    assert again.returncode == 0
    assert "already exists" in again.stdout
    check = run_cli("check", env=env)
    assert check.returncode == 0, check.stderr
    assert "warning" in check.stderr  # aimychats-rw is not in the store yet


def test_keys_add_list_rm(home: Path, env: dict[str, str]) -> None:
    """A key piped on stdin is stored; `keys list` shows name, kind, fingerprint, never the value."""
    _init(env)
    secret = "sk_live_cli_test_value_0123456789"
    added = run_cli("keys", "add", "aimychats-rw", "--stdin", env=env, stdin=secret + "\n")
    assert added.returncode == 0, added.stderr
    assert secret not in added.stdout + added.stderr
    listed = run_cli("keys", "list", env=env)
    assert listed.returncode == 0
    assert "aimychats-rw" in listed.stdout and "api_key" in listed.stdout
    assert "sha256:" in listed.stdout
    assert secret not in listed.stdout
    assert secret[:8] not in listed.stdout.replace("sk_live_", "")  # no prefix of the value
    removed = run_cli("keys", "rm", "aimychats-rw", env=env)
    assert removed.returncode == 0
    again = run_cli("keys", "rm", "aimychats-rw", env=env)
    assert again.returncode == 1
    assert "no secret named aimychats-rw" in again.stderr
    assert "Traceback" not in again.stderr


def test_keys_add_refuses_empty_and_control_characters(env: dict[str, str]) -> None:
    """An empty value or one with CR/LF/NUL inside is refused with exit 1."""
    _init(env)
    empty = run_cli("keys", "add", "x", "--stdin", env=env, stdin="\n")
    assert empty.returncode == 1
    bad = run_cli("keys", "add", "x", "--stdin", env=env, stdin="abc\ndef\n")
    assert bad.returncode == 1
    assert "Traceback" not in bad.stderr


def test_check_lists_every_problem(tmp_path: Path, env: dict[str, str]) -> None:
    """`check` on a broken config exits 1 and names each problem with its path and line."""
    path = tmp_path / "bad.yaml"
    path.write_text(
        "listen: 127.0.0.1:8787\n"
        "upstreams:\n"
        "  api:\n"
        "    base_url: http://api.example.com/v1\n"
        "    credentials: [{name: k, scopes: [read]}]\n"
        "    timeouts: {idle: soon}\n"
        "    bogus: 1\n"
    )
    result = run_cli("check", "--config", str(path), env=env)
    assert result.returncode == 1
    err = result.stderr
    assert "upstreams.api.base_url" in err and "https" in err and "line 4" in err
    assert "upstreams.api.timeouts.idle" in err
    assert "bogus" in err
    assert "Traceback" not in err


def test_check_missing_config(tmp_path: Path, env: dict[str, str]) -> None:
    """A missing config file is exit 1 with a hint, not a traceback."""
    result = run_cli("check", "--config", str(tmp_path / "nope.yaml"), env=env)
    assert result.returncode == 1
    assert "nope.yaml" in result.stderr
    assert "Traceback" not in result.stderr


def test_apps_token_list_revoke(home: Path, env: dict[str, str]) -> None:
    """`apps token` prints a cpx_ token alone; `apps list` counts it; `--revoke` removes it."""
    _init(env)
    token = run_cli("apps", "token", "default", env=env)
    assert token.returncode == 0, token.stderr
    assert TOKEN_RE.match(token.stdout.strip())
    assert token.stdout.count("\n") == 1
    listed = run_cli("apps", "list", env=env)
    assert re.search(r"default\s+aimychats: read,write\s+1", listed.stdout), listed.stdout
    revoked = run_cli("apps", "token", "default", "--revoke", env=env)
    assert revoked.returncode == 0
    listed = run_cli("apps", "list", env=env)
    assert re.search(r"default\s+\S+: read,write\s+0", listed.stdout), listed.stdout
    unknown = run_cli("apps", "token", "nosuchapp", env=env)
    assert unknown.returncode == 1
    assert "no app named nosuchapp" in unknown.stderr


def test_rekey_keeps_values_and_retires_old_key(home: Path, env: dict[str, str]) -> None:
    """After `rekey` every secret still decrypts, and the old key no longer opens the store."""
    _init(env)
    run_cli("keys", "add", "k1", "--stdin", env=env, stdin="value-one-123456")
    key_file = home / ".config" / "credproxy" / "master.key"
    old = key_file.read_bytes()
    result = run_cli("rekey", env=env)
    assert result.returncode == 0, result.stderr
    assert key_file.read_bytes() != old
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    listed = run_cli("keys", "list", env=env)
    assert "k1" in listed.stdout
    old_file = home / "old.key"
    old_file.write_bytes(old)
    os.chmod(old_file, 0o600)
    with_old = run_cli("keys", "list", env={**env, "CREDPROXY_MASTER_KEY_FILE": str(old_file)})
    assert with_old.returncode == 1
    assert "master key" in with_old.stderr


def test_wrong_master_key(home: Path, env: dict[str, str]) -> None:
    """A different master key gives exit 1 naming the store, no traceback."""
    _init(env)
    other = home / "other.key"
    from proxy.masterkey import create_key_file

    create_key_file(other)
    result = run_cli("keys", "list", env={**env, "CREDPROXY_MASTER_KEY_FILE": str(other)})
    assert result.returncode == 1
    assert "store.db" in result.stderr
    assert "Traceback" not in result.stderr


def test_corrupted_store(home: Path, env: dict[str, str]) -> None:
    """A corrupted store makes every command that opens it exit 1 with a message naming the file."""
    _init(env)
    store = home / ".local" / "share" / "credproxy" / "store.db"
    store.write_bytes(b"this is not a database" * 100)
    for args in (
        ["keys", "list"],
        ["keys", "add", "x", "--stdin"],
        ["apps", "token", "default"],
        ["apps", "list"],
        ["rekey"],
    ):
        result = run_cli(*args, env=env, stdin="value-123456\n")
        assert result.returncode == 1, args
        assert str(store) in result.stderr, args
        assert "Traceback" not in result.stderr


def test_no_store(env: dict[str, str], tmp_path: Path) -> None:
    """Commands on a config whose store does not exist say to run `credproxy init`."""
    cfg = write_config(
        tmp_path / "c.yaml",
        {
            "store": str(tmp_path / "none" / "store.db"),
            "upstreams": {
                "a": {
                    "base_url": "https://a.example/v1",
                    "credentials": [{"name": "k", "scopes": ["read"]}],
                }
            },
        },
    )
    result = run_cli("keys", "list", "--config", str(cfg), env=env)
    assert result.returncode == 1
    assert "credproxy init" in result.stderr


def test_usage_error_exit_2(env: dict[str, str]) -> None:
    """An unknown command or missing argument is a usage error: exit 2."""
    assert run_cli("frobnicate", env=env).returncode == 2
    assert run_cli("keys", "add", env=env).returncode == 2
    assert run_cli("--help", env=env).returncode == 0


def test_status_without_daemon(env: dict[str, str]) -> None:
    """`status` exits 1 when no daemon answers on the admin listener."""
    _init(env)
    cfg = _config(Path(env["HOME"]))
    doc = yaml.safe_load(cfg.read_text())
    doc["admin_listen"] = f"127.0.0.1:{free_port()}"
    write_config(cfg, doc)
    result = run_cli("status", env=env)
    assert result.returncode == 1
    assert "no daemon answers" in result.stderr


async def test_keys_test_against_sandbox(tmp_path: Path, env: dict[str, str]) -> None:
    """`keys test` calls the upstream's auth test endpoint over verified TLS and reports the result."""
    async with Sandbox() as sandbox:
        ca = sandbox.write_ca(tmp_path / "ca.pem")
        _init(env)
        cfg = _config(Path(env["HOME"]))
        doc = yaml.safe_load(cfg.read_text())
        doc["upstreams"]["aimychats"]["base_url"] = sandbox.base_url
        doc["upstreams"]["aimychats"]["ca_bundle"] = str(ca)
        write_config(cfg, doc)
        good = sandbox.new_key(["read", "write"])
        run_cli("keys", "add", "good", "--stdin", env=env, stdin=good)
        run_cli("keys", "add", "bad", "--stdin", env=env, stdin="aimy_sk_not_a_real_key_000")
        import asyncio

        ok = await asyncio.to_thread(
            run_cli, "keys", "test", "good", "--upstream", "aimychats", env=env
        )
        assert ok.returncode == 0, ok.stderr
        assert "200" in ok.stdout and "authenticated" in ok.stdout
        assert good not in ok.stdout + ok.stderr
        bad = await asyncio.to_thread(
            run_cli, "keys", "test", "bad", "--upstream", "aimychats", env=env
        )
        assert bad.returncode == 1
        assert "401" in bad.stdout
        nope = run_cli("keys", "test", "good", "--upstream", "nope", env=env)
        assert nope.returncode == 1


def test_serve_port_in_use(env: dict[str, str], tmp_path: Path) -> None:
    """`serve` on a port already taken exits 1 with one line naming the address and the fix."""
    _init(env)
    cfg = _config(Path(env["HOME"]))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        doc = yaml.safe_load(cfg.read_text())
        doc["listen"] = f"127.0.0.1:{port}"
        doc["admin_listen"] = f"127.0.0.1:{free_port()}"
        write_config(cfg, doc)
        result = run_cli("serve", env=env, timeout=30)
    assert result.returncode == 1
    assert f"127.0.0.1:{port}" in result.stderr
    assert "already in use" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_invalid_config(env: dict[str, str], tmp_path: Path) -> None:
    """`serve` with an invalid config exits 1 listing the problems."""
    path = tmp_path / "bad.yaml"
    path.write_text("upstreams: {a: {base_url: 'http://x'}}\n")
    result = run_cli("serve", "--config", str(path), env=env, timeout=30)
    assert result.returncode == 1
    assert "https" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_status_and_clean_stop(
    env: dict[str, str], daemon_procs: list[DaemonProcess], tmp_path: Path
) -> None:
    """A running daemon answers `status` with a table; SIGTERM stops it with exit 0."""
    proc, admin = _serve(env, daemon_procs, tmp_path)
    result = run_cli("status", env=env)
    assert result.returncode == 0, result.stderr
    assert "aimychats" in result.stdout and "missing" in result.stdout
    as_json = run_cli("status", "--json", env=env)
    assert '"upstreams"' in as_json.stdout
    assert proc.stop() == 0
    assert "Traceback" not in proc.log()


def test_store_lock_refuses_second_daemon(
    env: dict[str, str], daemon_procs: list[DaemonProcess], tmp_path: Path
) -> None:
    """Two daemons on one store: the second exits 1 with a clear message."""
    proc, admin = _serve(env, daemon_procs, tmp_path)
    second = run_cli("serve", env=env, timeout=30)
    assert second.returncode == 1
    assert "another credproxy daemon" in second.stderr


def test_store_file_modes_survive_sqlite(home: Path, env: dict[str, str]) -> None:
    """After writes, no file in the data dir is readable by group or others."""
    _init(env)
    run_cli("keys", "add", "k", "--stdin", env=env, stdin="value-123456")
    data = home / ".local" / "share" / "credproxy"
    for path in data.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, path
    # and the store is a real SQLite file with no plaintext in it
    raw = (data / "store.db").read_bytes()
    assert b"value-123456" not in raw
    sqlite3.connect(data / "store.db").close()


def test_serve_refuses_loose_file_modes(home: Path, env: dict[str, str]) -> None:
    """A group-writable config or a store readable by others stops `serve` with the chmod that fixes it."""
    _init(env)
    cfg = _config(home)
    store = home / ".local" / "share" / "credproxy" / "store.db"
    os.chmod(cfg, 0o664)
    result = run_cli("serve", env=env, timeout=30)
    assert result.returncode == 1
    assert f"chmod go-w {cfg}" in result.stderr
    os.chmod(cfg, 0o600)
    os.chmod(store, 0o644)
    result = run_cli("serve", env=env, timeout=30)
    assert result.returncode == 1
    assert f"chmod 600 {store}" in result.stderr
    assert "Traceback" not in result.stderr


def test_daemon_is_not_dumpable(
    env: dict[str, str], daemon_procs: list[DaemonProcess], tmp_path: Path
) -> None:
    """The running daemon has core dumps off and is marked non-dumpable (reported in /status)."""
    import json
    import urllib.request

    proc, admin = _serve(env, daemon_procs, tmp_path)
    with urllib.request.urlopen(f"http://{admin}/status", timeout=5) as resp:
        status = json.load(resp)
    assert status["process"] == {"dumpable": False, "core_dumps": False}
