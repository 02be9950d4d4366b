"""Wrapper mode on a real systemd host: what Neutron's DHCP agent does, through the generated wrappers.

`ip netns exec qdhcp-... dnsmasq ARGS` with the wrapper folder first on PATH (the command line
Neutron's Dnsmasq driver builds), served by the installed units alone (path unit -> oneshot sync);
a real DHCP lease from another netns (busybox udhcpc); `dnsmasq-kill HUP PID` with a new static host
leased afterwards; `kill -9` of the sidecar's program (podman's restart policy brings it back, and
the pid file Neutron reads must name the new pid within 2 s); `dnsmasq-kill 9 PID`.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from conftest import CHANNELS_DIR, VMTEST, WRAPPERS_DIR, Host, cmdline, containers, read_pid, sh, unit_log, wait_until
from support import netlab
from support.netlab import NetnsPair, dhcp_lease

CH = "vm-dhcp"
DATA = VMTEST / "dhcp"
WRAPPERS = WRAPPERS_DIR / CH


def dnsmasq_argv(pair: NetnsPair, net_id: str) -> list[str]:
    """A command line shaped like Neutron's Dnsmasq driver's; the client's MAC gets .50."""
    net = DATA / net_id
    net.mkdir(parents=True, exist_ok=True)
    net.chmod(0o755)
    for f in ("host", "addn_hosts", "opts", "leases"):
        (net / f).touch()
    (net / "host").write_text(f"{netlab.get_mac(pair.client_ns, pair.client_if)},host-50,{pair.host(50)}\n")
    return [
        "--no-hosts", "--no-resolv", f"--pid-file={net}/pid", f"--dhcp-hostsfile={net}/host",
        f"--addn-hosts={net}/addn_hosts", f"--dhcp-optsfile={net}/opts", f"--dhcp-leasefile={net}/leases",
        "--local-service", "--bind-dynamic",
        f"--dhcp-range=set:subnet-{uuid.uuid4()},{pair.network.network_address},static,{pair.network.netmask},86400s",
        "--dhcp-lease-max=256", "--conf-file=/dev/null", "--domain=openstacklocal", f"--interface={pair.server_if}",
        "--no-ping",
    ]


def agent_env() -> dict[str, str]:
    return dict(os.environ, PATH=f"{WRAPPERS}:/usr/sbin:/usr/bin:/sbin:/bin", SAFESPAWN_TIMEOUT="120")


def running_for(pid: int) -> dict[str, Any] | None:
    for c in containers(CH):
        if c.get("Pid") == pid and c.get("State") == "running":
            return c
    return None


def start(pair: NetnsPair, net_id: str) -> tuple[int, float]:
    """Neutron's start: the wrapper under ip netns exec. Returns (pid from the pid file, seconds)."""
    argv = dnsmasq_argv(pair, net_id)
    t0 = time.monotonic()
    p = sh("ip", "netns", "exec", pair.server_ns, "dnsmasq", *argv, env=agent_env(), timeout=180, check=False)
    took = time.monotonic() - t0
    assert p.returncode == 0, (p.stdout, p.stderr, unit_log(f"safespawn-sync@{CH}.service"))
    pid = read_pid(DATA / net_id / "pid")
    assert pid, "the wrapper returned but the pid file is empty"
    return pid, took


def kill_script(pair: NetnsPair, sig: str, pid: int) -> None:
    p = sh("ip", "netns", "exec", pair.server_ns, WRAPPERS / "dnsmasq-kill", sig, str(pid), env=agent_env(),
           timeout=180, check=False)
    assert p.returncode == 0, (p.stdout, p.stderr, unit_log(f"safespawn-sync@{CH}.service"))


@pytest.fixture
def pair() -> Any:
    net_id = str(uuid.uuid4())
    with NetnsPair(server_ns=f"qdhcp-{net_id}") as p:
        yield p, net_id


def test_the_role_installed_this_channel(host: Host) -> None:
    assert os.access(WRAPPERS / "dnsmasq", os.X_OK)
    assert os.access(WRAPPERS / "dnsmasq-kill", os.X_OK)
    assert (CHANNELS_DIR / CH / "inbox" / "new").is_dir()
    out = sh("systemctl", "is-active", f"safespawn-sync@{CH}.path", "safespawn-reconcile.timer", check=False)
    assert out.stdout.split() == ["active", "active"], out.stdout + out.stderr


def test_start_lease_hup_with_a_new_static_host_and_kill(host: Host, pair: Any, measure: Any) -> None:
    pair, net_id = pair
    pid, took_start = start(pair, net_id)
    c = running_for(pid)
    assert c, (pid, containers(CH))
    # Neutron's `active`: the pid file's pid is alive and its command line names the network.
    assert net_id in " ".join(cmdline(pid))
    # dnsmasq runs as the channel's unprivileged uid and writes its own pid file into its private
    # /run tmpfs (the policy moved --pid-file there): that tmpfs must be writable to it on podman 5.
    run = Path(f"/proc/{pid}/root/run")
    st = run.stat()
    own = [e.name for e in run.iterdir() if e.name.startswith("safespawn")]
    run_seen = {"mode": f"{st.st_mode & 0o7777:o}", "owner": st.st_uid, "sidecar_uid": Path(f"/proc/{pid}").stat().st_uid,
                "entries": own}
    measure("wrapper-run-tmpfs", **run_seen)
    assert own, run_seen
    t0 = time.monotonic()
    lease = dhcp_lease(pair.client_ns, pair.client_if, timeout=20)
    took_lease = time.monotonic() - t0
    assert lease["ip"] == pair.host(50)

    # A new port: Neutron rewrites the hosts file, then reload_cfg() -> dnsmasq-kill HUP PID.
    mac = netlab.random_mac()
    with (DATA / net_id / "host").open("a") as f:
        f.write(f"{mac},host-77,{pair.host(77)}\n")
    t0 = time.monotonic()
    kill_script(pair, "HUP", pid)
    took_hup = time.monotonic() - t0
    lease = dhcp_lease(pair.client_ns, pair.client_if, timeout=20, mac=mac)
    assert lease["ip"] == pair.host(77)
    assert running_for(pid), "HUP must reload dnsmasq, not restart it"

    # disable(): dnsmasq-kill 9 PID. The sidecar is gone, and stays gone.
    t0 = time.monotonic()
    kill_script(pair, "9", pid)
    took_kill = time.monotonic() - t0
    assert not Path(f"/proc/{pid}").exists() or "dnsmasq" not in " ".join(cmdline(pid))
    assert not [x for x in containers(CH) if x["Names"][0] == c["Names"][0]], containers(CH)
    measure("wrapper", start_s=round(took_start, 2), lease_s=round(took_lease, 2), hup_s=round(took_hup, 2),
            kill_s=round(took_kill, 2))


def test_kill_9_of_the_program_brings_it_back_and_the_pid_file_follows_within_2s(
        host: Host, pair: Any, measure: Any) -> None:
    pair, net_id = pair
    pid, _ = start(pair, net_id)
    c = running_for(pid)
    assert c, containers(CH)
    name = c["Names"][0]
    pidfile = DATA / net_id / "pid"
    t_kill = time.monotonic()
    os.kill(pid, 9)

    def back() -> int | None:
        for x in containers(CH):
            if x["Names"][0] == name and x["State"] == "running" and x.get("Pid") and x["Pid"] != pid:
                return int(x["Pid"])
        return None

    new = wait_until(back, timeout=60, interval=0.1, what=f"{name} running again after kill -9")
    t_back = time.monotonic()

    def pidfile_true() -> bool:
        p = read_pid(pidfile)
        return p == new and net_id in " ".join(cmdline(new))

    deadline = t_back + 2.0
    while not pidfile_true() and time.monotonic() < deadline:
        time.sleep(0.05)
    lag = time.monotonic() - t_back
    true_now = pidfile_true()
    named_at_2s = read_pid(pidfile)
    # How long the pid file stays wrong without the 2 s guarantee (bounded: the timer's sync at most).
    if not true_now:
        try:
            wait_until(pidfile_true, timeout=90, interval=0.2, what="the pid file to name the new pid")
            lag = time.monotonic() - t_back
        except AssertionError:
            lag = -1.0
    measure("kill9", running_again_s=round(t_back - t_kill, 2), pidfile_true_after_s=round(lag, 2),
            within_2s=true_now)
    lease = dhcp_lease(pair.client_ns, pair.client_if, timeout=20)
    assert lease["ip"] == pair.host(50)
    kill_script(pair, "9", new if true_now else read_pid(pidfile) or new)
    assert true_now, (f"the pid file named {named_at_2s} 2 s after the sidecar ran again as {new} "
                      f"(it became true after {lag:.1f}s; -1: never within 90 s)")


def test_the_sync_service_cgroup_holds_only_the_broker(host: Host, pair: Any) -> None:
    """conmon must not stay in safespawn-sync@CH.service's cgroup (systemd would call it left over,
    and stopping the broker must never touch a sidecar): the resident broker's cgroup holds the
    broker's own process and nothing the sidecar runs."""
    pair, net_id = pair
    pid, _ = start(pair, net_id)
    try:
        unit = f"safespawn-sync@{CH}.service"
        wait_until(lambda: sh("systemctl", "is-active", unit, check=False).stdout.strip() != "activating",
                   timeout=60, what=f"{unit} to be running")
        cg = sh("systemctl", "show", "-p", "ControlGroup", "--value", unit).stdout.strip()
        cg = cg or "/system.slice/system-safespawn\\x2dsync.slice/" + unit
        procs: list[tuple[str, list[str]]] = []
        f = Path("/sys/fs/cgroup") / cg.lstrip("/") / "cgroup.procs"
        if f.exists():
            procs = [(p, cmdline(int(p))) for p in f.read_text().split()]
        # Every conmon on the host (a sidecar's program's grandparent: conmon -> catatonit/program).
        conmons = []
        for p in Path("/proc").iterdir():
            if p.name.isdigit() and cmdline(int(p.name))[:1] and cmdline(int(p.name))[0].endswith("conmon"):
                conmons.append((p.name, (p / "cgroup").read_text().strip()))
        assert conmons, "no conmon found: the sidecar is not running under podman"
        others = [(p, c) for p, c in procs if not (c[1:3] == ["/opt/safespawn/bin/safespawn", "watch"]
                                                    or c[:2] == ["/opt/safespawn/bin/safespawn", "watch"])]
        assert others == [], f"{unit} ({cg}) holds more than the broker: {others}; conmons: {conmons}"
        assert not [c for c in conmons if "safespawn-sync" in c[1]], conmons
        own = Path(f"/proc/{pid}/cgroup").read_text()
        assert "libpod" in own, own
    finally:
        kill_script(pair, "9", pid)
