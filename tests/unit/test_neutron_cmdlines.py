"""Every command line Neutron 29's own drivers generate passes the built-in profiles; hostile
variants of each are refused.

tests/data/neutron_cmdlines.json is recorded from the real Neutron code (tests/neutron/gen_cmdlines.py,
docs/neutron-cmdlines.md): a matrix of IPv4/IPv6 and dual-stack networks, several subnets, DNS
options, isolated/forced metadata, legacy and HA routers, radvd, the OVN metadata agent.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pytest

from safespawn.agent import client
from safespawn.broker.policy import Policy, Profile, builtin_profile_names, load_profile
from safespawn.broker.request import Request
from safespawn.config import ChannelConfig, Config
from safespawn.errors import PolicyDenied, SafespawnError

DATA = "/var/lib/neutron"
LOG_DIR = "/var/log/neutron"  # the agent's log_dir: a second data dir where an operator sets one
CMDLINES = json.loads((Path(__file__).parents[1] / "data" / "neutron_cmdlines.json").read_text())
# dnsmasq_config_file: a dnsmasq config file can say dhcp-script=, so only /dev/null (Neutron's value
# when the option is empty) is accepted; docs/neutron.md says so.
OPERATOR_CONF_FILE = re.compile(r"--conf-file=(?!/dev/null$).*")


def _id(e: dict[str, Any]) -> str:
    return f"{e['case']}:{e['program']}"


def _profile(name: str) -> Profile:
    return load_profile(name, None)


def _data_dirs(argv: list[str]) -> tuple[str, ...]:
    return (DATA, LOG_DIR) if any(LOG_DIR + "/" in a for a in argv) else (DATA,)


def _netns(e: dict[str, Any], argv: list[str]) -> str | None:
    """The netns the wrapper reports: where Neutron ran it, or (the monitor) what --namespace names."""
    if e["program"] in client.NETNS_OPTIONS:
        return client.option_value(argv, client.NETNS_OPTIONS[e["program"]])
    return str(e["netns"]) if e["netns"] else None


def _policy(monkeypatch: pytest.MonkeyPatch, data_dirs: tuple[str, ...]) -> tuple[Policy, ChannelConfig]:
    channel = ChannelConfig(name="neutron", image="localhost/x:1", profiles=tuple(builtin_profile_names()),
                            data_dirs=data_dirs)
    policy = Policy(Config(channels={"neutron": channel}), host_ns=())
    # The namespaces of the recording do not exist here; the pattern check is what is under test.
    monkeypatch.setattr(Policy, "check_netns", lambda self, profile, netns, resolve=True: (
        f"/run/netns/{netns}" if profile.netns_pattern and netns and profile.netns_pattern.fullmatch(netns)
        else (_ for _ in ()).throw(PolicyDenied(f"netns {netns!r}"))))
    return policy, channel


def _start(e: dict[str, Any], argv: list[str], netns: str | None = None) -> Request:
    return Request("0" * 32, "start", e["program"], netns if netns is not None else _netns(e, argv), tuple(argv))


def _with_private_pid_files(argv: list[str], profile: Any) -> tuple[list[str], list[str]]:
    """argv as the sidecar gets it, and the pid files the host writes (what the policy must do)."""
    out, requested = [], []
    for i, a in enumerate(argv):
        opt, eq, value = a.partition("=")
        if i and argv[i - 1] in profile.pid_files:
            requested.append(a)
            out.append(f"/run/safespawn-{argv[i - 1].lstrip('-').replace('_', '-')}-{os.path.basename(a)}")
        elif eq and opt in profile.pid_files:
            requested.append(value)
            out.append(f"{opt}=/run/safespawn-{opt.lstrip('-').replace('_', '-')}-{os.path.basename(value)}")
        else:
            out.append(a)
    return out, requested


ACCEPTED = [e for e in CMDLINES if not any(OPERATOR_CONF_FILE.fullmatch(a) for a in e["argv"])]


def test_the_recording_covers_every_program_and_the_matrix() -> None:
    programs = {e["program"] for e in CMDLINES}
    assert programs == {"dnsmasq", "haproxy", "keepalived", "neutron-keepalived-state-change", "radvd"}
    assert programs == set(builtin_profile_names())
    cases = " ".join(e["case"] for e in CMDLINES)
    for word in ("ipv4", "ipv6", "dual-stack", "three-subnets", "ha", "legacy", "ovn-metadata", "radvd"):
        assert word in cases
    assert len(ACCEPTED) >= len(CMDLINES) - 1


@pytest.mark.parametrize("entry", ACCEPTED, ids=_id)
def test_neutron_command_line_is_accepted(entry: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    argv = client.program_args(entry["argv"])  # what the wrapper forwards
    policy, channel = _policy(monkeypatch, _data_dirs(argv))
    spec = policy.authorize_start(channel, _start(entry, argv))
    # Every argument goes through unchanged except the pid files' values: the program writes its
    # own (namespace) pid into its private /run, and the host writes the host pid at Neutron's path.
    profile = _profile(entry["program"])
    expected, requested = _with_private_pid_files(argv, profile)
    # ... and a user to switch to (radvd -u): the sidecar runs as the channel's unprivileged uid,
    # which cannot switch and need not (docs/security.md, "Sidecar uids").
    if spec.user != "0:0":
        expected = list(profile.without_user_options(tuple(expected)))
    assert spec.args == tuple(expected)
    assert [path for path, _ in spec.pid_files] == requested
    if entry["program"] != "haproxy":  # haproxy names its pid file in its config; the wrapper adds -p
        assert requested, "Neutron names a pid file on every command line it runs"
    assert spec.entrypoint == _profile(entry["program"]).command
    assert spec.netns == _netns(entry, argv)
    if entry["netns"]:
        assert spec.netns == entry["netns"], "Neutron ran it in the netns the sidecar joins"


@pytest.mark.parametrize("entry", [e for e in CMDLINES if e not in ACCEPTED], ids=_id)
def test_an_operator_dnsmasq_config_file_is_refused_and_dev_null_is_not(entry: dict[str, Any]) -> None:
    argv = client.program_args(entry["argv"])
    profile = _profile(entry["program"])
    with pytest.raises(PolicyDenied, match="--conf-file"):
        profile.check_argv(tuple(argv), _data_dirs(argv))
    fixed = ["--conf-file=/dev/null" if OPERATOR_CONF_FILE.fullmatch(a) else a for a in argv]
    profile.check_argv(tuple(fixed), _data_dirs(argv))


def test_the_empty_argument_neutron_passes_for_dnsmasq_is_dropped_by_the_wrapper() -> None:
    [entry] = [e for e in CMDLINES if "" in e["argv"]]
    argv = client.program_args(entry["argv"])
    assert "" not in argv and len(argv) == len(entry["argv"]) - 1
    with pytest.raises(PolicyDenied):
        _profile("dnsmasq").check_argv(tuple(entry["argv"]), (DATA,))


# -- hostile variants --------------------------------------------------------------------------------

# Options that run a program, read or write outside the data dirs, or pull in a config directory.
HOSTILE_OPTIONS: dict[str, list[list[str]]] = {
    "dnsmasq": [["--dhcp-script=/bin/sh"], ["--dhcp-luascript=/var/lib/neutron/x.lua"],
                ["--conf-dir=/var/lib/neutron"], ["--conf-dir=/etc/dnsmasq.d"], ["--servers-file=/etc/shadow"],
                ["--conf-file=/var/lib/neutron/evil.conf"], ["--conf-file=/etc/shadow"], ["--user=root"],
                ["--addn-hosts=/etc/shadow"], ["--dhcp-hostsdir=/var/lib/neutron"], ["--tftp-root=/"]],
    "haproxy": [["-f", "/etc/haproxy/haproxy.cfg"], ["-f", "/var/lib/neutron/../../../etc/shadow"],
                ["-sf", "1"], ["-st", "1"], ["-x", "/run/podman/podman.sock"], ["-C", "/"], ["-L", "peer"],
                ["-db"], ["-c"]],
    "keepalived": [["--use-file=/etc/shadow"], ["-f", "/etc/keepalived/keepalived.conf"], ["--namespace=host"],
                   ["-s", "host"], ["--script-user=root"], ["--enable-script-security"], ["-S", "0"],
                   ["--config-id", "x"], ["-C"]],
    "radvd": [["-C", "/etc/radvd.conf"], ["-p", "/run/radvd.pid"], ["-m", "logfile"], ["-l", "/etc/cron.d/x"],
              ["-u", "root;reboot"], ["-d", "5"], ["-c"]],
    "neutron-keepalived-state-change": [["--conf_dir", "/etc"], ["--log-file", "/etc/cron.d/x"],
                                        ["--state_path", "/"], ["--pid_file", "/run/x.pid"],
                                        ["--config-file", "/etc/neutron/neutron.conf"], ["--user=0"],
                                        ["--monitor_cidr", "10.0.0.1/24;reboot"], ["--router_id", "../.."]],
}
# Whatever the program: runtime options, positional programs, shell syntax.
HOSTILE_ANY = [["--privileged"], ["--volume=/:/host"], ["/bin/sh", "-c", "reboot"], ["--", "/bin/sh"],
               ["$(reboot)"], ["-"]]


def _variants(entry: dict[str, Any]) -> list[tuple[str, list[str]]]:
    argv = client.program_args(entry["argv"])
    out = [(f"extra {' '.join(x)}", argv + x) for x in HOSTILE_OPTIONS[entry["program"]] + HOSTILE_ANY]
    out += [(f"prefix {' '.join(x)}", x + argv) for x in HOSTILE_OPTIONS[entry["program"]][:2]]
    # Each path Neutron passes, moved outside the data dirs (plainly, by '..', by a double slash).
    for i, a in enumerate(argv):
        for bad in ("/etc/shadow", f"{DATA}/../../../etc/shadow", f"{DATA}//x", "relative/path"):
            if a.startswith(DATA + "/"):
                out.append((f"argv[{i}] -> {bad}", argv[:i] + [bad] + argv[i + 1:]))
            elif "=" + DATA + "/" in a:
                out.append((f"argv[{i}] -> {bad}", argv[:i] + [a.split("=", 1)[0] + "=" + bad] + argv[i + 1:]))
    return out


@pytest.mark.parametrize("entry", CMDLINES, ids=_id)
def test_hostile_variants_of_each_command_line_are_refused(entry: dict[str, Any],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    argv = client.program_args(entry["argv"])
    policy, channel = _policy(monkeypatch, _data_dirs(argv))
    variants = _variants(entry)
    assert len(variants) >= 15
    for what, bad in variants:
        with pytest.raises(SafespawnError):
            policy.authorize_start(channel, _start(entry, bad, netns=_netns(entry, argv)))
            pytest.fail(f"accepted: {what}")


@pytest.mark.parametrize("entry", [e for e in ACCEPTED if e["netns"]], ids=_id)
def test_a_command_line_in_a_namespace_its_profile_does_not_allow_is_refused(
        entry: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    argv = client.program_args(entry["argv"])
    policy, channel = _policy(monkeypatch, _data_dirs(argv))
    uuid = entry["netns"].split("-", 1)[1]
    for ns in (f"fip-{uuid}", "host", f"qdhcp-{uuid}x", f"ovnmeta-{uuid}" if entry["program"] != "haproxy"
               else f"snat-{uuid}"):
        with pytest.raises(SafespawnError):
            policy.authorize_start(channel, _start(entry, argv, netns=ns))
            pytest.fail(f"accepted netns {ns}")


@pytest.mark.parametrize("entry", [e for e in CMDLINES if e["program"] == "neutron-keepalived-state-change"],
                         ids=_id)
def test_the_monitor_must_watch_the_namespace_it_runs_in(entry: dict[str, Any],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    argv = client.program_args(entry["argv"])
    policy, channel = _policy(monkeypatch, _data_dirs(argv))
    own = _netns(entry, argv)
    assert own and own.startswith("qrouter-")
    other = "qrouter-00000000-0000-4000-8000-000000000000"
    with pytest.raises(PolicyDenied, match="--namespace"):
        policy.authorize_start(channel, _start(entry, argv, netns=other))
    twice = argv + ["--namespace", own]
    with pytest.raises(PolicyDenied, match="--namespace"):
        policy.authorize_start(channel, _start(entry, twice, netns=own))
