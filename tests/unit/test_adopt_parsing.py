"""adopt's reading of legacy containers: names nominate, command lines and netns inodes decide."""

from __future__ import annotations

import os

import pytest

from safespawn.adopt import _match, named_netns_by_inode, program_argv

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
    from safespawn.adopt import write_request

    ch = _channel(tmp_path)
    rid = write_request(str(ch), {"v": 1, "id": "a" * 32, "op": "start"})
    assert os.listdir(ch / "inbox" / "new") == [f"{rid}.json"] and os.listdir(ch / "inbox" / "tmp") == []


@pytest.mark.parametrize("swapped", ["inbox", "inbox/tmp", "inbox/new"])
def test_a_symlinked_inbox_folder_never_makes_root_write_elsewhere(tmp_path, swapped):
    from safespawn.adopt import write_request

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
