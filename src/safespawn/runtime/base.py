"""The runtime interface the engine drives, and what both runtimes share to report a container.
`Container` (what a runtime reports) lives in broker/sidecar.py, beside `SidecarSpec` (what it
runs), and is re-exported here."""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import datetime
from typing import Any, Protocol

from ..broker.sidecar import Container, SidecarSpec

__all__ = ["Container", "Runtime", "unix_seconds"]

_RFC3339 = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.\d+)?(Z|[+-]\d\d:\d\d)")


def unix_seconds(value: Any) -> int:
    """An inspect time (RFC 3339 with nanoseconds, `2026-12-01T20:30:35.953119113Z`, podman's and
    docker's alike) as the whole unix seconds `podman ps` prints; 0 for anything else, and for
    docker's "never started" (`0001-01-01T00:00:00Z`)."""
    m = _RFC3339.fullmatch(str(value or ""))
    if m is None:
        return 0
    tz = "+00:00" if m[2] == "Z" else m[2]
    return max(0, int(datetime.fromisoformat(m[1] + tz).timestamp()))


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
