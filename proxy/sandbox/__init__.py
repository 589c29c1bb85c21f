"""The built-in AImyChats-compatible sandbox upstream.

It serves the seed's API over HTTPS on loopback with a throwaway CA, so `credproxy serve
--sandbox` and the project's end-to-end tests work with no account and no network.
"""

from proxy.sandbox.app import PLANS, ReceivedRequest, SandboxKey, SandboxState
from proxy.sandbox.oauth import OAuthClient, SandboxOAuth
from proxy.sandbox.server import Sandbox, run_sandbox

__all__ = [
    "PLANS",
    "OAuthClient",
    "ReceivedRequest",
    "Sandbox",
    "SandboxKey",
    "SandboxOAuth",
    "SandboxState",
    "run_sandbox",
]
