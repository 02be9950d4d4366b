"""The seed's core promise with a real agent container (tests/support/agent_container.py).

A podman container stands in for the Neutron DHCP agent: Neutron 29 (the host's venv, read-only), the
channel's inbox (rw,nodev,nosuid,noexec), its outbox (ro) and the data dir, no runtime socket, not
privileged. Neutron's own Dnsmasq driver starts dnsmasq as a sidecar; then the agent container is
stopped and started again, and the restarted agent must see the sidecar active and start no second one.

- wrapper mode (issue 9): Neutron's own ProcessManager, the wrappers first on PATH, kill scripts.
  Its liveness check reads the pid file and /proc/PID/cmdline of the sidecar's *host* pid, so this
  agent shares the host's pid namespace; `ip netns exec` needs CAP_SYS_ADMIN and /run/netns. The
  test measures both: from a container in its own pid namespace the sidecar's /proc entry is absent.
  Network namespace: not shared (--network none): the wrapper finds the netns from `ip netns exec`.
- class mode (issue 12): safespawn's ProcessManager through `safespawn-neutron`: own pid namespace,
  own network namespace, no capability at all, no /run/netns, no wrapper on PATH.
"""

from __future__ import annotations

import subprocess
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest
from support import netlab
from support.agent_container import AgentContainer, assert_unprivileged
from support.broker import REPO, Broker
from support.netlab import NetnsPair

pytestmark = [pytest.mark.integration, pytest.mark.neutron]


@pytest.fixture(scope="module")
def neutron_python() -> str:
    out = subprocess.run(["bash", str(REPO / "scripts" / "neutron-venv")], capture_output=True, text=True,
                         timeout=900, check=True).stdout
    return out.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, test_image, neutron_python):
    root = tmp_path_factory.mktemp("agentbox")
    broker = Broker.make(root / "broker", image=test_image, profiles=["dnsmasq"], broker_extra="reconcile_interval = 5")
    wrappers = root / "wrappers"
    broker.cli("wrappers", "install", "--channel", broker.channel, "--channel-dir", str(broker.channel_dir()),
               "--python", neutron_python, str(wrappers), check=True)
    broker.start_watch()
    boxes: list[AgentContainer] = []
    yield broker, wrappers, root, boxes
    for b in boxes:
        b.remove()
    broker.cleanup()


def running(broker: Broker) -> list[dict[str, Any]]:
    return [c for c in broker.containers() if c["State"] == "running"]


class LeaseLoop:
    """A DHCP client asking for a lease over and over while the agent restarts."""

    def __init__(self, pair: NetnsPair, ip: str) -> None:
        self.pair, self.ip = pair, ip
        self.ok = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                lease = netlab.dhcp_lease(self.pair.client_ns, self.pair.client_if, timeout=5)
                if lease["ip"] == self.ip:
                    self.ok += 1
                else:
                    self.failures.append(f"wrong lease {lease}")
            except netlab.NetlabError as e:
                self.failures.append(str(e))
            self._stop.wait(0.3)

    def stop(self) -> None:
        self._stop.set()
        self._t.join(30)


def network(pair: NetnsPair, net_id: str, data_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    ports = [{"mac": netlab.get_mac(pair.server_ns, pair.server_if), "ip": pair.server_ip, "owner": "network:dhcp"},
             {"mac": netlab.get_mac(pair.client_ns, pair.client_if), "ip": pair.host(50)}]
    net = {"network_id": net_id, "subnet_id": str(uuid.uuid4()), "cidr": str(pair.network),
           "interface": pair.server_if, "ports": ports}
    pm = {"uuid": net_id, "namespace": pair.server_ns, "service": "dnsmasq",
          "pid_file": str(data_dir / "dhcp" / net_id / "pid")}  # the Dnsmasq driver's (wrapper mode reads it)
    return net, pm


def restart_keeps_serving(broker: Broker, box: AgentContainer, agent: Any, pair: NetnsPair, pm: dict[str, Any],
                          sidecar_id: str) -> Any:
    """Stop and start the agent container while a client keeps asking for leases; return the new agent."""
    loop = LeaseLoop(pair, pair.host(50))
    try:
        netlab.wait_for(lambda: loop.ok >= 1, timeout=15, message="a lease before the restart")
        box.stop(agent)
        assert [c["Id"] for c in running(broker)] == [sidecar_id], "the sidecar outlives its agent"
        before = loop.ok
        netlab.wait_for(lambda: loop.ok > before, timeout=15, message="a lease while the agent is down")
        agent = box.start()
        n_starts = sum(1 for e in broker.audit() if e.get("op") == "start")
        again = agent("pm_enable", **pm)
        assert again["active"] and not again["started"], again
        assert sum(1 for e in broker.audit() if e.get("op") == "start") == n_starts, "no second start request"
        assert [c["Id"] for c in running(broker)] == [sidecar_id]
        after = loop.ok
        netlab.wait_for(lambda: loop.ok > after, timeout=15, message="a lease after the restart")
    finally:
        loop.stop()
    assert loop.failures == [], loop.failures
    return agent


def test_wrapper_mode_agent_container_restarts_while_dhcp_keeps_serving(setup, neutron_python):
    broker, wrappers, root, boxes = setup
    net_id = str(uuid.uuid4())
    with NetnsPair(server_ns=f"qdhcp-{net_id}") as pair:
        net, pm = network(pair, net_id, broker.data_dir)
        box = AgentContainer.create(root, broker, wrappers, neutron_python, mode="wrappers", pid_host=True,
                                    caps=["SYS_ADMIN"], script="neutron_agent.py")
        boxes.append(box)
        assert_unprivileged(box.inspect(), caps=["SYS_ADMIN"])
        agent = box.start()
        r = agent("dhcp_enable", **net)  # Neutron's ProcessManager -> ip netns exec -> the dnsmasq wrapper
        assert r["active"] and r["argv"][:2] == ["dnsmasq", "-k"]
        [c] = running(broker)
        assert c["Pid"] == r["pid"]

        # What Neutron's liveness check needs: /proc/PID/cmdline of the sidecar's host pid. The agent
        # (host pid namespace) reads it; a container in its own pid namespace does not see that pid.
        assert net_id in box.exec(["cat", f"/proc/{r['pid']}/cmdline"]).stdout
        own = subprocess.run(["podman", "run", "--rm", "--cap-drop=ALL", "--network=none", broker_image(broker),
                              "cat", f"/proc/{r['pid']}/cmdline"], capture_output=True, text=True, timeout=60)
        assert own.returncode != 0 and net_id not in own.stdout

        agent = restart_keeps_serving(broker, box, agent, pair, pm, c["Id"])
        st = agent("pm_state", **pm)
        assert st["active"] and st["pid"] == r["pid"]
        assert agent("dhcp_disable", **net)["active"] is False
        assert running(broker) == []
        box.stop(agent)


def test_class_mode_agent_container_in_its_own_pid_namespace_with_no_privilege(setup, neutron_python):
    broker, wrappers, root, boxes = setup
    net_id = str(uuid.uuid4())
    with NetnsPair(server_ns=f"qdhcp-{net_id}") as pair:
        net, pm = network(pair, net_id, broker.data_dir)
        box = AgentContainer.create(root, broker, wrappers, neutron_python, mode="class")
        boxes.append(box)
        info = box.inspect()
        assert_unprivileged(info, caps=[])
        assert info["HostConfig"]["PidMode"] in ("", "private"), info["HostConfig"]["PidMode"]
        assert not any(m.get("Destination") == "/run/netns" for m in info["Mounts"])
        agent = box.start()
        assert agent("is_class")["class"] == "safespawn_neutron.ChannelProcessManager"
        r = agent("dhcp_start", **net)
        assert r["active"] and r["namespace"] == pair.server_ns
        [c] = running(broker)
        assert c["Pid"] == r["pid"], "the host pid, from the channel's status"
        assert net_id not in box.exec(["cat", f"/proc/{r['pid']}/cmdline"]).stdout, \
            "the agent cannot see the sidecar's process"
        assert netlab.dhcp_lease(pair.client_ns, pair.client_if)["ip"] == pair.host(50)
        # The host's next status names the process (its generation); the reply alone does not.
        gen = netlab.wait_for(lambda: agent("pm_generation", **pm)["generation"], timeout=15)

        agent = restart_keeps_serving(broker, box, agent, pair, pm, c["Id"])
        g = agent("pm_generation", **pm)
        assert g["active"] and g["generation"] == gen, "the same sidecar process, not a new one"
        assert agent("dhcp_disable", **net)["active"] is False
        netlab.wait_for(lambda: running(broker) == [], timeout=10, message="sidecar removed")
        box.stop(agent)


def broker_image(broker: Broker) -> str:
    return broker.config_path.read_text().split('image = "', 1)[1].split('"', 1)[0]

