"""Container runtimes. A runtime is a small interface (list, run, signal, stop, remove); podman and
docker are peers behind it, and `make_runtime` is the one place that picks between them."""

from ..config import BrokerConfig
from .base import Container, Runtime
from .docker import DockerRuntime
from .podman import PodmanRuntime


def make_runtime(broker: BrokerConfig) -> Runtime:
    """The runtime `[broker] runtime` names, with its CLI path and per-call timeout."""
    if broker.runtime == "docker":
        return DockerRuntime(broker.docker, broker.docker_host, broker.docker_oci_runtime, broker.podman_timeout)
    return PodmanRuntime(broker.podman, broker.podman_timeout, str(broker.state_dir))


__all__ = ["Container", "DockerRuntime", "PodmanRuntime", "Runtime", "make_runtime"]
