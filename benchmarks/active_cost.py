#!/usr/bin/env python3
"""Cost of `active` in safespawn's ProcessManager class, against what it replaces, in one run.

One dnsmasq sidecar runs in a qdhcp- netns, served by `safespawn watch`. Then, with the Neutron venv's
python (the class as `safespawn-neutron` installs it):
- the class's `active` on one manager (what ProcessMonitor calls every interval), and on a fresh
  manager each time (what Neutron's drivers do: they build a ProcessManager per call);
- Neutron's own `active` for the same sidecar (pid file + psutil's /proc/PID/cmdline), the
  wrapper-mode baseline;
- a request round trip (a start request for the running sidecar: the host changes nothing), i.e.
  what `active` would cost if it asked the host;
- `podman inspect` of the sidecar from the host: the direct runtime call.

    .venv/bin/python benchmarks/active_cost.py [--n 5000] [--requests 10]

Root, podman, the test image (scripts/build-test-image) and the Neutron venv (scripts/neutron-venv).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from integration.test_core import dnsmasq_argv  # noqa: E402
from support.broker import TEST_IMAGE, Broker  # noqa: E402
from support.netlab import NetnsPair  # noqa: E402

from safespawn.agent import client  # noqa: E402

AGENT_SIDE = r"""
import json, os, sys, time, warnings
warnings.filterwarnings("ignore")
sys.path.insert(0, os.environ["NEUTRON_TESTS"])
from neutron_conf import register_agent_options
CONF = register_agent_options()
CONF.set_override("external_pids", os.path.join(os.environ["STATE"], "pids"))
from neutron.agent.linux import external_process as ep
cls = ep.ProcessManager
orig = ep._safespawn_original
uuid_, ns, pid_file, n, reqs = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
argv = json.loads(sys.argv[6])
def per(f, k):
    t = time.perf_counter()
    for _ in range(k):
        f()
    return (time.perf_counter() - t) / k
pm = cls(CONF, uuid_, namespace=ns, service="dnsmasq")
assert pm.active
neutron_pm = orig(CONF, uuid_, namespace=ns, service="dnsmasq", pid_file=pid_file)
assert neutron_pm.active, "Neutron's own check must see the sidecar (pid file + /proc)"
start = lambda: pm._start(["dnsmasq"] + argv)
out = {
    "class_active": per(lambda: pm.active, n),
    "class_active_fresh": per(lambda: cls(CONF, uuid_, namespace=ns, service="dnsmasq").active, n // 10),
    "neutron_active": per(lambda: neutron_pm.active, n // 10),
    "request": per(start, reqs),
}
print(json.dumps(out))
"""


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--requests", type=int, default=10)
    args = ap.parse_args()
    neutron_python = subprocess.run(["bash", str(REPO / "scripts" / "neutron-venv")], capture_output=True,
                                    text=True, check=True).stdout.strip().splitlines()[-1]
    net_id = str(uuid.uuid4())
    ns = f"qdhcp-{net_id}"
    root = Path(tempfile.mkdtemp(prefix="safespawn-bench-active-"))
    b = Broker.make(root, profiles=["dnsmasq"], image=TEST_IMAGE)
    pair = NetnsPair(server_ns=ns).__enter__()
    try:
        argv = dnsmasq_argv(b.data_dir, pair)  # Neutron's shape; the paths carry the network id
        pid_file = b.data_dir / ns / "pid"
        b.start_watch()
        reply = client.submit(str(b.channel_dir()), client.start_request("dnsmasq", argv, netns=ns), timeout=60)
        assert reply["ok"], reply
        name = reply["sidecar"]
        time.sleep(1)
        wrappers = root / "wrappers"
        b.cli("wrappers", "install", "--channel", b.channel, "--channel-dir", str(b.channel_dir()), "--python",
              neutron_python, str(wrappers), check=True)
        # Neutron's own check: the pid file (dnsmasq's, host pid today) and the uuid in /proc/PID/cmdline.
        if not pid_file.exists():
            pid_file.write_text(f"{reply['pid']}\n")
        env = dict(os.environ, NEUTRON_TESTS=str(REPO / "tests" / "neutron"), STATE=str(root))
        code_file = root / "agent_side.py"
        code_file.write_text(AGENT_SIDE)
        out = subprocess.run([str(wrappers / "safespawn-neutron"), neutron_python, str(code_file), net_id, ns,
                              str(pid_file), str(args.n), str(args.requests), json.dumps(argv)],
                             capture_output=True, text=True, env=env, timeout=600)
        if out.returncode != 0:
            print(out.stderr[-3000:], file=sys.stderr)
            return 1
        r = json.loads(out.stdout.strip().splitlines()[-1])
        inspect = []
        for _ in range(args.requests):
            t = time.perf_counter()
            subprocess.run(["podman", "inspect", "--format", "{{.State.Pid}}", name], capture_output=True, check=True)
            inspect.append(time.perf_counter() - t)
        r["podman_inspect"] = statistics.mean(inspect)
        us = {k: v * 1e6 for k, v in r.items()}
        print(f"class active, one manager        {us['class_active']:10.1f} us")
        print(f"class active, fresh manager      {us['class_active_fresh']:10.1f} us")
        print(f"Neutron's own active (pid+/proc) {us['neutron_active']:10.1f} us")
        print(f"request round trip (no-op start) {us['request']:10.1f} us")
        print(f"podman inspect (direct)          {us['podman_inspect']:10.1f} us")
        print(f"ratio request / class active     {r['request'] / r['class_active']:10.0f}x")
        print(f"ratio podman inspect / class active {r['podman_inspect'] / r['class_active']:7.0f}x")
        print(f"ratio class active / Neutron's own active {r['class_active'] / r['neutron_active']:5.2f}")
        return 0
    finally:
        b.cleanup()
        pair.__exit__(None, None, None)


if __name__ == "__main__":
    sys.exit(main())
