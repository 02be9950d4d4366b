"""safespawn: let a container ask its host to run allowlisted sidecar containers, safely.

The public surface is small: the configuration, the policy, the engine and the client.
"""

from .config import ChannelConfig, Config, load_config, parse_config
from .engine import Engine, SyncResult
from .errors import (
                     BadRequest,
                     ConfigError,
                     ErrorCode,
                     ExitCode,
                     Interrupted,
                     NotFound,
                     PolicyDenied,
                     QuotaExceeded,
                     RuntimeFailed,
                     SafespawnError,
)
from .policy import Policy, Profile, load_profile
from .request import Reply, Request, parse_request
from .sidecar import SidecarSpec

__version__ = "0.1.0"
__all__ = [
    "BadRequest", "ChannelConfig", "Config", "ConfigError", "Engine", "ErrorCode", "ExitCode", "Interrupted",
    "NotFound", "Policy", "PolicyDenied", "Profile", "QuotaExceeded", "Reply", "Request", "RuntimeFailed",
    "SafespawnError", "SidecarSpec", "SyncResult", "load_config", "load_profile", "parse_config",
    "parse_request",
]
