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

from safespawn.broker import watch as watch_mod
from safespawn.broker.watch import Inotify, watch


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


def test_a_request_sent_right_after_a_reply_is_served_without_the_pause(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """An agent's next request often arrives while the sync that answered its last one still runs
    (the reply goes out before the reconcile): the watch syncs again at once after a sync that
    answered something, and pauses (AGAIN_PAUSE) only after one that did not."""
    monkeypatch.setattr(watch_mod, "AGAIN_PAUSE", 3.0)
    host = Host(tmp_path)
    sync = host.engine.sync
    chain = [host.start(f"k{i}") for i in range(1, 4)]
    rids: list[str] = []

    def sync_then_a_request_arrives(name: str, **kw: object):  # type: ignore[no-untyped-def]
        r = sync(name, **kw)  # type: ignore[arg-type]
        if r.handled and chain:
            rids.append(host.write(chain.pop(0)))  # written before this sync returned
        return r

    monkeypatch.setattr(host.engine, "sync", sync_then_a_request_arrives)
    with watching(host, interval=60, reconcile_interval=3600):
        time.sleep(0.3)
        rids.append(host.write(host.start("k0")))
        took = wait_for(lambda: len(rids) == 4 and all(host.reply(r) is not None for r in rids), 10)
    assert took < 2.0, took  # three pauses would take 9 s


def _config(tmp_path: Path, image: str) -> Path:
    p = tmp_path / "safespawn.toml"
    p.write_text(f'[broker]\nchannels_dir = "{tmp_path}/channels"\nstate_dir = "{tmp_path}/state"\n'
                 f'profiles_dir = "{tmp_path}/profiles"\n\n[channels.ch]\nimage = "{image}"\nprofiles = ["dnsmasq"]\n')
    return p


def test_a_resident_broker_reloads_a_changed_configuration_and_refuses_one_that_does_not_load(
        tmp_path: Path) -> None:
    from support.fake_runtime import FakeRuntime

    from safespawn.broker.engine import Engine
    from safespawn.broker.watch import ConfigFollower
    from safespawn.config import load_config

    def make(cfg):  # type: ignore[no-untyped-def]
        return Engine(cfg, runtime=FakeRuntime())

    path = _config(tmp_path, "localhost/x:1")
    engine = make(load_config(str(path)))
    follow = ConfigFollower(engine, str(path), ["ch"], make)
    assert follow(engine) is None  # nothing changed

    _config(tmp_path, "localhost/x:2")
    os.utime(path, ns=(1, 1))  # a different mtime even within the clock's resolution
    renewed = follow(engine)
    assert renewed is not None and renewed.config.channel("ch").image == "localhost/x:2"
    assert follow(renewed) is None

    path.write_text(path.read_text() + "\n[broker2]\n")  # does not load: refused, the old one stays
    assert follow(renewed) is None
    path.write_text(path.read_text().replace("[broker2]\n", "").replace("[channels.ch]", "[channels.other]"))
    assert follow(renewed) is None  # the channel served is gone: refused too
    # A profile override in profiles_dir is part of the configuration.
    path.write_text(path.read_text().replace("[channels.other]", "[channels.ch]"))
    assert follow(renewed) is not None
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "dnsmasq.toml").write_text("name = 'dnsmasq'\nbroken = [\n")
    assert follow(renewed) is None  # a profile that does not parse is refused


def test_watch_tells_systemd_it_is_ready_and_pings_the_watchdog_and_hides_the_socket_from_podman(
        tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import socket

    sock_path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(sock_path)
    sock.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", sock_path)
    monkeypatch.setenv("WATCHDOG_USEC", "900000000")
    host = Host(tmp_path)
    seen: list[str] = []
    with watching(host, interval=60, reconcile_interval=3600, quick=True):
        while not any(m.startswith("WATCHDOG=1") for m in seen):
            seen.append(sock.recv(4096).decode())
        assert "NOTIFY_SOCKET" not in os.environ and "WATCHDOG_USEC" not in os.environ
    assert seen[0].startswith("READY=1\nSTATUS=serving ch")
    sock.close()
