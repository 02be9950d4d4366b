"""The broker core, end to end: real podman, real netns, real dnsmasq, real DHCP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from support import netlab
from support.netlab import NetnsPair, dhcp_lease, wait_for

from safespawn.agent import client


def qdhcp() -> str:
    return f"qdhcp-{uuid.uuid4()}"


def dnsmasq_argv(data: Path, pair: NetnsPair, extra: list[str] | None = None, known_client: bool = True) -> list[str]:
    """A command line shaped like the one Neutron's Dnsmasq driver builds.

    Neutron's ranges are `static`: dnsmasq answers only the MACs in its hosts file, as Neutron writes
    one line per port. With `known_client`, the client's MAC gets a line (address .50).
    """
    net = data / pair.server_ns
    net.mkdir(exist_ok=True)
    for f in ("host", "addn_hosts", "opts", "leases"):
        (net / f).touch()
    if known_client:
        (net / "host").write_text(f"{netlab.get_mac(pair.client_ns, pair.client_if)},host-50,{pair.host(50)}\n")
    subnet = uuid.uuid4()
    return [
        "--no-hosts", "--no-resolv", f"--pid-file={net}/pid", f"--dhcp-hostsfile={net}/host",
        f"--addn-hosts={net}/addn_hosts", f"--dhcp-optsfile={net}/opts", f"--dhcp-leasefile={net}/leases",
        "--dhcp-match=set:ipxe,175", "--dhcp-userclass=set:ipxe6,iPXE", "--local-service", "--bind-dynamic",
        f"--dhcp-range=set:subnet-{subnet},{pair.network.network_address},static,{pair.network.netmask},86400s",
        "--dhcp-lease-max=256", "--conf-file=/dev/null", "--domain=openstacklocal", f"--interface={pair.server_if}",
        *(extra or []),
    ]


@pytest.fixture
def pair():
    with NetnsPair(server_ns=qdhcp()) as p:
        yield p


def container(b, name):
    cs = [c for c in b.containers() if name in c["Names"]]
    assert len(cs) <= 1
    return cs[0] if cs else None


def test_start_runs_dnsmasq_that_hands_out_a_real_lease(broker, pair):
    argv = dnsmasq_argv(broker.data_dir, pair)
    reply = broker.submit(client.start_request("dnsmasq", argv, netns=pair.server_ns))
    assert reply["ok"], reply
    c = container(broker, reply["sidecar"])
    assert c["State"] == "running"
    # The reply carries the sidecar's host pid, the one dnsmasq itself wrote (shared pid namespace).
    assert reply["pid"] == c["Pid"]
    pidfile = broker.data_dir / pair.server_ns / "pid"
    wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), 5)
    assert int(pidfile.read_text()) == reply["pid"]
    lease = dhcp_lease(pair.client_ns, pair.client_if, timeout=10)
    assert lease["ip"] == pair.host(50)
    assert lease["serverid"] == pair.server_ip
    status = json.loads((broker.channel_dir() / "outbox" / "status.json").read_text())
    assert [(s["name"], s["state"], s["pid"]) for s in status["sidecars"]] == [(reply["sidecar"], "running",
                                                                                 reply["pid"])]


@pytest.mark.parametrize("mode", ["inotify", "poll"])
def test_a_configured_channel_is_usable_through_watch_alone(make_broker, pair, mode):
    """A new user's host: a config file, no `install`, nothing laid out; only `safespawn watch` runs."""
    b = make_broker(lay_out=False)
    assert not b.channel_dir().exists() and not (b.root / "state").exists()
    b.start_watch(*(["--poll"] if mode == "poll" else []))
    wait_for(lambda: (b.channel_dir() / "outbox" / "replies").is_dir(), 30)
    reply = client.submit(str(b.channel_dir()), client.start_request("dnsmasq", dnsmasq_argv(b.data_dir, pair),
                                                                      netns=pair.server_ns), timeout=60)
    assert reply["ok"], reply
    assert container(b, reply["sidecar"])["State"] == "running"
    log = (b.root / "watch.log").read_text()
    assert ("on inotify events" if mode == "inotify" else "by polling") in log
    assert "cannot open" not in log and "No such file" not in log
    assert dhcp_lease(pair.client_ns, pair.client_if, timeout=10)["ip"] == pair.host(50)


def test_same_start_changes_nothing_and_changed_arguments_replace(broker, pair):
    argv = dnsmasq_argv(broker.data_dir, pair)
    r1 = broker.request(client.start_request("dnsmasq", argv, netns=pair.server_ns))
    id1 = container(broker, r1["sidecar"])["Id"]
    r2 = broker.request(client.start_request("dnsmasq", argv, netns=pair.server_ns))
    assert r2["ok"] and r2["pid"] == r1["pid"]
    assert container(broker, r1["sidecar"])["Id"] == id1
    changed = [("--dhcp-lease-max=64" if a == "--dhcp-lease-max=256" else a) for a in argv]
    r3 = broker.request(client.start_request("dnsmasq", changed, netns=pair.server_ns))
    assert r3["ok"] and r3["sidecar"] == r1["sidecar"]
    c3 = container(broker, r1["sidecar"])
    assert c3["Id"] != id1 and c3["State"] == "running"
    assert "--dhcp-lease-max=64" in broker.desired()[r1["sidecar"]]["argv"]
    assert len(broker.containers()) == 1


def test_hup_makes_dnsmasq_reread_its_hosts_file(broker, pair):
    argv = dnsmasq_argv(broker.data_dir, pair, known_client=False)
    r = broker.request(client.start_request("dnsmasq", argv, netns=pair.server_ns))
    assert r["ok"], r
    mac = netlab.random_mac()
    static_ip = pair.host(77)
    with pytest.raises(netlab.NetlabError):  # not in the hosts file yet: no answer
        dhcp_lease(pair.client_ns, pair.client_if, timeout=2, mac=mac)
    (broker.data_dir / pair.server_ns / "host").write_text(f"{mac},host-77,{static_ip}\n")
    hup = broker.request(client.signal_request("HUP", pid=r["pid"]))
    assert hup["ok"] and hup["sidecar"] == r["sidecar"], hup
    lease = dhcp_lease(pair.client_ns, pair.client_if, timeout=10, mac=mac)
    assert lease["ip"] == static_ip
    assert container(broker, r["sidecar"])["Pid"] == r["pid"]  # reloaded, not restarted


@pytest.mark.parametrize("sig", ["TERM", "15", "KILL", "9"])
def test_term_and_kill_remove_the_container_and_its_desired_state(broker, pair, sig):
    r = broker.request(client.start_request("dnsmasq", dnsmasq_argv(broker.data_dir, pair), netns=pair.server_ns))
    assert r["ok"]
    k = broker.request(client.signal_request(sig, pid=r["pid"]))
    assert k["ok"] and k["sidecar"] == r["sidecar"], k
    assert broker.containers() == []
    assert broker.desired() == {}
    # The pid is gone now: a second kill is "not found", which Neutron reads as already gone.
    again = broker.request(client.signal_request(sig, pid=r["pid"]))
    assert again["error"]["code"] == "not_found"


def test_stop_by_profile_and_netns(broker, pair):
    r = broker.request(client.start_request("dnsmasq", dnsmasq_argv(broker.data_dir, pair), netns=pair.server_ns))
    s = broker.request(client.stop_request("dnsmasq", netns=pair.server_ns))
    assert s["ok"] and s["sidecar"] == r["sidecar"]
    assert broker.containers() == []


def test_sidecar_outlives_the_requesting_process_and_the_broker(broker, pair):
    broker.start_watch()
    argv = dnsmasq_argv(broker.data_dir, pair)
    req = client.start_request("dnsmasq", argv, netns=pair.server_ns)
    # The requester is a separate process that we kill as soon as it has its reply.
    code = ("import json,sys; from safespawn.agent import client; "
            f"r=client.submit({str(broker.channel_dir())!r}, json.loads(sys.argv[1]), 30); "
            "print(json.dumps(r), flush=True); import time; time.sleep(60)")
    p = subprocess.Popen([sys.executable, "-c", code, json.dumps(req)], stdout=subprocess.PIPE, text=True)
    reply = json.loads(p.stdout.readline())
    assert reply["ok"], reply
    p.send_signal(signal.SIGKILL)
    p.wait(10)
    assert broker.stop_watch() == 0  # clean exit on SIGTERM
    time.sleep(1)
    c = container(broker, reply["sidecar"])
    assert c["State"] == "running" and c["Pid"] == reply["pid"]
    assert dhcp_lease(pair.client_ns, pair.client_if, timeout=10)["ip"]


@pytest.mark.parametrize("case,code", [
    ("unknown_profile", "policy_denied"),
    ("dhcp_script", "policy_denied"),
    ("path_outside_data_dirs", "policy_denied"),
    ("missing_netns", "bad_request"),
    ("malformed_netns", "bad_request"),
    ("netns_of_wrong_pattern", "policy_denied"),
    ("no_netns", "policy_denied"),
])
def test_refused_requests_get_a_coded_reply_and_create_nothing(broker, pair, case, code):
    argv = dnsmasq_argv(broker.data_dir, pair)
    profile, netns = "dnsmasq", pair.server_ns
    if case == "unknown_profile":
        profile = "haproxy"
    elif case == "dhcp_script":
        argv.append("--dhcp-script=/bin/sh")
    elif case == "path_outside_data_dirs":
        argv.append("--dhcp-hostsfile=/etc/shadow")
    elif case == "missing_netns":
        netns = qdhcp()
    elif case == "malformed_netns":
        netns = "../../proc/1/ns/net"
    elif case == "netns_of_wrong_pattern":
        netns = pair.client_ns
    elif case == "no_netns":
        netns = None
    r = broker.request(client.start_request(profile, argv, netns=netns))
    assert r["ok"] is False and r["error"]["code"] == code, r
    assert broker.containers() == []
    assert broker.desired() == {}
    assert broker.pending() == []
    entry = [e for e in broker.audit() if e["id"] == r["id"]]
    assert len(entry) == 1 and entry[0]["decision"] in ("deny", "quarantine")


def test_a_replayed_request_is_answered_from_the_ledger_without_acting_again(broker, pair):
    req = client.start_request("dnsmasq", dnsmasq_argv(broker.data_dir, pair), netns=pair.server_ns)
    first = broker.request(req)
    cid = container(broker, first["sidecar"])["Id"]
    # The host crashed after the reply was durable but before the request was removed: the same
    # file is back in the inbox (and the reply may even be gone).
    (broker.channel_dir() / "outbox" / "replies" / f"{req['id']}.json").unlink()
    broker.write(req)
    broker.sync()
    assert broker.reply(req["id"]) == first
    assert broker.pending() == []
    assert container(broker, first["sidecar"])["Id"] == cid
    assert [e["decision"] for e in broker.audit() if e["id"] == req["id"]] == ["allow", "replay"]


def test_a_crash_between_acting_and_replying_loses_nothing_and_starts_once(broker, pair, monkeypatch):
    from safespawn.broker.state import ChannelState

    req = client.start_request("dnsmasq", dnsmasq_argv(broker.data_dir, pair), netns=pair.server_ns)
    broker.write(req)

    def crash(self, items):
        raise SystemExit("simulated crash after acting, before the ledger records the replies")

    monkeypatch.setattr(ChannelState, "complete", crash)
    with pytest.raises(SystemExit):
        broker.sync()
    monkeypatch.undo()
    assert broker.reply(req["id"]) is None and broker.pending() == [f"{req['id']}.json"]
    cid = broker.containers()[0]["Id"]
    broker._engine = None  # a new broker process
    broker.sync()
    r = broker.reply(req["id"])
    assert r["ok"], r
    assert [c["Id"] for c in broker.containers()] == [cid]  # not started a second time
    assert broker.pending() == []


def test_an_interrupted_hup_is_not_delivered_twice(broker, pair, monkeypatch):
    from safespawn.broker.state import ChannelState

    r = broker.request(client.start_request("dnsmasq", dnsmasq_argv(broker.data_dir, pair), netns=pair.server_ns))
    req = client.signal_request("HUP", pid=r["pid"])
    broker.write(req)
    monkeypatch.setattr(ChannelState, "complete", lambda self, items: (_ for _ in ()).throw(SystemExit("crash")))
    with pytest.raises(SystemExit):
        broker.sync()
    monkeypatch.undo()
    broker._engine = None
    broker.sync()
    reply = broker.reply(req["id"])
    assert reply["ok"] is False and reply["error"]["code"] == "interrupted"


def test_reconcile_respawns_a_dead_sidecar_and_drops_one_whose_netns_vanished(broker, pair):
    r = broker.request(client.start_request("dnsmasq", dnsmasq_argv(broker.data_dir, pair), netns=pair.server_ns))
    subprocess.run(["podman", "rm", "-f", "-t", "0", r["sidecar"]], check=True, capture_output=True, timeout=60)
    broker.sync()
    c = container(broker, r["sidecar"])
    assert c is not None and c["State"] == "running"
    # An orphan with the channel's label is removed.
    subprocess.run(["podman", "run", "-d", "--name", f"{broker.channel}-orphan", "--label",
                    f"safespawn.channel={broker.channel}", "--network=none", broker.engine.config.channel(
                        broker.channel).image, "sleep", "300"], check=True, capture_output=True, timeout=60)
    broker.sync()
    assert [x["Names"][0] for x in broker.containers()] == [r["sidecar"]]
    # The netns goes away: the sidecar leaves the desired state and its container is removed.
    netlab.netns_delete(pair.server_ns)
    broker.sync()
    assert broker.desired() == {} and broker.containers() == []


def test_a_failing_program_is_reported_with_its_output(broker, pair):
    argv = dnsmasq_argv(broker.data_dir, pair)
    # Allowed by policy (inside the data dir), but the folder does not exist: dnsmasq exits at once.
    missing = broker.data_dir / "no-such-dir" / "leases"
    argv = [a for a in argv if not a.startswith("--dhcp-leasefile")] + [f"--dhcp-leasefile={missing}"]
    r = broker.request(client.start_request("dnsmasq", argv, netns=pair.server_ns))
    assert r["ok"] is False and r["error"]["code"] == "runtime_failed", r
    assert "exited" in r["error"]["message"]
    assert broker.containers() == [] and broker.desired() == {}


def test_100_concurrent_requests_from_separate_processes_each_get_exactly_one_reply(broker, pair):
    broker.start_watch()
    argv = dnsmasq_argv(broker.data_dir, pair)
    reqs = [client.start_request("dnsmasq", argv, netns=pair.server_ns) for _ in range(50)]
    reqs += [client.signal_request("HUP", pid=4000000 + i) for i in range(50)]
    code = ("import json,sys; from safespawn.agent import client; "
            f"print(json.dumps(client.submit({str(broker.channel_dir())!r}, json.loads(sys.argv[1]), 90)))")
    procs = [subprocess.Popen([sys.executable, "-c", code, json.dumps(r)], stdout=subprocess.PIPE, text=True)
             for r in reqs]
    replies = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert [r["id"] for r in replies] == [q["id"] for q in reqs]
    starts, signals = replies[:50], replies[50:]
    assert all(r["ok"] for r in starts), [r for r in starts if not r["ok"]][:3]
    assert len({r["pid"] for r in starts}) == 1  # one sidecar, started once
    assert all(r["error"]["code"] == "not_found" for r in signals)
    assert len(broker.containers()) == 1
    # Exactly one decision per request in the audit log, and nothing left behind.
    decided = [e["id"] for e in broker.audit() if e["decision"] in ("allow", "deny")]
    assert sorted(decided) == sorted(q["id"] for q in reqs)
    assert broker.pending() == []
    assert sorted(os.listdir(broker.channel_dir() / "outbox" / "replies")) == sorted(f"{q['id']}.json" for q in reqs)
