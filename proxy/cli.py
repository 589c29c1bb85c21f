"""The `credproxy` command line: commands, their messages and exit codes.

Exit codes: 0 success, 1 a problem the user can fix (the one-line message says
how), 2 a usage error. Secrets enter only through a prompt or stdin, never
argv, and no command prints one (except `apps token`, which prints the new app
token once, by design). Heavy modules are imported inside the commands so that
`--help` and quick commands stay fast.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from . import __version__

if TYPE_CHECKING:
    from .config import Config, UpstreamConfig
    from .store import Store

EXIT_OK, EXIT_PROBLEM, EXIT_USAGE = 0, 1, 2


class CliError(Exception):
    """A problem the user can fix; the message names the cause and the fix."""


def _err(message: str) -> None:
    print(f"credproxy: {message}", file=sys.stderr)


# ---- shared steps --------------------------------------------------------------------


def _config_path(args: argparse.Namespace, env: Mapping[str, str]) -> Path:
    from .config import default_config_path

    if args.config:
        return Path(args.config).expanduser()
    return default_config_path(env)


def _load_config(args: argparse.Namespace) -> Config:
    from .config import load_config

    return load_config(_config_path(args, os.environ))


def _prompt() -> Any:
    return getpass.getpass if sys.stdin.isatty() else None


def _open_store(path: Path) -> Store:
    from .masterkey import resolve_master_key
    from .store import Store

    master = resolve_master_key(
        os.environ, kdf_params=Store.read_kdf_params(path), prompt=_prompt()
    )
    return Store.open(path, master)


def _upstream(config: Config, name: str) -> UpstreamConfig:
    upstream = config.upstreams.get(name)
    if upstream is None:
        have = ", ".join(config.upstreams) or "none"
        raise CliError(f"no upstream {name} in {config.source} (configured: {have})")
    return upstream


def _store_from_args(args: argparse.Namespace) -> Store:
    return _open_store(_load_config(args).store)


def _read_secret(args: argparse.Namespace, what: str) -> str:
    if args.stdin or not sys.stdin.isatty():
        value = sys.stdin.read()
        if value.endswith("\r\n"):
            value = value[:-2]
        elif value.endswith("\n"):
            value = value[:-1]
    else:
        value = getpass.getpass(f"{what}: ")
    if not value:
        raise CliError(f"no {what} given: type it at the prompt or pipe it with --stdin")
    return value


# ---- commands ------------------------------------------------------------------------

STARTER_CONFIG = """\
# credproxy config: see config.example.yaml and README.md for every key.
listen: 127.0.0.1:8787
admin_listen: 127.0.0.1:8786
store: {store}

upstreams:
  aimychats:
    base_url: https://api.aimychats.com/v1
    hosts: [api.aimychats.com]
    credentials:
      # add the key with: credproxy keys add aimychats-rw
      - {{name: aimychats-rw, scopes: [read, write, delete]}}

apps:
  default:
    # get its token with: credproxy apps token default
    upstreams: {{aimychats: {{scopes: [read, write]}}}}
"""


def cmd_init(args: argparse.Namespace) -> int:
    from .config import ConfigError, load_config
    from .masterkey import (
        ENV_PASSPHRASE,
        create_key_file,
        default_key_file,
        make_private_dirs,
        new_kdf_params,
        resolve_master_key,
    )
    from .store import Store

    env = os.environ
    config_path = _config_path(args, env)
    store_path = Path("~/.local/share/credproxy/store.db").expanduser()
    if config_path.exists():
        try:
            store_path = load_config(config_path).store
        except ConfigError as exc:
            raise CliError(f"{config_path} exists but is invalid, fix it first:\n{exc}") from None
    else:
        make_private_dirs(config_path.parent)
        fd = os.open(config_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(STARTER_CONFIG.format(store=store_path))
        print(f"wrote a starter config to {config_path}")

    if store_path.exists():
        print(f"store {store_path} already exists; nothing to do")
        return EXIT_OK
    kdf = None
    if env.get(ENV_PASSPHRASE):
        kdf = new_kdf_params()
        print("using the passphrase from CREDPROXY_PASSPHRASE (scrypt-stretched)")
    else:
        key_file = default_key_file(env)
        if not key_file.exists():
            create_key_file(key_file)
            print(
                f"wrote a new master key to {key_file} (mode 0600; back it up, apart from the store)"
            )
    master = resolve_master_key(env, kdf_params=kdf, prompt=None)
    Store.create(store_path, master, kdf_params=kdf).close()
    print(f"created the encrypted store {store_path}")
    print("next: `credproxy keys add aimychats-rw`, then `credproxy serve`")
    return EXIT_OK


def cmd_check(args: argparse.Namespace) -> int:
    from .config import ConfigError, credential_warnings
    from .masterkey import MasterKeyError
    from .store import StoreError

    path = _config_path(args, os.environ)
    try:
        config = _load_config(args)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_PROBLEM
    try:
        with _open_store(config.store) as store:
            names = {info.name for info in store.info()}
        for problem in credential_warnings(config, names):
            print(f"{path}: warning: {problem}", file=sys.stderr)
    except (StoreError, MasterKeyError) as exc:
        print(
            f"{path}: warning: credential names not checked against the store: {exc}",
            file=sys.stderr,
        )
    print(f"{path}: ok ({len(config.upstreams)} upstreams, {len(config.apps)} apps)")
    return EXIT_OK


def cmd_keys_add(args: argparse.Namespace) -> int:
    from .secret import Secret

    with _store_from_args(args) as store:
        value = _read_secret(args, f"value for {args.name}")
        existed = store.get_entry(args.name) is not None
        try:
            store.put(args.name, args.kind, Secret(value))
        except ValueError as exc:
            raise CliError(str(exc)) from None
        fp = Secret(value).fingerprint()
    print(f"{'replaced' if existed else 'stored'} {args.kind} {args.name} ({fp})")
    return EXIT_OK


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts)) if ts else "never"


def cmd_keys_list(args: argparse.Namespace) -> int:
    with _store_from_args(args) as store:
        infos = store.info()
    if not infos:
        print("the store holds no secrets yet: `credproxy keys add NAME`")
        return EXIT_OK
    rows = [("NAME", "KIND", "FINGERPRINT", "CREATED", "UPDATED", "LAST USED")]
    rows += [
        (
            i.name,
            i.kind,
            i.fingerprint,
            _when(i.created_at),
            _when(i.updated_at),
            _when(i.last_used_at),
        )
        for i in infos
    ]
    _table(rows)
    return EXIT_OK


def cmd_keys_rm(args: argparse.Namespace) -> int:
    with _store_from_args(args) as store:
        if not store.remove(args.name):
            raise CliError(f"no secret named {args.name} in the store (see `credproxy keys list`)")
    print(f"removed {args.name}")
    return EXIT_OK


def cmd_keys_test(args: argparse.Namespace) -> int:
    import asyncio

    config = _load_config(args)
    upstream = _upstream(config, args.upstream)
    with _open_store(config.store) as store:
        secret = store.get(args.name)
    if secret is None:
        raise CliError(f"no secret named {args.name} in the store (see `credproxy keys list`)")
    from .keytest import auth_test

    status, summary = asyncio.run(auth_test(upstream, secret))
    print(f"{upstream.base_url}/auth/test -> {status}: {summary}")
    return EXIT_OK if 200 <= status < 300 else EXIT_PROBLEM


def cmd_rekey(args: argparse.Namespace) -> int:
    from .masterkey import (
        ENV_CREDENTIALS_DIR,
        ENV_PASSPHRASE,
        create_key_file,
        load_key_file,
        new_kdf_params,
        resolve_master_key,
    )

    config = _load_config(args)
    with _open_store(config.store) as store:
        source = store.master.source
        if source == "passphrase":
            new_pass = os.environ.get("CREDPROXY_NEW_PASSPHRASE")
            if not new_pass:
                if not sys.stdin.isatty():
                    raise CliError("set CREDPROXY_NEW_PASSPHRASE or run in a terminal")
                new_pass = getpass.getpass("new passphrase: ")
                if new_pass != getpass.getpass("repeat it: "):
                    raise CliError("the passphrases differ; nothing changed")
            kdf = new_kdf_params()
            new = resolve_master_key({ENV_PASSPHRASE: new_pass}, kdf_params=kdf)
            store.rekey(new, kdf_params=kdf)
            print(
                f"re-encrypted {store.path} under the new passphrase; set it in "
                f"{ENV_PASSPHRASE} from now on"
            )
            return EXIT_OK
        if source.startswith("systemd credential"):
            raise CliError(
                f"the master key comes from {ENV_CREDENTIALS_DIR}: rekey with the key file "
                "instead (CREDPROXY_MASTER_KEY_FILE=...), then install the new key as the "
                "credential"
            )
        key_path = Path(source.removeprefix("file ").strip())
        staged = key_path.with_name(key_path.name + ".new")
        if staged.exists():
            staged.unlink()
        create_key_file(staged)
        new = load_key_file(staged)
        store.rekey(new)
        os.replace(staged, key_path)
    print(f"re-encrypted {config.store} under a new master key, now in {key_path}")
    return EXIT_OK


def cmd_apps_token(args: argparse.Namespace) -> int:
    from .identify import new_app_token, token_hash

    config = _load_config(args)
    if args.name not in config.apps:
        raise CliError(f"no app named {args.name} in {config.source}: add it under `apps:` first")
    with _open_store(config.store) as store:
        if args.revoke:
            count = store.revoke_app_tokens(args.name)
            print(f"revoked {count} token(s) of app {args.name}", file=sys.stderr)
            return EXIT_OK
        token = new_app_token()
        store.add_app_token(args.name, token_hash(token))
    print(token)
    return EXIT_OK


def cmd_apps_list(args: argparse.Namespace) -> int:
    config = _load_config(args)
    with _open_store(config.store) as store:
        counts = store.app_token_counts()
    rows = [("APP", "UPSTREAMS AND SCOPES", "TOKENS", "ALLOW FROM")]
    for name, app in sorted(config.apps.items()):
        scopes = "; ".join(
            f"{u}: {','.join(sorted(g.scopes))}" for u, g in sorted(app.upstreams.items())
        )
        tokens = counts.get(name, 0) + len(app.token_sha256)
        allow = ",".join(str(n) for n in app.allow_from) or "-"
        rows.append((name, scopes or "-", str(tokens), allow))
    _table(rows)
    return EXIT_OK


def cmd_login(args: argparse.Namespace) -> int:
    import asyncio

    from .oauth import OAuthError, login

    config = _load_config(args)
    upstream = _upstream(config, args.upstream)
    with _open_store(config.store) as store:
        try:
            asyncio.run(
                login(
                    args.upstream,
                    upstream,
                    store,
                    open_browser=not args.no_browser,
                    notes=sys.stderr,
                )
            )
        except OAuthError as exc:
            raise CliError(str(exc)) from None
    print(
        f"logged in to {args.upstream}; tokens stored encrypted in {config.store}", file=sys.stderr
    )
    return EXIT_OK


def cmd_doctor(args: argparse.Namespace) -> int:
    import asyncio

    from .doctor import run_doctor

    path = Path(args.config).expanduser() if args.config else None
    return asyncio.run(run_doctor(path, os.environ, sys.stdout, prompt=_prompt()))


def cmd_status(args: argparse.Namespace) -> int:
    from .statuscmd import show_status

    return show_status(_load_config(args), as_json=args.json)


def cmd_serve(args: argparse.Namespace) -> int:
    from .logs import setup_logging
    from .serve import serve

    level = args.log_level or os.environ.get("CREDPROXY_LOG_LEVEL", "info")
    if level not in ("debug", "info", "warning", "error"):
        raise CliError(f"unknown log level {level!r}: use debug, info, warning or error")
    setup_logging(level, args.log_format)
    config_path = Path(args.config).expanduser() if args.config else None
    return serve(config_path, sandbox=args.sandbox)


def cmd_sandbox(args: argparse.Namespace) -> int:
    import asyncio

    from .sandbox.server import run_sandbox

    ca_out = Path(args.ca_out) if args.ca_out else None
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run_sandbox(args.host, args.port, ca_out, None))
    return EXIT_OK


# ---- plumbing ------------------------------------------------------------------------


def _table(rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"credproxy: usage error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        metavar="PATH",
        help="config file (default: $CREDPROXY_CONFIG, ~/.config/credproxy/config.yaml, "
        "/etc/credproxy/config.yaml)",
    )
    parser = _Parser(
        prog="credproxy",
        description="Local credential proxy: apps call APIs through it and never hold a key.",
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"credproxy {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    def add(name: str, help_: str, func: Any, parent: Any = sub) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = parent.add_parser(
            name, help=help_, description=help_, parents=[common]
        )
        p.set_defaults(func=func)
        return p

    add("init", "create the master key, the encrypted store and a starter config", cmd_init)
    serve = add("serve", "run the daemon (SIGHUP reloads, SIGTERM drains)", cmd_serve)
    serve.add_argument(
        "--sandbox",
        action="store_true",
        help="run against the built-in sandbox upstream (no account, no network)",
    )
    serve.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    serve.add_argument("--log-format", choices=("text", "json"), default="text")
    add("check", "validate the config; exit 1 with the list of problems", cmd_check)

    keys = sub.add_parser("keys", help="manage the secrets in the encrypted store")
    ksub = keys.add_subparsers(dest="keys_command", metavar="COMMAND", parser_class=_Parser)
    ksub.required = True
    kadd = add(
        "add",
        "store an API key or client secret (value from a prompt or stdin)",
        cmd_keys_add,
        ksub,
    )
    kadd.add_argument("name")
    kadd.add_argument("--stdin", action="store_true", help="read the value from stdin")
    kadd.add_argument("--kind", choices=("api_key", "client_secret"), default="api_key")
    add("list", "names, kinds, fingerprints, dates (never values)", cmd_keys_list, ksub)
    krm = add("rm", "remove a secret", cmd_keys_rm, ksub)
    krm.add_argument("name")
    ktest = add(
        "test", "call the upstream's auth test endpoint with a stored key", cmd_keys_test, ksub
    )
    ktest.add_argument("name")
    ktest.add_argument("--upstream", required=True)

    add("rekey", "re-encrypt the store under a new master key", cmd_rekey)

    apps = sub.add_parser("apps", help="app tokens")
    asub = apps.add_subparsers(dest="apps_command", metavar="COMMAND", parser_class=_Parser)
    asub.required = True
    atoken = add(
        "token", "print a new token for an app defined in the config, once", cmd_apps_token, asub
    )
    atoken.add_argument("name")
    atoken.add_argument("--revoke", action="store_true", help="revoke every stored token")
    add("list", "apps, their scopes and token count", cmd_apps_list, asub)

    login = add("login", "OAuth authorization code + PKCE via a loopback redirect", cmd_login)
    login.add_argument("upstream")
    login.add_argument(
        "--no-browser",
        action="store_true",
        help="print the authorize URL alone on a line instead of opening a browser",
    )

    status = add("status", "ask the running daemon how it is", cmd_status)
    status.add_argument("--json", action="store_true", help="print the raw /status JSON")

    add(
        "doctor",
        "check the set-up end to end: config, key, store, listeners, upstreams",
        cmd_doctor,
    )

    sandbox = add("sandbox", "run the AImyChats-compatible sandbox upstream alone", cmd_sandbox)
    sandbox.add_argument("--host", default="127.0.0.1")
    sandbox.add_argument("--port", type=int, default=8443)
    sandbox.add_argument("--ca-out", metavar="PATH", help="write the sandbox CA here")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .config import ConfigError
    from .masterkey import MasterKeyError
    from .store import StoreError

    try:
        code: int = args.func(args)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_PROBLEM
    except (CliError, StoreError, MasterKeyError) as exc:
        _err(str(exc))
        return EXIT_PROBLEM
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
