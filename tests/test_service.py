"""Running credproxy as a service: sd_notify, the systemd units, the image and the compose example."""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import json
import logging
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

import proxy
from proxy.cli import build_parser
from proxy.config import load_config
from proxy.masterkey import CREDENTIAL_NAME
from proxy.notify import Notifier
from proxy.sandbox import Sandbox
from proxy.server import free_port
from tests.conftest import cli_env, run_cli, wait_ready

ROOT = Path(__file__).resolve().parent.parent
SYSTEM_UNIT = ROOT / "systemd" / "credproxy.service"
USER_UNIT = ROOT / "systemd" / "credproxy-user.service"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE = ROOT / "examples" / "compose.yaml"
SIDECAR_CONFIG = ROOT / "examples" / "sidecar.yaml"
DEPLOY_DOC = ROOT / "docs" / "DEPLOY.md"

# `systemd-analyze security --offline=true systemd/credproxy.service` must stay below this.
EXPOSURE_TARGET = 2.0

ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(
    ANALYZE is None,
    reason="systemd-analyze is not installed here (.ci/run installs Debian's systemd package)",
)


def console_script() -> Path:
    """The `credproxy` console script of the Python running the tests."""
    beside = Path(sys.executable).parent / "credproxy"
    if beside.exists():
        return beside
    found = shutil.which("credproxy")
    assert found, "the credproxy console script is not installed: pip install -e ."
    return Path(found)


# ---- sd_notify -----------------------------------------------------------------------------


@dataclass
class Receiver:
    """A fake systemd: a datagram socket that NOTIFY_SOCKET names."""

    address: str  # as in NOTIFY_SOCKET: a path, or @name for an abstract socket
    sock: socket.socket

    def next(self, timeout: float = 2.0) -> dict[str, str]:
        self.sock.settimeout(timeout)
        data = self.sock.recv(4096).decode()
        assert data.endswith("\n")
        return dict(line.split("=", 1) for line in data.splitlines())

    def nothing(self, timeout: float) -> bool:
        self.sock.settimeout(timeout)
        try:
            self.sock.recv(4096)
        except TimeoutError:
            return True
        return False


@pytest.fixture(params=["path", "abstract"])
def receiver(request: pytest.FixtureRequest) -> Iterator[Receiver]:
    """A bound AF_UNIX datagram socket: a file in a short temp dir, or an abstract name."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    tmp = tempfile.mkdtemp(prefix="cpx-notify-", dir="/tmp")
    try:
        if request.param == "path":
            address = os.path.join(tmp, "notify")
            sock.bind(address)
        else:
            name = f"credproxy-test-{secrets.token_hex(8)}"
            sock.bind("\0" + name)
            address = "@" + name
        yield Receiver(address, sock)
    finally:
        sock.close()
        shutil.rmtree(tmp)


def test_notifier_lifecycle_messages(receiver: Receiver) -> None:
    """READY (with STATUS and MAINPID), RELOADING with MONOTONIC_USEC, STATUS and STOPPING (+ EXTEND_TIMEOUT_USEC) arrive."""
    notifier = Notifier.from_env({"NOTIFY_SOCKET": receiver.address})
    assert notifier.enabled

    notifier.ready("serving 2 listeners")
    assert receiver.next() == {
        "READY": "1",
        "STATUS": "serving 2 listeners",
        "MAINPID": str(os.getpid()),
    }

    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    notifier.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    msg = receiver.next()
    assert msg["RELOADING"] == "1"
    assert before <= int(msg["MONOTONIC_USEC"]) <= after

    notifier.status("line one\nREADY=1")
    assert receiver.next() == {"STATUS": "line one READY=1"}  # one line, no injected field

    notifier.stopping()
    assert receiver.next() == {
        "STOPPING": "1",
        "STATUS": "stopping: draining requests in flight",
    }
    notifier.stopping(grace=120)
    assert receiver.next()["EXTEND_TIMEOUT_USEC"] == str(130 * 1_000_000)


async def test_notifier_watchdog_pings_while_healthy(receiver: Receiver) -> None:
    """WATCHDOG=1 goes out every WATCHDOG_USEC/2 while healthy() is true, and stops when it is not."""
    env = {"NOTIFY_SOCKET": receiver.address, "WATCHDOG_USEC": "100000"}
    notifier = Notifier.from_env(env)
    assert notifier.watchdog_interval() == pytest.approx(0.05)
    healthy = True
    task = asyncio.create_task(notifier.watchdog(lambda: healthy))
    try:
        for _ in range(3):
            msg = await asyncio.to_thread(receiver.next, 1.0)
            assert msg == {"WATCHDOG": "1"}
        healthy = False
        await asyncio.sleep(0.1)
        while not await asyncio.to_thread(receiver.nothing, 0.01):
            pass  # drain pings sent before the flag flipped
        assert await asyncio.to_thread(receiver.nothing, 0.3)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def test_watchdog_interval_from_env() -> None:
    """The interval is half of WATCHDOG_USEC, and only when WATCHDOG_PID (if set) is this process."""
    sock = {"NOTIFY_SOCKET": "/run/systemd/notify"}
    assert Notifier.from_env({**sock, "WATCHDOG_USEC": "30000000"}).watchdog_interval() == 15.0
    mine = {**sock, "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}
    assert Notifier.from_env(mine).watchdog_interval() == 15.0
    other = {**sock, "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}
    assert Notifier.from_env(other).watchdog_interval() is None
    assert Notifier.from_env({**sock, "WATCHDOG_USEC": "soon"}).watchdog_interval() is None
    assert Notifier.from_env({"WATCHDOG_USEC": "30000000"}).watchdog_interval() is None


async def test_notifier_is_a_no_op_without_systemd() -> None:
    """Without NOTIFY_SOCKET every call does nothing and the watchdog returns at once."""
    notifier = Notifier.from_env({})
    assert not notifier.enabled
    notifier.ready("x")
    notifier.reloading()
    notifier.status("x")
    notifier.stopping()
    await asyncio.wait_for(notifier.watchdog(lambda: True), 1)
    assert not Notifier.from_env({"NOTIFY_SOCKET": "vsock:2:1234"}).enabled


def test_notifier_send_failure_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    """A NOTIFY_SOCKET nobody listens on never raises; the failure is one warning, then debug."""
    caplog.set_level(logging.DEBUG, logger="credproxy.notify")
    notifier = Notifier.from_env({"NOTIFY_SOCKET": "/nonexistent/credproxy/notify"})
    notifier.ready("up")
    notifier.status("still up")
    notifier.stopping()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "could not notify systemd" in warnings[0].getMessage()


# ---- systemd units -------------------------------------------------------------------------


def unit_entries(path: Path) -> dict[str, list[str]]:
    """`Section.Key` -> values in order (a key may repeat, e.g. SystemCallFilter=)."""
    entries: dict[str, list[str]] = {}
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        entries.setdefault(f"{section}.{key}", []).append(value)
    return entries


def one(entries: dict[str, list[str]], key: str) -> str:
    values = entries.get(f"Service.{key}") or entries.get(key)
    assert values, f"{key} is not set"
    return values[-1]


def run_analyze(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    assert ANALYZE is not None
    full_env = {**os.environ, "SYSTEMD_COLORS": "0", "SYSTEMD_PAGER": "", **(env or {})}
    return subprocess.run(
        [ANALYZE, *args], capture_output=True, text=True, env=full_env, timeout=60, check=False
    )


def assert_verified(result: subprocess.CompletedProcess[str]) -> None:
    # verify exits 0 on unknown keys but prints them: any line naming our unit is a finding.
    findings = [line for line in result.stderr.splitlines() if "credproxy" in line]
    assert result.returncode == 0 and not findings, result.stderr


@needs_analyze
def test_system_unit_passes_verify(tmp_path: Path) -> None:
    """systemd-analyze verify accepts the system unit (ExecStart rendered to this credproxy)."""
    text = SYSTEM_UNIT.read_text()
    assert "ExecStart=/usr/local/bin/credproxy serve" in text
    rendered = tmp_path / "credproxy.service"
    rendered.write_text(text.replace("/usr/local/bin/credproxy", str(console_script())))
    assert_verified(run_analyze("verify", str(rendered)))


@needs_analyze
def test_user_unit_passes_verify(tmp_path: Path) -> None:
    """systemd-analyze --user verify accepts the user unit, with %h/.local/bin/credproxy present."""
    home = tmp_path / "home"
    (home / ".local" / "bin").mkdir(parents=True)
    (home / ".local" / "bin" / "credproxy").symlink_to(console_script())
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    unit = tmp_path / "credproxy.service"
    shutil.copy(USER_UNIT, unit)
    result = run_analyze(
        "--user", "verify", str(unit), env={"HOME": str(home), "XDG_RUNTIME_DIR": str(runtime)}
    )
    assert_verified(result)


@needs_analyze
def test_system_unit_security_exposure() -> None:
    """`systemd-analyze security --offline=true` rates the system unit below the target exposure."""
    result = run_analyze("security", "--offline=true", str(SYSTEM_UNIT))
    match = re.search(r"Overall exposure level for credproxy\.service: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) < EXPOSURE_TARGET, result.stdout


def test_system_unit_settings() -> None:
    """The system unit runs `serve` as a notify service under a dynamic user with the key as a credential."""
    unit = unit_entries(SYSTEM_UNIT)
    argv = shlex.split(one(unit, "ExecStart"))
    assert argv[0] == "/usr/local/bin/credproxy"
    args = build_parser().parse_args(argv[1:])
    assert (args.command, args.config, args.log_format) == (
        "serve",
        "/etc/credproxy/config.yaml",
        "json",
    )
    expected = {
        "Type": "notify",
        "ExecReload": "kill -HUP $MAINPID",
        "Restart": "on-failure",
        "DynamicUser": "yes",
        "StateDirectory": "credproxy",
        "StateDirectoryMode": "0700",
        "ConfigurationDirectory": "credproxy",
        "LoadCredential": f"{CREDENTIAL_NAME}:/etc/credproxy/master.key",
        "UMask": "0077",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "NoNewPrivileges": "yes",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
        "CapabilityBoundingSet": "",
        "MemoryDenyWriteExecute": "yes",
    }
    assert {key: one(unit, key) for key in expected} == expected
    assert unit["Service.SystemCallFilter"][0] == "@system-service"
    # the watchdog must outlast the drain-free parts of a reload, and stop must outlast the drain
    assert one(unit, "WatchdogSec") == "30s"
    assert one(unit, "TimeoutStopSec") == "45s"
    assert "LoadCredentialEncrypted" in SYSTEM_UNIT.read_text()  # mentioned for TPM/host-key use


def test_user_unit_settings() -> None:
    """The user unit runs the user's own credproxy with its default config and key paths."""
    unit = unit_entries(USER_UNIT)
    argv = shlex.split(one(unit, "ExecStart"))
    assert argv[0] == "%h/.local/bin/credproxy"
    args = build_parser().parse_args(argv[1:])
    assert args.command == "serve" and args.config is None  # ~/.config/credproxy/config.yaml
    assert one(unit, "Type") == "notify"
    assert one(unit, "WatchdogSec")
    assert "Service.LoadCredential" not in unit  # the key is ~/.config/credproxy/master.key
    assert "Service.DynamicUser" not in unit
    assert one(unit, "Install.WantedBy") == "default.target"


# ---- Dockerfile ----------------------------------------------------------------------------


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]


def dockerfile() -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults and the stages, with continuation lines joined and comments dropped."""
    args: dict[str, str] = {}
    stages: list[Stage] = []
    logical: list[str] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        logical.append(pending + stripped)
        pending = ""
    for line in logical:
        keyword, _, rest = line.partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "FROM":
            parts = rest.split()
            base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], parts[0])
            name = parts[2] if len(parts) > 2 and parts[1].upper() == "AS" else None
            stages.append(Stage(base, name))
        elif keyword == "ARG" and not stages:
            key, _, value = rest.partition("=")
            args[key] = value
        else:
            assert stages, f"{keyword} before FROM"
            stages[-1].instructions.append((keyword, rest))
    return args, stages


def env_of(stage: Stage) -> dict[str, str]:
    env: dict[str, str] = {}
    for args in stage.all("ENV"):
        for token in shlex.split(args):
            key, _, value = token.partition("=")
            env[key] = value
    return env


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value)
    return value


def test_dockerfile_builds_a_wheel_in_a_separate_stage() -> None:
    """Two stages on the official slim Python image; the first builds a wheel and a venv from the repo."""
    _args, stages = dockerfile()
    assert len(stages) >= 2
    for stage in stages:
        assert re.fullmatch(r"python:3\.1[1-9]-slim(-\w+)?", stage.base), stage.base
    build, final = stages[0], stages[-1]
    assert build.name
    run = " ".join(build.all("RUN"))
    assert "pip wheel" in run and " . " in f"{run} " and "--only-binary=:all:" in run
    assert "python -m venv" in run and "/opt/credproxy" in run
    copied = " ".join(build.all("COPY"))
    assert "pyproject.toml" in copied and "proxy" in copied
    assert final.all("COPY") == [f"--from={build.name} /opt/credproxy /opt/credproxy"]


def test_dockerfile_final_stage_is_lean_and_unprivileged() -> None:
    """The final stage has no compiler, package installs or caches, and runs as a non-root uid."""
    _args, stages = dockerfile()
    final = stages[-1]
    run = " ".join(final.all("RUN"))
    for banned in ("gcc", "build-essential", "apt-get", "pip ", "--mount=type=cache", "curl"):
        assert banned not in run, banned
    (user,) = final.all("USER")
    uid = user.split(":")[0]
    assert uid not in ("root", "0") and uid.isdigit() and int(uid) >= 1000


def test_dockerfile_runtime_contract() -> None:
    """Healthcheck on the admin /healthz with Python, key as a secret file, only documented ports."""
    _args, stages = dockerfile()
    final = stages[-1]
    env = env_of(final)
    assert env["CREDPROXY_MASTER_KEY_FILE"] == "/run/secrets/credproxy.key"
    assert env["CREDPROXY_CONFIG"] == "/etc/credproxy/config.yaml"
    assert env["CREDPROXY_HEALTHCHECK_URL"].endswith("/healthz")
    (health,) = final.all("HEALTHCHECK")
    options, _, command = health.partition("CMD ")
    assert "--timeout=" in options and "--interval=" in options
    argv = exec_form(command)
    assert argv[:2] == ["python", "-c"] and "CREDPROXY_HEALTHCHECK_URL" in argv[2]
    assert final.all("VOLUME") == ['["/var/lib/credproxy"]']
    exposed = {port for args in final.all("EXPOSE") for port in args.split()}
    assert exposed == {"8787"}
    docs = DEPLOY_DOC.read_text()
    assert all(port in docs for port in exposed)
    entry = exec_form(final.all("ENTRYPOINT")[0])
    command_args = exec_form(final.all("CMD")[0])
    assert entry == ["credproxy"]
    assert build_parser().parse_args(command_args).command == "serve"


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint is not installed")
def test_dockerfile_passes_hadolint() -> None:
    """hadolint (the Dockerfile linter) finds nothing to complain about."""
    result = subprocess.run(
        ["hadolint", str(DOCKERFILE)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerignore_sends_only_the_package() -> None:
    """The build context is the package and its metadata alone: no .git, tests, keys or stores."""
    lines = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*"
    included = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert included == {"pyproject.toml", "README.md", "proxy"}
    assert {"**/*.key", "**/*.db"} <= set(lines)
    _args, stages = dockerfile()
    for copy in stages[0].all("COPY"):
        sources = copy.split()[:-1]
        assert all(source.rstrip("/") in included for source in sources), copy


# ---- compose example -----------------------------------------------------------------------


def test_compose_wires_the_app_to_the_sidecar() -> None:
    """The app reaches the sidecar by service name from an address the sidecar config allows."""
    doc = yaml.safe_load(COMPOSE.read_text())
    services = doc["services"]
    sidecar, app = services["credproxy"], services["app"]
    assert sidecar["build"]["context"] == ".." and (COMPOSE.parent / "..").resolve() == ROOT
    assert "ports" not in sidecar  # nothing published on the host
    assert app["environment"]["AIMYCHATS_BASE_URL"] == "http://credproxy:8787/aimychats"
    assert app["depends_on"]["credproxy"]["condition"] == "service_healthy"
    # the key: a Docker secret, mounted in the sidecar only, where the image looks for it
    assert "credproxy.key" in sidecar["secrets"]
    assert "credproxy.key" not in app.get("secrets", [])
    assert doc["secrets"]["credproxy.key"]["file"] == "./secrets/credproxy.key"
    assert sidecar["environment"]["CREDPROXY_MASTER_KEY_FILE"] == "/run/secrets/credproxy.key"
    assert "app_token" in app["secrets"]
    mounts = {m.split(":")[1]: m for m in sidecar["volumes"]}
    assert mounts["/etc/credproxy/config.yaml"] == "./sidecar.yaml:/etc/credproxy/config.yaml:ro"
    assert sidecar["environment"]["CREDPROXY_CONFIG"] == "/etc/credproxy/config.yaml"
    assert "/var/lib/credproxy" in mounts
    assert sidecar["read_only"] is True and sidecar["cap_drop"] == ["ALL"]
    # the app's fixed address is the one the sidecar config lets in
    env = {"APP_TOKEN_SHA256": "0" * 64, "HOME": "/nonexistent"}
    config = load_config(SIDECAR_CONFIG, env)
    app_ip = app["networks"]["appnet"]["ipv4_address"]
    allowed = config.apps["app"].allow_from
    assert any(ipaddress.ip_address(app_ip) in net for net in allowed)
    assert str(config.listen[0]) == "0.0.0.0:8787"
    assert config.admin_listen.is_loopback()


def test_sidecar_config_passes_check(tmp_path: Path) -> None:
    """`credproxy check` accepts the sidecar config, and refuses it once allow_from is dropped."""
    digest = hashlib.sha256(b"cpx_" + secrets.token_urlsafe(32).encode()).hexdigest()
    env = cli_env(tmp_path, APP_TOKEN_SHA256=digest)
    result = run_cli("check", "--config", str(SIDECAR_CONFIG), env=env)
    assert result.returncode == 0, result.stderr
    open_doc = yaml.safe_load(SIDECAR_CONFIG.read_text())
    del open_doc["apps"]["app"]["allow_from"]
    exposed = tmp_path / "exposed.yaml"
    exposed.write_text(yaml.safe_dump(open_doc))
    refused = run_cli("check", "--config", str(exposed), env=env)
    assert refused.returncode == 1
    assert "allow_from" in refused.stderr


# ---- the image's command, run the way the container runs it --------------------------------


def container_paths(tmp_path: Path) -> dict[str, Path]:
    return {
        "/etc/credproxy": tmp_path / "etc",
        "/run/secrets": tmp_path / "secrets",
        "/var/lib/credproxy": tmp_path / "data",
    }


def to_host(value: str, paths: dict[str, Path]) -> str:
    for inside, outside in paths.items():
        if value.startswith(inside + "/"):
            return str(outside) + value[len(inside) :]
    return value


async def test_image_command_serves_and_stops_cleanly(tmp_path: Path) -> None:
    """ENTRYPOINT+CMD with the image's env and the compose config: ready, healthy, proxies, exits 0 on SIGTERM."""
    _args, stages = dockerfile()
    final = stages[-1]
    paths = container_paths(tmp_path)
    for directory in paths.values():
        directory.mkdir(mode=0o700)
    image_env = {k: to_host(v, paths) for k, v in env_of(final).items() if k != "PATH"}
    token = "cpx_" + secrets.token_urlsafe(32)
    env = cli_env(
        tmp_path / "home",
        **image_env,
        APP_TOKEN_SHA256=hashlib.sha256(token.encode()).hexdigest(),
    )
    # the key as the docs make it: `openssl rand -hex 32 > secrets/credproxy.key`, mode 0600
    key = Path(env["CREDPROXY_MASTER_KEY_FILE"])
    key.write_text(secrets.token_hex(32) + "\n")
    key.chmod(0o600)

    async with Sandbox() as sandbox:
        doc = yaml.safe_load(SIDECAR_CONFIG.read_text())
        port, admin = free_port(), free_port()
        doc["listen"] = f"127.0.0.1:{port}"
        doc["admin_listen"] = f"127.0.0.1:{admin}"
        doc["store"] = to_host(doc["store"], paths)
        doc["apps"]["app"]["allow_from"] = ["127.0.0.1/32"]
        upstream = doc["upstreams"]["aimychats"]
        upstream["base_url"] = sandbox.base_url
        upstream["ca_bundle"] = str(sandbox.write_ca(tmp_path / "ca.pem"))
        config = Path(env["CREDPROXY_CONFIG"])
        config.write_text(yaml.safe_dump(doc, sort_keys=False))
        config.chmod(0o644)  # a read-only mount of a normal file
        for args, stdin in (
            (["init"], None),
            (["keys", "add", "aimychats-read", "--stdin"], sandbox.new_key(["read"])),
        ):
            result = await asyncio.to_thread(run_cli, *args, env=env, stdin=stdin)
            assert result.returncode == 0, result.stderr

        argv = [str(console_script()), *exec_form(final.all("CMD")[0])]
        assert exec_form(final.all("ENTRYPOINT")[0]) == ["credproxy"]
        log_path = tmp_path / "stderr.log"
        with open(log_path, "wb") as log_file:
            proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=log_file)
            try:
                await asyncio.to_thread(wait_ready, proc, f"http://127.0.0.1:{admin}", log_path)
                # the HEALTHCHECK command, with a proxy set that it must ignore
                health = exec_form(final.all("HEALTHCHECK")[0].partition("CMD ")[2])
                health_env = {
                    **env,
                    "CREDPROXY_HEALTHCHECK_URL": f"http://127.0.0.1:{admin}/healthz",
                    "http_proxy": "http://127.0.0.1:9",
                    "HTTP_PROXY": "http://127.0.0.1:9",
                }
                assert health[0] == "python"
                checked = await asyncio.to_thread(
                    subprocess.run,
                    [sys.executable, *health[1:]],
                    env=health_env,
                    capture_output=True,
                    timeout=10,
                )
                assert checked.returncode == 0, checked.stderr
                async with (
                    aiohttp.ClientSession(trust_env=False) as session,
                    session.get(
                        f"http://127.0.0.1:{port}/aimychats/auth/test",
                        headers={"Authorization": f"Bearer {token}"},
                    ) as resp,
                ):
                    assert resp.status == 200, await resp.text()
                    assert (await resp.json())["scopes"] == ["read"]
                proc.send_signal(signal.SIGTERM)
                code = await asyncio.to_thread(proc.wait, 15)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    log = log_path.read_text()
    assert code == 0, log
    assert "Traceback" not in log
    records = [json.loads(line) for line in log.splitlines() if line.strip()]
    assert records and all(isinstance(r, dict) for r in records)  # --log-format json
    assert token not in log


# ---- MemoryDenyWriteExecute ------------------------------------------------------------------

# Set the kernel's Memory-Deny-Write-Execute (Linux 6.3+; recent systemd applies it for
# MemoryDenyWriteExecute=yes, older releases an equivalent seccomp filter), then exec the
# daemon; exit 3 if the kernel lacks it. It is inherited across execve.
_MDWE_EXEC = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(65, 1, 0, 0, 0) != 0 or libc.prctl(66, 0, 0, 0, 0) != 1:
    sys.exit(3)
os.execv(sys.executable, [sys.executable, "-m", "proxy", *sys.argv[1:]])
"""


def test_daemon_runs_under_memory_deny_write_execute(tmp_path: Path) -> None:
    """`serve --sandbox` under PR_SET_MDWE serves a real TLS, AES-GCM, aiohttp round trip."""
    probe = subprocess.run(
        [sys.executable, "-c", _MDWE_EXEC, "--version"], capture_output=True, timeout=30
    )
    if probe.returncode == 3:
        pytest.skip("this kernel has no PR_SET_MDWE (Linux 6.3+)")
    assert probe.returncode == 0, probe.stderr
    config = tmp_path / "sandbox" / "config.yaml"
    config.parent.mkdir(mode=0o700)
    admin = free_port()
    config.write_text(f"listen: 127.0.0.1:{free_port()}\nadmin_listen: 127.0.0.1:{admin}\n")
    env = cli_env(tmp_path / "home")
    proc = subprocess.Popen(
        [sys.executable, "-c", _MDWE_EXEC, "serve", "--sandbox", "--config", str(config)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        curl = ""
        deadline = time.monotonic() + 30
        while not curl and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            if line.strip().startswith("curl "):
                curl = line.strip()
        assert curl, proc.stderr.read() if proc.stderr else ""
        words = shlex.split(curl)
        auth = words[words.index("-H") + 1]
        url = words[-1]
        assert url.startswith("http://127.0.0.1:")
        wait_ready(proc, f"http://127.0.0.1:{admin}")  # printed just before the listeners open
        request = urllib.request.Request(url, headers=dict([auth.split(": ", 1)]))  # noqa: S310
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(request, timeout=10) as resp:
            assert resp.status == 200
            body: dict[str, Any] = json.loads(resp.read())
        assert body["scopes"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


# ---- once the daemon is wired to Notifier ----------------------------------------------------

_SERVE_SOURCES = (
    Path(proxy.__file__).parent / "serve.py",
    Path(proxy.__file__).parent / "server.py",
)
NOTIFY_WIRED = any("Notifier" in path.read_text() for path in _SERVE_SOURCES)


@pytest.mark.skipif(not NOTIFY_WIRED, reason="serve does not use proxy.notify.Notifier yet")
def test_serve_notifies_systemd(tmp_path: Path) -> None:
    """`credproxy serve` sends READY=1 (from its own pid), WATCHDOG=1, RELOADING/READY on SIGHUP, STOPPING."""
    home = tmp_path / "home"
    env = cli_env(home)
    config = home / ".config" / "credproxy" / "config.yaml"
    config.parent.mkdir(parents=True, mode=0o700)
    admin = free_port()
    store = home / "data" / "store.db"
    config.write_text(
        f"listen: 127.0.0.1:{free_port()}\nadmin_listen: 127.0.0.1:{admin}\nstore: {store}\n"
        "upstreams:\n  u:\n    base_url: https://127.0.0.1:1/v1\n"
        "    credentials: [{name: k, scopes: [read]}]\n"
        "apps:\n  a:\n    upstreams: {u: {scopes: [read]}}\n"
    )
    config.chmod(0o600)
    assert run_cli("init", env=env).returncode == 0
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    name = f"credproxy-test-{secrets.token_hex(8)}"
    sock.bind("\0" + name)
    receiver = Receiver("@" + name, sock)
    env.update(NOTIFY_SOCKET="@" + name, WATCHDOG_USEC="400000")
    proc = subprocess.Popen(
        [str(console_script()), "serve"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:

        def until(field_name: str) -> dict[str, str]:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                msg = receiver.next(timeout=20)
                if field_name in msg:
                    return msg
            raise AssertionError(f"no {field_name}")

        ready = until("READY")
        assert ready["MAINPID"] == str(proc.pid)
        until("WATCHDOG")
        proc.send_signal(signal.SIGHUP)
        assert "MONOTONIC_USEC" in until("RELOADING")
        until("READY")
        proc.send_signal(signal.SIGTERM)
        until("STOPPING")
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()
        sock.close()
