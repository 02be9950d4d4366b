"""adopt's reading of legacy containers: names nominate, command lines and netns inodes decide."""

from __future__ import annotations

import os

import pytest

from safespawn.ops.adopt import _match, named_netns_by_inode, program_argv

NS = "qdhcp-0b0e4cc0-3f1a-4a5e-9f5e-1c2d3e4f5a6b"


@pytest.mark.parametrize("name,flavor,proc,ns", [
    (f"neutron-dnsmasq-{NS}", "tripleo", "dnsmasq", NS),
    (f"neutron-dnsmasq-{NS}-1733083200", "tripleo", "dnsmasq", NS),
    ("neutron-haproxy-ovnmeta-0b0e4cc0-3f1a-4a5e-9f5e-1c2d3e4f5a6b", "tripleo", "haproxy",
     "ovnmeta-0b0e4cc0-3f1a-4a5e-9f5e-1c2d3e4f5a6b"),
    ("neutron-keepalived-qrouter-0b0e4cc0-3f1a-4a5e-9f5e-1c2d3e4f5a6b", "tripleo", "keepalived",
     "qrouter-0b0e4cc0-3f1a-4a5e-9f5e-1c2d3e4f5a6b"),
    (f"neutron_dhcp_agent_dnsmasq_{NS}", "kolla", "dnsmasq", NS),
    ("neutron_l3_agent_keepalived_qrouter-0b0e4cc0-3f1a-4a5e-9f5e-1c2d3e4f5a6b", "kolla", "keepalived",
     "qrouter-0b0e4cc0-3f1a-4a5e-9f5e-1c2d3e4f5a6b"),
])
def test_wrapper_names_are_recognised(name, flavor, proc, ns):
    kind, g = _match(name, "auto")
    assert (kind, g["proc"], g["ns"]) == (flavor, proc, ns)
    assert _match(name, "kolla" if flavor == "tripleo" else "tripleo") is None


@pytest.mark.parametrize("name", ["neutron-dnsmasq", f"dnsmasq-{NS}", f"neutron-dnsmasq-{NS}-x", "web_1",
                                  f"neutron-dnsmasq-{NS}\n", f"neutron-dnsmasq-{NS[:-1]}"])
def test_other_names_are_not_legacy_sidecars(name):
    assert _match(name, "auto") is None


@pytest.mark.parametrize("cmd,expected", [
    (["dnsmasq", "-k", "--no-hosts"], ("--no-hosts",)),
    (["/usr/sbin/dnsmasq", "-k", "--no-hosts"], ("--no-hosts",)),
    (["ip", "netns", "exec", NS, "dnsmasq", "--no-hosts", "-k"], ("--no-hosts",)),
    (["dumb-init", "--single-child", "--", "dnsmasq", "--no-hosts"], ("--no-hosts",)),
    (["env", "PROCESS_TAG=dnsmasq-x", "dnsmasq", "--no-hosts"], ("--no-hosts",)),
])
def test_the_programs_own_arguments_are_taken_from_the_command_line(cmd, expected):
    assert program_argv(cmd, "dnsmasq", ["-k"]) == expected


@pytest.mark.parametrize("cmd", [
    ["sh", "-c", "dnsmasq --no-hosts"],          # a shell in front: not the shape the wrappers make
    ["haproxy", "-f", "/x"],                     # another program under a dnsmasq name
    ["python3", "dnsmasq", "--no-hosts"],        # the program's name as an argument of something else
    ["ip", "netns", "exec"],
    [],
])
def test_a_command_line_that_does_not_run_the_program_is_not_adopted(cmd):
    assert program_argv(cmd, "dnsmasq", ["-k"]) is None


def test_named_netns_are_matched_by_inode_and_symlinks_are_ignored(tmp_path):
    (tmp_path / "qdhcp-real").write_text("")
    os.symlink("/proc/1/ns/net", tmp_path / "qdhcp-link")
    found = named_netns_by_inode(str(tmp_path))
    assert sorted(found.values()) == ["qdhcp-real"]
    assert named_netns_by_inode(str(tmp_path / "missing")) == {}


def _channel(tmp_path):
    ch = tmp_path / "ch"
    for d in ("inbox/tmp", "inbox/new", "outbox/replies"):
        (ch / d).mkdir(parents=True)
    return ch


def test_the_request_is_renamed_from_tmp_into_new(tmp_path):
    from safespawn.ops.adopt import write_request

    ch = _channel(tmp_path)
    rid = write_request(str(ch), {"v": 1, "id": "a" * 32, "op": "start"})
    assert os.listdir(ch / "inbox" / "new") == [f"{rid}.json"] and os.listdir(ch / "inbox" / "tmp") == []


@pytest.mark.parametrize("swapped", ["inbox", "inbox/tmp", "inbox/new"])
def test_a_symlinked_inbox_folder_never_makes_root_write_elsewhere(tmp_path, swapped):
    from safespawn.ops.adopt import write_request

    ch = _channel(tmp_path)
    victim = tmp_path / "etc"
    victim.mkdir()
    (victim / "tmp").mkdir()
    (victim / "new").mkdir()
    target = ch / swapped
    os.rename(target, tmp_path / "moved")
    os.symlink(victim, target)
    with pytest.raises(OSError):
        write_request(str(ch), {"v": 1, "id": "b" * 32, "op": "start"})
    assert [p for p in victim.rglob("*") if p.is_file()] == []


FAKE_CLI = """#!{python}
import json, os, sys
with open({log!r}, "a") as f:
    f.write(json.dumps([sys.argv[1:], os.environ.get("DOCKER_HOST")]) + "\\n")
if sys.argv[1] == "ps":
    print("{cid}")
elif sys.argv[1:3] == ["container", "inspect"]:
    print(json.dumps([{{"Id": "{cid}", "Name": "/neutron_dhcp_agent_dnsmasq_{ns}", "Path": "dnsmasq",
                       "Args": ["-k", "--port=0"], "State": {{"Status": "exited", "Pid": 0}},
                       "Created": "2026-12-01T19:21:21.273282123Z", "Config": {{"Labels": {{}}}},
                       "HostConfig": {{"AutoRemove": True}}}}]))
"""


@pytest.mark.parametrize("runtime", ["podman", "docker"])
def test_adopt_reads_and_stops_legacy_containers_through_the_configured_runtimes_cli(runtime, tmp_path):
    import json
    import sys

    from safespawn.config import parse_config
    from safespawn.ops.adopt import Cli, discover

    log, cid = tmp_path / "calls", "c" * 64
    cli_path = tmp_path / runtime
    cli_path.write_text(FAKE_CLI.format(python=sys.executable, log=str(log), cid=cid, ns=NS))
    cli_path.chmod(0o755)
    broker = {"podman": str(cli_path)} if runtime == "podman" else {
        "runtime": "docker", "docker": str(cli_path), "docker_host": "unix:///run/other/docker.sock"}
    cli = Cli.from_config(parse_config({"broker": broker}))
    [lg] = discover(cli, str(tmp_path), "kolla")
    # docker's "/name" and podman's "name" are the same container name.
    assert (lg.name, lg.id, lg.proc, lg.name_netns) == (f"neutron_dhcp_agent_dnsmasq_{NS}", cid, "dnsmasq", NS)
    assert lg.cmdline == ("dnsmasq", "-k", "--port=0") and lg.auto_remove and not lg.running
    cli.stop(lg.name, 5)
    cli.remove(lg.name)
    assert cli.start(lg.name)
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert [c[0] for c in calls] == [
        ["ps", "--all", "--quiet", "--no-trunc"], ["container", "inspect", "--", cid],
        ["stop", "--time=5", "--", lg.name], ["rm", "--force", "--", lg.name], ["start", "--", lg.name]]
    # DOCKER_HOST from the config reaches every docker call; podman's environment is left as it is.
    want = "unix:///run/other/docker.sock" if runtime == "docker" else os.environ.get("DOCKER_HOST")
    assert {c[1] for c in calls} == {want}
