"""The signal fast path: deliver a signal to a sidecar's process through a pidfd, without the runtime.

A pid alone names whatever process holds that number *now*: the sidecar's program may have died and
its pid been handed to another process (oslo.rootwrap's KillFilter has that race). So the broker
records, when a sidecar starts, a `ProcessIdentity`: the host pid, the process's start time (field 22
of /proc/PID/stat, clock ticks since boot, unique for a pid at any one time) and the container id.
A signal goes through the fast path only if, checked *after* `os.pidfd_open` pinned the process:
    1. the start time of /proc/PID is the recorded one (the pid was not reused since), and
    2. /proc/PID/cgroup names the container (the process is inside that container's cgroup), and
    3. the pidfd's process was still alive after both reads (so /proc/PID was the pinned process,
       not a successor that got the number after it died).
Then `signal.pidfd_send_signal` reaches the pinned process, or nothing: a pidfd never follows a
reused pid. When any check fails the caller falls back to the runtime's CLI (`podman kill`), which
resolves the container by name.

    ident = identify(pid, container_id)        # at start, from the runtime's own listing
    if send(ident, signal.SIGHUP) is not Delivery.SENT:
        runtime.signal(name, "HUP")             # the slow, always-correct path
"""

from __future__ import annotations

import enum
import os
import re
import signal
import time
from dataclasses import dataclass

# A container id as podman and docker print it: 64 lowercase hex digits.
_CONTAINER_ID = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class ProcessIdentity:
    """What the broker knows of a sidecar's main process: enough to recognise it again."""

    pid: int
    start_ticks: int
    container_id: str


class Delivery(enum.Enum):
    SENT = "sent"  # delivered through the pidfd to the verified process
    GONE = "gone"  # the pid names no process any more
    MISMATCH = "mismatch"  # the pid names another process (reused), or the cgroup does not match
    UNSUPPORTED = "unsupported"  # no pidfd support here (kernel < 5.3, or not Linux)


def start_ticks(pid: int, proc: str = "/proc") -> int | None:
    """The start time of process `pid` in clock ticks since boot, or None if there is no such process."""
    try:
        with open(f"{proc}/{pid}/stat", "rb") as f:
            raw = f.read(4096)
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # comm (field 2) is in parentheses and may itself hold ')' and spaces: split after the LAST ')'.
    close = raw.rfind(b")")
    if close < 0:
        return None
    fields = raw[close + 2:].split()
    # fields[0] is field 3 (state); starttime is field 22.
    if len(fields) < 20 or not fields[19].isdigit():
        return None
    return int(fields[19])


def cgroup_names_container(pid: int, container_id: str, proc: str = "/proc") -> bool:
    """Whether /proc/PID/cgroup puts the process in the container's cgroup in every hierarchy listed.

    podman's cgroupfs manager names it `.../libpod-ID`, its systemd manager `.../libpod-ID.scope`;
    docker uses `.../docker/ID` or `docker-ID.scope`. A process outside the container (a host
    process that got a reused pid) is in none of these.
    """
    if not _CONTAINER_ID.fullmatch(container_id):
        return False
    names = {f"libpod-{container_id}", f"libpod-{container_id}.scope", f"docker-{container_id}.scope", container_id}
    try:
        with open(f"{proc}/{pid}/cgroup", "rb") as f:
            text = f.read(65536).decode("ascii", "replace")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return False
    lines = [line for line in text.splitlines() if line]
    if not lines:
        return False
    for line in lines:
        path = line.split(":", 2)[-1]
        # The container's own cgroup, or one below it (a nested cgroup inside the container).
        if not names.intersection(path.split("/")):
            return False
    return True


def identify(pid: int, container_id: str, proc: str = "/proc") -> ProcessIdentity | None:
    """Record the identity of a container's process, as the runtime reported its pid; None if the
    process is gone or is not in that container."""
    if pid <= 0:
        return None
    ticks = start_ticks(pid, proc)
    if ticks is None or not cgroup_names_container(pid, container_id, proc):
        return None
    if start_ticks(pid, proc) != ticks:
        return None  # replaced while we looked
    return ProcessIdentity(pid, ticks, container_id)


def started_boottime(ident: ProcessIdentity) -> float:
    """When the process started, in seconds of CLOCK_BOOTTIME (the clock /proc/PID/stat counts in),
    to the clock tick."""
    return ident.start_ticks / os.sysconf("SC_CLK_TCK")


def started_unix(ident: ProcessIdentity) -> float:
    """When the process started, as unix time (to the clock tick, give or take the clocks' drift)."""
    return time.time() - (time.clock_gettime(time.CLOCK_BOOTTIME) - started_boottime(ident))


def is_alive(ident: ProcessIdentity, proc: str = "/proc") -> bool:
    """Whether the recorded process still runs (same pid, same start time, same container)."""
    return start_ticks(ident.pid, proc) == ident.start_ticks and cgroup_names_container(
        ident.pid, ident.container_id, proc)


def send(ident: ProcessIdentity, signum: int, proc: str = "/proc") -> Delivery:
    """Send `signum` to the recorded process through a pidfd, only if it is verifiably still that process."""
    if not hasattr(os, "pidfd_open") or not hasattr(signal, "pidfd_send_signal"):
        return Delivery.UNSUPPORTED
    try:
        fd = os.pidfd_open(ident.pid)
    except ProcessLookupError:
        return Delivery.GONE
    except OSError:
        return Delivery.UNSUPPORTED
    try:
        # Checked after pidfd_open: from here the pidfd names one process whatever happens to the pid.
        if start_ticks(ident.pid, proc) != ident.start_ticks:
            return Delivery.MISMATCH  # DENY: the pid now belongs to another process
        if not cgroup_names_container(ident.pid, ident.container_id, proc):
            return Delivery.MISMATCH  # DENY: not inside the sidecar's container
        try:
            # Signal 0 checks that the pinned process outlived the reads, so /proc/PID was it.
            signal.pidfd_send_signal(fd, 0)
        except ProcessLookupError:
            return Delivery.GONE
        try:
            signal.pidfd_send_signal(fd, signum)
        except ProcessLookupError:
            return Delivery.GONE
        return Delivery.SENT
    finally:
        os.close(fd)


def signal_number(name: str) -> int | None:
    """'HUP', 'SIGHUP' or '1' -> 1; None for anything that is not a known signal."""
    s = name.strip().upper()
    if s.isdigit():
        try:
            return int(signal.Signals(int(s)))
        except ValueError:
            return None
    if not s.startswith("SIG"):
        s = "SIG" + s
    try:
        return int(signal.Signals[s])
    except KeyError:
        return None
