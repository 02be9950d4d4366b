#!/usr/bin/env python3
"""Request-to-reply latency and burst drain rate through systemd, beside what podman alone takes.

A real `systemd --user` manager (scripts/user-systemd) with `safespawn install --scope user`; the
client writes requests, the path unit starts `safespawn sync`, nobody else calls it. Sidecars use
the test-only `sleeper` profile (busybox `sleep` from the test image, no netns), so the numbers are
about the trigger and the broker, not about a daemon's start-up.

    sudo .venv/bin/python benchmarks/systemd_latency.py [--serial 20] [--burst 100]

Measured, in one run:
- serial: one request at a time, each for a new sidecar (a `podman run -d` per request), and each
  for a sidecar that already runs (no podman run: the cost of systemd + safespawn alone);
- burst: N client processes submit at once, each for its own sidecar; drain rate, latency and the
  number of activations of the sync service;
- baseline: the same `podman run -d` command lines alone, serially and 4 at a time (the broker's
  default `parallel_starts`).
Root, podman and the test image (scripts/build-test-image) are needed. Cleans up after itself.
"""

from __future__ import annotations

import argparse
import multiprocessing
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import pct, podman_baseline, podman_rm  # noqa: E402
from support.usersystemd import UserManager, count_lines, wait_until, write_config  # noqa: E402

from safespawn.agent import client  # noqa: E402
from safespawn.broker.policy import Policy  # noqa: E402
from safespawn.broker.request import Request  # noqa: E402
from safespawn.config import load_config  # noqa: E402
from safespawn.runtime.podman import run_argv  # noqa: E402


def _client(channel_dir: str, key: str, go: Any, out: Any) -> None:
    go.wait()
    t0 = time.monotonic()
    try:
        r = client.submit(channel_dir, client.start_request("sleeper", [f"--key={key}"]), timeout=300)
    except Exception as e:
        r = {"ok": False, "error": repr(e)}
    out.put((key, bool(r.get("ok")), time.monotonic() - t0, time.monotonic()))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--serial", type=int, default=20, help="requests one at a time")
    ap.add_argument("--burst", type=int, default=100, help="concurrent client processes")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="safespawn-bench-systemd-"))
    b = write_config(root, max_sidecars=args.serial + args.burst + 10)
    m = UserManager.start(root)
    sync_log = root / "sync.log"
    base_label = f"safespawn.bench={b.channel}"
    try:
        m.log_to("safespawn-sync@.service", sync_log)
        m.log_to("safespawn-reconcile.service", root / "reconcile.log")
        m.safespawn("install", "--scope", "user", config=b.config_path)
        wait_until(lambda: count_lines(root / "reconcile.log", f"sync {b.channel}:") >= 1, what="first reconcile")
        chan = str(b.channel_dir())

        def activations() -> int:
            return count_lines(sync_log, f"sync {b.channel}: handled")

        cfg = load_config(str(b.config_path))
        policy = Policy(cfg)
        channel = cfg.channel(b.channel)

        def argv(key: str) -> list[str]:
            spec = policy.authorize_start(channel, Request("0" * 32, "start", "sleeper", None, (f"--key={key}",)))
            # Its own name and label, so that it never mixes with the channel's sidecars.
            a = [x for x in run_argv(spec) if not x.startswith("--label=")]
            a = [f"--name=bench-{b.channel}-{key}" if x.startswith("--name=") else x for x in a]
            a.insert(3, f"--label={base_label}")
            return a

        def baseline() -> tuple[list[float], float]:
            """`podman run -d` alone: serially (each timed), then the burst's count 4 at a time."""
            serial = []
            for i in range(args.serial):
                t1 = time.monotonic()
                subprocess.run(argv(f"p{i}"), check=True, capture_output=True, timeout=120)
                serial.append(time.monotonic() - t1)
            podman_rm(base_label)
            parallel = podman_baseline([argv(f"q{i}") for i in range(args.burst)], 4)
            podman_rm(base_label)
            return serial, parallel

        serial_podman, burst_podman_4 = baseline()

        # 1. serial: new sidecars, then the same ones again (already running: no podman run).
        new, again = [], []
        for i in range(args.serial):
            t0 = time.monotonic()
            r = client.submit(chan, client.start_request("sleeper", [f"--key=s{i}"]), timeout=60)
            new.append(time.monotonic() - t0)
            assert r["ok"], r
        for i in range(args.serial):
            t0 = time.monotonic()
            r = client.submit(chan, client.start_request("sleeper", [f"--key=s{i}"]), timeout=60)
            again.append(time.monotonic() - t0)
            assert r["ok"], r

        # The fixed cost of one activation: the same sync, run by hand with nothing to do.
        idle = []
        for _ in range(args.serial):
            t0 = time.monotonic()
            m.safespawn("sync", b.channel, config=b.config_path)
            idle.append(time.monotonic() - t0)

        # 2. burst.
        wait_until(lambda: m.show(f"safespawn-sync@{b.channel}.service", "ActiveState")["ActiveState"] == "inactive",
                   what="an idle sync service")
        before = activations()
        ctx = multiprocessing.get_context("fork")
        go, out = ctx.Event(), ctx.Queue()
        procs = [ctx.Process(target=_client, args=(chan, f"b{i}", go, out)) for i in range(args.burst)]
        for p in procs:
            p.start()
        t0 = time.monotonic()
        go.set()
        results = [out.get(timeout=600) for _ in procs]
        burst_wall = max(r[3] for r in results) - t0
        for p in procs:
            p.join(timeout=30)
        assert all(ok for _, ok, _, _ in results), [r for r in results if not r[1]][:3]
        burst_lat = [r[2] for r in results]
        wait_until(lambda: m.show(f"safespawn-sync@{b.channel}.service", "ActiveState")["ActiveState"] == "inactive",
                   timeout=60, what="the sync service to finish")
        burst_activations = activations() - before

        # Nothing lost, nothing doubled: one running sidecar per key.
        running = subprocess.run(["podman", "ps", "--filter", f"label=safespawn.channel={b.channel}",
                                  "--format", "{{.Names}}"], check=True, capture_output=True, text=True,
                                 timeout=120).stdout.split()
        assert len(running) == len(set(running)) == args.serial + args.burst, len(running)

        # 3. baseline, after: the same `podman run -d` command lines alone (also run before, above).
        serial_podman2, burst_podman2 = baseline()
        n, s = args.burst, args.serial
        print("\n## Through systemd: `systemd --user`, path unit -> oneshot `safespawn sync --quick --linger` "
              "(sleeper sidecars)\n")
        print("| measure | value |\n|---|---|")
        print(f"| serial, new sidecar (n = {s}): request-to-reply p50 / p95 | "
              f"{pct(new, 50):.2f} s / {pct(new, 95):.2f} s |")
        print(f"| serial, sidecar already running (n = {s}): p50 / p95 | "
              f"{pct(again, 50):.2f} s / {pct(again, 95):.2f} s |")
        print(f"| podman alone: `podman run -d`, same command line (n = {s}): p50 / p95, before / after | "
              f"{pct(serial_podman, 50):.2f} s / {pct(serial_podman, 95):.2f} s; "
              f"{pct(serial_podman2, 50):.2f} s / {pct(serial_podman2, 95):.2f} s |")
        print(f"| burst of {n} concurrent clients: all replied, {n} sidecars running | {burst_wall:.2f} s "
              f"({n / burst_wall:.1f} requests/s) |")
        print(f"| burst: request-to-reply p50 / p95 / max | {pct(burst_lat, 50):.2f} s / {pct(burst_lat, 95):.2f} s / "
              f"{max(burst_lat):.2f} s |")
        print(f"| burst: activations of the sync service | {burst_activations} |")
        print(f"| podman alone: the same {n} `podman run -d`, 4 at a time, before / after | {burst_podman_4:.2f} s "
              f"({n / burst_podman_4:.1f}/s) / {burst_podman2:.2f} s ({n / burst_podman2:.1f}/s) |")
        print(f"| ratio: burst through systemd / mean of podman alone before and after | "
              f"{burst_wall / ((burst_podman_4 + burst_podman2) / 2):.2f}x |")
        print(f"| one `safespawn sync CH` run with nothing to do, by hand (n = {s}): p50 / p95 | "
              f"{pct(idle, 50):.2f} s / {pct(idle, 95):.2f} s |")
        print(f"\nload average at the end: {Path('/proc/loadavg').read_text().split()[:3]}")
    finally:
        m.stop()
        podman_rm(f"safespawn.channel={b.channel}")
        podman_rm(base_label)
    return 0


if __name__ == "__main__":
    sys.exit(main())
