"""Errors that a reply can carry, and the exit codes of the command line.

Every refusal is a value with a machine-readable code, so that the reply, the audit log and the
tests speak about the same thing::

    SafespawnError                 any refusal or failure a reply can report
    ├── BadRequest                 "bad_request":    malformed, unsafe or unknown request
    ├── PolicyDenied               "policy_denied":  well formed, but host policy says no
    ├── NotFound                   "not_found":      no such sidecar in this channel
    ├── QuotaExceeded              "quota":          a channel limit was reached
    ├── RuntimeFailed              "runtime_failed": podman failed or timed out
    └── Interrupted                "interrupted":    the broker died mid-way; not repeated
    ConfigError                    the host's own configuration is invalid (never a reply)
"""

from __future__ import annotations

import enum


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


class ExitCode(enum.IntEnum):
    """Exit codes of the `safespawn` command."""

    OK = 0
    FAILED = 1  # the request was refused or failed (submit), or a check found problems
    USAGE = 2  # bad command line
    CONFIG = 3  # invalid configuration
    NO_BROKER = 4  # submit: no reply within the timeout
    LOCKED = 5  # sync: another sync holds the channel (only with --no-wait)
