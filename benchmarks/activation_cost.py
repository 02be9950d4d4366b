#!/usr/bin/env python3
"""What a fresh activation of the sync service costs with many sidecars running, and what the
service's cgroup holds after a run.

A real `systemd --user` manager (scripts/user-systemd) with `safespawn install --scope user`;
`--sidecars N` sleeper sidecars are started through the path unit (the way an agent asks), then:
- `left in the service's cgroup`: the processes in the unit's cgroup once its run has ended
  (what systemd finds there at the next start: one "left-over process" each);
- `systemctl start` of the sync service with nothing to do, `--n` times (the oneshot's wall
  time: systemd's start of the unit, a Python start, a quick sync that lists nothing);
- a start request for a sidecar that already runs (answered from the broker's record: no podman
  call), each sent after the previous activation ended (`--n` times): request-to-reply as an agent
  sees it, i.e. the activation plus the smallest request.
`sync_linger` is 0 here, so that every request is a fresh activation.

    .venv/bin/python benchmarks/activation_cost.py --sidecars 80 --n 10
    # before: the same against another tree's code, through a wrapper the units run, e.g.
    git -C /work/main archive HEAD src | tar -x -C /tmp/ss-before
    printf '#!/bin/sh\\nPYTHONPATH=/tmp/ss-before/src exec %s -m safespawn.cli "$@"\\n' "$PWD/.venv/bin/python" \\
        > /tmp/ss-before/safespawn && chmod +x /tmp/ss-before/safespawn
    .venv/bin/python benchmarks/activation_cost.py --sidecars 80 --n 10 --executable /tmp/ss-before/safespawn

Root, podman and the test image (scripts/build-test-image). Cleans up after itself.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import pct  # noqa: E402
from support.usersystemd import UserManager, wait_until, write_config  # noqa: E402

from safespawn.agent import client  # noqa: E402
from safespawn.runtime.conmon import tracking_mounts  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sidecars", type=int, default=80, help="sidecars running during the measurement")
    ap.add_argument("--n", type=int, default=10, help="activations measured (each kind)")
    ap.add_argument("--executable", help="the safespawn the units run (default: this tree's)")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="safespawn-bench-activation-"))
    b = write_config(root, max_sidecars=args.sidecars + 10, sync_linger=0)
    m = UserManager.start(root)
    service = f"safespawn-sync@{b.channel}.service"
    try:
        m.log_to("safespawn-sync@.service", root / "sync.log")
        m.safespawn("install", "--scope", "user", *(["--executable", args.executable] if args.executable else []),
                    config=b.config_path)
        m.systemctl("stop", "safespawn-reconcile.timer")
        chan = str(b.channel_dir())

        def start(i: int) -> dict:
            return client.submit(chan, client.start_request("sleeper", [f"--key=k{i}"]), timeout=300)

        t_fill = time.monotonic()
        with ThreadPoolExecutor(8) as pool:
            replies = list(pool.map(start, range(args.sidecars)))
        fill = time.monotonic() - t_fill
        assert all(r["ok"] for r in replies), [r for r in replies if not r["ok"]][:3]

        def idle() -> bool:
            return m.show(service, "ActiveState")["ActiveState"] in ("inactive", "failed")

        wait_until(idle, timeout=120, what="the sync service to end")
        # The unit's cgroup under the manager's tree (gone when the run left nothing behind).
        left = 0
        for mount in tracking_mounts().values():
            for procs in Path(mount).glob(f"**/{service}/cgroup.procs"):
                left = max(left, len(procs.read_text().split()))
            break

        starts = []
        for _ in range(args.n):
            wait_until(idle, timeout=60)
            t0 = time.monotonic()
            m.systemctl("start", service)
            starts.append(time.monotonic() - t0)

        again = []
        for _ in range(args.n):
            wait_until(idle, timeout=60)
            time.sleep(0.2)
            t0 = time.monotonic()
            r = start(0)  # runs already: answered from the record, nothing for podman to do
            again.append(time.monotonic() - t0)
            assert r["ok"] and r["pid"] == replies[0]["pid"], r

        print(f"sidecars running: {args.sidecars} (code: {args.executable or 'this tree'})")
        print(f"| starting them through the units, 8 clients at a time | {fill:.2f} s |")
        print(f"| left in the service's cgroup after a run | {left} |")
        print(f"| `systemctl start` of the idle sync service, p50 / p95 (n = {args.n}) | "
              f"{pct(starts, 50):.3f} s / {pct(starts, 95):.3f} s |")
        print(f"| a start of a running sidecar, a fresh activation each, request-to-reply, p50 / p95 "
              f"(n = {args.n}) | {pct(again, 50):.3f} s / {pct(again, 95):.3f} s |")
        return 0
    finally:
        m.stop()
        b.cleanup()


if __name__ == "__main__":
    sys.exit(main())
