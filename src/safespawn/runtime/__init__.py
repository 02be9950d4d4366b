"""Container runtimes. A runtime is a small interface (list, run, signal, stop, remove); podman and
docker are peers behind it, and `make_runtime` is the one place that picks between them."""

from typing import TYPE_CHECKING, Any

from ..config import BrokerConfig
from .base import Container, Runtime
from .podman import PodmanRuntime

if TYPE_CHECKING:
    from .docker import DockerRuntime


def make_runtime(broker: BrokerConfig) -> Runtime:
    """The runtime `[broker] runtime` names, with its CLI path and per-call timeout."""
    if broker.runtime == "docker":
        from .docker import DockerRuntime  # only a Docker host pays for its import

        return DockerRuntime(broker.docker, broker.docker_host, broker.docker_oci_runtime, broker.podman_timeout)
    return PodmanRuntime(broker.podman, broker.podman_timeout, str(broker.state_dir))


def __getattr__(name: str) -> Any:
    if name == "DockerRuntime":
        from .docker import DockerRuntime

        return DockerRuntime
    raise AttributeError(name)


__all__ = ["Container", "DockerRuntime", "PodmanRuntime", "Runtime", "make_runtime"]
