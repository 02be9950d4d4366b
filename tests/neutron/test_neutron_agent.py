"""Neutron 29's own code drives safespawn's wrappers and kill scripts against a real broker.

The agent is tests/neutron/neutron_agent.py, run with the Neutron venv's python (scripts/neutron-venv;
never imported here, so the project's venv stays free of Neutron). Its PATH starts with the folder
`safespawn wrappers install` wrote, and [AGENT] kill_scripts_path is that folder: Neutron runs
`ip netns exec NS env PROCESS_TAG=... dnsmasq ...` and `.../dnsmasq-kill HUP PID` exactly as it would
in an agent container. The broker is a real `safespawn watch` process; the sidecars are real podman
containers in real network namespaces, and the checks are real traffic (DHCP, HTTP, VRRP).
"""

from __future__ import annotations

import http.server
import json
import os
import queue
import signal
import socketserver
import subprocess
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest
from support import netlab
from support.broker import REPO, Broker
from support.netlab import NetnsPair

pytestmark = [pytest.mark.integration, pytest.mark.neutron]
AGENT = Path(__file__).with_name("neutron_agent.py")
L3_IMAGE = "localhost/safespawn-test-l3:latest"


@pytest.fixture(scope="session")
def neutron_python() -> str:
    """The Neutron venv's python; scripts/neutron-venv creates it when missing (no skip: CI must run this)."""
    out = subprocess.run(["bash", str(REPO / "scripts" / "neutron-venv")], capture_output=True, text=True,
                         timeout=900, check=True).stdout
    return out.strip().splitlines()[-1]


@pytest.fixture(scope="session")
def l3_image(test_image: str, neutron_python: str) -> str:
    subprocess.run(["bash", str(REPO / "scripts" / "build-l3-test-image"), L3_IMAGE, test_image],
                   check=True, stdout=subprocess.DEVNULL, timeout=300)
    return L3_IMAGE


class Agent:
    """The Neutron agent process; `agent("op", **args)` runs one step and returns its result."""

    def __init__(self, python: str, state_path: Path, wrappers: Path, log: Path) -> None:
        env = dict(os.environ, NEUTRON_STATE_PATH=str(state_path), KILL_SCRIPTS_PATH=str(wrappers),
                   PATH=f"{wrappers}:{os.environ.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}",
                   SAFESPAWN_TIMEOUT="60")
        self.log = log
        self.proc = subprocess.Popen([python, str(AGENT)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=open(log, "ab"), env=env, text=True, cwd="/")
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        assert self._reply(120).get("ready"), "the Neutron agent did not start"

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)

    def _reply(self, timeout: float) -> dict[str, Any]:
        try:
            return dict(json.loads(self.lines.get(timeout=timeout)))
        except queue.Empty:
            raise AssertionError(f"no answer from the Neutron agent in {timeout}s; log:\n"
                                 f"{self.log.read_text()[-3000:]}") from None

    def __call__(self, op: str, timeout: float = 120, **args: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self.proc.stdin.flush()
        r = self._reply(timeout)
        assert r["ok"], f"{op} failed in Neutron:\n{r.get('error')}\nagent log:\n{self.log.read_text()[-3000:]}"
        return r

    def stop(self) -> None:
        """The agent goes away (a restart or an upgrade); its sidecars must not."""
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


@pytest.fixture
def neutron(tmp_path, neutron_python, make_broker):
    """make(profiles, image=None) -> (broker with `safespawn watch` running, agent factory)."""
    made: list[Agent] = []
    brokers: list[Broker] = []

    def make(profiles: list[str], **kw: Any) -> tuple[Broker, Any]:
        broker = make_broker(profiles=profiles, **kw)
        brokers.append(broker)
        wrappers = tmp_path / "wrappers"
        out = broker.cli("wrappers", "install", "--channel", broker.channel, "--channel-dir",
                         str(broker.channel_dir()), str(wrappers), check=True)
        assert "written" in out.stdout
        broker.start_watch()

        def agent() -> Agent:
            a = Agent(neutron_python, broker.data_dir, wrappers, tmp_path / "agent.log")
            made.append(a)
            return a

        return broker, agent

    yield make
    for a in made:
        a.stop()
    for b in brokers:
        b.cleanup()  # stops `safespawn watch` first, so nothing is respawned
    _kill_escaped_sidecars(tmp_path)


def _kill_escaped_sidecars(tmp_path: Path) -> None:
    """Kill what is left of this test's sidecars after the brokers' cleanup.

    On this test bed a `systemd --user` manager starting (other tests do that) moves every process
    out of its pids/memory cgroups; podman then cannot stop a --pid host container (crun signals it
    through the cgroup) and the process survives `podman rm -f`. Its command line names the test's
    own data dir, so it is this test's and nothing else.
    """
    mark = str(tmp_path).encode()
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if mark in (d / "cmdline").read_bytes():
                    os.kill(int(d.name), 9)
            except OSError:
                pass


def tmp_path_of(broker: Broker) -> Path:
    """The folder the neutron fixture installed the wrappers and kill scripts into."""
    return broker.root.parent / "wrappers"


def running(broker: Broker) -> list[dict[str, Any]]:
    return [c for c in broker.containers() if c["State"] == "running"]


def cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]


# -- backends the sidecars talk to -----------------------------------------------------------------

class _UnixHTTPServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


def unix_http_server(path: Path, seen: list[dict[str, str]], body: str = "", mode: int | None = None) -> _UnixHTTPServer:
    """An HTTP server on a unix socket that records each request's headers (Neutron's metadata
    agent and L3 agent listen like this) and answers 200 with `body` plus the request's headers.
    `mode`: chmod the socket as Neutron's metadata agent does (metadata_proxy_socket_mode)."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def _answer(self) -> None:
            headers = {k.lower(): v for k, v in self.headers.items()}
            headers["path"] = self.path
            seen.append(headers)
            data = (body + json.dumps(headers)).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = _answer

        def address_string(self) -> str:
            return "unix"

        def log_message(self, *a: Any) -> None:
            pass

    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        path.unlink()
    srv = _UnixHTTPServer(str(path), Handler)
    if mode is not None:
        path.chmod(mode)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


# -- dnsmasq ---------------------------------------------------------------------------------------

def test_dnsmasq_lifecycle_through_neutrons_process_manager(neutron):
    broker, new_agent = neutron(["dnsmasq"])
    net_id, sub_id = str(uuid.uuid4()), str(uuid.uuid4())
    with NetnsPair(server_ns=f"qdhcp-{net_id}") as pair:
        client_mac = netlab.get_mac(pair.client_ns, pair.client_if)
        ports = [{"mac": netlab.get_mac(pair.server_ns, pair.server_if), "ip": pair.server_ip,
                  "owner": "network:dhcp"},
                 {"mac": client_mac, "ip": pair.host(50)}]
        net = {"network_id": net_id, "subnet_id": sub_id, "cidr": str(pair.network), "interface": pair.server_if}
        pid_file = str(broker.data_dir / "dhcp" / net_id / "pid")
        pm = {"uuid": net_id, "namespace": pair.server_ns, "service": "dnsmasq", "pid_file": pid_file}

        # enable(): Neutron's Dnsmasq driver -> ProcessManager.enable(ensure_active=True) -> wrapper.
        agent = new_agent()
        r = agent("dhcp_enable", ports=ports, **net)
        assert r["active"] and r["namespace"] == pair.server_ns
        [c] = running(broker)
        assert c["Pid"] == r["pid"], "the pid file Neutron reads names the sidecar's process"
        assert r["argv"][:2] == ["dnsmasq", "-k"]
        # dnsmasq writes its own (namespace) pid into its private /run; the host wrote the host pid
        # at the path Neutron named.
        assert "--pid-file=/run/safespawn-pid-file-pid" in r["argv"] and pid_file not in " ".join(r["argv"])
        assert Path(pid_file).read_text() == f"{c['Pid']}\n"
        assert netlab.dhcp_lease(pair.client_ns, pair.client_if)["ip"] == pair.host(50)

        # The agent restarts: a fresh ProcessManager sees the sidecar active and starts nothing.
        agent.stop()
        agent = new_agent()
        assert agent("pm_state", **pm) == {"ok": True, "active": True, "pid": r["pid"],
                                           "cmdline": " ".join(r["argv"])}
        again = agent("pm_enable", **pm)
        assert again["active"] and not again["started"] and again["pid"] == r["pid"]
        assert [x["Id"] for x in running(broker)] == [c["Id"]]

        # reload_allocations(): a new port -> hosts file rewritten -> dnsmasq-kill HUP PID.
        mac2 = netlab.random_mac()
        with pytest.raises(netlab.NetlabError):
            netlab.dhcp_lease(pair.client_ns, pair.client_if, timeout=2, mac=mac2)  # unknown MAC: no offer
        r2 = agent("dhcp_reload", ports=ports + [{"mac": mac2, "ip": pair.host(77)}], **net)
        assert r2["active"] and r2["pid"] == r["pid"], "a HUP, not a restart"
        assert [x["Id"] for x in running(broker)] == [c["Id"]]
        assert mac2 in (broker.data_dir / "dhcp" / net_id / "host").read_text()
        assert netlab.dhcp_lease(pair.client_ns, pair.client_if, mac=mac2)["ip"] == pair.host(77)
        signals = [e for e in broker.audit() if e.get("op") == "signal"]
        assert [(e["decision"], e["signal"], e["pid"]) for e in signals] == [("allow", "HUP", r["pid"])]

        # The pid file is lost while dnsmasq runs: Neutron's enable() sees nothing active and runs the
        # program again; the host changes nothing (same spec) and the wrapper restores the pid file.
        os.unlink(pid_file)
        r3 = agent("dhcp_enable", ports=ports + [{"mac": mac2, "ip": pair.host(77)}], **net)
        assert r3["active"] and r3["pid"] == r["pid"]
        assert [x["Id"] for x in running(broker)] == [c["Id"]]

        # disable(): dnsmasq-kill 15 PID -> the sidecar is stopped and removed.
        assert agent("dhcp_disable", ports=ports, **net)["active"] is False
        assert broker.containers() == [] and broker.desired() == {}
        assert not os.path.exists(f"/proc/{r['pid']}")
        # A second disable finds nothing to kill: Neutron sees no pid file and sends nothing.
        assert agent("pm_disable", sig="9", **pm)["active"] is False


# -- haproxy (metadata proxy) ----------------------------------------------------------------------

def test_metadata_proxy_lifecycle_through_neutrons_metadata_driver(neutron):
    broker, new_agent = neutron(["haproxy"])
    net_id = str(uuid.uuid4())
    seen: list[dict[str, str]] = []
    # The metadata agent's socket as `metadata_proxy_socket_mode = group` makes it (0664): haproxy runs
    # as the channel's own uid with the (root) agent's gid (docs/neutron.md).
    backend = unix_http_server(broker.data_dir / "metadata_proxy", seen, body="instance-metadata ", mode=0o664)
    try:
        with NetnsPair(server_ns=f"qdhcp-{net_id}", client_addr=None) as pair:
            # The DHCP agent's isolated-network metadata: 169.254.169.254:80 in the qdhcp- namespace.
            pair.exec_server(["ip", "addr", "add", "169.254.169.254/32", "dev", pair.server_if])
            pair.exec_client(["ip", "addr", "add", pair.host(60) + f"/{pair.network.prefixlen}", "dev",
                              pair.client_if])
            pair.exec_client(["ip", "route", "add", "169.254.169.254/32", "dev", pair.client_if])
            args = {"namespace": pair.server_ns, "network_id": net_id}
            pm = {"uuid": net_id, "namespace": pair.server_ns, "service": "haproxy"}

            agent = new_agent()
            r = agent("metadata_spawn", **args)
            assert r["active"], r
            [c] = running(broker)
            assert c["Pid"] == r["pid"]
            assert f"pidfile     {r['pid_file']}" in r["config"] and "daemon" in r["config"]
            assert cmdline(r["pid"])[:2] == ["haproxy", "-Ws"]
            status, body = netlab.http_get(pair.client_ns, "http://169.254.169.254/latest/meta-data/")
            assert status == 200 and body.startswith("instance-metadata ")
            assert json.loads(body.removeprefix("instance-metadata "))["x-neutron-network-id"] == net_id

            # Agent restart: still active, the same process; reload_cfg() is a HUP to the master.
            agent.stop()
            agent = new_agent()
            assert agent("pm_state", **pm)["active"] is True
            assert agent("pm_reload_cfg", **pm) == {"ok": True, "active": True, "pid": r["pid"]}
            assert [x["Id"] for x in running(broker)] == [c["Id"]]
            netlab.wait_for(lambda: netlab.http_get(pair.client_ns, "http://169.254.169.254/x")[0] == 200,
                            timeout=10, message="metadata after reload")

            # destroy: haproxy-kill 15 PID; the sidecar goes away.
            assert agent("metadata_destroy", **args)["active"] is False
            assert broker.containers() == []
            with pytest.raises(netlab.NetlabError):
                netlab.http_get(pair.client_ns, "http://169.254.169.254/x", timeout=2)
    finally:
        backend.shutdown()
        backend.server_close()


# -- keepalived + neutron-keepalived-state-change --------------------------------------------------

def test_ha_router_keepalived_becomes_master_and_the_state_change_monitor_reports_it(neutron, l3_image):
    broker, new_agent = neutron(["keepalived", "neutron-keepalived-state-change"], image=l3_image)
    router_id, ha_port_id = str(uuid.uuid4()), str(uuid.uuid4())
    ha_if = ("ha-" + ha_port_id)[:14]
    seen: list[dict[str, str]] = []
    # The L3 agent's server for state changes (neutron.agent.l3.ha): $state_path/keepalived-state-change.
    server = unix_http_server(broker.data_dir / "keepalived-state-change", seen)
    try:
        with NetnsPair(server_ns=f"qrouter-{router_id}", server_if=ha_if,
                       server_addr="169.254.192.5/18") as pair:
            agent = new_agent()
            r = agent("ha_spawn", router_id=router_id, ha_port_id=ha_port_id, ha_cidr="169.254.192.0/18")
            assert r["interface"] == ha_if and r["primary_vip"] == "169.254.0.1/24"
            assert f"{r['primary_vip']} dev {ha_if}" in r["config"]

            # keepalived: MASTER, holding the primary VIP on the HA interface.
            netlab.wait_for(lambda: r["primary_vip"] in netlab.link_addresses(pair.server_ns, ha_if),
                            timeout=20, message="keepalived holds the VIP")
            # The monitor (Neutron's own script) saw the VIP arrive, wrote the state file and told the agent.
            state_file = Path(r["conf_dir"]) / "state"
            netlab.wait_for(lambda: state_file.exists() and state_file.read_text() == "primary", timeout=20,
                            message="state file says primary")
            netlab.wait_for(lambda: any(h.get("x-neutron-state") == "primary" for h in seen), timeout=20,
                            message="the agent was told: primary")
            assert all(h["x-neutron-router-id"] == router_id for h in seen)

            st = agent("ha_state", router_id=router_id)
            assert st["keepalived_active"] and st["check_processes"] and st["monitor_active"], st
            by_profile = {c["Labels"]["safespawn.profile"]: c for c in running(broker)}
            assert set(by_profile) == {"keepalived", "neutron-keepalived-state-change"}
            assert by_profile["keepalived"]["Pid"] == st["keepalived_pid"]
            assert by_profile["neutron-keepalived-state-change"]["Pid"] == st["monitor_pid"]
            mon_argv = cmdline(st["monitor_pid"])
            assert f"{router_id}.monitor" in " ".join(mon_argv) and "--namespace" in mon_argv

            # The VRRP child's pid file (KeepalivedManager.check_processes reads it) holds the host pid
            # of the keepalived main process's child, and a kill script given that pid reaches the
            # sidecar; a host process's pid does not.
            vrrp_pid = int(Path(r["keepalived_pid_file"] + "-vrrp").read_text())
            assert Path(f"/proc/{vrrp_pid}/status").read_text().count(f"PPid:\t{st['keepalived_pid']}\n") == 1
            kill = tmp_path_of(broker) / "keepalived-kill"
            ok = subprocess.run([str(kill), "HUP", str(vrrp_pid)], capture_output=True, text=True, timeout=60)
            assert ok.returncode == 0, ok.stderr
            host = subprocess.run([str(kill), "HUP", str(os.getpid())], capture_output=True, text=True, timeout=60)
            assert host.returncode == 1 and "No such process" in host.stderr
            hups = [e for e in broker.audit() if e.get("op") == "signal"]
            assert [(e["decision"], e.get("sidecar")) for e in hups][-2:] == [
                ("allow", by_profile["keepalived"]["Names"][0]), ("deny", None)]

            # The agent restarts; both still run. Then the router goes: TERM to both, both removed.
            agent.stop()
            agent = new_agent()
            assert agent("pm_state", uuid=router_id, namespace=pair.server_ns, service="keepalived",
                         pids_path=str(broker.data_dir / "ha_confs"))["active"] is True
            agent("ha_spawn", router_id=router_id, ha_port_id=ha_port_id, ha_cidr="169.254.192.0/18")
            assert {c["Id"] for c in running(broker)} == {c["Id"] for c in by_profile.values()}, \
                "a re-spawn after the restart reloads (HUP) rather than starting a second keepalived"
            d = agent("ha_disable", router_id=router_id)
            assert d == {"ok": True, "keepalived_active": False, "monitor_active": False}
            assert broker.containers() == []
            netlab.wait_for(lambda: r["primary_vip"] not in netlab.link_addresses(pair.server_ns, ha_if),
                            timeout=10, message="the VIP is gone with keepalived")
    finally:
        server.shutdown()
        server.server_close()



# -- radvd -----------------------------------------------------------------------------------------

def test_radvd_router_advertisements_through_neutrons_ra_daemon_monitor(neutron):
    broker, new_agent = neutron(["radvd"])
    router_id, port_id = str(uuid.uuid4()), str(uuid.uuid4())
    qr_if = ("qr-" + port_id)[:14]
    n = uuid.uuid4().int % 0xFFFF
    prefix, prefix2 = f"fd00:5afe:{n:x}::/64", f"fd00:5afe:{n:x}:1::/64"

    def port(*cidrs: str) -> dict[str, Any]:
        return {"id": port_id, "mtu": 1450, "subnets": [
            {"cidr": c, "ipv6_ra_mode": "slaac", "dns_nameservers": []} for c in cidrs]}

    def client_in(net: str) -> bool:
        import ipaddress

        return any(ipaddress.ip_interface(a).ip in ipaddress.ip_network(net)
                   for a in netlab.link_addresses(pair.client_ns, pair.client_if))

    with NetnsPair(server_ns=f"qrouter-{router_id}", server_if=qr_if,
                   server_addr6=prefix.replace("::/64", "::1/64")) as pair:
        agent = new_agent()
        r = agent("radvd_enable", router_id=router_id, ports=[port(prefix)])
        assert r["active"] and f"interface {qr_if}" in r["config"] and f"prefix {prefix}" in r["config"]
        [c] = running(broker)
        assert c["Pid"] == r["pid"] and cmdline(r["pid"])[:2] == ["radvd", "-n"]
        # A real router advertisement: the client configures a SLAAC address from the prefix.
        netlab.wait_for(lambda: client_in(prefix), timeout=20, message="SLAAC address from radvd's RA")

        # A second prefix: Neutron rewrites the config and sends HUP through radvd-kill.
        r2 = agent("radvd_enable", router_id=router_id, ports=[port(prefix, prefix2)])
        assert r2["active"] and r2["pid"] == r["pid"] and f"prefix {prefix2}" in r2["config"]
        assert [x["Id"] for x in running(broker)] == [c["Id"]]
        netlab.wait_for(lambda: client_in(prefix2), timeout=30, message="the second prefix after HUP")

        # The router loses its IPv6 ports: radvd-kill 9 PID, the sidecar is removed.
        assert agent("radvd_disable", router_id=router_id)["active"] is False
        assert broker.containers() == []


# -- pid files across restarts ---------------------------------------------------------------------


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text()
    except OSError:
        return ""

# How soon after a sidecar restarts a fresh ProcessManager sees it active again: the broker's next
# full sync (reconcile_interval, 2 s here) rewrites the pid file, plus podman's restart itself.
RESTART_BOUND = 2 + 3.0


def test_a_restarted_sidecar_is_seen_active_again_and_a_healthy_one_is_never_respawned(neutron):
    broker, new_agent = neutron(["dnsmasq"], broker_extra="reconcile_interval = 2")
    net_id, sub_id = str(uuid.uuid4()), str(uuid.uuid4())
    with NetnsPair(server_ns=f"qdhcp-{net_id}") as pair:
        ports = [{"mac": netlab.get_mac(pair.server_ns, pair.server_if), "ip": pair.server_ip,
                  "owner": "network:dhcp"}]
        net = {"network_id": net_id, "subnet_id": sub_id, "cidr": str(pair.network), "interface": pair.server_if}
        pid_file = broker.data_dir / "dhcp" / net_id / "pid"
        pm = {"uuid": net_id, "namespace": pair.server_ns, "service": "dnsmasq", "pid_file": str(pid_file)}
        agent = new_agent()
        first = agent("dhcp_enable", ports=ports, **net)
        assert first["active"]
        [c] = running(broker)
        assert agent("monitor_check") == {"ok": True, "respawned": []}, "a healthy sidecar is left alone"

        def seen_active_with_a_new_pid(old: int) -> dict[str, Any]:
            def check() -> dict[str, Any] | None:
                s = agent("pm_state", **pm)  # a fresh ProcessManager each time, as a restarted agent builds
                return s if s["active"] and s["pid"] != old else None

            return netlab.wait_for(check, timeout=RESTART_BOUND, interval=0.3,
                                   message=f"a fresh ProcessManager sees the sidecar active within {RESTART_BOUND}s")

        # 1. The runtime's restart policy: dnsmasq dies (SIGKILL from the host), podman restarts the
        #    same container with a new process; the broker's next sync rewrites the pid file.
        os.kill(first["pid"], 9)
        after_runtime = seen_active_with_a_new_pid(first["pid"])
        [c2] = running(broker)
        assert c2["Id"] == c["Id"] and c2["Pid"] == after_runtime["pid"], "restarted by podman, not replaced"
        assert pid_file.read_text() == f"{c2['Pid']}\n"

        # 2. The broker's respawn: the container is gone; reconcile runs a new one and writes its pid.
        subprocess.run(["podman", "rm", "-f", "-t", "0", c["Id"]], check=True, capture_output=True, timeout=60)
        after_respawn = seen_active_with_a_new_pid(after_runtime["pid"])
        [c3] = running(broker)
        assert c3["Id"] != c["Id"] and c3["Pid"] == after_respawn["pid"]
        assert agent("monitor_check") == {"ok": True, "respawned": []}, "nothing to respawn: it runs"
        assert len(running(broker)) == 1

        # 3. Neutron's ProcessMonitor looks in the window between a crash and the broker's next sync:
        #    it sees the old pid dead and calls the program again, once; that start (the same spec)
        #    makes the pid file true at once, and the next pass finds nothing to do: no respawn loop.
        #    The broker's own checks (watch's quick syncs) are quicker than Neutron's monitor, so the
        #    broker is held (SIGSTOP) while the sidecar dies and Neutron looks, and let go (SIGCONT)
        #    while the program call Neutron makes waits for its reply: the window is there for certain.
        watch = broker._watch
        assert watch is not None
        os.kill(watch.pid, signal.SIGSTOP)
        resume = threading.Timer(2.0, os.kill, (watch.pid, signal.SIGCONT))
        try:
            os.kill(after_respawn["pid"], 9)
            netlab.wait_for(lambda: not _cmdline(after_respawn["pid"]), timeout=10, message="dnsmasq gone")
            resume.start()
            respawned = agent("monitor_check")["respawned"]
        finally:
            resume.cancel()
            os.kill(watch.pid, signal.SIGCONT)
        assert respawned == [f"{net_id}/dnsmasq"]
        now = agent("pm_state", **pm)
        assert now["active"] and now["pid"] != after_respawn["pid"]
        assert agent("monitor_check") == {"ok": True, "respawned": []}
        assert [x["Pid"] for x in running(broker)] == [now["pid"]], "still exactly one dnsmasq"

        # 4. Killed for good (Neutron's own disable with SIGKILL): a fresh ProcessManager sees it inactive.
        assert agent("pm_disable", sig="9", **pm)["active"] is False
        assert broker.containers() == []
        assert agent("pm_state", **pm)["active"] is False
