"""The runtime interface the engine drives."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from ..sidecar import LABEL_SPEC, SidecarSpec


@dataclass(frozen=True)
class Container:
    id: str
    name: str
    state: str  # podman's words: running, exited, created, stopped, paused, ...
    pid: int
    labels: dict[str, str] = field(default_factory=dict)
    started: int = 0  # unix seconds
    exit_code: int = 0
    restarts: int = 0  # restarts by the runtime's own restart policy (known from inspect only)
    image: str = ""  # the image reference it was created from (a rollback returns to it)

    @property
    def running(self) -> bool:
        return self.state == "running" and self.pid > 0

    @property
    def spec_hash(self) -> str:
        return self.labels.get(LABEL_SPEC, "")


class Runtime(Protocol):
    def list(self, channel: str | None = None) -> list[Container]:
        """All safespawn containers (of one channel), in one call."""
        ...

    def run(self, spec: SidecarSpec) -> str:
        """Start a detached container for `spec`; returns its id. A name already in use fails with
        a RuntimeFailed whose message says "already in use"."""
        ...

    def run_pid(self, name: str) -> int:
        """The host pid of the process the last `run` of `name` started, as the runtime wrote it
        when `run` returned (0 when it does not say: then only `inspect` knows)."""
        ...

    def signal(self, name: str, signal: str) -> None: ...

    def stop(self, name: str, grace: int) -> None: ...

    def remove(self, name: str) -> None:
        """Remove at once (kill if running); a missing container is not an error."""
        ...

    def logs(self, name: str, lines: int = 20) -> str: ...

    def inspect(self, names: Sequence[str]) -> dict[str, Container]:
        """The named containers that exist, with their restart counts, in one call."""
        ...
