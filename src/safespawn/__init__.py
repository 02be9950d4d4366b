"""safespawn: let a container ask its host to run allowlisted sidecar containers, safely.

The public surface is small: the configuration, the policy, the engine and the runtime interface it
drives, the client, and the error tree (errors.py). tests/unit/test_public_surface.py pins it.

The names are imported on first use (PEP 562): dockerd runs `safespawn-oci-runtime` for every runc
call of every Docker sidecar (create, start, state, kill, delete), and most of those only exec runc,
so importing the package must not import the engine, the policy and tomllib.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .agent.client import NoBroker
    from .broker.engine import Engine
    from .broker.policy import Policy, Profile, load_profile
    from .broker.request import Reply, Request, parse_request
    from .broker.sidecar import SidecarSpec
    from .broker.sync import SyncResult
    from .config import ChannelConfig, Config, load_config, parse_config
    from .errors import (
        BadRequest,
        ChannelLocked,
        ChannelUnsafe,
        ConfigError,
        ErrorCode,
        ExitCode,
        InstallError,
        Interrupted,
        NotFound,
        PolicyDenied,
        QuotaExceeded,
        RuntimeFailed,
        SafespawnError,
    )
    from .runtime import Container, PodmanRuntime, Runtime

_WHERE = {
    "agent.client": ("NoBroker",),  # the agent side's (agent/client.py); errors.py draws it in the tree
    "config": ("ChannelConfig", "Config", "load_config", "parse_config"),
    "broker.engine": ("Engine",),
    "broker.sync": ("SyncResult",),
    "errors": ("BadRequest", "ChannelLocked", "ChannelUnsafe", "ConfigError", "ErrorCode", "ExitCode",
               "InstallError", "Interrupted", "NotFound", "PolicyDenied", "QuotaExceeded",
               "RuntimeFailed", "SafespawnError"),
    "broker.policy": ("Policy", "Profile", "load_profile"),
    "broker.request": ("Reply", "Request", "parse_request"),
    "runtime": ("Container", "PodmanRuntime", "Runtime"),
    "broker.sidecar": ("SidecarSpec",),
}
_MODULE_OF = {name: mod for mod, names in _WHERE.items() for name in names}

__version__ = "0.1.0"
__all__ = [
    "BadRequest", "ChannelConfig", "ChannelLocked", "ChannelUnsafe", "Config", "ConfigError", "Container", "Engine",
    "ErrorCode", "ExitCode", "InstallError", "Interrupted", "NoBroker", "NotFound", "PodmanRuntime", "Policy",
    "PolicyDenied", "Profile", "QuotaExceeded", "Reply", "Request", "Runtime", "RuntimeFailed", "SafespawnError",
    "SidecarSpec", "SyncResult", "load_config", "load_profile", "parse_config", "parse_request",
]


def __getattr__(name: str) -> Any:
    mod = _MODULE_OF.get(name)
    if mod is None:
        raise AttributeError(f"module 'safespawn' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{mod}", __name__), name)
    globals()[name] = value
    return value
