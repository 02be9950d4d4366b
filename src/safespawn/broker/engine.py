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

Each phase has its module: intake.py; act.py (decide, act, verify); publish.py; reconcile.py
(reconcile, status); and sync.py holds what they share (the sync's context and result, the listing,
the values they hand each other). This module holds the engine and the drain (`_Pipeline`, with
the flood refusal and the claim) that runs them.

The runtime's listing of the channel (`Listing`) is taken only when a round or reconcile needs it;
a quick sync of a converged channel lists nothing. A runtime failure makes it stale, and the next
use lists again.

A crash at any step loses nothing: the request stays in the inbox until its reply is durable, and
the ledger answers a replayed request with its first reply instead of acting twice.
"""

from __future__ import annotations

import logging
import os
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from ..config import Config
from ..errors import ChannelUnsafe, ErrorCode, RuntimeFailed, SafespawnError
from ..runtime import Container, Runtime, make_runtime
from . import metrics
from .act import Actor, Verifier, decide
from .audit import AuditLog
from .inbox import ChannelDir
from .intake import intake
from .pidfiles import PidFileKeeper
from .policy import Policy, Signal, Start, flood_excess
from .publish import publish, record_processes, update_desired
from .reconcile import Reconciler, status_of
from .request import Reply
from .state import ChannelState, Claim, Done
from .sync import Incoming, Listing, Outcome, Planned, SyncContext, SyncResult

if TYPE_CHECKING:
    from concurrent.futures import Future, ThreadPoolExecutor

log = logging.getLogger(__name__)
BATCH = 256
# A quick sync that changed nothing (signals only) skips reconcile and status if the channel's last
# sync in this process ran to the end less than this many seconds ago.
QUICK_CONVERGED_FOR = 1.0


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
            s = SyncContext(channel, state, AuditLog(state.audit_path, name), SyncResult(name),
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

    def __init__(self, engine: Engine, s: SyncContext, chan: ChannelDir) -> None:
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
