"""Each channel's sidecars run as the channel's own unprivileged host uid, with only the profile's
capabilities, and Neutron's paths work with a ROOT agent.

With nothing configured, a channel's sidecars run as the uid the host allocates to that channel
(`[broker] sidecar_uids`, docs/security.md "Sidecar uids"): never 0, never another channel's, so a
per-uid kernel limit that one sidecar exhausts reaches only its own channel. The profile's
capabilities are ambient ones, minus SETUID/SETGID (which would let the process setuid(0)).

The agent here is root, as EDPM runs it: the data dir and everything in it are root's (configs 0644,
directories 0755), and the programs still do their real job: dnsmasq hands out a lease and writes its
lease file (handed to its uid by the host before the start), keepalived becomes MASTER and holds the
VIP (its VRRP child's pid file written by the host), radvd's advertisement gives the client a SLAAC
address (Neutron's `-u root` left out), haproxy serves on port 80 (Neutron's `user root`/`group root`
lines in its config). An explicit `sidecar_uid` keeps working as before.
"""

from __future__ import annotations

import ipaddress
import os
import re
import secrets
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
from support import netlab
from support.broker import REPO
from support.netlab import NetnsPair

from safespawn.agent import client
from safespawn.broker.policy import load_profile
from safespawn.config import allocated_uid

from .test_core import dnsmasq_argv

CAP_BITS = {"NET_BIND_SERVICE": 10, "NET_BROADCAST": 11, "NET_ADMIN": 12, "NET_RAW": 13, "SETGID": 6, "SETUID": 7}


def status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}


def caps_mask(names: list[str]) -> int:
    return sum(1 << CAP_BITS[n] for n in names)


def chown_tree(root: Path, uid: int) -> None:
    for d, dirs, files in os.walk(root):
        for n in [d, *[os.path.join(d, f) for f in dirs + files]]:
            os.chown(n, uid, uid)


def owner(p: Path) -> tuple[int, int, int]:
    st = os.lstat(p)
    return st.st_uid, st.st_gid, st.st_mode & 0o7777


def run_program(b, profile: str, uid: int, root_agent: bool) -> None:  # type: ignore[no-untyped-def]
    """Start `profile` through the channel and check it does its job as `uid`."""
    data = b.data_dir
    prefix = ipaddress.IPv6Network(f"fd00:5afd:{secrets.randbelow(0xFFFF):x}::/64")
    ns = ("qdhcp-" if profile in ("dnsmasq", "haproxy") else "qrouter-") + str(uuid.uuid4())
    with NetnsPair(server_ns=ns, server_addr6=f"{prefix.network_address + 1}/64") as pair:
        conf = data / "conf"
        conf.mkdir()
        if profile == "dnsmasq":
            argv = dnsmasq_argv(data, pair)
            # Neutron writes the lease file itself before each start (Dnsmasq._output_init_lease_file).
            (data / pair.server_ns / "leases").write_text(f"4102444800 fa:16:3e:aa:bb:cc {pair.host(77)} host-77 *\n")
        elif profile == "keepalived":
            vip = pair.host(200)
            (conf / "keepalived.conf").write_text(
                f"vrrp_instance VR_1 {{\n state BACKUP\n interface {pair.server_if}\n virtual_router_id 1\n"
                f" priority 50\n nopreempt\n advert_int 1\n virtual_ipaddress {{\n  {vip}/24 dev {pair.server_if}\n"
                " }\n}\n")
            argv = ["-P", "-f", f"{conf}/keepalived.conf", "-p", f"{conf}/k.pid", "-r", f"{conf}/k.pid-vrrp"]
        elif profile == "radvd":
            (conf / "radvd.conf").write_text(
                f"interface {pair.server_if} {{ AdvSendAdvert on; MinRtrAdvInterval 3; MaxRtrAdvInterval 4;\n"
                f" prefix {prefix} {{ AdvOnLink on; AdvAutonomous on; }}; }};\n")
            (conf / "radvd.conf").chmod(0o444)
            argv = ["-C", f"{conf}/radvd.conf", "-p", f"{conf}/radvd.pid", "-m", "stderr"]
            if root_agent:
                argv += ["-u", "root"]  # what Neutron passes when the agent runs as root
        else:
            www = data / "www"
            www.mkdir()
            (www / "index.html").write_text("metadata\n")
            backend = pair.host(2)
            pair.exec_client(["ip", "addr", "add", f"{backend}/24", "dev", pair.client_if])
            # Neutron's metadata proxy config names the agent's euid/egid by name: root for a root agent.
            who = "    user root\n    group root\n" if root_agent else ""
            (conf / "haproxy.cfg").write_text(
                f"global\n    pidfile {conf}/haproxy.pid\n{who}    daemon\ndefaults\n    mode http\n"
                "    timeout connect 5s\n    timeout client 5s\n    timeout server 5s\n"
                f"listen l\n    bind {pair.server_ip}:80\n    server m {backend}:8080\n")
            argv = client.haproxy_pid_file_args(["-f", f"{conf}/haproxy.cfg"])
            assert argv[-2:] == ["-p", f"{conf}/haproxy.pid"], "the wrapper names the config's pidfile"
        if not root_agent:
            chown_tree(data, uid)
        else:
            assert owner(data)[:2] == (0, 0) and owner(conf)[:2] == (0, 0), "everything is the root agent's"
        http = None
        if profile == "haproxy":
            http = subprocess.Popen(["ip", "netns", "exec", pair.client_ns, "busybox", "httpd", "-f", "-p",
                                     f"{pair.host(2)}:8080", "-h", str(data / "www")])
        try:
            r = b.request(client.start_request(profile, argv, netns=ns))
            assert r["ok"], r
            st = status(r["pid"])
            # haproxy's gid is the agent's (group = "agent": the metadata agent's socket); root's here.
            gid = 0 if profile == "haproxy" and root_agent else uid
            assert st["Uid"].split() == [str(uid)] * 4 and st["Gid"].split() == [str(gid)] * 4
            caps = [c for c in load_profile(profile, None).capabilities if c not in ("SETUID", "SETGID")]
            assert int(st["CapEff"], 16) == caps_mask(caps) == int(st["CapAmb"], 16)
            assert int(st["CapBnd"], 16) & caps_mask(["SETUID", "SETGID"]) == 0, "it can never setuid(0)"

            if profile == "dnsmasq":
                lease = netlab.dhcp_lease(pair.client_ns, pair.client_if, timeout=10)
                assert lease["ip"] == pair.host(50)
                leases = data / pair.server_ns / "leases"
                netlab.wait_for(lambda: pair.host(50) in leases.read_text(), timeout=5,
                                message=f"dnsmasq (uid {uid}) wrote its lease file")
                assert pair.host(77) in leases.read_text(), "the leases the agent wrote before the start are kept"
                assert owner(leases) == (uid, uid, 0o644)
                if root_agent:
                    assert owner(data / pair.server_ns)[:2] == (0, 0), "the directory stays the agent's"
                    assert owner(data / pair.server_ns / "pid") == (0, 0, 0o644), "the host writes the pid file"
                    assert int((data / pair.server_ns / "pid").read_text()) == r["pid"]
            elif profile == "keepalived":
                netlab.wait_for(lambda: f"{vip}/24" in netlab.link_addresses(pair.server_ns, pair.server_if),
                                timeout=15, message="keepalived becomes MASTER and holds the VIP")
                vrrp = int((conf / "k.pid-vrrp").read_text())
                assert status(vrrp)["PPid"] == str(r["pid"]) and status(vrrp)["Uid"].split()[0] == str(uid)
                if root_agent:
                    assert owner(conf / "k.pid-vrrp") == (0, 0, 0o644) and owner(conf / "k.pid") == (0, 0, 0o644)
            elif profile == "radvd":
                netlab.wait_for(lambda: any(ipaddress.ip_interface(a).ip in prefix for a in
                                            netlab.link_addresses(pair.client_ns, pair.client_if)),
                                timeout=20, message="the client autoconfigures from radvd's RA")
            else:
                got = netlab.wait_for(lambda: netlab.http_get(pair.client_ns, f"http://{pair.server_ip}:80/",
                                                              timeout=2), timeout=10)
                assert got == (200, "metadata\n")
                assert (conf / "haproxy.pid").read_text() == f"{r['pid']}\n"
        finally:
            if http is not None:
                http.kill()
                http.wait()
            b.cleanup()


@pytest.mark.parametrize("profile", ["dnsmasq", "keepalived", "radvd", "haproxy"])
def test_each_program_works_as_the_channels_allocated_uid_under_a_root_agent(make_broker, profile: str) -> None:
    b = make_broker(profiles=[profile])  # nothing about uids configured; agent_uid defaults to 0
    uid = allocated_uid(b.channel)
    assert uid >= 65536 and b.engine.config.channel(b.channel).sidecar_user == (uid, uid)
    run_program(b, profile, uid, root_agent=True)


def test_an_explicit_sidecar_uid_keeps_working(make_broker) -> None:
    uid = 200000 + secrets.randbelow(50000)
    b = make_broker(profiles=["dnsmasq"], extra=f"sidecar_uid = {uid}\nsidecar_gid = {uid}\n")
    run_program(b, "dnsmasq", uid, root_agent=False)


# -- per-uid kernel limits: a sidecar exhausting its uid's inotify instances -------------------------

HOG_PROFILE = """name = "inotify-hog"
description = "test: opens inotify instances until refused, then holds them"
command = ["/usr/local/bin/inotify-hog"]
capabilities = []
netns = "required"
netns_pattern = 'qdhcp-[0-9a-f-]{36}'
signals = ["TERM", "KILL"]
stop_grace = 1
"""


@pytest.fixture(scope="module")
def hog_image(test_image: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The test image plus a static program (tests/support/programs/inotify_hog.c), built offline."""
    if shutil.which("gcc") is None:
        pytest.fail("gcc is needed to build the inotify test program (scripts/testbed-setup installs it)")
    d = tmp_path_factory.mktemp("hog")
    subprocess.run(["gcc", "-static", "-O2", "-o", str(d / "hog"), str(REPO / "tests/support/programs/inotify_hog.c")],
                   check=True, timeout=120)
    (d / "Containerfile").write_text(f"FROM {test_image}\nCOPY hog /usr/local/bin/inotify-hog\n")
    tag = f"localhost/safespawn-test-inotify:{secrets.token_hex(4)}"
    subprocess.run(["podman", "build", "-q", "-t", tag, str(d)], check=True, capture_output=True, timeout=300)
    yield tag
    subprocess.run(["podman", "rmi", "-f", tag], capture_output=True, timeout=60)


def inotify_instances_open(uid: int) -> int:
    """inotify instances held by processes of `uid` (the kernel's count is per uid)."""
    n = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.stat(f"/proc/{pid}").st_uid != uid:
                continue
            n += sum(os.readlink(f"/proc/{pid}/fd/{fd}") == "anon_inode:inotify"
                     for fd in os.listdir(f"/proc/{pid}/fd"))
        except OSError:
            continue
    return n


def host_root_can_inotify() -> bool:
    """A fresh host root process opens an inotify instance (what systemd, `safespawn watch` do)."""
    code = ("import ctypes,os,sys; libc=ctypes.CDLL(None, use_errno=True); fd=libc.inotify_init1(0); "
            "sys.exit(0 if fd >= 0 else ctypes.get_errno())")
    return subprocess.run(["/usr/bin/python3", "-c", code], timeout=30).returncode == 0


def test_a_sidecar_exhausting_its_uids_inotify_instances_leaves_host_root_and_other_channels_theirs(
        make_broker, hog_image: str) -> None:
    b = make_broker(profiles=["inotify-hog"], channels=2, image=hog_image)
    (b.root / "profiles").mkdir(exist_ok=True)
    (b.root / "profiles" / "inotify-hog.toml").write_text(HOG_PROFILE)
    a_ch, b_ch = b.channel, b.extra_channels[0]
    limit = int(Path("/proc/sys/fs/inotify/max_user_instances").read_text())
    assert host_root_can_inotify(), "precondition: root can open an inotify instance"
    got = {}
    nss = []
    try:
        for ch in (a_ch, b_ch):
            ns = f"qdhcp-{uuid.uuid4()}"
            netlab.netns_add(ns)
            nss.append(ns)
            r = b.request(client.start_request("inotify-hog", [], netns=ns), channel=ch)
            assert r["ok"], r
            uid = allocated_uid(ch)
            assert status(r["pid"])["Uid"].split()[0] == str(uid)
            out = netlab.wait_for(lambda: re.search(r"refused after (\d+): (.*)", netlab.podman_logs(r["sidecar"])),
                                  timeout=20, message=f"channel {ch}'s sidecar reaches its uid's limit")
            got[ch] = (int(out.group(1)), out.group(2))
            # Checked while channel A's sidecar holds every instance its uid may have:
            assert host_root_can_inotify(), "host root processes still open inotify instances"
        # Each sidecar's uid was fresh: each got exactly the per-uid allowance, B despite A holding all of A's.
        assert got[a_ch] == (limit, "Too many open files"), got
        assert got[b_ch] == (limit, "Too many open files"), got
        assert inotify_instances_open(allocated_uid(a_ch)) == limit, "A's sidecar still holds them all"
        assert inotify_instances_open(0) < limit
    finally:
        b.cleanup()
        for ns in nss:
            netlab.netns_delete(ns)
