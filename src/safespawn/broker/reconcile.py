"""The reconcile and status phases: keep a channel's containers converged on its desired state
(respawn, drop, roll, remove orphans), then describe them in outbox/status.json.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from ..config import ChannelConfig
from ..errors import RuntimeFailed, SafespawnError
from ..runtime import Container, Runtime
from . import pidsignal, rollout
from .pidfiles import PidFileKeeper
from .policy import Policy
from .sidecar import SidecarSpec, sidecar_key
from .state import ChannelState, DesiredSidecar
from .sync import SyncContext

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

    def reconcile(self, s: SyncContext, serve: Callable[[], None] | None = None) -> None:
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

    def _not_restarting(self, s: SyncContext, awaiting: list[tuple[DesiredSidecar, SidecarSpec, Container]],
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

    def _count_runtime_restarts(self, s: SyncContext, names: list[str]) -> bool:
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

    def _respawn(self, s: SyncContext, to_start: list[tuple[DesiredSidecar, SidecarSpec]], existing: set[str],
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

    def _refresh_pid_files(self, s: SyncContext) -> bool:
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

    def _all_run_as_recorded(self, s: SyncContext) -> bool:
        netns_dir = str(s.channel_netns_dir)
        for d in s.state.desired.values():
            ident = d.identity
            if ident is None or not d.spec_hash or not s.alive(ident):
                return False
            if d.netns is not None and not os.path.lexists(os.path.join(netns_dir, d.netns)):
                return False  # gone: the full pass drops the sidecar
        return True

    def _remove_quiet(self, s: SyncContext, name: str) -> None:
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
