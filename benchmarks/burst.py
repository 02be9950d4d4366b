#!/usr/bin/env python3
"""Burst benchmark: N agents ask at once for N dnsmasq sidecars (one per qdhcp- netns) through a
channel served by `safespawn watch`; reports request-to-reply latency (p50, p95, max), the drain
rate, and, as the baseline in the same run, what the runtime alone takes for the same N containers
(`podman run -d` / `docker run -d` with the very command line the broker uses, serial and with the
broker's parallelism).

    sudo .venv/bin/python benchmarks/burst.py [--n 50] [--parallel 4] [--runtime podman|docker]

With `--runtime docker` the benchmark starts its own dockerd (tests/support/dockerd.py: private
sockets and folders, safespawn-oci-runtime registered), loads the test image into it, and also times
the same `docker run -d` lines with plain runc instead of safespawn's OCI runtime (those containers
stay in a fresh netns: the figure shows what the OCI runtime itself costs).
Root, podman and the test image (scripts/build-test-image) are needed. Cleans up after itself.
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import pct  # noqa: E402  (also puts tests/ on sys.path)
from support.broker import TEST_IMAGE, Broker  # noqa: E402
from support.dockerd import DOCKER, PrivateDockerd  # noqa: E402

from safespawn.agent import client  # noqa: E402
from safespawn.runtime import docker as docker_rt  # noqa: E402
from safespawn.runtime import podman as podman_rt  # noqa: E402


def remove_bench_containers(cli: str, env: dict | None) -> None:
    ids = subprocess.run([cli, "ps", "-aq", "--filter", "label=safespawn.bench=1"], capture_output=True,
                         text=True, check=False, env=env).stdout.split()
    if ids:
        subprocess.run([cli, "rm", "-f", *ids], capture_output=True, check=False, env=env)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--parallel", type=int, default=4)
    ap.add_argument("--runtime", choices=["podman", "docker"], default="podman")
    args = ap.parse_args()
    n = args.n
    dockerd = None
    if args.runtime == "docker":
        dockerd = PrivateDockerd.start(oci_runtime=str(Path(sys.executable).with_name("safespawn-oci-runtime")))
        dockerd.load_image(TEST_IMAGE)
    cli, env = (DOCKER, dockerd.env) if dockerd else ("podman", None)
    namespaces = [f"qdhcp-{uuid.uuid4()}" for _ in range(n)]
    for ns in namespaces:
        subprocess.run(["ip", "netns", "add", ns], check=True)
    root = Path(tempfile.mkdtemp(prefix="safespawn-bench-"))
    b = Broker.make(root, profiles=["dnsmasq"], image=TEST_IMAGE,
                    broker_extra=f"parallel_starts = {args.parallel}", dockerd=dockerd)
    try:
        def argv(ns: str) -> list[str]:
            d = b.data_dir / ns
            d.mkdir(exist_ok=True)
            return ["--no-hosts", "--no-resolv", f"--pid-file={d}/pid", f"--dhcp-leasefile={d}/leases",
                    "--interface=lo", "--bind-dynamic", "--conf-file=/dev/null"]

        reqs = [client.start_request("dnsmasq", argv(ns), netns=ns) for ns in namespaces]
        # The baseline: the same containers, the runtime alone, with the very command line the broker
        # uses (names suffixed so they do not clash, each run removed before the next).
        from safespawn.broker.request import Request
        pol = b.engine.policy
        ch = b.engine.config.channel(b.channel)
        specs = [pol.authorize_start(ch, Request(q["id"], "start", "dnsmasq", q["netns"], tuple(q["argv"])))
                 for q in reqs]

        def raw_run(s, suffix: str, oci: str = "safespawn") -> None:
            cmd = docker_rt.run_argv(s, cli, oci) if dockerd else podman_rt.run_argv(s, cli)
            cmd = [a if not a.startswith("--name=") else f"{a}-{suffix}" for a in cmd]
            cmd = [a for a in cmd if not a.startswith("--label=safespawn.channel")]
            cmd.insert(2, "--label=safespawn.bench=1")
            subprocess.run(cmd, check=True, capture_output=True, env=env)

        def timed(fn, parallel: int) -> float:
            t = time.monotonic()
            with ThreadPoolExecutor(max_workers=parallel) as pool:
                list(pool.map(fn, specs))
            took = time.monotonic() - t
            remove_bench_containers(cli, env)
            return took

        load_before = os.getloadavg()[0]
        par_before = timed(lambda s: raw_run(s, "before"), args.parallel)

        b.start_watch()
        time.sleep(0.5)
        lat: list[float] = []

        def one(req: dict) -> None:
            t0 = time.monotonic()
            r = client.submit(str(b.channel_dir()), req, timeout=600)
            lat.append(time.monotonic() - t0)
            assert r["ok"], r

        t0 = time.monotonic()
        with ThreadPoolExecutor(max_workers=n) as pool:
            list(pool.map(one, reqs))
        total = time.monotonic() - t0
        running = sum(1 for c in b.containers() if c["State"] == "running")
        # The broker's sidecars go before the next baselines: a second dnsmasq in the same netns could
        # not bind its port, would exit, and the restart policy would loop it during the timing.
        b.cleanup()

        par_after = timed(lambda s: raw_run(s, "after"), args.parallel)
        serial = timed(lambda s: raw_run(s, "serial"), 1)
        extra = {}
        if dockerd:
            extra[f"docker_alone_plain_runc_parallel{args.parallel}_s"] = round(
                timed(lambda s: raw_run(s, "runc", "runc"), args.parallel), 2)
        par = (par_before + par_after) / 2
        result = {"runtime": args.runtime,
            "n": n, "parallel_starts": args.parallel, "running_after": running,
            "safespawn_total_s": round(total, 2), "drain_rate_per_s": round(n / total, 1),
            "latency_p50_s": round(pct(lat, 50), 3), "latency_p95_s": round(pct(lat, 95), 3),
            "latency_max_s": round(max(lat), 3), "latency_mean_s": round(statistics.mean(lat), 3),
            f"{args.runtime}_alone_parallel{args.parallel}_before_s": round(par_before, 2),
            f"{args.runtime}_alone_parallel{args.parallel}_after_s": round(par_after, 2),
            f"{args.runtime}_alone_serial_s": round(serial, 2), **extra,
            "ratio_safespawn_to_parallel_mean": round(total / par, 2),
            "load_average_1min_before_after": [round(load_before, 1), round(os.getloadavg()[0], 1)],
        }
        print(json.dumps(result, indent=1))
        return 0 if running == n else 1
    finally:
        b.cleanup()
        if dockerd:
            dockerd.stop()
        for ns in namespaces:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


if __name__ == "__main__":
    sys.exit(main())
