"""What a sync knows of the runtime's containers: one listing, fetched only when something needs it.

The engine asks `Listing.get()` when a decision needs the runtime's truth (a start of a sidecar the
desired state does not vouch for, a target it cannot verify, a full reconcile); until then
`current()` holds what the desired state vouches for (`assume`). Anything that starts or removes a
container makes it `stale()`.
"""

from __future__ import annotations

from .errors import RuntimeFailed
from .runtime import Container, Runtime


class Listing:
    """The runtime's listing of a channel's containers, fetched at most once per sync and only when
    something needs it (a start, a target the desired state cannot vouch for, a full reconcile)."""

    def __init__(self, runtime: Runtime, channel: str) -> None:
        self._runtime = runtime
        self._channel = channel
        self._containers: dict[str, Container] | None = None
        self._failed: RuntimeFailed | None = None
        self._assumed: dict[str, Container] = {}
        self.fetches = 0

    def get(self) -> dict[str, Container]:
        """The listing; raises RuntimeFailed (once asked, for the rest of the sync) if podman fails."""
        if self._failed is not None:
            raise self._failed
        if self._containers is None:
            self.fetches += 1
            try:
                self._containers = {c.name: c for c in self._runtime.list(self._channel)}
            except RuntimeFailed as e:
                self._failed = e
                raise
        return self._containers

    def assume(self, c: Container) -> None:
        """What the desired state vouches for, used while no listing was fetched."""
        self._assumed[c.name] = c

    def current(self) -> dict[str, Container]:
        """The listing if it was fetched (the whole truth), else what was assumed."""
        return self._containers if self._containers is not None else self._assumed

    @property
    def failure(self) -> RuntimeFailed | None:
        return self._failed

    @property
    def fetched(self) -> bool:
        return self._containers is not None

    def stale(self) -> None:
        """Something was started or removed: the next user lists again."""
        self._containers = None
        self._assumed = {}
