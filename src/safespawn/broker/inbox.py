"""The host side of a channel directory: read requests as hostile input, publish replies safely.

    CH/inbox/tmp/          agent: requests being written (the host only prunes stale leftovers)
    CH/inbox/new/ID.json   agent: complete requests -> read here, then removed after the reply
    CH/inbox/trigger       agent: touched after each request (only systemd looks at it)
    CH/outbox/replies/     host:  ID.json, written atomically
    CH/outbox/status.json  host:  the channel's sidecars

Every directory is opened relative to its parent's fd with O_NOFOLLOW, so a symlinked inbox/ or
outbox/replies is refused rather than followed, and a replaced inbox/new or inbox/tmp is moved into
the quarantine (unfollowed) and laid out again. Every inbox entry is checked before it is opened
(lstat: a regular file with one link, under the size cap) and again after (fstat of the same inode),
and opened with O_NONBLOCK so a FIFO cannot stall the broker.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import BadRequest, ChannelUnsafe, QuotaExceeded
from .files import atomic_write, fsync_dir, open_dir

REQUEST_NAME_RE = re.compile(r"([0-9a-f]{32})\.json")
TMP_MAX_AGE = 3600.0
QUARANTINE_KEEP = 1000


@dataclass(frozen=True)
class Entry:
    name: str
    rid: str | None  # the id its file name carries, if it carries one
    mtime_ns: int = 0  # when the agent wrote it (agent-controlled: used for metrics only)


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISLNK, "a symlink"), (stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"


def _open_subdir(parent_fd: int | None, name: str, what: str) -> int:
    try:
        return open_dir(name, parent_fd)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            # DENY: a symlinked directory would make the host read or write wherever it points.
            raise ChannelUnsafe(f"{what} is not a plain directory") from None
        raise ChannelUnsafe(f"cannot open {what}: {e.strerror}") from None


class ChannelDir:
    """Open directory fds of one channel; use as a context manager."""

    @staticmethod
    def path_of(channels_dir: str | Path, channel: str) -> str:
        """The one place a channel's directory is named."""
        return os.path.join(str(channels_dir), channel)

    @staticmethod
    def inbox_new_of(channels_dir: str | Path, channel: str) -> str:
        return os.path.join(ChannelDir.path_of(channels_dir, channel), "inbox", "new")

    @classmethod
    def of(cls, channels_dir: str | Path, channel: str, quarantine_path: str) -> ChannelDir:
        return cls(cls.path_of(channels_dir, channel), quarantine_path)

    def __init__(self, path: str, quarantine_path: str) -> None:
        self.path = path
        self.quarantine_path = quarantine_path
        self.fds: dict[str, int] = {}
        self.repaired: list[tuple[str, str]] = []  # (what, its name in the quarantine) laid out again

    def __enter__(self) -> ChannelDir:
        # The channel directory itself is laid out by the host (install); its last component must
        # still not be a symlink.
        root = _open_subdir(None, self.path, self.path)
        self.fds["root"] = root
        try:
            self.fds["inbox"] = _open_subdir(root, "inbox", "inbox/")
            self.fds["quarantine"] = open_dir(self.quarantine_path)
            self.fds["new"] = self._agent_subdir("new")
            self.fds["tmp"] = self._agent_subdir("tmp")
            self.fds["outbox"] = _open_subdir(root, "outbox", "outbox/")
            self.fds["replies"] = _open_subdir(self.fds["outbox"], "replies", "outbox/replies")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _agent_subdir(self, name: str) -> int:
        """Open inbox/NAME; if the agent replaced it (a symlink, a file, nothing), lay it out again.

        Refusing alone is not enough here: a level-triggered watch on inbox/new (systemd's
        DirectoryNotEmpty=, `safespawn watch`) follows a symlink to a non-empty host directory and
        would start a sync, forever. The entry itself is moved into the quarantine (rename does not
        follow it), and a fresh directory with the inbox's owner takes its place.
        """
        inbox = self.fds["inbox"]
        try:
            return open_dir(name, inbox)
        except OSError as e:
            if e.errno not in (errno.ELOOP, errno.ENOTDIR, errno.ENOENT):
                raise ChannelUnsafe(f"cannot open inbox/{name}: {e.strerror}") from None
        # DENY: a symlinked (or replaced) inbox/new or inbox/tmp is never followed; it is put aside.
        dest = f"{time.time_ns()}-inbox-{name}"
        try:
            os.rename(name, dest, src_dir_fd=inbox, dst_dir_fd=self.fds["quarantine"])
            self.repaired.append((f"inbox/{name}", dest))
        except FileNotFoundError:
            self.repaired.append((f"inbox/{name}", ""))
        except OSError as e:
            raise ChannelUnsafe(f"inbox/{name} is not a plain directory and cannot be moved: {e.strerror}") from None
        st = os.fstat(inbox)
        try:
            os.mkdir(name, 0o755, dir_fd=inbox)
            os.chown(name, st.st_uid, st.st_gid, dir_fd=inbox, follow_symlinks=False)
            return open_dir(name, inbox)
        except OSError as e:
            # the agent raced us again: refuse this run; the next one repairs again
            raise ChannelUnsafe(f"inbox/{name} could not be laid out again: {e.strerror}") from None

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()

    # -- requests ------------------------------------------------------------------------------

    def pending(self, limit: int) -> tuple[list[Entry], int]:
        """Up to `limit` entries of inbox/new, oldest first, and how many are waiting in all."""
        found: list[tuple[int, str]] = []
        with os.scandir(self.fds["new"]) as it:
            for de in it:
                try:
                    mtime = de.stat(follow_symlinks=False).st_mtime_ns
                except OSError:
                    continue
                found.append((mtime, de.name))
        found.sort()
        entries = []
        for mtime, name in found[:limit]:
            m = REQUEST_NAME_RE.fullmatch(name)
            entries.append(Entry(name, m.group(1) if m else None, mtime))
        return entries, len(found)

    def read(self, entry: Entry, max_bytes: int) -> bytes:
        """Read one request, refusing anything but a small regular file with a single link."""
        fd_dir = self.fds["new"]
        st = os.stat(entry.name, dir_fd=fd_dir, follow_symlinks=False)
        # DENY: symlinks (to /etc/shadow, /dev/zero), FIFOs (block the broker), devices, sockets, dirs.
        if not stat.S_ISREG(st.st_mode):
            raise BadRequest(f"inbox entry is {_kind(st.st_mode)}")
        # DENY: a hard link to a file elsewhere; reading or removing it would touch that file.
        if st.st_nlink != 1:
            raise BadRequest("inbox entry has more than one link")
        if st.st_size > max_bytes:
            raise QuotaExceeded(f"request is larger than {max_bytes} bytes")
        fd = os.open(entry.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC,
                     dir_fd=fd_dir)
        try:
            fst = os.fstat(fd)
            # DENY: the entry was swapped between the check and the open.
            if (fst.st_dev, fst.st_ino) != (st.st_dev, st.st_ino) or not stat.S_ISREG(fst.st_mode) \
                    or fst.st_nlink != 1:
                raise BadRequest("inbox entry changed while it was read")
            chunks = []
            total = 0
            while total <= max_bytes:
                chunk = os.read(fd, max_bytes + 1 - total)
                if not chunk:
                    break
                chunks.append(chunk)
                total += len(chunk)
        finally:
            os.close(fd)
        # DENY: a file that grows while it is read (or lied about its size).
        if total > max_bytes:
            raise QuotaExceeded(f"request is larger than {max_bytes} bytes")
        return b"".join(chunks)

    def remove(self, entry: Entry) -> None:
        try:
            os.unlink(entry.name, dir_fd=self.fds["new"])
        except FileNotFoundError:
            pass
        except IsADirectoryError:
            shutil.rmtree(entry.name, dir_fd=self.fds["new"], ignore_errors=True)

    def quarantine(self, entry: Entry) -> str:
        """Move an entry out of the inbox into the host-private quarantine; returns its new name."""
        dest = f"{time.time_ns()}-{entry.name[:80]}"
        try:
            # rename() moves the entry itself: a symlink is not followed, a FIFO is not opened.
            os.rename(entry.name, dest, src_dir_fd=self.fds["new"], dst_dir_fd=self.fds["quarantine"])
        except FileNotFoundError:
            return ""
        except OSError:
            self.remove(entry)  # another filesystem: drop it, the audit log keeps the record
            return ""
        return dest

    def prune_quarantine(self, keep: int = QUARANTINE_KEEP) -> None:
        names = sorted(os.listdir(self.fds["quarantine"]))
        for name in names[:-keep] if len(names) > keep else []:
            try:
                os.unlink(name, dir_fd=self.fds["quarantine"])
            except IsADirectoryError:
                shutil.rmtree(name, dir_fd=self.fds["quarantine"], ignore_errors=True)
            except OSError:
                pass

    def prune_tmp(self, max_age: float = TMP_MAX_AGE) -> None:
        """Remove requests an agent began but never completed (it crashed while writing)."""
        cutoff = time.time() - max_age
        with os.scandir(self.fds["tmp"]) as it:
            for de in it:
                try:
                    if de.stat(follow_symlinks=False).st_mtime < cutoff:
                        if de.is_dir(follow_symlinks=False):
                            shutil.rmtree(de.name, dir_fd=self.fds["tmp"], ignore_errors=True)
                        else:
                            os.unlink(de.name, dir_fd=self.fds["tmp"])
                except OSError:
                    continue

    # -- replies and status --------------------------------------------------------------------

    def write_reply(self, reply: dict[str, Any], fsync: bool = True) -> None:
        data = json.dumps(reply, separators=(",", ":")).encode() + b"\n"
        atomic_write(self.fds["replies"], f"{reply['id']}.json", data, mode=0o644, fsync=fsync)

    def has_reply(self, rid: str) -> bool:
        try:
            st = os.stat(f"{rid}.json", dir_fd=self.fds["replies"], follow_symlinks=False)
        except FileNotFoundError:
            return False
        return stat.S_ISREG(st.st_mode)

    def sync_replies(self) -> None:
        fsync_dir(self.fds["replies"])

    def prune_replies(self, ttl: float) -> None:
        cutoff = time.time() - ttl
        with os.scandir(self.fds["replies"]) as it:
            for de in it:
                try:
                    if de.stat(follow_symlinks=False).st_mtime < cutoff:
                        os.unlink(de.name, dir_fd=self.fds["replies"])
                except OSError:
                    continue

    def write_status(self, status: dict[str, Any]) -> None:
        # No fsync: status.json is informational and rewritten by every sync; the
        # rename keeps it whole.
        atomic_write(self.fds["outbox"], "status.json", json.dumps(status, indent=1).encode() + b"\n",
                     mode=0o644, fsync=False)


def channel_layout(base: str, agent_uid: int | None = None,
                   agent_gid: int | None = None) -> list[tuple[str, int, int, int]]:
    """(path, mode, uid, gid) of every directory of a channel, parents first.

    The agent may write inbox/ (and its tmp/ and new/) but only read outbox/; the host (the broker's
    own user: root in production) owns the rest. The agent's uid/gid default to the broker's own.
    """
    host_uid, host_gid = os.geteuid(), os.getegid()
    agent_uid = host_uid if agent_uid is None else agent_uid
    agent_gid = host_gid if agent_gid is None else agent_gid
    return [
        (base, 0o755, host_uid, host_gid),
        (os.path.join(base, "inbox"), 0o755, agent_uid, agent_gid),
        (os.path.join(base, "inbox", "tmp"), 0o755, agent_uid, agent_gid),
        (os.path.join(base, "inbox", "new"), 0o755, agent_uid, agent_gid),
        (os.path.join(base, "outbox"), 0o755, host_uid, host_gid),
        (os.path.join(base, "outbox", "replies"), 0o755, host_uid, host_gid),
    ]


def create_channel_dirs(base: str, agent_uid: int | None = None, agent_gid: int | None = None) -> list[str]:
    """Create (or fix) a channel's directories; returns what was created or changed."""
    changed = []
    os.makedirs(os.path.dirname(base), mode=0o755, exist_ok=True)
    for path, mode, uid, gid in channel_layout(base, agent_uid, agent_gid):
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            os.mkdir(path, mode)
            os.chown(path, uid, gid)
            os.chmod(path, mode)
            changed.append(path)
            continue
        if not stat.S_ISDIR(st.st_mode):
            raise ChannelUnsafe(f"{path} exists and is not a directory")
        if stat.S_IMODE(st.st_mode) != mode or (st.st_uid, st.st_gid) != (uid, gid):
            os.chown(path, uid, gid, follow_symlinks=False)
            os.chmod(path, mode)
            changed.append(path)
    return changed
