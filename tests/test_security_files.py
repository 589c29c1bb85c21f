"""Store, key and config files: created private from their first instant, and never trusted loose.

test_store and test_cli check final modes and the start-up refusal; this adds that
no file is ever created wider than its final mode (traced at the system call), and
that a config others can write is not taken in while the daemon runs either.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy import cli
from proxy.hardening import file_mode_problems
from proxy.masterkey import create_key_file, load_key_file
from proxy.secret import Secret
from proxy.store import Store
from tests.conftest import upstream_doc
from tests.fakeapi import fake_api


@dataclass
class Trace:
    """What os.open / os.mkdir / chmod calls did to paths under `root`."""

    root: Path
    created: dict[str, list[int]] = field(default_factory=dict)  # path -> modes seen
    dirs: dict[str, list[int]] = field(default_factory=dict)

    def note(self, table: dict[str, list[int]], path: Any, mode: int) -> None:
        text = os.path.abspath(os.fspath(path))
        if text.startswith(str(self.root)):
            table.setdefault(text, []).append(stat.S_IMODE(mode))


@pytest.fixture
def trace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Trace]:
    """Trace file and directory creation under tmp_path, with umask 0 (the worst case)."""
    t = Trace(tmp_path)
    real_open, real_mkdir = os.open, os.mkdir
    real_chmod, real_fchmod = os.chmod, os.fchmod
    fd_paths: dict[int, str] = {}

    def traced_open(path: Any, flags: int, mode: int = 0o777, *a: Any, **kw: Any) -> int:
        fd = real_open(path, flags, mode, *a, **kw)
        if flags & os.O_CREAT and stat.S_ISREG(os.fstat(fd).st_mode):
            # the mode the file has the instant it exists, before anything else can run
            t.note(t.created, path, os.fstat(fd).st_mode)
            fd_paths[fd] = os.path.abspath(os.fspath(path))
        return fd

    def traced_mkdir(path: Any, mode: int = 0o777, *a: Any, **kw: Any) -> None:
        real_mkdir(path, mode, *a, **kw)
        t.note(t.dirs, path, os.stat(path).st_mode)

    def traced_chmod(path: Any, mode: int, *a: Any, **kw: Any) -> None:
        real_chmod(path, mode, *a, **kw)
        table = t.dirs if os.path.isdir(path) else t.created
        t.note(table, path, mode)

    def traced_fchmod(fd: int, mode: int) -> None:
        real_fchmod(fd, mode)
        if fd in fd_paths:
            t.note(t.created, fd_paths[fd], mode)

    monkeypatch.setattr(os, "open", traced_open)
    monkeypatch.setattr(os, "mkdir", traced_mkdir)
    monkeypatch.setattr(os, "chmod", traced_chmod)
    monkeypatch.setattr(os, "fchmod", traced_fchmod)
    old = os.umask(0)
    try:
        yield t
    finally:
        os.umask(old)


def _files(root: Path) -> set[str]:
    return {str(p) for p in root.rglob("*") if p.is_file()}


def test_store_and_key_file_exist_only_ever_private(trace: Trace, tmp_path: Path) -> None:
    """Under umask 0 the key file and the store are 0600 from the system call that creates them, never wider."""
    key = tmp_path / "cfg" / "credproxy" / "master.key"
    create_key_file(key)
    store_path = tmp_path / "data" / "credproxy" / "store.db"
    with Store.create(store_path, load_key_file(key)) as store:
        store.put("k", "api_key", Secret("sk_mode_test_123456"))
        store.lock_for_daemon()
    for path in (key, store_path):
        assert str(path) in trace.created, f"{path} was not created through os.open"
        for mode in trace.created[str(path)]:
            assert mode & 0o077 == 0, f"{path} was mode {mode:o} at some point"
    for path in _files(tmp_path):
        assert path in trace.created, f"{path} was created some other way (open(), sqlite?)"
        assert all(m & 0o077 == 0 for m in trace.created[path]), (path, trace.created[path])
    for directory, modes in trace.dirs.items():
        assert all(m & 0o077 == 0 for m in modes), (directory, modes)


def test_init_writes_every_file_private_from_the_start(
    trace: Trace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`credproxy init` under umask 0 creates its config, key and store 0600 at the system call, never wider."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for var in ("CREDPROXY_MASTER_KEY_FILE", "CREDPROXY_PASSPHRASE", "CREDPROXY_CONFIG"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    assert cli.main(["init"]) == 0
    written = _files(home)
    assert any(p.endswith("config.yaml") for p in written)
    assert any(p.endswith("master.key") for p in written)
    assert any(p.endswith("store.db") for p in written)
    for path in written:
        assert path in trace.created, f"{path} was created some other way"
        assert all(m & 0o077 == 0 for m in trace.created[path]), (path, trace.created[path])


def test_init_creates_no_loose_directory(
    trace: Trace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every directory `credproxy init` creates is private (0700) even under umask 0."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for var in ("CREDPROXY_MASTER_KEY_FILE", "CREDPROXY_PASSPHRASE", "CREDPROXY_CONFIG"):
        monkeypatch.delenv(var, raising=False)
    assert cli.main(["init"]) == 0
    made = {d: m for d, m in trace.dirs.items() if d.startswith(str(home) + os.sep)}
    assert made
    for directory, modes in made.items():
        assert all(m & 0o077 == 0 for m in modes), (directory, [oct(m) for m in modes])


# ---- a loose config is not trusted while running -------------------------------------------


@pytest.mark.parametrize("mode", [0o664, 0o666, 0o620])
async def test_loose_config_is_not_reloaded(
    tls_upstream: Any, start_daemon: Any, ca_file: Path, mode: int
) -> None:
    """A config rewritten writable by group or others is refused on reload; the one in force stays."""
    upstream = await tls_upstream(fake_api())
    elsewhere = await tls_upstream(fake_api())
    d = await start_daemon(
        {
            "upstreams": {"api": upstream_doc(upstream.url, ca_file)},
            "apps": {"app": {"upstreams": {"api": {"scopes": ["read"]}}}},
        },
        {"key-read": "sk_read_files_000000", "key-rw": "sk_rw_files_11111111"},
    )
    doc = yaml.safe_load(d.config_path.read_text())
    doc["upstreams"]["api"]["base_url"] = elsewhere.url + "/v1"
    d.config_path.write_text(yaml.safe_dump(doc, sort_keys=False))
    os.chmod(d.config_path, mode)
    assert await d.daemon.reload("test") is False
    assert d.daemon.snapshot.config.upstreams["api"].base_url == upstream.url + "/v1"


@pytest.mark.parametrize("mode", [0o777, 0o775])
def test_config_in_a_loose_directory_is_refused(tmp_path: Path, mode: int) -> None:
    """A 0600 config inside a directory others may write is refused like a loose config."""
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, mode)
    config = shared / "config.yaml"
    config.write_text("{}\n")
    os.chmod(config, 0o600)
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    assert file_mode_problems(config, private / "store.db") != []


def test_loose_files_named_in_the_refusal(tmp_path: Path) -> None:
    """Control: a group-writable config, a readable store and a writable store directory are each named with the chmod that fixes them."""
    data = tmp_path / "data"
    data.mkdir()
    os.chmod(data, 0o777)  # noqa: S103 - the loose directory is the point of the test
    store = data / "store.db"
    store.write_bytes(b"")
    os.chmod(store, 0o640)
    config = tmp_path / "config.yaml"
    config.write_text("{}\n")
    os.chmod(config, 0o620)
    problems = "\n".join(file_mode_problems(config, store))
    assert f"chmod go-w {config}" in problems
    assert f"chmod 600 {store}" in problems
    assert f"chmod 700 {data}" in problems
