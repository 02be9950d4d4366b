"""A real reboot: the agent comes back, recreates its namespaces and asks for its sidecars again.

Boot 1 installs a Neutron-shaped DHCP agent as a system unit (vmtest-agent.service, wrapper mode:
at start it creates its qdhcp- namespaces, plugs a veth per network, writes Neutron's files and runs
`ip netns exec qdhcp-... dnsmasq ARGS` through the generated wrappers, four at a time like the agent's
sync threads) and checks every network leases. Then the VM reboots for real (`systemctl reboot`):
/run, every netns and every process are gone; podman's containers and safespawn's state stay on the
disk. Boot 2 checks that every sidecar is back exactly once (no doubles, no left-over containers),
that the pid files Neutron reads are true, that every network leases again, that the broker's
timer sync (OnBootSec) does not undo any of it, and measures how long after the kernel started
every sidecar ran again.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from conftest import VMTEST, WRAPPERS_DIR, Host, cmdline, containers, read_pid, sh, unit_log, wait_until
from support.netlab import dhcp_lease

CH = "vm-reboot"
DATA = VMTEST / "reboot"
AGENT_DIR = VMTEST / "agent"
UNIT = "vmtest-agent.service"
N_NETWORKS = 3
NOTES = DATA / "expect.json"

# The agent: plain Python, run by systemd at every boot. It does what a DHCP agent does at start
# for each of its networks (namespace, port, files, dnsmasq) and nothing else.
AGENT = r'''
import json, os, subprocess, sys, time
from concurrent.futures import ThreadPoolExecutor

DATA, WRAPPERS, N = sys.argv[1], sys.argv[2], int(sys.argv[3])
ENV = dict(os.environ, PATH=WRAPPERS + ":/usr/sbin:/usr/bin:/sbin:/bin", SAFESPAWN_TIMEOUT="300")

def run(*argv):
    subprocess.run(argv, check=True, capture_output=True, timeout=120)

def network(i):
    net_id = "00000000-0000-4000-8000-%012d" % i
    ns, cns = "qdhcp-" + net_id, "vmtest-cli%d" % i
    srv_if, cli_if = "vmt%ds" % i, "vmt%dc" % i
    mac = "02:00:00:00:%02x:01" % i
    if not os.path.exists("/run/netns/" + ns):
        run("ip", "netns", "add", ns)
        run("ip", "netns", "add", cns)
        run("ip", "-n", ns, "link", "add", srv_if, "type", "veth", "peer", "name", cli_if, "address", mac,
            "netns", cns)
        run("ip", "-n", ns, "addr", "add", "10.251.%d.1/24" % i, "dev", srv_if)
        run("ip", "-n", ns, "link", "set", srv_if, "up")
        run("ip", "-n", cns, "link", "set", cli_if, "up")
    d = os.path.join(DATA, net_id)
    os.makedirs(d, exist_ok=True)
    os.chmod(d, 0o755)
    for f in ("addn_hosts", "opts", "leases"):
        open(os.path.join(d, f), "a").close()
    with open(os.path.join(d, "host"), "w") as f:
        f.write("%s,host-50,10.251.%d.50\n" % (mac, i))
    argv = ["--no-hosts", "--no-resolv", "--pid-file=%s/pid" % d, "--dhcp-hostsfile=%s/host" % d,
            "--addn-hosts=%s/addn_hosts" % d, "--dhcp-optsfile=%s/opts" % d, "--dhcp-leasefile=%s/leases" % d,
            "--local-service", "--bind-dynamic",
            "--dhcp-range=set:subnet-11111111-0000-4000-8000-%012d,10.251.%d.0,static,255.255.255.0,86400s" % (i, i),
            "--dhcp-lease-max=256", "--conf-file=/dev/null", "--domain=openstacklocal",
            "--interface=" + srv_if, "--no-ping"]
    t0 = time.clock_gettime(time.CLOCK_BOOTTIME)
    p = subprocess.run(["ip", "netns", "exec", ns, "dnsmasq"] + argv, env=ENV, capture_output=True, text=True,
                       timeout=600)
    t1 = time.clock_gettime(time.CLOCK_BOOTTIME)
    print("network %d: rc=%d in %.2fs %s %s" % (i, p.returncode, t1 - t0, p.stdout.strip(), p.stderr.strip()),
          flush=True)
    return {"net_id": net_id, "ns": ns, "client_ns": cns, "client_if": cli_if, "mac": mac,
            "ip": "10.251.%d.50" % i, "rc": p.returncode, "requested_at": t0, "answered_at": t1}

start = time.clock_gettime(time.CLOCK_BOOTTIME)
with ThreadPoolExecutor(4) as ex:
    nets = list(ex.map(network, range(1, N + 1)))
done = time.clock_gettime(time.CLOCK_BOOTTIME)
os.makedirs("/run/vmtest", exist_ok=True)
with open("/run/vmtest/agent.json", "w") as f:
    json.dump({"started": start, "done": done, "networks": nets}, f)
sys.exit(0 if all(n["rc"] == 0 for n in nets) else 1)
'''

UNIT_TEXT = f"""[Unit]
Description=vmtest: a Neutron-shaped DHCP agent (wrapper mode) that recreates its namespaces at start
After=local-fs.target

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/bin/python3 {AGENT_DIR}/agent.py {DATA} {WRAPPERS_DIR / CH} {N_NETWORKS}
TimeoutStartSec=900

[Install]
WantedBy=multi-user.target
"""


def sidecars() -> list[dict[str, Any]]:
    return containers(CH)


def check_every_network(nets: list[dict[str, Any]]) -> dict[str, int]:
    """Each network's sidecar runs once, its pid file is true for Neutron, and it hands out the lease."""
    cs = sidecars()
    running = [c for c in cs if c["State"] == "running"]
    assert len(cs) == len(nets) == len(running), [(c["Names"], c["State"]) for c in cs]
    pids = {}
    for n in nets:
        pid = read_pid(DATA / n["net_id"] / "pid")
        assert pid and n["net_id"] in " ".join(cmdline(pid)), (n["net_id"], pid, cmdline(pid or 0))
        assert [c for c in running if c["Pid"] == pid], (pid, [(c["Names"], c["Pid"]) for c in running])
        lease = dhcp_lease(n["client_ns"], n["client_if"], timeout=30)
        assert lease["ip"] == n["ip"]
        pids[n["net_id"]] = pid
    return pids


@pytest.mark.order(90)
def test_before_the_reboot_the_agent_unit_gets_every_sidecar(host: Host) -> None:
    AGENT_DIR.mkdir(parents=True, exist_ok=True)
    DATA.mkdir(parents=True, exist_ok=True)
    (AGENT_DIR / "agent.py").write_text(AGENT)
    Path("/etc/systemd/system", UNIT).write_text(UNIT_TEXT)
    sh("systemctl", "daemon-reload")
    sh("systemctl", "enable", UNIT)
    p = sh("systemctl", "start", UNIT, timeout=900, check=False)
    assert p.returncode == 0, unit_log(UNIT)
    agent = json.loads(Path("/run/vmtest/agent.json").read_text())
    pids = check_every_network(agent["networks"])
    NOTES.write_text(json.dumps({"networks": agent["networks"], "pids": pids,
                                 "names": sorted(c["Names"][0] for c in sidecars())}))


def boot_wallclock() -> float:
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("btime "):
            return float(line.split()[1])
    raise AssertionError("no btime in /proc/stat")


def started_at(name: str) -> float:
    s = json.loads(sh("podman", "inspect", "--format", "json", name).stdout)[0]["State"]["StartedAt"]
    # "2026-12-05T09:01:02.123456789Z" or with an offset: keep microseconds.
    base, _, rest = s.partition(".")
    frac = "".join(ch for ch in rest if ch.isdigit())[:6]
    tz = rest[len("".join(ch for ch in rest if ch.isdigit())):] or "Z"
    dt = datetime.fromisoformat(f"{base}.{frac or '0'}{'+00:00' if tz == 'Z' else tz}")
    return dt.timestamp()


@pytest.mark.after_reboot
def test_after_the_reboot_every_sidecar_is_back_once_and_works(measure: Any) -> None:
    notes = json.loads(NOTES.read_text())
    wait_until(lambda: sh("systemctl", "is-active", UNIT, check=False).stdout.strip() in ("active", "failed"),
               timeout=600, interval=1, what=f"{UNIT} to finish")
    assert sh("systemctl", "is-active", UNIT, check=False).stdout.strip() == "active", unit_log(UNIT)
    agent = json.loads(Path("/run/vmtest/agent.json").read_text())
    btime = boot_wallclock()
    names = sorted(c["Names"][0] for c in sidecars())
    assert names == notes["names"], (names, notes["names"])
    back = max(started_at(n) for n in names) - btime
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    pids = check_every_network(agent["networks"])
    assert all(pids[k] != v for k, v in notes["pids"].items()), "a sidecar kept its pre-reboot pid?"
    measure("reboot", sidecars=len(names), all_back_after_boot_s=round(back, 1),
            agent_started_s=round(agent["started"], 1), agent_done_s=round(agent["done"], 1),
            agent_requests_s=round(agent["done"] - agent["started"], 1), checked_at_uptime_s=round(uptime, 1))


@pytest.mark.after_reboot
def test_after_the_reboot_the_timer_sync_leaves_them_alone() -> None:
    """The reconcile timer fires 10 s after boot: it must not remove or double what the agent asked for."""
    def reconciled_after_agent() -> bool:
        t = sh("systemctl", "show", "-p", "ExecMainExitTimestampMonotonic", "--value",
               "safespawn-reconcile.service").stdout.strip()
        return t not in ("", "0")
    wait_until(reconciled_after_agent, timeout=300, interval=1, what="a reconcile run since boot")
    # One more full sync by hand, as the timer would run it.
    sh("/opt/safespawn/bin/safespawn", "sync", "--all", timeout=300)
    notes = json.loads(NOTES.read_text())
    agent = json.loads(Path("/run/vmtest/agent.json").read_text())
    before = {c["Names"][0]: c["Pid"] for c in sidecars()}
    check_every_network(agent["networks"])
    after = {c["Names"][0]: c["Pid"] for c in sidecars()}
    assert before == after and sorted(after) == notes["names"], (before, after)
    st = json.loads(sh("/opt/safespawn/bin/safespawn", "status", CH, "--json").stdout)
    print(json.dumps(st)[:2000])


@pytest.mark.after_reboot
def test_after_the_reboot_the_units_are_back() -> None:
    out = sh("systemctl", "is-active", f"safespawn-sync@{CH}.path", "safespawn-sync@vm-dhcp.path",
             "safespawn-reconcile.timer", check=False)
    assert out.stdout.split() == ["active"] * 3, out.stdout + out.stderr
    failed = sh("systemctl", "--failed", "--no-legend", "--plain", check=False).stdout
    assert "safespawn" not in failed, failed
