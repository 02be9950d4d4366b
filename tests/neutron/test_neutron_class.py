"""Neutron 29's own code, switched to safespawn's ProcessManager class by the `safespawn-neutron` launcher.

The agent is tests/neutron/neutron_class_agent.py (Neutron's Dnsmasq, MetadataDriver (DHCP and OVN),
KeepalivedManager/HaRouter, ra.DaemonMonitor, ProcessMonitor), started as
`WRAPPERS/safespawn-neutron PYTHON neutron_class_agent.py`. It gets no wrapper on PATH (PATH has the
machine's real dnsmasq, haproxy, keepalived, radvd: if the class were not in use, Neutron would run
those in the namespace and no sidecar would appear) and an empty kill_scripts_path. Everything goes
through the channel: start requests, signal requests by profile and namespace, and `active`/`pid`
from the host-published outbox/status.json. The broker is a real `safespawn watch`; the sidecars are
real podman containers; the checks are real DHCP, HTTP, VRRP and SLAAC.

One broker (reconcile_interval = 2 s) and one agent serve the module; each test uses its own namespaces.
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from support import netlab
from support.broker import REPO, Broker
from support.netlab import NetnsPair
from support.neutron_process import NEUTRON_TESTS, AgentProcess

from safespawn.agent import client

pytestmark = [pytest.mark.integration, pytest.mark.neutron]
L3_IMAGE = "localhost/safespawn-test-l3:latest"
CLASS_AGENT = NEUTRON_TESTS / "neutron_class_agent.py"
RECONCILE = 2  # the broker's reconcile_interval: how often it republishes the status at the latest
CHECK_INTERVAL = 1  # ProcessMonitor's check_child_processes_interval in the monitor test
# A sidecar killed from the host is running again (new generation, active) within this many seconds:
# the status refresh (RECONCILE) + one ProcessMonitor interval + a start (podman run + 200 ms settle,
# about 1 s here) + slack for a loaded 2-core CI machine.
RESPAWN_BOUND = RECONCILE + CHECK_INTERVAL + 5


@pytest.fixture(scope="module")
def neutron_python() -> str:
    out = subprocess.run(["bash", str(REPO / "scripts" / "neutron-venv")], capture_output=True, text=True,
                         timeout=900, check=True).stdout
    return out.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory, test_image, neutron_python):
    """(broker, wrappers dir, agent factory); sidecars and agents are removed at the end."""
    subprocess.run(["bash", str(REPO / "scripts" / "build-l3-test-image"), L3_IMAGE, test_image],
                   check=True, stdout=subprocess.DEVNULL, timeout=300)
    root = tmp_path_factory.mktemp("nclass")
    broker = Broker.make(root / "broker", image=L3_IMAGE, broker_extra=f"reconcile_interval = {RECONCILE}",
                         profiles=["dnsmasq", "haproxy", "keepalived", "neutron-keepalived-state-change", "radvd"])
    wrappers = root / "wrappers"
    broker.cli("wrappers", "install", "--channel", broker.channel, "--channel-dir", str(broker.channel_dir()),
               "--python", neutron_python, str(wrappers), check=True)
    no_kill_scripts = root / "no-kill-scripts"
    no_kill_scripts.mkdir()
    broker.start_watch()
    agents: list[AgentProcess] = []

    def agent(fresh: bool = False) -> AgentProcess:
        """The module's agent process, or a new one (as after an agent restart) when `fresh`."""
        if agents and not fresh and agents[-1].proc.poll() is None:
            return agents[-1]
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SAFESPAWN_CHANNEL_DIR")}
        env.update(NEUTRON_STATE_PATH=str(broker.data_dir), KILL_SCRIPTS_PATH=str(no_kill_scripts),
                   PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", SAFESPAWN_TIMEOUT="60")
        a = AgentProcess([str(wrappers / "safespawn-neutron"), neutron_python, str(CLASS_AGENT)], env,
                         root / "agent.log")
        agents.append(a)
        return a

    yield broker, wrappers, agent
    for a in agents:
        a.stop()
    broker.cleanup()


def running(broker: Broker, profile: str | None = None) -> list[dict[str, Any]]:
    return [c for c in broker.containers() if c["State"] == "running"
            and (profile is None or c["Labels"]["safespawn.profile"] == profile)]


def requests_seen(broker: Broker) -> int:
    """Requests the host has acted on or refused (one audit entry each)."""
    return sum(1 for e in broker.audit() if e.get("decision") in ("allow", "deny"))


def test_neutrons_callers_get_the_class_through_the_launcher(lab):
    _, wrappers, new_agent = lab
    r = new_agent()("is_class")
    assert r["class"] == "safespawn_neutron.ChannelProcessManager"
    assert r["neutron_base"] == "neutron.agent.linux.external_process"


def test_dnsmasq_through_the_class_lease_restart_reload_monitor_disable(lab):
    broker, _, new_agent = lab
    net_id, sub_id = str(uuid.uuid4()), str(uuid.uuid4())
    with NetnsPair(server_ns=f"qdhcp-{net_id}") as pair:
        ports = [{"mac": netlab.get_mac(pair.server_ns, pair.server_if), "ip": pair.server_ip,
                  "owner": "network:dhcp"},
                 {"mac": netlab.get_mac(pair.client_ns, pair.client_if), "ip": pair.host(50)}]
        net = {"network_id": net_id, "subnet_id": sub_id, "cidr": str(pair.network), "interface": pair.server_if}
        pm = {"uuid": net_id, "namespace": pair.server_ns, "service": "dnsmasq"}

        agent = new_agent()  # the module agent; its checking ProcessMonitor is stopped below
        agent("monitor_start", interval=CHECK_INTERVAL)
        r = agent("dhcp_start", ports=ports, **net)
        assert r["active"], "active as soon as enable() returns (the reply's word until the next status)"
        r["generation"] = netlab.wait_for(lambda: agent("pm_generation", **pm)["generation"], timeout=15,
                                          message="the host's status names the process")
        [c] = running(broker, "dnsmasq")
        assert c["Pid"] == r["pid"], "pid is the sidecar's host pid, from the host's status"
        assert c["Names"][0].endswith(pair.server_ns)
        assert netlab.dhcp_lease(pair.client_ns, pair.client_if)["ip"] == pair.host(50)
        status = json.loads((broker.channel_dir() / "outbox" / "status.json").read_text())
        [s] = [s for s in status["sidecars"] if s["profile"] == "dnsmasq"]
        assert s["key"] == pair.server_ns and s["generation"] == r["generation"] and status["refresh"] == RECONCILE

        # `active` sends no request and never waits: thousands of calls, no new audit entry, no trigger.
        trigger = broker.channel_dir() / "inbox" / "trigger"
        before, trig = requests_seen(broker), trigger.stat().st_mtime_ns
        cost = agent("pm_active_cost", n=2000, **pm)
        assert cost["all_active"]
        assert requests_seen(broker) == before and trigger.stat().st_mtime_ns == trig
        assert cost["per_call"] < 0.001 and cost["per_fresh_call"] < 0.005, cost
        print(f"active: {cost['per_call'] * 1e6:.1f} us per call, {cost['per_fresh_call'] * 1e6:.1f} us "
              "with a fresh ProcessManager each time")

        # A healthy sidecar is never respawned by ProcessMonitor.
        time.sleep(4 * CHECK_INTERVAL)
        assert agent("monitor_events")["respawns"] == []
        assert [x["Id"] for x in running(broker, "dnsmasq")] == [c["Id"]]

        # Killed from the host: running again, as a new generation, within the stated bound.
        os.kill(c["Pid"], signal.SIGKILL)
        t0 = time.monotonic()
        netlab.wait_for(lambda: (g := agent("pm_generation", **pm))["active"] and g["generation"] != r["generation"],
                        timeout=RESPAWN_BOUND, interval=0.2, message="the killed sidecar runs again")
        print(f"respawned after {time.monotonic() - t0:.1f}s (bound {RESPAWN_BOUND}s); ProcessMonitor respawns: "
              f"{len(agent('monitor_events')['respawns'])}")
        assert len(running(broker, "dnsmasq")) == 1
        assert netlab.dhcp_lease(pair.client_ns, pair.client_if)["ip"] == pair.host(50)

        # Stopped for good on the host (an operator's stop request): the host will not bring it back,
        # the status lists it no more, and Neutron's ProcessMonitor respawns it through the class.
        gone = agent("pm_generation", **pm)["generation"]
        n_respawns = len(agent("monitor_events")["respawns"])  # after the kill above: 0 or 1, whoever was first
        reply = client.submit(str(broker.channel_dir()), client.stop_request("dnsmasq", netns=pair.server_ns))
        assert reply["ok"], reply
        t0 = time.monotonic()
        netlab.wait_for(lambda: len(agent("monitor_events")["respawns"]) > n_respawns and
                        (g := agent("pm_generation", **pm))["active"] and g["generation"] not in (None, gone),
                        timeout=RESPAWN_BOUND, interval=0.2, message="ProcessMonitor respawned the stopped sidecar")
        print(f"ProcessMonitor respawned it after {time.monotonic() - t0:.1f}s (bound {RESPAWN_BOUND}s)")
        assert {e["uuid"] for e in agent("monitor_events")["respawns"]} == {net_id}
        assert len(running(broker, "dnsmasq")) == 1
        assert netlab.dhcp_lease(pair.client_ns, pair.client_if)["ip"] == pair.host(50)
        agent("monitor_stop")

        # The agent restarts: a fresh agent (and ProcessManager) sees the sidecar active, starts nothing.
        agent.stop()
        agent = new_agent(fresh=True)
        gen = agent("pm_generation", **pm)
        assert gen["active"] and gen["pid"] == running(broker, "dnsmasq")[0]["Pid"]
        n_starts = sum(1 for e in broker.audit() if e.get("op") == "start")
        again = agent("pm_enable", **pm)
        assert again["active"] and not again["started"]
        assert sum(1 for e in broker.audit() if e.get("op") == "start") == n_starts, "no start request"
        [c2] = running(broker, "dnsmasq")

        # reload_allocations(): hosts file rewritten, HUP by profile + namespace; a new static host works.
        mac2 = netlab.random_mac()
        with pytest.raises(netlab.NetlabError):
            netlab.dhcp_lease(pair.client_ns, pair.client_if, timeout=2, mac=mac2)
        r2 = agent("dhcp_reload", ports=ports + [{"mac": mac2, "ip": pair.host(77)}], **net)
        assert r2["active"] and r2["pid"] == c2["Pid"], "a HUP, not a restart"
        assert netlab.dhcp_lease(pair.client_ns, pair.client_if, mac=mac2)["ip"] == pair.host(77)
        signals = [e for e in broker.audit() if e.get("op") == "signal" and e.get("decision") == "allow"]
        assert [e["signal"] for e in signals][-1:] == ["HUP"]

        # disable(): 15 -> the sidecar is stopped and removed; Neutron sees it inactive.
        assert agent("dhcp_disable", ports=ports, **net)["active"] is False
        assert running(broker, "dnsmasq") == []
        assert agent("pm_state", **pm)["active"] is False


def test_metadata_proxies_as_the_ovn_and_dhcp_agents_spawn_them(lab):
    broker, _, new_agent = lab
    from test_neutron_agent import unix_http_server  # the backend Neutron's metadata agent would be

    seen: list[dict[str, str]] = []
    # metadata_proxy_socket_mode = group (0664): haproxy runs with the agent's gid (docs/neutron.md).
    backend = unix_http_server(broker.data_dir / "metadata_proxy", seen, body="instance-metadata ", mode=0o664)
    agent = new_agent()
    try:
        for prefix in ("ovnmeta-", "qdhcp-"):
            net_id = str(uuid.uuid4())
            with NetnsPair(server_ns=prefix + net_id, client_addr=None) as pair:
                pair.exec_server(["ip", "addr", "add", "169.254.169.254/32", "dev", pair.server_if])
                pair.exec_client(["ip", "addr", "add", pair.host(60) + f"/{pair.network.prefixlen}", "dev",
                                  pair.client_if])
                pair.exec_client(["ip", "route", "add", "169.254.169.254/32", "dev", pair.client_if])
                args = {"namespace": pair.server_ns, "network_id": net_id}
                if prefix == "ovnmeta-":
                    r = agent("ovn_metadata_spawn", interface=pair.server_if, **args)
                else:
                    r = agent("metadata_spawn", **args)
                assert r["active"], r
                [c] = running(broker, "haproxy")
                assert c["Pid"] == r["pid"]
                status, body = netlab.http_get(pair.client_ns, "http://169.254.169.254/latest/meta-data/")
                assert status == 200 and body.startswith("instance-metadata "), (prefix, status, body)
                headers = json.loads(body.removeprefix("instance-metadata "))
                if prefix == "ovnmeta-":
                    assert headers["x-ovn-network-id"] == net_id
                else:
                    assert headers["x-neutron-network-id"] == net_id
                op = "ovn_metadata_destroy" if prefix == "ovnmeta-" else "metadata_destroy"
                assert agent(op, **args)["active"] is False
                assert running(broker, "haproxy") == []
    finally:
        backend.shutdown()
        backend.server_close()


def test_ha_router_master_check_processes_and_state_change_monitor_through_the_class(lab):
    broker, _, new_agent = lab
    from test_neutron_agent import unix_http_server

    router_id, ha_port_id = str(uuid.uuid4()), str(uuid.uuid4())
    ha_if = ("ha-" + ha_port_id)[:14]
    seen: list[dict[str, str]] = []
    server = unix_http_server(broker.data_dir / "keepalived-state-change", seen)
    try:
        with NetnsPair(server_ns=f"qrouter-{router_id}", server_if=ha_if, server_addr="169.254.192.5/18") as pair:
            agent = new_agent()
            r = agent("ha_spawn", router_id=router_id, ha_port_id=ha_port_id, ha_cidr="169.254.192.0/18")
            netlab.wait_for(lambda: r["primary_vip"] in netlab.link_addresses(pair.server_ns, ha_if),
                            timeout=20, message="keepalived (MASTER) holds the VIP")
            netlab.wait_for(lambda: any(h.get("x-neutron-state") == "primary" for h in seen), timeout=20,
                            message="the state-change monitor told the agent: primary")
            st = agent("ha_state", router_id=router_id)
            assert st["keepalived_active"] and st["check_processes"] and st["monitor_active"], \
                (st, agent("channel_status"), broker.containers())
            by_profile = {c["Labels"]["safespawn.profile"]: c for c in running(broker)
                          if c["Labels"]["safespawn.key"] == pair.server_ns}
            assert set(by_profile) == {"keepalived", "neutron-keepalived-state-change"}
            assert by_profile["keepalived"]["Pid"] == st["keepalived_pid"]
            assert by_profile["neutron-keepalived-state-change"]["Pid"] == st["monitor_pid"]

            d = agent("ha_disable", router_id=router_id)
            assert d == {"ok": True, "keepalived_active": False, "monitor_active": False}
            assert [c for c in running(broker) if c["Labels"]["safespawn.key"] == pair.server_ns] == []
    finally:
        server.shutdown()
        server.server_close()


def test_radvd_slaac_through_the_class(lab):
    broker, _, new_agent = lab
    router_id, port_id = str(uuid.uuid4()), str(uuid.uuid4())
    qr_if = ("qr-" + port_id)[:14]
    prefix = f"fd00:5afe:{uuid.uuid4().int % 0xFFFF:x}::/64"
    port = {"id": port_id, "mtu": 1450, "subnets": [{"cidr": prefix, "ipv6_ra_mode": "slaac",
                                                       "dns_nameservers": []}]}
    with NetnsPair(server_ns=f"qrouter-{router_id}", server_if=qr_if,
                   server_addr6=prefix.replace("::/64", "::1/64")) as pair:
        agent = new_agent()
        r = agent("radvd_enable", router_id=router_id, ports=[port])
        assert r["active"]
        [c] = running(broker, "radvd")
        assert c["Pid"] == r["pid"]
        netlab.wait_for(lambda: any(ipaddress.ip_interface(a).ip in ipaddress.ip_network(prefix)
                                    for a in netlab.link_addresses(pair.client_ns, pair.client_if)),
                        timeout=20, message="SLAAC address from radvd's RA")
        assert agent("radvd_disable", router_id=router_id)["active"] is False
        assert running(broker, "radvd") == []


def test_the_class_does_not_trust_a_pid_file(lab):
    """Neutron's class believes a pid file naming a live process whose command line holds the uuid;
    this one asks the host's status only: no sidecar, not active, whatever the data dir says."""
    broker, _, new_agent = lab
    agent = new_agent()
    pm = {"uuid": str(uuid.uuid4()), "namespace": "qdhcp-" + str(uuid.uuid4()), "service": "dnsmasq"}
    pid_file = Path(broker.data_dir) / "external" / "pids" / f"{pm['uuid']}.pid.dnsmasq"
    pid_file.parent.mkdir(parents=True, exist_ok=True)
    decoy = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", pm["uuid"]])
    try:
        pid_file.write_text(f"{decoy.pid}\n")
        # Right after the fork the child may not have exec'd yet: wait for its own command line.
        netlab.wait_for(lambda: pm["uuid"] in Path(f"/proc/{decoy.pid}/cmdline").read_text(), timeout=10,
                        message="the decoy's command line")
        assert agent("pm_state_neutron", pid_file=str(pid_file), **pm)["active"] is True, "Neutron's is fooled"
        assert agent("pm_state", pid_file=str(pid_file), **pm) == {"ok": True, "active": False, "pid": None,
                                                                   "cmdline": None}
    finally:
        decoy.kill()
        decoy.wait()
