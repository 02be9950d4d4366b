"""Container runtimes. A runtime is a small interface (list, run, signal, stop, remove); podman and
docker are peers behind it, and `make_runtime` is the one place that picks between them."""

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..budget import ChannelBudget
from ..config import BrokerConfig
from .base import Container, Runtime
from .podman import PodmanRuntime

if TYPE_CHECKING:
    from .docker import DockerRuntime


def make_runtime(broker: BrokerConfig, budgets: Mapping[str, ChannelBudget] | None = None) -> Runtime:
    """The runtime `[broker] runtime` names, with its CLI path and per-call timeout; with `budgets`
    (channel -> ChannelBudget), it starts each channel's sidecars inside the channel's budget."""
    if broker.runtime == "docker":
        from .docker import DockerRuntime  # only a Docker host pays for its import

        return DockerRuntime(broker.docker, broker.docker_host, broker.docker_oci_runtime, broker.podman_timeout,
                             budgets)
    return PodmanRuntime(broker.podman, broker.podman_timeout, str(broker.state_dir), budgets)


def __getattr__(name: str) -> Any:
    if name == "DockerRuntime":
        from .docker import DockerRuntime

        return DockerRuntime
    raise AttributeError(name)


__all__ = ["Container", "DockerRuntime", "PodmanRuntime", "Runtime", "make_runtime"]
