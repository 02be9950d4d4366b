"""Sidecars run as the channel's unprivileged host uid, with only the profile's capabilities.

`sidecar_uid`/`sidecar_gid` in the channel's config (default: agent_uid/agent_gid) becomes podman's
`--user`; the profile's capabilities are then ambient ones, minus SETUID/SETGID (which would let
the process setuid(0)). Each program does its real job that way: dnsmasq hands out a lease and
writes its lease file, keepalived becomes MASTER and holds the VIP, radvd's advertisement gives the
client a SLAAC address, haproxy serves on port 80. The data dir belongs to the sidecar's uid, as
docs/security.md ("Sidecar uids") says it must.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import subprocess
import uuid
from pathlib import Path

import pytest
from support import netlab
from support.netlab import NetnsPair

from safespawn import client
from safespawn.policy import load_profile

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


@pytest.mark.parametrize("profile", ["dnsmasq", "keepalived", "radvd", "haproxy"])
def test_each_program_works_as_the_channels_unprivileged_uid(make_broker, profile: str) -> None:
    uid = 200000 + secrets.randbelow(50000)
    b = make_broker(profiles=[profile], extra=f"sidecar_uid = {uid}\nsidecar_gid = {uid}\n")
    data = b.data_dir
    prefix = ipaddress.IPv6Network(f"fd00:5afd:{secrets.randbelow(0xFFFF):x}::/64")
    ns = ("qdhcp-" if profile in ("dnsmasq", "haproxy") else "qrouter-") + str(uuid.uuid4())
    with NetnsPair(server_ns=ns, server_addr6=f"{prefix.network_address + 1}/64") as pair:
        conf = data / "conf"
        conf.mkdir()
        if profile == "dnsmasq":
            argv = dnsmasq_argv(data, pair)
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
        else:
            www = data / "www"
            www.mkdir()
            (www / "index.html").write_text("metadata\n")
            backend = pair.host(2)
            pair.exec_client(["ip", "addr", "add", f"{backend}/24", "dev", pair.client_if])
            (conf / "haproxy.cfg").write_text(
                f"global\n    pidfile {conf}/haproxy.pid\n    daemon\ndefaults\n    mode http\n"
                "    timeout connect 5s\n    timeout client 5s\n    timeout server 5s\n"
                f"listen l\n    bind {pair.server_ip}:80\n    server m {backend}:8080\n")
            argv = client.haproxy_pid_file_args(["-f", f"{conf}/haproxy.cfg"])
            assert argv[-2:] == ["-p", f"{conf}/haproxy.pid"], "the wrapper names the config's pidfile"
        chown_tree(data, uid)
        http = None
        if profile == "haproxy":
            http = subprocess.Popen(["ip", "netns", "exec", pair.client_ns, "busybox", "httpd", "-f", "-p",
                                     f"{pair.host(2)}:8080", "-h", str(data / "www")])
        try:
            r = b.request(client.start_request(profile, argv, netns=ns))
            assert r["ok"], r
            st = status(r["pid"])
            assert st["Uid"].split() == [str(uid)] * 4 and st["Gid"].split() == [str(uid)] * 4
            caps = [c for c in load_profile(profile, None).capabilities if c not in ("SETUID", "SETGID")]
            assert int(st["CapEff"], 16) == caps_mask(caps) == int(st["CapAmb"], 16)
            assert int(st["CapBnd"], 16) & caps_mask(["SETUID", "SETGID"]) == 0, "it can never setuid(0)"

            if profile == "dnsmasq":
                lease = netlab.dhcp_lease(pair.client_ns, pair.client_if, timeout=10)
                assert lease["ip"] == pair.host(50)
                leases = data / pair.server_ns / "leases"
                netlab.wait_for(lambda: pair.host(50) in leases.read_text(), timeout=5,
                                message=f"dnsmasq (uid {uid}) wrote its lease file")
            elif profile == "keepalived":
                netlab.wait_for(lambda: f"{vip}/24" in netlab.link_addresses(pair.server_ns, pair.server_if),
                                timeout=15, message="keepalived becomes MASTER and holds the VIP")
                vrrp = int((conf / "k.pid-vrrp").read_text())
                assert status(vrrp)["PPid"] == str(r["pid"]) and status(vrrp)["Uid"].split()[0] == str(uid)
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
