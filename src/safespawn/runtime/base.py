"""The runtime interface the engine drives. `Container` (what a runtime reports) lives in
sidecar.py, beside `SidecarSpec` (what it runs), and is re-exported here."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from ..broker.sidecar import Container, SidecarSpec

__all__ = ["Container", "Runtime"]


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
