"""safespawn: let a container ask its host to run allowlisted sidecar containers, safely.

The public surface is small: the configuration, the policy, the engine and the runtime interface it
drives, the client, and the error tree (errors.py). tests/unit/test_public_surface.py pins it.
"""

from .config import ChannelConfig, Config, load_config, parse_config
from .engine import Engine, SyncResult
from .errors import (
                     BadRequest,
                     ChannelLocked,
                     ChannelUnsafe,
                     ConfigError,
                     ErrorCode,
                     ExitCode,
                     InstallError,
                     Interrupted,
                     NoBroker,
                     NotFound,
                     PolicyDenied,
                     QuotaExceeded,
                     RuntimeFailed,
                     SafespawnError,
)
from .policy import Policy, Profile, load_profile
from .request import Reply, Request, parse_request
from .runtime import Container, PodmanRuntime, Runtime
from .sidecar import SidecarSpec

__version__ = "0.1.0"
__all__ = [
    "BadRequest", "ChannelConfig", "ChannelLocked", "ChannelUnsafe", "Config", "ConfigError", "Container", "Engine",
    "ErrorCode", "ExitCode", "InstallError", "Interrupted", "NoBroker", "NotFound", "PodmanRuntime", "Policy",
    "PolicyDenied", "Profile", "QuotaExceeded", "Reply", "Request", "Runtime", "RuntimeFailed", "SafespawnError",
    "SidecarSpec", "SyncResult", "load_config", "load_profile", "parse_config", "parse_request",
]
