"""The Docker runtime, end to end: a private dockerd, real containers, real netns, real DHCP.

The core specification of tests/integration/test_core.py runs again here, unchanged, with the
`broker` fixture switched to Docker (`broker_runtime` below): a real lease from the dnsmasq sidecar,
idempotent start and replace, HUP, TERM/KILL, the sidecar outliving requester and broker, the
refusals, and 100 concurrent requests each answered once. The rest of the file covers what is
Docker's own: the OCI runtime that puts the sidecar into its netns (ociruntime.py), given hostile
values directly and through requests, and check-config/doctor.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from support import netlab

from safespawn.agent import client

from .test_core import (  # noqa: F401 (the imported tests run here again, with the Docker broker)
    dnsmasq_argv,
    pair,
    qdhcp,
    test_100_concurrent_requests_from_separate_processes_each_get_exactly_one_reply,
    test_a_failing_program_is_reported_with_its_output,
    test_hup_makes_dnsmasq_reread_its_hosts_file,
    test_refused_requests_get_a_coded_reply_and_create_nothing,
    test_same_start_changes_nothing_and_changed_arguments_replace,
    test_sidecar_outlives_the_requesting_process_and_the_broker,
    test_start_runs_dnsmasq_that_hands_out_a_real_lease,
    test_stop_by_profile_and_netns,
    test_term_and_kill_remove_the_container_and_its_desired_state,
)


@pytest.fixture
def broker_runtime() -> str:
    return "docker"


def test_the_dnsmasq_sidecar_runs_in_the_requested_netns_through_the_oci_runtime(broker, pair, dockerd):
    r = broker.request(client.start_request("dnsmasq", dnsmasq_argv(broker.data_dir, pair), netns=pair.server_ns))
    assert r["ok"], r
    [insp] = dockerd.inspect(r["sidecar"])
    assert insp["HostConfig"]["Runtime"] == "safespawn"
    assert insp["HostConfig"]["NetworkMode"] == "none"
    want = os.stat(f"/run/netns/{pair.server_ns}")
    got = os.stat(f"/proc/{r['pid']}/ns/net")
    assert (got.st_dev, got.st_ino) == (want.st_dev, want.st_ino)
    host = os.stat("/proc/self/ns/net")  # the broker's (the host's) own
    assert (got.st_dev, got.st_ino) != (host.st_dev, host.st_ino)
    # The profile's limits and the channel's budget cgroup, as with podman (docs/security.md).
    hc = insp["HostConfig"]
    assert hc["Memory"] == hc["MemorySwap"] == 64 << 20 and hc["NanoCpus"] == 500_000_000
    assert hc["PidsLimit"] == 64 and hc["OomScoreAdj"] == 500
    assert hc["CgroupParent"] == f"/safespawn/{broker.channel}"
    mem = Path(f"/proc/{r['pid']}/cgroup").read_text()
    assert f":memory:/safespawn/{broker.channel}/" in mem, mem


# -- the OCI runtime, given hostile values directly --------------------------------------------------

FAKE_RUNC = """#!{python}
import json, os, sys
cfg = json.load(open(os.path.join(sys.argv[sys.argv.index("--bundle") + 1], "config.json")))
net = [n for n in cfg["linux"]["namespaces"] if n["type"] == "network"][0]
st = os.stat(net["path"]) if net.get("path") else None
json.dump({{"argv": sys.argv[1:], "pid": os.getpid(), "path": net.get("path"),
           "ns": [st.st_dev, st.st_ino] if st else None}}, open({out!r}, "w"))
"""


def bundle_config(env: list[str], network: dict | None = None) -> dict:
    """A config.json shaped like the one dockerd writes for `docker run --network=none -v D:D`."""
    return {
        "ociVersion": "1.0.2-dev",
        "process": {"args": ["dnsmasq", "-k"], "env": ["PATH=/usr/bin:/bin", *env],
                    "capabilities": {"bounding": ["CAP_NET_ADMIN"], "effective": ["CAP_NET_ADMIN"]},
                    "noNewPrivileges": True},
        "root": {"path": "/var/lib/docker/overlay2/x/merged", "readonly": True},
        "mounts": [{"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec"]},
                   {"destination": "/var/lib/neutron", "type": "bind", "source": "/var/lib/neutron",
                    "options": ["rbind", "rslave"]},
                   {"destination": "/etc/hostname", "type": "bind", "source": "/x/hostname",
                    "options": ["rbind", "ro", "rprivate"]}],
        "linux": {"namespaces": [{"type": "mount"}, *([network] if network is not None else []),
                                 {"type": "pid"}, {"type": "uts"}, {"type": "ipc"}]},
    }


class OciRun:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.bundle = tmp / "bundle"
        self.bundle.mkdir()
        self.out = tmp / "runc.json"
        self.runc = tmp / "fake-runc"
        self.runc.write_text(FAKE_RUNC.format(python=sys.executable, out=str(self.out)))
        self.runc.chmod(0o755)
        self.log = tmp / "log.json"
        (tmp / "safespawn.toml").write_text(f'[broker]\nnetns_dir = "/run/netns"\nprofiles_dir = "{tmp}/p"\n')

    def __call__(self, env: list[str], network: dict | None = None) -> subprocess.CompletedProcess[str]:
        if network is None:
            network = {"type": "network"}
        (self.bundle / "config.json").write_text(json.dumps(bundle_config(env, network or None)))
        argv = ["--root", str(self.tmp / "root"), "--log", str(self.log), "--log-format", "json", "create",
                "--bundle", str(self.bundle), "--pid-file", str(self.tmp / "pid"), "cid0"]
        self.argv = argv
        envs = {"PATH": os.environ["PATH"], "SAFESPAWN_OCI_RUNC": str(self.runc),
                "SAFESPAWN_CONFIG": str(self.tmp / "safespawn.toml")}
        # The console script, as dockerd runs it.
        program = Path(sys.executable).with_name("safespawn-oci-runtime")
        return subprocess.run([str(program), *argv], capture_output=True,
                              text=True, timeout=30, env=envs, check=False)

    def config(self) -> dict:
        return json.loads((self.bundle / "config.json").read_text())


@pytest.fixture
def oci(tmp_path: Path) -> OciRun:
    return OciRun(tmp_path)


@pytest.fixture
def host_netns_under_qdhcp_name():
    """The host's own netns bind-mounted at /run/netns/qdhcp-UUID, as a hostile agent with mount rights could."""
    name = qdhcp()
    path = Path("/run/netns") / name
    path.touch()
    try:
        netlab.run(["mount", "--bind", "/proc/self/ns/net", str(path)])
        yield name
    finally:
        subprocess.run(["umount", str(path)], capture_output=True, check=False)
        path.unlink()


def test_the_oci_runtime_joins_the_checked_netns_and_changes_nothing_else(oci, pair):
    p = oci([f"SAFESPAWN_NETNS={pair.server_ns}", "SAFESPAWN_PROFILE=dnsmasq"])
    assert p.returncode == 0, p.stderr
    ran = json.loads(oci.out.read_text())
    assert ran["argv"] == oci.argv  # runc got every argument untouched
    want = os.stat(f"/run/netns/{pair.server_ns}")
    assert ran["ns"] == [want.st_dev, want.st_ino]  # the very file that was checked, held open
    assert ran["path"].startswith(f"/proc/{ran['pid']}/fd/")
    before, after = bundle_config([f"SAFESPAWN_NETNS={pair.server_ns}", "SAFESPAWN_PROFILE=dnsmasq"],
                                  {"type": "network"}), oci.config()
    assert after["linux"]["namespaces"][1] == {"type": "network", "path": ran["path"]}
    after["linux"]["namespaces"][1] = {"type": "network"}
    binds = [m for m in after["mounts"] if m["type"] == "bind"]
    assert all({"nosuid", "nodev", "noexec"} <= set(m["options"]) for m in binds)
    for m in after["mounts"]:
        if m["type"] == "bind":
            m["options"] = [o for o in m["options"] if o not in ("nosuid", "nodev", "noexec")]
    assert after == before  # no capability, mount, device or namespace added


def test_the_oci_runtime_without_a_netns_leaves_the_fresh_one_and_still_hardens_bind_mounts(oci):
    p = oci([])
    assert p.returncode == 0, p.stderr
    assert json.loads(oci.out.read_text())["path"] is None
    assert all({"nosuid", "nodev", "noexec"} <= set(m["options"]) for m in oci.config()["mounts"]
               if m["type"] == "bind")


@pytest.mark.parametrize("case", [
    "missing", "dotdot", "slash", "empty", "newline", "wrong_pattern", "host_netns", "symlink", "plain_file",
    "twice", "no_profile", "unknown_profile", "profile_path", "host_network", "network_path_set",
])
def test_the_oci_runtime_refuses_a_hostile_netns_and_never_runs_runc(oci, pair, case, tmp_path,
                                                                       host_netns_under_qdhcp_name):
    made: list[Path] = []
    netns, profile, network = qdhcp(), "dnsmasq", {"type": "network"}
    if case == "missing":
        pass
    elif case == "dotdot":
        netns = "../../proc/1/ns/net"
    elif case == "slash":
        netns = f"{pair.server_ns}/../{pair.server_ns}"
    elif case == "empty":
        netns = ""
    elif case == "newline":
        netns = pair.server_ns + "\n"
    elif case == "wrong_pattern":
        netns = pair.client_ns  # a real netns, not a qdhcp- one
    elif case == "host_netns":
        netns = host_netns_under_qdhcp_name
    elif case in ("symlink", "plain_file"):
        p = Path("/run/netns") / netns
        if case == "symlink":
            p.symlink_to(f"/run/netns/{pair.server_ns}")
        else:
            p.write_text("")
        made.append(p)
    elif case == "profile_path":
        netns, profile = pair.server_ns, "../../../../etc/passwd"
    elif case == "unknown_profile":
        netns, profile = pair.server_ns, "nosuchprofile"
    elif case == "host_network":
        netns, network = pair.server_ns, {}
    elif case == "network_path_set":
        netns, network = pair.server_ns, {"type": "network", "path": "/proc/1/ns/net"}
    env = [f"SAFESPAWN_NETNS={netns}", f"SAFESPAWN_PROFILE={profile}"]
    if case == "twice":
        env = [f"SAFESPAWN_NETNS={pair.server_ns}", f"SAFESPAWN_NETNS={pair.client_ns}", "SAFESPAWN_PROFILE=dnsmasq"]
    if case == "no_profile":
        env = [f"SAFESPAWN_NETNS={pair.server_ns}"]
    try:
        written = bundle_config(env, network or None)
        p = oci(env, network)
    finally:
        for m in made:
            m.unlink()
    assert p.returncode == 3, (p.returncode, p.stderr)
    assert "safespawn-oci-runtime: refused" in p.stderr
    assert not oci.out.exists(), "runc must not run"
    assert oci.config() == written, "config.json is left as it was"
    # containerd reports runc's last JSON log line as the reason the start failed.
    assert json.loads(oci.log.read_text().splitlines()[-1])["level"] == "error"


# -- through dockerd: nothing runs outside its netns ---------------------------------------------------

def _docker_run(dockerd, image, *opts: str, check: bool = False):
    name = f"sst-probe-{uuid.uuid4().hex[:8]}"
    p = dockerd.docker("run", "--detach", f"--name={name}", "--label=safespawn.test=probe", "--pull=never", *opts,
                       "--entrypoint=sleep", image, "30", check=check)
    return name, p


@pytest.mark.parametrize("case", ["host_netns", "missing", "host_network", "host_network_without_netns"])
def test_dockerd_with_the_oci_runtime_refuses_hostile_values_and_runs_nothing(dockerd, test_image, case,
                                                                               host_netns_under_qdhcp_name):
    netns = host_netns_under_qdhcp_name if case != "missing" else qdhcp()
    network = "--network=host" if case.startswith("host_network") else "--network=none"
    env = [] if case == "host_network_without_netns" else [f"--env=SAFESPAWN_NETNS={netns}",
                                                            "--env=SAFESPAWN_PROFILE=dnsmasq"]
    name, p = _docker_run(dockerd, test_image, "--runtime=safespawn", network, *env, "--cap-drop=ALL")
    try:
        assert p.returncode != 0
        assert "safespawn-oci-runtime: refused" in p.stderr, p.stderr
        [insp] = dockerd.inspect(name)
        assert insp["State"]["Running"] is False and insp["State"]["Pid"] == 0
    finally:
        dockerd.docker("rm", "-f", name, check=False)


def test_a_request_naming_the_hosts_netns_is_refused_and_starts_no_container(broker, pair,
                                                                            host_netns_under_qdhcp_name):
    argv = dnsmasq_argv(broker.data_dir, pair)
    r = broker.request(client.start_request("dnsmasq", argv, netns=host_netns_under_qdhcp_name))
    assert r["ok"] is False and r["error"]["code"] == "policy_denied", r
    assert "host's own" in r["error"]["message"]
    assert broker.containers() == []


def test_a_netns_swapped_for_the_hosts_after_the_policy_check_is_refused_at_create(broker, pair):
    """The policy checked the netns; then the agent (which can mount under /run/netns) swaps it for
    the host's before Docker creates the container. The OCI runtime's own check stops the create, so
    the sidecar never runs at all (with podman, the post-start check catches it after the fact)."""
    from safespawn.broker.engine import Engine
    from safespawn.config import load_config
    from safespawn.runtime import DockerRuntime, make_runtime

    path = f"/run/netns/{pair.server_ns}"

    class SwapToHostNetns(DockerRuntime):
        def run(self, spec):  # type: ignore[no-untyped-def]
            netlab.run(["mount", "--bind", "/proc/self/ns/net", path])  # stacked over the checked netns
            return super().run(spec)

    cfg = load_config(str(broker.config_path))
    d = make_runtime(cfg.broker)
    broker._engine = Engine(cfg, runtime=SwapToHostNetns(d.cli.argv0, d.cli.env["DOCKER_HOST"], d.oci_runtime))
    try:
        r = broker.request(client.start_request("dnsmasq", dnsmasq_argv(broker.data_dir, pair),
                                                netns=pair.server_ns))
        assert r["ok"] is False and r["error"]["code"] == "runtime_failed", r
        assert "is the host's own network namespace" in r["error"]["message"], r
        assert [c for c in broker.containers() if c["State"] == "running"] == []
        assert broker.desired() == {}
    finally:
        subprocess.run(["umount", path], capture_output=True, check=False)
        broker._engine = None


def test_without_the_netns_value_a_docker_sidecar_stays_in_a_fresh_empty_netns(dockerd, test_image):
    name, p = _docker_run(dockerd, test_image, "--runtime=safespawn", "--network=none", "--cap-drop=ALL",
                          check=True)
    try:
        [insp] = dockerd.inspect(name)
        got = os.stat(f"/proc/{insp['State']['Pid']}/ns/net")
        host = os.stat("/proc/self/ns/net")
        assert (got.st_dev, got.st_ino) != (host.st_dev, host.st_ino)
    finally:
        dockerd.docker("rm", "-f", name, check=False)


# -- check-config and doctor ---------------------------------------------------------------------------

def test_doctor_proves_the_netns_joining_path_with_a_real_probe(broker):
    p = broker.cli("doctor")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "ok   a dnsmasq container joins a fresh netns through the OCI runtime" in p.stdout
    assert "ok   dockerd at unix://" in p.stdout
    # What the host is, as dockerd reports it (doctor's host checks).
    assert re.search(r"^ok   dockerd \d[^:]*: cgroup driver (cgroupfs|systemd), cgroups v[12]$", p.stdout, re.M), p.stdout
    assert broker.cli("check-config").returncode == 0


@pytest.mark.parametrize("oci_runtime,why", [
    ("runc", "is not in /run/netns/qdhcp-"),  # a runtime that does not move the container: caught
    ("nosuch", "has no OCI runtime 'nosuch'"),
])
def test_doctor_fails_when_the_oci_runtime_does_not_join_the_netns(make_broker, oci_runtime, why):
    b = make_broker(broker_extra=f'docker_oci_runtime = "{oci_runtime}"')
    p = b.cli("doctor")
    assert p.returncode == 1 and why in p.stdout, p.stdout


def test_check_config_fails_when_the_docker_cli_is_missing(make_broker, tmp_path):
    b = make_broker(broker_extra="")
    text = b.config_path.read_text().replace('docker = "/usr/bin/docker"', f'docker = "{tmp_path}/no-docker"')
    b.config_path.write_text(text)
    p = b.cli("check-config")
    assert p.returncode == 1 and "no-docker found (None)" in p.stderr, p.stderr
