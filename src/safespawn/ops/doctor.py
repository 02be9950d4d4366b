"""Does the configured runtime work on this host? The checks `check-config` and `doctor` print.

Each check is a `Check(ok, what, fix)`. `static_checks` only looks at the host (the CLI is there);
`live_checks` talks to podman or dockerd, and for Docker proves the netns-joining path end to end:
dockerd knows the OCI runtime, and a throw-away container named into a fresh netns lands in it.
`host_checks` needs no channel: what the host is (cgroup version, podman's cgroup manager, systemd
as PID 1 or not, network namespaces); `doctor` prints it with or without a configuration file.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from dataclasses import dataclass
from typing import Any

from ..config import Config
from ..errors import RuntimeFailed
from ..runtime.command import RuntimeCli
from ..runtime.docker import DockerRuntime

# Names for the probe netns: the first that fits a configured profile's pattern is used.
PROBE_PREFIXES = ("qdhcp", "qrouter", "snat", "ovnmeta", "fip", "qlbaas")


@dataclass(frozen=True)
class Check:
    ok: bool
    what: str
    fix: str = ""


def _cli(cfg: Config) -> tuple[str, str | None]:
    b = cfg.broker
    name = b.docker if b.runtime == "docker" else b.podman
    return name, shutil.which(name)


def static_checks(cfg: Config) -> list[Check]:
    name, found = _cli(cfg)
    return [Check(found is not None, f"runtime {cfg.broker.runtime}: {name} found ({found})",
                  f"install {cfg.broker.runtime} or set [broker] {cfg.broker.runtime} to its path")]


def _probe_profile(cfg: Config) -> tuple[str, str] | None:
    """(profile, netns name) for the probe: a configured profile and a fresh name its pattern accepts."""
    from ..broker.policy import load_profile

    for ch in cfg.channels.values():
        for pname in ch.profiles:
            p = load_profile(pname, cfg.broker.profiles_dir)
            for prefix in PROBE_PREFIXES:
                name = f"{prefix}-{uuid.uuid4()}"
                if p.netns_pattern is not None and p.netns_pattern.fullmatch(name):
                    return pname, name
    return None


def _ip_netns(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", *args], capture_output=True, text=True, timeout=30, check=False)


def docker_checks(cfg: Config) -> list[Check]:
    b = cfg.broker
    d = DockerRuntime(b.docker, b.docker_host, b.docker_oci_runtime, b.podman_timeout)
    where = b.docker_host or os.environ.get("DOCKER_HOST") or "the docker CLI's default daemon"
    problem = d.check_daemon()
    out = [Check(problem is None, f"dockerd at {where} answers and has the OCI runtime {b.docker_oci_runtime!r}",
                 f"{problem}; register safespawn-oci-runtime in daemon.json \"runtimes\" (docs/kolla.md)")]
    if problem is not None:
        return out
    images = {ch.image: ch.name for ch in cfg.channels.values()}
    for image, ch in sorted(images.items()):
        out.append(Check(d.image_exists(image), f"image {image} present (channel {ch})",
                         f"docker pull or load {image}: sidecars run with --pull=never"))
    probe = _probe_profile(cfg)
    if probe is None or not all(c.ok for c in out):
        out.append(Check(probe is not None, "netns joining through the OCI runtime",
                         "no configured profile accepts a qdhcp-/qrouter- name to probe with"))
        return out
    profile, netns = probe
    image = sorted(images)[0]
    made = _ip_netns("add", netns)
    if made.returncode != 0:
        return [*out, Check(False, "netns joining through the OCI runtime", f"ip netns add: {made.stderr.strip()}")]
    try:
        problem = d.probe_netns(image, str(b.netns_dir), netns, profile, f"safespawn-doctor-{uuid.uuid4().hex[:8]}")
    finally:
        _ip_netns("delete", netns)
    out.append(Check(problem is None, f"a {profile} container joins a fresh netns through the OCI runtime",
                     problem or ""))
    return out


def podman_checks(cfg: Config) -> list[Check]:
    name, found = _cli(cfg)
    if found is None:
        return []
    cli = RuntimeCli("podman", found, 60)
    info, err = _podman_info(cli)
    out = [Check(info is not None, "podman info works", err)]
    for ch in cfg.channels.values():
        q = _call(cli, ["image", "exists", ch.image])
        out.append(Check(q is not None and q.returncode == 0, f"image {ch.image} present (channel {ch.name})",
                         f"podman pull or load {ch.image}: sidecars run with --pull=never"))
    return out


def live_checks(cfg: Config) -> list[Check]:
    checks = static_checks(cfg)
    if not checks[0].ok:
        return checks
    return checks + (docker_checks(cfg) if cfg.broker.runtime == "docker" else podman_checks(cfg))


def cgroup_layout(root: str = "/sys/fs/cgroup") -> str:
    """"v2" (one unified hierarchy), "v1 hybrid" (v1 controllers and a unified hierarchy beside
    them), "v1" (legacy), or "unknown"."""
    try:
        if os.path.exists(os.path.join(root, "cgroup.controllers")):
            return "v2"
        if os.path.exists(os.path.join(root, "unified", "cgroup.procs")):
            return "v1 hybrid"
        if os.path.isdir(os.path.join(root, "memory")) or os.path.isdir(os.path.join(root, "systemd")):
            return "v1"
    except OSError:
        pass
    return "unknown"


def systemd_is_pid1() -> bool:
    """What sd_booted() tests: /run/systemd/system exists, and PID 1 is systemd."""
    try:
        with open("/proc/1/comm", encoding="utf-8", errors="replace") as f:
            comm = f.read().strip()
    except OSError:
        comm = ""
    return os.path.isdir("/run/systemd/system") and comm == "systemd"


def _call(cli: RuntimeCli, args: list[str]) -> subprocess.CompletedProcess[str] | None:
    """A call whose exit status is the answer; None when the CLI could not be run at all."""
    try:
        return cli.call(args, check=False)
    except RuntimeFailed:
        return None


def _podman_info(cli: RuntimeCli) -> tuple[dict[str, Any] | None, str]:
    try:
        info = cli.json(["info", "--format=json"])
    except RuntimeFailed as e:
        return None, e.message
    return (info, "") if isinstance(info, dict) else (None, "podman info printed no object")


def host_checks(cfg: Config) -> list[Check]:
    """What the host is, as far as safespawn cares; needs no channel."""
    out = []
    layout = cgroup_layout()
    out.append(Check(layout != "unknown", f"cgroups: {layout} (/sys/fs/cgroup)",
                     "mount the cgroup filesystem: podman needs it"))
    name, found = _cli(cfg)
    if cfg.broker.runtime == "podman" and found is not None:
        info, err = _podman_info(RuntimeCli("podman", found, 60))
        if info is None:
            out.append(Check(False, "podman info works", err))
        else:
            host = info.get("host") or {}
            oci = (host.get("ociRuntime") or {}).get("name", "?")
            version = (info.get("version") or {}).get("Version", "?")
            out.append(Check(True, f"podman {version}: cgroup manager {host.get('cgroupManager', '?')}, cgroups "
                             f"{host.get('cgroupVersion', '?')}, OCI runtime {oci}"))
    elif cfg.broker.runtime == "docker" and found is not None:
        try:
            facts = RuntimeCli.configured(cfg.broker).output(
                ["info", "--format={{.ServerVersion}} {{.CgroupDriver}} {{.CgroupVersion}}"]).split()
        except RuntimeFailed as e:
            facts = []
            out.append(Check(False, "docker info works", e.message))
        if len(facts) == 3:
            out.append(Check(True, f"dockerd {facts[0]}: cgroup driver {facts[1]}, cgroups v{facts[2]}"))
    elif cfg.broker.runtime == "podman" and shutil.which(cfg.broker.docker) is not None:
        out.append(Check(True, "docker found: with it, set [broker] runtime = \"docker\" (docs/kolla.md)"))
    if systemd_is_pid1():
        out.append(Check(True, "systemd is PID 1: `safespawn install` sets up the units (docs/operations.md)"))
    else:
        out.append(Check(True, "systemd is not PID 1: serve the channels with `safespawn watch` "
                         "(docs/operations.md, \"Without systemd\")"))
    out.append(Check(os.path.exists("/proc/self/ns/net"), "network namespaces (/proc/self/ns/net)",
                     "a kernel with CONFIG_NET_NS"))
    ip = shutil.which("ip")
    out.append(Check(ip is not None, f"ip (iproute2) found ({ip})", "install iproute2: Neutron's `ip netns` "
                     "makes the namespaces the sidecars join"))
    netns_dir = str(cfg.broker.netns_dir)
    out.append(Check(True, f"{netns_dir} " + ("exists" if os.path.isdir(netns_dir) else
                                             "does not exist yet (`ip netns add` creates it)")))
    return out
