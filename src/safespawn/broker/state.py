"""Host-private state of a channel: the lock, the desired sidecars and the ledger of processed ids.

Layout under `state_dir/CH/` (0700, never visible to the agent):
    lock           flock'd by every sync of the channel: one at a time
    desired.json   the sidecars the channel asked for and has not stopped
    ledger.jsonl   append-only: an id is "claimed" before it is acted on and "done" with its reply
    quarantine/    inbox entries that were unsafe or malformed, kept for inspection
    audit.log      JSON lines, one per decision
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

from ..errors import ChannelLocked
from .files import append_line, atomic_write, open_dir
from .pidsignal import ProcessIdentity

LEDGER_KEEP_SECONDS = 7 * 24 * 3600
LEDGER_COMPACT_LINES = 50_000


# Seconds a respawned sidecar must run before its failures are forgotten (DesiredSidecar.recovered).
STABLE_AFTER = 60.0


@dataclass(frozen=True)
class DesiredSidecar:
    name: str
    profile: str
    netns: str | None
    argv: tuple[str, ...]
    request_id: str
    since: float
    failures: int = 0
    next_retry: float = 0.0
    # The running container as last verified: its id, spec hash and main process (host pid and
    # start time, see pidsignal.py). Lets a signal or an idle sync skip the runtime's listing.
    container_id: str = ""
    spec_hash: str = ""
    pid: int = 0
    pid_start: int = 0
    started_at: int = 0
    # Restarts of that container by the runtime's own restart policy, as a sync last saw them.
    runtime_restarts: int = 0

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DesiredSidecar:
        return cls(name=d["name"], profile=d["profile"], netns=d.get("netns"), argv=tuple(d.get("argv", ())),
                   request_id=d.get("request_id", ""), since=float(d.get("since", 0)),
                   failures=int(d.get("failures", 0)), next_retry=float(d.get("next_retry", 0)),
                   container_id=str(d.get("container_id", "")), spec_hash=str(d.get("spec_hash", "")),
                   pid=int(d.get("pid", 0)), pid_start=int(d.get("pid_start", 0)),
                   started_at=int(d.get("started_at", 0)), runtime_restarts=int(d.get("runtime_restarts", 0)))

    @property
    def identity(self) -> ProcessIdentity | None:
        if self.pid <= 0 or not self.container_id:
            return None
        return ProcessIdentity(self.pid, self.pid_start, self.container_id)

    def running_as(self, ident: ProcessIdentity | None, spec_hash: str, started_at: int = 0) -> DesiredSidecar:
        """The same desired sidecar, with the container and process it was last verified to run as
        (`started_at`: the container's start, unix seconds, as the runtime reports it)."""
        if ident is None:
            return replace(self, container_id="", spec_hash="", pid=0, pid_start=0, started_at=0,
                           runtime_restarts=0)
        restarts = self.runtime_restarts if ident.container_id == self.container_id else 0  # a new container
        return replace(self, container_id=ident.container_id, spec_hash=spec_hash, pid=ident.pid,
                       pid_start=ident.start_ticks, started_at=started_at, runtime_restarts=restarts)

    def failed(self, now: float) -> DesiredSidecar:
        n = self.failures + 1
        return replace(self, failures=n, next_retry=now + min(2.0 ** n, 300.0))

    def recovered(self, now: float, started: int) -> bool:
        """Whether the respawn backoff may start over: no failures, or the process it runs now
        (`started`, unix seconds; 0: unknown) has run for STABLE_AFTER seconds. A sidecar that
        crashes soon after each start (OOM-killed at start, a config it rejects late) is seen
        running between crashes: forgetting its failures then would respawn it without backoff,
        again and again."""
        return not self.failures or not started or now - started >= STABLE_AFTER


@dataclass(frozen=True)
class LedgerEntry:
    id: str
    state: str  # "claimed" | "done"
    digest: str
    t: float
    reply: dict[str, Any] | None = None


class Claim(NamedTuple):
    """An id about to be acted on, and the digest of its request's bytes."""

    rid: str
    digest: str


class Done(NamedTuple):
    """An id answered: its digest ("" if its bytes were unreadable) and its reply."""

    rid: str
    digest: str
    reply: dict[str, Any]


def _ledger_line(e: LedgerEntry) -> bytes:
    rec: dict[str, Any] = {"id": e.id, "s": e.state, "d": e.digest, "t": round(e.t, 3)}
    if e.reply is not None:
        rec["r"] = e.reply
    return json.dumps(rec, separators=(",", ":")).encode() + b"\n"


@dataclass(frozen=True)
class _LedgerCache:
    dev: int
    ino: int
    offset: int  # bytes parsed (whole lines only)
    head: bytes  # the first bytes of the file
    tail: bytes  # the last bytes before offset, to notice a file rewritten in place
    lines: int
    ledger: dict[str, LedgerEntry]


# Per process: what load() parsed last, by path (see ChannelState.load).
_DESIRED_CACHE: dict[str, tuple[bytes, dict[str, DesiredSidecar]]] = {}
_LEDGER_CACHE: dict[str, _LedgerCache] = {}


@dataclass
class ChannelState:
    path: str
    desired: dict[str, DesiredSidecar] = field(default_factory=dict)
    ledger: dict[str, LedgerEntry] = field(default_factory=dict)
    _ledger_lines: int = 0
    _dir_fd: int = -1

    @property
    def ledger_path(self) -> str:
        return os.path.join(self.path, "ledger.jsonl")

    @property
    def audit_path(self) -> str:
        return os.path.join(self.path, "audit.log")

    @property
    def quarantine_path(self) -> str:
        return os.path.join(self.path, "quarantine")

    @staticmethod
    def path_of(state_dir: str | Path, channel: str) -> str:
        """The one place a channel's state directory is named."""
        return os.path.join(str(state_dir), channel)

    @classmethod
    def of(cls, state_dir: str | Path, channel: str) -> ChannelState:
        """The state of a channel, not locked and not loaded (call load() to read it)."""
        return cls(cls.path_of(state_dir, channel))

    @classmethod
    @contextlib.contextmanager
    def locked(cls, state_dir: str | Path, channel: str, wait: bool = True) -> Iterator[ChannelState]:
        """Lock the channel (one sync at a time) and load its state; ChannelLocked if `wait` is
        false and another sync holds it."""
        path = cls.path_of(state_dir, channel)
        os.makedirs(os.path.join(path, "quarantine"), mode=0o700, exist_ok=True)
        os.chmod(path, 0o700)
        fd = os.open(os.path.join(path, "lock"), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                raise ChannelLocked(channel) from None
            st = cls(path)
            st._dir_fd = open_dir(path)
            try:
                st.load()
                yield st
            finally:
                os.close(st._dir_fd)
        finally:
            os.close(fd)  # releases the flock

    def load(self) -> None:
        """Read the desired state and the ledger.

        A long-lived broker (watch, a lingering sync) keeps what it parsed last time: desired.json is
        reused while it is the same file (it is only ever replaced by rename), and of the append-only
        ledger only the lines added since are parsed. Either cache holds exactly bytes read from disk.
        """
        self.load_desired()
        self.ledger = {}
        self._ledger_lines = 0
        try:
            with open(self.ledger_path, "rb") as f:
                self._load_ledger(f)
        except FileNotFoundError:
            _LEDGER_CACHE.pop(self.ledger_path, None)

    def load_desired(self) -> None:
        """Read the desired state only (what a resident broker's once-a-second check needs)."""
        path = os.path.join(self.path, "desired.json")
        try:
            with open(path, "rb") as f:
                raw = f.read()
            cached = _DESIRED_CACHE.get(path)
            if cached is not None and cached[0] == raw:
                self.desired = dict(cached[1])  # the very bytes parsed last time
            else:
                data = json.loads(raw)
                self.desired = {d["name"]: DesiredSidecar.from_dict(d) for d in data.get("sidecars", [])}
                _DESIRED_CACHE[path] = (raw, dict(self.desired))
        except FileNotFoundError:
            self.desired = {}

    def _load_ledger(self, f: Any) -> None:
        st = os.fstat(f.fileno())
        cached = _LEDGER_CACHE.get(self.ledger_path)
        offset = 0
        if cached is not None and (cached.dev, cached.ino) == (st.st_dev, st.st_ino) and st.st_size >= cached.offset:
            # Still the same file (not a compacted one that got the inode number): its first bytes
            # and the bytes just before where we stopped are unchanged.
            tail_start = max(0, cached.offset - len(cached.tail))
            if os.pread(f.fileno(), len(cached.head), 0) == cached.head and \
                    os.pread(f.fileno(), cached.offset - tail_start, tail_start) == cached.tail:
                self.ledger = dict(cached.ledger)
                self._ledger_lines = cached.lines
                offset = cached.offset
        f.seek(offset)
        for raw in f:
            if not raw.endswith(b"\n"):
                break  # a torn last line after a crash (the claim it held is replayed); read again later
            offset += len(raw)
            self._ledger_lines += 1
            try:
                e = json.loads(raw)
                entry = LedgerEntry(e["id"], e["s"], e.get("d", ""), float(e.get("t", 0)), e.get("r"))
            except (ValueError, KeyError, TypeError):
                continue  # a line that is not a ledger entry
            if entry.state == "claimed" and entry.id in self.ledger:
                continue
            self.ledger[entry.id] = entry
        head = os.pread(f.fileno(), min(offset, 64), 0)
        tail = os.pread(f.fileno(), min(offset, 64), max(0, offset - 64))
        _LEDGER_CACHE[self.ledger_path] = _LedgerCache(st.st_dev, st.st_ino, offset, head, tail,
                                                       self._ledger_lines, dict(self.ledger))

    def save_desired(self) -> None:
        data = {"v": 1, "sidecars": [
            {**asdict(d), "argv": list(d.argv)} for d in sorted(self.desired.values(), key=lambda d: d.name)]}
        atomic_write(self._dir_fd, "desired.json", json.dumps(data, indent=1).encode(), mode=0o600)

    def _append(self, entries: list[LedgerEntry]) -> None:
        if not entries:
            return
        lines = [_ledger_line(e) for e in entries]
        self.ledger.update((e.id, e) for e in entries)
        append_line(self.ledger_path, b"".join(lines), fsync=True)
        self._ledger_lines += len(lines)

    def claim(self, items: list[Claim]) -> None:
        """Record ids as claimed, durably, before anything is acted on."""
        now = time.time()
        self._append([LedgerEntry(rid, "claimed", digest, now) for rid, digest in items])

    def complete(self, items: list[Done]) -> None:
        """Record ids as done with their replies, durably, before the replies are published."""
        now = time.time()
        self._append([LedgerEntry(rid, "done", digest, now, reply) for rid, digest, reply in items])

    def compact(self) -> None:
        """Drop ledger entries older than a week once the file grows large.

        Only when the file holds at least twice the lines it would keep: a ledger of many recent ids
        (a flood answered with `quota`) would otherwise be rewritten and fsync'd on every sync.
        """
        if self._ledger_lines < max(LEDGER_COMPACT_LINES, 2 * len(self.ledger)):
            return
        cutoff = time.time() - LEDGER_KEEP_SECONDS
        keep = [e for e in self.ledger.values() if e.t >= cutoff or e.state == "claimed"]
        lines = [_ledger_line(e) for e in keep]
        atomic_write(self._dir_fd, "ledger.jsonl", b"".join(lines), mode=0o600)
        self.ledger = {e.id: e for e in keep}
        self._ledger_lines = len(lines)
