"""`safespawn adopt` takes over sidecars that today's wrappers started, with real podman and real DHCP.

The legacy sidecars are made the way the wrappers make them (docs/testbed.md): TripleO/EDPM's
`nsenter --net=/run/netns/NS podman run --detach --net host --pid host --cgroupns host --privileged
-u root --name neutron-dnsmasq-NS IMAGE dnsmasq -k ...`, and kolla's `--rm --privileged --pid host`
containers named `<agent>_<proc>_<NS>` that enter the netns with `ip netns exec`. Neutron 29's own
ProcessManager (tests/neutron/neutron_agent.py) checks every network before and after, and a real
udhcpc keeps asking for a lease while each network is switched.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from integration.test_core import dnsmasq_argv
from support import netlab
from support.broker import REPO
from support.netlab import NetnsPair
from test_neutron_agent import Agent

from safespawn.broker.engine import Engine
from safespawn.config import load_config
from safespawn.ops import adopt as adopt_mod
from safespawn.ops.adopt import Adoption

pytestmark = [pytest.mark.integration, pytest.mark.neutron]
OUTAGE_BOUND = 10.0  # seconds without a lease that a switch may cost (measured: see docs/operations.md)


def tripleo_legacy(name: str, ns: str, image: str, data: Path, argv: list[str], label: str) -> str:
    cp = subprocess.run(
        ["nsenter", f"--net=/run/netns/{ns}", "podman", "run", "--detach", "--net", "host", "--pid", "host",
         "--cgroupns", "host", "--privileged", "-u", "root", f"--label={label}", "--name", name,
         "-v", f"{data}:{data}", image, "dnsmasq", "-k", *argv],
        capture_output=True, text=True, timeout=60, check=True)
    return cp.stdout.strip()


def kolla_legacy(name: str, ns: str, image: str, data: Path, argv: list[str], label: str) -> str:
    cp = subprocess.run(
        ["podman", "run", "--detach", "--rm", "--privileged", "--pid", "host", "--net", "host",
         f"--label={label}", "--name", name, "-v", f"{data}:{data}", "-v", "/run/netns:/run/netns:shared",
         image, "ip", "netns", "exec", ns, "dnsmasq", "-k", *argv],
        capture_output=True, text=True, timeout=60, check=True)
    return cp.stdout.strip()


def state(name: str) -> tuple[str, str] | None:
    info = netlab.podman_inspect(name)
    return None if info is None else (info["Id"], info["State"]["Status"])


def adopt_cli(broker, *args: str) -> dict[str, Any]:
    p = broker.cli("adopt", "--channel", broker.channel, "--json", *args, timeout=300)
    assert p.returncode in (0, 1), p.stderr
    return json.loads(p.stdout)


class Prober:
    """A real DHCP client asking for a lease again and again; records when it got one."""

    def __init__(self, pair: NetnsPair) -> None:
        self.pair = pair
        self.ok: list[float] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                netlab.dhcp_lease(self.pair.client_ns, self.pair.client_if, timeout=1)
                self.ok.append(time.monotonic())
            except netlab.NetlabError:
                pass

    def __enter__(self) -> Prober:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=30)

    def longest_gap(self) -> float:
        return max((b - a for a, b in zip(self.ok, self.ok[1:], strict=False)), default=float("inf"))


def neutron_sees(agent: Agent, pair: NetnsPair, data: Path) -> dict[str, Any]:
    net_id = pair.server_ns.removeprefix("qdhcp-")
    return agent("pm_state", uuid=net_id, namespace=pair.server_ns, service="dnsmasq",
                 pid_file=str(data / pair.server_ns / "pid"))


def confined(broker) -> dict[str, dict[str, Any]]:
    return {c["Labels"]["safespawn.netns"]: c for c in broker.containers()}


@pytest.fixture(scope="session")
def neutron_python() -> str:
    """The Neutron venv's python (scripts/neutron-venv creates it when missing; no skip)."""
    out = subprocess.run(["bash", str(REPO / "scripts" / "neutron-venv")], capture_output=True, text=True,
                         timeout=900, check=True).stdout
    return out.strip().splitlines()[-1]


@pytest.fixture
def container_label():
    """A unique test label on the legacy containers; whatever still carries it is removed afterwards."""
    label = f"{netlab.TEST_LABEL}={netlab.unique_name()}"
    yield label
    netlab.podman_rm_by_label(label)


@pytest.fixture
def pairs():
    made = []

    def make(n: int) -> list[NetnsPair]:
        for _ in range(n):
            made.append(NetnsPair(server_ns=f"qdhcp-{uuid.uuid4()}").create())
        return made[-n:]

    yield make
    for p in made:
        p.destroy()


def test_tripleo_sidecars_are_adopted_one_network_at_a_time(make_broker, pairs, container_label, neutron_python,
                                                            tmp_path):
    b = make_broker(profiles=["dnsmasq"])
    image = b.engine.config.channel(b.channel).image
    a, c, refused = pairs(3)
    argv = {p.server_ns: dnsmasq_argv(b.data_dir, p) for p in (a, c, refused)}
    argv[refused.server_ns] = argv[refused.server_ns] + ["--dhcp-script=/bin/true"]
    # Network a: the first container exited and the wrapper's name collision made a -TIMESTAMP twin.
    first = f"neutron-dnsmasq-{a.server_ns}"
    tripleo_legacy(first, a.server_ns, image, b.data_dir, argv[a.server_ns], container_label)
    netlab.podman("stop", "-t", "5", first)
    twin = f"{first}-{int(time.time())}"
    tripleo_legacy(twin, a.server_ns, image, b.data_dir, argv[a.server_ns], container_label)
    plain = f"neutron-dnsmasq-{c.server_ns}"
    tripleo_legacy(plain, c.server_ns, image, b.data_dir, argv[c.server_ns], container_label)
    bad = f"neutron-dnsmasq-{refused.server_ns}"
    tripleo_legacy(bad, refused.server_ns, image, b.data_dir, argv[refused.server_ns], container_label)
    for p in (a, c, refused):
        assert netlab.wait_for(lambda p=p: netlab.podman_inspect(f"neutron-dnsmasq-{p.server_ns}") is not None)
        assert netlab.dhcp_lease(p.client_ns, p.client_if, timeout=5)["ip"] == p.host(50)
    agent = Agent(neutron_python, b.data_dir, tmp_path, tmp_path / "agent.log")
    try:
        for p in (a, c, refused):
            assert neutron_sees(agent, p, b.data_dir)["active"], p.server_ns
        before = {n: state(n) for n in (first, twin, plain, bad)}

        # --dry-run prints the plan and changes nothing.
        plan = adopt_cli(b, "--dry-run")
        rows = {r["netns"]: r for r in plan["networks"]}
        assert rows[a.server_ns]["state"] == "planned" and rows[a.server_ns]["source"] == twin
        assert rows[a.server_ns]["legacy"] == sorted([first, twin])
        assert rows[refused.server_ns]["state"] == "refused" and "dhcp-script" in rows[refused.server_ns]["reason"]
        assert {n: state(n) for n in before} == before
        assert b.containers() == [] and not (b.root / "state" / b.channel / "adopt.json").exists()

        with Prober(a) as pa, Prober(c) as pc:
            time.sleep(1)
            out = adopt_cli(b)
            time.sleep(2)
        rows = {r["netns"]: r for r in out["networks"]}
        for p in (a, c):
            assert rows[p.server_ns]["state"] == "done", rows[p.server_ns]
            assert 0 < rows[p.server_ns]["outage_seconds"] < OUTAGE_BOUND
        # A DHCP lease again within the bound, measured by a real client that never stopped asking.
        gaps = {p.server_ns: g.longest_gap() for p, g in ((a, pa), (c, pc))}
        assert all(g < OUTAGE_BOUND for g in gaps.values()), gaps
        print(f"DHCP outage per network (longest gap between leases): {gaps}; adopt measured "
              f"{[rows[p.server_ns]['outage_seconds'] for p in (a, c)]}")
        # Exactly one confined sidecar per allowed network, the legacy twins gone; the refused one untouched.
        side = confined(b)
        assert sorted(side) == sorted([a.server_ns, c.server_ns])
        assert all(s["State"] == "running" for s in side.values())
        assert state(first) is None and state(twin) is None and state(plain) is None
        assert rows[refused.server_ns]["state"] == "refused" and state(bad) == before[bad]
        for p in (a, c, refused):
            assert netlab.dhcp_lease(p.client_ns, p.client_if, timeout=5)["ip"] == p.host(50)
        # Neutron's ProcessManager still sees every network active, the adopted ones at the sidecar's pid.
        for p in (a, c):
            seen = neutron_sees(agent, p, b.data_dir)
            assert seen["active"] and seen["pid"] == side[p.server_ns]["Pid"], seen
        assert neutron_sees(agent, refused, b.data_dir)["active"]
        # The confined sidecar went through the channel: ledger, desired state and audit know it.
        assert sorted(d["netns"] for d in b.desired().values()) == sorted([a.server_ns, c.server_ns])
        assert [e["decision"] for e in b.audit() if e.get("op") == "start"] == ["allow", "allow"]
        # Running it again changes nothing.
        again = adopt_cli(b)
        assert [r["netns"] for r in again["networks"]] == [refused.server_ns]
        assert {k: v["Id"] for k, v in confined(b).items()} == {k: v["Id"] for k, v in side.items()}
    finally:
        agent.stop()


def test_kolla_sidecars_adopt_killed_half_way_converges_on_a_rerun(make_broker, pairs, container_label,
                                                                  monkeypatch, neutron_python, tmp_path):
    b = make_broker(profiles=["dnsmasq"])
    image = b.engine.config.channel(b.channel).image
    *nets, liar = pairs(3)
    names = {}
    for p in nets:
        names[p.server_ns] = f"neutron_dhcp_agent_dnsmasq_{p.server_ns}"
        kolla_legacy(names[p.server_ns], p.server_ns, image, b.data_dir, dnsmasq_argv(b.data_dir, p),
                     container_label)
    # A container whose name says one network while its process runs in another: the name is not trusted.
    elsewhere = f"qdhcp-{uuid.uuid4()}"
    netlab.netns_add(elsewhere)
    try:
        liar_name = f"neutron_dhcp_agent_dnsmasq_{liar.server_ns}"
        kolla_legacy(liar_name, elsewhere, image, b.data_dir, dnsmasq_argv(b.data_dir, liar), container_label)
        for p in nets:
            assert netlab.wait_for(lambda p=p: (state(names[p.server_ns]) or ("", ""))[1] == "running")
            assert netlab.dhcp_lease(p.client_ns, p.client_if, timeout=5)["ip"] == p.host(50)
        assert netlab.wait_for(lambda: (state(liar_name) or ("", ""))[1] == "running")
        liar_before = state(liar_name)
        agent = Agent(neutron_python, b.data_dir, tmp_path, tmp_path / "agent.log")
        try:
            assert all(neutron_sees(agent, p, b.data_dir)["active"] for p in nets)
            _kolla_killed_half_way(b, nets, names, liar, liar_name, liar_before, elsewhere, monkeypatch)
            side = confined(b)
            for p in nets:
                seen = neutron_sees(agent, p, b.data_dir)
                assert seen["active"] and seen["pid"] == side[p.server_ns]["Pid"], seen
        finally:
            agent.stop()
    finally:
        netlab.podman("rm", "-f", "-t", "0", f"neutron_dhcp_agent_dnsmasq_{liar.server_ns}", check=False)
        netlab.netns_delete(elsewhere)


def _kolla_killed_half_way(b, nets, names, liar, liar_name, liar_before, elsewhere, monkeypatch):
    plan = {r["netns"]: r for r in adopt_cli(b, "--from", "kolla", "--dry-run")["networks"]}
    assert [plan[p.server_ns]["state"] for p in nets] == ["planned", "planned"]
    assert plan[liar.server_ns]["state"] == "refused"
    assert f"runs in netns {elsewhere}, not in {liar.server_ns}" in plan[liar.server_ns]["reason"]
    assert adopt_cli(b, "--from", "tripleo", "--dry-run")["networks"] == []  # other naming: nothing

    # The first adopt dies right after stopping the second network's legacy sidecar (the worst
    # moment: that network has no DHCP server at all, and kolla's --rm container is gone).
    cfg = load_config(str(b.config_path))
    adoption = Adoption(cfg, cfg.channel(b.channel), Engine(cfg), flavor="kolla")
    real = Adoption._start_confined
    calls = []

    def dies_on_the_second(self, n):
        calls.append(n.netns)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return real(self, n)

    monkeypatch.setattr(Adoption, "_start_confined", dies_on_the_second)
    with pytest.raises(KeyboardInterrupt):
        adoption.run()
    monkeypatch.undo()
    first, second = calls
    assert sorted(confined(b)) == [first]
    assert state(names[second]) is None  # stopped, and --rm removed it
    journal = json.loads((b.root / "state" / b.channel / adopt_mod.JOURNAL).read_text())
    assert {n["netns"]: n["state"] for n in journal["networks"]} == {first: "done", second: "switching"}

    out = adopt_cli(b, "--from", "kolla")
    assert [(r["netns"], r["state"]) for r in out["networks"]] == [(second, "done"), (liar.server_ns, "refused")]
    side = confined(b)
    assert sorted(side) == sorted(p.server_ns for p in nets)
    assert all(state(n) is None for n in names.values())
    for p in nets:
        assert netlab.dhcp_lease(p.client_ns, p.client_if, timeout=5)["ip"] == p.host(50)
    assert [r["netns"] for r in adopt_cli(b, "--from", "kolla")["networks"]] == [liar.server_ns]
    assert state(liar_name) == liar_before  # refused, and left running untouched
