"""The fast paths with real podman: signals through a verified pidfd, syncs without listings, a
recovery served in chunks, a lingering sync.

The sidecar here is a test-only profile, a shell in a netns that prints `got-HUP` each time it gets
SIGHUP (a trap: as PID 1 of its pid namespace it would ignore a signal it has no handler for), so a
delivered HUP shows in `podman logs`. A host `sleep` that got a HUP would be gone.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.broker import Broker

from safespawn.agent import client
from safespawn.broker import pidsignal

NSLEEPER = """\
name = "nsleeper"
description = "test-only: a sleeping sidecar in a qdhcp- netns that reports each HUP"
command = ["/bin/sh", "-c", "trap 'echo got-HUP' HUP; while :; do sleep 100000 & wait $!; done", "nsleeper"]
capabilities = []
netns = "required"
netns_pattern = 'qdhcp-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}'
signals = ["HUP", "TERM", "KILL"]
stop_grace = 0
tmpfs = []
"""


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"qdhcp-{uuid.uuid4()}"
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=30)
    yield name
    subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30, check=False)


@pytest.fixture
def b(tmp_path: Path) -> Iterator[Broker]:
    (tmp_path / "profiles").mkdir(parents=True)
    (tmp_path / "profiles" / "nsleeper.toml").write_text(NSLEEPER)
    with Broker.make(tmp_path, profiles=["nsleeper"]) as broker:
        yield broker


class Calls:
    """Counts the runtime calls the engine makes (the real runtime still does the work)."""

    def __init__(self, broker: Broker, monkeypatch: pytest.MonkeyPatch) -> None:
        self.made: list[str] = []
        rt = broker.engine.runtime
        for name in ("list", "run", "inspect", "signal", "stop", "remove"):
            real = getattr(rt, name)

            def counted(*a: Any, _real: Any = real, _name: str = name, **k: Any) -> Any:
                self.made.append(_name)
                return _real(*a, **k)

            monkeypatch.setattr(rt, name, counted)


def inspect(name: str) -> dict[str, Any]:
    out = subprocess.run(["podman", "container", "inspect", "--format=json", name], capture_output=True,
                         text=True, timeout=60, check=True).stdout
    return dict(json.loads(out)[0])


def hups(name: str) -> int:
    p = subprocess.run(["podman", "logs", name], capture_output=True, text=True, timeout=60, check=True)
    return (p.stdout + p.stderr).count("got-HUP")


def wait_for(pred: Any, timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {pred}")


def quick_request(b: Broker, request: dict[str, Any]) -> dict[str, Any]:
    """As the path unit's `sync --quick` or watch between full passes would serve it."""
    rid = b.write(request)
    b.engine.sync(b.channel, full=False)
    r = b.reply(rid)
    assert r is not None
    return r


def start(b: Broker, netns: str) -> dict[str, Any]:
    r = b.request(client.start_request("nsleeper", [], netns=netns))
    assert r["ok"], r
    return r


def tamper_desired(b: Broker, name: str, **fields: Any) -> None:
    p = b.root / "state" / b.channel / "desired.json"
    data = json.loads(p.read_text())
    for d in data["sidecars"]:
        if d["name"] == name:
            d.update(fields)
    p.write_text(json.dumps(data))


def test_a_hup_by_pid_reaches_the_sidecar_through_its_pidfd_without_any_runtime_call(
        b: Broker, netns: str, monkeypatch: pytest.MonkeyPatch) -> None:
    r = start(b, netns)
    first = inspect(r["sidecar"])
    assert first["State"]["Pid"] == r["pid"]
    recorded = b.desired()[r["sidecar"]]
    assert (recorded["pid"], recorded["container_id"]) == (r["pid"], first["Id"])
    assert recorded["pid_start"] == pidsignal.start_ticks(r["pid"])

    calls = Calls(b, monkeypatch)
    hup = quick_request(b, client.signal_request("HUP", pid=r["pid"], profile="nsleeper"))
    assert hup["ok"] and hup["sidecar"] == r["sidecar"] and hup["pid"] == r["pid"], hup
    assert calls.made == []  # no listing, no podman kill: the signal went through the pidfd
    wait_for(lambda: hups(r["sidecar"]) == 1)  # and the sidecar got it


def test_a_pid_the_broker_holds_that_now_belongs_to_a_host_process_never_gets_the_signal(
        b: Broker, netns: str) -> None:
    """The recorded pid of a sidecar now names a host `sleep` (as after the sidecar died and its pid was
    reused), with the host process's own start time: the cgroup check refuses the fast path, the
    host process is not signalled, and a HUP by name still reaches the sidecar through podman."""
    r = start(b, netns)
    host = subprocess.Popen(["sleep", "300"])
    try:
        ticks = pidsignal.start_ticks(host.pid)
        tamper_desired(b, r["sidecar"], pid=host.pid, pid_start=ticks)
        by_pid = b.request(client.signal_request("HUP", pid=host.pid, profile="nsleeper"))
        assert by_pid["ok"] is False and by_pid["error"]["code"] == "not_found", by_pid
        time.sleep(0.3)
        assert host.poll() is None, "the host process got the signal"
        assert hups(r["sidecar"]) == 0

        # By name (profile + netns, as a kill script for a netns sidecar may): the record does not
        # verify, so podman delivers it by container name, to the sidecar.
        by_name = b.request(client.signal_request("HUP", profile="nsleeper", netns=netns))
        assert by_name["ok"], by_name
        wait_for(lambda: hups(r["sidecar"]) == 1)
        time.sleep(0.3)
        assert host.poll() is None, "the host process got the signal"
    finally:
        host.send_signal(signal.SIGKILL)
        host.wait()


def test_a_stale_start_time_for_a_live_pid_is_refused_and_a_full_sync_records_the_truth_again(
        b: Broker, netns: str) -> None:
    r = start(b, netns)
    real_ticks = pidsignal.start_ticks(r["pid"])
    assert real_ticks is not None
    tamper_desired(b, r["sidecar"], pid_start=real_ticks + 1)  # as if the pid had been reused
    assert pidsignal.send(pidsignal.ProcessIdentity(r["pid"], real_ticks + 1, b.desired()[r["sidecar"]][
        "container_id"]), 0) is pidsignal.Delivery.MISMATCH
    # A full sync sees the container running with another identity than recorded, and records it.
    b.sync()
    assert b.desired()[r["sidecar"]]["pid_start"] == real_ticks
    hup = b.request(client.signal_request("HUP", pid=r["pid"], profile="nsleeper"))
    assert hup["ok"], hup


def test_an_idle_quick_sync_lists_nothing_and_a_dead_sidecar_still_makes_it_respawn(
        b: Broker, netns: str, monkeypatch: pytest.MonkeyPatch) -> None:
    r = start(b, netns)
    calls = Calls(b, monkeypatch)
    b.engine.sync(b.channel, full=False)
    assert calls.made == []
    status = json.loads((b.channel_dir() / "outbox" / "status.json").read_text())
    assert [(s["name"], s["state"], s["pid"]) for s in status["sidecars"]] == [(r["sidecar"], "running", r["pid"])]

    subprocess.run(["podman", "rm", "-f", "-t", "0", r["sidecar"]], check=True, capture_output=True, timeout=60)
    b.engine.sync(b.channel, full=False)
    assert calls.made.count("list") == 1 and "run" in calls.made
    assert inspect(r["sidecar"])["State"]["Status"] == "running"


def test_a_new_sidecar_whose_name_a_leftover_container_holds_replaces_it(b: Broker, netns: str) -> None:
    """A leftover of a new sidecar's name (here: a created container with the channel's label, not in
    the desired state) is replaced by the start."""
    name = f"{b.channel}-nsleeper-{netns}"
    image = b.engine.config.channel(b.channel).image
    subprocess.run(["podman", "create", f"--name={name}", f"--label=safespawn.channel={b.channel}",
                    "--network=none", image, "true"], check=True, capture_output=True, timeout=60)
    r = start(b, netns)
    assert r["sidecar"] == name
    c = inspect(name)
    assert c["State"]["Status"] == "running" and c["State"]["Pid"] == r["pid"]
    assert [x["Names"][0] for x in b.containers()] == [name]


def test_a_recovery_respawns_in_parallel_chunks_and_serves_a_request_that_arrives_meanwhile(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """All containers gone (as after a reboot): one sync respawns them `parallel_starts` at a time, in
    chunks of 4 x parallel_starts, and a request written while the first chunk runs is answered
    between chunks, before the recovery ends."""
    from support.usersystemd import SLEEPER

    (tmp_path / "profiles").mkdir(parents=True)
    (tmp_path / "profiles" / "sleeper.toml").write_text(SLEEPER)
    with Broker.make(tmp_path, profiles=["sleeper"], broker_extra="parallel_starts = 1") as b:
        names = []
        for i in range(6):
            first = b.request(client.start_request("sleeper", [f"--key=k{i}"]))
            assert first["ok"], first
            names.append(first["sidecar"])
        ids = [c["Id"] for c in b.containers()]
        subprocess.run(["podman", "rm", "-f", "-t", "0", *ids], check=True, capture_output=True, timeout=120)

        rt = b.engine.runtime
        real_run = rt.run
        order: list[str] = []
        late = client.start_request("sleeper", ["--key=late"])

        def run(spec: Any) -> str:
            if not order:
                b.write(late)  # arrives while the recovery's first chunk runs
            order.append(spec.name)
            return str(real_run(spec))

        monkeypatch.setattr(rt, "run", run)
        r = b.engine.sync(b.channel, full=False)
        assert r.respawned == 6 and r.handled == 1, r
        answer = b.reply(late["id"])
        assert answer is not None and answer["ok"], answer
        late_name = answer["sidecar"]
        # The first chunk (4 = 4 x parallel_starts) respawned, then the late request, then the rest.
        assert late_name in order and order.index(late_name) == 4, order
        assert sorted(c["Names"][0] for c in b.containers() if c["State"] == "running") == \
            sorted([*names, late_name])
        # The respawned processes are recorded: the next sync needs no listing.
        calls = Calls(b, monkeypatch)
        b.engine.sync(b.channel, full=False)
        assert calls.made == []


def test_a_lingering_sync_serves_the_next_request_itself_and_still_exits(b: Broker, netns: str) -> None:
    """`sync --quick --linger=S`: a request written while the sync lingers is answered by that same
    process; with nothing more to do it exits about S seconds after the last request."""
    r = start(b, netns)
    env = dict(os.environ, SAFESPAWN_CONFIG=str(b.config_path))
    p = subprocess.Popen([sys.executable, "-m", "safespawn.cli", "sync", "--quick", "--linger=1.5",
                          b.channel], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        time.sleep(0.5)
        assert p.poll() is None  # lingering
        t0 = time.monotonic()
        hup = client.submit(str(b.channel_dir()), client.signal_request("HUP", pid=r["pid"], profile="nsleeper"),
                            timeout=10)
        assert hup["ok"], hup
        assert p.poll() is None, "the reply came from another process"
        assert p.wait(timeout=20) == 0
        assert time.monotonic() - t0 >= 1.0  # it waited again after serving
    finally:
        p.kill()
        p.wait()
    assert p.stderr is not None
    err = p.stderr.read().decode()
    assert err.count(f"sync {b.channel}: handled 0,") == 1, err  # the activation's own sync
    assert err.count(f"sync {b.channel} (lingering): handled 1,") == 1, err


# -- a start checked through /proc (podman's --pidfile) ------------------------------------------

DYING = """\
name = "dying"
description = "test-only: exits 3 after --after=SECONDS (podman's restart policy starts it again)"
command = ["/bin/sh", "-c", "sleep ${0#--after=}; echo dying-now; exit 3"]
capabilities = []
netns = "required"
netns_pattern = 'qdhcp-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}'
signals = ["TERM"]
stop_grace = 0
tmpfs = []

[args]
"--after" = { type = "regex", pattern = '[0-9.]{1,5}' }
"""


def test_a_new_sidecar_is_checked_through_proc_without_a_listing_or_an_inspect(
        b: Broker, netns: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """podman writes the new container's pid (--pidfile, in the channel's root-only state dir); the
    process is checked through /proc, and the reply carries the pid podman itself reports."""
    calls = Calls(b, monkeypatch)
    r = start(b, netns)
    assert calls.made == ["run", "list"], calls.made  # the run; the list is the sync's full reconcile
    c = inspect(r["sidecar"])
    assert c["State"]["Status"] == "running" and c["State"]["Pid"] == r["pid"] and c["RestartCount"] == 0
    recorded = b.desired()[r["sidecar"]]
    assert (recorded["pid"], recorded["container_id"]) == (r["pid"], c["Id"])
    pids = b.root / "state" / b.channel / "pids"
    assert oct(pids.stat().st_mode & 0o777) == "0o700"
    assert (pids / f"{r['sidecar']}.pid").read_text().strip() == str(r["pid"])
    # The status an agent reads right after, from the record (quick) and from the listing (full),
    # names the same process generation, even where the two round its start to different seconds.
    tamper_desired(b, r["sidecar"], started_at=recorded["started_at"] - 1)
    b.engine.sync(b.channel, full=False)
    quick = json.loads((b.channel_dir() / "outbox" / "status.json").read_text())["sidecars"][0]
    b.sync()
    full = json.loads((b.channel_dir() / "outbox" / "status.json").read_text())["sidecars"][0]
    assert quick["generation"] == full["generation"] and quick["pid"] == full["pid"] == r["pid"]
    assert quick["process_started"] == full["process_started"] == recorded["started_at"] - 1
    # Stopping the sidecar removes its pid file.
    assert b.request(client.stop_request("nsleeper", netns=netns))["ok"]
    assert not (pids / f"{r['sidecar']}.pid").exists()


@pytest.mark.parametrize("after", ["0", "0.05", "0.12"])
def test_a_program_that_dies_at_once_or_soon_is_reported_failed_on_the_proc_path(
        tmp_path: Path, netns: str, after: str) -> None:
    """The program exits 3 after AFTER seconds; podman's restart policy starts it again each time. At
    once (the pid podman wrote is gone before the check), soon (the check may meet a successor the
    restart policy started: it is newer than `run`), or within the settle (the check waits for it):
    the start is refused with why, and nothing is left running or desired."""
    (tmp_path / "profiles").mkdir(parents=True)
    (tmp_path / "profiles" / "dying.toml").write_text(DYING)
    with Broker.make(tmp_path, profiles=["dying"]) as b:
        r = b.request(client.start_request("dying", [f"--after={after}"], netns=netns))
        assert r["ok"] is False and r["error"]["code"] == "runtime_failed", r
        assert "exited" in r["error"]["message"] or "is not running" in r["error"]["message"], r
        assert b.containers() == [] and b.desired() == {}
