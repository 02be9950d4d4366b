#!/usr/bin/env python3
"""Adoption outage: how long a network has no DHCP server while `safespawn adopt` switches it from a
legacy TripleO-style sidecar to a confined one, against the least a switch can cost: the same
`podman stop` of the legacy container followed directly by `podman run -d` of the confined container
(the same command line safespawn would run), in the same run on the same machine.

Both sides are measured two ways: the switch itself (stop started -> new sidecar running), and the
DHCP outage a real client sees (the longest gap between leases of a busybox udhcpc that asks again
and again in the client netns).

    .venv/bin/python benchmarks/adopt_outage.py [--n 4]

Root, podman, busybox and the test image (scripts/build-test-image) are needed. Cleans up after itself.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from integration.test_core import dnsmasq_argv  # noqa: E402
from support import netlab  # noqa: E402
from support.broker import TEST_IMAGE, Broker  # noqa: E402

from safespawn.broker.engine import Engine  # noqa: E402
from safespawn.broker.request import Request  # noqa: E402
from safespawn.config import load_config  # noqa: E402
from safespawn.ops.adopt import Adoption  # noqa: E402
from safespawn.runtime.podman import run_argv  # noqa: E402

LABEL = "safespawn.bench=adopt"


def legacy(ns: str, data: Path, argv: list[str]) -> None:
    subprocess.run(["nsenter", f"--net=/run/netns/{ns}", "podman", "run", "--detach", "--net", "host", "--pid",
                    "host", "--cgroupns", "host", "--privileged", "-u", "root", f"--label={LABEL}", "--name",
                    f"neutron-dnsmasq-{ns}", "-v", f"{data}:{data}", TEST_IMAGE, "dnsmasq", "-k", *argv],
                   check=True, capture_output=True, timeout=60)


class Prober(threading.Thread):
    def __init__(self, pair: netlab.NetnsPair) -> None:
        super().__init__(daemon=True)
        self.pair, self.ok, self.halt = pair, [], threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            try:
                netlab.dhcp_lease(self.pair.client_ns, self.pair.client_if, timeout=1)
                self.ok.append(time.monotonic())
            except netlab.NetlabError:
                pass

    def gap(self) -> float:
        return max((b - a for a, b in zip(self.ok, self.ok[1:], strict=False)), default=float("nan"))


def wait_running(name: str) -> None:
    while True:
        info = netlab.podman_inspect(name)
        if info and info["State"]["Status"] == "running":
            return
        time.sleep(0.02)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=4, help="networks per side")
    n = ap.parse_args().n
    root = Path(tempfile.mkdtemp(prefix="safespawn-bench-adopt-"))
    b = Broker.make(root, profiles=["dnsmasq"], image=TEST_IMAGE)
    pairs = [netlab.NetnsPair(server_ns=f"qdhcp-{uuid.uuid4()}").create() for _ in range(2 * n)]
    ours, direct = pairs[:n], pairs[n:]
    try:
        argv = {p.server_ns: dnsmasq_argv(b.data_dir, p) for p in pairs}
        for p in ours:  # the direct side's legacy sidecars come later, or adopt would take them too
            legacy(p.server_ns, b.data_dir, argv[p.server_ns])
        for p in ours:
            netlab.dhcp_lease(p.client_ns, p.client_if, timeout=5)

        # safespawn adopt, one network at a time.
        probers = {p.server_ns: Prober(p) for p in ours}
        for pr in probers.values():
            pr.start()
        time.sleep(1)
        cfg = load_config(str(b.config_path))
        engine = Engine(cfg)
        nets = Adoption(cfg, cfg.channel(b.channel), engine, flavor="tripleo").run()
        time.sleep(2)
        for pr in probers.values():
            pr.halt.set()
        for pr in probers.values():
            pr.join()
        adopt_switch = [x.outage for x in nets if x.state == "done" and x.outage is not None]
        adopt_gap = [pr.gap() for pr in probers.values()]
        assert len(adopt_switch) == n, [(x.netns, x.state, x.error or x.refused) for x in nets]

        # Direct: podman stop, then podman run -d of the same confined container, nothing else.
        for p in direct:
            legacy(p.server_ns, b.data_dir, argv[p.server_ns])
        for p in direct:
            netlab.dhcp_lease(p.client_ns, p.client_if, timeout=5)
        probers = {p.server_ns: Prober(p) for p in direct}
        for pr in probers.values():
            pr.start()
        time.sleep(1)
        direct_switch = []
        for p in direct:
            spec = engine.policy.authorize_start(cfg.channel(b.channel), Request(
                "0" * 32, "start", "dnsmasq", p.server_ns, tuple(argv[p.server_ns])))
            cmd = run_argv(spec)
            t0 = time.monotonic()
            subprocess.run(["podman", "stop", "--time=5", f"neutron-dnsmasq-{p.server_ns}"], check=True,
                           capture_output=True, timeout=60)
            subprocess.run(cmd, check=True, capture_output=True, timeout=60)
            wait_running(spec.name)
            direct_switch.append(time.monotonic() - t0)
            subprocess.run(["podman", "rm", "-f", f"neutron-dnsmasq-{p.server_ns}"], capture_output=True,
                           timeout=60)
        time.sleep(2)
        for pr in probers.values():
            pr.halt.set()
        for pr in probers.values():
            pr.join()
        direct_gap = [pr.gap() for pr in probers.values()]

        def row(what: str, xs: list[float]) -> str:
            return f"{what:<44} median {statistics.median(xs):5.2f} s  max {max(xs):5.2f} s  ({len(xs)} networks)"

        print(row("safespawn adopt: switch (stop -> running)", adopt_switch))
        print(row("direct podman stop + run -d: switch", direct_switch))
        print(row("safespawn adopt: DHCP outage (udhcpc gap)", adopt_gap))
        print(row("direct podman stop + run -d: DHCP outage", direct_gap))
        print(f"ratio (median switch, adopt / direct): "
              f"{statistics.median(adopt_switch) / statistics.median(direct_switch):.2f}")
        print(f"ratio (median DHCP outage, adopt / direct): "
              f"{statistics.median(adopt_gap) / statistics.median(direct_gap):.2f}")
    finally:
        ids = subprocess.run(["podman", "ps", "-aq", "--filter", f"label={LABEL}"], capture_output=True,
                             text=True, check=False).stdout.split()
        if ids:
            subprocess.run(["podman", "rm", "-f", "-t", "0", *ids], capture_output=True, check=False)
        b.cleanup()
        for p in pairs:
            p.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
