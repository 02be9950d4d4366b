#!/usr/bin/env python3
"""Burst benchmark: N agents ask at once for N dnsmasq sidecars (one per qdhcp- netns) through a
channel served by `safespawn watch`; reports request-to-reply latency (p50, p95, max), the drain
rate, and, as the baseline in the same run, what podman alone takes for the same N containers
(`podman run -d`, serial and with the broker's parallelism).

    sudo .venv/bin/python benchmarks/burst.py [--n 50] [--parallel 4]

Root, podman and the test image (scripts/build-test-image) are needed. Cleans up after itself.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import pct, podman_baseline, podman_rm  # noqa: E402
from support.broker import TEST_IMAGE, Broker  # noqa: E402

from safespawn import client  # noqa: E402
from safespawn.runtime.podman import run_argv  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--parallel", type=int, default=4)
    args = ap.parse_args()
    n = args.n
    namespaces = [f"qdhcp-{uuid.uuid4()}" for _ in range(n)]
    for ns in namespaces:
        subprocess.run(["ip", "netns", "add", ns], check=True)
    root = Path(tempfile.mkdtemp(prefix="safespawn-bench-"))
    b = Broker.make(root, profiles=["dnsmasq"], image=TEST_IMAGE,
                    broker_extra=f"parallel_starts = {args.parallel}")
    try:
        def argv(ns: str) -> list[str]:
            d = b.data_dir / ns
            d.mkdir(exist_ok=True)
            return ["--no-hosts", "--no-resolv", f"--pid-file={d}/pid", f"--dhcp-leasefile={d}/leases",
                    "--interface=lo", "--bind-dynamic", "--conf-file=/dev/null"]

        reqs = [client.start_request("dnsmasq", argv(ns), netns=ns) for ns in namespaces]
        b.start_watch()
        time.sleep(0.5)
        lat: list[float] = []

        def one(req: dict) -> None:
            t0 = time.monotonic()
            r = client.submit(str(b.channel_dir()), req, timeout=300)
            lat.append(time.monotonic() - t0)
            assert r["ok"], r

        t0 = time.monotonic()
        with ThreadPoolExecutor(max_workers=n) as pool:
            list(pool.map(one, reqs))
        total = time.monotonic() - t0
        running = sum(1 for c in b.containers() if c["State"] == "running")
        b.stop_watch()

        # Baseline: the same containers, podman alone (names suffixed so they do not clash).
        specs = []
        pol = b.engine.policy
        ch = b.engine.config.channel(b.channel)
        from safespawn.request import Request
        for q in reqs:
            s = pol.authorize_start(ch, Request(q["id"], "start", "dnsmasq", q["netns"], tuple(q["argv"])))
            specs.append(s)

        def raw_argv(s, suffix: str) -> list[str]:
            cmd = run_argv(s)
            cmd = [a if not a.startswith("--name=") else f"{a}-{suffix}" for a in cmd]
            cmd = [a for a in cmd if not a.startswith("--label=safespawn.channel")]
            cmd.insert(2, "--label=safespawn.bench=1")
            return cmd

        serial = podman_baseline([raw_argv(s, "serial") for s in specs], 1)
        podman_rm("safespawn.bench=1")
        par = podman_baseline([raw_argv(s, "par") for s in specs], args.parallel)
        podman_rm("safespawn.bench=1")
        result = {
            "n": n, "parallel_starts": args.parallel, "running_after": running,
            "safespawn_total_s": round(total, 2), "drain_rate_per_s": round(n / total, 1),
            "latency_p50_s": round(pct(lat, 50), 3), "latency_p95_s": round(pct(lat, 95), 3),
            "latency_max_s": round(max(lat), 3), "latency_mean_s": round(statistics.mean(lat), 3),
            "podman_alone_serial_s": round(serial, 2), f"podman_alone_parallel{args.parallel}_s": round(par, 2),
        }
        print(json.dumps(result, indent=1))
        return 0 if running == n else 1
    finally:
        b.cleanup()
        for ns in namespaces:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


if __name__ == "__main__":
    sys.exit(main())
