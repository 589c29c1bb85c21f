"""End to end, as a user runs it: `serve --sandbox`, and a whole debug session grepped for secrets."""

from __future__ import annotations

import asyncio
import json
import re
import shlex
import subprocess
import time
from pathlib import Path

import aiohttp
import pytest
import yaml

from proxy.sandbox import Sandbox
from proxy.server import free_port
from tests.conftest import DaemonProcess, cli_env, run_cli, write_config


def _read_curl_line(proc: subprocess.Popen[bytes], timeout: float = 30) -> str:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline().decode()
        if not line:
            break
        if line.strip().startswith("curl "):
            return line.strip()
    raise AssertionError("serve --sandbox printed no curl line")


async def test_serve_sandbox_curl_line_works(
    tmp_path: Path, daemon_procs: list[DaemonProcess]
) -> None:
    """`serve --sandbox` prints a curl line that, run as printed, authenticates against the sandbox."""
    home = tmp_path / "home"
    home.mkdir()
    env = cli_env(home)
    cfg = tmp_path / "sb" / "config.yaml"
    cfg.parent.mkdir()
    admin = f"127.0.0.1:{free_port()}"
    write_config(cfg, {"listen": f"127.0.0.1:{free_port()}", "admin_listen": admin})
    proc = DaemonProcess(["serve", "--sandbox", "--config", str(cfg)], env, tmp_path / "sb.log")
    daemon_procs.append(proc)
    line = await asyncio.to_thread(_read_curl_line, proc.proc)
    await asyncio.to_thread(proc.wait_ready, f"http://{admin}")
    argv = shlex.split(line)
    curl = subprocess.run(["which", "curl"], capture_output=True, check=False)
    if curl.returncode == 0:
        out = await asyncio.to_thread(
            subprocess.run,
            argv,
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
            env=env,
        )
        doc = json.loads(out.stdout)
    else:  # the same request the line makes, without curl installed
        header = argv[argv.index("-H") + 1]
        name, _, value = header.partition(": ")
        async with (
            aiohttp.ClientSession(trust_env=False) as session,
            session.get(argv[-1], headers={name: value}) as resp,
        ):
            doc = await resp.json()
    assert doc["authenticated"] is True
    # the forward-proxy form works against the sandbox too
    token = re.search(r"Bearer (cpx_[A-Za-z0-9_-]+)", line)
    assert token
    listen = yaml.safe_load(cfg.read_text())["listen"]
    async with (
        aiohttp.ClientSession(trust_env=False) as session,
        session.get(
            "http://api.aimychats.com/v1/conversations",
            proxy=f"http://{listen}",
            headers={"Authorization": f"Bearer {token.group(1)}"},
        ) as resp,
    ):
        assert resp.status == 200
        assert "data" in await resp.json()
    assert proc.stop() == 0


@pytest.mark.parametrize("log_format", ["text", "json"])
async def test_debug_session_never_logs_a_secret(
    tmp_path: Path, daemon_procs: list[DaemonProcess], log_format: str
) -> None:
    """A whole debug-level session (successes, denials, errors, a key test) leaks no secret into its logs."""
    home = tmp_path / "home"
    home.mkdir()
    env = cli_env(home)
    async with Sandbox() as sandbox:
        ca = sandbox.write_ca(tmp_path / "ca.pem")
        assert run_cli("init", env=env).returncode == 0
        cfg = home / ".config" / "credproxy" / "config.yaml"
        admin = f"127.0.0.1:{free_port()}"
        listen = f"127.0.0.1:{free_port()}"
        doc = yaml.safe_load(cfg.read_text())
        doc.update({"listen": listen, "admin_listen": admin})
        up = doc["upstreams"]["aimychats"]
        up.update({"base_url": sandbox.base_url, "ca_bundle": str(ca)})
        up["credentials"] = [
            {"name": "aimychats-read", "scopes": ["read"]},
            {"name": "aimychats-rw", "scopes": ["read", "write", "delete"]},
        ]
        doc["apps"]["reader"] = {"upstreams": {"aimychats": {"scopes": ["read"]}}}
        write_config(cfg, doc)
        read_key = sandbox.new_key(["read"])
        rw_key = sandbox.new_key(["read", "write", "delete"])
        for name, value in (("aimychats-read", read_key), ("aimychats-rw", rw_key)):
            assert run_cli("keys", "add", name, "--stdin", env=env, stdin=value).returncode == 0
        token = run_cli("apps", "token", "default", env=env).stdout.strip()
        reader = run_cli("apps", "token", "reader", env=env).stdout.strip()
        key_test = await asyncio.to_thread(
            run_cli, "keys", "test", "aimychats-rw", "--upstream", "aimychats", env=env
        )
        proc = DaemonProcess(
            ["serve", "--log-level", "debug", "--log-format", log_format], env, tmp_path / "d.log"
        )
        daemon_procs.append(proc)
        await asyncio.to_thread(proc.wait_ready, f"http://{admin}")
        base = f"http://{listen}/aimychats"
        auth = {"Authorization": f"Bearer {token}"}
        async with aiohttp.ClientSession(trust_env=False) as s:
            async with s.get(f"{base}/auth/test", headers=auth) as r:
                assert r.status == 200
            async with s.post(
                f"{base}/conversations?api_key={rw_key}",
                headers=auth,
                json={"title": f"t {read_key}"},
            ) as r:
                assert r.status == 201
            async with s.get(
                f"{base}/conversations",
                headers={"Authorization": "Bearer cpx_wrongwrongwrongwrongwrongwrong"},
            ) as r:
                assert r.status == 401
            async with s.delete(
                f"{base}/conversations/x", headers={"Authorization": f"Bearer {reader}"}
            ) as r:
                assert r.status == 403
            async with s.get(f"{base}/nope", headers={"X-Credproxy-App-Token": token}) as r:
                assert r.status == 404
            async with s.get(f"{base}/a%2Fb", headers=auth) as r:
                assert r.status == 400
            async with s.get(f"http://{admin}/status") as r:
                status_text = await r.text()
            async with s.get(f"http://{admin}/metrics") as r:
                metrics_text = await r.text()
        assert proc.stop() == 0
        log = proc.log()
    master = (home / ".config" / "credproxy" / "master.key").read_text().strip()
    everything = "\n".join([log, status_text, metrics_text, key_test.stdout, key_test.stderr])
    assert "GET aimychats /v1/auth/test" in log or '"path": "/v1/auth/test"' in log
    for secret in (read_key, rw_key, token, reader, master):
        assert secret not in everything
        assert secret[-12:] not in everything
    assert "Traceback" not in log
