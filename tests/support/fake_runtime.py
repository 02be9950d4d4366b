"""An in-memory `runtime.Runtime` for unit tests of the engine's own logic, with injectable failures.

It keeps containers in a dict and behaves as the podman runtime does where the engine relies on it:
`run` of a name in use fails, `remove` of a missing name is not an error, `list` filters by the
channel label, `inspect` returns only the names that exist. Nothing here needs root.

    rt = FakeRuntime()
    rt.inject("run", RuntimeFailed("podman run failed (rc 125)"))       # the next run fails
    rt.inject("signal", hook=lambda name, *a: ...)                     # called before the real work
    rt.crash(name, exit_code=1)                                        # the sidecar dies

Every call is recorded in `calls` as (op, name-or-None), so a test can count what the engine did.
"""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

from safespawn.broker.sidecar import LABEL_CHANNEL, SidecarSpec
from safespawn.errors import RuntimeFailed
from safespawn.runtime import Container

# Near the kernel's pid ceiling (requests refuse pids above it) and skipped if /proc/PID exists: a
# fake sidecar's pid names no process here, as for a sidecar in its own pid namespace.
FIRST_PID = 4_100_000


def _fake_pids() -> Iterator[int]:
    for pid in itertools.count(FIRST_PID):
        if not os.path.exists(f"/proc/{pid}"):
            yield pid


@dataclass
class _Injection:
    error: BaseException | None
    hook: Callable[..., Any] | None
    times: int
    after: bool  # raise after the operation took effect (a crash mid-way), not before


class FakeRuntime:
    def __init__(self) -> None:
        self.containers: dict[str, Container] = {}
        self.specs: dict[str, SidecarSpec] = {}
        self.calls: list[tuple[str, str | None]] = []
        self.signals: list[tuple[str, str]] = []  # (name, signal) actually delivered
        self.next_pid: int | None = None  # the pid of the next container run (default: a fresh fake pid)
        # Set: containers report their start (unix seconds) from it, as podman does; None: unknown (0).
        self.clock: Callable[[], float] | None = None
        self._pids = _fake_pids()
        self._ids = itertools.count(1)
        self._injections: dict[str, list[_Injection]] = {}
        self._lock = threading.Lock()  # the engine acts from several threads

    # -- test controls -------------------------------------------------------------------------

    def inject(self, op: str, error: BaseException | None = None, *, hook: Callable[..., Any] | None = None,
               times: int = 1, after: bool = False) -> None:
        """Make the next `times` calls of `op` call `hook(*args)` and/or raise `error` (before the
        operation, or with after=True once it took effect)."""
        self._injections.setdefault(op, []).append(_Injection(error, hook, times, after))

    def crash(self, name: str, exit_code: int = 1, exited_at: int = 0) -> None:
        c = self.containers[name]
        self.containers[name] = replace(c, state="exited", pid=0, exit_code=exit_code, exited_at=exited_at)

    def restart(self, name: str) -> int:
        """The runtime's restart policy runs a crashed container again: the same id, a new pid."""
        c = self.containers[name]
        pid = self._new_ids()[1]
        self.containers[name] = replace(c, state="running", pid=pid, restarts=c.restarts + 1)
        return pid

    def set_restarts(self, name: str, restarts: int) -> None:
        self.containers[name] = replace(self.containers[name], restarts=restarts)

    def add(self, name: str, channel: str, state: str = "running", labels: dict[str, str] | None = None) -> Container:
        """A container the engine did not start (a leftover, an orphan, another channel's)."""
        cid, pid = self._new_ids()
        c = Container(cid, name, state, pid if state == "running" else 0, {LABEL_CHANNEL: channel, **(labels or {})})
        self.containers[name] = c
        return c

    def _new_ids(self) -> tuple[str, int]:
        with self._lock:
            return f"id{next(self._ids)}", next(self._pids)

    def count(self, op: str) -> int:
        return sum(1 for o, _ in self.calls if o == op)

    def _enter(self, op: str, *args: Any) -> _Injection | None:
        with self._lock:
            self.calls.append((op, str(args[0]) if args and isinstance(args[0], str) else None))
            queue = self._injections.get(op)
            if not queue:
                return None
            inj = queue[0]
            inj.times -= 1
            if inj.times <= 0:
                queue.pop(0)
        if inj.hook is not None:
            inj.hook(*args)
        if inj.error is not None and not inj.after:
            raise inj.error
        return inj

    @staticmethod
    def _leave(inj: _Injection | None) -> None:
        if inj is not None and inj.error is not None and inj.after:
            raise inj.error

    # -- runtime.Runtime -----------------------------------------------------------------------

    def list(self, channel: str | None = None) -> list[Container]:
        inj = self._enter("list", channel)
        out = [c for c in self.containers.values() if LABEL_CHANNEL in c.labels
               and (channel is None or c.labels[LABEL_CHANNEL] == channel)]
        self._leave(inj)
        return [replace(c, restarts=0) for c in out]  # like `podman ps`: no restart counts

    def run(self, spec: SidecarSpec) -> str:
        inj = self._enter("run", spec.name)
        if spec.name in self.containers:
            raise RuntimeFailed(f"podman run failed (rc 125): the container name {spec.name!r} is already in use")
        cid, pid = self._new_ids()
        with self._lock:
            if self.next_pid is not None:
                pid, self.next_pid = self.next_pid, None
        started = int(self.clock()) if self.clock is not None else 0
        self.containers[spec.name] = Container(cid, spec.name, "running", pid, dict(spec.labels), started=started)
        self.specs[spec.name] = spec
        self._leave(inj)
        return cid

    def run_pid(self, name: str) -> int:
        return 0  # like docker: the engine inspects (fake pids are no processes in /proc)

    def signal(self, name: str, signal: str) -> None:
        inj = self._enter("signal", name, signal)
        c = self.containers.get(name)
        if c is None or not c.running:
            raise RuntimeFailed(f"podman kill failed (rc 125): {name} is not running")
        self.signals.append((name, signal))
        self._leave(inj)

    def stop(self, name: str, grace: int) -> None:
        inj = self._enter("stop", name, grace)
        self.containers.pop(name, None)
        self._leave(inj)

    def remove(self, name: str) -> None:
        inj = self._enter("remove", name)
        self.containers.pop(name, None)
        self._leave(inj)

    def logs(self, name: str, lines: int = 20) -> str:
        self._enter("logs", name)
        return f"logs of {name}" if name in self.containers else ""

    def inspect(self, names: Sequence[str]) -> dict[str, Container]:
        inj = self._enter("inspect", names[0] if names else None)
        out = {n: self.containers[n] for n in names if n in self.containers}
        self._leave(inj)
        return out
