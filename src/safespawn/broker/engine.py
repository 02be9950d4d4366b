"""The sync engine: drain a channel's inbox, act through the runtime, reply, reconcile.

One sync of a channel, under its lock, in phases that each hand a typed value to the next
(docs/architecture.md, "One sync, phase by phase", walks through them):

    drain (_Pipeline): take what arrived, decide in rounds, act in one job per sidecar, publish each
    job as soon as it is done; until the inbox is empty (or the per-run limit is reached):
      flood      (first take of a run) more than max_pending waiting: refuse the newest beyond it
                 with `quota`, unread (policy.flood_excess picks them)
      intake     read each entry safely, check its id against the ledger (replay, collision),
                 parse it                                   -> Intake (Incoming + Answered)
      claim      record the ids durably before anything is acted on
      decide     the policy's one gate, per request, against one view of the channel: what the
                 recorded processes vouch for, or the runtime's listing when that is not enough
                                                            -> Planned
      act        carry the decisions out through the runtime (or a pidfd), in order per sidecar
                 and in parallel across sidecars            -> Acted
      verify     after a start: still running, not restarted, not in the host's netns; through
                 /proc when the runtime wrote the pid, else one inspect -> Outcome
      publish    desired state (durable), ledger "done" with the replies (durable), the replies,
                 then the requests are removed
    reconcile    respawn desired sidecars that died (with backoff), drop those the policy no longer
                 allows, roll outdated ones (rollout.py), remove orphans and leftovers
    status       outbox/status.json

The runtime's listing of the channel (`Listing`) is taken only when a round or reconcile needs it;
a quick sync of a converged channel lists nothing. A runtime failure makes it stale, and the next
use lists again.

A crash at any step loses nothing: the request stays in the inbox until its reply is durable, and
the ledger answers a replayed request with its first reply instead of acting twice.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from ..config import ChannelConfig, Config
from ..errors import BadRequest, ChannelUnsafe, ErrorCode, RuntimeFailed, SafespawnError
from ..runtime import Container, Runtime, make_runtime
from . import metrics, pidsignal, rollout
from .audit import AuditLog
from .inbox import ChannelDir, Entry
from .pidfiles import PidFileKeeper
from .policy import ChannelView, Decision, IdVerdict, Policy, Remove, Signal, Start, Stop, flood_excess, judge_id
from .readiness import written_since
from .request import Reply, Request, parse_request
from .sidecar import LABEL_CHANNEL, LABEL_KEY, LABEL_NETNS, LABEL_PROFILE, LABEL_SPEC, SidecarSpec, sidecar_key
from .state import ChannelState, Claim, DesiredSidecar, Done

if TYPE_CHECKING:
    from concurrent.futures import Future, ThreadPoolExecutor

log = logging.getLogger(__name__)
BATCH = 256
# A quick sync that changed nothing (signals only) skips reconcile and status if the channel's last
# sync in this process ran to the end less than this many seconds ago.
QUICK_CONVERGED_FOR = 1.0
# The id of a listing entry for a container this batch started (its real id and pid come later).
# A sidecar that exited this recently (seconds), with a failure, may still be restarted by the
# runtime's own restart policy (`--restart=on-failure:N`, and podman's is a `podman container
# cleanup` process that takes seconds on a slow host): the broker leaves it to the runtime meanwhile.
RUNTIME_RESTART_GRACE = 15


def _boot_time() -> int:
    """This boot's start in unix seconds (/proc/stat btime); 0 if not known."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            for line in f:
                if line.startswith("btime "):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


_BOOT_TIME = _boot_time()


def _may_be_restarting(c: Container, now: float, boot_time: int) -> bool:
    """Whether the runtime's restart policy may still run this stopped container again: it is
    restarting (docker says so), or it exited with a failure in this boot and within the grace. A
    container of an earlier boot is never restarted by the policy (nothing runs it at boot)."""
    if c.running:
        return False
    if c.state == "restarting":
        return True
    return c.exit_code != 0 and c.exited_at > boot_time and now - c.exited_at < RUNTIME_RESTART_GRACE


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
class _Sync:
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


# -- intake ------------------------------------------------------------------------------------


def _quarantine(s: _Sync, chan: ChannelDir, entry: Entry, rid: str | None, reason: str,
                code: str = "bad_request", replied: bool = False) -> None:
    where = chan.quarantine(entry)
    s.audit.record("quarantine", rid, reason, code=code, file=where)
    s.result.quarantined += 1
    s.result.replies.append(metrics.ReplyObservation("unknown", "quarantined", code, _age(entry) if replied else None))


def _age(entry: Entry) -> float | None:
    """Seconds since the agent wrote the entry (its mtime); None when unknown or implausible.

    The agent sets the mtime: one in the future counts as 0, one over a day old is not observed.
    """
    if not entry.mtime_ns:
        return None
    age = max(0.0, time.time() - entry.mtime_ns / 1e9)
    return age if age <= 86400 else None


def intake(s: _Sync, chan: ChannelDir, entries: list[Entry]) -> Intake:
    """Read, check against the ledger and parse each entry; everything here is hostile input."""
    taken = Intake()
    for entry in entries:
        if entry.rid is None:
            _quarantine(s, chan, entry, None, f"inbox entry {entry.name[:80]!r} is not named ID.json")
            continue
        prior = s.state.ledger.get(entry.rid)
        try:
            raw = chan.read(entry, s.channel.max_request_bytes)
        except FileNotFoundError:
            continue  # withdrawn by the client after its timeout
        except (SafespawnError, OSError) as e:
            err = e if isinstance(e, SafespawnError) else BadRequest(f"unreadable inbox entry: {e.strerror}")
            if judge_id(prior, None) is IdVerdict.ANSWERED:
                # DENY: an id that was already answered keeps its first reply.
                _quarantine(s, chan, entry, entry.rid, f"{err.message} (id already answered)", err.code.value)
                continue
            _quarantine(s, chan, entry, entry.rid, err.message, err.code.value, replied=True)
            taken.answered.append(Answered(entry.rid, "", Reply.failure(entry.rid, err.code, err.message)))
            continue
        digest = hashlib.sha256(raw).hexdigest()
        verdict = judge_id(prior, digest)
        if verdict is IdVerdict.REPLAY:
            assert prior is not None and prior.reply is not None  # what REPLAY means
            if not chan.has_reply(entry.rid):
                chan.write_reply(prior.reply)
            chan.remove(entry)
            s.audit.record("replay", entry.rid, "answered from the ledger")
            s.result.replayed += 1
            s.result.replies.append(metrics.ReplyObservation("unknown", "replayed", "", _age(entry)))
            continue
        if verdict is IdVerdict.ANSWERED:
            _quarantine(s, chan, entry, entry.rid, "id collides with an earlier request")
            continue
        try:
            req = parse_request(raw, entry.rid)
        except BadRequest as e:
            _quarantine(s, chan, entry, entry.rid, e.message, e.code.value, replied=True)
            taken.answered.append(Answered(entry.rid, digest, Reply.failure(entry.rid, e.code, e.message)))
            continue
        taken.incoming.append(Incoming(entry, req, digest, verdict is IdVerdict.INTERRUPTED))
    return taken


# -- decide ------------------------------------------------------------------------------------


def decide(policy: Policy, s: _Sync, incoming: list[Incoming], containers: dict[str, Container],
           in_flight: Iterable[str] = ()) -> list[Planned]:
    """The policy's gate for every request, in order, against one view of the channel (`in_flight`:
    sidecars whose requests are being carried out now; counted as desired, for the quota)."""
    view = ChannelView(containers, set(s.state.desired) | set(in_flight))
    planned = []
    for i in incoming:
        try:
            planned.append(Planned(i, policy.decide(s.channel, i.request, view, i.interrupted)))
        except SafespawnError as e:
            planned.append(Planned(i, None, Reply.failure(i.request.id, e.code, e.message)))
    return planned


# -- act -----------------------------------------------------------------------------------------


class Actor:
    """Carries one decision out through the runtime (the pipeline runs several at once, one per
    sidecar). At most `parallel` of those runtime calls run at once (`broker.parallel_starts`); the
    wait for a new program's start-up (Verifier) holds no slot, so starts overlap their settles."""

    def __init__(self, runtime: Runtime, parallel: int = 4, pid_files: PidFileKeeper | None = None) -> None:
        self.runtime = runtime
        self.slots = threading.BoundedSemaphore(max(1, parallel))
        self.pid_files = pid_files or PidFileKeeper()

    def act(self, s: _Sync, p: Planned, containers: dict[str, Container]) -> Acted:
        """The decision's effect, or the runtime's failure as the reply."""
        d = p.decision
        if d is None:
            return Acted(p.incoming, None, p.refusal)
        try:
            with self.slots:
                return self._one(s, p.incoming, d, containers)
        except SafespawnError as e:
            if isinstance(e, RuntimeFailed):
                s.listing.invalidate()  # what the failed call left behind is unknown
            return Acted(p.incoming, d, Reply.failure(p.incoming.request.id, e.code, e.message))

    def _one(self, s: _Sync, i: Incoming, d: Decision, containers: dict[str, Container]) -> Acted:
        name = d.target
        c = containers.get(name)
        rid = i.request.id
        if isinstance(d, Start):
            if c is not None and c.spec_hash == d.spec.spec_hash and (c.running or s.started.get(name) is c):
                # The same sidecar already runs: nothing to do. Its recorded process, still alive,
                # answers at once; anything else is inspected (Verifier).
                rec = s.state.desired.get(name)
                ident = rec.identity if rec is not None else None
                if ident is not None and ident.pid == c.pid and ident.container_id == c.id \
                        and pidsignal.is_alive(ident):
                    return Acted(i, d, Reply(rid, True, name, c.pid))
                return Acted(i, d, None)
            if c is not None:
                self.runtime.remove(name)  # different spec, or exited/created: replace it
            ran_at = time.time()
            cid = self._run(s, d.spec)
            run_done, run_done_boot = time.time(), time.clock_gettime(time.CLOCK_BOOTTIME)
            if cid is None:
                return Acted(i, d, None)  # it was running already: the Verifier inspects it
            # Later requests for the same sidecar see what was just started.
            containers[name] = s.started[name] = Container(cid, name, "created", 0, d.spec.labels)
            return Acted(i, d, None, started=True, ran_at=ran_at, run_done=run_done,
                         run_done_boot=run_done_boot, container_id=cid,
                         pid=self.runtime.run_pid(name))
        pid = c.pid if c else None
        if isinstance(d, Signal):
            self._deliver(s, name, d.signal)
        elif isinstance(d, Stop):
            self.runtime.stop(name, d.grace)
            containers.pop(name, None)
        elif isinstance(d, Remove):
            self.runtime.remove(name)
            containers.pop(name, None)
        return Acted(i, d, Reply(rid, True, name, pid))

    def _run(self, s: _Sync, spec: SidecarSpec) -> str | None:
        """`run`. Starts are decided without a listing, so a container may already exist under the
        name (a leftover, or one the state lost): the same sidecar running -> None (nothing was
        started); anything else of this channel is replaced. A container of the name that is not
        this channel's is never touched."""
        # The files the program writes become its uid's before it starts (dnsmasq's lease file).
        self.pid_files.hand_over(s.channel.data_dirs, s.audit, spec)
        try:
            return self.runtime.run(spec)
        except RuntimeFailed as e:
            if "already in use" not in e.message:
                raise
            there = self.runtime.inspect([spec.name]).get(spec.name)
            if there is not None and there.labels.get(LABEL_CHANNEL) != s.channel.name:
                raise
            if there is not None and there.running and there.spec_hash == spec.spec_hash:
                return None
            self.runtime.remove(spec.name)
            return self.runtime.run(spec)

    def _deliver(self, s: _Sync, name: str, signal: str) -> None:
        """Through a pidfd to the recorded process when it verifies (pidsignal.send checks it with the
        pidfd open); else the runtime, which finds the container by name, never by a reused pid."""
        d = s.state.desired.get(name)
        ident = d.identity if d is not None else None
        num = pidsignal.signal_number(signal)
        if ident is not None and num is not None:
            outcome = pidsignal.send(ident, num)
            if outcome is pidsignal.Delivery.SENT:
                return
            log.info("signal %s to %s: fast path refused (%s), using the runtime", signal, name, outcome.value)
        self.runtime.signal(name, signal)


# -- verify --------------------------------------------------------------------------------------


class Verifier:
    """After a start: did the sidecar come up, and where (the policy's post-start check)?

    When the runtime wrote the new container's host pid (podman's `--pidfile`), the check needs no
    runtime call: the process must be alive in that container (pidsignal.identify: start time and
    cgroup), be the one `run` started (it started before `run` returned: a process the restart
    policy started after a crash is newer), and be outside the host's netns. Anything else (no pid,
    the process gone or newer, docker) is decided by one `inspect`, as before.
    """

    def __init__(self, runtime: Runtime, policy: Policy, settle_ms: int) -> None:
        self.runtime = runtime
        self.policy = policy
        self.settle_ms = settle_ms

    def check(self, a: Acted, containers: dict[str, Container]) -> Outcome:
        """The final reply for an acted decision; a start's carries the host pid, or why it did not run."""
        if a.reply is not None:
            return Outcome(a.incoming, a.decision, a.reply, a.started)
        assert isinstance(a.decision, Start)  # only a start waits for its reply
        name = a.decision.target
        c = self._through_proc(a) if a.started else None
        if c is None:
            if a.started:
                # The settle (or its rest, when /proc already showed the process gone): the runtime
                # records the exit, and its restart policy acts, before the inspect looks.
                self._await_start_up(a, None)
            c = self.runtime.inspect([name]).get(name)
            if c is not None and a.started and a.pid > 0 and c.pid != a.pid:
                # Not the process `run` started: the restart policy's successor (its restart count
                # may not show yet), so it died once.
                c = replace(c, restarts=max(1, c.restarts))
        reply = self._start(a.incoming.request.id, a.decision.spec, a.started, c)
        if reply.ok and c is not None:
            containers[name] = c
        else:
            containers.pop(name, None)
        return Outcome(a.incoming, a.decision, reply, a.started)

    def _through_proc(self, a: Acted) -> Container | None:
        """The started container as /proc shows it, or None when only the runtime can tell."""
        assert isinstance(a.decision, Start)
        spec = a.decision.spec
        if a.pid <= 0 or not a.container_id:
            return None
        self._await_start_up(a, a.pid)
        ident = pidsignal.identify(a.pid, a.container_id)
        if ident is None:
            return None  # gone (it died at once), or not that container's: inspect says what happened
        if pidsignal.started_boottime(ident) > a.run_done_boot:
            return None  # started after `run` returned: the restart policy's successor, it died once
        return Container(a.container_id, spec.name, "running", a.pid, dict(spec.labels),
                         started=int(pidsignal.started_unix(ident)))

    def _await_start_up(self, a: Acted, pid: int | None) -> None:
        """Give a new program the time to die if it is going to die at once.

        A program whose profile names a `ready_pid_file` is past its start-up once that file (in its
        private /run, seen through /proc/PID/root, lstat'ed only) is newer than its `run`; any other
        program gets the fixed settle, counted from when its `run` returned. Either wait ends early
        when the process is gone. The check that follows reports a program that died (or that the
        runtime restarted) as failed either way.
        """
        assert isinstance(a.decision, Start)
        spec = a.decision.spec
        deadline = a.run_done + max(0, self.settle_ms) / 1000
        ready = None
        profile = self.policy.profiles.get(spec.profile)
        private = profile.pid_file(spec.args) if profile is not None and pid else None
        if private is not None and private.startswith("/run/") and ".." not in private:
            ready = f"/proc/{pid}/root{private}"
        while True:
            now = time.time()
            if now >= deadline or (ready is not None and written_since(ready, a.ran_at)):
                return
            if pid and pidsignal.start_ticks(pid) is None:
                return  # it died: no need to wait for the rest of the settle
            time.sleep(min(0.005 if ready else 0.01, deadline - now))

    def _start(self, rid: str, spec: SidecarSpec, started: bool, c: Container | None) -> Reply:
        # A restart by podman's own restart policy already means it died once: report it, since it
        # would otherwise look "running" in the middle of a crash loop.
        if c is None:
            why = "is not running"
        elif not c.running:
            why = f"exited with code {c.exit_code}"
        elif started and c.restarts > 0:
            why = f"exited and was restarted {c.restarts} time(s)"
        else:
            why = ""
        if c is None or why:
            logs = self.runtime.logs(spec.name) if c else ""
            self.runtime.remove(spec.name)
            msg = f"sidecar {spec.name} {why}" + (f": {logs[-400:]}" if logs else "")
            return Reply.failure(rid, ErrorCode.RUNTIME_FAILED, msg)
        try:
            self.policy.verify_started(c.pid)
        except SafespawnError as e:
            self.runtime.remove(spec.name)
            return Reply.failure(rid, e.code, e.message)
        return Reply(rid, True, spec.name, c.pid)


def update_desired(state: ChannelState, outcomes: list[Outcome], now: float) -> None:
    """The desired state after a batch: what started is desired, what stopped is not."""
    for o in outcomes:
        d = o.decision
        if isinstance(d, Start) and o.reply.ok:
            req = o.incoming.request
            old = state.desired.get(d.target)
            if old is None or old.argv != req.argv or old.netns != req.netns or o.started:
                state.desired[d.target] = DesiredSidecar(d.target, d.spec.profile, req.netns, req.argv,
                                                         req.id, now)
        elif (isinstance(d, Start) and o.started) or (isinstance(d, Stop | Remove) and o.reply.ok):
            # a start that created a container but failed, or a successful stop/kill
            state.desired.pop(d.target, None)


def record_processes(state: ChannelState, outcomes: list[Outcome], containers: dict[str, Container]) -> None:
    """Record the container and process each verified start runs as (the signal fast path's
    identity, pidsignal.py)."""
    for o in outcomes:
        d = o.decision
        if isinstance(d, Start) and o.reply.ok:
            c = containers.get(d.target)
            desired = state.desired.get(d.target)
            if c is None or desired is None or not c.running:
                continue
            if desired.identity is not None and desired.pid == c.pid and desired.container_id == c.id \
                    and desired.spec_hash == d.spec.spec_hash and desired.started_at == c.started:
                continue
            state.desired[d.target] = desired.running_as(pidsignal.identify(c.pid, c.id), d.spec.spec_hash,
                                                         c.started)


# -- publish -------------------------------------------------------------------------------------


def publish(s: _Sync, chan: ChannelDir, answered: list[Answered], outcomes: list[Outcome]) -> None:
    """Record the replies durably, publish them, then remove the requests."""
    for o in outcomes:
        _audit_outcome(s.audit, o)
        if not o.reply.ok:
            s.result.refused += 1
    s.audit.flush()
    s.state.complete([Done(a.rid, a.digest, a.reply.to_dict()) for a in answered]
                     + [Done(o.incoming.request.id, o.incoming.digest, o.reply.to_dict()) for o in outcomes])
    for a in answered:
        chan.write_reply(a.reply.to_dict())
    for o in outcomes:
        chan.write_reply(o.reply.to_dict())
    chan.sync_replies()
    for o in outcomes:
        chan.remove(o.incoming.entry)
        s.result.replies.append(metrics.ReplyObservation(o.incoming.request.op, "allowed" if o.reply.ok else "refused",
                                                 o.reply.error.code if o.reply.error else "",
                                                 _age(o.incoming.entry)))
    s.result.handled += len(outcomes) + len(answered)
    s.result.refused += len(answered)


def _audit_outcome(audit: AuditLog, o: Outcome) -> None:
    r = o.reply
    req = o.incoming.request
    audit.record("allow" if r.ok else "deny", req.id, "" if r.ok else (r.error.message if r.error else ""),
                 code=r.error.code if r.error else None, op=req.op, profile=req.profile, netns=req.netns,
                 sidecar=r.sidecar, pid=r.pid, signal=req.signal,
                 argv=list(req.argv) if req.op == "start" else None)


# -- reconcile -----------------------------------------------------------------------------------


class Reconciler:
    """Keeps a channel's containers converged on its desired state."""

    def __init__(self, runtime: Runtime, policy: Policy, clock: Callable[[], float],
                 pid_files: PidFileKeeper | None = None, workers: int = 4, settle_ms: int = 200) -> None:
        self.runtime = runtime
        self.policy = policy
        self.clock = clock
        self.pid_files = pid_files or PidFileKeeper()
        self.workers = max(1, workers)  # parallel respawns, and a rollout batch's parallel replacements
        self.settle_ms = settle_ms
        self.boot_time = _BOOT_TIME  # containers that exited before it are never restarted by the runtime

    def reconcile(self, s: _Sync, serve: Callable[[], None] | None = None) -> None:
        """Respawn desired sidecars that died (with backoff), drop those the policy no longer allows,
        remove orphans and leftovers of the channel.

        Quick (`s.quick`): when every desired sidecar still runs as recorded (its process verified
        through /proc, its netns still there), there is nothing to respawn and nothing is listed; a
        changed profile or image, orphans and leftovers wait for the next full sync.
        """
        if s.quick and self._all_run_as_recorded(s) and self._refresh_pid_files(s):
            changed = False
            now = self.clock()
            for name, d in list(s.state.desired.items()):
                if d.failures and d.recovered(now, d.started_at):
                    s.state.desired[name] = replace(d, failures=0, next_retry=0.0)
                    changed = True
            if changed:
                s.state.save_desired()
            return
        try:
            listing = s.listing.containers()
        except RuntimeFailed as e:
            s.result.errors.append(e.message)
            return
        state, audit = s.state, s.audit
        now = self.clock()
        changed = False
        to_start: list[tuple[DesiredSidecar, SidecarSpec]] = []
        outdated: list[tuple[DesiredSidecar, SidecarSpec, Container]] = []
        restarted: list[str] = []
        awaiting: list[tuple[DesiredSidecar, SidecarSpec, Container]] = []
        for name, d in list(state.desired.items()):
            c = listing.get(name)
            try:
                spec = self.policy.authorize_respawn(s.channel, d)
            except SafespawnError as e:
                # The netns is gone, or the host's policy no longer allows it: drop it.
                del state.desired[name]
                changed = True
                if c is not None:
                    self._remove_quiet(s, name)
                audit.record("reconcile", d.request_id, f"dropped {name}: {e.message}", sidecar=name)
                continue
            if c is not None and c.running and c.spec_hash == spec.spec_hash:
                # Restarted by the runtime's restart policy (new pid), or the file was removed or
                # replaced: every full sync makes the pid files true again.
                self.pid_files.refresh(s.channel.data_dirs, audit, spec, c.pid)
                ident = d.identity
                if d.failures or ident is None or (ident.pid, ident.container_id) != (c.pid, c.id) \
                        or d.spec_hash != spec.spec_hash or not d.started_at \
                        or not pidsignal.is_alive(ident):
                    # Running, but not as recorded (restarted by the runtime, recorded by an older
                    # version, or a stale record): record the process it runs as now.
                    # Its failures are forgotten only once it has run a while (crash loops keep
                    # their backoff: DesiredSidecar.recovered).
                    kept = replace(d, failures=0, next_retry=0.0) if d.recovered(now, c.started) else d
                    new = kept.running_as(pidsignal.identify(c.pid, c.id), spec.spec_hash, c.started)
                    if ident is not None and ident.container_id == c.id and ident.pid != c.pid:
                        restarted.append(name)  # the same container, a new process: the runtime's restart
                    if new != d:
                        state.desired[name] = new
                        changed = True
                continue
            if c is not None and c.running:
                # Running, but its image or profile changed: rolled in batches (rollout.py).
                self.pid_files.refresh(s.channel.data_dirs, audit, spec, c.pid)
                outdated.append((d, spec, c))
                continue
            if c is not None and _may_be_restarting(c, now, self.boot_time):
                awaiting.append((d, spec, c))
                continue
            if now < d.next_retry:
                continue
            to_start.append((d, spec))
        if awaiting:
            to_start += self._not_restarting(s, awaiting, now)
        if restarted and self._count_runtime_restarts(s, restarted):
            changed = True
        for name, c in list(listing.items()):
            if name not in state.desired:
                # An orphan of this channel (its request was stopped, or it never became desired),
                # or a leftover Created/Exited container.
                self._remove_quiet(s, name)
                audit.record("reconcile", None, f"removed {name} ({c.state}): not desired", sidecar=name)
        if changed:
            state.save_desired()
        if to_start:
            self._respawn(s, to_start, set(listing), now, serve)
        rolled = rollout.step(self.runtime, self.policy, s.channel, state, audit, s.result.errors, outdated,
                              workers=self.workers, settle_ms=self.settle_ms,
                              before_run=lambda spec: self.pid_files.hand_over(s.channel.data_dirs, audit, spec))
        if rolled:
            # New containers (the new spec, or the old image after a rollback): new host pids.
            s.listing.invalidate()
            try:
                now_running = self.runtime.inspect([r.name for r in rolled])
            except RuntimeFailed as e:
                s.result.errors.append(e.message)
                now_running = {}
            for r in rolled:
                c = now_running.get(r.name)
                if c is not None and c.running:
                    self.pid_files.refresh(s.channel.data_dirs, audit, r, c.pid, wait_child=1.0)
                    was = state.desired.get(r.name)
                    if was is not None:
                        # Record the new process, so that quick syncs and the signal fast path know it.
                        state.desired[r.name] = was.running_as(pidsignal.identify(c.pid, c.id), c.spec_hash,
                                                             c.started)
            state.save_desired()

    def _not_restarting(self, s: _Sync, awaiting: list[tuple[DesiredSidecar, SidecarSpec, Container]],
                        now: float) -> list[tuple[DesiredSidecar, SidecarSpec]]:
        """Of the sidecars that just exited with a failure, those the runtime will not restart: its
        restart policy has used its retries (one inspect: the listing has no restart counts), or the
        container is gone or another one. The others are left to the runtime: respawning one now would
        remove the container the runtime is starting again (a second restart, and a failure counted
        against its backoff). The next sync records the process the runtime started."""
        try:
            seen = self.runtime.inspect([d.name for d, _, _ in awaiting])
        except RuntimeFailed:
            seen = {}
        to_start = []
        for d, spec, c in awaiting:
            x = seen.get(d.name)
            if x is not None and x.id == c.id and (x.running or x.state == "restarting"
                                                   or x.restarts < spec.restart_retries):
                s.result.awaiting_restart += 1
                continue
            if now >= d.next_retry:
                to_start.append((d, spec))
        return to_start

    def _count_runtime_restarts(self, s: _Sync, names: list[str]) -> bool:
        """Sidecars the runtime's restart policy restarted since the last sync: their restart
        counts, from one inspect of just those (the listing has none), recorded for `status` and
        counted for the metrics. At least one each if the inspect fails."""
        try:
            seen = self.runtime.inspect(names)
        except RuntimeFailed:
            seen = {}
        changed = False
        for name in names:
            d = s.state.desired.get(name)
            if d is None:
                continue
            c = seen.get(name)
            count = c.restarts if c is not None and c.id == d.container_id and c.restarts > d.runtime_restarts \
                else d.runtime_restarts + 1
            s.result.runtime_restarts += count - d.runtime_restarts
            s.state.desired[name] = replace(d, runtime_restarts=count)
            changed = True
        return changed

    def _respawn(self, s: _Sync, to_start: list[tuple[DesiredSidecar, SidecarSpec]], existing: set[str],
                 now: float, serve: Callable[[], None] | None) -> None:
        """`workers` at a time, in chunks of 4 x workers; between chunks `serve` answers what arrived
        meanwhile (a reboot recovery of hundreds of sidecars must not hold an agent's request)."""
        state, audit = s.state, s.audit
        lock = threading.Lock()  # the result and the audit log are shared by the workers

        def one(d: DesiredSidecar, spec: SidecarSpec) -> None:
            try:
                if spec.name in existing:
                    self.runtime.remove(spec.name)
                with lock:
                    self.pid_files.hand_over(s.channel.data_dirs, audit, spec)
                self.runtime.run(spec)
                with lock:
                    s.result.respawned += 1
                    audit.record("reconcile", d.request_id, f"respawned {spec.name}", sidecar=spec.name)
            except RuntimeFailed as e:
                with lock:
                    s.result.errors.append(e.message)
                    s.result.respawn_failed += 1
                    audit.record("reconcile", d.request_id, f"respawn of {spec.name} failed: {e.message}",
                                 sidecar=spec.name)

        from concurrent.futures import ThreadPoolExecutor  # only a sync that respawns pays for the import

        chunk = 4 * self.workers
        with ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="safespawn-respawn") as pool:
            for n in range(0, len(to_start), chunk):
                if n and serve is not None:
                    state.save_desired()
                    s.listing.invalidate()
                    serve()
                # A request served meanwhile may have started, replaced or stopped one of these.
                part = [(d, spec) for d, spec in to_start[n:n + chunk] if state.desired.get(d.name) == d]
                for f in [pool.submit(one, d, spec) for d, spec in part]:
                    f.result()
                for d, _ in part:
                    state.desired[d.name] = d.failed(now)  # a failure until seen running (backoff)
        s.listing.invalidate()
        # One inspect records the processes the respawned sidecars run as, so that the next syncs
        # (and this one's status) need no listing.
        specs = {d.name: spec for d, spec in to_start}
        try:
            running = self.runtime.inspect(sorted(specs))
        except RuntimeFailed:
            running = {}
        for name, c in running.items():
            respawned = state.desired.get(name)
            if respawned is not None and c.running and c.spec_hash == specs[name].spec_hash:
                state.desired[name] = respawned.running_as(pidsignal.identify(c.pid, c.id), c.spec_hash, c.started)
                if specs[name].pid_files:
                    self.pid_files.refresh(s.channel.data_dirs, audit, specs[name], c.pid, wait_child=1.0)
        state.save_desired()

    def _refresh_pid_files(self, s: _Sync) -> bool:
        """The quick path keeps the host-written pid files true too (the agent may have removed or
        replaced one), with the recorded pid; False if a sidecar's spec no longer follows from the
        configuration (the full pass then drops it). The pid-file writer needs no check of the
        paths against the filesystem: it never follows a link (pidfiles.py)."""
        for d in s.state.desired.values():
            profile = self.policy.profiles.get(d.profile)
            if profile is None or not profile.pid_files:
                continue
            try:
                spec = self.policy.configured_spec(s.channel, d)
            except SafespawnError:
                return False
            self.pid_files.refresh(s.channel.data_dirs, s.audit, spec, d.pid)
        return True

    def _all_run_as_recorded(self, s: _Sync) -> bool:
        netns_dir = str(s.channel_netns_dir)
        for d in s.state.desired.values():
            ident = d.identity
            if ident is None or not d.spec_hash or not s.alive(ident):
                return False
            if d.netns is not None and not os.path.lexists(os.path.join(netns_dir, d.netns)):
                return False  # gone: the full pass drops the sidecar
        return True

    def _remove_quiet(self, s: _Sync, name: str) -> None:
        try:
            self.runtime.remove(name)
            s.result.removed += 1
            s.listing.forget(name)
        except RuntimeFailed as e:
            s.result.errors.append(e.message)
            s.listing.invalidate()

# -- status ------------------------------------------------------------------------------------


def status_of(name: str, state: ChannelState, containers: dict[str, Container], refresh: float,
              policy: Policy | None = None, channel: ChannelConfig | None = None) -> dict[str, Any]:
    """outbox/status.json: the channel's desired sidecars and what their containers do now.

    `refresh`: the host republishes at least this often; an older status is stale. With the policy
    and channel, also which sidecars run an outdated spec and the rollout's progress."""
    outdated: set[str] = set()
    progress: dict[str, Any] | None = None
    if policy is not None and channel is not None:
        outdated, progress = rollout.describe(policy, channel, state, containers)
    sidecars = []
    for d in sorted(state.desired.values(), key=lambda d: d.name):
        user = None
        if policy is not None and channel is not None:
            try:
                user = policy.configured_spec(channel, d).user  # the host uid:gid it runs as
            except SafespawnError:
                pass  # no longer allowed: reconcile drops it
        c = containers.get(d.name)
        running = c is not None and c.running
        # The start time as recorded when the record names this very process (the /proc check of a
        # start and podman's listing may round it to different seconds): a generation must not
        # change between a quick and a full sync of the same process.
        started = d.started_at if c is not None and running and d.started_at and \
            (d.container_id, d.pid) == (c.id, c.pid) else (c.started if c is not None else 0)
        # The runtime's restarts of the current container: inspect's count when `containers` came
        # from an inspect (`safespawn status`), else as the last sync that noticed one recorded it.
        runtime_restarts = 0
        if c is not None:
            runtime_restarts = max(c.restarts, d.runtime_restarts if c.id == d.container_id else 0)
        sidecars.append({
            "name": d.name, "profile": d.profile, "netns": d.netns,
            "key": sidecar_key(d.name, name, d.profile),
            "state": c.state if c else "absent", "pid": c.pid if c and running else None,
            "started": int(d.since), "restarts": d.failures + runtime_restarts,
            "respawns": d.failures, "runtime_restarts": runtime_restarts, "outdated": d.name in outdated,
            # Changes whenever the running process is replaced (a new container, a runtime
            # restart, a broker respawn): what an agent compares to see a restart.
            "generation": f"{c.id[:12]}-{started}-{c.pid}" if c and running else None,
            "process_started": started if c and running else None,
            "user": user,
        })
    now = time.time()
    st = {"v": 1, "channel": name, "updated": int(now), "published": round(now, 3),
          "refresh": int(refresh), "sidecars": sidecars}
    if progress is not None:
        st["rollout"] = progress
    if channel is not None:
        uid, gid = channel.sidecar_user
        st["sidecar_user"] = f"{uid}:{gid}"
        st["sidecar_user_source"] = "allocated" if channel.sidecar_uid_allocated else "configured"
    return st


# -- the engine: one sync, phase after phase -------------------------------------------------------


class Engine:
    def __init__(self, config: Config, runtime: Runtime | None = None, policy: Policy | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.config = config
        b = config.broker
        self.runtime: Runtime = runtime or make_runtime(b, {n: c.budget for n, c in config.channels.items()})
        self.policy = policy or Policy(config)
        self.clock = clock
        # The host writes the pid files Neutron reads, with host pids (docs/neutron.md, "Pid files"),
        # and hands each sidecar's writable files to its uid before a start.
        self.pid_files = PidFileKeeper()
        self.actor = Actor(self.runtime, b.parallel_starts, self.pid_files)
        # Jobs at once: parallel_starts runtime calls (Actor.slots), the rest waiting for start-ups.
        self.workers = 4 * max(1, b.parallel_starts)
        self.verifier = Verifier(self.runtime, self.policy, b.start_settle_ms)
        self.reconciler = Reconciler(self.runtime, self.policy, clock, self.pid_files, b.parallel_starts,
                                     b.start_settle_ms)
        self._converged: dict[str, float] = {}  # channel -> when a sync of it last ran to the end

    def sync_all(self) -> list[SyncResult]:
        return [self.sync(name) for name in sorted(self.config.channels)]

    def sync(self, name: str, wait: bool = True, full: bool = True) -> SyncResult:
        """Serve a channel's pending requests and reconcile its sidecars. Raises ChannelLocked when
        another sync holds the channel and `wait` is false.

        `full=False` (`sync --quick`, watch between its full passes): the reconcile trusts the
        recorded processes of running sidecars and lists nothing while they all verify."""
        channel = self.config.channel(name)
        b = self.config.broker
        t0 = time.monotonic()
        with ChannelState.locked(str(b.state_dir), name, wait=wait) as state:
            s = _Sync(channel, state, AuditLog(state.audit_path, name), SyncResult(name),
                      Listing(self.runtime, name), quick=not full, channel_netns_dir=str(b.netns_dir))
            try:
                with ChannelDir.of(b.channels_dir, name, state.quarantine_path) as chan:
                    for what, where in chan.repaired:
                        s.audit.record("quarantine", None, f"{what} was not a plain directory: moved aside and "
                                       "laid out again", code="bad_request", file=where)
                    before = dict(state.desired)
                    _Pipeline(self, s, chan).run()
                    last = self._converged.get(name)
                    if not full and s.result.handled and not s.result.errors and state.desired == before \
                            and last is not None and time.monotonic() - last < QUICK_CONVERGED_FOR:
                        # Only signals (or starts of what runs): nothing to publish, and the channel
                        # was reconciled and published moments ago. Under a stream of HUPs that
                        # happens at most once a second, so a HUP does not pay for the channel's size.
                        s.result.ok = True
                        return s.result
                    self.reconciler.reconcile(s, serve=lambda: _Pipeline(self, s, chan).run())
                    vouched = s.vouched() if not s.listing.fetched else {}
                    if not s.listing.fetched and len(vouched) == len(state.desired):
                        containers = vouched  # every sidecar verified as recorded: no listing needed
                    else:
                        try:
                            containers = s.listing.containers()
                        except RuntimeFailed:
                            containers = {}
                    st = status_of(name, state, containers, b.reconcile_interval, self.policy, channel)
                    s.result.sidecars = [(x["profile"], x["state"]) for x in st["sidecars"]]
                    s.result.outdated = sum(1 for x in st["sidecars"] if x["outdated"])
                    chan.write_status(st)
                    chan.prune_replies(b.reply_ttl)
                    chan.prune_tmp()
                    chan.prune_quarantine()
                    state.compact()
                    self._converged[name] = time.monotonic()
                    s.result.ok = True  # ran to the end (respawn failures have their own counter)
            except ChannelUnsafe as e:
                # The channel's layout was tampered with: serve nothing through it, but still keep
                # its sidecars converged.
                s.audit.record("deny", None, f"channel directory unsafe: {e}", code="bad_request")
                s.result.errors.append(str(e))
                self.reconciler.reconcile(s)
            finally:
                s.audit.flush()
                if b.metrics_file is not None:
                    metrics.record(str(b.state_dir), name, self.config.channels, str(b.metrics_file),
                                   s.result.observation(time.monotonic() - t0))
        return s.result

    def status(self, name: str) -> dict[str, Any]:
        """A channel's status from its state and a fresh listing (outside a sync: `safespawn status`)."""
        state = ChannelState.of(self.config.broker.state_dir, name)
        state.load()
        try:
            containers = Listing(self.runtime, name).containers()
            # The listing has no restart counts: one inspect of the desired sidecars' containers.
            for n, c in self.runtime.inspect(sorted(n for n in containers if n in state.desired)).items():
                if n in containers and containers[n].id == c.id:
                    containers[n] = replace(containers[n], restarts=c.restarts)
        except RuntimeFailed:
            containers = {}
        return status_of(name, state, containers, self.config.broker.reconcile_interval, self.policy,
                         self.config.channel(name))



# -- drain: the inbox served as a pipeline ---------------------------------------------------------


_POLL = 0.005  # while jobs run, how often the inbox is looked at for new requests (one scandir)


class _Pipeline:
    """Drain a channel's inbox: every request is answered as soon as its own work is done.

    Requests are taken (intake, claim) as they arrive, decided in rounds against one view, and
    carried out (act, check, pid files) by `parallel_starts` workers, one job per sidecar: the
    requests of one round for one sidecar run in order in one job, and a request for a sidecar
    whose job still runs waits for it. Each finished job is published at once (desired state,
    ledger, reply), so a slow `podman run` holds only its own agent, and an agent that got its reply
    is served again while the others' starts still run. A round that needs the runtime's listing
    (a request claimed before a crash, a pid the record does not vouch for) waits until no job runs,
    then lists once.
    """

    def __init__(self, engine: Engine, s: _Sync, chan: ChannelDir) -> None:
        self.e = engine
        self.s = s
        self.chan = chan
        self.budget = s.channel.max_requests_per_run
        self.taken: set[str] = set()  # inbox entries taken and not yet answered
        self.held: list[Incoming] = []  # taken, waiting for their sidecar's job (or for a listing)
        self.jobs: dict[Future[list[Outcome]], tuple[str, dict[str, Container]]] = {}
        self.busy: set[str] = set()
        self.targets: dict[str, str | None] = {}  # entry -> its sidecar, as _target_of found it
        self.pool: ThreadPoolExecutor | None = None

    def run(self) -> None:
        try:
            first = True
            while True:
                took = self._take(first)
                first = False
                self._dispatch()
                if not self.jobs:
                    if not took and not self.held:
                        break
                    continue
                self._collect()
        finally:
            if self.pool is not None:
                self.pool.shutdown(wait=True)
        _, waiting = self.chan.pending(0)
        self.s.result.deferred = waiting  # left for the next run, which the path unit / watch starts at once

    def _take(self, first: bool) -> bool:
        """Read, check and claim what arrived; answer the unreadable and malformed at once."""
        if self.budget <= 0:
            return False
        s, chan = self.s, self.chan
        entries, waiting = chan.pending(len(self.taken) + min(BATCH, self.budget))
        if first and waiting > s.channel.max_pending:
            self._refuse_excess(waiting)
            entries, waiting = chan.pending(min(BATCH, self.budget))
        new = [e for e in entries if e.name not in self.taken][:self.budget]
        if not new:
            return False
        self.budget -= len(new)
        taken = intake(s, chan, new)
        # Claim durably before acting: a crash from here on replays without acting twice.
        s.state.claim([Claim(i.request.id, i.digest) for i in taken.incoming if not i.interrupted])
        if taken.answered:
            publish(s, chan, taken.answered, [])
        for i in taken.incoming:
            self.taken.add(i.entry.name)
            self.held.append(i)
        return True

    def _target(self, i: Incoming) -> str | None:
        name = i.entry.name
        if name not in self.targets:
            self.targets[name] = self._target_of(i)
        return self.targets[name]

    def _target_of(self, i: Incoming) -> str | None:
        """The sidecar a request is for, if that is known before the gate (None: it takes a listing
        to know, or the gate will refuse it anyway)."""
        r = i.request
        try:
            if r.op == "start":
                # The name only: the gate (decide) runs the full checks once, right after.
                return self.e.policy.configured_spec(self.s.channel, r).name
            if r.pid is None:
                return self.e.policy.target_name(self.s.channel, r)
        except SafespawnError:
            return None
        for d in self.s.state.desired.values():
            if d.pid == r.pid and d.identity is not None:
                return d.name
        return None

    def _dispatch(self) -> None:
        """Decide the held requests whose sidecar has no job running, and start their jobs."""
        if not self.held:
            return
        s = self.s
        blocked = set(self.busy)
        ready: list[Incoming] = []
        rest: list[Incoming] = []
        targets: set[str] = set()
        for i in self.held:
            t = self._target(i)
            if t is not None and t not in blocked:
                ready.append(i)
                targets.add(t)
            else:
                if t is not None:
                    blocked.add(t)  # the later requests for it wait too, in order
                rest.append(i)
        if not ready and self.jobs:
            return  # everything held waits for a running job
        fast = self._decide_without_listing(ready, targets, self.busy) if ready else None
        if fast is None:
            # The gate needs the runtime's listing (or a request's sidecar is only known from
            # it): once nothing runs, list once and decide everything held against it.
            if self.jobs:
                return
            ready, rest = self.held, []
            try:
                containers = s.listing.containers()
            except RuntimeFailed as e:
                # podman itself is broken: answer now rather than leave the agents waiting.
                s.result.errors.append(e.message)
                self.held = []
                outs = [Outcome(i, None, Reply.failure(i.request.id, e.code, e.message)) for i in ready]
                self._publish([(outs, {})], ready)
                return
            planned = decide(self.e.policy, s, ready, containers)
            # The next round lists afresh: a sidecar may die right after its check.
            s.listing.invalidate()
        else:
            planned, containers = fast
        self.held = rest
        groups: dict[str, list[Planned]] = defaultdict(list)
        inline: list[Outcome] = []
        for p in planned:
            if p.decision is None:
                assert p.refusal is not None  # what a Planned without a decision carries
                inline.append(Outcome(p.incoming, None, p.refusal))
            else:
                groups[p.decision.target].append(p)
        if inline:
            self._publish([(inline, containers)], [o.incoming for o in inline])
        for target, group in groups.items():
            if all(self._instant(p) for p in group):
                # Signals through a pidfd take microseconds: a worker costs more.
                self._publish([(self._job(group, containers), containers)], [p.incoming for p in group])
                continue
            if self.pool is None:
                from concurrent.futures import ThreadPoolExecutor  # only a sync with work pays for it

                self.pool = ThreadPoolExecutor(max_workers=self.e.workers, thread_name_prefix="safespawn-act")
            self.busy.add(target)
            self.jobs[self.pool.submit(self._job, group, containers)] = (target, containers)

    def _instant(self, p: Planned) -> bool:
        d = p.decision
        rec = self.s.state.desired.get(d.target) if isinstance(d, Signal) else None
        return rec is not None and rec.identity is not None

    def _job(self, group: list[Planned], containers: dict[str, Container]) -> list[Outcome]:
        """One sidecar's requests of a round, in order: act, check, and (before the reply: the
        wrapper returns on it and Neutron reads the pid file next) the host-written pid files."""
        s, e = self.s, self.e
        outs = []
        for p in group:
            o = e.verifier.check(e.actor.act(s, p, containers), containers)
            if isinstance(o.decision, Start) and o.reply.ok:
                e.pid_files.refresh(s.channel.data_dirs, s.audit, o.decision.spec, o.reply.pid,
                                    wait_child=1.0 if o.started else 0.0)
            outs.append(o)
        return outs

    def _collect(self) -> None:
        """Publish the jobs that finished; wait for one at most _POLL (new requests may come)."""
        from concurrent.futures import FIRST_COMPLETED, wait

        done, _ = wait(list(self.jobs), timeout=_POLL if self.budget > 0 else None, return_when=FIRST_COMPLETED)
        finished = []
        for f in done:
            target, containers = self.jobs.pop(f)
            self.busy.discard(target)
            try:
                outs = f.result()
            except Exception:
                # A bug, not a runtime failure (those are replies): the sync fails; the requests
                # stay claimed, and the next sync answers them as interrupted ones.
                log.exception("serving requests for %s failed", target)
                raise
            finished.append((outs, containers))
        if finished:
            self._publish(finished, [o.incoming for outs, _ in finished for o in outs])

    def _publish(self, done: list[tuple[list[Outcome], dict[str, Container]]], incoming: list[Incoming]) -> None:
        self._complete(done)
        for i in incoming:
            self.taken.discard(i.entry.name)
            self.targets.pop(i.entry.name, None)

    def _decide_without_listing(self, incoming: list[Incoming], targets: set[str],
                                in_flight: Iterable[str] = ()) -> tuple[list[Planned], dict[str, Container]] | None:
        """The gate's decisions against what the desired state vouches for (recorded processes that
        still verify; of the requests' `targets` only, so that the reply does not wait for the
        whole channel's checks), and that view, if that is enough. None when the runtime's listing is needed: a request
        claimed before a crash (what it did is only known to the runtime), a signal or stop of a
        pid or name the record does not vouch for.

        A start needs no listing: the quota counts desired sidecars, the same sidecar running as
        recorded is answered from its record, and a leftover under the name of one that is not
        desired is found by `run` itself (Actor._run)."""
        if any(i.interrupted for i in incoming):
            return None
        s = self.s
        vouched = s.vouched(targets)
        planned = decide(self.e.policy, s, incoming, vouched, in_flight)
        for p in planned:
            d = p.decision
            if d is None:
                if p.refusal is not None and p.refusal.error is not None and \
                        p.refusal.error.code == ErrorCode.NOT_FOUND.value:
                    return None  # maybe one the record does not vouch for: ask the runtime
                continue
            if d.target not in vouched and (not isinstance(d, Start) or d.target in s.state.desired):
                return None  # a desired sidecar the record does not vouch for: does it still run?
        return planned, vouched

    def _refuse_excess(self, waiting: int) -> None:
        """A flood: refuse the newest requests beyond max_pending with `quota`, cheaply."""
        s, chan = self.s, self.chan
        entries, _ = chan.pending(waiting)
        excess = [entries[i] for i in flood_excess(s.channel, [e.rid for e in entries], s.state.ledger)]
        done = []
        for e in excess:
            if e.rid is not None:
                reply = Reply.failure(e.rid, ErrorCode.QUOTA, f"more than {s.channel.max_pending} requests pending")
                chan.write_reply(reply.to_dict(), fsync=False)
                done.append(Done(e.rid, "", reply.to_dict()))
        os.sync()  # one flush for all the refusals instead of one fsync each
        s.state.complete(done)
        for e in excess:
            chan.quarantine(e) if e.rid is None else chan.remove(e)
        s.audit.record("deny", None, f"flood: refused {len(excess)} requests beyond max_pending "
                       f"({s.channel.max_pending})", code="quota")
        s.result.refused += len(excess)
        s.result.replies.extend(metrics.ReplyObservation("unknown", "refused", "quota") for _ in excess)

    def _complete(self, done: list[tuple[list[Outcome], dict[str, Container]]]) -> None:
        """Desired state (durable), then the replies (publish): for the jobs that finished together."""
        s, chan = self.s, self.chan
        before = dict(s.state.desired)
        outcomes = []
        for outs, containers in done:
            update_desired(s.state, outs, self.e.clock())
            record_processes(s.state, outs, containers)
            outcomes += outs
        if s.state.desired != before:
            s.state.save_desired()
        publish(s, chan, [], outcomes)
