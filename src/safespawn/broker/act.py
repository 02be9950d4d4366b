"""The decide, act and verify phases: the policy's gate for each request (-> `Planned`), the
decisions carried out through the runtime or a pidfd (`Actor` -> `Acted`), and the check after a
start (`Verifier` -> `Outcome`). engine.py's pipeline runs them, one job per sidecar.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import replace

from ..errors import ErrorCode, RuntimeFailed, SafespawnError
from ..runtime import Container, Runtime
from . import pidsignal
from .pidfiles import PidFileKeeper
from .policy import ChannelView, Decision, Policy, Remove, Signal, Start, Stop
from .readiness import written_since
from .request import Reply
from .sidecar import LABEL_CHANNEL, SidecarSpec
from .sync import Acted, Incoming, Outcome, Planned, SyncContext

log = logging.getLogger(__name__)


# -- decide ------------------------------------------------------------------------------------


def decide(policy: Policy, s: SyncContext, incoming: list[Incoming], containers: dict[str, Container],
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

    def act(self, s: SyncContext, p: Planned, containers: dict[str, Container]) -> Acted:
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

    def _one(self, s: SyncContext, i: Incoming, d: Decision, containers: dict[str, Container]) -> Acted:
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

    def _run(self, s: SyncContext, spec: SidecarSpec) -> str | None:
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

    def _deliver(self, s: SyncContext, name: str, signal: str) -> None:
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
