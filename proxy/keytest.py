"""`credproxy keys test`: one authenticated call to the upstream's auth test endpoint.

It goes through the same verified-TLS client and header injection as the
daemon, and prints the status and a summary of the answer, never the key.
"""

from __future__ import annotations

import json

from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from .config import UpstreamConfig
from .errors import ProxyError
from .forward import UpstreamClients, request_headers, send
from .secret import Secret


async def auth_test(upstream: UpstreamConfig, secret: Secret) -> tuple[int, str]:
    """GET <base_url>/auth/test with the key; return the status and a one-line summary."""
    clients = UpstreamClients(pool_size=1)
    auth = upstream.auth_header
    headers = request_headers(
        CIMultiDictProxy(CIMultiDict({"Accept": "application/json"})),
        auth.name,
        auth.prefix + secret.reveal(),
    )
    url = URL(upstream.origin + upstream.base_path + "/auth/test", encoded=True)
    try:
        with clients.lease("keytest", upstream) as session:
            resp = await send(session, "GET", url, upstream, headers, None)
            try:
                body = await resp.read()
            finally:
                resp.release()
    except ProxyError as exc:
        return exc.status, f"{exc.code}: {exc.message}"
    finally:
        await clients.close()
    return resp.status, _summary(resp.status, body)


def _summary(status: int, body: bytes) -> str:
    try:
        doc = json.loads(body)
    except ValueError:
        return f"{len(body)} bytes, not JSON"
    if not isinstance(doc, dict):
        return "unexpected JSON"
    if 200 <= status < 300:
        scopes = doc.get("scopes")
        user = doc.get("user", {}).get("id") if isinstance(doc.get("user"), dict) else None
        parts = ["authenticated"]
        if user:
            parts.append(f"user {user}")
        if isinstance(scopes, list):
            parts.append("scopes " + ",".join(str(s) for s in scopes))
        return ", ".join(parts)
    error = doc.get("error")
    if isinstance(error, dict):
        return f"{error.get('code')}: {error.get('message')}"
    return "error"
