"""Container runtimes: the interface the engine drives, and its two implementations.

`Runtime` (base.py) is eight methods:

    list(channel=None) -> list[Container]     every safespawn container (of one channel), one call
    run(spec) -> str                          start a detached container for a SidecarSpec; its id
    run_pid(name) -> int                      the host pid the last `run` of `name` started, as the
                                              runtime wrote it (0: unknown, ask `inspect`)
    signal(name, signal) -> None              deliver a signal by container name
    stop(name, grace) -> None                 stop (killed after `grace` s), then remove
    remove(name) -> None                      remove at once; a missing container is not an error
    logs(name, lines=20) -> str               the last lines of its output (a failed start's reply)
    inspect(names) -> dict[str, Container]    the named containers that exist, with restart counts

`Container` (what a runtime reports) and `SidecarSpec` (what it runs) live in sidecar.py.
`PodmanRuntime` (podman.py) and `DockerRuntime` (docker.py, with the OCI runtime in ociruntime.py)
are peers behind it; `make_runtime` picks the engine's from `[broker] runtime`. Every call of the
podman or docker CLI, theirs and those of ops/adopt.py and ops/doctor.py, goes through one runner,
`RuntimeCli` (command.py). tests/unit/test_public_surface.py pins the method set.

Every name here is imported on first use (PEP 562), as in the package's own __init__: dockerd execs
ociruntime.py, which lives here, for every runc call of a Docker sidecar, and importing it must not
import podman.py, the configuration or tomllib.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..broker.budget import ChannelBudget
    from ..config import BrokerConfig
    from .base import Container, Runtime
    from .docker import DockerRuntime
    from .podman import PodmanRuntime

_MODULE_OF = {"Container": "base", "Runtime": "base", "PodmanRuntime": "podman", "DockerRuntime": "docker"}


def make_runtime(broker: BrokerConfig, budgets: Mapping[str, ChannelBudget] | None = None) -> Runtime:
    """The runtime `[broker] runtime` names, with its CLI path and per-call timeout; with `budgets`
    (channel -> ChannelBudget), it starts each channel's sidecars inside the channel's budget."""
    if broker.runtime == "docker":
        from .docker import DockerRuntime  # only a Docker host pays for its import

        return DockerRuntime(broker.docker, broker.docker_host, broker.docker_oci_runtime, broker.podman_timeout,
                             budgets)
    from .podman import PodmanRuntime

    return PodmanRuntime(broker.podman, broker.podman_timeout, str(broker.state_dir), budgets)


def __getattr__(name: str) -> Any:
    mod = _MODULE_OF.get(name)
    if mod is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{mod}", __name__), name)
    globals()[name] = value
    return value


__all__ = ["Container", "DockerRuntime", "PodmanRuntime", "Runtime", "make_runtime"]
