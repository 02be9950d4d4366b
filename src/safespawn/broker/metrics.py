"""Prometheus metrics as a node_exporter textfile: `[broker] metrics_file`.

Every `safespawn sync CH` is its own short process, so the counters live on disk: each channel keeps
`state_dir/CH/metrics.json` (host-private, updated under the channel's lock), and after each sync the
file named by `metrics_file` is rendered from every configured channel's counters and replaced
atomically (a temp file in the same directory, fsync, rename), the convention of node_exporter's
textfile collector, so a scrape never reads a half-written file. The temp file's name starts with
a dot and does not end in `.prom`, so the collector ignores it.

    [broker]
    metrics_file = "/var/lib/node_exporter/textfile/safespawn.prom"

What is exported (docs/operations.md has alert examples):
    safespawn_requests_total{channel,op,decision,code}     counter; decision = allowed | refused |
                                                           quarantined | replayed
    safespawn_sync_duration_seconds{channel}               histogram
    safespawn_request_latency_seconds{channel}             histogram, request file written -> reply
    safespawn_sidecars{channel,profile,state}              gauge (the channel's desired sidecars)
    safespawn_sidecars_outdated{channel}                   gauge, running an older spec (rollout)
    safespawn_respawns_total{channel}                      counter
    safespawn_respawn_failures_total{channel}              counter
    safespawn_runtime_restarts_total{channel}              counter, restarts by the runtime's own
                                                           restart policy that syncs noticed
    safespawn_pending_requests{channel}                    gauge, inbox entries left after the sync
    safespawn_syncs_total{channel,result}                  counter; result = ok | failed
    safespawn_last_success_timestamp_seconds{channel}      gauge, unix time of the last good sync
    safespawn_budget_memory_bytes{channel}                 gauge, the channel's sidecars' memory now
    safespawn_budget_memory_limit_bytes{channel}           gauge, its budget (budget.py)
    safespawn_budget_tasks{channel}, _tasks_limit          gauges, processes and threads, and the budget
    safespawn_budget_cpu_seconds_total{channel}            counter, CPU time used (since the cgroup was made)
    safespawn_budget_cpu_throttled_seconds_total{channel}  counter, time held back by the CPU budget
    safespawn_budget_cpu_limit{channel}                    gauge, the budget in CPUs
(the budget families are read from the channel's cgroup when the file is written; absent before
the channel's first sidecar start)
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from . import budget
from .budget import BudgetUse
from .files import atomic_write, open_dir

log = logging.getLogger(__name__)

SYNC_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
STATE_FILE = "metrics.json"


@dataclass(frozen=True)
class ReplyObservation:
    """One answered inbox entry, as the engine saw it."""

    op: str  # start | signal | stop | unknown (not parsed)
    decision: str  # allowed | refused | quarantined | replayed
    code: str = ""  # the error code of a refusal
    latency: float | None = None  # seconds from the request file's mtime to its reply


@dataclass
class Histogram:
    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)  # cumulative is computed when rendering
    total: float = 0.0
    n: int = 0

    def __post_init__(self) -> None:
        if len(self.counts) != len(self.buckets):
            self.counts = [0] * len(self.buckets)

    def observe(self, v: float) -> None:
        self.n += 1
        self.total += v
        for i, b in enumerate(self.buckets):
            if v <= b:
                self.counts[i] += 1
                break

    def to_dict(self) -> dict[str, Any]:
        return {"counts": self.counts, "sum": self.total, "n": self.n}

    @classmethod
    def from_dict(cls, buckets: tuple[float, ...], d: Any) -> Histogram:
        h = cls(buckets)
        if isinstance(d, dict) and isinstance(d.get("counts"), list) and len(d["counts"]) == len(buckets):
            h.counts = [int(x) for x in d["counts"]]
            h.total = float(d.get("sum", 0.0))
            h.n = int(d.get("n", 0))
        return h


@dataclass
class ChannelMetrics:
    """The counters of one channel, kept in state_dir/CH/metrics.json between syncs."""

    requests: dict[str, int] = field(default_factory=dict)  # "op|decision|code" -> count
    sync: Histogram = field(default_factory=lambda: Histogram(SYNC_BUCKETS))
    latency: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS))
    sidecars: dict[str, int] = field(default_factory=dict)  # "profile|state" -> count, last sync
    respawns: int = 0
    respawn_failures: int = 0
    runtime_restarts: int = 0
    pending: int = 0
    outdated: int = 0
    syncs_ok: int = 0
    syncs_failed: int = 0
    last_success: float = 0.0

    @classmethod
    def load(cls, path: str) -> ChannelMetrics:
        try:
            with open(path, "rb") as f:
                d = json.load(f)
        except (OSError, ValueError):
            return cls()  # no file yet, or a torn one after a crash: counters restart at zero
        if not isinstance(d, dict):
            return cls()
        m = cls()
        try:
            m.requests = {str(k): int(v) for k, v in dict(d.get("requests", {})).items()}
            m.sidecars = {str(k): int(v) for k, v in dict(d.get("sidecars", {})).items()}
            m.sync = Histogram.from_dict(SYNC_BUCKETS, d.get("sync"))
            m.latency = Histogram.from_dict(LATENCY_BUCKETS, d.get("latency"))
            for k in ("respawns", "respawn_failures", "runtime_restarts", "pending", "outdated", "syncs_ok",
                      "syncs_failed"):
                setattr(m, k, int(d.get(k, 0)))
            m.last_success = float(d.get("last_success", 0.0))
        except (TypeError, ValueError):
            return cls()
        return m

    def to_dict(self) -> dict[str, Any]:
        return {"v": 1, "requests": self.requests, "sync": self.sync.to_dict(), "latency": self.latency.to_dict(),
                "sidecars": self.sidecars, "respawns": self.respawns, "respawn_failures": self.respawn_failures,
                "runtime_restarts": self.runtime_restarts,
                "pending": self.pending, "outdated": self.outdated, "syncs_ok": self.syncs_ok,
                "syncs_failed": self.syncs_failed, "last_success": self.last_success}


@dataclass(frozen=True)
class SyncObservation:
    """What one sync of a channel did, handed from the engine to `record`."""

    ok: bool
    duration: float
    finished: float
    replies: tuple[ReplyObservation, ...] = ()
    respawns: int = 0
    respawn_failures: int = 0
    runtime_restarts: int = 0
    pending: int = 0
    sidecars: tuple[tuple[str, str], ...] | None = None  # (profile, state) of each; None: unknown
    outdated: int | None = None  # sidecars running an outdated spec (a rollout pending or stopped)


def update(m: ChannelMetrics, obs: SyncObservation) -> None:
    for o in obs.replies:
        key = f"{o.op}|{o.decision}|{o.code}"
        m.requests[key] = m.requests.get(key, 0) + 1
        if o.latency is not None:
            m.latency.observe(max(0.0, o.latency))
    m.sync.observe(max(0.0, obs.duration))
    m.respawns += obs.respawns
    m.respawn_failures += obs.respawn_failures
    m.runtime_restarts += obs.runtime_restarts
    m.pending = obs.pending
    if obs.outdated is not None:
        m.outdated = obs.outdated
    if obs.sidecars is not None:
        counts: dict[str, int] = {}
        for profile, st in obs.sidecars:
            counts[f"{profile}|{st}"] = counts.get(f"{profile}|{st}", 0) + 1
        m.sidecars = counts
    if obs.ok:
        m.syncs_ok += 1
        m.last_success = obs.finished
    else:
        m.syncs_failed += 1


def _esc(v: str) -> str:
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(**kv: str) -> str:
    return "{" + ",".join(f'{k}="{_esc(v)}"' for k, v in kv.items()) + "}"


def _num(v: float) -> str:
    return repr(float(v)) if isinstance(v, float) and not v.is_integer() else str(int(v))


def _histogram(lines: list[str], name: str, channel: str, h: Histogram) -> None:
    acc = 0
    for b, c in zip(h.buckets, h.counts, strict=True):
        acc += c
        lines.append(f"{name}_bucket{_labels(channel=channel, le=repr(b))} {acc}")
    lines.append(f"{name}_bucket{_labels(channel=channel, le='+Inf')} {h.n}")
    lines.append(f"{name}_sum{_labels(channel=channel)} {repr(float(h.total))}")
    lines.append(f"{name}_count{_labels(channel=channel)} {h.n}")


def render(channels: Iterable[tuple[str, ChannelMetrics]],
           budgets: Mapping[str, BudgetUse | None] | None = None) -> str:
    """The Prometheus text exposition format (version 0.0.4) of every channel's metrics, with
    `budgets`: each channel's use of its budget (budget.use_of)."""
    chans = list(channels)
    out: list[str] = []

    def family(name: str, kind: str, help_: str) -> None:
        out.append(f"# HELP {name} {help_}")
        out.append(f"# TYPE {name} {kind}")

    family("safespawn_requests_total", "counter", "Inbox entries answered, by operation and decision.")
    for ch, m in chans:
        for key, n in sorted(m.requests.items()):
            op, decision, code = (key.split("|") + ["", "", ""])[:3]
            out.append(f"safespawn_requests_total{_labels(channel=ch, op=op, decision=decision, code=code)} {n}")
    family("safespawn_sync_duration_seconds", "histogram", "Duration of one sync of a channel.")
    for ch, m in chans:
        _histogram(out, "safespawn_sync_duration_seconds", ch, m.sync)
    family("safespawn_request_latency_seconds", "histogram",
           "Time from a request file's arrival in inbox/new to its reply.")
    for ch, m in chans:
        _histogram(out, "safespawn_request_latency_seconds", ch, m.latency)
    family("safespawn_sidecars", "gauge", "Desired sidecars of a channel by profile and container state.")
    for ch, m in chans:
        for key, n in sorted(m.sidecars.items()):
            profile, _, st = key.partition("|")
            out.append(f"safespawn_sidecars{_labels(channel=ch, profile=profile, state=st)} {n}")
    def per_channel(name: str, kind: str, help_: str, value: Callable[[ChannelMetrics], object]) -> None:
        family(name, kind, help_)
        for ch, m in chans:
            out.append(f"{name}{_labels(channel=ch)} {value(m)}")

    per_channel("safespawn_sidecars_outdated", "gauge",
                "Sidecars whose container runs an older spec than the config gives (rollout pending or stopped).",
                lambda m: m.outdated)
    per_channel("safespawn_respawns_total", "counter", "Sidecars that died and were started again by reconcile.",
                lambda m: m.respawns)
    per_channel("safespawn_respawn_failures_total", "counter", "Respawns the runtime failed to start.",
                lambda m: m.respawn_failures)
    per_channel("safespawn_runtime_restarts_total", "counter",
                "Restarts of sidecars by the runtime's own restart policy, as syncs noticed them.",
                lambda m: m.runtime_restarts)
    per_channel("safespawn_pending_requests", "gauge", "Inbox entries still waiting after the last sync.",
                lambda m: m.pending)
    family("safespawn_syncs_total", "counter", "Syncs of a channel by result.")
    for ch, m in chans:
        out.append(f"safespawn_syncs_total{_labels(channel=ch, result='ok')} {m.syncs_ok}")
        out.append(f"safespawn_syncs_total{_labels(channel=ch, result='failed')} {m.syncs_failed}")
    per_channel("safespawn_last_success_timestamp_seconds", "gauge", "Unix time of the last successful sync.",
                lambda m: _num(m.last_success))
    uses = [(ch, u) for ch, _ in chans if (u := (budgets or {}).get(ch)) is not None]
    for name, kind, help_, value in (
            ("safespawn_budget_memory_bytes", "gauge", "Memory the channel's sidecars use together.",
             lambda u: u.memory),
            ("safespawn_budget_memory_limit_bytes", "gauge", "The channel's memory budget.", lambda u: u.memory_max),
            ("safespawn_budget_tasks", "gauge", "Processes and threads of the channel's sidecars.", lambda u: u.tasks),
            ("safespawn_budget_tasks_limit", "gauge", "The channel's task budget.", lambda u: u.tasks_max),
            ("safespawn_budget_cpu_seconds_total", "counter", "CPU time the channel's sidecars used.",
             lambda u: _num(u.cpu_seconds)),
            ("safespawn_budget_cpu_throttled_seconds_total", "counter",
             "Time the channel's sidecars were held back by the CPU budget.", lambda u: _num(u.throttled_seconds)),
            ("safespawn_budget_cpu_limit", "gauge", "The channel's CPU budget, in CPUs.", lambda u: u.cpus_max)):
        family(name, kind, help_)
        for ch, u in uses:
            v = value(u)
            if v is not None:
                out.append(f"{name}{_labels(channel=ch)} {v}")
    return "\n".join(out) + "\n"


@contextlib.contextmanager
def _dir_lock(path: str) -> Any:
    # Several channels' syncs (separate processes) may finish at once: one renders at a time, so the
    # file always holds the latest counters of every channel. The lock is the folder itself (flock on
    # its fd), so nothing is left behind beside the .prom file.
    os.makedirs(path, mode=0o755, exist_ok=True)
    fd = open_dir(path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def record(state_dir: str, channel: str, channel_names: Iterable[str], metrics_file: str,
           obs: SyncObservation) -> None:
    """Add one sync's observation to the channel's counters and rewrite the metrics file.

    The caller holds the channel's lock. Failures are logged, never raised: metrics must not make a
    sync fail.
    """
    try:
        cdir = os.path.join(state_dir, channel)
        m = ChannelMetrics.load(os.path.join(cdir, STATE_FILE))
        update(m, obs)
        dfd = open_dir(cdir)
        try:
            atomic_write(dfd, STATE_FILE, json.dumps(m.to_dict()).encode(), mode=0o600, fsync=False)
        finally:
            os.close(dfd)
        with _dir_lock(os.path.dirname(metrics_file)):
            chans = []
            for name in sorted(channel_names):
                chans.append((name, m if name == channel else
                              ChannelMetrics.load(os.path.join(state_dir, name, STATE_FILE))))
            write_file(metrics_file, render(chans, {name: budget.use_of(name) for name, _ in chans}))
    except OSError as e:
        log.warning("cannot write metrics to %s: %s", metrics_file, e)


def write_file(path: str, text: str) -> None:
    """Replace `path` atomically (temp file in its directory, fsync, rename)."""
    d, name = os.path.split(path)
    os.makedirs(d, mode=0o755, exist_ok=True)
    dfd = open_dir(d)
    try:
        atomic_write(dfd, name, text.encode(), mode=0o644)
    finally:
        os.close(dfd)
