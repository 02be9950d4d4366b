"""Real-component helpers for integration tests: network namespaces, DHCP clients, podman.

Standard library only. Every external command is an argv list (never a shell) with an explicit
timeout. Everything a helper creates is named with a unique ``sst-XXXXXX`` prefix and lives inside
network namespaces the test created; addresses come from 10.250.0.0/16 and fd00:5afe::/32 and never
appear on the host's own interfaces. Cleanup always runs (context managers), and tolerates things
that are already gone.

Typical use::

    with NetnsPair() as pair:                       # server netns <-veth-> client netns
        ... start a container with --network ns:/run/netns/{pair.server_ns} ...
        lease = dhcp_lease(pair.client_ns, pair.client_if)
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

NAME_PREFIX = "sst-"
NETNS_DIR = Path("/run/netns")
TEST_LABEL = "safespawn.test"  # label every test container with TEST_LABEL=<unique token>
DEFAULT_TIMEOUT = 30.0

T = TypeVar("T")


class NetlabError(RuntimeError):
    """A helper failed; the message carries the command and its output."""


# --------------------------------------------------------------------------------------------------
# processes


def run(
    argv: Sequence[str],
    *,
    timeout: float = DEFAULT_TIMEOUT,
    check: bool = True,
    input: str | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run argv (a list, no shell) with a timeout; raise NetlabError with its output if check fails."""
    argv = [str(a) for a in argv]
    try:
        cp = subprocess.run(
            argv,
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env=env,
        )
    except subprocess.TimeoutExpired as e:
        raise NetlabError(f"timed out after {timeout}s: {argv}\nstdout: {e.stdout!r}\nstderr: {e.stderr!r}") from e
    if check and cp.returncode != 0:
        raise NetlabError(
            f"rc={cp.returncode}: {argv}\nstdout: {cp.stdout.strip()}\nstderr: {cp.stderr.strip()}"
        )
    return cp


def wait_for(
    predicate: Callable[[], T],
    timeout: float = 10.0,
    interval: float = 0.05,
    message: str | None = None,
) -> T:
    """Call predicate until it returns a truthy value, and return that value.

    Exceptions from the predicate count as "not yet"; the last one is chained to the TimeoutError.
    """
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while True:
        try:
            value = predicate()
            if value:
                return value
            last_exc = None
        except Exception as e:  # noqa: BLE001 - retried until the deadline
            last_exc = e
        if time.monotonic() >= deadline:
            what = message or getattr(predicate, "__name__", repr(predicate))
            raise TimeoutError(f"not true after {timeout}s: {what}") from last_exc
        time.sleep(interval)


def unique_name(prefix: str = NAME_PREFIX, nbytes: int = 3) -> str:
    """``sst-`` + 6 random hex characters (short enough for derived interface names)."""
    return f"{prefix}{secrets.token_hex(nbytes)}"


def random_mac() -> str:
    """A random locally administered unicast MAC address."""
    b = bytearray(secrets.token_bytes(6))
    b[0] = (b[0] & 0xFC) | 0x02
    return ":".join(f"{x:02x}" for x in b)


# --------------------------------------------------------------------------------------------------
# network namespaces


def netns_exists(name: str) -> bool:
    return (NETNS_DIR / name).exists()


def netns_add(name: str) -> None:
    """Create a named netns with its loopback up."""
    run(["ip", "netns", "add", name], timeout=10)
    run(["ip", "-n", name, "link", "set", "lo", "up"], timeout=10)


def netns_delete(name: str) -> None:
    """Delete a named netns; a missing one is fine."""
    if netns_exists(name):
        cp = run(["ip", "netns", "delete", name], timeout=10, check=False)
        if cp.returncode != 0 and netns_exists(name):
            raise NetlabError(f"ip netns delete {name}: {cp.stderr.strip()}")


def netns_exec(
    ns: str, argv: Sequence[str], *, timeout: float = DEFAULT_TIMEOUT, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run argv inside netns ns (``ip netns exec``)."""
    return run(["ip", "netns", "exec", ns, *argv], timeout=timeout, check=check)


def netns_list(prefix: str = NAME_PREFIX) -> list[str]:
    if not NETNS_DIR.is_dir():
        return []
    return sorted(p.name for p in NETNS_DIR.iterdir() if p.name.startswith(prefix))


def link_addresses(ns: str, ifname: str) -> list[str]:
    """Addresses (``ip/prefix``) on ifname inside ns."""
    cp = run(["ip", "-n", ns, "-j", "addr", "show", "dev", ifname], timeout=10)
    out: list[str] = []
    for link in json.loads(cp.stdout or "[]"):
        for a in link.get("addr_info", []):
            out.append(f"{a['local']}/{a['prefixlen']}")
    return out


def set_mac(ns: str, ifname: str, mac: str) -> None:
    """Set ifname's MAC inside ns (the link is taken down and up again)."""
    run(["ip", "-n", ns, "link", "set", "dev", ifname, "down"], timeout=10)
    run(["ip", "-n", ns, "link", "set", "dev", ifname, "address", mac], timeout=10)
    run(["ip", "-n", ns, "link", "set", "dev", ifname, "up"], timeout=10)


def get_mac(ns: str, ifname: str) -> str:
    cp = run(["ip", "-n", ns, "-j", "link", "show", "dev", ifname], timeout=10)
    return str(json.loads(cp.stdout)[0]["address"])


@dataclass
class NetnsPair:
    """A server netns and a client netns joined by a veth pair.

    Names default to ``sst-XXXXXX-srv`` / ``sst-XXXXXX-cli`` (netns) and ``sst-XXXXXX-s`` /
    ``sst-XXXXXX-c`` (veth). The server side gets ``server_addr`` (default 10.250.N.1/24, N random)
    and, if given, ``server_addr6`` (added with ``nodad``); the client side gets ``client_addr`` if
    given, else nothing (it is meant to ask for a lease). ``client_mac`` sets the client veth's MAC.

    Use as a context manager (or call create()/destroy()); destroy() always deletes both
    namespaces, which also deletes the veth pair.
    """

    token: str = field(default_factory=unique_name)
    server_addr: str | None = None
    client_addr: str | None = None
    server_addr6: str | None = None
    client_addr6: str | None = None
    client_mac: str | None = None
    server_ns: str = ""
    client_ns: str = ""
    server_if: str = ""
    client_if: str = ""
    created: bool = False

    def __post_init__(self) -> None:
        if self.server_addr is None:
            self.server_addr = f"10.250.{secrets.randbelow(254) + 1}.1/24"
        self.server_ns = self.server_ns or f"{self.token}-srv"
        self.client_ns = self.client_ns or f"{self.token}-cli"
        self.server_if = self.server_if or f"{self.token}-s"
        self.client_if = self.client_if or f"{self.token}-c"
        for ifname in (self.server_if, self.client_if):
            if len(ifname) > 15:
                raise ValueError(f"interface name too long (max 15): {ifname}")

    # -- addresses ---------------------------------------------------------------------------
    @property
    def server_iface(self) -> ipaddress.IPv4Interface:
        return ipaddress.IPv4Interface(self.server_addr)

    @property
    def server_ip(self) -> str:
        return str(self.server_iface.ip)

    @property
    def network(self) -> ipaddress.IPv4Network:
        return self.server_iface.network

    def host(self, n: int) -> str:
        """The n-th address of the server's subnet (``host(100)`` -> 10.250.N.100)."""
        return str(self.network.network_address + n)

    @property
    def server_ip6(self) -> str | None:
        return str(ipaddress.IPv6Interface(self.server_addr6).ip) if self.server_addr6 else None

    # -- lifecycle ---------------------------------------------------------------------------
    def create(self) -> NetnsPair:
        try:
            netns_add(self.server_ns)
            netns_add(self.client_ns)
            # No IPv6 duplicate address detection on the pair: link-local addresses are usable at
            # once (radvd's first RA fails with EINVAL from a tentative source otherwise).
            # Both veth ends are created in the server netns and inherit its "default" settings.
            netns_exec(self.server_ns, ["sysctl", "-q", "-w", "net.ipv6.conf.default.accept_dad=0"],
                       timeout=10)
            peer_opts = ["address", self.client_mac] if self.client_mac else []
            run(
                ["ip", "-n", self.server_ns, "link", "add", self.server_if, "type", "veth",
                 "peer", "name", self.client_if, *peer_opts, "netns", self.client_ns],
                timeout=10,
            )
            for ns, ifname, a4, a6 in (
                (self.server_ns, self.server_if, self.server_addr, self.server_addr6),
                (self.client_ns, self.client_if, self.client_addr, self.client_addr6),
            ):
                if a4:
                    run(["ip", "-n", ns, "addr", "add", a4, "dev", ifname], timeout=10)
                if a6:
                    run(["ip", "-n", ns, "addr", "add", a6, "dev", ifname, "nodad"], timeout=10)
                run(["ip", "-n", ns, "link", "set", "dev", ifname, "up"], timeout=10)
            self.created = True
        except BaseException:
            self.destroy()
            raise
        return self

    def destroy(self) -> None:
        errors = []
        for ns in (self.client_ns, self.server_ns):
            try:
                netns_delete(ns)
            except NetlabError as e:
                errors.append(str(e))
        self.created = False
        if errors:
            raise NetlabError("; ".join(errors))

    def __enter__(self) -> NetnsPair:
        return self.create()

    def __exit__(self, *exc: object) -> None:
        self.destroy()

    # -- conveniences ------------------------------------------------------------------------
    def exec_server(self, argv: Sequence[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        return netns_exec(self.server_ns, argv, **kw)

    def exec_client(self, argv: Sequence[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        return netns_exec(self.client_ns, argv, **kw)

    def set_client_mac(self, mac: str) -> None:
        set_mac(self.client_ns, self.client_if, mac)
        self.client_mac = mac

    @property
    def server_netns_path(self) -> str:
        return str(NETNS_DIR / self.server_ns)

    @property
    def client_netns_path(self) -> str:
        return str(NETNS_DIR / self.client_ns)


_HTTP_GET = """
import sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=float(sys.argv[2])) as r:
    sys.stdout.write(str(r.status) + "\\n")
    sys.stdout.flush()
    sys.stdout.buffer.write(r.read())
"""


def http_get(ns: str, url: str, timeout: float = 5.0) -> tuple[int, str]:
    """GET url from inside netns ns (this Python's urllib; busybox wget segfaults on Debian 12).

    Returns (status, body); raises NetlabError when the request fails.
    """
    cp = netns_exec(ns, [sys.executable, "-I", "-c", _HTTP_GET, url, str(timeout)], timeout=timeout + 10)
    status, _, body = cp.stdout.partition("\n")
    return int(status), body


def tcp_listen_argv(addr: str, port: int, reply: str = "hello") -> list[str]:
    """argv of a tiny TCP server (this Python) that answers every connection with reply and closes.

    Run it in a netns with ``subprocess.Popen(["ip", "netns", "exec", NS, *argv])``; prints
    ``listening`` on stdout once bound.
    """
    code = (
        "import socket, sys\n"
        "s = socket.socket(socket.AF_INET6 if ':' in sys.argv[1] else socket.AF_INET)\n"
        "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
        "s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(16)\n"
        "print('listening', flush=True)\n"
        "while True:\n"
        "    c, _ = s.accept()\n"
        "    c.sendall(sys.argv[3].encode()); c.close()\n"
    )
    return [sys.executable, "-I", "-c", code, addr, str(port), reply]


# --------------------------------------------------------------------------------------------------
# DHCP client (busybox udhcpc: no daemon left behind, never touches the host's resolv.conf)

_UDHCPC_SCRIPT = """#!/bin/sh
# udhcpc event script written by tests/support/netlab.py: record the event's environment only.
# It never configures the interface (the caller may, with configure=True).
env -0 > "{dir}/$1.env.tmp" && mv "{dir}/$1.env.tmp" "{dir}/$1.env"
echo "$1" >> "{dir}/events"
exit 0
"""

# udhcpc's environment name -> key in the returned lease
_LEASE_KEYS = {
    "ip": "ip",
    "subnet": "mask",
    "mask": "prefixlen",
    "router": "router",
    "dns": "dns",
    "domain": "domain",
    "hostname": "hostname",
    "serverid": "serverid",
    "lease": "lease",
    "broadcast": "broadcast",
    "mtu": "mtu",
    "interface": "interface",
}


def _busybox() -> str:
    bb = shutil.which("busybox")
    if not bb:
        raise NetlabError("busybox not found (apt-get install busybox-static)")
    return bb


def dhcp_lease(
    client_ns: str,
    ifname: str,
    timeout: float = 10.0,
    *,
    mac: str | None = None,
    hostname: str | None = None,
    configure: bool = False,
) -> dict[str, Any]:
    """Ask for a DHCPv4 lease on ifname inside client_ns with ``busybox udhcpc`` and return it.

    Returns a dict with the keys udhcpc reports (missing ones are absent): ``ip``, ``mask`` (dotted),
    ``prefixlen`` (int), ``router``, ``dns`` (list), ``domain``, ``hostname``, ``serverid``,
    ``lease`` (int seconds), ``broadcast``, ``mtu``, ``interface``, plus ``mac`` (the client MAC used)
    and ``env`` (the raw environment of the ``bound`` event).

    mac: set ifname's MAC first (to hit a static ``MAC,host,IP`` entry). hostname: sent as option 12.
    configure: also add the leased address to ifname. Raises NetlabError with udhcpc's output when
    no lease was obtained within timeout.
    """
    if mac:
        set_mac(client_ns, ifname, mac)
    used_mac = get_mac(client_ns, ifname)
    tries = max(1, int(timeout))
    with tempfile.TemporaryDirectory(prefix="sst-udhcpc-") as d:
        script = Path(d, "event.sh")
        script.write_text(_UDHCPC_SCRIPT.format(dir=d))
        script.chmod(0o700)
        argv = ["ip", "netns", "exec", client_ns, _busybox(), "udhcpc", "-i", ifname,
                "-f", "-q", "-n", "-t", str(tries), "-T", "1", "-A", "1", "-s", str(script)]
        if hostname:
            argv += ["-x", f"hostname:{hostname}"]
        cp = run(argv, timeout=timeout + 10, check=False)
        bound = Path(d, "bound.env")
        if cp.returncode != 0 or not bound.exists():
            events = Path(d, "events").read_text().split() if Path(d, "events").exists() else []
            raise NetlabError(
                f"no DHCP lease on {client_ns}/{ifname} (mac {used_mac}) within {timeout}s: "
                f"rc={cp.returncode} events={events}\nstdout: {cp.stdout.strip()}\nstderr: {cp.stderr.strip()}"
            )
        env = dict(
            item.split("=", 1) for item in bound.read_text().split("\0") if "=" in item
        )
    lease: dict[str, Any] = {"mac": used_mac, "env": env}
    for src, dst in _LEASE_KEYS.items():
        if src in env and env[src] != "":
            lease[dst] = env[src]
    if "dns" in lease:
        lease["dns"] = lease["dns"].split()
    for k in ("prefixlen", "lease", "mtu"):
        if k in lease:
            lease[k] = int(lease[k])
    if "prefixlen" not in lease and "mask" in lease:
        lease["prefixlen"] = ipaddress.IPv4Network(f"0.0.0.0/{lease['mask']}").prefixlen
    if configure:
        run(["ip", "-n", client_ns, "addr", "replace", f"{lease['ip']}/{lease['prefixlen']}",
             "dev", ifname], timeout=10)
    return lease


# --------------------------------------------------------------------------------------------------
# podman


def podman(
    *args: str, timeout: float = 60.0, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run ``podman ARGS`` (argv, no shell)."""
    return run(["podman", *args], timeout=timeout, check=check)


def _label_filters(label_filter: str | Iterable[str]) -> list[str]:
    labels = [label_filter] if isinstance(label_filter, str) else list(label_filter)
    out: list[str] = []
    for lab in labels:
        out += ["--filter", f"label={lab}"]
    return out


def podman_ps(label_filter: str | Iterable[str], *, all: bool = True) -> list[dict[str, Any]]:
    """``podman ps [-a] --format json --filter label=...``: containers carrying every label given.

    label_filter: ``"key"`` or ``"key=value"``, or several (all must match).
    """
    args = ["ps", "--format", "json", *_label_filters(label_filter)]
    if all:
        args.insert(1, "-a")
    cp = podman(*args, timeout=30)
    data = json.loads(cp.stdout or "[]")
    return list(data or [])


def podman_rm_by_label(label: str | Iterable[str]) -> list[str]:
    """Force-remove (``rm -f -t 0``) every container carrying the label(s); return their ids."""
    ids = [c["Id"] for c in podman_ps(label)]
    if ids:
        podman("rm", "-f", "-t", "0", *ids, timeout=60, check=False)
        left = {c["Id"] for c in podman_ps(label)} & set(ids)
        if left:
            raise NetlabError(f"containers not removed: {sorted(left)}")
    return ids


def podman_inspect(name: str) -> dict[str, Any] | None:
    """``podman container inspect NAME`` as a dict, or None when there is no such container."""
    cp = podman("container", "inspect", "--format", "json", name, timeout=30, check=False)
    if cp.returncode != 0:
        return None
    data = json.loads(cp.stdout or "[]")
    return data[0] if data else None


def podman_logs(name: str, timeout: float = 30.0) -> str:
    cp = podman("logs", name, timeout=timeout, check=False)
    return cp.stdout + cp.stderr


def image_exists(image: str) -> bool:
    return podman("image", "exists", image, timeout=30, check=False).returncode == 0


def build_test_image(image: str | None = None, timeout: float = 300.0) -> str:
    """Run scripts/build-test-image (idempotent, ~0.3 s when up to date); return the image name."""
    script = Path(__file__).resolve().parents[2] / "scripts" / "build-test-image"
    cp = run([str(script), *([image] if image else [])], timeout=timeout)
    return cp.stdout.strip().splitlines()[-1]


# --------------------------------------------------------------------------------------------------
# leftovers


def cleanup_stale(prefix: str = NAME_PREFIX) -> dict[str, list[str]]:
    """Delete every netns named ``prefix*`` and every container labelled TEST_LABEL.

    For a manual sweep after an interrupted run (``python tests/support/netlab.py``); fixtures
    clean up after themselves, and this would also hit a concurrently running test session.
    """
    removed = podman_rm_by_label(TEST_LABEL)
    namespaces = netns_list(prefix)
    for ns in namespaces:
        netns_delete(ns)
    return {"containers": removed, "netns": namespaces}


def is_root() -> bool:
    return os.geteuid() == 0


if __name__ == "__main__":
    print(json.dumps(cleanup_stale(), indent=2))
