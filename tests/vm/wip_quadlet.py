"""NOT YET RUN (work in progress, not collected: rename to test_quadlet.py once it has passed in the VM).

The ProcessManager class on a real host: Neutron 29's own code in an agent container run as an
EDPM-shaped Quadlet unit.

The agent container (`/etc/containers/systemd/vmtest-neutron-agent.container`, turned into
`vmtest-neutron-agent.service` by podman's Quadlet generator) runs Neutron's `ProcessManager` from
`/opt/neutron-venv` through the `safespawn-neutron` launcher the role wrote, so Neutron's own
`enable()` / `active` go through safespawn's class. The container has no privilege: `--cap-drop
ALL`, no-new-privileges, no runtime socket, its own pid and network namespaces; it shares only the
channel (inbox rw, outbox ro), its data dir, the wrappers dir (ro) and, read-only, the host's /usr and
the Neutron venv. The test (standing in for the agent's port plugging) creates the namespaces.

Checked: every network's dnsmasq runs and leases, Neutron's `active` is true for each; stopping the
agent unit leaves the sidecars running (same pids); starting it again, Neutron's `enable()` finds
them active and starts nothing new.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from conftest import CHANNELS_DIR, SAFESPAWN, VMTEST, WRAPPERS_DIR, Host, containers, sh, unit_log, wait_until
from support import netlab
from support.netlab import NetnsPair, dhcp_lease

CH = "vm-class"
DATA = VMTEST / "class"
ROOTFS = VMTEST / "class-rootfs"
AGENT_DIR = VMTEST / "class-agent"
QUADLET = Path("/etc/containers/systemd/vmtest-neutron-agent.container")
UNIT = "vmtest-neutron-agent.service"
NEUTRON_PY = "/opt/neutron-venv/bin/python"
RUNTIME_SOCKETS = ("/run/podman/podman.sock", "/var/run/docker.sock", "/run/docker.sock",
                   "/run/containerd/containerd.sock")

# The agent: Neutron's option registration, then for each network a ProcessManager as the DHCP driver
# builds it, enable(), and every 2 s what `active`/`pid` say, written where the test can read it.
AGENT = r'''
import json, os, signal, sys, time, warnings
warnings.filterwarnings("ignore")
from neutron.conf.agent import common as agent_conf
from oslo_config import cfg
CONF = cfg.CONF
for fn in (agent_conf.register_external_process_opts, agent_conf.register_process_monitor_opts,
           agent_conf.register_root_helper):
    fn(CONF)
CONF([], project="neutron", default_config_files=[], default_config_dirs=[])
CONF.set_override("root_helper", "", "AGENT")
from neutron.agent.linux import external_process

cfg_dir, data = sys.argv[1], sys.argv[2]
nets = json.load(open(os.path.join(cfg_dir, "networks.json")))
stop = []
signal.signal(signal.SIGTERM, lambda *a: stop.append(1))

def argv_for(n):
    d = os.path.join(data, n["id"])
    def cb(pid_file):
        return ["dnsmasq", "--no-hosts", "--no-resolv", "--pid-file=%s/pid" % d,
                "--dhcp-hostsfile=%s/host" % d, "--addn-hosts=%s/addn_hosts" % d,
                "--dhcp-optsfile=%s/opts" % d, "--dhcp-leasefile=%s/leases" % d, "--local-service",
                "--bind-dynamic", "--dhcp-range=set:subnet-%s,%s,static,255.255.255.0,86400s" % (n["subnet"], n["net"]),
                "--dhcp-lease-max=256", "--conf-file=/dev/null", "--domain=openstacklocal",
                "--interface=" + n["iface"], "--no-ping"]
    return cb

pms = {}
print("class:", external_process.ProcessManager.__module__, flush=True)
for n in nets:
    pm = external_process.ProcessManager(CONF, n["id"], namespace=n["ns"], service="dnsmasq",
                                         default_cmd_callback=argv_for(n))
    t0 = time.time()
    pm.enable(ensure_active=True)
    print("enabled %s in %.1fs: active=%s pid=%s" % (n["id"], time.time() - t0, pm.active, pm.pid), flush=True)
    pms[n["id"]] = pm
while not stop:
    view = {k: {"active": pm.active, "pid": pm.pid} for k, pm in pms.items()}
    tmp = os.path.join(data, "agent-view.json.tmp")
    with open(tmp, "w") as f:
        json.dump({"t": time.time(), "class": external_process.ProcessManager.__module__, "pid": os.getpid(),
                   "nets": view}, f)
    os.rename(tmp, os.path.join(data, "agent-view.json"))
    time.sleep(2)
'''


def quadlet_text() -> str:
    chan = CHANNELS_DIR / CH
    wrappers = WRAPPERS_DIR / CH
    lines = [
        "[Unit]",
        "Description=vmtest: Neutron 29 in an agent container, ProcessManager class (EDPM-shaped)",
        "",
        "[Container]",
        "ContainerName=vmtest-neutron-agent",
        f"Rootfs={ROOTFS}",
        "Network=none",
        "DropCapability=all",
        "NoNewPrivileges=true",
        "ReadOnly=true",
        f"Volume={chan}/inbox:{chan}/inbox:rw,nodev,nosuid,noexec",
        f"Volume={chan}/outbox:{chan}/outbox:ro",
        f"Volume={DATA}:{DATA}:rw",
        f"Volume={wrappers}:{wrappers}:ro",
        f"Volume={AGENT_DIR}:{AGENT_DIR}:ro",
        "Volume=/usr:/usr:ro",
        "Volume=/opt/neutron-venv:/opt/neutron-venv:ro",
        "Environment=PYTHONDONTWRITEBYTECODE=1",
        "Environment=PYTHONUNBUFFERED=1",
        "Environment=SAFESPAWN_TIMEOUT=300",
        "Environment=PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        f"Exec={wrappers}/safespawn-neutron {NEUTRON_PY} {AGENT_DIR}/agent.py {AGENT_DIR} {DATA}",
        "",
        "[Service]",
        "Restart=on-failure",
        "TimeoutStartSec=600",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
        "",
    ]
    return "\n".join(lines)


def make_rootfs() -> None:
    for d in ("usr", "etc", "tmp", "proc", "sys", "dev", "run", "opt/neutron-venv", "root", "var/tmp"):
        (ROOTFS / d).mkdir(parents=True, exist_ok=True)
    for link in ("bin", "lib", "lib64", "sbin"):
        if not (ROOTFS / link).is_symlink():
            (ROOTFS / link).symlink_to(f"usr/{link}")
    (ROOTFS / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (ROOTFS / "etc" / "group").write_text("root:x:0:\n")
    (ROOTFS / "tmp").chmod(0o1777)


def agent_view() -> dict[str, Any]:
    try:
        return json.loads((DATA / "agent-view.json").read_text())
    except (OSError, ValueError):
        return {}


def sidecar_pids() -> dict[str, int]:
    return {c["Names"][0]: c["Pid"] for c in containers(CH) if c["State"] == "running"}


@pytest.fixture
def networks() -> Any:
    pairs = []
    try:
        nets = []
        for _ in range(2):
            net_id = str(uuid.uuid4())
            p = NetnsPair(server_ns=f"qdhcp-{net_id}").create()
            pairs.append(p)
            d = DATA / net_id
            d.mkdir(parents=True, exist_ok=True)
            d.chmod(0o755)
            for f in ("addn_hosts", "opts", "leases"):
                (d / f).touch()
            (d / "host").write_text(f"{netlab.get_mac(p.client_ns, p.client_if)},host-50,{p.host(50)}\n")
            nets.append({"id": net_id, "ns": p.server_ns, "iface": p.server_if, "subnet": str(uuid.uuid4()),
                         "net": str(p.network.network_address), "pair": p})
        yield nets
    finally:
        for p in pairs:
            try:
                p.destroy()
            except netlab.NetlabError:
                pass


def test_neutron_in_a_quadlet_agent_container_keeps_its_sidecars_across_agent_restarts(
        host: Host, networks: Any, measure: Any) -> None:
    DATA.mkdir(parents=True, exist_ok=True)
    AGENT_DIR.mkdir(parents=True, exist_ok=True)
    make_rootfs()
    (AGENT_DIR / "agent.py").write_text(AGENT)
    (AGENT_DIR / "networks.json").write_text(json.dumps([{k: v for k, v in n.items() if k != "pair"}
                                                        for n in networks]))
    QUADLET.parent.mkdir(parents=True, exist_ok=True)
    QUADLET.write_text(quadlet_text())
    sh("systemctl", "daemon-reload")
    gen = sh("systemctl", "cat", UNIT, check=False)
    assert gen.returncode == 0, ("Quadlet made no unit", gen.stderr,
                                 sh("/usr/lib/systemd/system-generators/podman-system-generator", "--dryrun",
                                    check=False).stderr[-2000:])
    ids = {n["id"] for n in networks}

    def all_active(pids: dict[str, int] | None = None, after: float = 0.0) -> bool:
        v = agent_view()
        nets = v.get("nets", {})
        if v.get("t", 0) <= after or set(nets) != ids or not all(x["active"] for x in nets.values()):
            return False
        return pids is None or sorted(x["pid"] for x in nets.values()) == sorted(pids.values())

    t0 = time.monotonic()
    p = sh("systemctl", "start", UNIT, timeout=600, check=False)
    assert p.returncode == 0, unit_log(UNIT)
    wait_until(all_active, timeout=600, interval=1, what="Neutron's ProcessManager to see every dnsmasq active")
    took_start = time.monotonic() - t0
    assert agent_view()["class"].startswith("safespawn"), agent_view()
    pids = sidecar_pids()
    assert len(pids) == len(networks), containers(CH)
    for n in networks:
        assert dhcp_lease(n["pair"].client_ns, n["pair"].client_if, timeout=30)["ip"] == n["pair"].host(50)

    # EDPM-shaped and unprivileged: what podman says of the agent container.
    info = json.loads(sh("podman", "inspect", "vmtest-neutron-agent").stdout)[0]
    hc = info["HostConfig"]
    assert hc["Privileged"] is False
    assert not (info.get("EffectiveCaps") or []), info.get("EffectiveCaps")
    assert hc.get("PidMode") in ("", "private", None), hc.get("PidMode")
    assert hc.get("NetworkMode") == "none", hc.get("NetworkMode")
    sources = [m.get("Source", "") for m in info.get("Mounts", [])]
    assert not [s for s in sources if s in RUNTIME_SOCKETS or s.endswith(".sock")
                or s in ("/run", "/var/run", "/run/podman")], sources
    agent_pid = info["State"]["Pid"]
    assert sh("cat", f"/proc/{agent_pid}/status").stdout.count("CapEff:\t0000000000000000") == 1

    # Stop the agent unit: the sidecars keep running, as they are.
    sh("systemctl", "stop", UNIT, timeout=300)
    time.sleep(3)
    assert sidecar_pids() == pids
    for n in networks:
        assert dhcp_lease(n["pair"].client_ns, n["pair"].client_if, timeout=30)["ip"] == n["pair"].host(50)
    # Start it again: Neutron's enable() finds each one active; nothing is started twice.
    t_restart = time.time()
    t0 = time.monotonic()
    sh("systemctl", "start", UNIT, timeout=600)
    wait_until(lambda: all_active(pids, after=t_restart), timeout=600, interval=1,
               what="the restarted agent to see the same sidecars active")
    took_restart = time.monotonic() - t0
    assert sidecar_pids() == pids
    measure("quadlet", agent_start_to_all_active_s=round(took_start, 1),
            agent_restart_to_all_active_s=round(took_restart, 1), sidecars=len(pids))

    # Clean up: the agent goes; its sidecars are stopped through the channel, as an agent would.
    sh("systemctl", "stop", UNIT, timeout=300)
    QUADLET.unlink()
    sh("systemctl", "daemon-reload")
    for pid in pids.values():
        sh(SAFESPAWN, "submit", "--channel-dir", CHANNELS_DIR / CH, "signal", "--pid", str(pid), "KILL",
           timeout=300, check=False)
