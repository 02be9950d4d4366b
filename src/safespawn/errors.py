"""Every error safespawn raises, in one tree, and the exit codes of the command line.

Every refusal is a value with a machine-readable code, so that the reply, the audit log and the
tests speak about the same thing. Host-side problems (configuration, channel layout, install,
locking) are separate: they never become a reply::

    Exception
    ├── SafespawnError             any refusal or failure a reply can report (`code`, `message`)
    │   ├── BadRequest             "bad_request":    malformed, unsafe or unknown request
    │   ├── PolicyDenied           "policy_denied":  well formed, but host policy says no
    │   ├── NotFound               "not_found":      no such sidecar in this channel
    │   ├── QuotaExceeded          "quota":          a channel limit was reached
    │   ├── RuntimeFailed          "runtime_failed": podman failed or timed out
    │   └── Interrupted            "interrupted":    the broker died mid-way; not repeated
    ├── ConfigError                the host's own configuration is invalid (exit code CONFIG)
    ├── ChannelUnsafe              a channel directory is not as the host laid it out (a symlinked
    │                              inbox/, ...): nothing is served through it this run
    ├── ChannelLocked              another sync holds the channel's lock (`sync --no-wait`: LOCKED)
    ├── InstallError               install/uninstall/rearm cannot proceed; the message says why
    └── NoBroker                   client side: no reply within the timeout (exit code NO_BROKER).
                                   Defined in client.py, which runs in the agent and is copied alone
                                   into agent images, so it imports nothing from here; and this
                                   host-side module imports nothing from it. `safespawn.NoBroker`
                                   is the client's class.

The client restates the exit codes it shares with the command line (`EXIT_OK`, `EXIT_FAILED`,
`EXIT_USAGE`, `EXIT_NO_BROKER`) for the same reason; tests/unit/test_boundary.py pins them equal.
"""

from __future__ import annotations

import enum

__all__ = [
    "BadRequest", "ChannelLocked", "ChannelUnsafe", "ConfigError", "ErrorCode", "ExitCode", "InstallError",
    "Interrupted", "NotFound", "PolicyDenied", "QuotaExceeded", "RuntimeFailed", "SafespawnError",
]


class ErrorCode(str, enum.Enum):
    BAD_REQUEST = "bad_request"
    POLICY_DENIED = "policy_denied"
    NOT_FOUND = "not_found"
    QUOTA = "quota"
    RUNTIME_FAILED = "runtime_failed"
    INTERRUPTED = "interrupted"


class SafespawnError(Exception):
    code: ErrorCode = ErrorCode.BAD_REQUEST

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(SafespawnError):
    code = ErrorCode.BAD_REQUEST


class PolicyDenied(SafespawnError):
    code = ErrorCode.POLICY_DENIED


class NotFound(SafespawnError):
    code = ErrorCode.NOT_FOUND


class QuotaExceeded(SafespawnError):
    code = ErrorCode.QUOTA


class RuntimeFailed(SafespawnError):
    code = ErrorCode.RUNTIME_FAILED


class Interrupted(SafespawnError):
    code = ErrorCode.INTERRUPTED


class ConfigError(Exception):
    """The host configuration (safespawn.toml or a profile) is invalid."""


class ChannelUnsafe(Exception):
    """The channel directory itself is not as the host laid it out (e.g. a symlinked inbox/new)."""


class ChannelLocked(Exception):
    """Another sync holds the channel's lock (raised only when not waiting for it)."""

    def __init__(self, channel: str) -> None:
        super().__init__(f"channel {channel} is being synced by another process")
        self.channel = channel


class InstallError(Exception):
    """install/uninstall/rearm cannot proceed; the message says why and what to do."""


class ExitCode(enum.IntEnum):
    """Exit codes of the `safespawn` command."""

    OK = 0
    FAILED = 1  # the request was refused or failed (submit), or a check found problems
    USAGE = 2  # bad command line
    CONFIG = 3  # invalid configuration
    NO_BROKER = 4  # submit: no reply within the timeout
    LOCKED = 5  # sync: another sync holds the channel (only with --no-wait)
