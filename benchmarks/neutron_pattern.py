#!/usr/bin/env python3
"""Neutron's own access pattern, safespawn beside podman alone, in one run.

A Neutron DHCP agent works through its networks `num_sync_threads` (4) at a time: a start per new
network, and after an agent restart a HUP per network (its kill script) to dnsmasq sidecars that
kept running. Most of the time, though, its requests are sporadic: a network created, a port
changed, each long after the last. This benchmark does both with real dnsmasq sidecars, one
`qdhcp-` netns each, and times the direct podman calls for the same command lines in the same run:

    sudo .venv/bin/python benchmarks/neutron_pattern.py --mode sporadic [--fill 60] [--rounds 8] [--gap 4] \
        [--compare-oneshot]
    sudo .venv/bin/python benchmarks/neutron_pattern.py --mode watch   [--n 100] [--client both]
    sudo .venv/bin/python benchmarks/neutron_pattern.py --mode systemd [--n 100] [--client both] [--serial 20]
    sudo .venv/bin/python benchmarks/neutron_pattern.py --mode scale   [--scale 300]

Like with like: the podman side is always a process per call (`podman run -d`, `podman kill
--signal HUP`). The safespawn side is either
- wrapper mode (`--client process`): a process per request, the generated `dnsmasq` wrapper under
  `ip netns exec NS` and the generated `dnsmasq-kill HUP PID`, run by /usr/bin/python3 (an agent
  image's interpreter) without a bytecode cache (the wrapper directory is read-only in the agent);
- the ProcessManager class (`--client inprocess`): `client.submit` from threads of one process, as
  the class sends requests from inside the agent: no process per request, which is its point.
Every table says which.

- sporadic: the installed systemd units in a real `systemd --user` (tests/support/usersystemd.py),
  FILL sidecars running, then ROUNDS starts and ROUNDS HUPs, GAP seconds apart, each a process,
  each followed by the direct podman call; p50/p95 and the ratio of the p50s.
  `--compare-oneshot` measures the same channel again with the oneshot units (`sync_resident =
  false`), for the difference the resident broker makes.
- watch / systemd: N starts of new sidecars, 4 at a time, vs `podman run -d` of the same command
  lines 4 at a time; N HUPs by pid, 4 at a time, vs `podman kill --signal HUP` 4 at a time;
  ratios. `systemd` serves the channel with the installed units; `--sync-args` replaces the sync
  service's command line through a drop-in.
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

from safespawn.agent import client  # noqa: E402
from safespawn.broker.request import Request  # noqa: E402
from safespawn.ops import wrappers  # noqa: E402
from safespawn.runtime.podman import run_argv  # noqa: E402

PARALLEL = 4  # Neutron's num_sync_threads default
AGENT_PYTHON = "/usr/bin/python3"  # an agent image's interpreter (a pyenv shim would add ~50 ms a process)


def timed_pool(fn: Callable[[Any], Any], items: Iterable[Any], parallel: int = PARALLEL) -> float:
    items = list(items)
    t0 = time.monotonic()
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        list(pool.map(fn, items))
    return time.monotonic() - t0


def sh(argv: list[str], timeout: float = 120) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=timeout).stdout


class Bench:
    def __init__(self, root: Path, parallel_starts: int, max_sidecars: int = 1000) -> None:
        self.root = root
        self.namespaces: list[str] = []
        self.b = Broker.make(root, profiles=["dnsmasq"], image=TEST_IMAGE,
                             broker_extra=f"parallel_starts = {parallel_starts}",
                             extra=f"max_sidecars = {max_sidecars}\nmax_requests_per_run = {2 * max_sidecars}")
        self.label = f"safespawn.bench={self.b.channel}"
        # Wrapper mode: the generated wrappers and kill scripts, run as processes by the agent's
        # interpreter, without a bytecode cache (the directory is read-only in the agent).
        self.wrappers = root / "wrappers"
        wrappers.install(str(self.wrappers), self.b.channel, str(self.b.channel_dir()), AGENT_PYTHON)
        self.agent_env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", SAFESPAWN_TIMEOUT="600")

    def wrapper_start(self, ns: str) -> int:
        """`ip netns exec NS DIR/dnsmasq ARGS`, as Neutron's DHCP agent runs it in wrapper mode; the
        sidecar's host pid, from the pid file Neutron reads."""
        argv = self.argv(ns)
        subprocess.run(["ip", "netns", "exec", ns, str(self.wrappers / "dnsmasq"), *argv], check=True,
                       env=self.agent_env, capture_output=True, timeout=600)
        return int((self.b.data_dir / ns / "pid").read_text())

    def kill_script(self, signal: str, pid: int) -> None:
        """`DIR/dnsmasq-kill SIGNAL PID`, as Neutron's reload_cfg() runs it."""
        subprocess.run([str(self.wrappers / "dnsmasq-kill"), signal, str(pid)], check=True, env=self.agent_env,
                       capture_output=True, timeout=600)

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


def side_by_side(bench: Bench, n: int, suffix: str, kind: str = "process") -> dict[str, float]:
    """N starts and N HUPs, 4 at a time, through the channel and through podman directly.

    kind "process" (wrapper mode): each request is a process, the generated `dnsmasq` wrapper under
    `ip netns exec` and the generated `dnsmasq-kill HUP PID`, as the podman side's each call is.
    kind "inprocess" (the ProcessManager class): each request is `client.submit` from a thread of
    this one process, as the class sends them from the agent; its podman side is still a process
    per call, which is what the class saves."""
    nss = bench.netns(n)
    # podman gets slower as containers accumulate, so each side starts its N with none of the
    # other side's around: the baseline runs first and is removed, then safespawn runs; then the
    # baseline runs again (and stays, for the HUPs). Both baseline runs are printed.
    pod_start = timed_pool(lambda ns: sh(bench.podman_argv(ns, suffix)), nss)
    bench.remove_baseline()
    pids: list[int] = []
    if kind == "process":
        ss_start = timed_pool(lambda ns: pids.append(bench.wrapper_start(ns)), nss)
    else:
        ss_start = timed_pool(lambda ns: pids.append(int(bench.submit(bench.start_request(ns))["pid"])), nss)
    pod_start2 = timed_pool(lambda ns: sh(bench.podman_argv(ns, suffix)), nss)
    names = [f"{bench.b.channel}-dnsmasq-{ns}-{suffix}" for ns in nss]
    pod_hup = timed_pool(lambda name: sh(["podman", "kill", "--signal=HUP", name]), names)
    if kind == "process":
        ss_hup = timed_pool(lambda pid: bench.kill_script("HUP", pid), pids)
    else:
        ss_hup = timed_pool(lambda pid: bench.submit(client.signal_request("HUP", pid=pid, profile="dnsmasq")), pids)
    bench.remove_baseline()
    return {"start_safespawn": ss_start, "start_podman": pod_start, "start_podman_after": pod_start2,
            "hup_safespawn": ss_hup, "hup_podman": pod_hup}


KINDS = {"process": "wrapper mode: a process per request (`ip netns exec NS dnsmasq ...`, `dnsmasq-kill HUP PID`)",
         "inprocess": "the ProcessManager class: in-process (`client.submit` from 4 threads of one process)"}


def print_side_by_side(title: str, n: int, r: dict[str, float], kind: str = "process") -> None:
    print(f"\n## {title}; safespawn side: {KINDS[kind]}\n")
    print(f"| operation, {PARALLEL} at a time, N = {n} | safespawn | podman directly (a process per call) | ratio |"
          "\n|---|---|---|---|")
    print(f"| start a new sidecar | {r['start_safespawn']:.2f} s | `podman run -d`: {r['start_podman']:.2f} s "
          f"(run again after safespawn's, with its {n} sidecars around: {r['start_podman_after']:.2f} s) | "
          f"{r['start_safespawn'] / r['start_podman']:.2f}x |")
    print(f"| HUP a running sidecar | {r['hup_safespawn']:.2f} s | `podman kill --signal HUP`: "
          f"{r['hup_podman']:.2f} s | {r['hup_safespawn'] / r['hup_podman']:.2f}x |")
    print(f"\nload average: {load()}")


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3]) + " (2 cores)"


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


def cli_env(bench: Bench) -> dict[str, str]:
    """As the units run `safespawn` on a host: with the installed package's bytecode (a test
    environment's PYTHONDONTWRITEBYTECODE would make each process compile safespawn anew)."""
    env = dict(os.environ, SAFESPAWN_CONFIG=str(bench.b.config_path))
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def timed_cli(bench: Bench, *args: str) -> tuple[float, int]:
    """Wall time and peak RSS (KiB) of one `safespawn ...` process."""
    # stderr into a file, not a pipe: nobody reads a pipe during wait4, and a recovery of 1,000
    # sidecars logs more than a pipe holds (the sync then blocks on its own log line).
    with tempfile.TemporaryFile() as err:
        t0 = time.monotonic()
        p = subprocess.Popen([str(SAFESPAWN), *args], env=cli_env(bench), stdout=subprocess.DEVNULL, stderr=err)
        _, status, ru = os.wait4(p.pid, 0)
        wall = time.monotonic() - t0
        p.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        assert p.returncode == 0, err.read().decode(errors="replace")[-4000:]
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


def kinds(args: argparse.Namespace) -> list[str]:
    return ["process", "inprocess"] if args.client == "both" else [args.client]


def install_units(bench: Bench, m: UserManager, sync_args: str = "") -> None:
    b = bench.b
    m.log_to("safespawn-sync@.service", bench.root / "sync.log")
    if sync_args:
        extra = " ".join(sync_args.split())
        m.drop_in("safespawn-sync@.service", "bench-args",
                  f"[Service]\nExecStart=\nExecStart={SAFESPAWN} sync {extra} %i\n")
    m.safespawn("install", "--scope", "user", config=b.config_path)
    # Only the path unit (and the resident broker) serve: the timer's full pass would land in
    # the middle of a measurement.
    m.systemctl("stop", "safespawn-reconcile.timer")
    wait_until(lambda: m.show(f"safespawn-sync@{b.channel}.path", "ActiveState")["ActiveState"] == "active",
               what="the path unit")


def units_kind(bench: Bench) -> str:
    resident = "sync_resident = false" not in bench.b.config_path.read_text()
    return ("the resident broker (`safespawn watch --quick --channel CH`)" if resident
            else "the oneshot units (`sync_resident = false`: `safespawn sync --quick --linger=2 CH` per activation)")


def systemd_mode(bench: Bench, args: argparse.Namespace) -> None:
    m = UserManager.start(bench.root)
    try:
        install_units(bench, m, args.sync_args)
        how = f"`safespawn sync {args.sync_args} CH`" if args.sync_args else units_kind(bench)
        for kind in kinds(args):
            r = side_by_side(bench, args.n, "sd" + kind[0], kind)
            print_side_by_side(f"Through the systemd units, {how}", args.n, r, kind)
        if args.serial:
            lat = serial_latencies(bench, args.serial)
            print(f"\n| serial, request-to-reply (n = {args.serial}), in-process | p50 | p95 |\n|---|---|---|")
            for key, what in (("start", "start a new sidecar through systemd"),
                              ("podman_run", "`podman run -d` alone"),
                              ("hup", "HUP a running sidecar through systemd"),
                              ("podman_kill", "`podman kill --signal HUP` alone")):
                print(f"| {what} | {pct(lat[key], 50):.3f} s | {pct(lat[key], 95):.3f} s |")
    finally:
        m.stop()


def sporadic(bench: Bench, args: argparse.Namespace) -> None:
    """Neutron's everyday pattern through the installed units: FILL sidecars running, then requests
    GAP seconds apart (longer than any linger), each a process (wrapper mode), each beside the
    direct podman call as a process, in the same run; p50 of each and the ratio."""
    b = bench.b
    m = UserManager.start(bench.root)
    try:
        for resident in ([True, False] if args.compare_oneshot else [True]):
            if not resident:
                # The same channel, its units installed again as oneshots.
                text = b.config_path.read_text().replace("[broker]\n", "[broker]\nsync_resident = false\n", 1)
                b.config_path.write_text(text)
                m.safespawn("install", "--scope", "user", config=b.config_path)
                m.systemctl("stop", f"safespawn-sync@{b.channel}.service")
                m.systemctl("stop", "safespawn-reconcile.timer")
            else:
                install_units(bench, m)
            running = len(json.loads(sh(["podman", "ps", "--format=json", "--filter",
                                         f"label=safespawn.channel={b.channel}"])))
            if running < args.fill:
                nss = bench.netns(args.fill - running)
                timed_pool(lambda ns: bench.submit(bench.start_request(ns)), nss)
            running = len(json.loads(sh(["podman", "ps", "--format=json", "--filter",
                                         f"label=safespawn.channel={b.channel}"])))
            lat: dict[str, list[float]] = {"start": [], "hup": [], "podman_run": [], "podman_kill": []}
            loads = []
            main_pid = int(m.show(f"safespawn-sync@{b.channel}.service", "MainPID")["MainPID"])
            cpu0, t_cpu0 = cpu_seconds(main_pid), time.monotonic()
            spans: dict[str, list[tuple[float, float]]] = {"start": [], "hup": []}

            def timed(key: str, fn: Callable[[], Any], lat: dict[str, list[float]] = lat,
                      spans: dict[str, list[tuple[float, float]]] = spans) -> Any:
                # Every call, safespawn's and podman's alike, comes GAP seconds after the last one.
                time.sleep(args.gap)
                w0, t0 = time.time(), time.monotonic()
                out = fn()
                lat[key].append(time.monotonic() - t0)
                if key in spans:
                    spans[key].append((w0, time.time()))
                return out

            for i, ns in enumerate(bench.netns(args.rounds)):
                name = f"{b.channel}-dnsmasq-{ns}-sp"
                # Which side goes first alternates, so that neither always meets a cold cache.
                if i % 2:
                    timed("podman_run", lambda ns=ns: sh(bench.podman_argv(ns, "sp")))
                pid = timed("start", lambda ns=ns: bench.wrapper_start(ns))
                if not i % 2:
                    timed("podman_run", lambda ns=ns: sh(bench.podman_argv(ns, "sp")))
                    timed("podman_kill", lambda name=name: sh(["podman", "kill", "--signal=HUP", name]))
                timed("hup", lambda pid=pid: bench.kill_script("HUP", pid))
                if i % 2:
                    timed("podman_kill", lambda name=name: sh(["podman", "kill", "--signal=HUP", name]))
                loads.append(os.getloadavg()[0])
            cpu = (cpu_seconds(main_pid) - cpu0) / (time.monotonic() - t_cpu0) if main_pid else 0.0
            rss = vm_hwm(main_pid) if main_pid else 0
            bench.remove_baseline()
            inv = m.show(f"safespawn-sync@{b.channel}.service", "NRestarts", "MainPID")
            print(f"\n## Sporadic requests through {units_kind(bench)}\n")
            print(f"{running} sidecars running, {args.rounds} rounds, {args.gap:g} s between requests; each "
                  "safespawn request a process (wrapper mode: `ip netns exec NS dnsmasq ...`, `dnsmasq-kill HUP "
                  "PID`), each podman call a process; broker after the run: "
                  f"{inv}\n")
            print("| request | safespawn p50 (p95) | podman p50 (p95) | ratio of p50s |\n|---|---|---|---|")
            for key, pod, what, cmd in (("start", "podman_run", "start a new sidecar", "`podman run -d`"),
                                        ("hup", "podman_kill", "HUP a running one", "`podman kill --signal HUP`")):
                print(f"| {what} | {pct(lat[key], 50) * 1000:.0f} ms ({pct(lat[key], 95) * 1000:.0f}) | {cmd} "
                      f"{pct(lat[pod], 50) * 1000:.0f} ms ({pct(lat[pod], 95) * 1000:.0f}) | "
                      f"**{pct(lat[key], 50) / pct(lat[pod], 50):.2f}x** |")
            print(f"\nload average (1 min) during the rounds: {min(loads):.2f}-{max(loads):.2f}; at the end {load()}")
            print_segments(bench, spans)
            from safespawn.broker.watch import runs_as_recorded

            checks = []
            for _ in range(50):
                t0 = time.monotonic()
                runs_as_recorded(b.engine, b.channel)
                checks.append(time.monotonic() - t0)
            print(f"\nthe once-a-second check (through /proc, {running} sidecars), in this process: p50 "
                  f"{pct(checks, 50) * 1000:.2f} ms ({pct(checks, 50) / running * 1e6:.0f} us a sidecar)")
            if main_pid:
                print(f"\nthe resident broker over the rounds (requests {args.gap:g} s apart, {running} sidecars, "
                      f"the once-a-second check included): CPU {cpu * 100:.2f}% of one core; peak RSS "
                      f"{rss / 1024:.1f} MiB")
    finally:
        m.stop()


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, in seconds (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def vm_hwm(pid: int) -> int:
    """Peak RSS of a process, KiB."""
    try:
        return int(Path(f"/proc/{pid}/status").read_text().split("VmHWM:")[1].split()[0])
    except (OSError, IndexError):
        return 0


def print_segments(bench: Bench, spans: dict[str, list[tuple[float, float]]]) -> None:
    """Where a wrapper-mode request's time goes, from the broker's ledger (its claim and its
    durable reply carry wall-clock times): process start to claim (interpreter, imports, the
    request written, the broker's pick-up), claim to reply (the broker's work: for a start the
    `podman run` and the program's start-up), reply to exit (the client sees it, the process ends)."""
    ledger = bench.b.root / "state" / bench.b.channel / "ledger.jsonl"
    entries = [json.loads(line) for line in ledger.read_text().splitlines() if line.strip()]
    claimed = {e["id"]: e["t"] for e in entries if e["s"] == "claimed"}
    done = {e["id"]: e["t"] for e in entries if e["s"] == "done"}
    print("\n| where the time goes, p50 | process start -> claimed | claimed -> reply durable | reply -> exit |"
          "\n|---|---|---|---|")
    for key, what in (("start", "start (wrapper)"), ("hup", "HUP (kill script)")):
        a, b_, c = [], [], []
        for w0, w1 in spans[key]:
            ids = [i for i, t in claimed.items() if w0 <= t <= w1 and i in done]
            if len(ids) != 1:
                continue
            a.append(claimed[ids[0]] - w0)
            b_.append(done[ids[0]] - claimed[ids[0]])
            c.append(w1 - done[ids[0]])
        if a:
            print(f"| {what} (n = {len(a)}) | {pct(a, 50) * 1000:.0f} ms | {pct(b_, 50) * 1000:.0f} ms | "
                  f"{pct(c, 50) * 1000:.0f} ms |")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["watch", "systemd", "scale", "sporadic"], default="watch")
    ap.add_argument("--n", type=int, default=100, help="starts and HUPs, 4 at a time")
    ap.add_argument("--client", choices=["process", "inprocess", "both"], default="both",
                    help="watch/systemd: the safespawn side as a process per request (wrapper mode), in-process "
                    "(the ProcessManager class), or both, one after the other")
    ap.add_argument("--serial", type=int, default=0, help="systemd/scale: requests one at a time, for latencies")
    ap.add_argument("--scale", type=int, default=300, help="sidecars for the scale and recovery run")
    ap.add_argument("--sync-args", default="", help="systemd mode: arguments of the sync service")
    ap.add_argument("--fill", type=int, default=60, help="sporadic: sidecars running before the rounds")
    ap.add_argument("--rounds", type=int, default=8, help="sporadic: requests of each kind")
    ap.add_argument("--gap", type=float, default=4.0, help="sporadic: seconds between requests")
    ap.add_argument("--compare-oneshot", action="store_true",
                    help="sporadic: then the same with the oneshot units (sync_resident = false)")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="safespawn-bench-np-"))
    # Room for the scale run's sidecars and the request sent during its recovery.
    bench = Bench(root, PARALLEL, max_sidecars=max(1000, args.scale + 8))
    try:
        print(f"load average at the start: {load()}")
        if args.mode == "watch":
            bench.b.start_watch()
            time.sleep(0.5)
            for kind in kinds(args):
                r = side_by_side(bench, args.n, "w" + kind[0], kind)
                print_side_by_side("Through `safespawn watch`", args.n, r, kind)
        elif args.mode == "systemd":
            systemd_mode(bench, args)
        elif args.mode == "sporadic":
            sporadic(bench, args)
        else:
            scale(bench, args.scale, args.serial or 20)
        print(f"\nload average at the end: {load()}; "
              f"benchmark process peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    finally:
        bench.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
