"""The Docker runtime's pure parts: its command line, its configuration, the runtime factory, and
the OCI runtime's argv parsing and config.json rewrite (the hostile values themselves are refused
in tests/integration/test_docker.py, against real netns)."""

from __future__ import annotations

import copy

import pytest

from safespawn.broker.policy import Policy
from safespawn.broker.request import Request
from safespawn.config import parse_config
from safespawn.errors import ConfigError
from safespawn.runtime import DockerRuntime, PodmanRuntime, make_runtime
from safespawn.runtime.base import unix_seconds
from safespawn.runtime.docker import run_argv
from safespawn.runtime.ociruntime import Refused, parse_runc_argv, rewrite

CFG = {
    "broker": {"runtime": "docker", "docker": "/usr/bin/docker", "docker_host": "unix:///run/d/docker.sock"},
    "channels": {"neutron-dhcp": {"image": "localhost/example:latest", "profiles": ["dnsmasq"],
                                  "data_dirs": ["/var/lib/neutron"]}},
}
NS = "qdhcp-11111111-2222-3333-4444-555555555555"


def spec_for(argv: list[str], netns: str | None = NS):
    cfg = parse_config(CFG)
    policy = Policy(cfg, host_ns=[])
    policy.check_netns = lambda profile, netns, resolve=True: f"/run/netns/{netns}"  # type: ignore[method-assign]
    return policy.authorize_start(cfg.channel("neutron-dhcp"), Request("a" * 32, "start", "dnsmasq", netns,
                                                                      tuple(argv)))


def test_nothing_from_the_request_goes_before_the_image_in_docker_run():
    argv = ["--no-hosts", "--interface=tap1"]
    cmd = run_argv(spec_for(argv), "/usr/bin/docker")
    i = cmd.index("localhost/example:latest")
    # Docker's --entrypoint is one program: the profile's fixed "-k" follows the image, then the request's.
    assert cmd[i + 1:] == ["-k", *argv]
    before = cmd[:i]
    assert before[:2] == ["/usr/bin/docker", "run"]
    assert all(a.startswith("--") for a in before[2:])  # each host value fused into one token
    assert "--privileged" not in " ".join(before)
    assert before.index("--cap-drop=ALL") < min(before.index(a) for a in before if a.startswith("--cap-add="))
    assert {a for a in before if a.startswith("--cap-add=")} == {
        f"--cap-add={c}" for c in ("NET_ADMIN", "NET_RAW", "NET_BIND_SERVICE")}  # no SETUID/SETGID: not root
    for opt in ("--security-opt=no-new-privileges", "--read-only", "--runtime=safespawn", "--network=none",
                "--cgroupns=private", "--pull=never", "--entrypoint=dnsmasq", "--restart=on-failure:3",
                f"--env=SAFESPAWN_NETNS={NS}", "--env=SAFESPAWN_PROFILE=dnsmasq",
                "--mount=type=bind,source=/var/lib/neutron,target=/var/lib/neutron",
                "--tmpfs=/run:rw,nosuid,nodev,noexec,size=16m,mode=1777"):
        assert opt in before, opt
    assert not any(a.startswith("--network=ns:") or a == "--network=host" for a in before)


def test_docker_run_follows_the_profiles_pid_namespace_choice():
    spec = spec_for(["--no-hosts"])
    assert ("--pid=host" in run_argv(spec)) is spec.pid_host
    import dataclasses

    assert "--pid=host" not in run_argv(dataclasses.replace(spec, pid_host=False))
    assert "--pid=host" in run_argv(dataclasses.replace(spec, pid_host=True))


def test_a_sidecar_without_a_netns_carries_no_netns_value():
    import dataclasses

    spec = dataclasses.replace(spec_for(["--no-hosts"]), netns=None, netns_path=None)
    cmd = run_argv(spec)
    assert not any("SAFESPAWN_NETNS" in a for a in cmd) and "--network=none" in cmd


def test_the_runtime_setting_picks_the_runtime_in_one_place():
    d = make_runtime(parse_config(CFG).broker)
    assert isinstance(d, DockerRuntime)
    assert d.cli.argv0 == "/usr/bin/docker" and d.cli.env["DOCKER_HOST"] == "unix:///run/d/docker.sock"
    assert d.oci_runtime == "safespawn"
    assert isinstance(make_runtime(parse_config({}).broker), PodmanRuntime)  # the default


@pytest.mark.parametrize("broker,why", [
    ({"runtime": "lxc"}, "broker.runtime"),
    ({"runtime": "docker", "docker_host": "/run/docker.sock"}, "docker_host"),
    ({"runtime": "docker", "docker_host": "unix:///run/x sock"}, "docker_host"),
    ({"runtime": "docker", "docker_oci_runtime": "../runc"}, "docker_oci_runtime"),
    ({"runtime": "docker", "docker": 1}, "broker.docker"),
])
def test_invalid_docker_settings_are_refused_with_the_key_named(broker, why):
    with pytest.raises(ConfigError, match=why):
        parse_config({"broker": broker})


def test_dockers_nanosecond_times_become_unix_seconds():
    assert unix_seconds("2026-12-01T19:21:21.273282123Z") == 1796152881
    assert unix_seconds("0001-01-01T00:00:00Z") == 0 and unix_seconds(None) == 0 and unix_seconds("garbage") == 0
    # podman's inspect times, with an offset, are read by the same function
    assert unix_seconds("2026-12-01T20:21:21.5+01:00") == 1796152881


@pytest.mark.parametrize("argv,want", [
    (["--root", "/r", "--log", "/l.json", "--log-format", "json", "create", "--bundle", "/b", "--pid-file", "/p",
      "id"], ("create", "/b", "/l.json")),
    (["--root=/r", "--systemd-cgroup", "create", "-b", "/b2", "id"], ("create", "/b2", None)),
    (["--log=/l", "create", "--bundle=/b3", "id"], ("create", "/b3", "/l")),
    (["--root", "/r", "start", "id"], ("start", None, None)),
    (["--root", "create", "state", "id"], ("state", None, None)),  # "create" here is --root's value
])
def test_runcs_command_line_is_read_without_changing_it(argv, want, monkeypatch):
    monkeypatch.chdir("/")
    sub, bundle, log = parse_runc_argv(list(argv))
    assert (sub, bundle if sub == "create" else None, log) == want


def test_create_without_bundle_uses_the_working_directory(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert parse_runc_argv(["create", "id"]) == ("create", str(tmp_path), None)


CONFIG = {"process": {"env": ["PATH=/bin"], "capabilities": {"bounding": []}},
          "mounts": [{"destination": "/d", "type": "bind", "source": "/d", "options": ["rbind", "rslave"]},
                     {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid"]}],
          "linux": {"namespaces": [{"type": "pid"}, {"type": "network"}]}}


def test_the_rewrite_sets_only_the_netns_path_and_hardens_bind_mounts():
    out = rewrite(copy.deepcopy(CONFIG), 7, 1234)
    assert out["linux"]["namespaces"] == [{"type": "pid"}, {"type": "network", "path": "/proc/1234/fd/7"}]
    assert out["mounts"][0]["options"] == ["rbind", "rslave", "nosuid", "nodev", "noexec"]
    assert out["mounts"][1] == CONFIG["mounts"][1]
    assert out["process"] == CONFIG["process"]


def test_the_rewrite_makes_a_non_root_sidecars_granted_capabilities_ambient_and_nothing_more():
    cfg = copy.deepcopy(CONFIG)
    cfg["process"]["user"] = {"uid": 2046820353, "gid": 2046820353}
    # What Docker 20.10 writes for a non-root --user: the bounding set only. A stray effective entry
    # outside it (CAP_SYS_ADMIN) is dropped, never made ambient.
    cfg["process"]["capabilities"] = {"bounding": ["CAP_NET_ADMIN", "CAP_NET_RAW"], "effective": ["CAP_SYS_ADMIN"]}
    root = copy.deepcopy(cfg)
    caps = rewrite(cfg, 7, 1234)["process"]["capabilities"]
    want = ["CAP_NET_ADMIN", "CAP_NET_RAW"]
    assert caps == {k: want for k in ("bounding", "effective", "permitted", "inheritable", "ambient")}
    root["process"]["user"] = {"uid": 0, "gid": 0}
    assert "ambient" not in rewrite(root, 7, 1234)["process"]["capabilities"], "root keeps its caps anyway"


@pytest.mark.parametrize("namespaces", [
    [{"type": "pid"}],  # no network entry: the host's netns
    [{"type": "network", "path": "/proc/1/ns/net"}],  # already another namespace
    [{"type": "network"}, {"type": "network"}],
])
@pytest.mark.parametrize("fd", [7, None])
def test_the_rewrite_refuses_a_container_that_did_not_ask_for_a_fresh_netns(namespaces, fd):
    cfg = copy.deepcopy(CONFIG)
    cfg["linux"]["namespaces"] = namespaces
    with pytest.raises(Refused):
        rewrite(cfg, fd, 1234)


@pytest.mark.parametrize("bad", [
    {"linux": {}}, {"linux": {"namespaces": "x"}}, {"linux": {"namespaces": []}, "mounts": "x"},
    {"linux": {"namespaces": []}, "mounts": ["x"]},
    {"linux": {"namespaces": []}, "mounts": [{"type": "bind", "options": "rbind"}]},
])
def test_the_rewrite_refuses_a_malformed_config(bad):
    with pytest.raises(Refused):
        rewrite(bad, None, 1)


def test_the_oci_runtimes_pass_through_path_imports_neither_the_engine_nor_tomllib():
    """dockerd runs the OCI runtime for every runc call of every sidecar: importing it stays cheap."""
    import subprocess
    import sys

    # It lives in runtime/, whose __init__ imports its runtimes only on first use.
    heavy = ("safespawn.broker.engine", "safespawn.broker.policy", "safespawn.config", "safespawn.runtime.podman",
             "tomllib")
    code = f"import sys, safespawn.runtime.ociruntime; print(sorted(m for m in {heavy!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"
