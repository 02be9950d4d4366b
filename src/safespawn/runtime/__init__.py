"""Container runtimes. A runtime is a small interface (list, run, signal, stop, remove) so that
docker or a systemd-supervised mode can follow podman."""

from .base import Container, Runtime
from .podman import PodmanRuntime

__all__ = ["Container", "PodmanRuntime", "Runtime"]
