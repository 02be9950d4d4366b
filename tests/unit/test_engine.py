"""The engine's own logic, without root: a real channel directory and state dir under tmp_path, the
real policy and ledger, and an in-memory runtime (tests/support/fake_runtime.py) whose failures the
tests inject. The real-podman tests in tests/integration remain the proof that the features work;
these pin what the engine decides and how often it acts.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from support.engine_host import CH, Host

from safespawn.agent import client
from safespawn.broker.reconcile import RUNTIME_RESTART_GRACE
from safespawn.broker.request import parse_request
from safespawn.broker.sidecar import LABEL_CHANNEL
from safespawn.broker.state import STABLE_AFTER, ChannelState
from safespawn.config import allocated_uid
from safespawn.errors import ChannelLocked, RuntimeFailed


class Crash(BaseException):
    """The broker process dies here (not an Exception: nothing in the engine may catch it)."""


@pytest.fixture
def host(tmp_path: Path) -> Host:
    return Host(tmp_path)


def test_runs_as_a_normal_user_too() -> None:
    # Not a skip: this file is the proof that the engine's logic is testable without root; the CI
    # runs it as root and again as an unprivileged user (scripts/test).
    assert isinstance(os.geteuid(), int)


def test_a_start_runs_one_sidecar_and_a_repeated_start_runs_no_second(host: Host) -> None:
    r1 = host.ask(host.start("a"))
    assert r1["ok"] and r1["pid"] == host.rt.containers[r1["sidecar"]].pid
    r2 = host.ask(host.start("a"))
    assert r2["ok"] and r2["sidecar"] == r1["sidecar"] and r2["pid"] == r1["pid"]
    assert host.rt.count("run") == 1 and host.running() == [r1["sidecar"]]
    assert list(host.state().desired) == [r1["sidecar"]]


def test_changed_arguments_replace_the_sidecar(host: Host) -> None:
    r1 = host.ask(host.start("a"))
    r2 = host.ask(host.start("a", "--verbose"))
    assert r2["ok"] and r2["sidecar"] == r1["sidecar"] and r2["pid"] != r1["pid"]
    assert host.rt.count("run") == 2 and host.rt.specs[r1["sidecar"]].args == ("--key=a", "--verbose")


def test_a_replayed_request_is_answered_from_the_ledger_without_acting(host: Host) -> None:
    req = host.start("a")
    first = host.ask(req)
    # The host crashed after publishing the reply, before removing the request: it is still there.
    host.write(req)
    (host.chdir / "outbox" / "replies" / f"{req['id']}.json").unlink()
    host.engine = host.new_engine()
    r = host.sync()
    assert r.replayed == 1 and host.reply(req["id"]) == first
    assert host.rt.count("run") == 1 and host.pending() == []


def test_an_answered_id_reused_by_another_request_keeps_its_first_reply(host: Host) -> None:
    req = host.start("a")
    first = host.ask(req)
    other = dict(host.start("b"), id=req["id"])
    host.write(other)
    r = host.sync()
    assert r.quarantined == 1 and host.reply(req["id"]) == first
    assert host.rt.count("run") == 1 and host.pending() == []
    assert any(e["decision"] == "quarantine" and "collides" in e.get("reason", "") for e in host.audit())


def test_a_crash_between_claim_and_reply_starts_exactly_one_sidecar(host: Host) -> None:
    req = host.start("a")
    host.write(req)
    host.rt.inject("run", Crash("after podman run"), after=True)  # the container exists, no reply yet
    with pytest.raises(Crash):
        host.sync()
    assert host.reply(req["id"]) is None and host.pending() == [f"{req['id']}.json"]
    assert host.state().ledger[req["id"]].state == "claimed"
    host.engine = host.new_engine()
    host.sync()
    r = host.reply(req["id"])
    assert r is not None and r["ok"] and host.rt.count("run") == 1 and len(host.running()) == 1
    assert host.state().ledger[req["id"]].state == "done"


def test_a_signal_interrupted_by_a_crash_is_not_delivered_twice(host: Host) -> None:
    started = host.ask(host.start("a"))
    hup = client.signal_request("HUP", pid=started["pid"])
    host.write(hup)
    host.rt.inject("signal", Crash("after delivering"), after=True)
    with pytest.raises(Crash):
        host.sync()
    assert host.rt.signals == [(started["sidecar"], "HUP")]
    host.engine = host.new_engine()
    host.sync()
    r = host.reply(hup["id"])
    assert r is not None and not r["ok"] and r["error"]["code"] == "interrupted"
    assert host.rt.signals == [(started["sidecar"], "HUP")]  # at most once
    # A fresh HUP is delivered normally.
    assert host.ask(client.signal_request("HUP", pid=started["pid"]))["ok"]
    assert len(host.rt.signals) == 2


def test_a_signal_reaches_only_a_running_sidecar_of_this_channel(host: Host) -> None:
    mine = host.ask(host.start("a"))
    other = host.rt.add("other-sleeper-kx", "other", labels={"safespawn.profile": "sleeper"})
    for pid in (os.getpid(), other.pid, mine["pid"] + 12345):
        r = host.ask(client.signal_request("HUP", pid=pid))
        assert not r["ok"] and r["error"]["code"] == "not_found", pid
    assert host.rt.signals == []
    r = host.ask(client.signal_request("USR1", pid=mine["pid"]))
    assert r["error"]["code"] == "policy_denied"  # not in the profile's signals
    assert host.ask(client.signal_request("HUP", pid=mine["pid"]))["ok"]
    assert host.rt.signals == [(mine["sidecar"], "HUP")]


def test_term_stops_and_kill_removes_and_both_forget_the_sidecar(host: Host) -> None:
    a, b = host.ask(host.start("a")), host.ask(host.start("b"))
    assert host.ask(client.signal_request("TERM", pid=a["pid"]))["ok"]
    assert ("stop", a["sidecar"]) in host.rt.calls
    assert host.ask(client.signal_request("KILL", pid=b["pid"]))["ok"]
    assert ("remove", b["sidecar"]) in host.rt.calls and ("stop", b["sidecar"]) not in host.rt.calls
    assert host.running() == [] and host.state().desired == {}


def test_max_sidecars_refuses_a_new_one_but_not_a_replacement(tmp_path: Path) -> None:
    host = Host(tmp_path, max_sidecars=2)
    assert host.ask(host.start("a"))["ok"] and host.ask(host.start("b"))["ok"]
    r = host.ask(host.start("c"))
    assert not r["ok"] and r["error"]["code"] == "quota"
    assert host.ask(host.start("a", "--verbose"))["ok"]  # replacing one does not count twice
    assert len(host.running()) == 2


def test_the_quota_counts_starts_of_the_same_batch(tmp_path: Path) -> None:
    host = Host(tmp_path, max_sidecars=2)
    rids = [host.write(host.start(k)) for k in ("a", "b", "c", "d")]
    host.sync()
    codes = sorted("ok" if r["ok"] else r["error"]["code"] for r in map(host.reply, rids) if r)
    assert codes == ["ok", "ok", "quota", "quota"] and len(host.running()) == 2


def test_a_flood_beyond_max_pending_is_refused_and_the_rest_served(tmp_path: Path) -> None:
    host = Host(tmp_path, max_pending=5)
    rids = [host.write(host.start(f"k{i}")) for i in range(12)]
    for n, rid in enumerate(rids):  # distinct mtimes: oldest first is well defined
        os.utime(host.chdir / "inbox" / "new" / f"{rid}.json", ns=(n * 10**9, n * 10**9))
    r = host.sync()
    replies = [host.reply(rid) for rid in rids]
    assert all(x is not None for x in replies) and host.pending() == []
    assert [x["ok"] for x in replies if x] == [True] * 5 + [False] * 7
    assert {x["error"]["code"] for x in replies[5:] if x} == {"quota"}
    assert r.refused == 7 and host.rt.count("run") == 5


def test_a_flood_keeps_the_one_reply_of_a_request_claimed_before_a_crash(tmp_path: Path) -> None:
    host = Host(tmp_path, max_pending=2)
    claimed = host.start("first")
    host.write(claimed)
    host.rt.inject("run", Crash(), after=True)
    with pytest.raises(Crash):
        host.sync()
    newer = [host.write(host.start(f"k{i}")) for i in range(4)]
    later = time.time_ns() + 10**12
    os.utime(host.chdir / "inbox" / "new" / f"{claimed['id']}.json", ns=(later, later))  # now the newest
    host.engine = host.new_engine()
    host.sync()
    r = host.reply(claimed["id"])
    assert r is not None and r["ok"]  # not refused as part of the flood
    assert sum(1 for rid in newer if (host.reply(rid) or {}).get("ok")) == 2


def test_orphans_and_leftovers_of_the_channel_are_removed_others_are_not(host: Host) -> None:
    kept = host.ask(host.start("a"))
    host.rt.add(f"{CH}-sleeper-korphan", CH)
    host.rt.add(f"{CH}-sleeper-kexited", CH, state="exited")
    host.rt.add("other-sleeper-kx", "other")
    r = host.sync()
    assert r.removed == 2
    assert sorted(host.rt.containers) == sorted([kept["sidecar"], "other-sleeper-kx"])


def test_a_dead_sidecar_is_respawned_with_backoff(host: Host) -> None:
    name = host.ask(host.start("a"))["sidecar"]
    host.rt.crash(name)
    host.rt.inject("run", RuntimeFailed("podman run failed (rc 125): no space"))
    r = host.sync()
    assert r.respawned == 0 and r.errors
    d = host.state().desired[name]
    assert d.failures == 1 and d.next_retry == host.clock.now + 2
    runs = host.rt.count("run")
    host.sync()
    assert host.rt.count("run") == runs  # within the backoff: not tried again
    host.clock.now += 2.5
    assert host.sync().respawned == 1 and host.running() == [name]
    host.rt.crash(name)
    host.rt.inject("run", RuntimeFailed("podman run failed"))
    host.clock.now += 10
    host.sync()
    assert host.state().desired[name].failures == 3  # 2 respawns counted, then the failure
    assert host.state().desired[name].next_retry == host.clock.now + 8
    host.clock.now += 9
    host.sync()
    host.sync()  # seen running: the backoff is reset
    assert host.running() == [name] and host.state().desired[name].failures == 0


def test_a_crash_looping_sidecar_keeps_its_backoff_until_it_has_run_a_while(host: Host) -> None:
    """Seen running between crashes (podman's own restarts, a crash soon after each start) does
    not reset the backoff; running STABLE_AFTER seconds does."""
    host.rt.clock = host.clock
    name = host.ask(host.start("a"))["sidecar"]
    delays = []
    for _ in range(4):
        host.rt.crash(name)
        host.sync()  # respawned: seen as a failure until it has run a while
        d = host.state().desired[name]
        delays.append(d.next_retry - host.clock.now)
        host.clock.now += 1
        host.sync()  # seen running one second later: still in backoff
        assert host.state().desired[name].failures == d.failures
        host.clock.now = d.next_retry + 0.1
    assert delays == [2, 4, 8, 16]  # grows, as it would not if each sighting reset it
    host.clock.now += STABLE_AFTER
    host.sync()
    assert host.state().desired[name].failures == 0


def test_a_sidecar_the_runtime_is_restarting_is_left_to_it_and_its_new_process_recorded(host: Host) -> None:
    """Seen on a slow host: a sync lists a sidecar in the seconds between its program's death and
    the runtime's restart (podman's restart policy runs in a `podman container cleanup` process).
    Respawning it then would remove the container the runtime is starting again; the broker leaves
    it, and the next sync records the process the runtime started."""
    host.engine.reconciler.boot_time = 0
    name = host.ask(host.start("a"))["sidecar"]
    old_pid = host.rt.containers[name].pid
    host.rt.crash(name, exit_code=137, exited_at=int(host.clock.now) - 2)
    runs, removes = host.rt.count("run"), host.rt.count("remove")
    r = host.sync()
    assert r.respawned == 0 and r.awaiting_restart == 1 and r.errors == []
    assert (host.rt.count("run"), host.rt.count("remove")) == (runs, removes)
    assert host.state().desired[name].failures == 0  # not a failure of the broker's respawn
    new_pid = host.rt.restart(name)
    r = host.sync()
    assert r.respawned == 0 and r.awaiting_restart == 0
    assert host.running() == [name] and host.rt.containers[name].pid == new_pid != old_pid
    assert (host.rt.count("run"), host.rt.count("remove")) == (runs, removes)
    assert host.state().desired[name].failures == 0


def test_a_sidecar_the_runtime_did_not_restart_is_respawned_after_the_grace(host: Host) -> None:
    host.engine.reconciler.boot_time = 0
    name = host.ask(host.start("a"))["sidecar"]
    host.rt.crash(name, exit_code=137, exited_at=int(host.clock.now))
    assert host.sync().awaiting_restart == 1
    host.clock.now += RUNTIME_RESTART_GRACE - 1
    assert host.sync().awaiting_restart == 1
    host.clock.now += 1
    r = host.sync()
    assert r.respawned == 1 and r.awaiting_restart == 0 and host.running() == [name]


@pytest.mark.parametrize("case", ["retries used", "clean exit", "exited before this boot", "container replaced"])
def test_a_dead_sidecar_the_runtime_will_not_restart_is_respawned_at_once(host: Host, case: str) -> None:
    host.engine.reconciler.boot_time = int(host.clock.now) - 100
    name = host.ask(host.start("a"))["sidecar"]
    exited_at = int(host.clock.now) - 1
    if case == "retries used":
        host.rt.set_restarts(name, 3)  # the profile's restart_retries (the sidecar's --restart=on-failure:3)
    if case == "exited before this boot":
        exited_at = host.engine.reconciler.boot_time - 1
    host.rt.crash(name, exit_code=0 if case == "clean exit" else 1, exited_at=exited_at)
    if case == "container replaced":  # another container of that name by the time of the inspect
        listed = host.rt.containers[name]
        host.rt.inject("inspect", hook=lambda *a: host.rt.containers.__setitem__(
            name, replace(listed, id="another")))
    r = host.sync()
    assert r.respawned == 1 and r.awaiting_restart == 0 and host.running() == [name], case


def test_a_sidecar_no_longer_allowed_is_dropped_not_respawned(host: Host) -> None:
    name = host.ask(host.start("a"))["sidecar"]
    st = host.state()
    path = Path(st.path) / "desired.json"
    data = json.loads(path.read_text())
    data["sidecars"][0]["argv"] = ["--key=a", "--dhcp-script=/bin/sh"]  # tampered with, or policy changed
    path.write_text(json.dumps(data))
    host.rt.crash(name)
    host.sync()
    assert host.state().desired == {} and host.rt.containers == {}
    assert any(e["decision"] == "reconcile" and "dropped" in e.get("reason", "") for e in host.audit())


def test_podman_failing_answers_every_request_and_loses_nothing(host: Host) -> None:
    # Starts are decided without a listing (their `run` fails); a stop of a sidecar the record
    # does not know needs the listing (which fails).
    rids = [host.write(host.start(k)) for k in ("a", "b")] + [host.write(client.stop_request("sleeper", pid=999999))]
    broken = RuntimeFailed("cannot run podman: No such file")
    host.rt.inject("list", broken, times=3)
    host.rt.inject("run", broken, times=2)
    host.sync()
    for rid in rids:
        r = host.reply(rid)
        assert r is not None and r["error"]["code"] == "runtime_failed", r
    assert host.pending() == [] and host.rt.containers == {} and host.state().desired == {}


def test_a_failed_run_is_answered_and_its_leftover_removed(host: Host) -> None:
    def leave_a_created_container(name: str) -> None:
        host.rt.add(name, CH, state="created")

    req = host.start("a")
    host.rt.inject("run", RuntimeFailed("podman run failed (rc 126): exec failed"), hook=leave_a_created_container)
    r = host.ask(req)
    assert r["error"]["code"] == "runtime_failed" and "rc 126" in r["error"]["message"]
    assert host.rt.containers == {}  # the reconcile of the same sync saw the leftover afresh


def test_a_sidecar_that_dies_at_once_is_reported_and_removed(host: Host) -> None:
    def die_right_after_start(name: str) -> None:
        host.rt.inject("inspect", hook=lambda _n: host.rt.crash(name, exit_code=3))

    host.rt.inject("run", hook=lambda name: die_right_after_start(name))
    r = host.ask(host.start("a"))
    assert r["error"]["code"] == "runtime_failed" and "exited with code 3" in r["error"]["message"]
    assert host.rt.containers == {} and host.state().desired == {}


def test_a_sidecar_in_a_restart_loop_is_not_reported_running(host: Host) -> None:
    host.rt.inject("inspect", hook=lambda name: host.rt.set_restarts(name, 2))
    r = host.ask(host.start("a"))
    assert r["error"]["code"] == "runtime_failed" and "restarted 2 time(s)" in r["error"]["message"]
    assert host.rt.containers == {}


def test_a_sidecar_that_ended_up_in_the_host_netns_is_removed(host: Host) -> None:
    host.rt.next_pid = os.getpid()  # /proc/PID/ns/net is the broker's own: the host's netns
    r = host.ask(host.start("a"))
    assert r["error"]["code"] == "policy_denied" and "host's network namespace" in r["error"]["message"]
    assert host.rt.containers == {} and host.state().desired == {}


def test_a_replacing_start_and_a_stop_in_one_batch_are_carried_out_in_order(host: Host) -> None:
    first = host.ask(host.start("a"))
    s1 = host.write(host.start("a", "--verbose"))
    s2 = host.write(client.stop_request(None, pid=first["pid"]))
    for n, rid in enumerate((s1, s2)):  # the inbox is served oldest first: make the order certain
        os.utime(host.chdir / "inbox" / "new" / f"{rid}.json", ns=(n * 10**9, n * 10**9))
    host.sync()
    r1, r2 = host.reply(s1), host.reply(s2)
    # Each request of a sidecar is carried out and checked before the next: the replacing start
    # ran (and says so), then the stop removed it.
    assert r1 is not None and r1["ok"] and r1["pid"] != first["pid"] and r2 is not None and r2["ok"]
    assert [op for op, _ in host.rt.calls if op in ("run", "stop", "remove")][-3:] == ["remove", "run", "stop"]
    assert host.rt.containers == {} and host.state().desired == {}


def test_an_idle_sync_lists_the_containers_once(host: Host) -> None:
    host.ask(host.start("a"))
    before = host.rt.count("list")
    host.sync()
    assert host.rt.count("list") - before == 1  # reconcile and status share one listing


def test_a_start_of_a_new_sidecar_needs_no_listing_and_reconcile_lists_once(host: Host) -> None:
    before = host.rt.count("list")
    host.ask(host.start("a"))
    assert host.rt.count("list") - before == 1


def test_another_sync_holding_the_channel_is_reported_not_waited_for(host: Host) -> None:
    with ChannelState.locked(host.cfg.broker.state_dir, CH):
        with pytest.raises(ChannelLocked):
            host.sync(wait=False)


def test_status_lists_desired_sidecars_with_their_state(host: Host) -> None:
    name = host.ask(host.start("a"))["sidecar"]
    status = json.loads((host.chdir / "outbox" / "status.json").read_text())
    assert [(s["name"], s["state"]) for s in status["sidecars"]] == [(name, "running")]
    host.rt.crash(name)
    st = host.engine.status(CH)
    assert [(s["name"], s["state"], s["pid"]) for s in st["sidecars"]] == [(name, "exited", None)]
    assert all(c.labels[LABEL_CHANNEL] == CH for c in host.rt.containers.values())
    # The uid it runs as: the channel's own, allocated (this channel configures none).
    uid = allocated_uid(CH)
    assert st["sidecar_user"] == f"{uid}:{uid}" and st["sidecar_user_source"] == "allocated"
    assert [s["user"] for s in st["sidecars"]] == [f"{uid}:{uid}"] == [host.rt.specs[name].user]


# -- the pipeline: each reply as soon as its own work is done ------------------------------------


def _name_of(host: Host, req: dict[str, Any]) -> str:
    """The sidecar a start request names (as the policy derives it)."""
    parsed = parse_request(json.dumps(req).encode(), req["id"])
    return host.engine.policy.authorize_start(host.cfg.channel(CH), parsed).name


def _hold_start_of(host: Host, req: dict[str, Any]) -> tuple[threading.Event, threading.Event]:
    """`run` of the sidecar `req` starts blocks until released; (running, release)."""
    running, release = threading.Event(), threading.Event()
    name = _name_of(host, req)

    def hook(started: str) -> None:
        if started == name:
            running.set()
            assert release.wait(30), "never released"

    host.rt.inject("run", hook=hook, times=10)
    return running, release


def _wait_reply(host: Host, rid: str, timeout: float = 10.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while (r := host.reply(rid)) is None:
        assert time.monotonic() < deadline, f"no reply for {rid}"
        time.sleep(0.01)
    return r


def test_a_request_written_while_a_slow_start_runs_is_answered_before_that_start_ends(host: Host) -> None:
    req = host.start("slow")
    running, release = _hold_start_of(host, req)
    slow = host.write(req)
    sync = threading.Thread(target=host.sync)
    sync.start()
    try:
        assert running.wait(10)
        fast = host.write(host.start("fast"))  # the same sync takes it while the slow start runs
        assert _wait_reply(host, fast)["ok"]
        assert host.reply(slow) is None and slow + ".json" in host.pending()
        assert host.state().ledger[slow].state == "claimed"
    finally:
        release.set()
        sync.join(30)
    assert _wait_reply(host, slow)["ok"] and host.pending() == []
    assert len(host.running()) == 2 and len(host.state().desired) == 2


def test_a_crash_while_one_start_runs_loses_nothing_and_doubles_nothing(host: Host) -> None:
    """The broker dies after one reply went out and while another start had run (its container
    exists, its reply does not): the next broker answers it once, and runs no second container."""
    ra, rb = host.start("a"), host.start("b")
    b_name = _name_of(host, rb)

    real_run = host.rt.run

    def run(spec: Any) -> str:
        cid = real_run(spec)
        if spec.name == b_name:
            deadline = time.monotonic() + 10
            while host.reply(ra["id"]) is None and time.monotonic() < deadline:
                time.sleep(0.01)
            raise SystemExit("the broker dies after `run`")
        return cid

    host.rt.run = run  # type: ignore[method-assign]
    a, b = host.write(ra), host.write(rb)
    for n, rid in enumerate((a, b)):
        os.utime(host.chdir / "inbox" / "new" / f"{rid}.json", ns=(n * 10**9, n * 10**9))
    with pytest.raises(SystemExit):
        host.sync()
    assert host.reply(a) is not None and host.reply(b) is None and len(host.running()) == 2
    assert host.state().ledger[b].state == "claimed" and host.pending() == [f"{b}.json"]
    host.rt.run = real_run  # type: ignore[method-assign]
    host.engine = host.new_engine()
    host.sync()
    assert all(host.reply(rid)["ok"] for rid in (a, b)) and host.pending() == []  # type: ignore[index]
    assert len(host.running()) == 2 and host.rt.count("run") == 2


def test_the_quota_counts_a_start_that_is_still_being_carried_out(tmp_path: Path) -> None:
    host = Host(tmp_path, max_sidecars=1)
    req = host.start("slow")
    running, release = _hold_start_of(host, req)
    slow = host.write(req)
    sync = threading.Thread(target=host.sync)
    sync.start()
    try:
        assert running.wait(10)
        late = host.write(host.start("late"))  # decided while the first start runs
        r = _wait_reply(host, late)
        assert r["ok"] is False and r["error"]["code"] == "quota", r
    finally:
        release.set()
        sync.join(30)
    assert _wait_reply(host, slow)["ok"] and len(host.running()) == 1


def test_a_quick_sync_that_only_signalled_skips_reconcile_and_status_right_after_one(
        host: Host, monkeypatch: pytest.MonkeyPatch) -> None:
    started = host.ask(host.start("a"))
    status = host.chdir / "outbox" / "status.json"
    published = json.loads(status.read_text())["published"]
    hup = client.signal_request("HUP", pid=started["pid"])
    rid = host.write(hup)
    host.sync(full=False)  # within a second of the start's sync: served, nothing else
    assert host.reply(rid)["ok"]  # type: ignore[index]
    assert json.loads(status.read_text())["published"] == published
    # A start changes the desired state: reconciled and published whatever the time.
    time.sleep(0.01)
    assert host.ask(host.start("b"))["ok"] and json.loads(status.read_text())["published"] > published
    published = json.loads(status.read_text())["published"]
    # Once the last reconcile is older than QUICK_CONVERGED_FOR, a signal-only sync reconciles too.
    monkeypatch.setattr("safespawn.broker.engine.QUICK_CONVERGED_FOR", 0.0)
    time.sleep(0.01)
    rid = host.write(client.signal_request("HUP", pid=started["pid"]))
    host.sync(full=False)
    assert host.reply(rid)["ok"] and json.loads(status.read_text())["published"] > published  # type: ignore[index]


def test_at_most_parallel_starts_runtime_calls_run_at_once(tmp_path: Path) -> None:
    host = Host(tmp_path)
    host.engine.actor.slots = threading.BoundedSemaphore(2)  # as parallel_starts = 2
    lock, now, most = threading.Lock(), [0], [0]

    def slow_run(_name: str) -> None:
        with lock:
            now[0] += 1
            most[0] = max(most[0], now[0])
        time.sleep(0.05)
        with lock:
            now[0] -= 1

    host.rt.inject("run", hook=slow_run, times=8)
    rids = [host.write(host.start(f"k{i}")) for i in range(8)]
    host.sync()
    assert all(host.reply(r)["ok"] for r in rids)  # type: ignore[index]
    assert most[0] == 2, most


# -- files a program writes: handed to the sidecar's uid before each start -------------------------


def test_the_files_a_program_writes_become_its_uids_before_each_start_and_respawn(tmp_path: Path) -> None:
    from support.engine_host import SLEEPER

    from safespawn.broker.engine import Engine
    from safespawn.broker.policy import Policy, parse_profile

    # As root the file goes to another uid; as any other user only to oneself (what chown allows).
    uid, gid = (250000, 250001) if os.getuid() == 0 else (os.getuid(), os.getgid())
    data = tmp_path / "data"
    data.mkdir()
    host = Host(tmp_path, data_dirs=[str(data)], sidecar_uid=uid, sidecar_gid=gid)
    writer = parse_profile({**SLEEPER, "writable_files": ["--out"],
                            "args": {**SLEEPER["args"], "--out": {"type": "path"}}}, "sleeper")
    host.engine = Engine(host.cfg, runtime=host.rt, policy=Policy(host.cfg, profiles={"sleeper": writer}),
                         clock=host.clock)
    out = data / "leases"
    out.write_text("kept\n")
    out.chmod(0o600)
    seen = []
    real_run = host.rt.run

    def run(spec):  # type: ignore[no-untyped-def]
        st = out.stat()
        seen.append((st.st_uid, st.st_gid, st.st_mode & 0o777))  # what the program would find at its start
        return real_run(spec)

    host.rt.run = run  # type: ignore[method-assign]
    r = host.ask(host.start("a", f"--out={out}"))
    assert r["ok"], r
    assert seen == [(uid, gid, 0o644)] and out.read_text() == "kept\n"
    # The agent replaces the file (as Neutron rewrites its lease file) and the sidecar dies: the
    # respawn hands the new file over before the program starts again.
    tmp = data / ".new"
    tmp.write_text("new\n")
    os.chmod(tmp, 0o600)
    os.replace(tmp, out)
    host.rt.crash(r["sidecar"])
    host.clock.now += 3600
    host.sync()
    assert seen[-1] == (uid, gid, 0o644) and len(seen) == 2, seen
