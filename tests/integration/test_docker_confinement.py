"""Every built-in profile's Docker sidecar is confined as docs/security.md says, read back from
`docker inspect` and from /proc.

As in test_confinement.py, a real broker (runtime "docker", a private dockerd) starts each profile's
sidecar in a real netns from the smallest command line it accepts. Where the program cannot really
run here, the runtime starts the same spec with only the program swapped for `sleep` (same
`run_argv` options, same image), so that the kernel's view can still be read from /proc.

Asserted from `docker inspect`: the OCI runtime is safespawn's, `--cap-drop=ALL` then exactly the
profile's capabilities, not privileged, no-new-privileges, no devices, a pids limit, no host
uts/ipc/cgroup namespace, the read-only root and only the profile's tmpfs (nosuid, nodev, noexec),
only the channel's data dirs mounted, `--network=none` (the OCI runtime moves it), `--pid=host` only
where the profile says. Asserted from /proc: bounding == the profile's capabilities, effective within
them (equal for the `sleep` stand-in),
NoNewPrivs, the process is in the requested netns (not the host's), the data dirs are mounted
nosuid,nodev,noexec and the root read-only.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
from support.broker import Broker

from safespawn.agent import client
from safespawn.broker.policy import FORBIDDEN_CAPS, FORBIDDEN_WITH_PID_HOST, Policy, Profile
from safespawn.broker.request import Request
from safespawn.runtime import make_runtime
from safespawn.runtime.docker import run_argv

from .test_confinement import (
    CAP_BITS,
    PROFILES,
    _capbnd,
    _no_new_privs,
    minimal_argv,
    netlab_netns,
    netns_name,
    profile_name,  # noqa: F401 (the parametrized fixture)
)


@pytest.fixture
def broker_runtime() -> str:
    return "docker"


def _capeff(pid: int) -> set[str]:
    line = next(ln for ln in Path(f"/proc/{pid}/status").read_text().splitlines() if ln.startswith("CapEff:"))
    mask = int(line.split()[1], 16)
    return {n for n, bit in CAP_BITS.items() if mask >> bit & 1}


def _mount_options(pid: int) -> dict[str, set[str]]:
    """Mount point -> per-mount options, as the sidecar's own mount namespace has them."""
    out = {}
    for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines():
        f = line.split()
        out[f[4]] = set(f[5].split(","))
    return out


def test_every_builtin_profile_runs_confined_under_docker(make_broker, dockerd, profile_name: str) -> None:
    b: Broker = make_broker(profiles=PROFILES)
    policy = Policy(b.engine.config)
    profile = policy.profiles[profile_name]
    channel = b.engine.config.channel(b.channel)
    ns = netns_name(profile)
    with netlab_netns(ns):
        argv = minimal_argv(profile_name, b.data_dir, ns)
        reply = b.request(client.start_request(profile_name, argv, netns=ns))
        spec = policy.authorize_start(channel, Request("0" * 32, "start", profile_name, ns, tuple(argv)))
        if not reply["ok"]:
            # The program cannot run here; the same confinement around `sleep` can.
            assert profile_name != "dnsmasq", reply
            assert reply["error"]["code"] == "runtime_failed", reply
            spec = dataclasses.replace(spec, entrypoint=("sleep",), args=("300",))
            make_runtime(b.engine.config.broker).run(spec)
        cmd = run_argv(spec, "docker")
        [insp] = dockerd.inspect(spec.name)
        # The channel's own unprivileged uid (the state-change monitor: the root agent's), and then the
        # profile's capabilities without SETUID/SETGID, made ambient by safespawn's OCI runtime.
        assert insp["Config"]["User"] == spec.user
        assert (spec.user == "0:0") is (profile.run_as == "agent"), spec.user
        caps = set(spec.capabilities)
        assert caps == set(profile.capabilities) - ({"SETUID", "SETGID"} if spec.user != "0:0" else set())
        check_docker_confinement(dataclasses.replace(profile, capabilities=spec.capabilities), spec.mounts, cmd, insp)
        pid = insp["State"]["Pid"]
        assert insp["State"]["Running"] and pid
        assert _capbnd(pid) == caps
        # A program may drop capabilities itself (dnsmasq does, when it changes user); `sleep` keeps them.
        assert _capeff(pid) <= caps
        if not reply["ok"]:
            assert _capeff(pid) == caps
        assert _no_new_privs(pid) == "1"
        got, want = os.stat(f"/proc/{pid}/ns/net"), os.stat(f"/run/netns/{ns}")
        assert (got.st_dev, got.st_ino) == (want.st_dev, want.st_ino)
        host = os.stat("/proc/self/ns/net")
        assert (got.st_dev, got.st_ino) != (host.st_dev, host.st_ino)
        mounts = _mount_options(pid)
        for d in spec.mounts:
            assert {"nosuid", "nodev", "noexec"} <= mounts[d], (d, mounts[d])
        if profile.read_only:
            assert "ro" in mounts["/"]
            for t in profile.tmpfs:
                assert {"nosuid", "nodev", "noexec"} <= mounts[t]
        b.cleanup()


def check_docker_confinement(profile: Profile, data_dirs: tuple[str, ...], cmd: list[str], insp: dict) -> None:
    hc = insp["HostConfig"]
    before = cmd[:cmd.index(insp["Config"]["Image"])]
    assert all(a.startswith("--") or a in ("docker", "run") for a in before)  # nothing from the request
    assert before.index("--cap-drop=ALL") < min([before.index(a) for a in before if a.startswith("--cap-add=")],
                                                default=len(before))
    assert hc["Runtime"] == "safespawn"
    assert [c.upper().removeprefix("CAP_") for c in hc["CapDrop"]] == ["ALL"]
    assert {c.upper().removeprefix("CAP_") for c in hc["CapAdd"] or []} == set(profile.capabilities)
    assert not FORBIDDEN_CAPS.intersection(profile.capabilities)
    assert hc["Privileged"] is False and "--privileged" not in before
    assert "no-new-privileges" in (hc.get("SecurityOpt") or [])
    assert not hc.get("Devices")
    assert hc.get("PidsLimit") and hc["PidsLimit"] > 0
    assert hc.get("UTSMode") != "host" and hc.get("IpcMode") != "host" and hc.get("CgroupnsMode") != "host"
    assert hc["RestartPolicy"]["Name"] == "on-failure" and hc["RestartPolicy"]["MaximumRetryCount"] > 0
    assert hc["ReadonlyRootfs"] is profile.read_only
    if profile.read_only:
        assert set(hc.get("Tmpfs") or {}) == set(profile.tmpfs), hc.get("Tmpfs")
        for opts in (hc.get("Tmpfs") or {}).values():
            assert {"nosuid", "nodev", "noexec"} <= set(opts.split(","))
    mounts = insp["Mounts"]
    assert sorted(m["Destination"] for m in mounts) == sorted(data_dirs)
    for m in mounts:
        assert m["Type"] == "bind" and m["Source"] == m["Destination"]
    assert hc["NetworkMode"] == "none"  # the OCI runtime moves it into the netns
    if profile.pid_host:
        assert hc["PidMode"] == "host"
        assert not set(profile.capabilities) & FORBIDDEN_WITH_PID_HOST
    else:
        assert hc["PidMode"] != "host"
