"""The ProcessManager class on a real host: Neutron 29's own code in an agent container run as an
EDPM-shaped Quadlet unit.

The agent container (`/etc/containers/systemd/vmtest-neutron-agent.container`, turned into
`vmtest-neutron-agent.service` by podman's Quadlet generator) runs tests/vm/quadlet_agent.py with the
Neutron venv's python through the `safespawn-neutron` launcher the role wrote, so Neutron's own
`external_process.ProcessManager` is safespawn's class (ChannelProcessManager) and its `enable()` /
`active` go through the channel. The container has no privilege: `--cap-drop ALL`,
no-new-privileges, a read-only root, no runtime socket, its own pid and network (`none`) namespaces;
it shares only the channel (inbox rw,nodev,nosuid,noexec, outbox ro), its data dir, the wrappers dir
(ro) and, read-only, the host's /usr and the Neutron venv. The test (standing in for the agent's
port plugging) creates the namespaces.

Checked: every network's dnsmasq runs and leases, and Neutron's `active` is true for each; the agent
process has no capability (CapEff 0), NoNewPrivs 1, its own pid and network namespace, and no socket
on any of its file systems; stopping the agent unit leaves the sidecars running and leasing (same
pids); starting it again, Neutron's `enable()` finds them active and sends no request, and the
channel still has exactly its two containers (the same ones).
"""

from __future__ import annotations

import json
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from conftest import CHANNELS_DIR, SAFESPAWN, VMTEST, WRAPPERS_DIR, Host, containers, inspect, sh, unit_log, wait_until
from support import netlab
from support.netlab import NetnsPair, dhcp_lease

CH = "vm-class"
DATA = VMTEST / "class"
ROOTFS = VMTEST / "class-rootfs"
AGENT_DIR = VMTEST / "class-agent"
AGENT_PROGRAM = Path(__file__).with_name("quadlet_agent.py")
NAME = "vmtest-neutron-agent"
QUADLET = Path(f"/etc/containers/systemd/{NAME}.container")
UNIT = f"{NAME}.service"
NEUTRON_PY = "/opt/neutron-venv/bin/python"
N_NETWORKS = 2
RUNTIME_SOCKETS = ("/run/podman/podman.sock", "/var/run/docker.sock", "/run/docker.sock",
                   "/run/containerd/containerd.sock")


def volumes() -> list[tuple[Path, str]]:
    """(path, options): each is mounted at the same path in the agent, as docs/neutron.md says."""
    chan = CHANNELS_DIR / CH
    return [(chan / "inbox", "rw,nodev,nosuid,noexec"), (chan / "outbox", "ro"), (DATA, "rw"),
            (WRAPPERS_DIR / CH, "ro"), (AGENT_DIR, "ro"), (Path("/usr"), "ro"), (Path("/opt/neutron-venv"), "ro")]


def quadlet_text() -> str:
    return "\n".join([
        "[Unit]",
        "Description=vmtest: Neutron 29 in an agent container, ProcessManager class (EDPM-shaped)",
        "",
        "[Container]",
        f"ContainerName={NAME}",
        f"Rootfs={ROOTFS}",
        "Network=none",
        "DropCapability=all",
        "NoNewPrivileges=true",
        "ReadOnly=true",
        *[f"Volume={p}:{p}:{o}" for p, o in volumes()],
        "Environment=PYTHONDONTWRITEBYTECODE=1",
        "Environment=PYTHONUNBUFFERED=1",
        "Environment=SAFESPAWN_TIMEOUT=300",
        "Environment=PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        f"Exec={WRAPPERS_DIR / CH}/safespawn-neutron {NEUTRON_PY} {AGENT_DIR}/quadlet_agent.py {AGENT_DIR} {DATA}",
        "",
        "[Service]",
        "Restart=on-failure",
        "TimeoutStartSec=300",
        "TimeoutStopSec=60",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
        "",
    ])


def make_rootfs() -> None:
    """The agent image: symlinks into the host's /usr, root in /etc/passwd, every mount point made."""
    for d in ("usr", "etc", "tmp", "proc", "sys", "dev", "run", "root", "var/tmp"):
        (ROOTFS / d).mkdir(parents=True, exist_ok=True)
    for p, _ in volumes():
        (ROOTFS / str(p).lstrip("/")).mkdir(parents=True, exist_ok=True)
    for link in ("bin", "lib", "lib64", "sbin"):
        if not (ROOTFS / link).is_symlink():
            (ROOTFS / link).symlink_to(f"usr/{link}")
    (ROOTFS / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (ROOTFS / "etc" / "group").write_text("root:x:0:\n")
    for f in ("hosts", "hostname", "resolv.conf"):
        (ROOTFS / "etc" / f).touch()
    # The Python's own /etc (Debian's /usr/lib/python3.X/sitecustomize.py is a link into it), as an
    # image that ships this Python would have it.
    for d in Path("/etc").glob("python3*"):
        if d.is_dir() and not (ROOTFS / "etc" / d.name).exists():
            shutil.copytree(d, ROOTFS / "etc" / d.name, symlinks=True)
    (ROOTFS / "tmp").chmod(0o1777)


def agent_view() -> dict[str, Any]:
    try:
        return dict(json.loads((DATA / "agent-view.json").read_text()))
    except (OSError, ValueError):
        return {}


def agent_trouble() -> str:
    """Why the agent cannot get anywhere (its traceback, or a failed unit), or ''."""
    err = DATA / "agent-error.txt"
    if err.exists():
        return err.read_text()[-3000:] + "\n" + unit_log(UNIT, 30)
    if sh("systemctl", "is-failed", UNIT, check=False).stdout.strip() == "failed":
        return unit_log(UNIT)
    return ""


def wait_for_agent(pred: Any, what: str) -> None:
    def check() -> bool:
        trouble = agent_trouble()
        assert not trouble, f"the agent failed while waiting for {what}:\n{trouble}"
        return bool(pred())
    try:
        wait_until(check, timeout=300, interval=1, what=what)
    except AssertionError as e:
        raise AssertionError(f"{e}\nagent view: {agent_view()}\n{unit_log(UNIT)}") from None


def sidecars() -> dict[str, tuple[str, int]]:
    """Every container of the channel, running or not: name -> (id, pid if running)."""
    return {c["Names"][0]: (c["Id"], c["Pid"] if c["State"] == "running" else 0) for c in containers(CH)}


def ns_of(pid: int | str, kind: str) -> str:
    return str(Path(f"/proc/{pid}/ns/{kind}").readlink())


@pytest.fixture
def networks() -> Any:
    pairs = []
    try:
        nets = []
        for _ in range(N_NETWORKS):
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


@pytest.fixture
def agent_unit(host: Host, networks: Any) -> Any:
    """The Quadlet file in place (the unit not started); on the way out the unit, the file and the
    channel's sidecars go (stopped through the channel, as an agent would), before the namespaces."""
    for d in (DATA, AGENT_DIR):
        d.mkdir(parents=True, exist_ok=True)
        d.chmod(0o755)
    for f in ("agent-view.json", "agent-error.txt"):
        (DATA / f).unlink(missing_ok=True)
    make_rootfs()
    (AGENT_DIR / "quadlet_agent.py").write_text(AGENT_PROGRAM.read_text())
    (AGENT_DIR / "networks.json").write_text(json.dumps([{k: v for k, v in n.items() if k != "pair"}
                                                         for n in networks]))
    QUADLET.parent.mkdir(parents=True, exist_ok=True)
    QUADLET.write_text(quadlet_text())
    sh("systemctl", "daemon-reload")
    try:
        yield UNIT
    finally:
        sh("systemctl", "stop", UNIT, timeout=120, check=False)
        QUADLET.unlink(missing_ok=True)
        sh("systemctl", "daemon-reload", check=False)
        for n in networks:
            sh(SAFESPAWN, "submit", "--channel-dir", CHANNELS_DIR / CH, "--timeout", "120", "stop", "dnsmasq",
               "--netns", n["ns"], timeout=180, check=False)


def test_neutron_in_a_quadlet_agent_container_keeps_its_sidecars_across_agent_restarts(
        agent_unit: str, networks: Any, measure: Any) -> None:
    gen = sh("systemctl", "cat", UNIT, check=False)
    assert gen.returncode == 0, ("Quadlet made no unit", gen.stderr,
                                 sh("/usr/lib/systemd/system-generators/podman-system-generator", "--dryrun",
                                    check=False).stderr[-2000:])
    ids = {n["id"] for n in networks}

    def all_active(pids: set[int] | None = None, after: float = 0.0) -> bool:
        v = agent_view()
        nets = v.get("nets", {})
        if v.get("started", 0) <= after or set(nets) != ids or not all(x["active"] for x in nets.values()):
            return False
        return pids is None or {x["pid"] for x in nets.values()} == pids

    # Start: Neutron's enable() asks for each network's dnsmasq through the channel.
    t0 = time.monotonic()
    p = sh("systemctl", "start", UNIT, timeout=300, check=False)
    assert p.returncode == 0, (p.stderr, unit_log(UNIT))
    wait_for_agent(all_active, "Neutron's ProcessManager to see every dnsmasq active")
    took_start = time.monotonic() - t0
    view = agent_view()
    facts = view["facts"]
    assert facts["class"] == "safespawn_neutron.ChannelProcessManager", facts
    assert facts["neutron_base"] == "neutron.agent.linux.external_process.ProcessManager", facts
    assert facts["subclass_of_neutrons"] and facts["channel_dir"] == str(CHANNELS_DIR / CH), facts
    assert view["requests"] == ["start"] * N_NETWORKS, view["requests"]
    before = sidecars()
    pids = {pid for _, pid in before.values()}
    assert len(before) == N_NETWORKS and 0 not in pids, containers(CH)
    assert {x["pid"] for x in view["nets"].values()} == pids, (view["nets"], before)
    for n in networks:
        assert dhcp_lease(n["pair"].client_ns, n["pair"].client_if, timeout=30)["ip"] == n["pair"].host(50)

    # Unprivileged, seen from inside (the agent's own /proc/self) and from the host.
    me = view["self"]
    assert me["cap_eff"] == me["cap_prm"] == me["cap_bnd"] == "0000000000000000", me
    assert me["no_new_privs"] == "1", me
    assert me["pid"] == 1 and me["visible_pids"] == [1], me  # its own pid namespace: no host process in sight
    assert me["net_links"] == ["lo"], me  # Network=none: its own network namespace, loopback only
    assert me["sockets"] == [] and me["runtime_sockets"] == [], me
    assert not [m for m in me["mounts"] if m.endswith(".sock") or m.startswith(("/run/podman", "/run/docker",
                                                                                "/run/containerd", "/run/netns"))], me
    info = inspect(NAME)
    hc = info["HostConfig"]
    assert hc["Privileged"] is False
    assert not (info.get("EffectiveCaps") or []), info.get("EffectiveCaps")
    assert "no-new-privileges" in " ".join(hc.get("SecurityOpt") or []), hc.get("SecurityOpt")
    assert hc.get("ReadonlyRootfs") is True
    assert hc.get("NetworkMode") == "none" and hc.get("PidMode") in ("", "private", None), hc
    sources = [m.get("Source", "") for m in info.get("Mounts", [])]
    ours = {str(p) for p, _ in volumes()}
    assert ours <= set(sources), sources
    assert not [m for m in info.get("Mounts", []) if m.get("Type") == "bind" and m.get("Source") not in ours], sources
    assert not [s for s in sources if s in RUNTIME_SOCKETS or s.endswith(".sock")], sources
    agent_pid = info["State"]["Pid"]
    status = Path(f"/proc/{agent_pid}/status").read_text()
    assert "\nCapEff:\t0000000000000000\n" in status and "\nNoNewPrivs:\t1\n" in status, status
    assert ns_of(agent_pid, "pid") != ns_of(1, "pid") and ns_of(agent_pid, "net") != ns_of(1, "net")
    assert ns_of(agent_pid, "pid") == me["ns_pid"], (ns_of(agent_pid, "pid"), me["ns_pid"])

    # Stop the agent unit: its container goes, the sidecars keep running (same containers, same
    # pids) and keep leasing.
    sh("systemctl", "stop", UNIT, timeout=120)
    assert sh("podman", "container", "exists", NAME, check=False).returncode == 1, "the agent container stayed"
    assert sidecars() == before, (sidecars(), before)
    for n in networks:
        assert dhcp_lease(n["pair"].client_ns, n["pair"].client_if, timeout=30)["ip"] == n["pair"].host(50)

    # Start it again: Neutron's enable() finds each one active and sends nothing; no new container.
    t_restart = time.time()
    t0 = time.monotonic()
    sh("systemctl", "start", UNIT, timeout=300)
    wait_for_agent(lambda: all_active(pids, after=t_restart), "the restarted agent to see the same sidecars active")
    took_restart = time.monotonic() - t0
    view = agent_view()
    assert view["requests"] == [], f"the restarted agent sent {view['requests']}"
    assert sidecars() == before, (sidecars(), before)
    measure("quadlet", agent_start_to_all_active_s=round(took_start, 1),
            agent_restart_to_all_active_s=round(took_restart, 1), agent_imports_s=view["facts"]["imported_in_s"],
            sidecars=len(before))
