"""What a reboot leaves, and what the broker does with it (docs/operations.md, "At boot").

A reboot ends every process and empties /run, so every netns under /run/netns is gone; podman's
containers (stopped) and the broker's state survive. Here a reboot is played on real podman, real
netns and real dnsmasq: the containers are stopped (a stopped container is not restarted by its
restart policy, as after a reboot) and the namespaces deleted. Then, in the order a host sees it:
one agent is quick and asks again before the first full sync; the first full sync drops the
sidecars whose netns is gone and removes their containers; a slower agent recreates its netns and
asks again; a network deleted while the host was down is never asked for, and nothing of it is left.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from support.broker import Broker
from support.netlab import NetnsPair, dhcp_lease, random_mac

from safespawn.agent import client

from .test_core import dnsmasq_argv, qdhcp
from .test_pidfiles import holds_host_pid


def start(broker: Broker, pair: NetnsPair, argv: list[str]) -> dict:
    r = broker.request(client.start_request("dnsmasq", argv, netns=pair.server_ns))
    assert r["ok"], r
    return r


def test_after_a_reboot_sidecars_without_their_netns_are_dropped_and_the_agents_start_brings_them_back(
        broker: Broker) -> None:
    pairs = [NetnsPair(server_ns=qdhcp(), client_mac=random_mac()) for _ in range(3)]
    try:
        for p in pairs:
            p.create()
        argvs = [dnsmasq_argv(broker.data_dir, p) for p in pairs]
        before = [start(broker, p, a) for p, a in zip(pairs, argvs, strict=True)]
        names = [r["sidecar"] for r in before]

        # The reboot: every process ends, every netns vanishes; containers and state stay.
        subprocess.run(["podman", "stop", "--time=0", *names], check=True, capture_output=True, timeout=120)
        for p in pairs:
            p.destroy()
        assert {c["Names"][0]: c["State"] for c in broker.containers()} == {n: "exited" for n in names}
        assert sorted(broker.desired()) == sorted(names)

        # Network 0's agent is up first: it recreates its netns and asks for its dnsmasq again.
        pairs[0].create()
        r0 = start(broker, pairs[0], argvs[0])
        assert r0["sidecar"] == names[0] and r0["pid"] != before[0]["pid"]
        # That sync's reconcile, like the timer's first `sync --all`, drops what has no netns.
        audit = broker.audit()
        for n, p in zip(names[1:], pairs[1:], strict=True):
            [e] = [e for e in audit if e.get("decision") == "reconcile" and e.get("sidecar") == n
                   and "dropped" in e.get("reason", "")]
            assert p.server_ns in e["reason"], e
        assert [c["Names"][0] for c in broker.containers()] == [names[0]]
        assert sorted(broker.desired()) == [names[0]]
        result = broker.sync()  # the timer's full sync: nothing more to do
        assert result.errors == [] and result.respawned == 0 and result.removed == 0
        assert dhcp_lease(pairs[0].client_ns, pairs[0].client_if, timeout=10)["ip"] == pairs[0].host(50)
        assert holds_host_pid(broker.data_dir / pairs[0].server_ns / "pid", r0["pid"])

        # Network 1's agent comes later, with the same request: its dnsmasq is back, with a lease.
        pairs[1].create()
        r1 = start(broker, pairs[1], argvs[1])
        assert r1["sidecar"] == names[1]
        assert dhcp_lease(pairs[1].client_ns, pairs[1].client_if, timeout=10)["ip"] == pairs[1].host(50)
        assert holds_host_pid(broker.data_dir / pairs[1].server_ns / "pid", r1["pid"])

        # Network 2 was deleted while the host was down: nobody asks, nothing is left of it.
        broker.sync()
        running = {c["Names"][0]: c["Pid"] for c in broker.containers()}
        assert running == {names[0]: r0["pid"], names[1]: r1["pid"]}
        status = json.loads(Path(broker.channel_dir() / "outbox" / "status.json").read_text())
        assert sorted(s["name"] for s in status["sidecars"]) == sorted(names[:2])
    finally:
        for p in pairs:
            if p.created:
                p.destroy()
