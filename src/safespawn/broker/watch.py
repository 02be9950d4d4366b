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

Once a second (`PULSE`) it also looks, through /proc only, whether every desired sidecar still runs
as recorded; a channel where one does not (podman's restart policy gave it a new process, or it
died) gets a quick sync at once, which records the new process and makes its pid files true again.

The installed systemd units run it as each channel's resident broker (`safespawn watch --quick
--channel CH`, Type=notify): `--quick` leaves the full passes to the reconcile timer, systemd hears
READY=1, a watchdog ping every pass and a STATUS line, and a changed configuration file (or profile)
is loaded on the next pulse; one that does not load is refused and the broker keeps serving with
the one it has, saying so in its log.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import select
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable
from types import FrameType

from ..config import load_config
from . import pidsignal
from .engine import Engine
from .inbox import ChannelDir, create_channel_dirs
from .state import ChannelState

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
# How often the recorded sidecar processes are checked (and the configuration file looked at).
PULSE = 1.0


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


def lay_out(engine: Engine, names: Iterable[str] | None = None) -> None:
    """Create (or fix) the configured channels' directories (all, or those named), as `install` does."""
    cfg = engine.config
    for ch in sorted(cfg.channels.values(), key=lambda c: c.name):
        if names is not None and ch.name not in names:
            continue
        changed = create_channel_dirs(ChannelDir.path_of(cfg.broker.channels_dir, ch.name), ch.agent_uid,
                                      ch.agent_gid)
        for path in changed:
            log.info("laid out %s", path)


class Systemd:
    """sd_notify(3) for Type=notify: READY=1, WATCHDOG=1, STATUS=... to $NOTIFY_SOCKET, if set.

    The variables are taken out of the environment: podman, inheriting NOTIFY_SOCKET, would hand the
    socket to the sidecar and wait for it to report ready."""

    def __init__(self) -> None:
        addr = os.environ.pop("NOTIFY_SOCKET", "")
        for var in ("WATCHDOG_USEC", "WATCHDOG_PID"):
            os.environ.pop(var, None)
        self.addr = "\0" + addr[1:] if addr.startswith("@") else addr

    def notify(self, message: str) -> None:
        if not self.addr:
            return
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(message.encode("utf-8", "replace"), self.addr)
        except OSError as e:
            log.debug("sd_notify: %s", e)


def runs_as_recorded(engine: Engine, name: str) -> bool:
    """The pulse's check of a channel, through /proc only (no runtime call, no lock): does every
    desired sidecar still run as its record says? False when one was replaced or died (the quick
    sync that follows lists, records the new process and rewrites its pid files), when a respawn
    is due, or when its netns is gone."""
    b = engine.config.broker
    st = ChannelState.of(b.state_dir, name)
    try:
        st.load_desired()  # parsed again only when it changed (state.py)
    except (OSError, ValueError):
        return False
    now = time.time()
    for d in st.desired.values():
        ident = d.identity
        if ident is None:
            if d.failures and now >= d.next_retry:
                return False
            continue
        # The start time alone (one read of /proc/PID/stat): the same pid starting again within the
        # same clock tick is not a case to pay a second read per sidecar per second for; a signal
        # checks the full identity (and the cgroup) at delivery anyway.
        if pidsignal.start_ticks(ident.pid) != ident.start_ticks:
            return False
        if d.netns is not None and not os.path.lexists(os.path.join(str(b.netns_dir), d.netns)):
            return False
    return True


class ConfigFollower:
    """A resident broker's configuration: loaded again when its file or a profile in profiles_dir
    changed. A configuration that does not load (or no longer names the channels served) is refused
    with an error in the log, and the broker keeps serving with the one it has."""

    def __init__(self, engine: Engine, explicit: str | None, names: Iterable[str], make: Callable[..., Engine]) -> None:
        self.explicit, self.names, self.make = explicit, set(names), make
        self.seen = self._signature(engine)

    @staticmethod
    def _signature(engine: Engine) -> tuple[tuple[str, int, int, int], ...]:
        cfg = engine.config
        paths = [str(cfg.path)] if cfg.path else []
        try:
            with os.scandir(cfg.broker.profiles_dir) as it:
                paths += sorted(e.path for e in it if e.name.endswith(".toml"))
        except OSError:
            pass
        sig = []
        for p in paths:
            try:
                st = os.stat(p)
                sig.append((p, st.st_mtime_ns, st.st_size, st.st_ino))
            except OSError:
                sig.append((p, 0, 0, 0))
        return tuple(sig)

    def __call__(self, engine: Engine) -> Engine | None:
        """A new engine when the configuration changed and loads; None otherwise."""
        sig = self._signature(engine)
        if sig == self.seen:
            return None
        self.seen = sig
        try:
            cfg = load_config(self.explicit)
            missing = sorted(self.names - set(cfg.channels))
            if missing:
                raise ValueError(f"channel(s) {', '.join(missing)} no longer configured")
            new = self.make(cfg)  # the policy loads and validates every profile here
        except Exception as e:  # any error: keep serving with the configuration that works
            log.error("configuration %s changed but is refused (%s): still serving with the previous one; "
                      "`safespawn check-config` says more", engine.config.path, e)
            return None
        self.seen = self._signature(new)
        log.info("configuration %s changed: reloaded", cfg.path)
        return new


def watch(engine: Engine, interval: float = 0.05, reconcile_interval: float | None = None,
          stop: threading.Event | None = None, use_inotify: bool = True, channels: Iterable[str] | None = None,
          quick: bool = False, reload: Callable[[Engine], Engine | None] | None = None) -> None:
    """Serve the configured channels (all, or `channels`) until SIGTERM/SIGINT or `stop`.

    `quick`: every sync trusts the recorded processes, and there is no full pass (the reconcile
    timer's job). `reload(engine)`: asked every pulse for a new engine (a changed configuration)."""
    stop = stop or threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("received signal %d, stopping after the current sync", signum)
        stop.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
    systemd = Systemd()
    cfg = engine.config
    names = sorted(cfg.channels) if channels is None else sorted(set(channels))
    for n in names:
        cfg.channel(n)  # ConfigError for a channel that is not configured
    lay_out(engine, names)
    every = float(reconcile_interval or cfg.broker.reconcile_interval)
    inboxes = {name: ChannelDir.inbox_new_of(cfg.broker.channels_dir, name) for name in names}
    notify: Inotify | None = None
    if use_inotify:
        try:
            notify = Inotify()
        except (OSError, AttributeError) as e:  # no inotify in this kernel or libc
            log.warning("inotify is not available (%s): polling every %gs", e, interval)
    log.info("watching %d channel(s) %s%s: %s", len(inboxes), "on inotify events" if notify else "by polling",
             " (quick syncs only)" if quick else "", ", ".join(sorted(inboxes)))
    systemd.notify("READY=1\nSTATUS=serving " + ", ".join(names))
    wds: dict[int, str] = {}
    next_full = float("inf") if quick else 0.0
    next_pulse = time.monotonic() + PULSE
    due = set(inboxes)  # channels to sync in this pass
    try:
        while not stop.is_set():
            systemd.notify("WATCHDOG=1")
            full = time.monotonic() >= next_full
            if full:
                due = set(inboxes)
            synced, progressed = set(), set()
            for name in sorted(due):
                if stop.is_set():
                    break
                # Between full passes, a request-driven sync trusts the verified processes.
                if _sync(engine, name, stop, full):
                    progressed.add(name)
                synced.add(name)
            if full:
                next_full = time.monotonic() + every
            stale: set[str] = set()
            now = time.monotonic()
            if now >= next_pulse:
                next_pulse = now + PULSE
                renewed = reload(engine) if reload is not None else None
                if renewed is not None:
                    engine = renewed
                    systemd.notify("STATUS=serving " + ", ".join(names) + " (configuration reloaded)")
                # A runtime restart (or a death) seen within a second, not at the next full pass.
                stale = {n for n in inboxes if not runs_as_recorded(engine, n)}
            # Still waiting after its sync (the per-run limit, or arrived meanwhile), or a sidecar
            # that no longer runs as recorded: again, at once where the last sync answered
            # something (an agent sending its next request right after its reply), after a short
            # pause otherwise (an inbox the sync cannot empty must not spin the loop).
            due = {n for n in synced if _has_pending(inboxes[n])} | stale
            if due:
                if due - progressed:
                    stop.wait(min(interval, AGAIN_PAUSE))
                continue
            if notify is None:
                stop.wait(min(interval, max(0.0, next_pulse - time.monotonic())))
                due = {n for n in inboxes if _has_pending(inboxes[n])}
                continue
            unwatched, fresh = _place(notify, inboxes, wds)
            # A request may have arrived in a fresh inbox/new before its watch was placed.
            due = {n for n in fresh if _has_pending(inboxes[n])}
            if due:
                continue
            # A channel whose inbox could not be watched is looked at by polling meanwhile.
            wait = min(max(0.0, next_full - time.monotonic()), max(0.0, next_pulse - time.monotonic()),
                       interval if unwatched else MAX_WAIT)
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
                elif _has_pending(inboxes[watched]):
                    # Not for a stale event: a request that arrived during a sync is served by the
                    # sync that follows it, and its event, read afterwards, must not cost the
                    # channel another reconcile (a later request makes an event of its own).
                    due.add(watched)
            due |= {n for n in unwatched if _has_pending(inboxes[n])}
    finally:
        if notify is not None:
            notify.close()
        systemd.notify("STOPPING=1")
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


def _sync(engine: Engine, name: str, stop: threading.Event, full: bool = True) -> bool:
    """One sync of a channel; whether it answered or set aside anything from the inbox."""
    try:
        r = engine.sync(name, full=full)
        if r.handled or r.quarantined or r.replayed or r.respawned or r.removed or r.awaiting_restart:
            log.info("sync %s: %s", name, r.summary())
        for err in r.errors:
            log.warning("sync %s: %s", name, err)
        return bool(r.handled or r.quarantined or r.replayed)
    except Exception:  # the watcher must outlive any one failure; the next pass retries
        log.exception("sync of channel %s failed", name)
        stop.wait(1.0)
        return False
