"""A compromised sidecar gains nothing on the host, nor in another channel (issue 9).

For each built-in profile a real broker starts the real program in a real netns with a config shaped
like the one Neutron writes. Then `podman exec` runs busybox's shell in that sidecar: it has the
sidecar's namespaces, user, capabilities and no-new-privileges, so it stands in for the program after
a compromise (or for a config that makes the program run a shell). From there it tries what a
compromised sidecar would try against:
- host processes: a root `sleep` with all capabilities, and a `sleep` with no capabilities running as
  the shell's own uid (the most exposed kind: same uid, and fewer capabilities than the shell, so a
  shared pid namespace would let the shell signal it AND read its environ and /proc/PID/root);
- another channel's sidecar (neutron-keepalived-state-change, which holds no capabilities);
by pid, since an agent in the host's pid namespace knows every host pid and can hand them over.

Every probe is calibrated, so a broken probe is never mistaken for a refusal:
- in the same `podman exec`, before the real target, the shell runs the very same commands against a
  child it started itself, and they must work there;
- `test_the_same_probes_reach_the_host_from_an_opt_in_pid_host_sidecar` runs the same scripts in a
  sidecar of an operator's custom profile with `pid_host = true` and shows that they DO stop the host
  process, read its environ and a host file through its /proc/PID/root, and see the host's processes.

The config-driven attacks are at the end: an agent-written haproxy config whose Lua init runs a shell
script, and a keepalived config whose vrrp_script and notify_master run it. Both are accepted (the
sidecar starts and the script runs inside it); the host process and the host file are untouched. The
same configs under the pid_host opt-in profiles do stop the process and write the file.
"""

from __future__ import annotations

import http.server
import ipaddress
import json
import os
import secrets
import shutil
import signal
import socketserver
import subprocess
import tempfile
import threading
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from support import netlab
from support.broker import REPO, Broker
from support.netlab import NetnsPair

from safespawn.agent import client
from safespawn.broker.policy import builtin_profile_names, load_profile

L3_IMAGE = "localhost/safespawn-test-l3:latest"
PROFILES = builtin_profile_names()
# Operators' custom profiles: name -> (built-in profile, pid_host, capabilities added). The pid_host
# ones are the controls (every built-in profile ran like that before issue 9). keepalived runs a script
# only with SETUID+SETGID (it sets the script user's groups first), so "keepalived-scripts" is the
# built-in profile plus those two: the scripts then really run, in the sidecar's own pid namespace.
CUSTOM = {
    "dnsmasq-hostpid": ("dnsmasq", True, ()),
    "haproxy-hostpid": ("haproxy", True, ()),
    "keepalived-hostpid": ("keepalived", True, ("SETUID", "SETGID")),
    "keepalived-scripts": ("keepalived", False, ("SETUID", "SETGID")),
}


# -- host processes the probes aim at ---------------------------------------------------------------

@dataclass
class Victim:
    """A sacrificial host process (`sleep`) with a secret in its environment and a host file to reach."""

    proc: subprocess.Popen[bytes]
    uid: int
    capless: bool
    secret: str
    sentinel: Path  # a host file, outside every data dir; its content is `secret`

    @property
    def pid(self) -> int:
        return self.proc.pid

    def state(self) -> str:
        """The state letter of /proc/PID/stat, read from the host (`T` = stopped)."""
        stat = Path(f"/proc/{self.pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0]


def start_victim(folder: Path, uid: int, capless: bool) -> Victim:
    secret = secrets.token_hex(8)
    d = folder / f"victim-{secrets.token_hex(4)}"
    d.mkdir()
    d.chmod(0o755)
    sentinel = d / "sentinel"
    sentinel.write_text(secret)
    sentinel.chmod(0o644)
    os.chown(sentinel, uid, uid)  # writable by its owner, so only the missing view can stop a write
    argv = ["sleep", "600"]
    if capless or uid != 0:
        drop = ["--bounding-set=-all", "--inh-caps=-all"] if capless else []
        ids = ["--reuid", str(uid), "--regid", str(uid), "--clear-groups"] if uid != 0 else []
        argv = ["setpriv", *ids, *drop, "--", *argv]
    proc = subprocess.Popen(argv, env={"PATH": os.environ["PATH"], "SST_SECRET": secret})
    v = Victim(proc, uid, capless, secret, sentinel)
    netlab.wait_for(lambda: Path(f"/proc/{v.pid}/cmdline").read_bytes().startswith(b"sleep"), timeout=5,
                    message="the victim runs")
    status = _status(v.pid)
    assert status["Uid"].split()[0] == str(uid)
    if uid == 0:
        assert (int(status["CapPrm"], 16) == 0) is capless
    return v


def _status(pid: int) -> dict[str, str]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        out[k] = v.strip()
    return out


# -- the lab: one broker, three channels, one sidecar per profile -------------------------------------

@dataclass
class Sidecar:
    profile: str
    channel: str
    name: str
    pid: int  # host pid of the sidecar's main process


@dataclass
class Lab:
    broker: Broker
    folder: Path  # host folder outside every data dir (victims' sentinels)
    sidecars: dict[str, Sidecar]  # by profile (channel A), plus "other" (channel B) and "control" (C)
    _victims: dict[tuple[int, bool], Victim] = field(default_factory=dict)
    probed: dict[str, Any] = field(default_factory=dict)  # sidecar name -> Probed

    @property
    def a(self) -> str:
        return self.broker.channel

    @property
    def b(self) -> str:
        return self.broker.extra_channels[0]

    @property
    def c(self) -> str:
        return self.broker.extra_channels[1]

    def victim(self, uid: int, capless: bool) -> Victim:
        key = (uid, capless)
        if key not in self._victims or self._victims[key].proc.poll() is not None:
            self._victims[key] = start_victim(self.folder, uid, capless)
        return self._victims[key]

    def stop_victims(self) -> None:
        for v in self._victims.values():
            v.proc.kill()
            v.proc.wait()


def _build_images() -> None:
    subprocess.run(["bash", str(REPO / "scripts" / "neutron-venv")], check=True, stdout=subprocess.DEVNULL,
                   timeout=900)
    subprocess.run(["bash", str(REPO / "scripts" / "build-l3-test-image"), L3_IMAGE], check=True,
                   stdout=subprocess.DEVNULL, timeout=600)


def write_custom_profiles(profiles_dir: Path) -> None:
    """Custom profiles an operator might write, each a built-in one with one thing changed."""
    profiles_dir.mkdir(parents=True, exist_ok=True)
    for custom, (builtin, pid_host, more_caps) in CUSTOM.items():
        text = (REPO / "src" / "safespawn" / "broker" / "profiles" / f"{builtin}.toml").read_text()
        for old, new in ((f'\nname = "{builtin}"\n', f'\nname = "{custom}"\n'),
                         ("\npid_host = false\n", f"\npid_host = {str(pid_host).lower()}\n"),
                         ("\ncapabilities = [", "\ncapabilities = [" + "".join(f'"{c}", ' for c in more_caps))):
            assert old in text, (builtin, old)
            text = text.replace(old, new)
        (profiles_dir / f"{custom}.toml").write_text(text)


def subdir(data: Path, name: str) -> Path:
    d = data / name
    d.mkdir(parents=True, exist_ok=True)
    d.chmod(0o777)  # a program that drops to its own user still writes its pid/lease/state files here
    return d


def dnsmasq_argv(data: Path, pair: NetnsPair) -> list[str]:
    """Shaped like Neutron's Dnsmasq driver's command line (static range, hosts/opts files)."""
    d = subdir(data, pair.server_ns)
    for f in ("host", "addn_hosts", "opts", "leases"):
        (d / f).touch()
    (d / "host").write_text(f"{netlab.random_mac()},host-50,{pair.host(50)}\n")
    return ["--no-hosts", "--no-resolv", f"--pid-file={d}/pid", f"--dhcp-hostsfile={d}/host",
            f"--addn-hosts={d}/addn_hosts", f"--dhcp-optsfile={d}/opts", f"--dhcp-leasefile={d}/leases",
            "--local-service", "--bind-dynamic",
            f"--dhcp-range=set:subnet-{uuid.uuid4()},{pair.network.network_address},static,"
            f"{pair.network.netmask},86400s",
            "--dhcp-lease-max=256", "--conf-file=/dev/null", "--domain=openstacklocal",
            f"--interface={pair.server_if}"]


def haproxy_config(d: Path, bind: str, extra_global: str = "") -> str:
    """Neutron's metadata proxy config (neutron.agent.metadata.driver_base's template, Neutron 29)."""
    net = uuid.uuid4()
    return (f"global\n    log /dev/log local0 info\n    log-tag haproxy-metadata-proxy-{net}\n"
            f"    user haproxy\n    group haproxy\n    maxconn 1024\n    pidfile {d}/pid\n    daemon\n"
            f"{extra_global}"
            "defaults\n    log global\n    mode http\n    option http-server-close\n    option forwardfor\n"
            "    retries 3\n    timeout http-request 30s\n    timeout connect 30s\n    timeout client 32s\n"
            "    timeout server 32s\n    timeout http-keep-alive 30s\n"
            f"listen listener\n    bind {bind}:80\n    server metadata {d.parent}/metadata_proxy\n"
            f"    http-request add-header X-Neutron-Network-ID {net}\n")


def keepalived_config(ifname: str, vip: str, extra_global: str = "", extra_instance: str = "",
                      before: str = "") -> str:
    """Shaped like Neutron's KeepalivedConf for an HA router."""
    return (f"global_defs {{\n    notification_email_from neutron@openstack.local\n    router_id neutron\n"
            f"{extra_global}}}\n{before}"
            f"vrrp_instance VR_1 {{\n    state BACKUP\n    interface {ifname}\n    virtual_router_id 1\n"
            "    priority 50\n    garp_master_delay 60\n    nopreempt\n    advert_int 1\n"
            f"    track_interface {{\n        {ifname}\n    }}\n"
            f"    virtual_ipaddress {{\n        {vip} dev {ifname}\n    }}\n{extra_instance}}}\n")


def state_change_argv(data: Path, ns: str, ifname: str, cidr: str) -> list[str]:
    d = subdir(data, f"{ns}-monitor")
    return ["--router_id", ns.split("-", 1)[1], "--namespace", ns, "--conf_dir", str(d),
            "--monitor_interface", ifname, "--monitor_cidr", cidr, "--pid_file", f"{d}/pid",
            "--log-file", f"{d}/monitor.log",
            "--state_path", str(data), "--user", "0", "--group", "0"]


class _Answer200(http.server.BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def address_string(self) -> str:
        return "unix"

    def log_message(self, *a: Any) -> None:
        pass


class _UnixHTTPServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


@contextmanager
def state_change_server(path: Path) -> Iterator[None]:
    server = _UnixHTTPServer(str(path), _Answer200)
    path.chmod(0o777)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()
        path.unlink(missing_ok=True)


def start_all(b: Broker, channel: str, requests: dict[str, dict[str, Any]]) -> dict[str, Sidecar]:
    """Write every request as the agent would, serve them in one sync, return the sidecars."""
    ids = {key: b.write(req, channel) for key, req in requests.items()}
    b.sync(channel)
    out = {}
    for key, rid in ids.items():
        reply = b.reply(rid, channel)
        assert reply is not None and reply["ok"], (key, reply)
        insp = netlab.podman_inspect(reply["sidecar"])
        assert insp is not None and insp["State"]["Running"], (key, reply)
        out[key] = Sidecar(requests[key]["profile"], channel, reply["sidecar"], int(insp["State"]["Pid"]))
    return out


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    _build_images()
    root = tmp_path_factory.mktemp("escape")
    write_custom_profiles(root / "broker" / "profiles")
    with ExitStack() as stack:
        # The worst case: root sidecars (the explicit, warned `sidecar_uid = 0` opt-in), so that the
        # confinement shown here holds without the channel's own uid (test_sidecar_uid.py shows that).
        b = Broker.make(root / "broker", profiles=[*PROFILES, *CUSTOM], channels=3, image=L3_IMAGE,
                        extra="sidecar_uid = 0\nsidecar_gid = 0\n")
        stack.callback(b.cleanup)
        # Host files for the victims: outside every data dir, and reachable by a victim of any uid
        # (pytest's own base directory is 0700).
        folder = Path(tempfile.mkdtemp(prefix="sst-escape-", dir="/var/tmp"))
        stack.callback(shutil.rmtree, folder, True)
        folder.chmod(0o755)
        data = b.data_dir
        # The L3 agent's server for state changes ($state_path/keepalived-state-change): the monitor
        # POSTs each change there and exits when it cannot.
        stack.enter_context(state_change_server(data / "keepalived-state-change"))
        dhcp = stack.enter_context(NetnsPair(server_ns=f"qdhcp-{uuid.uuid4()}"))
        meta = stack.enter_context(NetnsPair(server_ns=f"qdhcp-{uuid.uuid4()}"))
        prefix = ipaddress.IPv6Network(f"fd00:5afe:{secrets.randbelow(0xFFFF):x}::/64")
        router = stack.enter_context(NetnsPair(server_ns=f"qrouter-{uuid.uuid4()}",
                                               server_addr6=f"{prefix.network_address + 1}/64"))
        other = stack.enter_context(NetnsPair(server_ns=f"qrouter-{uuid.uuid4()}"))
        ctl = stack.enter_context(NetnsPair(server_ns=f"qdhcp-{uuid.uuid4()}"))

        hd = subdir(data, meta.server_ns)
        (hd / "haproxy.cfg").write_text(haproxy_config(hd, meta.server_ip))
        kd = subdir(data, router.server_ns)
        vip = "169.254.0.1/24"
        (kd / "keepalived.conf").write_text(keepalived_config(router.server_if, vip))
        (kd / "radvd.conf").write_text(
            f"interface {router.server_if}\n{{\n   AdvSendAdvert on;\n   MinRtrAdvInterval 3;\n"
            f"   MaxRtrAdvInterval 10;\n   prefix {prefix}\n   {{\n        AdvOnLink on;\n"
            "        AdvAutonomous on;\n   };\n};\n")
        (kd / "radvd.conf").chmod(0o444)  # radvd refuses a config writable by others; Neutron writes 0444
        rns = router.server_ns
        requests = {
            "dnsmasq": client.start_request("dnsmasq", dnsmasq_argv(data, dhcp), netns=dhcp.server_ns),
            "haproxy": client.start_request("haproxy", ["-f", f"{hd}/haproxy.cfg"], netns=meta.server_ns),
            "keepalived": client.start_request("keepalived", ["-P", "-f", f"{kd}/keepalived.conf",
                                                              "-p", f"{kd}/pid", "-r", f"{kd}/pid-vrrp"],
                                               netns=rns),
            "radvd": client.start_request("radvd", ["-C", f"{kd}/radvd.conf", "-p", f"{kd}/radvd.pid",
                                                    "-m", "stderr", "-u", "nobody"], netns=rns),
            "neutron-keepalived-state-change": client.start_request(
                "neutron-keepalived-state-change", state_change_argv(data, rns, router.server_if, vip),
                netns=rns),
        }
        assert set(requests) == set(PROFILES), "a new built-in profile needs its sidecar here"
        sidecars = start_all(b, b.channel, requests)
        sidecars["other"] = start_all(b, b.extra_channels[0], {"other": client.start_request(
            "neutron-keepalived-state-change",
            state_change_argv(data, other.server_ns, other.server_if, "169.254.0.2/24"),
            netns=other.server_ns)})["other"]
        sidecars["control"] = start_all(b, b.extra_channels[1], {"control": client.start_request(
            "dnsmasq-hostpid", dnsmasq_argv(data, ctl), netns=ctl.server_ns)})["control"]
        lab = Lab(b, folder, sidecars)
        stack.callback(lab.stop_victims)
        yield lab


# -- the shell in the sidecar --------------------------------------------------------------------------

def sh(sidecar: Sidecar, script: str, **env: object) -> dict[str, str]:
    """Run `busybox sh -c SCRIPT` inside the sidecar through the runtime; return its `key=value` lines.

    `podman exec` joins every namespace of the container and keeps its user, capabilities and
    no-new-privileges: what the compromised program itself would have.
    """
    argv = ["podman", "exec", "--env=SST_OWN=own-secret"]
    argv += [f"--env={k}={v}" for k, v in env.items()]
    argv += [sidecar.name, "/bin/busybox", "sh", "-c", script]
    cp = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert cp.returncode == 0, (argv, cp.stdout, cp.stderr)
    out = {}
    for line in cp.stdout.splitlines():
        k, sep, v = line.partition("=")
        if sep:
            out[k] = v
    return out


def rc(value: str) -> int:
    """The exit status of a probe line `rc|message`."""
    return int(value.split("|", 1)[0])


# One exec per sidecar runs every probe. It first starts a child of its own (`sleep`) and runs the
# same commands against it, the calibration: own_* must show success. Then, for each target pid
# in $T (each with a file in $F_pid to read through its /proc/PID/root), the real attempts.
PROBES = r"""
busybox sleep 30 & c=$!
m=$(kill -0 $c 2>&1); echo "own_kill0=$?|$m"
m=$(kill -STOP $c 2>&1); echo "own_stop=$?|$m"
i=0; while [ "$(busybox cut -d' ' -f3 /proc/$c/stat)" != T ] && [ $i -lt 40 ]; do busybox usleep 25000; i=$((i+1)); done
echo "own_state=$(busybox cut -d' ' -f3 /proc/$c/stat)"
m=$({ busybox tr '\0' '\n' < /proc/$c/environ; } 2>&1 | busybox grep SST_OWN); echo "own_environ=$?|$m"
m=$(busybox head -c 64 /proc/$c/root/etc/passwd 2>&1); echo "own_root=$?|$m"
kill -KILL $c; wait $c 2>/dev/null
echo "uid=$(busybox id -u)"
echo "self=$$"
set -- /proc/[0-9]*; echo "pids=$*"
echo "init=$(busybox tr '\0' ' ' < /proc/1/cmdline)"
for t in $T; do
  eval f=\$F_$t
  m=$({ busybox cat /proc/$t/root$f; } 2>&1); echo "root_file_$t=$?|$m"
  m=$({ busybox head -c 64 /proc/$t/root/etc/passwd; } 2>&1); echo "root_passwd_$t=$?|$m"
  m=$({ busybox tr '\0' ' ' < /proc/$t/environ; } 2>&1); echo "environ_$t=$?|$m"
  m=$({ busybox cat /proc/$t/cmdline; } 2>&1); echo "cmdline_$t=$?|$m"
  m=$(kill -0 $t 2>&1); echo "kill0_$t=$?|$m"
  m=$(kill -STOP $t 2>&1); echo "stop_$t=$?|$m"
  m=$(kill $SIG $t 2>&1); echo "term_$t=$?|$m"
done
"""
SIGNALS = ("kill0", "stop", "term")
READS = ("root_file", "root_passwd", "environ", "cmdline")


@dataclass
class Probed:
    out: dict[str, str]
    victims: list[Victim]  # host processes aimed at
    other: Sidecar  # another channel's sidecar aimed at


def probe(lab: Lab, s: Sidecar, sig: str = "-TERM") -> Probed:
    """Run PROBES in sidecar s against host processes and channel B's sidecar (once per sidecar)."""
    if s.name in lab.probed:
        return lab.probed[s.name]
    uid = int(sh(s, "echo uid=$(busybox id -u)")["uid"])
    # A root process with every capability (sshd, ovs-vswitchd, ...) and the most exposed kind: one
    # of the shell's own uid holding no capability at all.
    victims = [lab.victim(0, capless=False), lab.victim(uid, capless=True)]
    other = lab.sidecars["other"]
    files = {f"F_{v.pid}": v.sentinel for v in victims} | {f"F_{other.pid}": "/etc/hostname"}
    out = sh(s, PROBES, T=" ".join(str(p) for p in [*(v.pid for v in victims), other.pid]), SIG=sig, **files)
    lab.probed[s.name] = Probed(out, victims, other)
    return lab.probed[s.name]


def assert_calibrated(out: dict[str, str]) -> None:
    """The probe's commands work inside this sidecar (against the shell's own child)."""
    assert rc(out["own_kill0"]) == 0, out
    assert rc(out["own_stop"]) == 0, out
    assert out["own_state"] == "T", out
    assert rc(out["own_environ"]) == 0 and "SST_OWN=own-secret" in out["own_environ"], out
    assert rc(out["own_root"]) == 0 and "root:x:0:0" in out["own_root"], out


def state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


@pytest.fixture(params=PROFILES)
def sidecar(request: pytest.FixtureRequest, lab: Lab) -> Sidecar:
    return lab.sidecars[str(request.param)]


def test_the_sidecar_has_its_own_pid_namespace(lab: Lab, sidecar: Sidecar) -> None:
    host = os.stat("/proc/self/ns/pid")
    own = os.stat(f"/proc/{sidecar.pid}/ns/pid")
    assert (own.st_dev, own.st_ino) != (host.st_dev, host.st_ino)
    # ...and it is the one `podman exec` joins: the shell sees the sidecar's program as its pid 1.
    p = probe(lab, sidecar)
    assert load_profile(sidecar.profile, None).command[0] in p.out["init"], p.out


def test_a_shell_in_the_sidecar_cannot_signal_a_host_process(lab: Lab, sidecar: Sidecar) -> None:
    p = probe(lab, sidecar)
    assert_calibrated(p.out)
    for v in p.victims:
        for sig in SIGNALS:
            got = p.out[f"{sig}_{v.pid}"]
            assert rc(got) != 0 and "No such process" in got, (v, sig, got)
        assert v.proc.poll() is None, "the host process is alive"
        assert v.state() in {"S", "R"}, "the host process is not stopped (read from the host)"


def test_a_shell_in_the_sidecar_cannot_signal_another_channels_sidecar(lab: Lab, sidecar: Sidecar) -> None:
    p = probe(lab, sidecar)
    assert_calibrated(p.out)
    assert p.other.channel != sidecar.channel
    for sig in SIGNALS:
        got = p.out[f"{sig}_{p.other.pid}"]
        assert rc(got) != 0 and "No such process" in got, (sig, got)
    assert state(p.other.pid) in {"S", "R"}
    insp = netlab.podman_inspect(p.other.name)
    assert insp is not None and insp["State"]["Running"] and insp["State"]["Pid"] == p.other.pid


def test_a_shell_in_the_sidecar_cannot_read_host_files_through_proc_pid_root(lab: Lab, sidecar: Sidecar) -> None:
    p = probe(lab, sidecar)
    assert_calibrated(p.out)
    for v in p.victims:
        for what in READS:
            got = p.out[f"{what}_{v.pid}"]
            assert rc(got) != 0 and "no such file" in got.lower(), (v, what, got)
        assert v.secret not in json.dumps(p.out)
        assert v.sentinel.read_text() == v.secret


def test_a_shell_in_the_sidecar_cannot_read_another_sidecars_root_or_environ(lab: Lab, sidecar: Sidecar) -> None:
    p = probe(lab, sidecar)
    assert_calibrated(p.out)
    # The file aimed at exists in the other sidecar (read from the host), so only the view is missing.
    assert Path(f"/proc/{p.other.pid}/root/etc/hostname").read_text().strip()
    for what in READS:
        got = p.out[f"{what}_{p.other.pid}"]
        assert rc(got) != 0 and "no such file" in got.lower(), (what, got)


def test_a_shell_in_the_sidecar_sees_no_host_process_in_proc(lab: Lab, sidecar: Sidecar) -> None:
    p = probe(lab, sidecar)
    seen = {int(x.removeprefix("/proc/")) for x in p.out["pids"].split()}
    # What the host knows is in the sidecar's pid namespace: each process's pid there (NSpid's last).
    ns = os.stat(f"/proc/{sidecar.pid}/ns/pid")
    theirs = set()
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                st = os.stat(d / "ns" / "pid")
                if (st.st_dev, st.st_ino) == (ns.st_dev, ns.st_ino):
                    theirs.add(int(_status(int(d.name))["NSpid"].split()[-1]))
            except (OSError, KeyError):  # gone meanwhile, or not ours to inspect
                continue
    host_count = sum(1 for d in Path("/proc").iterdir() if d.name.isdigit())
    self_pid = int(p.out["self"])
    assert 1 in seen and self_pid in seen
    # Besides the shell itself (gone by now) only the sidecar's processes; the host has many more.
    assert seen - {self_pid} <= theirs, (seen, theirs)
    assert len(seen) < 20 < host_count
    for v in p.victims:
        assert v.pid not in seen
    assert p.other.pid not in seen


# -- the control: the very same probes from a sidecar that shares the host's pid namespace ------------

def test_the_same_probes_reach_the_host_from_an_opt_in_pid_host_sidecar(lab: Lab) -> None:
    """Why the refusals above mean something: with `pid_host = true` (an operator's custom profile, the
    way every built-in profile ran before issue 9) the same script stops, reads and sees host processes."""
    ctl = lab.sidecars["control"]
    insp = netlab.podman_inspect(ctl.name)
    assert insp is not None and insp["HostConfig"]["PidMode"] == "host"
    p = probe(lab, ctl, sig="-0")  # -0: the control must not kill what it reaches
    assert_calibrated(p.out)
    peer = p.victims[1]  # the shell's own uid, no capability: reachable through a shared pid namespace
    try:
        assert rc(p.out[f"kill0_{peer.pid}"]) == 0 and rc(p.out[f"stop_{peer.pid}"]) == 0, p.out
        netlab.wait_for(lambda: peer.state() == "T", timeout=5, message="the sidecar stopped the host process")
    finally:
        for v in p.victims:  # the root one was stopped too (same uid): the control leaves none stopped
            os.kill(v.pid, signal.SIGCONT)
    for v in p.victims:
        netlab.wait_for(lambda v=v: v.state() in {"S", "R"}, timeout=5)
    got = p.out[f"root_file_{peer.pid}"]
    assert rc(got) == 0 and got.endswith(peer.secret), got
    got = p.out[f"environ_{peer.pid}"]
    assert rc(got) == 0 and f"SST_SECRET={peer.secret}" in got, got
    seen = {int(x.removeprefix("/proc/")) for x in p.out["pids"].split()}
    assert peer.pid in seen and p.other.pid in seen and len(seen) > 20


# -- config-driven attacks: what the agent writes into a config runs inside the sidecar ---------------

# The agent writes this script into its data dir; the program's own interpreter (haproxy's Lua,
# keepalived's script runner) hands it to /bin/sh, which reads it (noexec only stops execve of the file).
# It reports its uid, waits for the host pids and files to aim at, then tries to stop each process and
# to overwrite each file through the process's /proc/PID/root.
ATTACK_SH = """
d=$1
mkdir "$d/ran" 2>/dev/null || exit 0
id -u > "$d/uid.tmp" && mv "$d/uid.tmp" "$d/uid"
i=0
while [ ! -s "$d/targets" ] && [ $i -lt 200 ]; do sleep 0.1; i=$((i+1)); done
: > "$d/out.tmp"
while read pid file; do
  kill -STOP "$pid" 2>>"$d/err"; echo "stop_$pid=$?" >> "$d/out.tmp"
  echo pwned 2>>"$d/err" > "/proc/$pid/root$file"; echo "write_$pid=$?" >> "$d/out.tmp"
done < "$d/targets"
mv "$d/out.tmp" "$d/out"
"""


def wait_until_the_script_runs(d: Path, timeout: float) -> int | None:
    """The uid the agent's script reports from inside the sidecar, or None if it never ran."""
    try:
        netlab.wait_for(lambda: (d / "uid").exists() and (d / "uid").read_text().strip(), timeout=timeout,
                        message=f"the agent's script runs inside the sidecar ({d})")
    except TimeoutError:
        return None
    return int((d / "uid").read_text())


def aim_and_collect(lab: Lab, d: Path, victims: list[Victim]) -> dict[str, int]:
    """Hand the running script its targets (as the agent, which knows host pids, would); its results."""
    for v in victims:
        v.sentinel.write_text(v.secret)
    tmp = d / "targets.tmp"
    tmp.write_text("".join(f"{v.pid} {v.sentinel}\n" for v in victims))
    tmp.rename(d / "targets")
    netlab.wait_for(lambda: (d / "out").exists(), timeout=20, message="the script reports")
    return {k: int(v) for k, _, v in (ln.partition("=") for ln in (d / "out").read_text().split())}


def attack_dir(data: Path) -> Path:
    d = subdir(data, f"attack-{secrets.token_hex(4)}")
    (d / "attack.sh").write_text(ATTACK_SH)
    return d


def assert_untouched(victims: list[Victim], out: dict[str, int] | None) -> None:
    for v in victims:
        if out is not None:
            assert out[f"stop_{v.pid}"] != 0 and out[f"write_{v.pid}"] != 0, out
        assert v.proc.poll() is None and v.state() in {"S", "R"}, "the host process runs on"
        assert v.sentinel.read_text() == v.secret, "the host file is unchanged"


def assert_reached_and_restore(out: dict[str, int], v: Victim) -> None:
    try:
        assert out[f"stop_{v.pid}"] == 0, out
        netlab.wait_for(lambda: v.state() == "T", timeout=5, message="the sidecar stopped the host process")
        assert out[f"write_{v.pid}"] == 0 and v.sentinel.read_text() == "pwned\n", out
    finally:
        os.kill(v.pid, signal.SIGCONT)
        v.sentinel.write_text(v.secret)


def builtin_targets(lab: Lab, uid: int) -> list[Victim]:
    """A root process with every capability, and one of the script's own uid with none."""
    return [lab.victim(0, capless=False), lab.victim(uid, capless=True)]


# How the config loads the agent's Lua: plainly, or with the keyword itself built at parse time from
# a variable the config sets (haproxy expands "${VAR}" in any word), which no text scan for
# `lua-load` would find.
LUA_LOAD = {
    "plain": "    lua-load {lua}\n",
    "hidden": '    setenv KW lua-\n    "${{KW}}load" {lua}\n',
}


@pytest.mark.parametrize("profile, load", [("haproxy", "plain"), ("haproxy", "hidden"),
                                           ("haproxy-hostpid", "plain")])
def test_haproxy_lua_init_written_by_the_agent_cannot_touch_the_host(lab: Lab, profile: str, load: str) -> None:
    """haproxy accepts `lua-load` (also when the config spells it through `setenv` and "${VAR}") and
    runs the Lua at start: core.register_init + os.execute runs the agent's shell script. Nothing
    checks the config, so the sidecar STARTS and the script RUNS in it (both asserted). From the
    built-in profile's sidecar it reaches no host process and no host file; from the pid_host control
    it stops the process and overwrites the file."""
    pid_host = CUSTOM.get(profile, ("", False, ()))[1]
    with NetnsPair(server_ns=f"qdhcp-{uuid.uuid4()}") as pair:
        d = attack_dir(lab.broker.data_dir)
        (d / "attack.lua").write_text(
            f'core.register_init(function() os.execute("/bin/sh {d}/attack.sh {d} &") end)\n')
        cfg = haproxy_config(d, pair.server_ip, LUA_LOAD[load].format(lua=f"{d}/attack.lua"))
        assert (load == "plain") is ("lua-load" in cfg)
        (d / "haproxy.cfg").write_text(cfg)
        channel = lab.c if pid_host else lab.a
        reply = lab.broker.request(client.start_request(profile, ["-f", f"{d}/haproxy.cfg"],
                                                        netns=pair.server_ns), channel)
        assert reply["ok"], reply
        try:
            uid = wait_until_the_script_runs(d, timeout=20)
            assert uid is not None, "haproxy ran the agent's Lua, and the Lua ran /bin/sh"
            if pid_host:
                peer = lab.victim(uid, capless=True)
                assert_reached_and_restore(aim_and_collect(lab, d, [peer]), peer)
            else:
                victims = builtin_targets(lab, uid)
                assert_untouched(victims, aim_and_collect(lab, d, victims))
                err = (d / "err").read_text()
                assert "No such process" in err or "nonexistent" in err or "No such file" in err, err
        finally:
            netlab.podman("rm", "-f", "-t", "0", reply["sidecar"], check=False)


@pytest.mark.parametrize("profile", ["keepalived", "keepalived-scripts", "keepalived-hostpid"])
def test_keepalived_scripts_written_by_the_agent_cannot_touch_the_host(lab: Lab, profile: str) -> None:
    """keepalived runs a tracked `vrrp_script` at start and `notify_master` when it becomes MASTER. The
    sidecar starts in every case (asserted). Then:
    - built-in profile (NET_ADMIN, NET_RAW): keepalived does not run the scripts at all, since it
      cannot set the script user's groups without SETGID (asserted from its log); the host is untouched;
    - keepalived-scripts (the built-in profile plus SETUID+SETGID): both scripts RUN, as root in the
      sidecar (asserted), and reach no host process or file;
    - keepalived-hostpid (the same with pid_host = true): both scripts stop the host process and
      overwrite the host file."""
    _, pid_host, more_caps = CUSTOM.get(profile, ("", False, ()))
    with NetnsPair(server_ns=f"qrouter-{uuid.uuid4()}") as pair:
        d = attack_dir(lab.broker.data_dir)
        vs, nm = subdir(d, "vrrp_script"), subdir(d, "notify_master")
        conf = keepalived_config(
            pair.server_if, "169.254.0.1/24", extra_global="    script_user root\n",
            before=f'vrrp_script chk {{\n    script "/bin/sh {d}/attack.sh {vs}"\n    interval 60\n'
                   "    timeout 50\n}\n",
            extra_instance=f"    track_script {{\n        chk\n    }}\n"
                           f'    notify_master "/bin/sh {d}/attack.sh {nm}"\n')
        (d / "keepalived.conf").write_text(conf)
        channel = lab.c if pid_host else lab.a
        reply = lab.broker.request(client.start_request(profile, ["-P", "-f", f"{d}/keepalived.conf",
                                                                  "-p", f"{d}/pid", "-r", f"{d}/pid-vrrp"],
                                                        netns=pair.server_ns), channel)
        assert reply["ok"], reply
        name = reply["sidecar"]
        try:
            if not more_caps:
                netlab.wait_for(lambda: "Entering MASTER STATE" in netlab.podman_logs(name), timeout=20,
                                message="keepalived becomes MASTER (so notify_master is due)")
                victims = builtin_targets(lab, 0)
                assert wait_until_the_script_runs(vs, timeout=2) is None
                assert wait_until_the_script_runs(nm, timeout=1) is None
                assert "Couldn't setgroups" in netlab.podman_logs(name)
                assert_untouched(victims, None)
                return
            for where in (vs, nm):
                uid = wait_until_the_script_runs(where, timeout=20)
                assert uid == 0, f"keepalived ran the agent's script as root ({where.name})"
                if pid_host:
                    peer = lab.victim(uid, capless=True)
                    assert_reached_and_restore(aim_and_collect(lab, where, [peer]), peer)
                else:
                    victims = builtin_targets(lab, uid)
                    assert_untouched(victims, aim_and_collect(lab, where, victims))
        finally:
            netlab.podman("rm", "-f", "-t", "0", name, check=False)


def test_the_probes_cover_every_builtin_profile(lab: Lab) -> None:
    # The probes are parametrized over builtin_profile_names() at collection time; the lab starts a
    # sidecar for each of them (it asserts so), so a new profile cannot go untested.
    assert set(PROFILES) <= set(lab.sidecars) and "dnsmasq" in PROFILES
