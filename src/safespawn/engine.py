"""The sync engine: drain a channel's inbox, act through the runtime, reply, reconcile.

One sync of a channel, under its lock:
    1. drain, batch by batch until the inbox is empty (or the per-run limit is reached):
       read each entry safely -> parse -> ledger check (replay) -> claim (durable)
       -> policy -> act through the runtime (in parallel across sidecars)
       -> desired state (durable) -> ledger "done" with the reply (durable)
       -> publish the reply -> remove the request
    2. reconcile: respawn desired sidecars that died (with backoff), drop those whose netns is
       gone or whose policy no longer allows them, remove orphans and leftovers of the channel
    3. publish outbox/status.json

A crash at any step loses nothing: the request stays in the inbox until its reply is durable, and
the ledger answers a replayed request with its first reply instead of acting twice.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from .audit import AuditLog
from .config import ChannelConfig, Config
from .errors import (
    BadRequest,
    ChannelUnsafe,
    ErrorCode,
    Interrupted,
    NotFound,
    QuotaExceeded,
    RuntimeFailed,
    SafespawnError,
)
from .inbox import ChannelDir, Entry
from .policy import Policy, host_netns_ids
from .request import Reply, Request, parse_request
from .runtime import Container, PodmanRuntime, Runtime
from .sidecar import LABEL_PROFILE, SidecarSpec
from .state import ChannelState, DesiredSidecar

log = logging.getLogger(__name__)
BATCH = 256
# The id of a listing entry for a container this batch started (its real id and pid come later).
STARTED_IN_BATCH = "(started in this batch)"


@dataclass
class Item:
    entry: Entry
    request: Request
    digest: str
    interrupted: bool = False
    target: str = ""
    spec: SidecarSpec | None = None
    action: str = ""  # start | deliver | stop | remove
    signal: str = ""
    reply: Reply | None = None
    started: bool = False  # a container was (re)created for this start


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


class Engine:
    def __init__(self, config: Config, runtime: Runtime | None = None, policy: Policy | None = None) -> None:
        self.config = config
        b = config.broker
        self.runtime: Runtime = runtime or PodmanRuntime(b.podman, b.podman_timeout)
        self.policy = policy or Policy(config)
        self.host_ns = host_netns_ids()

    # -- entry points --------------------------------------------------------------------------

    def sync_all(self) -> list[SyncResult]:
        return [self.sync(name) for name in sorted(self.config.channels)]

    def sync(self, name: str, wait: bool = True) -> SyncResult:
        channel = self.config.channel(name)
        b = self.config.broker
        result = SyncResult(name)
        with ChannelState.locked(str(b.state_dir), name, wait=wait) as state:
            audit = AuditLog(state.audit_path, name)
            try:
                with ChannelDir(str(b.channels_dir / name), state.quarantine_path) as chan:
                    for what, where in chan.repaired:
                        audit.record("quarantine", None, f"{what} was not a plain directory: moved aside and "
                                     "laid out again", code="bad_request", file=where)
                    self._drain(channel, chan, state, audit, result)
                    self._reconcile(channel, state, audit, result)
                    self._publish_status(channel, chan, state)
                    chan.prune_replies(b.reply_ttl)
                    chan.prune_tmp()
                    chan.prune_quarantine()
                    state.compact()
            except ChannelUnsafe as e:
                # The channel's layout was tampered with: serve nothing through it, but still keep
                # its sidecars converged.
                audit.record("deny", None, f"channel directory unsafe: {e}", code="bad_request")
                result.errors.append(str(e))
                self._reconcile(channel, state, audit, result)
            finally:
                audit.flush()
        return result

    # -- drain ---------------------------------------------------------------------------------

    def _drain(self, channel: ChannelConfig, chan: ChannelDir, state: ChannelState, audit: AuditLog,
               result: SyncResult) -> None:
        budget = channel.max_requests_per_run
        first = True
        while budget > 0:
            entries, waiting = chan.pending(min(BATCH, budget))
            if not entries:
                return
            if first and waiting > channel.max_pending:
                self._refuse_excess(channel, chan, state, audit, result, waiting)
                entries, waiting = chan.pending(min(BATCH, budget))
            first = False
            self._batch(channel, chan, state, audit, result, entries)
            budget -= len(entries)
        _, waiting = chan.pending(0)
        result.deferred = waiting  # left for the next run, which the path unit / watch starts at once

    def _refuse_excess(self, channel: ChannelConfig, chan: ChannelDir, state: ChannelState, audit: AuditLog,
                       result: SyncResult, waiting: int) -> None:
        """A flood: refuse the newest requests beyond max_pending with `quota`, cheaply."""
        entries, _ = chan.pending(waiting)
        # An id the ledger knows (answered, or claimed before a crash) keeps its normal path: a
        # replay or an interrupted request must still get its one reply.
        excess = [e for e in entries[channel.max_pending:] if e.rid is None or e.rid not in state.ledger]
        answered = []
        for e in excess:
            if e.rid is not None:
                reply = Reply.failure(e.rid, ErrorCode.QUOTA, f"more than {channel.max_pending} requests pending")
                chan.write_reply(reply.to_dict(), fsync=False)
                answered.append((e.rid, "", reply.to_dict()))
        os.sync()  # one flush for all the refusals instead of one fsync each
        state.complete(answered)
        for e in excess:
            chan.quarantine(e) if e.rid is None else chan.remove(e)
        audit.record("deny", None, f"flood: refused {len(excess)} requests beyond max_pending "
                     f"({channel.max_pending})", code="quota")
        result.refused += len(excess)

    def _batch(self, channel: ChannelConfig, chan: ChannelDir, state: ChannelState, audit: AuditLog,
               result: SyncResult, entries: list[Entry]) -> None:
        items: list[Item] = []
        done: list[tuple[str, str, dict[str, Any]]] = []  # (id, digest, reply) answered without acting

        # 1. read, parse, ledger check -- everything here is hostile input.
        for entry in entries:
            if entry.rid is None:
                where = chan.quarantine(entry)
                audit.record("quarantine", None, f"inbox entry {entry.name[:80]!r} is not named ID.json",
                             code="bad_request", file=where)
                result.quarantined += 1
                continue
            try:
                raw = chan.read(entry, channel.max_request_bytes)
            except FileNotFoundError:
                continue  # withdrawn by the client after its timeout
            except (SafespawnError, OSError) as e:
                code, msg = ((e.code, e.message) if isinstance(e, SafespawnError)
                             else (ErrorCode.BAD_REQUEST, f"unreadable inbox entry: {e.strerror}"))
                prior = state.ledger.get(entry.rid)
                where = chan.quarantine(entry)
                result.quarantined += 1
                if prior is not None and prior.state == "done":
                    # DENY: an id that was already answered keeps its first reply.
                    audit.record("quarantine", entry.rid, f"{msg} (id already answered)", code=code.value,
                                 file=where)
                    continue
                reply = Reply.failure(entry.rid, code, msg)
                audit.record("quarantine", entry.rid, msg, code=code.value, file=where)
                done.append((entry.rid, "", reply.to_dict()))
                continue
            digest = hashlib.sha256(raw).hexdigest()
            prior = state.ledger.get(entry.rid)
            if prior is not None and prior.state == "done":
                if prior.digest == digest and prior.reply is not None:
                    # A replay (the host crashed after replying, before removing the request).
                    if not chan.has_reply(entry.rid):
                        chan.write_reply(prior.reply)
                    chan.remove(entry)
                    audit.record("replay", entry.rid, "answered from the ledger")
                    result.replayed += 1
                else:
                    # DENY: a different request reusing an answered id must not overwrite its reply.
                    where = chan.quarantine(entry)
                    audit.record("quarantine", entry.rid, "id collides with an earlier request",
                                 code="bad_request", file=where)
                    result.quarantined += 1
                continue
            try:
                req = parse_request(raw, entry.rid)
            except BadRequest as e:
                where = chan.quarantine(entry)
                audit.record("quarantine", entry.rid, e.message, code=e.code.value, file=where)
                result.quarantined += 1
                done.append((entry.rid, digest, Reply.failure(entry.rid, e.code, e.message).to_dict()))
                continue
            interrupted = prior is not None and prior.state == "claimed" and prior.digest == digest
            items.append(Item(entry, req, digest, interrupted=interrupted))

        # 2. claim durably before acting: a crash from here on replays without acting twice.
        state.claim([(it.request.id, it.digest) for it in items if not it.interrupted])

        # 3. decide and act.
        listing: dict[str, Container] | None = None
        if items:
            try:
                listing = {c.name: c for c in self.runtime.list(channel.name)}
            except RuntimeFailed as e:
                # podman itself is broken: answer now rather than leave the agents waiting.
                for it in items:
                    it.reply = Reply.failure(it.request.id, e.code, e.message)
                result.errors.append(e.message)
        if listing is not None:
            self._plan(channel, state, items, listing, audit)
            self._act(channel, items, listing)
            self._finish_starts(channel, state, items, audit)
            self._update_desired(state, items)
            state.save_desired()

        # 4. record the replies durably, publish them, then remove the requests.
        for it in items:
            assert it.reply is not None
            self._audit_item(audit, it)
            if not it.reply.ok:
                result.refused += 1
        audit.flush()
        state.complete(done + [(it.request.id, it.digest, it.reply.to_dict()) for it in items if it.reply])
        for _, _, r in done:
            chan.write_reply(r)
        for it in items:
            assert it.reply is not None
            chan.write_reply(it.reply.to_dict())
        chan.sync_replies()
        for it in items:
            chan.remove(it.entry)
        result.handled += len(items) + len(done)
        result.refused += len(done)

    def _audit_item(self, audit: AuditLog, it: Item) -> None:
        r = it.reply
        assert r is not None
        req = it.request
        audit.record("allow" if r.ok else "deny", req.id, "" if r.ok else (r.error.message if r.error else ""),
                     code=r.error.code if r.error else None, op=req.op, profile=req.profile, netns=req.netns,
                     sidecar=r.sidecar, pid=r.pid, signal=req.signal,
                     argv=list(req.argv) if req.op == "start" else None)

    def _plan(self, channel: ChannelConfig, state: ChannelState, items: list[Item],
              listing: dict[str, Container], audit: AuditLog) -> None:
        """Policy for every item, in order; sets each item's target and action, or its refusal."""
        by_pid = {c.pid: c for c in listing.values() if c.running}
        desired = set(state.desired)
        for it in items:
            req = it.request
            try:
                if req.op == "start":
                    it.spec = self.policy.authorize_start(channel, req)
                    it.target, it.action = it.spec.name, "start"
                    if it.target not in desired and len(desired) >= channel.max_sidecars:
                        raise QuotaExceeded(f"channel {channel.name} already runs {channel.max_sidecars} sidecars")
                    desired.add(it.target)
                    continue
                if req.pid is not None:
                    c = by_pid.get(req.pid)
                    # DENY: a pid that is not one of this channel's running sidecars (a host process,
                    # another channel's sidecar, a pid reused after a sidecar died).
                    if c is None or (req.profile is not None and c.labels.get(LABEL_PROFILE) != req.profile):
                        raise NotFound(f"no sidecar of channel {channel.name} has pid {req.pid}")
                    it.target, profile = c.name, c.labels.get(LABEL_PROFILE, "")
                else:
                    it.target, profile = self.policy.target_name(channel, req), str(req.profile)
                    if it.target not in listing and it.target not in desired:
                        raise NotFound(f"no sidecar {it.target}")
                if req.op == "stop":
                    self.policy.profile_for(channel, profile)
                    it.action = "stop"
                else:
                    assert req.signal is not None
                    d = self.policy.authorize_signal(channel, profile, req.signal)
                    it.action, it.signal = d.action, d.signal
                    if d.action == "deliver":
                        c = listing.get(it.target)
                        if c is None or not c.running:
                            raise NotFound(f"sidecar {it.target} is not running")
                        if it.interrupted:
                            # At most once: the broker died while delivering; do not deliver twice.
                            raise Interrupted("the broker was interrupted while delivering this signal; "
                                                 "it may or may not have been delivered")
                if it.action in ("stop", "remove"):
                    desired.discard(it.target)
            except SafespawnError as e:
                it.reply = Reply.failure(req.id, e.code, e.message)

    def _act(self, channel: ChannelConfig, items: list[Item], listing: dict[str, Container]) -> None:
        """Run the planned actions: in order per sidecar, in parallel across sidecars."""
        groups: dict[str, list[Item]] = defaultdict(list)
        for it in items:
            if it.reply is None:
                groups[it.target].append(it)
        if not groups:
            return

        def run_group(group: list[Item]) -> None:
            for it in group:
                try:
                    self._act_one(it, listing)
                except SafespawnError as e:
                    it.reply = Reply.failure(it.request.id, e.code, e.message)

        workers = max(1, min(self.config.broker.parallel_starts, len(groups)))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="safespawn-act") as pool:
            for f in [pool.submit(run_group, g) for g in groups.values()]:
                f.result()

    def _act_one(self, it: Item, listing: dict[str, Container]) -> None:
        name = it.target
        c = listing.get(name)
        if it.action == "start":
            assert it.spec is not None
            if c is not None and c.spec_hash == it.spec.spec_hash and (c.running or c.id == STARTED_IN_BATCH):
                return  # the same sidecar already runs: nothing to do (reply filled in later)
            if c is not None:
                self.runtime.remove(name)  # different spec, or exited/created: replace it
            self.runtime.run(it.spec)
            it.started = True
            # Later requests of this batch for the same sidecar see what was just started.
            listing[name] = Container(STARTED_IN_BATCH, name, "created", 0, it.spec.labels)
        elif it.action == "deliver":
            self.runtime.signal(name, it.signal)
            it.reply = Reply(it.request.id, True, name, c.pid if c else None)
        elif it.action == "stop":
            grace = it.spec.stop_grace if it.spec else self._grace(name, c)
            self.runtime.stop(name, grace)
            it.reply = Reply(it.request.id, True, name, c.pid if c else None)
            listing.pop(name, None)
        elif it.action == "remove":
            self.runtime.remove(name)
            it.reply = Reply(it.request.id, True, name, c.pid if c else None)
            listing.pop(name, None)

    def _grace(self, name: str, c: Container | None) -> int:
        profile = c.labels.get(LABEL_PROFILE) if c else None
        p = self.policy.profiles.get(profile or "")
        return p.stop_grace if p else 10

    def _finish_starts(self, channel: ChannelConfig, state: ChannelState, items: list[Item],
                       audit: AuditLog) -> None:
        """One inspect after all starts: the reply carries the host pid, or why it did not run."""
        starts = [it for it in items if it.action == "start" and it.reply is None]
        if not starts:
            return
        if any(it.started for it in starts):
            time.sleep(max(0, self.config.broker.start_settle_ms) / 1000)
        now = self.runtime.inspect(sorted({it.target for it in starts}))
        for it in starts:
            c = now.get(it.target)
            # A restart by podman's own restart policy already means it died once: report it, since
            # it would otherwise look "running" in the middle of a crash loop.
            if c is None:
                why = "is not running"
            elif not c.running:
                why = f"exited with code {c.exit_code}"
            elif it.started and c.restarts > 0:
                why = f"exited and was restarted {c.restarts} time(s)"
            else:
                why = ""
            if why or c is None:
                logs = self.runtime.logs(it.target) if c else ""
                self.runtime.remove(it.target)
                msg = f"sidecar {it.target} {why}" + (f": {logs[-400:]}" if logs else "")
                it.reply = Reply.failure(it.request.id, ErrorCode.RUNTIME_FAILED, msg)
                continue
            if not self._netns_is_private(c.pid):
                # DENY: the netns was swapped for the host's between the check and the start.
                self.runtime.remove(it.target)
                it.reply = Reply.failure(it.request.id, ErrorCode.POLICY_DENIED,
                                         "the sidecar ended up in the host's network namespace; removed")
                continue
            it.reply = Reply(it.request.id, True, it.target, c.pid)

    def _netns_is_private(self, pid: int) -> bool:
        try:
            st = os.stat(f"/proc/{pid}/ns/net")
        except OSError:
            return True  # not visible from here (no shared pid namespace): podman joined the path we checked
        return (st.st_dev, st.st_ino) not in self.host_ns

    def _update_desired(self, state: ChannelState, items: list[Item]) -> None:
        for it in items:
            assert it.reply is not None
            req = it.request
            if it.action == "start" and it.reply.ok:
                old = state.desired.get(it.target)
                if old is None or old.argv != req.argv or old.netns != req.netns or it.started:
                    state.desired[it.target] = DesiredSidecar(it.target, str(req.profile), req.netns, req.argv,
                                                              req.id, time.time())
            elif (it.action == "start" and it.started) or (it.action in ("stop", "remove") and it.reply.ok):
                # a start that created a container but failed, or a successful stop/kill
                state.desired.pop(it.target, None)

    # -- reconcile -----------------------------------------------------------------------------

    def _reconcile(self, channel: ChannelConfig, state: ChannelState, audit: AuditLog,
                   result: SyncResult) -> None:
        try:
            listing = {c.name: c for c in self.runtime.list(channel.name)}
        except RuntimeFailed as e:
            result.errors.append(e.message)
            return
        now = time.time()
        changed = False
        to_start: list[tuple[DesiredSidecar, SidecarSpec]] = []
        for name, d in list(state.desired.items()):
            c = listing.get(name)
            try:
                spec = self.policy.authorize_start(channel, Request(d.request_id or "0" * 32, "start", d.profile,
                                                                    d.netns, d.argv))
            except SafespawnError as e:
                # The netns is gone, or the host's policy no longer allows it: drop it.
                del state.desired[name]
                changed = True
                if c is not None:
                    self._remove_quiet(name, result)
                audit.record("reconcile", d.request_id, f"dropped {name}: {e.message}", sidecar=name)
                continue
            if c is not None and c.running and c.spec_hash == spec.spec_hash:
                if d.failures:
                    state.desired[name] = DesiredSidecar(d.name, d.profile, d.netns, d.argv, d.request_id, d.since)
                    changed = True
                continue
            if now < d.next_retry:
                continue
            to_start.append((d, spec))
        for name, c in listing.items():
            if name not in state.desired:
                # An orphan of this channel (its request was stopped, or it never became desired),
                # or a leftover Created/Exited container.
                self._remove_quiet(name, result)
                audit.record("reconcile", None, f"removed {name} ({c.state}): not desired", sidecar=name)
        for d, spec in to_start:
            try:
                if spec.name in listing:
                    self.runtime.remove(spec.name)
                self.runtime.run(spec)
                result.respawned += 1
                audit.record("reconcile", d.request_id, f"respawned {spec.name}", sidecar=spec.name)
            except RuntimeFailed as e:
                result.errors.append(e.message)
                audit.record("reconcile", d.request_id, f"respawn of {spec.name} failed: {e.message}",
                             sidecar=spec.name)
            state.desired[d.name] = d.failed(now)
            changed = True
        if changed:
            state.save_desired()

    def _remove_quiet(self, name: str, result: SyncResult) -> None:
        try:
            self.runtime.remove(name)
            result.removed += 1
        except RuntimeFailed as e:
            result.errors.append(e.message)

    # -- status --------------------------------------------------------------------------------

    def _publish_status(self, channel: ChannelConfig, chan: ChannelDir, state: ChannelState) -> None:
        chan.write_status(self.status(channel.name, state))

    def status(self, name: str, state: ChannelState | None = None) -> dict[str, Any]:
        if state is None:
            state = ChannelState(os.path.join(str(self.config.broker.state_dir), name))
            state.load()
        try:
            listing = {c.name: c for c in self.runtime.list(name)}
        except RuntimeFailed:
            listing = {}
        sidecars = []
        for d in sorted(state.desired.values(), key=lambda d: d.name):
            c = listing.get(d.name)
            running = c is not None and c.running
            sidecars.append({
                "name": d.name, "profile": d.profile, "netns": d.netns,
                "key": d.name[len(name) + len(d.profile) + 2:],
                "state": c.state if c else "absent", "pid": c.pid if c and running else None,
                "started": int(d.since), "restarts": d.failures,
                # Changes whenever the running process is replaced (a new container, a runtime
                # restart, a broker respawn): what an agent compares to see a restart.
                "generation": f"{c.id[:12]}-{c.started}-{c.pid}" if c and running else None,
                "process_started": c.started if c and running else None,
            })
        # `refresh`: the host republishes at least this often; an older status is stale.
        return {"v": 1, "channel": name, "updated": int(time.time()), "published": round(time.time(), 3),
                "refresh": int(self.config.broker.reconcile_interval), "sidecars": sidecars}

