"""`credproxy doctor`: check a set-up end to end and print a checklist of what to fix.

It loads the config, opens the store with the master key (saying where the key
came from), checks file modes, the credentials the config names, whether each
listener can be bound, and reaches every upstream (DNS, TCP, verified TLS, then
the auth test with the least-privileged key), each network step bounded in time.
It must never print a secret: values are only ever sent to their own upstream,
and any that an upstream echoes back is masked before a line is written.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import shlex
import socket
import ssl
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TextIO
from urllib.parse import urlsplit

import aiohttp

from .config import Config, ConfigError, ListenAddress, UpstreamConfig, default_config_path
from .config import load_config as _load_config
from .forward import make_ssl_context
from .hardening import file_mode_problems
from .keytest import auth_test
from .masterkey import (
    CREDENTIAL_NAME,
    ENV_CREDENTIALS_DIR,
    ENV_KEY_FILE,
    ENV_PASSPHRASE,
    MasterKey,
    MasterKeyError,
    default_key_file,
    load_key_file,
    resolve_master_key,
)
from .oauth import access_name, refresh_name
from .secret import Secret
from .store import Store, StoreError

NETWORK_TIMEOUT = 5.0  # seconds for each DNS lookup, connection, handshake and auth test

Level = Literal["ok", "warn", "FAIL"]


@dataclass(frozen=True)
class Check:
    """One line of the checklist: how it went, what was checked, and what to do."""

    level: Level
    subject: str
    message: str
    details: tuple[str, ...] = ()


class _Report:
    """Writes checks as they come, masking every secret value the doctor has handled."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.checks: list[Check] = []
        self._secrets: set[str] = set()

    def handled(self, secret: Secret) -> None:
        value = secret.reveal()
        if value:
            self._secrets.add(value)

    def _mask(self, text: str) -> str:
        for value in sorted(self._secrets, key=len, reverse=True):
            text = text.replace(value, "***")
        return text

    def add(self, check: Check) -> None:
        self.checks.append(check)
        self.out.write(self._mask(f"{check.level:<4}  {check.subject}: {check.message}") + "\n")
        for detail in check.details:
            self.out.write(self._mask(f"        {detail}") + "\n")
        self.out.flush()

    def ok(self, subject: str, message: str) -> None:
        self.add(Check("ok", subject, message))

    def warn(self, subject: str, message: str) -> None:
        self.add(Check("warn", subject, message))

    def fail(self, subject: str, message: str, details: tuple[str, ...] = ()) -> None:
        self.add(Check("FAIL", subject, message, details))

    def count(self, level: Level) -> int:
        return sum(1 for c in self.checks if c.level == level)


@dataclass
class _Opened:
    """What the store step learned, for the credential and auth-test steps."""

    entries: dict[str, tuple[str, Secret]]  # name -> (kind, value), read once, never printed


async def run_doctor(
    config_path: Path | None,
    env: Mapping[str, str],
    out: TextIO,
    *,
    timeout: float = NETWORK_TIMEOUT,
    prompt: Callable[[str], str] | None = None,
) -> int:
    """Run every check, print one line each to `out`; 0 when nothing FAILed, else 1.

    `env` stands for the daemon's environment (master key sources, `${VAR}` in the
    config, HOME); `prompt` asks for a passphrase when the store needs one and none
    is in `env` (None: never ask).
    """
    report = _Report(out)
    path = config_path if config_path is not None else default_config_path(env)
    out.write(f"credproxy doctor: checking {path}\n")

    config = _check_config(report, path, env)
    if config is None:
        return _finish(report)
    opened = _check_key_and_store(report, config, env, prompt)
    _check_file_modes(report, config)
    _check_credentials(report, config, opened)
    await _check_listeners(report, config, timeout)
    await _check_upstreams(report, config, opened, timeout)
    return _finish(report)


def _finish(report: _Report) -> int:
    fails, warns = report.count("FAIL"), report.count("warn")
    if fails:
        report.out.write(
            f"\n{fails} FAIL, {warns} warn: fix the FAIL lines above, then run "
            "`credproxy doctor` again\n"
        )
        return 1
    tail = f" ({warns} warn: worth a look)" if warns else ""
    report.out.write(f"\nall checks passed{tail}\n")
    return 0


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


# ---- config --------------------------------------------------------------------------------


def _check_config(report: _Report, path: Path, env: Mapping[str, str]) -> Config | None:
    try:
        config = _load_config(path, env)
    except ConfigError as exc:
        problems = tuple(str(p) for p in exc.problems)
        count = _plural(len(problems), "problem")
        report.fail("config", f"{path} cannot be used ({count}); fix it:", problems)
        return None
    report.ok(
        "config",
        f"{path} loads ({_plural(len(config.upstreams), 'upstream')}, "
        f"{_plural(len(config.apps), 'app')})",
    )
    return config


# ---- master key and store ------------------------------------------------------------------


def _key_file_in_use(env: Mapping[str, str]) -> Path | None:
    """The key file resolve_master_key would read, when the key comes from one we check."""
    named = env.get(ENV_KEY_FILE)
    if named:
        return Path(named).expanduser()
    cred_dir = env.get(ENV_CREDENTIALS_DIR)
    if cred_dir and (Path(cred_dir) / CREDENTIAL_NAME).exists():
        return None  # a systemd credential: systemd owns the file and its mode
    if env.get(ENV_PASSPHRASE):
        return None
    fallback = default_key_file({k: v for k, v in env.items() if k != ENV_KEY_FILE})
    return fallback if fallback.exists() else None


def _check_key_file(report: _Report, key_file: Path, store_path: Path) -> bool:
    """Mode and place of the key file; True when its mode is too open (and was reported)."""
    try:
        info = key_file.stat()
    except OSError:
        return False  # resolving the key says why it cannot be read
    mode = stat.S_IMODE(info.st_mode)
    quoted = shlex.quote(str(key_file))
    if mode & 0o077:
        report.fail(
            "key file",
            f"{key_file} is open to other users (mode {mode:04o}): run `chmod 600 {quoted}`",
        )
        return True
    if key_file.resolve().parent == store_path.resolve().parent:
        report.warn(
            "key file",
            f"{key_file} sits beside the store, so a copy of the data directory holds "
            "the key too: keep it elsewhere and point CREDPROXY_MASTER_KEY_FILE at it",
        )
    else:
        report.ok("key file", f"{key_file} (mode {mode:04o}, apart from the store)")
    return False


def _check_key_and_store(
    report: _Report,
    config: Config,
    env: Mapping[str, str],
    prompt: Callable[[str], str] | None,
) -> _Opened | None:
    store_path = config.store
    kdf = None
    store_ok = True
    if not store_path.exists():
        report.fail(
            "store",
            f"no store at {store_path}: run `credproxy init` (or fix `store:` in the config)",
        )
        store_ok = False
    else:
        try:
            kdf = Store.read_kdf_params(store_path)
        except StoreError as exc:
            report.fail("store", str(exc))
            store_ok = False

    key_file = _key_file_in_use(env)
    loose = key_file is not None and _check_key_file(report, key_file, store_path)
    master: MasterKey | None = None
    try:
        if loose and key_file is not None:
            # Reported above; read it anyway so the checks below still run.
            master = load_key_file(key_file, check_mode=False)
        else:
            master = resolve_master_key(env, kdf_params=kdf, prompt=prompt)
    except MasterKeyError as exc:
        report.fail("master key", str(exc))
    if master is not None and not store_ok:
        report.ok("master key", f"found ({master.source})")
    if master is None or not store_ok:
        return None
    try:
        with Store.open(store_path, master) as store:
            entries: dict[str, tuple[str, Secret]] = {}
            for info in store.info():
                entry = store.get_entry(info.name)
                if entry is not None:
                    entries[info.name] = entry
                    report.handled(entry[1])
    except StoreError as exc:
        report.fail("store", str(exc))
        return None
    report.ok(
        "store",
        f"{store_path} opens with the master key from {master.source} "
        f"({_plural(len(entries), 'secret')})",
    )
    return _Opened(entries)


def _check_file_modes(report: _Report, config: Config) -> None:
    problems = file_mode_problems(config.source, config.store)
    for problem in problems:
        report.fail("file modes", problem)
    if not problems:
        report.ok("file modes", "config not writable by others, store private to its owner")


# ---- credentials ---------------------------------------------------------------------------


def _check_credentials(report: _Report, config: Config, opened: _Opened | None) -> None:
    if opened is None:
        report.warn("credentials", "not checked: the store could not be opened")
        return
    stored = opened.entries
    for name, upstream in config.upstreams.items():
        for ref in upstream.credentials:
            subject = f"credential {name}/{ref.name}"
            scopes = ",".join(sorted(ref.scopes))
            entry = stored.get(ref.name)
            if entry is None:
                report.fail(
                    subject,
                    f"not in the store: add it with `credproxy keys add {ref.name}`",
                )
            elif entry[0] != "api_key":
                report.warn(
                    subject,
                    f"stored as {entry[0]}, not api_key: re-add it with "
                    f"`credproxy keys add {ref.name}`",
                )
            else:
                report.ok(subject, f"in the store (scopes {scopes}, {entry[1].fingerprint()})")
        if upstream.oauth is not None:
            _check_oauth(report, name, upstream, stored)


def _check_oauth(
    report: _Report,
    name: str,
    upstream: UpstreamConfig,
    stored: Mapping[str, tuple[str, Secret]],
) -> None:
    oauth = upstream.oauth
    assert oauth is not None
    subject = f"oauth {name}"
    secret = oauth.client_secret
    if secret is not None and secret not in stored:
        report.fail(
            subject,
            f"client secret '{secret}' is not in the store: add it with "
            f"`credproxy keys add {secret} --kind client_secret`",
        )
        return
    if oauth.grant == "client_credentials":
        report.ok(subject, "client_credentials: client secret stored, tokens fetched as needed")
    elif refresh_name(name) in stored:
        report.ok(subject, "logged in: refresh token stored")
    elif access_name(name) in stored:
        report.warn(
            subject,
            f"an access token but no refresh token is stored: run `credproxy login {name}` "
            "before it expires",
        )
    else:
        report.fail(subject, f"not logged in: run `credproxy login {name}`")


# ---- listeners -----------------------------------------------------------------------------


class _RunningDaemon:
    """What the admin listener of a running credproxy says, asked at most once."""

    def __init__(self, address: ListenAddress, timeout: float) -> None:
        self.address = address
        self.timeout = timeout
        self._asked = False
        self.alive = False
        self.status: dict[str, Any] | None = None

    async def ask(self) -> None:
        if self._asked:
            return
        self._asked = True
        try:
            health = await _admin_get(self.address, "/healthz", self.timeout)
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError):
            return
        self.alive = isinstance(health, dict) and health.get("status") == "alive"
        if self.alive:
            with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError, ValueError):
                status = await _admin_get(self.address, "/status", self.timeout)
                if isinstance(status, dict):
                    self.status = status

    @property
    def who(self) -> str:
        pid = self.status.get("pid") if self.status else None
        return f"the running credproxy (pid {pid})" if pid else "a running credproxy"

    def holds(self, key: str) -> bool:
        listeners = self.status.get("listeners") if self.status else None
        return isinstance(listeners, list) and key in listeners


async def _admin_get(address: ListenAddress, path: str, timeout: float) -> Any:
    if address.kind == "unix":
        connector: aiohttp.BaseConnector = aiohttp.UnixConnector(path=str(address.path))
        url = f"http://localhost{path}"
    else:
        connector = aiohttp.TCPConnector()
        url = f"http://{address}{path}"
    async with (
        aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=timeout), trust_env=False
        ) as session,
        session.get(url) as resp,
    ):
        if resp.status != 200:
            raise ValueError(f"status {resp.status}")
        return json.loads(await resp.read())


def _planned_listeners(config: Config) -> list[tuple[str, ListenAddress]]:
    planned: list[tuple[str, ListenAddress]] = [("listen", a) for a in config.listen]
    for name, upstream in config.upstreams.items():
        if upstream.listen is not None:
            planned.append((f"upstreams.{name}.listen", upstream.listen))
    planned.append(("admin_listen", config.admin_listen))
    return planned


async def _check_listeners(report: _Report, config: Config, timeout: float) -> None:
    running = _RunningDaemon(config.admin_listen, timeout)
    for label, address in _planned_listeners(config):
        subject = f"{label} {address}"
        if address.kind == "unix":
            problem = await _unix_problem(address, timeout)
        else:
            problem = await _tcp_problem(address, timeout)
        if problem is None:
            if address.kind == "tcp" and address.port == 0:
                report.ok(subject, "the OS picks a free port at start")
            else:
                report.ok(subject, "free: the daemon can listen here")
            continue
        kind, why = problem
        if kind != "in_use":
            report.fail(subject, why)
            continue
        await running.ask()
        if running.alive and (label == "admin_listen" or running.holds(str(address))):
            report.ok(subject, f"in use by {running.who}")
        elif running.alive:
            report.fail(
                subject,
                f"in use, but not by {running.who} on {config.admin_listen}: stop the other "
                "program or change the address in the config",
            )
        else:
            report.fail(
                subject,
                "in use by another program (no credproxy answers on "
                f"{config.admin_listen}): stop it or change the address in the config",
            )


async def _tcp_problem(address: ListenAddress, timeout: float) -> tuple[str, str] | None:
    """None if every address the host resolves to can be bound, else (kind, message)."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout):
            infos = await loop.getaddrinfo(
                address.host,
                address.port,
                type=socket.SOCK_STREAM,
                flags=socket.AI_PASSIVE,
            )
    except (socket.gaierror, TimeoutError) as exc:
        why = getattr(exc, "strerror", None) or "no answer in time"
        return "error", f"cannot resolve {address.host} ({why}): use an IP address"
    for family, type_, proto, _name, sockaddr in infos:
        try:
            with socket.socket(family, type_, proto) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(sockaddr)
        except OSError as exc:
            return _bind_problem(exc)
    return None


def _bind_problem(exc: OSError) -> tuple[str, str]:
    if exc.errno == errno.EADDRINUSE:
        return "in_use", "in use"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "error", "permission denied: use a port above 1023 or run with the right to bind it"
    if exc.errno == errno.EADDRNOTAVAIL:
        return "error", "this machine has no such address: use 127.0.0.1 or one of its addresses"
    return "error", f"cannot bind ({exc.strerror or type(exc).__name__}): check the address"


async def _unix_problem(address: ListenAddress, timeout: float) -> tuple[str, str] | None:
    assert address.path is not None
    path = Path(address.path)
    if path.is_socket():
        try:
            async with asyncio.timeout(timeout):
                _reader, writer = await asyncio.open_unix_connection(str(path))
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        except (OSError, TimeoutError):
            return None  # a stale socket: the daemon replaces it at start
        return "in_use", "in use"
    if path.exists() or path.is_symlink():
        return "error", f"{path} exists and is not a socket: move it away or change the path"
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        return "error", f"cannot create the socket: {parent} is not writable by this user"
    return None


# ---- upstreams -----------------------------------------------------------------------------


async def _check_upstreams(
    report: _Report, config: Config, opened: _Opened | None, timeout: float
) -> None:
    names = list(config.upstreams)
    results = await asyncio.gather(
        *(_upstream_checks(n, config.upstreams[n], opened, timeout) for n in names),
        return_exceptions=True,
    )
    for name, checks in zip(names, results, strict=True):
        if isinstance(checks, BaseException):
            if not isinstance(checks, Exception):
                raise checks
            # A bug here must not hide the other checks; the type alone says enough.
            report.fail(f"upstream {name}", f"check stopped by {type(checks).__name__}")
            continue
        for check in checks:
            report.add(check)


async def _upstream_checks(
    name: str, upstream: UpstreamConfig, opened: _Opened | None, timeout: float
) -> list[Check]:
    subject = f"upstream {name}"
    checks = [await _tls_check(subject, upstream.host, upstream.port, upstream, timeout)]
    oauth = upstream.oauth
    if oauth is not None:
        token = urlsplit(oauth.token_url)
        where = (token.hostname or "", token.port or 443)
        if where != (upstream.host, upstream.port):
            checks.append(await _tls_check(f"oauth {name} token_url", *where, upstream, timeout))
    auth_subject = f"upstream {name} auth test"
    if checks[0].level == "FAIL":
        checks.append(Check("warn", auth_subject, "not run: the upstream cannot be reached"))
        return checks
    checks.append(await _auth_check(auth_subject, upstream, opened, timeout))
    return checks


async def _tls_check(
    subject: str, host: str, port: int, upstream: UpstreamConfig, timeout: float
) -> Check:
    """DNS, TCP and a TLS handshake verified exactly as the daemon verifies it."""
    trust = "system CAs" + (f" + ca_bundle {upstream.ca_bundle}" if upstream.ca_bundle else "")
    try:
        context = make_ssl_context(upstream.ca_bundle)
    except (OSError, ssl.SSLError) as exc:
        why = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or "unreadable"
        return Check(
            "FAIL",
            subject,
            f"ca_bundle {upstream.ca_bundle} is not a readable PEM CA file ({why}): "
            "point ca_bundle at the CA certificate that signed the upstream's certificate",
        )
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout):
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except TimeoutError:
        return Check("FAIL", subject, f"DNS lookup of {host} took over {timeout:g}s: check DNS")
    except socket.gaierror as exc:
        return Check(
            "FAIL",
            subject,
            f"cannot resolve {host} ({exc.strerror}): check base_url and this machine's DNS",
        )
    addresses = sorted({str(info[4][0]) for info in infos})
    where = f"{host}:{port}"
    try:
        async with asyncio.timeout(timeout):
            _reader, writer = await asyncio.open_connection(
                host, port, ssl=context, server_hostname=host
            )
    except TimeoutError:
        return Check(
            "FAIL",
            subject,
            f"{where} did not answer within {timeout:g}s: check firewalls and that the "
            "upstream is up",
        )
    except ssl.SSLCertVerificationError as exc:
        return Check("FAIL", subject, _certificate_problem(where, exc, upstream, trust))
    except ssl.SSLError as exc:
        return Check(
            "FAIL",
            subject,
            f"TLS handshake with {where} failed ({exc.reason or 'error'}): is it an HTTPS port?",
        )
    except OSError as exc:
        return Check(
            "FAIL",
            subject,
            f"cannot connect to {where} ({exc.strerror or type(exc).__name__}): check base_url "
            "and that the upstream is up",
        )
    ssl_object = writer.get_extra_info("ssl_object")
    version = ssl_object.version() if ssl_object is not None else "TLS"
    writer.close()
    with contextlib.suppress(OSError, TimeoutError, ssl.SSLError):
        async with asyncio.timeout(1):
            await writer.wait_closed()
    return Check(
        "ok",
        subject,
        f"{where} resolves ({', '.join(addresses[:3])}), connects, {version} verified "
        f"against {trust}",
    )


def _certificate_problem(
    where: str, exc: ssl.SSLCertVerificationError, upstream: UpstreamConfig, trust: str
) -> str:
    why = exc.verify_message or exc.reason or "verification failed"
    if "hostname" in why.lower() or "ip address mismatch" in why.lower():
        fix = "the certificate does not name this host: check the host in base_url"
    elif upstream.ca_bundle is not None:
        fix = (
            f"ca_bundle {upstream.ca_bundle} does not hold the CA that signed it: "
            "point ca_bundle at the right CA file"
        )
    else:
        fix = "for a private upstream, set ca_bundle to the CA file that signed it"
    return f"TLS certificate of {where} not trusted by {trust} ({why}): {fix}"


def _least_privileged(
    upstream: UpstreamConfig, opened: _Opened
) -> tuple[str, frozenset[str], Secret] | None:
    found = [
        (ref.name, frozenset(ref.scopes), opened.entries[ref.name][1])
        for ref in upstream.credentials
        if ref.name in opened.entries
    ]
    if not found:
        return None
    return min(found, key=lambda item: len(item[1]))


async def _auth_check(
    subject: str, upstream: UpstreamConfig, opened: _Opened | None, timeout: float
) -> Check:
    if opened is None:
        return Check("warn", subject, "not run: the store could not be opened")
    chosen = _least_privileged(upstream, opened)
    if chosen is None:
        what = "only OAuth is configured" if upstream.credentials == () else "no key is stored"
        return Check(
            "warn", subject, f"not run: {what} (it needs a stored API key from the config)"
        )
    name, scopes, secret = chosen
    url = f"{upstream.base_url}/auth/test"
    try:
        async with asyncio.timeout(timeout):
            status, summary = await auth_test(upstream, secret)
    except TimeoutError:
        return Check("FAIL", subject, f"{url} did not answer within {timeout:g}s")
    summary = summary.replace(secret.reveal(), "***") if secret.reveal() else summary
    said = f"GET {url} with {name} ({','.join(sorted(scopes))}) -> {status}: {summary}"
    if 200 <= status < 300:
        return Check("ok", subject, said)
    if status in (401, 403):
        return Check(
            "FAIL",
            subject,
            f"{said}; the upstream refuses the key: store a valid one with "
            f"`credproxy keys add {name}`",
        )
    if status in (404, 405):
        return Check(
            "warn", subject, f"{said}; this API has no auth test endpoint, key not checked"
        )
    if status == 429:
        return Check("warn", subject, f"{said}; rate limited now, try again later")
    if status >= 500 and status not in (502, 504):
        return Check("warn", subject, f"{said}; the upstream has trouble, try again later")
    return Check("FAIL", subject, said)
