"""`safespawn watch`: the sync engine for hosts without systemd.

Polls each channel's inbox/new (a scandir of a usually empty directory: cheap) and syncs a channel
as soon as something waits there; every `reconcile_interval` seconds it syncs every channel, which
is what the systemd timer does. Same engine, same guarantees. SIGTERM/SIGINT finish the current
sync and exit.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from types import FrameType

from .engine import Engine
from .inbox import ChannelDir

log = logging.getLogger(__name__)


def _has_pending(path: str) -> bool:
    try:
        with os.scandir(path) as it:
            return any(True for _ in it)
    except OSError:
        return False


def watch(engine: Engine, interval: float = 0.05, reconcile_interval: float | None = None,
          stop: threading.Event | None = None) -> None:
    stop = stop or threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("received signal %d, stopping after the current sync", signum)
        stop.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
    cfg = engine.config
    every = float(reconcile_interval or cfg.broker.reconcile_interval)
    inboxes = {name: ChannelDir.inbox_new_of(cfg.broker.channels_dir, name) for name in cfg.channels}
    log.info("watching %d channel(s): %s", len(inboxes), ", ".join(sorted(inboxes)))
    next_full = 0.0
    while not stop.is_set():
        now = time.monotonic()
        full = now >= next_full
        for name, inbox in sorted(inboxes.items()):
            if stop.is_set():
                break
            if full or _has_pending(inbox):
                try:
                    r = engine.sync(name)
                    if r.handled or r.quarantined or r.replayed or r.respawned or r.removed:
                        log.info("sync %s: handled %d, refused %d, quarantined %d, replayed %d, respawned %d, "
                                 "removed %d", name, r.handled, r.refused, r.quarantined, r.replayed,
                                 r.respawned, r.removed)
                    for err in r.errors:
                        log.warning("sync %s: %s", name, err)
                except Exception:  # the watcher must outlive any one failure; the next pass retries
                    log.exception("sync of channel %s failed", name)
                    stop.wait(1.0)
        if full:
            next_full = time.monotonic() + every
        stop.wait(interval)
    log.info("watch stopped")
