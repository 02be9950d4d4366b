"""Does the configured runtime work on this host? The checks `check-config` and `doctor` print.

Each check is a `Check(ok, what, fix)`. `static_checks` only looks at the host (the CLI is there);
`live_checks` talks to podman or dockerd, and for Docker proves the netns-joining path end to end:
dockerd knows the OCI runtime, and a throw-away container named into a fresh netns lands in it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from dataclasses import dataclass

from ..config import Config
from .docker import DockerRuntime

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
    from ..policy import load_profile

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
    p = subprocess.run([found, "info", "--format=json"], capture_output=True, text=True, timeout=60, check=False)
    out = [Check(p.returncode == 0, "podman info works", p.stderr.strip()[-300:])]
    for ch in cfg.channels.values():
        q = subprocess.run([found, "image", "exists", ch.image], capture_output=True, timeout=60, check=False)
        out.append(Check(q.returncode == 0, f"image {ch.image} present (channel {ch.name})",
                         f"podman pull or load {ch.image}: sidecars run with --pull=never"))
    return out


def live_checks(cfg: Config) -> list[Check]:
    checks = static_checks(cfg)
    if not checks[0].ok:
        return checks
    return checks + (docker_checks(cfg) if cfg.broker.runtime == "docker" else podman_checks(cfg))
