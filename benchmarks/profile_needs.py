"""What each built-in profile's program really uses under a Neutron-shaped workload (issue 18).

    .venv/bin/python benchmarks/profile_needs.py [--image IMAGE] [--l3-image IMAGE]

Each program runs as its profile runs it (the profile's command prefix, read-only root, its
capabilities) in a container of its own, under a throwaway parent cgroup (cgroup v1, podman's
cgroupfs manager: the test bed), with:
- dnsmasq: 4000 static hosts (--dhcp-hostsfile) and 4000 leases in its lease file, then 5 HUPs
  (Neutron's reload_allocations re-reads the hosts file);
- haproxy: Neutron's metadata proxy config (driver_base's template: a unix-socket backend, headers
  added), 4000 requests from 64 concurrent clients in the namespace to a host HTTP server;
- keepalived: Neutron's HA router config shape (one VRRP instance, 20 VIPs/routes) on a veth
  pair, MASTER after its start-up, held for 8 s;
- radvd: Neutron's radvd config shape (4 prefixes) on a veth, advertising for 8 s;
- neutron-keepalived-state-change (with the L3 image): Neutron's script watching the namespace
  while 50 address changes happen.
Prints the peak memory (memory.max_usage_in_bytes, page cache included), the peak number of tasks
(sampled every 50 ms) and the CPU time of each sidecar's cgroup. The numbers go into each
profile's comment; its limits are chosen with a margin over them.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import uuid
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from socketserver import ThreadingMixIn

CG = Path("/sys/fs/cgroup")


def sh(*argv: str, check: bool = True) -> str:
    p = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=120)
    if check and p.returncode:
        raise RuntimeError(f"{argv[:4]}: {p.stderr[-800:]}")
    return p.stdout


class Sampler:
    def __init__(self, parent: str) -> None:
        self.parent = parent
        self.peak_tasks = 0
        self.stop = threading.Event()
        self.t = threading.Thread(target=self.loop, daemon=True)
        self.t.start()

    def cdir(self, ctrl: str) -> Path | None:
        base = CG / ctrl / self.parent.strip("/")
        for d in base.glob("libpod-*") if base.is_dir() else []:
            if "conmon" not in d.name:
                return d
        return None

    def loop(self) -> None:
        while not self.stop.is_set():
            d = self.cdir("pids")
            if d is not None:
                try:
                    self.peak_tasks = max(self.peak_tasks, int((d / "pids.current").read_text()))
                except (OSError, ValueError):
                    pass
            time.sleep(0.05)

    def result(self) -> dict[str, float]:
        self.stop.set()
        self.t.join()
        mem = self.cdir("memory")
        acct = self.cdir("cpuacct")
        assert mem is not None and acct is not None
        return {"peak_memory_mib": round(int((mem / "memory.max_usage_in_bytes").read_text()) / 2**20, 1),
                "peak_rss_mib": round(_rss(mem) / 2**20, 1),
                "peak_tasks": self.peak_tasks,
                "cpu_seconds": round(int((acct / "cpuacct.usage").read_text()) / 1e9, 2)}


def _rss(mem: Path) -> int:
    for line in (mem / "memory.stat").read_text().splitlines():
        if line.startswith("total_rss "):
            return int(line.split()[1])
    return 0


def run(name: str, image: str, parent: str, entry: list[str], args: list[str], caps: list[str],
        netns: str | None, data: str) -> str:
    argv = ["podman", "run", "-d", f"--name={name}", f"--cgroup-parent={parent}", "--cap-drop=ALL",
            *[f"--cap-add={c}" for c in caps], "--security-opt=no-new-privileges", "--read-only",
            "--read-only-tmpfs=false", "--tmpfs=/run:rw,size=16m", "--tmpfs=/tmp:rw,size=16m",
            f"--volume={data}:{data}:rw", "--entrypoint=" + json.dumps(entry),
            f"--network=ns:/run/netns/{netns}" if netns else "--network=none", image, *args]
    return sh(*argv).strip()


def netns_pair(tag: str) -> tuple[str, str]:
    ns, peer = f"qrouter-{tag}", f"peer-{tag}"
    for n in (ns, peer):
        sh("ip", "netns", "add", n)
        sh("ip", "-n", n, "link", "set", "lo", "up")
    sh("ip", "link", "add", "v0", "netns", ns, "type", "veth", "peer", "name", "v1", "netns", peer)
    sh("ip", "-n", ns, "addr", "add", "10.77.0.1/24", "dev", "v0")
    sh("ip", "-n", peer, "addr", "add", "10.77.0.2/24", "dev", "v1")
    sh("ip", "-n", ns, "link", "set", "v0", "up")
    sh("ip", "-n", peer, "link", "set", "v1", "up")
    return ns, peer


def measure_dnsmasq(image: str, parent: str, data: Path, n: int = 4000) -> dict[str, float]:
    tag = secrets.token_hex(4)
    ns, peer = netns_pair(tag)
    hosts = data / "host"
    leases = data / "leases"
    now = int(time.time())
    with open(hosts, "w") as f:
        for i in range(n):
            f.write(f"fa:16:3e:{i >> 16 & 255:02x}:{i >> 8 & 255:02x}:{i & 255:02x},"
                    f"host-10-77-{i // 250}-{i % 250 + 2}.openstacklocal,10.77.{i // 250}.{i % 250 + 2}\n")
    with open(leases, "w") as f:
        for i in range(n):
            f.write(f"{now + 86400} fa:16:3e:{i >> 16 & 255:02x}:{i >> 8 & 255:02x}:{i & 255:02x} "
                    f"10.77.{i // 250}.{i % 250 + 2} host-{i} *\n")
    name = f"measure-dnsmasq-{tag}"
    s = Sampler(parent)
    try:
        run(name, image, parent, ["dnsmasq", "-k"],
            ["--no-hosts", "--no-resolv", f"--pid-file={data}/pid", f"--dhcp-hostsfile={hosts}",
             f"--dhcp-leasefile={leases}", "--dhcp-range=set:t0,10.77.0.0,static,255.255.0.0,86400s",
             "--dhcp-lease-max=16777216", "--conf-file=/dev/null", "--domain=openstacklocal",
             "--interface=v0", "--bind-interfaces"],
            ["NET_ADMIN", "NET_RAW", "NET_BIND_SERVICE", "SETUID", "SETGID"], ns, str(data))
        time.sleep(2)
        for _ in range(5):
            sh("podman", "kill", "--signal=HUP", name)
            time.sleep(0.5)
        time.sleep(1)
        return s.result()
    finally:
        sh("podman", "rm", "-f", "-t0", name, check=False)
        for x in (ns, peer):
            sh("ip", "netns", "del", x, check=False)


class _Meta(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802
        body = b"ami-id\ninstance-id\nlocal-ipv4\n" * 20
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:  # noqa: N802  (the L3 agent's state-change socket)
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *a: object) -> None:
        pass


class _UnixHTTP(HTTPServer):
    address_family = socket.AF_UNIX

    def server_bind(self) -> None:
        self.socket.bind(self.server_address)

    def get_request(self):  # type: ignore[no-untyped-def]
        req, _ = self.socket.accept()
        return req, ("local", 0)


class _ThreadingUnixHTTP(ThreadingMixIn, _UnixHTTP):
    daemon_threads = True
    request_queue_size = 256


def measure_haproxy(image: str, parent: str, data: Path, requests: int = 4000, clients: int = 64) -> dict[str, float]:
    tag = secrets.token_hex(4)
    ns, peer = netns_pair(tag)
    sock = str(data / "metadata_proxy")
    srv = _ThreadingUnixHTTP(sock, _Meta)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    os.chmod(sock, 0o777)
    cfg = data / "haproxy.conf"
    cfg.write_text(f"""global
    log         /dev/log local0 debug
    log-tag     haproxy-metadata-proxy-{tag}
    user        root
    group       root
    maxconn     1024
    daemon

defaults
    log global
    mode http
    option httplog
    option dontlognull
    option http-server-close
    option forwardfor
    retries                 3
    timeout http-request    30s
    timeout connect         30s
    timeout client          32s
    timeout server          32s
    timeout http-keep-alive 30s

listen listener
    bind 0.0.0.0:80
    server metadata {sock}
    http-request del-header X-Neutron-Network-ID
    http-request set-header X-Neutron-Router-ID {tag}
""")
    name = f"measure-haproxy-{tag}"
    s = Sampler(parent)
    try:
        run(name, image, parent, ["haproxy", "-Ws"], ["-f", str(cfg), "-p", "/run/haproxy.pid"],
            ["NET_BIND_SERVICE", "SETUID", "SETGID"], ns, str(data))
        time.sleep(1)
        client = ("import concurrent.futures as cf, urllib.request\n"
                  "def one(i):\n"
                  "    return urllib.request.urlopen('http://10.77.0.1/latest/meta-data/', timeout=30).status\n"
                  f"with cf.ThreadPoolExecutor({clients}) as p:\n"
                  f"    ok = sum(1 for r in p.map(one, range({requests})) if r == 200)\n"
                  "print(ok)\n")
        t0 = time.monotonic()
        ok = sh("ip", "netns", "exec", peer, sys.executable, "-c", client).strip()
        r = s.result()
        r["requests_ok"] = int(ok)
        r["requests_per_s"] = round(requests / (time.monotonic() - t0))
        return r
    except Exception:
        print(sh("podman", "logs", name, check=False), sh("podman", "ps", "-a", "--filter", f"name={name}", "--format", "{{.Status}}", check=False), file=sys.stderr)
        raise
    finally:
        srv.shutdown()
        sh("podman", "rm", "-f", "-t0", name, check=False)
        for x in (ns, peer):
            sh("ip", "netns", "del", x, check=False)


def measure_keepalived(image: str, parent: str, data: Path) -> dict[str, float]:
    tag = secrets.token_hex(4)
    ns, peer = netns_pair(tag)
    vips = "\n".join(f"        10.78.{i}.1/24 dev v0" for i in range(20))
    cfg = data / "keepalived.conf"
    cfg.write_text(f"""global_defs {{
    notification_email_from neutron@openstack.local
    router_id neutron
}}
vrrp_instance VR_1 {{
    state BACKUP
    interface v0
    virtual_router_id 1
    priority 50
    garp_master_delay 60
    nopreempt
    advert_int 2
    track_interface {{
        v0
    }}
    virtual_ipaddress {{
        169.254.0.1/24 dev v0
    }}
    virtual_ipaddress_excluded {{
{vips}
    }}
    virtual_routes {{
        0.0.0.0/0 via 10.77.0.2 dev v0
    }}
}}
""")
    name = f"measure-keepalived-{tag}"
    s = Sampler(parent)
    try:
        run(name, image, parent, ["keepalived", "-n", "-l", "-D"],
            ["-P", "-f", str(cfg), "-p", f"{data}/ka.pid", "-r", f"{data}/ka.pid-vrrp"],
            ["NET_ADMIN", "NET_RAW"], ns, str(data))
        time.sleep(10)
        r = s.result()
        r["vip_held"] = "169.254.0.1" in sh("ip", "-n", ns, "addr", "show", "v0")
        return r
    finally:
        sh("podman", "rm", "-f", "-t0", name, check=False)
        for x in (ns, peer):
            sh("ip", "netns", "del", x, check=False)


def measure_radvd(image: str, parent: str, data: Path) -> dict[str, float]:
    tag = secrets.token_hex(4)
    ns, peer = netns_pair(tag)
    sh("ip", "-n", ns, "addr", "add", "fd00:77::1/64", "dev", "v0")
    prefixes = "\n".join(f"   prefix fd00:77:{i}::/64\n   {{\n        AdvOnLink on;\n        AdvAutonomous on;\n   }};"
                         for i in range(4))
    cfg = data / "radvd.conf"
    cfg.write_text(f"interface v0\n{{\n   AdvSendAdvert on;\n   MinRtrAdvInterval 3;\n   MaxRtrAdvInterval 10;\n"
                   f"{prefixes}\n}};\n")
    name = f"measure-radvd-{tag}"
    s = Sampler(parent)
    try:
        run(name, image, parent, ["radvd", "-n"], ["-C", str(cfg), "-p", "/run/radvd.pid", "-m", "stderr"],
            ["NET_RAW", "SETUID", "SETGID"], ns, str(data))
        time.sleep(8)
        return s.result()
    finally:
        sh("podman", "rm", "-f", "-t0", name, check=False)
        for x in (ns, peer):
            sh("ip", "netns", "del", x, check=False)


def measure_state_change(image: str, parent: str, data: Path) -> dict[str, float]:
    tag = secrets.token_hex(4)
    ns, peer = netns_pair(tag)
    router = str(uuid.uuid4())
    sock = str(data / "keepalived-state-change")
    srv = _ThreadingUnixHTTP(sock, _Meta)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    conf = data / "ha_confs" / router
    conf.mkdir(parents=True)
    name = f"measure-statechange-{tag}"
    s = Sampler(parent)
    try:
        run(name, image, parent, ["neutron-keepalived-state-change"],
            ["--router_id", router, "--namespace", ns, "--conf_dir", str(conf),
             "--log-file", f"{conf}/neutron-keepalived-state-change.log", "--monitor_interface", "v0",
             "--monitor_cidr", "169.254.0.1/24", "--pid_file", f"/run/{router}.monitor.pid",
             "--state_path", str(data), "--user", "0", "--group", "0"], [], ns, str(data))
        time.sleep(2)
        for i in range(50):
            op = "add" if i % 2 == 0 else "del"
            sh("ip", "-n", ns, "addr", op, "169.254.0.1/24", "dev", "v0", check=False)
            time.sleep(0.05)
        time.sleep(1)
        r = s.result()
        r["state_file"] = (conf / "state").read_text().strip() if (conf / "state").exists() else None
        return r
    except Exception:
        for f in conf.iterdir():
            print(f, f.read_text()[-500:], file=sys.stderr)
        print(sh("podman", "logs", name, check=False), sh("podman", "ps", "-a", "--filter", f"name={name}", "--format", "{{.Status}}", check=False), file=sys.stderr)
        raise
    finally:
        srv.shutdown()
        sh("podman", "rm", "-f", "-t0", name, check=False)
        for x in (ns, peer):
            sh("ip", "netns", "del", x, check=False)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--image", default="localhost/safespawn-test:latest")
    ap.add_argument("--l3-image", default="localhost/safespawn-test-l3:latest")
    ap.add_argument("--only", nargs="*")
    a = ap.parse_args()
    parent = f"/safespawn-measure-{secrets.token_hex(3)}"
    out = {}
    tmp = Path(tempfile.mkdtemp(prefix="safespawn-measure-"))
    try:
        jobs = {"dnsmasq": lambda d: measure_dnsmasq(a.image, parent, d),
                "haproxy": lambda d: measure_haproxy(a.image, parent, d),
                "keepalived": lambda d: measure_keepalived(a.image, parent, d),
                "radvd": lambda d: measure_radvd(a.image, parent, d)}
        if sh("podman", "images", "-q", a.l3_image, check=False).strip():
            jobs["neutron-keepalived-state-change"] = lambda d: measure_state_change(a.l3_image, parent, d)
        for prof, fn in jobs.items():
            if a.only and prof not in a.only:
                continue
            d = tmp / prof
            d.mkdir()
            out[prof] = fn(d)
            print(prof, json.dumps(out[prof]), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        time.sleep(1)  # conmon outlives `podman rm` briefly
        for h in sorted(os.listdir(CG)):
            top = CG / h / parent.strip("/")
            for dirpath, _d, _f in sorted(os.walk(top, topdown=False), key=lambda w: -len(w[0])):
                try:
                    os.rmdir(dirpath)
                except OSError:
                    pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
