"""`safespawn watch`: the sync engine for hosts without systemd.

Before serving, it lays out every configured channel (as `install` does: inbox writable by the
agent, outbox read-only to it), so that on a host where nothing else ran a configured channel is
usable through `watch` alone.

It then waits on inotify events (through ctypes: IN_CREATE and IN_MOVED_TO on each channel's
inbox/new) and syncs a channel as soon as something arrives there. Where inotify is not available
(or with `--poll`), it polls inbox/new instead (a scandir of a usually empty directory, every
`interval` seconds). Either way, every `reconcile_interval` seconds it syncs every channel, which is
what the systemd timer does; same engine, same guarantees. SIGTERM/SIGINT finish the current sync
and exit.

Nothing is lost to a missed event: the inotify queue holds what arrives during a sync, a channel
whose inbox is still not empty after its sync (the per-run limit) is synced again at once, and a
watch that could not be placed (inbox/new replaced by the agent: the next sync lays it out again)
is placed again on the next pass.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import select
import signal
import struct
import threading
import time
from types import FrameType

from .engine import Engine
from .inbox import ChannelDir, create_channel_dirs

log = logging.getLogger(__name__)

IN_CREATE = 0x00000100
IN_MOVED_TO = 0x00000080
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
IN_DONT_FOLLOW = 0x02000000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC
WATCH_MASK = IN_CREATE | IN_MOVED_TO | IN_DELETE_SELF | IN_MOVE_SELF | IN_ONLYDIR | IN_DONT_FOLLOW
EVENT = struct.Struct("iIII")  # wd, mask, cookie, len (then len bytes of name)
# Pause before syncing again a channel whose inbox its sync left non-empty.
AGAIN_PAUSE = 0.05
# Longest wait without an event: watches that could not be placed are retried this often.
MAX_WAIT = 1.0


def _has_pending(path: str) -> bool:
    try:
        with os.scandir(path) as it:
            return any(True for _ in it)
    except OSError:
        return False


class Inotify:
    """The few inotify calls `watch` needs, through ctypes (the host side is stdlib only)."""

    def __init__(self) -> None:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        self._add = libc.inotify_add_watch
        self._add.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        self._add.restype = ctypes.c_int
        init = libc.inotify_init1
        init.argtypes = [ctypes.c_int]
        init.restype = ctypes.c_int
        fd = init(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            e = ctypes.get_errno()
            raise OSError(e, f"inotify_init1: {os.strerror(e)}")
        self.fd = fd

    def add(self, path: str) -> int:
        """Watch a directory (never through a symlink); returns the watch descriptor."""
        wd: int = self._add(self.fd, os.fsencode(path), WATCH_MASK)
        if wd < 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e), path)
        return wd

    def wait(self, timeout: float) -> list[tuple[int, int]] | None:
        """(wd, mask) of the events that arrived within `timeout` seconds; None if the queue
        overflowed (every watched directory must then be looked at)."""
        try:
            ready, _, _ = select.select([self.fd], [], [], max(0.0, timeout))
        except InterruptedError:
            return []
        if not ready:
            return []
        events: list[tuple[int, int]] = []
        while True:
            try:
                buf = os.read(self.fd, 64 * 1024)
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno == errno.EINTR:
                    continue
                raise
            i = 0
            while i + EVENT.size <= len(buf):
                wd, mask, _, n = EVENT.unpack_from(buf, i)
                i += EVENT.size + n
                if mask & IN_Q_OVERFLOW:
                    return None
                events.append((wd, mask))
        return events

    def close(self) -> None:
        os.close(self.fd)


def lay_out(engine: Engine) -> None:
    """Create (or fix) every configured channel's directories, as `install` does."""
    cfg = engine.config
    for ch in sorted(cfg.channels.values(), key=lambda c: c.name):
        changed = create_channel_dirs(ChannelDir.path_of(cfg.broker.channels_dir, ch.name), ch.agent_uid,
                                      ch.agent_gid)
        for path in changed:
            log.info("laid out %s", path)


def watch(engine: Engine, interval: float = 0.05, reconcile_interval: float | None = None,
          stop: threading.Event | None = None, use_inotify: bool = True) -> None:
    stop = stop or threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("received signal %d, stopping after the current sync", signum)
        stop.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
    cfg = engine.config
    lay_out(engine)
    every = float(reconcile_interval or cfg.broker.reconcile_interval)
    inboxes = {name: ChannelDir.inbox_new_of(cfg.broker.channels_dir, name) for name in cfg.channels}
    notify: Inotify | None = None
    if use_inotify:
        try:
            notify = Inotify()
        except (OSError, AttributeError) as e:  # no inotify in this kernel or libc
            log.warning("inotify is not available (%s): polling every %gs", e, interval)
    log.info("watching %d channel(s) %s: %s", len(inboxes), "on inotify events" if notify else "by polling",
             ", ".join(sorted(inboxes)))
    wds: dict[int, str] = {}
    next_full = 0.0
    due = set(inboxes)  # channels to sync in this pass
    try:
        while not stop.is_set():
            full = time.monotonic() >= next_full
            if full:
                due = set(inboxes)
            synced = set()
            for name in sorted(due):
                if stop.is_set():
                    break
                # Between full passes, a request-driven sync trusts the verified processes.
                _sync(engine, name, stop, full)
                synced.add(name)
            if full:
                next_full = time.monotonic() + every
            # Still waiting after its sync (the per-run limit, or arrived meanwhile): again, after a
            # short pause (an inbox the sync cannot empty must not spin the loop).
            due = {n for n in synced if _has_pending(inboxes[n])}
            if due:
                stop.wait(min(interval, AGAIN_PAUSE))
                continue
            if notify is None:
                stop.wait(interval)
                due = {n for n in inboxes if _has_pending(inboxes[n])}
                continue
            unwatched, fresh = _place(notify, inboxes, wds)
            # A request may have arrived in a fresh inbox/new before its watch was placed.
            due = {n for n in fresh if _has_pending(inboxes[n])}
            if due:
                continue
            # A channel whose inbox could not be watched is looked at by polling meanwhile.
            wait = min(max(0.0, next_full - time.monotonic()), interval if unwatched else MAX_WAIT)
            events = notify.wait(wait)
            if events is None:
                due = set(inboxes)  # the queue overflowed: look everywhere
                continue
            for wd, mask in events:
                watched = wds.get(wd)
                if watched is None:
                    continue
                if mask & (IN_IGNORED | IN_DELETE_SELF | IN_MOVE_SELF):
                    wds.pop(wd, None)  # replaced: watched again on the next pass
                due.add(watched)
            due |= {n for n in unwatched if _has_pending(inboxes[n])}
    finally:
        if notify is not None:
            notify.close()
    log.info("watch stopped")


def _place(notify: Inotify, inboxes: dict[str, str], wds: dict[int, str]) -> tuple[set[str], set[str]]:
    """(Re-)place a watch on every inbox/new; returns the channels that could not be watched and
    those watched afresh (a new directory)."""
    unwatched, fresh = set(), set()
    for name, path in inboxes.items():
        try:
            # The same directory gives back its watch descriptor; a replaced one gets a new one.
            wd = notify.add(path)
        except OSError:
            unwatched.add(name)
            continue
        if wds.get(wd) != name:
            fresh.add(name)
        wds[wd] = name
    return unwatched, fresh


def _sync(engine: Engine, name: str, stop: threading.Event, full: bool = True) -> None:
    try:
        r = engine.sync(name, full=full)
        if r.handled or r.quarantined or r.replayed or r.respawned or r.removed:
            log.info("sync %s: handled %d, refused %d, quarantined %d, replayed %d, respawned %d, "
                     "removed %d", name, r.handled, r.refused, r.quarantined, r.replayed, r.respawned, r.removed)
        for err in r.errors:
            log.warning("sync %s: %s", name, err)
    except Exception:  # the watcher must outlive any one failure; the next pass retries
        log.exception("sync of channel %s failed", name)
        stop.wait(1.0)
