"""Rolling upgrades: when a channel's image (or a profile's spec) changes, its sidecars are replaced in
bounded batches, never all at once, and requests are served between batches.

Each sync serves the inbox first, then reconcile hands the running sidecars whose container spec is
outdated to `step`, which replaces at most `rollout_batch` of them, and only once `rollout_pause`
seconds have passed since the previous batch. A batch is checked the way a start is (after the
settle time, one inspect: running, not restarted); a sidecar whose new spec fails is put back on its
old image and the rollout stops with state "failed" and the reason, until the operator resumes it
(`safespawn rollout CH --resume`) or changes the config again. `--pause` holds it; `safespawn status`
shows which sidecars are outdated and the progress.

State: state_dir/CH/rollout.json (host-private), written under the channel's lock:
    {"target": ID of the channel's config, "state": rolling|paused|failed|done, "total", "replaced",
     "batches", "started", "last_batch", "failed": [names], "message"}
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import RuntimeFailed, SafespawnError
from .files import atomic_write, open_dir

if TYPE_CHECKING:
    from ..config import ChannelConfig, Config
    from ..runtime import Container, Runtime
    from .audit import AuditLog
    from .policy import Policy
    from .sidecar import SidecarSpec
    from .state import ChannelState, DesiredSidecar

log = logging.getLogger(__name__)
STATE_FILE = "rollout.json"


@dataclass
class RolloutState:
    target: str = ""
    state: str = "done"  # rolling | paused | failed | done
    total: int = 0
    replaced: int = 0
    batches: int = 0
    started: float = 0.0
    last_batch: float = 0.0
    failed: list[str] = field(default_factory=list)
    message: str = ""

    @classmethod
    def load(cls, state_dir: str) -> RolloutState:
        try:
            with open(os.path.join(state_dir, STATE_FILE), "rb") as f:
                d = json.load(f)
            return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})
        except FileNotFoundError:
            return cls()
        except (ValueError, TypeError):
            log.warning("%s: unreadable, starting over", os.path.join(state_dir, STATE_FILE))
            return cls()

    def save(self, state_dir: str) -> None:
        dfd = open_dir(state_dir)
        try:
            atomic_write(dfd, STATE_FILE, json.dumps(asdict(self), indent=1).encode(), mode=0o600)
        finally:
            os.close(dfd)


def config_id(policy: Policy, channel: ChannelConfig) -> str:
    """What a rollout is rolling to: the channel's image, data dirs and its profiles' specs."""
    parts = [channel.image, repr(channel.data_dirs)] + [repr(policy.profiles.get(p)) for p in channel.profiles]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def step(runtime: Runtime, policy: Policy, channel: ChannelConfig, state: ChannelState, audit: AuditLog,
         errors: list[str], outdated: list[tuple[DesiredSidecar, SidecarSpec, Container]], workers: int = 4,
         settle_ms: int = 200, before_run: Callable[[SidecarSpec], None] | None = None) -> list[SidecarSpec]:
    """Called by reconcile with the running sidecars whose spec changed; replaces one batch at most.

    Returns the specs of the batch it replaced (each now a new container, on the new spec or rolled
    back to the old image), so the caller can refresh their pid files."""
    ro = RolloutState.load(state.path)
    target = config_id(policy, channel)
    now = time.time()
    if not outdated:
        if ro.state == "rolling":
            ro.state, ro.message = "done", f"all {ro.total} sidecar(s) replaced in {ro.batches} batch(es)"
            ro.save(state.path)
            audit.record("rollout", None, ro.message)
        return []
    if ro.target != target:
        # An operator's pause holds across a config change; anything else starts over.
        ro = RolloutState(target=target, state="paused" if ro.state == "paused" else "rolling",
                          total=len(outdated), started=now, message=ro.message if ro.state == "paused" else "")
        audit.record("rollout", None, f"rollout started: {len(outdated)} sidecar(s) outdated, batches of "
                     f"{channel.rollout_batch}, {channel.rollout_pause} s apart")
        ro.save(state.path)
    if ro.state in ("paused", "failed"):
        return []  # the outdated sidecars keep running their old spec
    if ro.state == "done":  # new sidecars went outdated under the same target (a profile file edit)
        ro.state, ro.total = "rolling", ro.replaced + len(outdated)
    if ro.batches and now - ro.last_batch < channel.rollout_pause:
        return []
    batch = sorted(outdated, key=lambda t: t[0].name)[:channel.rollout_batch]
    failed = _replace(runtime, batch, workers, settle_ms, before_run)
    ro.batches += 1
    ro.last_batch = time.time()
    ok = [d.name for d, _, _ in batch if d.name not in failed]
    ro.replaced += len(ok)
    for name in ok:
        audit.record("rollout", None, f"replaced {name} (batch {ro.batches})", sidecar=name)
    if failed:
        ro.state, ro.failed = "failed", sorted(failed)
        ro.message = (f"batch {ro.batches}: {len(failed)} sidecar(s) failed on the new spec and were rolled "
                      "back to their old image; rollout stopped: " + "; ".join(f"{k}: {v}" for k, v in
                                                                           sorted(failed.items())))[:2000]
        audit.record("rollout", None, ro.message)
        errors.append(ro.message)
    elif ro.replaced >= ro.total or len(ok) == len(outdated):
        ro.state, ro.message = "done", f"all {ro.total} sidecar(s) replaced in {ro.batches} batch(es)"
        audit.record("rollout", None, ro.message)
    ro.save(state.path)
    return [spec for _, spec, _ in batch]


def _replace(rt: Runtime, batch: list[tuple[DesiredSidecar, SidecarSpec, Container]], workers: int,
             settle_ms: int, before_run: Callable[[SidecarSpec], None] | None = None) -> dict[str, str]:
    """Replace each sidecar of the batch; returns {name: why} for those rolled back to the old image.
    `before_run(spec)` runs before each container is started (the host hands over its writable files)."""
    failed: dict[str, str] = {}
    lock = threading.Lock()

    def prepare(spec: SidecarSpec) -> None:
        if before_run is not None:
            with lock:
                before_run(spec)

    def one(item: tuple[DesiredSidecar, SidecarSpec, Container]) -> None:
        _, spec, _ = item
        try:
            rt.remove(spec.name)
            prepare(spec)
            rt.run(spec)
        except RuntimeFailed as e:
            failed[spec.name] = e.message[-300:]

    workers = max(1, min(workers, len(batch)))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="safespawn-rollout") as pool:
        list(pool.map(one, batch))
    started = [spec.name for _, spec, _ in batch if spec.name not in failed]
    if started:
        time.sleep(max(0, settle_ms) / 1000)
        now = rt.inspect(started)
        for name in started:
            c = now.get(name)
            if c is None or not c.running or c.restarts > 0:
                failed[name] = f"exited with code {c.exit_code}" if c else "is not running"
    for _, spec, old in batch:
        if spec.name not in failed:
            continue
        # Back to the old image: the container the sidecar ran before this batch.
        back = dataclasses.replace(spec, image=old.image) if old.image else None
        try:
            rt.remove(spec.name)
            if back is None:
                raise RuntimeFailed("the old container's image is unknown")
            prepare(back)
            rt.run(back)
        except RuntimeFailed as e:
            failed[spec.name] += f"; rollback failed too: {e.message[-200:]}"
    return failed


def describe(policy: Policy, channel: ChannelConfig, state: ChannelState,
             listing: dict[str, Container]) -> tuple[set[str], dict[str, Any]]:
    """For `status`: the desired sidecars whose container runs an outdated spec, and the rollout."""
    outdated = set()
    for name, d in state.desired.items():
        c = listing.get(name)
        if c is None:
            continue
        try:
            spec = policy.configured_spec(channel, d)
        except SafespawnError:
            continue
        if c.spec_hash != spec.spec_hash:
            outdated.add(name)
    ro = RolloutState.load(state.path)
    info = asdict(ro)
    info["outdated"] = len(outdated)
    if ro.target and ro.target != config_id(policy, channel) and outdated:
        info["state"] = "pending"  # the next sync starts a new rollout
    return outdated, info


# -- the command line -------------------------------------------------------------------------------

def rollout_command(cfg: Config, channel: ChannelConfig, pause: bool, resume: bool) -> int:
    """`safespawn rollout CH [--pause|--resume]`: hold, continue or show a channel's rollout."""
    from ..errors import ExitCode
    from .state import ChannelState

    with ChannelState.locked(str(cfg.broker.state_dir), channel.name) as state:
        ro = RolloutState.load(state.path)
        if pause:
            if ro.state in ("rolling", "failed", "done") and ro.target:
                ro.state, ro.message = "paused", "paused by the operator"
            elif not ro.target:
                ro = RolloutState(state="paused", message="paused by the operator before any rollout")
            ro.save(state.path)
        elif resume and ro.state in ("paused", "failed"):
            ro.state, ro.failed, ro.message = "rolling", [], "resumed by the operator"
            ro.last_batch = 0.0
            ro.save(state.path)
    if pause or resume:
        print(f"rollout of {channel.name}: {ro.state}")
    else:
        print(json.dumps(asdict(ro), indent=1))
    return ExitCode.OK
