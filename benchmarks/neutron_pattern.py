#!/usr/bin/env python3
"""Neutron's own access pattern, safespawn beside podman alone, in one run.

A Neutron DHCP agent works through its networks `num_sync_threads` (4) at a time: a start per new
network, and after an agent restart a HUP per network (its kill script) to dnsmasq sidecars that
kept running. This benchmark does exactly that with real dnsmasq sidecars, one `qdhcp-` netns each,
and times the direct podman calls for the same command lines in the same run:

    sudo .venv/bin/python benchmarks/neutron_pattern.py --mode watch   [--n 100]
    sudo .venv/bin/python benchmarks/neutron_pattern.py --mode systemd [--n 100] [--serial 20] \\
        [--sync-args "--quick --linger=2"]
    sudo .venv/bin/python benchmarks/neutron_pattern.py --mode scale   [--scale 300]

- watch / systemd: N starts of new sidecars, 4 at a time, vs `podman run -d` of the same command
  lines 4 at a time; N HUPs by pid (what the kill script sends), 4 at a time, vs `podman kill
  --signal HUP` 4 at a time; ratios. `systemd` serves the channel with the real units in a real
  `systemd --user` (tests/support/usersystemd.py) and also measures serial request-to-reply p50 of a
  start and of a HUP; `--sync-args` replaces the sync service's arguments through a drop-in
  (e.g. `--quick --linger=2`), so the default units and a tuned one can be compared.
- scale: SCALE sidecars running through `watch`: idle `safespawn sync` time (a process, as the
  path unit runs it; --quick and full), HUP latency with 1 and with SCALE sidecars, the broker's peak
  RSS, memory per sidecar (conmon + dnsmasq, RSS and PSS); then reboot recovery: every container
  removed, one `safespawn sync CH` brings them back, vs a 4-way parallel `podman run -d` of the same
  SCALE command lines, and the latency of a request that arrives during the recovery.

Root, podman and the test image (scripts/build-test-image) are needed. Cleans up after itself.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "benchmarks"))

from burst import pct  # noqa: E402
from support.broker import TEST_IMAGE, Broker  # noqa: E402
from support.usersystemd import SAFESPAWN, UserManager, wait_until  # noqa: E402

from safespawn import client  # noqa: E402
from safespawn.request import Request  # noqa: E402
from safespawn.runtime.podman import run_argv  # noqa: E402

PARALLEL = 4  # Neutron's num_sync_threads default


def timed_pool(fn: Callable[[Any], Any], items: Iterable[Any], parallel: int = PARALLEL) -> float:
    items = list(items)
    t0 = time.monotonic()
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        list(pool.map(fn, items))
    return time.monotonic() - t0


def sh(argv: list[str], timeout: float = 120) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=timeout).stdout


class Bench:
    def __init__(self, root: Path, parallel_starts: int) -> None:
        self.root = root
        self.namespaces: list[str] = []
        self.b = Broker.make(root, profiles=["dnsmasq"], image=TEST_IMAGE,
                             broker_extra=f"parallel_starts = {parallel_starts}",
                             extra="max_sidecars = 1000\nmax_requests_per_run = 2000")
        self.label = f"safespawn.bench={self.b.channel}"

    def netns(self, n: int) -> list[str]:
        new = [f"qdhcp-{uuid.uuid4()}" for _ in range(n)]
        for ns in new:
            sh(["ip", "netns", "add", ns])
        self.namespaces += new
        return new

    def argv(self, ns: str) -> list[str]:
        d = self.b.data_dir / ns
        d.mkdir(exist_ok=True)
        return ["--no-hosts", "--no-resolv", f"--pid-file={d}/pid", f"--dhcp-leasefile={d}/leases",
                "--interface=lo", "--bind-dynamic", "--conf-file=/dev/null"]

    def start_request(self, ns: str) -> dict[str, Any]:
        return client.start_request("dnsmasq", self.argv(ns), netns=ns)

    def podman_argv(self, ns: str, suffix: str) -> list[str]:
        """The very command line safespawn runs for this netns, with its own name and label."""
        ch = self.b.engine.config.channel(self.b.channel)
        spec = self.b.engine.policy.authorize_start(ch, Request("0" * 32, "start", "dnsmasq", ns, tuple(self.argv(ns))))
        cmd = [a if not a.startswith("--name=") else f"{a}-{suffix}" for a in run_argv(spec)]
        cmd = [a for a in cmd if not a.startswith("--label=safespawn.channel")]
        cmd.insert(2, f"--label={self.label}")
        return cmd

    def submit(self, req: dict[str, Any]) -> dict[str, Any]:
        r = client.submit(str(self.b.channel_dir()), req, timeout=600)
        assert r["ok"], r
        return r

    def remove_baseline(self) -> None:
        ids = sh(["podman", "ps", "-aq", "--filter", f"label={self.label}"]).split()
        if ids:
            subprocess.run(["podman", "rm", "-f", "-t", "0", *ids], capture_output=True, timeout=600, check=False)

    def cleanup(self) -> None:
        self.remove_baseline()
        self.b.cleanup()
        for ns in self.namespaces:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)


def side_by_side(bench: Bench, n: int, suffix: str) -> dict[str, float]:
    """N starts and N HUPs, 4 at a time, through the channel and through podman directly."""
    nss = bench.netns(n)
    # podman gets slower as containers accumulate, so each side starts its N with none of the
    # other side's around: the baseline runs first and is removed, then safespawn runs; then the
    # baseline runs again (and stays, for the HUPs). Both baseline runs are printed.
    pod_start = timed_pool(lambda ns: sh(bench.podman_argv(ns, suffix)), nss)
    bench.remove_baseline()
    replies: list[dict[str, Any]] = []
    ss_start = timed_pool(lambda ns: replies.append(bench.submit(bench.start_request(ns))), nss)
    pod_start2 = timed_pool(lambda ns: sh(bench.podman_argv(ns, suffix)), nss)
    names = [f"{bench.b.channel}-dnsmasq-{ns}-{suffix}" for ns in nss]
    pod_hup = timed_pool(lambda name: sh(["podman", "kill", "--signal=HUP", name]), names)
    pids = [int(r["pid"]) for r in replies]
    ss_hup = timed_pool(lambda pid: bench.submit(client.signal_request("HUP", pid=pid, profile="dnsmasq")), pids)
    return {"start_safespawn": ss_start, "start_podman": pod_start, "start_podman_after": pod_start2,
            "hup_safespawn": ss_hup, "hup_podman": pod_hup}


def print_side_by_side(title: str, n: int, r: dict[str, float]) -> None:
    print(f"\n## {title}\n")
    print(f"| operation, {PARALLEL} at a time, N = {n} | safespawn | podman directly | ratio |\n|---|---|---|---|")
    print(f"| start a new sidecar | {r['start_safespawn']:.2f} s | `podman run -d`: {r['start_podman']:.2f} s "
          f"(run again after safespawn's, with its {n} sidecars around: {r['start_podman_after']:.2f} s) | "
          f"{r['start_safespawn'] / r['start_podman']:.2f}x |")
    print(f"| HUP a running sidecar | {r['hup_safespawn']:.2f} s | `podman kill --signal HUP`: "
          f"{r['hup_podman']:.2f} s | {r['hup_safespawn'] / r['hup_podman']:.2f}x |")


def serial_latencies(bench: Bench, n: int) -> dict[str, list[float]]:
    nss = bench.netns(n)
    out: dict[str, list[float]] = {"start": [], "hup": [], "podman_run": [], "podman_kill": []}
    pids = []
    for ns in nss:
        t0 = time.monotonic()
        sh(bench.podman_argv(ns, "serial"))
        out["podman_run"].append(time.monotonic() - t0)
        t0 = time.monotonic()
        pids.append(bench.submit(bench.start_request(ns))["pid"])
        out["start"].append(time.monotonic() - t0)
    for ns, pid in zip(nss, pids, strict=True):
        t0 = time.monotonic()
        sh(["podman", "kill", "--signal=HUP", f"{bench.b.channel}-dnsmasq-{ns}-serial"])
        out["podman_kill"].append(time.monotonic() - t0)
        t0 = time.monotonic()
        bench.submit(client.signal_request("HUP", pid=pid, profile="dnsmasq"))
        out["hup"].append(time.monotonic() - t0)
    return out


def cold_latencies(bench: Bench, n: int, pause: float) -> dict[str, list[float]]:
    """One request at a time with `pause` seconds between (longer than the sync's linger): each is
    served by a fresh activation of the sync service, a Python start included."""
    nss = bench.netns(n)
    out: dict[str, list[float]] = {"start": [], "hup": []}
    for ns in nss:
        time.sleep(pause)
        t0 = time.monotonic()
        pid = bench.submit(bench.start_request(ns))["pid"]
        out["start"].append(time.monotonic() - t0)
        time.sleep(pause)
        t0 = time.monotonic()
        bench.submit(client.signal_request("HUP", pid=pid, profile="dnsmasq"))
        out["hup"].append(time.monotonic() - t0)
    return out


def cli_env(bench: Bench) -> dict[str, str]:
    """As the units run `safespawn` on a host: with the installed package's bytecode (a test
    environment's PYTHONDONTWRITEBYTECODE would make each process compile safespawn anew)."""
    env = dict(os.environ, SAFESPAWN_CONFIG=str(bench.b.config_path))
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def timed_cli(bench: Bench, *args: str) -> tuple[float, int]:
    """Wall time and peak RSS (KiB) of one `safespawn ...` process."""
    t0 = time.monotonic()
    p = subprocess.Popen([str(SAFESPAWN), *args], env=cli_env(bench), stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE)
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.monotonic() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    err = p.stderr.read().decode() if p.stderr else ""
    assert p.returncode == 0, err
    return wall, ru.ru_maxrss


def memory_of(pids: list[int]) -> tuple[float, float]:
    """Summed RSS and PSS (MiB) of these processes."""
    rss = pss = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Rss:"):
                    rss += int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss += int(line.split()[1])
        except OSError:
            pass
    return rss / 1024, pss / 1024


def scale(bench: Bench, count: int, serial: int) -> None:
    b = bench.b
    b.start_watch()
    time.sleep(0.5)
    one = bench.netns(1)
    pid1 = bench.submit(bench.start_request(one[0]))["pid"]

    def hup_latency(pid: int) -> list[float]:
        lat = []
        for _ in range(serial):
            t0 = time.monotonic()
            bench.submit(client.signal_request("HUP", pid=pid, profile="dnsmasq"))
            lat.append(time.monotonic() - t0)
        return lat

    hup_one = hup_latency(pid1)
    nss = bench.netns(count - 1)
    t0 = time.monotonic()
    timed_pool(lambda ns: bench.submit(bench.start_request(ns)), nss, parallel=16)
    fill = time.monotonic() - t0
    hup_many = hup_latency(pid1)
    watch_pid = b._watch.pid if b._watch else 0
    watch_rss = int(Path(f"/proc/{watch_pid}/status").read_text().split("VmHWM:")[1].split()[0])
    b.stop_watch()

    idle_quick = [timed_cli(bench, "sync", "--quick", b.channel) for _ in range(serial)]
    idle_full = [timed_cli(bench, "sync", b.channel) for _ in range(max(3, serial // 4))]
    rows = json.loads(sh(["podman", "ps", "--format=json", "--filter", f"label=safespawn.channel={b.channel}"]))
    assert len(rows) == count, len(rows)
    inspected = json.loads(sh(["podman", "container", "inspect", "--format=json", *[r["Id"] for r in rows]],
                              timeout=300))
    progs = [int(c["State"]["Pid"]) for c in inspected]
    conmons = [int(c["State"]["ConmonPid"]) for c in inspected]
    rss_p, pss_p = memory_of(progs)
    rss_c, pss_c = memory_of(conmons)

    # Reboot recovery: every container gone, one sync brings them back.
    ids = [r["Id"] for r in rows]
    subprocess.run(["podman", "rm", "-f", "-t", "0", *ids], capture_output=True, timeout=900, check=True)
    late_ns = bench.netns(1)[0]
    late: dict[str, float] = {}

    def late_request() -> None:
        time.sleep(1.0)
        t1 = time.monotonic()
        bench.submit(bench.start_request(late_ns))
        late["latency"] = time.monotonic() - t1

    th = threading.Thread(target=late_request)
    th.start()
    recovery, recovery_rss = timed_cli(bench, "sync", b.channel)
    th.join(timeout=600)
    if "latency" not in late:  # not served during the recovery: a later sync serves it
        timed_cli(bench, "sync", b.channel)
        th.join(timeout=60)
    running = len(json.loads(sh(["podman", "ps", "--format=json", "--filter",
                                 f"label=safespawn.channel={b.channel}"])))
    all_ns = [one[0], *nss]
    pod_recovery = timed_pool(lambda ns: sh(bench.podman_argv(ns, "rec")), all_ns)
    bench.remove_baseline()

    print(f"\n## Scale: {count} dnsmasq sidecars in one channel\n")
    print("| measure | value |\n|---|---|")
    print(f"| filling the channel through `watch` ({count - 1} starts, 16 clients at a time) | {fill:.1f} s |")
    print(f"| `safespawn sync --quick CH`, nothing to do (process wall time, n = {serial}): p50 / p95 | "
          f"{pct([w for w, _ in idle_quick], 50):.3f} s / {pct([w for w, _ in idle_quick], 95):.3f} s |")
    print(f"| `safespawn sync CH` (full), nothing to do (n = {len(idle_full)}): p50 | "
          f"{pct([w for w, _ in idle_full], 50):.3f} s |")
    print(f"| HUP latency through `watch`, serial (n = {serial}), 1 sidecar: p50 / p95 | "
          f"{pct(hup_one, 50):.3f} s / {pct(hup_one, 95):.3f} s |")
    print(f"| HUP latency through `watch`, serial (n = {serial}), {count} sidecars: p50 / p95 | "
          f"{pct(hup_many, 50):.3f} s / {pct(hup_many, 95):.3f} s |")
    print(f"| broker peak RSS: `watch` after {count} sidecars / one idle sync / the recovery sync | "
          f"{watch_rss / 1024:.1f} MiB / {max(r for _, r in idle_quick) / 1024:.1f} MiB / "
          f"{recovery_rss / 1024:.1f} MiB |")
    print(f"| memory per sidecar, RSS: conmon + dnsmasq | {rss_c / count:.2f} + {rss_p / count:.2f} MiB |")
    print(f"| memory per sidecar, PSS (shared pages split): conmon + dnsmasq | {pss_c / count:.2f} + "
          f"{pss_p / count:.2f} MiB |")
    print(f"| reboot recovery: all {count} removed, one `safespawn sync CH` | {recovery:.1f} s "
          f"({running} running after) |")
    print(f"| the same {count} `podman run -d`, {PARALLEL} at a time | {pod_recovery:.1f} s |")
    print(f"| ratio | {recovery / pod_recovery:.2f}x |")
    print(f"| a start request sent 1 s into the recovery: request-to-reply | "
          f"{late.get('latency', float('nan')):.2f} s |")


def systemd_mode(bench: Bench, args: argparse.Namespace) -> None:
    b = bench.b
    m = UserManager.start(bench.root)
    try:
        m.log_to("safespawn-sync@.service", bench.root / "sync.log")
        if args.sync_args:
            extra = " ".join(args.sync_args.split())
            m.drop_in("safespawn-sync@.service", "bench-args",
                      f"[Service]\nExecStart=\nExecStart={SAFESPAWN} sync {extra} %i\n")
        m.safespawn("install", "--scope", "user", config=b.config_path)
        wait_until(lambda: m.show(f"safespawn-sync@{b.channel}.path", "ActiveState")["ActiveState"] == "active",
                   what="the path unit")
        r = side_by_side(bench, args.n, "sd")
        lat = serial_latencies(bench, args.serial)
        cold = cold_latencies(bench, args.cold, 3.0) if args.cold else {}
        how = f"`safespawn sync {args.sync_args} CH`" if args.sync_args else \
            "the installed units (`safespawn sync --quick --linger=2 CH`)"
        print_side_by_side(f"Through the systemd units, {how}", args.n, r)
        print(f"\n| serial, request-to-reply (n = {args.serial}) | p50 | p95 |\n|---|---|---|")
        for key, what in (("start", "start a new sidecar through systemd"), ("podman_run", "`podman run -d` alone"),
                          ("hup", "HUP a running sidecar through systemd"),
                          ("podman_kill", "`podman kill --signal HUP` alone")):
            print(f"| {what} | {pct(lat[key], 50):.3f} s | {pct(lat[key], 95):.3f} s |")
        for key, what in (("start", "start, 3 s after the last request (a fresh activation)"),
                          ("hup", "HUP, 3 s after the last request (a fresh activation)")):
            if cold:
                print(f"| {what}, n = {args.cold} | {pct(cold[key], 50):.3f} s | {pct(cold[key], 95):.3f} s |")
    finally:
        m.stop()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["watch", "systemd", "scale"], default="watch")
    ap.add_argument("--n", type=int, default=100, help="starts and HUPs, 4 at a time")
    ap.add_argument("--serial", type=int, default=20, help="requests one at a time, for latencies")
    ap.add_argument("--scale", type=int, default=300, help="sidecars for the scale and recovery run")
    ap.add_argument("--cold", type=int, default=5,
                    help="systemd mode: requests 3 s apart (each a fresh activation), for latencies")
    ap.add_argument("--sync-args", default="", help="systemd mode: arguments of the sync service")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="safespawn-bench-np-"))
    bench = Bench(root, PARALLEL)
    try:
        if args.mode == "watch":
            bench.b.start_watch()
            time.sleep(0.5)
            r = side_by_side(bench, args.n, "w")
            print_side_by_side("Through `safespawn watch`", args.n, r)
        elif args.mode == "systemd":
            systemd_mode(bench, args)
        else:
            scale(bench, args.scale, args.serial)
        load = Path("/proc/loadavg").read_text().split()[:3]
        print(f"\nload average at the end: {' '.join(load)} (2 cores); "
              f"benchmark process peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    finally:
        bench.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
