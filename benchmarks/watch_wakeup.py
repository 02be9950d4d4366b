#!/usr/bin/env python3
"""`safespawn watch` on inotify events vs polling: how soon a request is picked up, and what the
watcher costs while nothing happens.

Two watchers in turn over the same kind of channel (real podman, a config file, nothing laid out
beforehand: `watch` lays the channel out): one on inotify events (the default), one with `--poll`
at the default 50 ms interval. For each:
- wake-up latency: N requests one at a time, each a malformed request answered `bad_request`
  without any podman call before the reply, so the time from the request's rename into inbox/new to
  its reply is the watcher's pick-up plus one read, one ledger fsync and the reply write;
- idle CPU: user+system seconds the watcher process uses in T seconds with no request.
As the floor of a sync, the same run also times `podman ps` alone (what every sync does once).

    .venv/bin/python benchmarks/watch_wakeup.py [--n 40] [--idle 10]      (as root)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import pct  # noqa: E402
from support.broker import TEST_IMAGE, Broker  # noqa: E402

from safespawn.agent import client  # noqa: E402


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(mode: str, n: int, idle: float) -> dict[str, float]:
    b = Broker.make(Path(tempfile.mkdtemp(prefix=f"safespawn-bench-watch-{mode}-")), image=TEST_IMAGE,
                    lay_out=False)
    try:
        env = dict(os.environ, SAFESPAWN_CONFIG=str(b.config_path))
        argv = [sys.executable, "-m", "safespawn.cli", "watch", "--reconcile-interval", "3600"]
        proc = subprocess.Popen(argv + (["--poll"] if mode == "poll" else []), env=env, stdout=subprocess.DEVNULL,
                                stderr=open(b.root / "watch.log", "ab"))  # noqa: SIM115 (open while it runs)
        b._watch = proc
        replies = b.channel_dir() / "outbox" / "replies"
        t0 = time.monotonic()
        while not replies.is_dir():
            if time.monotonic() - t0 > 60:
                raise SystemExit(f"{mode}: the watcher did not lay out the channel")
            time.sleep(0.01)
        time.sleep(3)  # its first full sync is over
        c0 = cpu_seconds(proc.pid)
        time.sleep(idle)
        idle_cpu = cpu_seconds(proc.pid) - c0
        lat = []
        for _ in range(n):
            rid = client.new_id()
            tmp = b.channel_dir() / "inbox" / "tmp" / f"{rid}.json"
            tmp.write_text(json.dumps({"v": 1, "id": rid, "op": "no-such-op"}))
            reply = replies / f"{rid}.json"
            t = time.monotonic()
            os.rename(tmp, b.channel_dir() / "inbox" / "new" / f"{rid}.json")
            while not reply.exists():
                time.sleep(0.0005)
            lat.append(time.monotonic() - t)
            time.sleep(1.5)  # the sync's reconcile and status (one podman ps) are over before the next
        return {"p50_ms": pct(lat, 50) * 1000, "p95_ms": pct(lat, 95) * 1000, "idle_cpu_s": idle_cpu,
                "idle_s": idle}
    finally:
        b.cleanup()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--idle", type=float, default=10.0)
    args = ap.parse_args()
    ino = measure("inotify", args.n, args.idle)
    poll = measure("poll", args.n, args.idle)
    ps = []
    for _ in range(5):
        t = time.monotonic()
        subprocess.run(["podman", "ps", "--all", "--format=json", "--filter=label=safespawn.channel=none"],
                       capture_output=True, check=True, timeout=120)
        ps.append(time.monotonic() - t)
    print("| | inotify (default) | --poll (50 ms) | ratio poll/inotify |\n|---|---|---|---|")
    print(f"| request picked up and answered, p50 | {ino['p50_ms']:.1f} ms | {poll['p50_ms']:.1f} ms | "
          f"{poll['p50_ms'] / ino['p50_ms']:.1f} |")
    print(f"| same, p95 | {ino['p95_ms']:.1f} ms | {poll['p95_ms']:.1f} ms | {poll['p95_ms'] / ino['p95_ms']:.1f} |")
    print(f"| CPU while idle for {args.idle:.0f} s | {ino['idle_cpu_s']:.2f} s | {poll['idle_cpu_s']:.2f} s | "
          f"{poll['idle_cpu_s'] / max(ino['idle_cpu_s'], 0.01):.1f} (inotify floored at 0.01 s) |")
    print(f"\nfor scale, one `podman ps` alone (every sync lists once): p50 {pct(ps, 50) * 1000:.0f} ms "
          f"over {len(ps)} runs; n = {args.n} requests per mode")
    return 0


if __name__ == "__main__":
    sys.exit(main())
