"""`safespawn watch` without root: it lays out the channels it serves, wakes on inotify events (a
poll interval far longer than the test proves that nothing else woke it), and falls back to polling.
The real-podman proof (a configured channel used through `watch` alone) is in
tests/integration/test_core.py."""

from __future__ import annotations

import os
import stat
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from support.engine_host import Host

from safespawn import watch as watch_mod
from safespawn.watch import Inotify, watch


@contextmanager
def watching(host: Host, **kw: object) -> Iterator[threading.Event]:
    stop = threading.Event()
    t = threading.Thread(target=watch, args=(host.engine,), kwargs={"stop": stop, **kw}, daemon=True)
    t.start()
    try:
        yield stop
    finally:
        stop.set()
        t.join(timeout=10)
        assert not t.is_alive()


def wait_for(predicate, timeout: float) -> float:  # type: ignore[no-untyped-def]
    t0 = time.monotonic()
    while not predicate():
        assert time.monotonic() - t0 < timeout, "timed out"
        time.sleep(0.005)
    return time.monotonic() - t0


def test_watch_lays_out_a_channel_that_was_never_laid_out(tmp_path: Path) -> None:
    host = Host(tmp_path, lay_out=False)
    assert not host.chdir.exists()
    with watching(host, interval=0.01, reconcile_interval=3600):
        wait_for(lambda: (host.chdir / "outbox" / "replies").is_dir(), 10)
        for sub in ("inbox/new", "inbox/tmp", "outbox/replies"):
            st = os.lstat(host.chdir / sub)
            assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o755
        rid = host.write(host.start("a"))
        wait_for(lambda: host.reply(rid) is not None, 10)
    assert host.reply(rid)["ok"]  # type: ignore[index]


def test_watch_wakes_on_inotify_events_not_on_its_poll_interval(tmp_path: Path) -> None:
    host = Host(tmp_path)
    # A poll every 60 s and a full sync every hour: only an inotify event can serve this in time.
    with watching(host, interval=60, reconcile_interval=3600):
        time.sleep(0.3)  # the first full pass is over, the watch waits
        lists = host.rt.count("list")
        rid = host.write(host.start("a"))
        took = wait_for(lambda: host.reply(rid) is not None, 5)
    assert host.reply(rid)["ok"] and took < 5  # type: ignore[index]
    assert host.rt.count("list") > lists


def test_watch_places_its_watch_again_when_inbox_new_is_replaced(tmp_path: Path) -> None:
    host = Host(tmp_path)
    new = host.chdir / "inbox" / "new"
    with watching(host, interval=60, reconcile_interval=3600):
        time.sleep(0.3)
        fresh = host.chdir / "inbox" / "fresh"
        fresh.mkdir()
        os.rename(new, host.root / "old-new")
        # rename() over an empty directory: fine too if the sync the move event started already laid
        # out a new inbox/new in between.
        os.rename(fresh, new)
        time.sleep(0.1)  # the next pass (after the move event) watches the new directory
        rid = host.write(host.start("b"))
        wait_for(lambda: host.reply(rid) is not None, 5)


def test_watch_polls_when_inotify_is_unavailable(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    def no_inotify() -> Inotify:
        raise OSError(38, "Function not implemented")

    monkeypatch.setattr(watch_mod, "Inotify", no_inotify)
    host = Host(tmp_path)
    with watching(host, interval=0.02, reconcile_interval=3600):
        rid = host.write(host.start("a"))
        wait_for(lambda: host.reply(rid) is not None, 5)


def test_watch_drains_a_backlog_beyond_the_per_run_limit(tmp_path: Path) -> None:
    host = Host(tmp_path, max_requests_per_run=2)
    with watching(host, interval=60, reconcile_interval=3600):
        time.sleep(0.3)
        rids = [host.write(host.start(f"k{i}")) for i in range(7)]
        wait_for(lambda: all(host.reply(r) is not None for r in rids), 10)
