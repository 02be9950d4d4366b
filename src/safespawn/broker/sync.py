"""What every phase of a sync works on: the sync's context and result, the channel's listing, and
the typed values one phase hands the next (engine.py runs the phases; docs/architecture.md, "One
sync, phase by phase", walks through them).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from ..config import ChannelConfig
from ..runtime import Container, Runtime
from . import metrics, pidsignal
from .audit import AuditLog
from .inbox import Entry
from .policy import Decision
from .request import Reply, Request
from .sidecar import LABEL_CHANNEL, LABEL_KEY, LABEL_NETNS, LABEL_PROFILE, LABEL_SPEC, sidecar_key
from .state import ChannelState


@dataclass
class SyncResult:
    channel: str
    handled: int = 0
    refused: int = 0
    quarantined: int = 0
    replayed: int = 0
    deferred: int = 0
    respawned: int = 0
    removed: int = 0
    errors: list[str] = field(default_factory=list)
    # For metrics: what each answered entry was, failed respawns, the sidecars' (profile, state).
    replies: list[metrics.ReplyObservation] = field(default_factory=list)
    respawn_failed: int = 0
    runtime_restarts: int = 0  # restarts by the runtime's restart policy this sync noticed
    awaiting_restart: int = 0  # exited just now, left to the runtime's restart policy (not respawned)
    sidecars: list[tuple[str, str]] | None = None
    outdated: int = 0
    ok: bool = False  # the sync ran to the end

    def summary(self) -> str:
        """The one line a sync logs (`safespawn sync`, the resident broker, `watch`)."""
        line = (f"handled {self.handled}, refused {self.refused}, quarantined {self.quarantined}, "
                f"replayed {self.replayed}, deferred {self.deferred}, respawned {self.respawned}, "
                f"removed {self.removed}")
        if self.awaiting_restart:
            line += f", left to the runtime's restart {self.awaiting_restart}"
        return line

    def observation(self, duration: float) -> metrics.SyncObservation:
        """What metrics records of this sync (metrics.py takes the observation, not the result)."""
        return metrics.SyncObservation(
            ok=self.ok, duration=duration, finished=time.time(), replies=tuple(self.replies),
            respawns=self.respawned, respawn_failures=self.respawn_failed,
            runtime_restarts=self.runtime_restarts, pending=self.deferred,
            sidecars=None if self.sidecars is None else tuple(self.sidecars),
            outdated=None if self.sidecars is None else self.outdated)


# -- what the phases hand each other -------------------------------------------------------------


@dataclass(frozen=True)
class Incoming:
    """A request read and parsed, ready for the gate."""

    entry: Entry
    request: Request
    digest: str
    interrupted: bool = False  # claimed before a crash: a delivery is not repeated


@dataclass(frozen=True)
class Answered:
    """An inbox entry answered without acting (unreadable or malformed)."""

    rid: str
    digest: str
    reply: Reply


@dataclass
class Intake:
    incoming: list[Incoming] = field(default_factory=list)
    answered: list[Answered] = field(default_factory=list)


@dataclass(frozen=True)
class Planned:
    """The gate's answer for one request: a decision, or the refusal."""

    incoming: Incoming
    decision: Decision | None
    refusal: Reply | None = None


@dataclass(frozen=True)
class Acted:
    """A decision carried out. `reply` is None for a start, whose reply comes from `verify`."""

    incoming: Incoming
    decision: Decision | None
    reply: Reply | None
    started: bool = False  # a container was (re)created for this start
    ran_at: float = 0.0  # wall clock just before `run` (a fresh pid file is newer), and after it
    run_done: float = 0.0
    run_done_boot: float = 0.0  # the same moment on CLOCK_BOOTTIME (/proc's start times count in it)
    container_id: str = ""  # what `run` returned, and the host pid the runtime wrote (0: unknown)
    pid: int = 0


@dataclass(frozen=True)
class Outcome:
    """A request's final reply, with what was decided and done for it."""

    incoming: Incoming
    decision: Decision | None
    reply: Reply
    started: bool = False


class Listing:
    """The channel's containers during one sync: listed when first needed, then kept up to date
    with what the sync did. After a runtime failure the effect is unknown, so the next use lists again."""

    def __init__(self, runtime: Runtime, channel: str) -> None:
        self.runtime = runtime
        self.channel = channel
        self._containers: dict[str, Container] | None = None

    def containers(self) -> dict[str, Container]:
        """By name; raises RuntimeFailed if the runtime cannot list them."""
        if self._containers is None:
            self._containers = {c.name: c for c in self.runtime.list(self.channel)}
        return self._containers

    @property
    def fetched(self) -> bool:
        return self._containers is not None

    def forget(self, name: str) -> None:
        """`name` was removed."""
        if self._containers is not None:
            self._containers.pop(name, None)

    def invalidate(self) -> None:
        self._containers = None


@dataclass
class SyncContext:
    """One sync of one channel: what every phase works on."""

    channel: ChannelConfig
    state: ChannelState
    audit: AuditLog
    result: SyncResult
    listing: Listing
    quick: bool = False  # trust the recorded processes: no listing while they all verify
    channel_netns_dir: str = "/run/netns"
    alive_seen: dict[pidsignal.ProcessIdentity, bool] = field(default_factory=dict)
    # What this sync's starts placed in a round's container view until they are verified: a later
    # request for the same sidecar in that view finds its start under way (the very object; a
    # listing taken afterwards shows what the container became instead).
    started: dict[str, Container] = field(default_factory=dict)

    def alive(self, ident: pidsignal.ProcessIdentity) -> bool:
        """Whether a recorded process still runs, read from /proc once per sync (a signal re-checks
        at delivery anyway)."""
        seen = self.alive_seen.get(ident)
        if seen is None:
            seen = self.alive_seen[ident] = pidsignal.is_alive(ident)
        return seen

    def vouched(self, names: Iterable[str] | None = None) -> dict[str, Container]:
        """The desired sidecars (all, or those named) whose recorded process still verifies, as the
        containers they are."""
        out = {}
        wanted = self.state.desired.values() if names is None else [
            self.state.desired[n] for n in names if n in self.state.desired]
        for d in wanted:
            ident = d.identity
            if ident is not None and d.spec_hash and self.alive(ident):
                out[d.name] = Container(d.container_id, d.name, "running", d.pid, started=d.started_at, labels={
                    LABEL_CHANNEL: self.channel.name, LABEL_PROFILE: d.profile,
                    LABEL_KEY: sidecar_key(d.name, self.channel.name, d.profile), LABEL_NETNS: d.netns or "",
                    LABEL_SPEC: d.spec_hash})
        return out
