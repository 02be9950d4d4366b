"""The real-component fixtures work: the test image, netns pairs, DHCP leases, podman helpers.

These also pin down, as executable facts, the smallest capability sets with which each sidecar
program does its real job in a netns (with ``--cap-drop ALL``, ``no-new-privileges`` and a
read-only root filesystem). If a program's needs change, these tests say so first.
"""

from __future__ import annotations

import ipaddress
import secrets
import subprocess
import time
from pathlib import Path

import pytest
from support import netlab
from support.netlab import NetnsPair

# Measured on the test bed (Debian 12: dnsmasq 2.90, haproxy 2.6, keepalived 2.2.7, radvd 2.19).
# dnsmasq always calls setgroups()/setgid() and, as root, switches to user nobody unless told
# otherwise; NET_RAW is for its ICMP ping check (not needed with --no-ping; Neutron does not pass it).
DNSMASQ_CAPS = ["NET_ADMIN", "NET_BIND_SERVICE", "SETGID", "SETUID"]
DNSMASQ_CAPS_WITH_PING = [*DNSMASQ_CAPS, "NET_RAW"]
HAPROXY_CAPS_PORT_80 = ["NET_BIND_SERVICE"]  # + SETUID, SETGID with `user`/`group` in its config
KEEPALIVED_CAPS = ["NET_ADMIN", "NET_RAW"]  # NET_BROADCAST is not needed
RADVD_CAPS = ["NET_RAW"]  # + SETUID, SETGID with `-u USER` (Neutron passes it)


def sidecar_argv(
    image: str,
    pair: NetnsPair,
    label: str,
    shared: Path,
    caps: list[str],
    program: list[str],
    *,
    name: str | None = None,
    read_only: bool = True,
) -> tuple[str, list[str]]:
    """The podman argv of a sidecar the way safespawn builds them (no shell, caps from a list)."""
    name = name or netlab.unique_name()
    argv = ["run", "-d", "--name", name, "--label", label,
            "--network", f"ns:{pair.server_netns_path}",
            "--cap-drop", "ALL"]
    for cap in caps:
        argv += ["--cap-add", cap]
    argv += ["--security-opt", "no-new-privileges", "-v", f"{shared}:{shared}"]
    if read_only:
        argv += ["--read-only"]
    return name, [*argv, image, *program]


def start_sidecar(*args: object, **kw: object) -> str:
    name, argv = sidecar_argv(*args, **kw)  # type: ignore[arg-type]
    netlab.podman(*argv)
    return name


def assert_running(name: str, settle: float = 0.3) -> None:
    time.sleep(settle)
    info = netlab.podman_inspect(name)
    assert info is not None
    assert info["State"]["Running"], netlab.podman_logs(name)


def dnsmasq_argv(pair: NetnsPair, shared: Path, *extra: str, ping: bool = False) -> list[str]:
    return [
        "dnsmasq", "-k", *([] if ping else ["--no-ping"]), "--port=0", "--log-facility=-",
        f"--dhcp-range={pair.host(100)},{pair.host(150)},255.255.255.0,1h",
        f"--interface={pair.server_if}",
        f"--pid-file={shared}/dnsmasq.pid",
        f"--dhcp-leasefile={shared}/leases",
        f"--dhcp-hostsfile={shared}/hosts",
        *extra,
    ]


# --------------------------------------------------------------------------------------------------
# pure helpers


def test_wait_for_returns_the_truthy_value() -> None:
    calls = iter([0, None, "", "ok"])
    assert netlab.wait_for(lambda: next(calls), timeout=2, interval=0.001) == "ok"


def test_wait_for_times_out_and_chains_the_last_error() -> None:
    def boom() -> bool:
        raise ValueError("not yet")

    with pytest.raises(TimeoutError, match="never") as ei:
        netlab.wait_for(boom, timeout=0.05, interval=0.01, message="never")
    assert isinstance(ei.value.__cause__, ValueError)


def test_unique_names_and_macs() -> None:
    names = {netlab.unique_name() for _ in range(100)}
    assert len(names) == 100
    assert all(n.startswith("sst-") and len(n) == 10 for n in names)
    mac = netlab.random_mac()
    first = int(mac.split(":")[0], 16)
    assert first & 0x02 and not first & 0x01  # locally administered unicast


def test_run_timeout_is_explicit() -> None:
    with pytest.raises(netlab.NetlabError, match="timed out"):
        netlab.run(["sleep", "5"], timeout=0.2)


# --------------------------------------------------------------------------------------------------
# the image


@pytest.mark.parametrize(
    "argv, expect",
    [
        (["dnsmasq", "--version"], "Dnsmasq version"),
        (["haproxy", "-v"], "HAProxy version"),
        (["keepalived", "--version"], "Keepalived v"),
        (["radvd", "--version"], "Version:"),  # exits 1 even on the host
        (["ip", "-V"], "iproute2"),
        (["sh", "-c", "sleep 0 && env | grep -q PATH && id -un"], "root"),
    ],
)
def test_image_runs_each_program(test_image: str, argv: list[str], expect: str) -> None:
    cp = netlab.podman("run", "--rm", "--network", "none", test_image, *argv, check=False)
    assert expect in cp.stdout + cp.stderr


def test_image_build_is_idempotent_and_labelled(test_image: str) -> None:
    before = netlab.podman("image", "inspect", "--format", "{{.Id}}", test_image).stdout.strip()
    t0 = time.monotonic()
    assert netlab.build_test_image(test_image) == test_image
    assert time.monotonic() - t0 < 5
    after = netlab.podman("image", "inspect", "--format", "{{.Id}}", test_image).stdout.strip()
    assert before == after
    label = netlab.podman(
        "image", "inspect", "--format", '{{ index .Labels "safespawn.inputs" }}', test_image
    ).stdout.strip()
    assert len(label) == 32


# --------------------------------------------------------------------------------------------------
# netns pairs


def test_netns_pair_creates_and_always_removes() -> None:
    pair = NetnsPair(client_addr="10.250.0.2/24", server_addr="10.250.0.1/24",
                     server_addr6="fd00:5afe::1/64", client_mac="02:00:00:00:00:42")
    with pytest.raises(RuntimeError, match="inside"):
        with pair:
            assert netlab.netns_exists(pair.server_ns) and netlab.netns_exists(pair.client_ns)
            assert "10.250.0.1/24" in netlab.link_addresses(pair.server_ns, pair.server_if)
            assert "fd00:5afe::1/64" in netlab.link_addresses(pair.server_ns, pair.server_if)
            assert netlab.get_mac(pair.client_ns, pair.client_if) == "02:00:00:00:00:42"
            pair.exec_client(["busybox", "ping", "-c", "1", "-W", "2", pair.server_ip], timeout=10)
            server = subprocess.Popen(
                ["ip", "netns", "exec", pair.client_ns, *netlab.tcp_listen_argv("10.250.0.2", 9000, "hi")],
                stdout=subprocess.PIPE, text=True,
            )
            try:
                assert server.stdout is not None and server.stdout.readline() == "listening\n"
                out = pair.exec_server(["busybox", "nc", "10.250.0.2", "9000"], timeout=10).stdout
                assert out == "hi"
            finally:
                server.kill()
                server.wait()
            # the host never sees these interfaces
            host_links = netlab.run(["ip", "-o", "link"]).stdout
            assert pair.server_if not in host_links and pair.client_if not in host_links
            raise RuntimeError("inside")
    assert not netlab.netns_exists(pair.server_ns)
    assert not netlab.netns_exists(pair.client_ns)
    pair.destroy()  # idempotent


def test_netns_pair_failed_create_cleans_up() -> None:
    pair = NetnsPair(server_addr="not-an-address")
    with pytest.raises(netlab.NetlabError):
        pair.create()
    assert not netlab.netns_exists(pair.server_ns)
    assert not netlab.netns_exists(pair.client_ns)


def test_dhcp_lease_without_server_raises_with_output(netns_pair: NetnsPair) -> None:
    t0 = time.monotonic()
    with pytest.raises(netlab.NetlabError, match="no DHCP lease") as ei:
        netlab.dhcp_lease(netns_pair.client_ns, netns_pair.client_if, timeout=2)
    assert "udhcpc" in str(ei.value)
    assert time.monotonic() - t0 < 10


# --------------------------------------------------------------------------------------------------
# podman helpers


def test_podman_helpers(test_image: str, container_label: str) -> None:
    name = netlab.unique_name()
    netlab.podman("run", "-d", "--init", "--name", name, "--label", container_label,
                  "--network", "none", test_image, "sleep", "300")
    assert netlab.podman_inspect("sst-no-such-container") is None
    info = netlab.podman_inspect(name)
    assert info is not None and info["State"]["Running"]
    ps = netlab.podman_ps(container_label)
    assert [c["Names"] for c in ps] == [[name]]
    assert ps[0]["Labels"][netlab.TEST_LABEL] == container_label.split("=", 1)[1]
    assert netlab.podman_ps([container_label, "other.label=x"]) == []
    assert netlab.podman_rm_by_label(container_label) == [info["Id"]]
    assert netlab.podman_ps(container_label) == []
    assert netlab.podman_inspect(name) is None


# --------------------------------------------------------------------------------------------------
# real sidecars, minimal capabilities


def test_dnsmasq_sidecar_dynamic_then_static_lease(
    test_image: str, netns_pair: NetnsPair, container_label: str, shared_dir: Path
) -> None:
    pair = netns_pair
    (shared_dir / "hosts").write_text("")
    name = start_sidecar(test_image, pair, container_label, shared_dir, DNSMASQ_CAPS,
                         dnsmasq_argv(pair, shared_dir))
    assert_running(name)

    lease = netlab.dhcp_lease(pair.client_ns, pair.client_if, timeout=10)
    ip = ipaddress.ip_address(lease["ip"])
    assert ipaddress.ip_address(pair.host(100)) <= ip <= ipaddress.ip_address(pair.host(150))
    assert lease["mask"] == "255.255.255.0" and lease["prefixlen"] == 24
    assert lease["router"] == pair.server_ip
    assert lease["serverid"] == pair.server_ip
    assert lease["mac"] in (shared_dir / "leases").read_text()

    # A static entry for a new MAC, picked up on HUP (the file is replaced by rename, as Neutron does).
    mac = netlab.random_mac()
    tmp = shared_dir / "hosts.tmp"
    tmp.write_text(f"{mac},static-host,{pair.host(50)}\n")
    tmp.chmod(0o644)
    tmp.rename(shared_dir / "hosts")
    netlab.podman("kill", "--signal", "HUP", name)
    assert_running(name, settle=0.1)

    static = netlab.dhcp_lease(pair.client_ns, pair.client_if, timeout=10, mac=mac, configure=True)
    assert static["ip"] == pair.host(50)
    assert static["hostname"] == "static-host"
    assert static["mac"] == mac
    assert f"{pair.host(50)}/24" in netlab.link_addresses(pair.client_ns, pair.client_if)
    leases = (shared_dir / "leases").read_text()
    assert f"{mac} {pair.host(50)} static-host" in leases


@pytest.mark.parametrize("missing", DNSMASQ_CAPS)
def test_dnsmasq_needs_each_of_its_caps(
    test_image: str, netns_pair: NetnsPair, container_label: str, shared_dir: Path, missing: str
) -> None:
    caps = [c for c in DNSMASQ_CAPS if c != missing]
    (shared_dir / "hosts").write_text("")
    name = start_sidecar(test_image, netns_pair, container_label, shared_dir, caps,
                         dnsmasq_argv(netns_pair, shared_dir))
    info = netlab.wait_for(
        lambda: (i := netlab.podman_inspect(name)) and not i["State"]["Running"] and i, timeout=5,
        message=f"dnsmasq without {missing} exits",
    )
    assert info["State"]["ExitCode"] != 0


def test_dnsmasq_ping_check_needs_net_raw(
    test_image: str, netns_pair: NetnsPair, container_label: str, shared_dir: Path
) -> None:
    (shared_dir / "hosts").write_text("")
    argv = dnsmasq_argv(netns_pair, shared_dir, ping=True)
    name = start_sidecar(test_image, netns_pair, container_label, shared_dir, DNSMASQ_CAPS, argv)
    netlab.wait_for(lambda: not netlab.podman_inspect(name)["State"]["Running"], timeout=5)
    assert "missing required capability NET_RAW" in netlab.podman_logs(name)
    name = start_sidecar(test_image, netns_pair, container_label, shared_dir,
                         DNSMASQ_CAPS_WITH_PING, argv)
    assert_running(name)


HAPROXY_CFG = """global
    log /dev/log local0 debug
    {user}maxconn 1024
    pidfile {shared}/haproxy.pid
    daemon
defaults
    mode http
    timeout connect 5s
    timeout client 5s
    timeout server 5s
listen listener
    bind {bind}:80
    server metadata {backend}:8080
    http-request set-header X-Neutron-Network-ID net-1
"""


@pytest.mark.parametrize("with_user", [False, True], ids=["root", "user-haproxy"])
def test_haproxy_sidecar_binds_port_80(
    test_image: str, netns_pair: NetnsPair, container_label: str, shared_dir: Path, with_user: bool
) -> None:
    """Neutron's metadata proxy shape: port 80 in the netns, config with `daemon` (``-db`` wins)."""
    pair = netns_pair
    backend = pair.host(2)
    pair.exec_client(["ip", "addr", "add", f"{backend}/24", "dev", pair.client_if])
    (shared_dir / "haproxy.cfg").write_text(HAPROXY_CFG.format(
        user="user haproxy\n    group haproxy\n    " if with_user else "",
        shared=shared_dir, bind=pair.server_ip, backend=backend))
    www = shared_dir / "www"
    www.mkdir()
    (www / "index.html").write_text("metadata\n")
    server = subprocess.Popen(
        ["ip", "netns", "exec", pair.client_ns, "busybox", "httpd", "-f",
         "-p", f"{backend}:8080", "-h", str(www)]
    )
    try:
        caps = HAPROXY_CAPS_PORT_80 + (["SETGID", "SETUID"] if with_user else [])
        name = start_sidecar(test_image, pair, container_label, shared_dir, caps,
                             ["haproxy", "-Ws", "-db", "-f", f"{shared_dir}/haproxy.cfg"])
        assert_running(name)
        status, body = netlab.wait_for(
            lambda: netlab.http_get(pair.client_ns, f"http://{pair.server_ip}:80/", timeout=2),
            timeout=10,
        )
        assert (status, body) == (200, "metadata\n")
        netlab.podman("kill", "--signal", "USR2", name)  # reload
        assert_running(name)
        assert netlab.http_get(pair.client_ns, f"http://{pair.server_ip}:80/")[0] == 200
    finally:
        server.kill()
        server.wait()


def test_haproxy_port_80_needs_net_bind_service(
    test_image: str, netns_pair: NetnsPair, container_label: str, shared_dir: Path
) -> None:
    (shared_dir / "haproxy.cfg").write_text(HAPROXY_CFG.format(
        user="", shared=shared_dir, bind=netns_pair.server_ip, backend=netns_pair.host(2)))
    name = start_sidecar(test_image, netns_pair, container_label, shared_dir, [],
                         ["haproxy", "-Ws", "-db", "-f", f"{shared_dir}/haproxy.cfg"])
    netlab.wait_for(lambda: not netlab.podman_inspect(name)["State"]["Running"], timeout=5)
    assert "cannot bind socket (Permission denied)" in netlab.podman_logs(name)


def test_keepalived_sidecar_holds_a_vip(
    test_image: str, netns_pair: NetnsPair, container_label: str, shared_dir: Path
) -> None:
    pair = netns_pair
    vip = pair.host(200)
    (shared_dir / "keepalived.conf").write_text(f"""global_defs {{
    router_id neutron
}}
vrrp_instance VR_1 {{
    state BACKUP
    interface {pair.server_if}
    virtual_router_id 1
    priority 50
    nopreempt
    advert_int 1
    virtual_ipaddress {{
        {vip}/24 dev {pair.server_if}
    }}
}}
""")
    name = start_sidecar(test_image, pair, container_label, shared_dir, KEEPALIVED_CAPS,
                         ["keepalived", "-n", "-l", "-D", "-P", "-f", f"{shared_dir}/keepalived.conf",
                          "-p", f"{shared_dir}/keepalived.pid", "-r", f"{shared_dir}/vrrp.pid"])
    assert_running(name)
    netlab.wait_for(
        lambda: f"{vip}/24" in netlab.link_addresses(pair.server_ns, pair.server_if),
        timeout=15, message="keepalived becomes MASTER and adds the VIP",
    )
    pair.exec_client(["ip", "addr", "add", f"{pair.host(3)}/24", "dev", pair.client_if])
    pair.exec_client(["busybox", "ping", "-c", "1", "-W", "2", vip], timeout=10)  # the VIP answers
    logs = netlab.podman_logs(name)
    assert "Entering MASTER STATE" in logs
    assert "Operation not permitted" not in logs


def test_radvd_sidecar_advertises_a_prefix(
    test_image: str, container_label: str, shared_dir: Path
) -> None:
    prefix = ipaddress.IPv6Network(f"fd00:5afe:{secrets.randbelow(0xFFFF):x}::/64")
    with NetnsPair(server_addr6=f"{prefix.network_address + 1}/64") as pair:
        conf = shared_dir / "radvd.conf"
        conf.write_text(f"""interface {pair.server_if}
{{
   AdvSendAdvert on;
   MinRtrAdvInterval 3;
   MaxRtrAdvInterval 10;
   prefix {prefix}
   {{
        AdvOnLink on;
        AdvAutonomous on;
   }};
}};
""")
        conf.chmod(0o444)  # radvd refuses a config writable by others; Neutron writes it 0444
        name = start_sidecar(test_image, pair, container_label, shared_dir,
                             [*RADVD_CAPS, "SETGID", "SETUID"],
                             ["radvd", "-n", "-C", str(conf), "-p", f"{shared_dir}/radvd.pid",
                              "-u", "nobody", "-m", "stderr"])
        assert_running(name)

        def slaac() -> list[str]:
            return [a for a in netlab.link_addresses(pair.client_ns, pair.client_if)
                    if ipaddress.ip_interface(a).ip in prefix]

        addrs = netlab.wait_for(slaac, timeout=15, message="client autoconfigures from the RA")
        assert len(addrs) == 1
        netlab.podman("kill", "--signal", "HUP", name)
        assert_running(name)
        netlab.podman("rm", "-f", "-t", "0", name)
