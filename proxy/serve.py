"""`credproxy serve`: load config and store, start the daemon, run until stopped.

With `--sandbox` it first starts the built-in AImyChats-compatible upstream and
writes a ready config, key, store and app token, in a temporary directory unless
`--config` names where to keep them, then prints one curl line that works.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import tempfile
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import yaml

from .config import Config, ConfigError, credential_warnings, default_config_path, load_config
from .hardening import file_mode_problems, harden_process
from .identify import new_app_token, token_hash
from .masterkey import create_key_file, resolve_master_key
from .notify import Notifier
from .reload import fingerprint, follow_config
from .secret import Secret
from .server import Daemon, StartupError
from .store import Store, StoreError

log = logging.getLogger("credproxy")


class ServeError(Exception):
    """Start-up failed for a reason the user can fix; one line says which."""


def open_store_for_daemon(config: Config) -> Store:
    if not config.store.exists():
        raise ServeError(f"no store at {config.store}: run `credproxy init` first")
    problems = file_mode_problems(config.source, config.store)
    if problems:
        raise ServeError("; ".join(problems))
    master = resolve_master_key(os.environ, kdf_params=Store.read_kdf_params(config.store))
    store = Store.open(config.store, master)
    try:
        store.lock_for_daemon()
    except StoreError:
        store.close()
        raise
    return store


async def run_daemon(
    config: Config, store: Store, config_path: Path | None, loaded: str | None = None
) -> None:
    daemon = Daemon(config, store, config_path=config_path)
    notifier = Notifier.from_env()
    daemon.notifier = notifier
    await daemon.start()
    loop = asyncio.get_running_loop()
    tasks = []
    if config_path is not None:
        tasks.append(loop.create_task(follow_config(config_path, daemon.reload, loaded=loaded)))

    def healthy() -> bool:
        if not daemon.listeners:
            return False
        try:
            daemon.store.generation()
        except StoreError:
            return False
        return True

    tasks.append(loop.create_task(notifier.watchdog(healthy)))
    notifier.ready(f"serving on {', '.join(sorted(daemon.listeners))}")
    log.info("credproxy ready (pid %d)", os.getpid())
    try:
        await daemon.run()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    log.info("stopped")


def run_loop(main: Coroutine[Any, Any, None]) -> None:
    """Run the daemon on uvloop where it is installed (less CPU per request, and a TLS
    buffer per connection a fraction of asyncio's), else on asyncio's own loop."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
        return
    uvloop.run(main)


def serve(config_path: Path | None, *, sandbox: bool = False) -> int:
    harden_process()
    try:
        if sandbox:
            run_loop(_serve_sandbox(config_path))
            return 0
        path = config_path or default_config_path(os.environ)
        loaded = fingerprint(path)
        config = load_config(path)
        store = open_store_for_daemon(config)
        try:
            names = {i.name for i in store.info()}
            for problem in credential_warnings(config, names):
                log.warning("config: %s", problem)
            run_loop(run_daemon(config, store, path, loaded))
        finally:
            store.close()
    except (StartupError, ServeError) as exc:
        raise _cli_error(str(exc)) from None
    except KeyboardInterrupt:
        pass
    return 0


def _cli_error(message: str) -> Exception:
    from .cli import CliError

    return CliError(message)


# ---- sandbox ---------------------------------------------------------------------------

SANDBOX_APP = "demo"


def sandbox_config(base_url: str, ca: Path, store: Path, listen: Any, admin: Any) -> str:
    doc = {
        "listen": listen,
        "admin_listen": admin,
        "store": str(store),
        "upstreams": {
            "aimychats": {
                "base_url": base_url,
                "hosts": ["api.aimychats.com"],
                "ca_bundle": str(ca),
                # the sandbox's keys are on the Standard plan: pace to it
                "rate_limit": {"plan": "standard"},
                "credentials": [
                    {"name": "aimychats-read", "scopes": ["read"]},
                    {"name": "aimychats-rw", "scopes": ["read", "write", "delete"]},
                ],
            }
        },
        "apps": {
            SANDBOX_APP: {"upstreams": {"aimychats": {"scopes": ["read", "write", "delete"]}}}
        },
    }
    header = "# Written by `credproxy serve --sandbox`: the sandbox upstream on loopback.\n"
    return header + yaml.safe_dump(doc, sort_keys=False)


async def _serve_sandbox(config_path: Path | None) -> None:
    from .sandbox import Sandbox

    tmp: tempfile.TemporaryDirectory[str] | None = None
    if config_path is None:
        tmp = tempfile.TemporaryDirectory(prefix="credproxy-sandbox-")
        workdir = Path(tmp.name)
        config_path = workdir / "config.yaml"
    else:
        workdir = config_path.parent
        workdir.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(workdir, 0o700)
    listen: Any = "127.0.0.1:8787"
    admin: Any = "127.0.0.1:8786"
    if config_path.exists():
        existing = yaml.safe_load(config_path.read_text()) or {}
        listen = existing.get("listen", listen)
        admin = existing.get("admin_listen", admin)

    key_file = workdir / "master.key"
    store_path = workdir / "store.db"
    os.environ["CREDPROXY_MASTER_KEY_FILE"] = str(key_file)
    async with Sandbox() as sandbox:
        ca = sandbox.write_ca(workdir / "sandbox-ca.pem")
        text = sandbox_config(sandbox.base_url, ca, store_path, listen, admin)
        tmp_cfg = config_path.with_suffix(".tmp")
        fd = os.open(tmp_cfg, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp_cfg, config_path)
        loaded = fingerprint(config_path)
        try:
            config = load_config(config_path)
        except ConfigError as exc:
            raise ServeError(f"sandbox config is invalid: {exc}") from None
        if not key_file.exists():
            create_key_file(key_file)
        master = resolve_master_key(os.environ, kdf_params=None)
        store = (
            Store.open(store_path, master)
            if store_path.exists()
            else Store.create(store_path, master)
        )
        try:
            store.put("aimychats-read", "api_key", Secret(sandbox.new_key(["read"])))
            store.put(
                "aimychats-rw", "api_key", Secret(sandbox.new_key(["read", "write", "delete"]))
            )
            token = new_app_token()
            store.add_app_token(SANDBOX_APP, token_hash(token))
            store.lock_for_daemon()
            _print_welcome(config, config_path, sandbox.base_url, token)
            await run_daemon(config, store, config_path, loaded)
        finally:
            store.close()
    if tmp is not None:
        tmp.cleanup()


def _print_welcome(config: Config, config_path: Path, upstream: str, token: str) -> None:
    listen = config.listen[0]
    if listen.kind == "unix":
        base = "http://localhost"
        extra = f"--unix-socket {shlex.quote(str(listen.path))} "
    else:
        host = f"[{listen.host}]" if listen.host and ":" in listen.host else listen.host
        base = f"http://{host}:{listen.port}"
        extra = ""
    lines = [
        "",
        f"credproxy sandbox: upstream {upstream} (throwaway CA), config {config_path}",
        f"app token for app '{SANDBOX_APP}' (a local token, not an API key):",
        "",
        f"  curl -s {extra}-H 'Authorization: Bearer {token}' {base}/aimychats/auth/test",
        "",
        "Ctrl-C stops both.",
        "",
    ]
    print("\n".join(lines), flush=True)
