"""Pid files in the agent's data dir, written by the host with the sidecar's HOST pid.

A sidecar runs in its own pid namespace, so the pid its program would write (1, or a small number)
means nothing to Neutron, which reads the pid file and then /proc/PID/cmdline. The profile names the
options that are pid files (``[pid_files]``); the policy gives the program a private path in its
own /run instead, and the broker writes the host pid at the path the agent asked for:

    write_pid_file("/var/lib/neutron/dhcp/NET/pid", 12345, ["/var/lib/neutron"])

The data dir is the agent's: anything can be planted at that path or above it (a symlink to
/etc/shadow, a FIFO, a directory, a hard link to a host file, a symlinked parent). So, from the
data dir's root: every directory component is opened with O_NOFOLLOW|O_DIRECTORY and must stay on
the data dir's filesystem; the new content goes into a fresh O_EXCL temp file in the final
directory, is fsync'd, and is renamed over the target. rename(2) replaces the directory entry
itself: it never follows a symlink, never writes into a hard-linked inode, and replaces a FIFO
without opening it. A directory at the path is refused. Nothing here ever creates a directory.
Because the walk holds directory fds, a component swapped for a symlink after it was opened does
not redirect the write; a directory renamed elsewhere stays inside the data dir's mount (rename
across mounts fails), so the write still lands under the data dir.

The same walk hands a file the program writes itself (the profile's ``writable_files``: dnsmasq's
lease file) to the sidecar's unprivileged uid before each start (``hand_over_file``), so a sidecar
that is not root can write that one file in a directory a root agent owns.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

from .audit import AuditLog
from .files import write_all
from .sidecar import SidecarSpec

log = logging.getLogger(__name__)

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
MAX_PID_FILE = 64


class PidFileRefused(Exception):
    """The pid file's path is not one the host may write; the reason is the message."""


def _split(path: str, data_dirs: Sequence[str]) -> tuple[str, list[str], str]:
    """(data dir root, directory components below it, file name) for a path under a data dir."""
    # DENY: anything but a normalized absolute path (.., //, a trailing /) could leave the root.
    if not path.startswith("/") or os.path.normpath(path) != path or "\0" in path:
        raise PidFileRefused(f"{path[:120]!r} is not a normalized absolute path")
    for root in sorted(data_dirs, key=len, reverse=True):
        root = root.rstrip("/")
        if path.startswith(root + "/"):
            parts = path[len(root) + 1:].split("/")
            return root, parts[:-1], parts[-1]
    # DENY: the host never writes a pid file outside the channel's data dirs.
    raise PidFileRefused(f"{path[:120]!r} is outside the channel's data dirs")


@contextmanager
def _final_dir(path: str, data_dirs: Sequence[str]) -> Iterator[tuple[int, str]]:
    """The open fd of the pid file's directory (reached without following any link) and its name."""
    root, dirs, name = _split(path, data_dirs)
    try:
        fd = os.open(root, DIR_FLAGS)
    except OSError as e:
        raise PidFileRefused(f"data dir {root}: {e.strerror}") from None
    try:
        root_dev = os.fstat(fd).st_dev
        for part in dirs:
            try:
                nfd = os.open(part, DIR_FLAGS, dir_fd=fd)
            except OSError as e:
                # DENY: a symlink (ELOOP/ENOTDIR with O_NOFOLLOW) or a non-directory at a parent.
                why = "is a symlink or not a directory" if e.errno in (errno.ELOOP, errno.ENOTDIR) else e.strerror
                raise PidFileRefused(f"{path[:120]!r}: component {part[:80]!r} {why}") from None
            os.close(fd)
            fd = nfd
            # DENY: a mount point inside the data dir (a bind mount of a host directory there).
            if os.fstat(fd).st_dev != root_dev:
                raise PidFileRefused(f"{path[:120]!r}: component {part[:80]!r} is on another filesystem")
        yield fd, name
    finally:
        os.close(fd)


def write_pid_file(path: str, pid: int, data_dirs: Sequence[str]) -> None:
    """Make `path` hold `pid`, replacing whatever entry is there; raises PidFileRefused or OSError."""
    if pid <= 0:
        raise ValueError("a pid file holds a positive pid")

    def fill(fd: int) -> None:
        os.fchmod(fd, 0o644)  # Neutron reads it as the agent's user
        write_all(fd, f"{pid}\n".encode())
        os.fsync(fd)

    with _final_dir(path, data_dirs) as (dfd, name):
        # DENY: a directory at the path; rename would fail on it, and the program could not use it either.
        _entry_not_a_directory(dfd, name, path)
        _replace_by_rename(dfd, name, fill)


def _entry_not_a_directory(dfd: int, name: str, path: str) -> os.stat_result | None:
    """lstat of `name` in `dfd` (None when absent); a directory there is refused."""
    try:
        st: os.stat_result | None = os.stat(name, dir_fd=dfd, follow_symlinks=False)
    except FileNotFoundError:
        st = None
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise PidFileRefused(f"{path[:120]!r} is a directory")
    return st


def _replace_by_rename(dfd: int, name: str, fill: Callable[[int], None]) -> None:
    """Put a fresh file of our own at `name` in `dfd`: made under a random name, given its content
    and owner by `fill`, then renamed over the entry. rename replaces whatever is there (symlink,
    FIFO, hard link, file) without opening it."""
    tmp = f".{name[:64]}.safespawn-{os.urandom(6).hex()}"
    # O_EXCL|O_NOFOLLOW: a fresh inode of our own, whatever was planted under a guessed name.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=dfd)
    try:
        fill(fd)
        os.close(fd)
        fd = -1
        os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        try:
            os.unlink(tmp, dir_fd=dfd)
        except OSError:
            pass
        raise


def hand_over_file(path: str, uid: int, gid: int, data_dirs: Sequence[str]) -> str:
    """Make `path` a plain file owned by uid:gid (mode 0644) for an unprivileged sidecar to write
    (dnsmasq's lease file in a directory a root agent owns). Returns what was done: "kept",
    "chowned" or "created"; raises PidFileRefused or OSError.

    The same walk as write_pid_file. At the path, a plain, singly linked file on the data dir's
    filesystem keeps its content and changes owner (through an fd: the inode checked is the inode
    chowned). Anything else is replaced, never opened, never chowned: a symlink (chown would follow
    it to a host file), a hard link (its other name may be a host file: /etc/shadow on the same
    filesystem), a FIFO or a device (opening one can block or act); a fresh empty file takes its
    place by rename. A directory is refused.
    """
    if uid < 0 or gid < 0:
        raise ValueError("a uid and gid to hand the file to")
    with _final_dir(path, data_dirs) as (dfd, name):
        dev = os.fstat(dfd).st_dev
        # DENY: a directory at the path; the program cannot write it as a file either.
        st = _entry_not_a_directory(dfd, name, path)
        if st is not None and stat.S_ISREG(st.st_mode) and st.st_nlink == 1 and st.st_dev == dev:
            try:
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC,
                             dir_fd=dfd)
            except OSError:
                fd = -1  # swapped for a symlink (ELOOP) or removed meanwhile: replace it below
            if fd >= 0:
                try:
                    now = os.fstat(fd)
                    # The inode opened is the one checked (not swapped since the lstat), still one link.
                    if (now.st_ino, now.st_dev) == (st.st_ino, st.st_dev) and stat.S_ISREG(now.st_mode) \
                            and now.st_nlink == 1:
                        if (now.st_uid, now.st_gid) == (uid, gid) and stat.S_IMODE(now.st_mode) == 0o644:
                            return "kept"
                        os.fchown(fd, uid, gid)
                        os.fchmod(fd, 0o644)  # after chown: no set-id bit, readable by the agent
                        return "chowned"
                finally:
                    os.close(fd)
        # ALLOW: replace whatever else is there with a fresh file of our own, by rename.
        def own(fd: int) -> None:
            os.fchown(fd, uid, gid)
            os.fchmod(fd, 0o644)

        _replace_by_rename(dfd, name, own)
        return "created"


def hand_over_files(spec: SidecarSpec, data_dirs: Sequence[str]) -> list[tuple[str, str]]:
    """Before a start: hand each of the spec's writable files to its uid; returns the refusals
    (path, why). A refusal does not stop the start: the program then reports what it cannot open."""
    refused: list[tuple[str, str]] = []
    if not spec.writable_files:
        return refused
    uid, gid = spec.uid_gid
    for path in spec.writable_files:
        try:
            hand_over_file(path, uid, gid, data_dirs)
        except PidFileRefused as e:
            refused.append((path, str(e)))
        except OSError as e:
            refused.append((path, f"{path[:120]!r}: {e.strerror or e}"))
    return refused


def read_pid_file(path: str, data_dirs: Sequence[str]) -> int | None:
    """The pid a plain, singly linked pid file holds, else None (absent, planted, or garbage).

    Only used to decide whether to rewrite: None means "rewrite it".
    """
    try:
        with _final_dir(path, data_dirs) as (dfd, name):
            # O_NONBLOCK: a FIFO planted at the path must not hang the broker.
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dfd)
            try:
                st = os.fstat(fd)
                # A FIFO, a device or a hard link to some other file: not ours, rewrite it.
                if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
                    return None
                text = os.read(fd, MAX_PID_FILE)
            finally:
                os.close(fd)
    except (OSError, PidFileRefused):
        return None
    s = text.strip()
    return int(s) if s.isdigit() and len(s) < 11 else None


def child_pids(pid: int) -> list[int]:
    """The host pids of `pid`'s children (keepalived's VRRP child is the main process's child)."""
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for tid in sorted(tasks):
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                found += [int(x) for x in f.read().split()]
        except (OSError, ValueError):
            continue
    return sorted(set(found))


def pid_namespace(pid: int) -> tuple[int, int] | None:
    """(dev, inode) of a process's pid namespace, or None if it is gone or not visible."""
    try:
        st = os.stat(f"/proc/{pid}/ns/pid")
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def wanted_pid(kind: str, main_pid: int) -> int | None:
    """What a pid file of this kind should hold now: the main pid, or its (first) child's."""
    if kind == "main":
        return main_pid
    children = child_pids(main_pid)
    return children[0] if children else None


def refresh(pid_files: Sequence[tuple[str, str]], main_pid: int, data_dirs: Sequence[str],
            wait_child: float = 0.0) -> list[tuple[str, str]]:
    """Make each pid file hold the sidecar's current host pid; returns the refusals (path, why).

    Cheap when nothing changed (one read per file): it runs on every start, every respawn and
    every sync, so a restart by the runtime's restart policy is caught by the next sync.
    `wait_child`: after a start, how long to wait for a child (keepalived forks its VRRP process
    during start-up).
    """
    refused: list[tuple[str, str]] = []
    deadline = time.monotonic() + wait_child
    for path, kind in pid_files:
        want = wanted_pid(kind, main_pid)
        while want is None and time.monotonic() < deadline:
            time.sleep(0.02)
            want = wanted_pid(kind, main_pid)
        if want is None or read_pid_file(path, data_dirs) == want:
            continue
        try:
            write_pid_file(path, want, data_dirs)
        except PidFileRefused as e:
            refused.append((path, str(e)))
        except OSError as e:
            refused.append((path, f"{path[:120]!r}: {e.strerror or e}"))
    return refused


class PidFileKeeper:
    """The broker's side: refresh a sidecar's pid files, hand its writable files to its uid before a
    start, and log + audit a refusal once per run."""

    def __init__(self) -> None:
        self._refused: set[tuple[str, str, str]] = set()

    def hand_over(self, data_dirs: Sequence[str], audit: AuditLog, spec: SidecarSpec) -> None:
        """Before each start (first start, replacement, respawn) of `spec`."""
        for path, why in hand_over_files(spec, data_dirs):
            self._report(audit, spec, path, why, "file not handed to the sidecar's uid")

    def refresh(self, data_dirs: Sequence[str], audit: AuditLog, spec: SidecarSpec, pid: int | None,
                wait_child: float = 0.0) -> None:
        if not spec.pid_files or pid is None or pid <= 0:
            return
        for path, why in refresh(spec.pid_files, pid, data_dirs, wait_child):
            self._report(audit, spec, path, why, "pid file not written")

    def _report(self, audit: AuditLog, spec: SidecarSpec, path: str, why: str, what: str) -> None:
        # A refusal changes nothing else: the sidecar runs, the broker keeps serving.
        if (spec.name, path, why) in self._refused:
            return
        if len(self._refused) >= 4096:
            self._refused.clear()  # bounded: an agent cycling names cannot grow it
        self._refused.add((spec.name, path, why))
        log.warning("sidecar %s: %s: %s", spec.name, what, why)
        audit.record("deny", None, f"{what}: {why}", code="policy_denied", sidecar=spec.name, file=path)
