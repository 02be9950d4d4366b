"""The public surface of the package, pinned: a change to it is a deliberate change of this test."""

from __future__ import annotations

import inspect

import safespawn
from safespawn import errors
from safespawn.agent import client

PUBLIC = {
    "BadRequest", "ChannelConfig", "ChannelLocked", "ChannelUnsafe", "Config", "ConfigError", "Container", "Engine",
    "ErrorCode", "ExitCode", "InstallError", "Interrupted", "NoBroker", "NotFound", "PodmanRuntime", "Policy",
    "PolicyDenied", "Profile", "QuotaExceeded", "Reply", "Request", "Runtime", "RuntimeFailed", "SafespawnError",
    "SidecarSpec", "SyncResult", "load_config", "load_profile", "parse_config", "parse_request",
}


def test_all_is_exactly_the_public_surface() -> None:
    assert set(safespawn.__all__) == PUBLIC
    assert len(safespawn.__all__) == len(PUBLIC)  # no duplicates
    for name in PUBLIC:
        assert getattr(safespawn, name) is not None


def test_star_import_gives_the_surface_and_nothing_else() -> None:
    ns: dict[str, object] = {}
    exec("from safespawn import *", ns)  # noqa: S102
    assert {k for k in ns if not k.startswith("__")} == PUBLIC


def test_the_runtime_interface_is_what_the_engine_drives() -> None:
    methods = {n for n, _ in inspect.getmembers(safespawn.Runtime, inspect.isfunction) if not n.startswith("_")}
    assert methods == {"list", "run", "run_pid", "signal", "stop", "remove", "logs", "inspect"}
    assert {f for f in safespawn.Container.__dataclass_fields__} >= {"id", "name", "state", "pid", "labels"}


def test_every_error_is_in_the_tree_errors_py_draws() -> None:
    doc = errors.__doc__ or ""
    # NoBroker is the client's (agent side): errors.py draws it but does not import it.
    found = {**vars(client), **vars(errors)}.values()
    classes = [c for c in found if isinstance(c, type) and issubclass(c, Exception)
               and c.__module__ in ("safespawn.errors", "safespawn.agent.client")]
    assert {c.__name__ for c in classes} == {"SafespawnError", "BadRequest", "PolicyDenied", "NotFound",
                                             "QuotaExceeded", "RuntimeFailed", "Interrupted", "ConfigError",
                                             "ChannelUnsafe", "ChannelLocked", "InstallError", "NoBroker"}
    for c in classes:
        assert f" {c.__name__} " in doc, c.__name__
    for code in errors.ErrorCode:
        assert f'"{code.value}"' in doc
