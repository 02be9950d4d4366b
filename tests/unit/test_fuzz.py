"""Property-based fuzzing of the two parsers that see hostile input, plus unit tests of policy pieces.

Invariant for both `parse_request` and `Profile.check_argv`: whatever the input, the call either
accepts it (returning a value that satisfies the contract) or refuses it with a coded
`SafespawnError`. No other exception escapes, so the broker can always address a reply.
Runs are bounded (a few hundred examples each, no deadline) to keep CI fast.
"""

from __future__ import annotations

import json
import os
import re
import string
import uuid

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from safespawn.broker.policy import (
    CLONE_NEWNET,
    FORBIDDEN_CAPS,
    FORBIDDEN_WITH_PID_HOST,
    Policy,
    Profile,
    builtin_profile_names,
    check_path,
    load_profile,
    parse_profile,
)
from safespawn.broker.request import ID_RE, MAX_ARG_LEN, MAX_ARGS, OPS, SIGNALS, Request, decode_json, parse_request
from safespawn.config import parse_config
from safespawn.errors import BadRequest, ConfigError, ErrorCode, NotFound, PolicyDenied, SafespawnError

FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow],
                database=None)
DATA = "/var/lib/neutron"
RID = "0123456789abcdef0123456789abcdef"
PROFILES = builtin_profile_names()
CODES = {c.value for c in ErrorCode}


def _coded(e: SafespawnError) -> None:
    assert e.code.value in CODES and isinstance(e.message, str) and e.message


# -- strategies -------------------------------------------------------------------------------------

json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(10**15), max_value=10**15),
    st.text(max_size=40), st.sampled_from(["start", "signal", "stop", "dnsmasq", "HUP", "9", RID, "qdhcp-x"]),
)
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=10), inner, max_size=5)), max_leaves=20)
keys = st.sampled_from(["v", "id", "op", "profile", "netns", "argv", "signal", "pid", "extra", "privileged"])


@st.composite
def request_dicts(draw: st.DrawFn) -> dict[str, object]:
    """Mostly-valid requests with some fields replaced, dropped or added."""
    op = draw(st.sampled_from(OPS))
    d: dict[str, object] = {"v": 1, "id": RID, "op": op, "profile": "dnsmasq",
                            "netns": f"qdhcp-{uuid.UUID(int=draw(st.integers(0, 2**128 - 1)))}"}
    if op == "start":
        d["argv"] = draw(st.lists(st.one_of(st.text(max_size=30), st.sampled_from(["--no-hosts", "--privileged"])),
                                  max_size=6))
    if op == "signal":
        d["signal"] = draw(st.one_of(st.sampled_from(["HUP", "SIGTERM", "9", "15", "kill", "USR1"]), json_scalars))
    if op != "start" and draw(st.booleans()):
        d["pid"] = draw(st.one_of(st.integers(-5, 1 << 23), json_scalars))
    for _ in range(draw(st.integers(0, 3))):
        action = draw(st.sampled_from(["set", "drop"]))
        k = draw(keys)
        if action == "set":
            d[k] = draw(json_values)
        else:
            d.pop(k, None)
    return d


raw_bytes = st.one_of(
    st.binary(max_size=300),
    request_dicts().map(lambda d: json.dumps(d).encode()),
    json_values.map(lambda v: json.dumps(v).encode()),
    # byte-level mutations of a valid request
    st.tuples(request_dicts(), st.integers(0, 400), st.binary(min_size=1, max_size=4)).map(
        lambda t: (lambda raw: raw[:t[1]] + t[2] + raw[t[1] + 1:])(json.dumps(t[0]).encode())),
    st.sampled_from([b"[" * 100000, b'{"v":' + b"9" * 5000 + b"}", b'{"v":1e999}', b'{"v":NaN}', b"\xef\xbb\xbf{}",
                     b'{"v":1,"v":1}', b"\x00", b'"\\ud800"', b'{"id":"' + b"a" * 100000 + b'"}']),
)


# -- parse_request ----------------------------------------------------------------------------------

@FUZZ
@given(raw_bytes)
def test_parse_request_accepts_or_refuses_with_a_code(raw: bytes) -> None:
    try:
        req = parse_request(raw)
    except SafespawnError as e:
        assert isinstance(e, BadRequest)
        _coded(e)
        return
    assert isinstance(req, Request)
    assert ID_RE.fullmatch(req.id) and req.op in OPS
    assert len(req.argv) <= MAX_ARGS
    for a in req.argv:
        assert isinstance(a, str) and len(a) <= MAX_ARG_LEN
        assert not any(ord(c) < 0x20 or ord(c) == 0x7F for c in a)
    if req.op != "start":
        assert req.argv == () and (req.pid is not None or req.profile is not None)
        assert req.pid is None or (isinstance(req.pid, int) and req.pid > 1)
    if req.op == "signal":
        assert req.signal in SIGNALS
    # What was accepted round-trips through the wire format unchanged.
    assert parse_request(json.dumps(req.to_dict()).encode()) == req


@FUZZ
@given(request_dicts())
def test_a_request_is_only_accepted_under_the_id_its_file_name_carries(d: dict[str, object]) -> None:
    raw = json.dumps(d).encode()
    other = "f" * 32
    assume(d.get("id") != other)
    with pytest.raises(BadRequest):
        parse_request(raw, expected_id=other)


@pytest.mark.parametrize("raw, why", [
    (b"{", "not valid JSON"),
    (b"[1]", "must be a JSON object"),
    (b'{"v":1,"v":1}', "duplicate key"),
    (b'{"v":1.0}', "floating point"),
    (b'{"v":NaN}', "non-standard"),
    (b'{"v":' + b"1" * 40 + b"}", "out of range"),
    (b'{"a":[[[[1]]]]}', "nested too deeply"),
    (b'{"v":1,"id":"\xff"}', "UTF-8"),
    (b'{"v":1}\x00', "NUL"),
    (b'{"v":true,"id":"' + RID.encode() + b'","op":"stop","pid":5}', "protocol version"),
    (json.dumps({"v": 1, "id": RID.upper(), "op": "stop", "pid": 5}).encode(), "32 lowercase hex"),
    (json.dumps({"v": 1, "id": RID, "op": "exec", "pid": 5}).encode(), "op must be"),
    (json.dumps({"v": 1, "id": RID, "op": "stop", "pid": 5, "privileged": True}).encode(), "unknown keys"),
    (json.dumps({"v": 1, "id": RID, "op": "start", "profile": "dnsmasq", "netns": None, "argv": "--x"}).encode(),
     "list of strings"),
    (json.dumps({"v": 1, "id": RID, "op": "start", "profile": "dnsmasq", "argv": [1]}).encode(), "not a string"),
    (json.dumps({"v": 1, "id": RID, "op": "start", "profile": "dnsmasq", "argv": ["a\nb"]}).encode(), "control"),
    (json.dumps({"v": 1, "id": RID, "op": "start", "profile": "dnsmasq", "argv": ["a\x00b"]}).encode(), "control"),
    (json.dumps({"v": 1, "id": RID, "op": "start", "profile": "dnsmasq", "argv": ["-"] * 257}).encode(),
     "more than"),
    (json.dumps({"v": 1, "id": RID, "op": "start", "profile": "dnsmasq", "argv": ["x" * 4097]}).encode(), "longer"),
    (json.dumps({"v": 1, "id": RID, "op": "start", "profile": "../etc", "argv": []}).encode(), "profile name"),
    (json.dumps({"v": 1, "id": RID, "op": "start", "profile": "dnsmasq", "netns": "../../proc/1/ns/net",
                 "argv": []}).encode(), "network namespace name"),
    (json.dumps({"v": 1, "id": RID, "op": "signal", "signal": "HUP", "pid": True}).encode(), "process id"),
    (json.dumps({"v": 1, "id": RID, "op": "signal", "signal": "HUP", "pid": 1}).encode(), "process id"),
    (json.dumps({"v": 1, "id": RID, "op": "signal", "signal": "STOP", "pid": 5}).encode(), "not accepted"),
    (json.dumps({"v": 1, "id": RID, "op": "signal", "signal": "99", "pid": 5}).encode(), "unknown signal"),
    (json.dumps({"v": 1, "id": RID, "op": "signal", "pid": 5}).encode(), "needs a signal"),
])
def test_hostile_request_bytes_are_refused_with_bad_request(raw: bytes, why: str) -> None:
    with pytest.raises(BadRequest, match=why):
        parse_request(raw)


def test_huge_integers_are_refused_before_conversion() -> None:
    # int("9" * 10**6) would take seconds; the parser refuses by length first.
    with pytest.raises(BadRequest, match="out of range"):
        decode_json(b'{"pid":' + b"9" * 1_000_000 + b"}")


# -- check_argv -------------------------------------------------------------------------------------

def _profile(name: str) -> Profile:
    return load_profile(name, None)


def _value_for(rule_type: str) -> st.SearchStrategy[str]:
    return {
        "path": st.one_of(st.just(f"{DATA}/x/pid"), st.just("/etc/shadow"), st.just(f"{DATA}/../../etc/shadow"),
                          st.text(alphabet="/.abc\x00", max_size=20).map(lambda s: DATA + "/" + s)),
        "int": st.one_of(st.integers(-(10**12), 10**12).map(str), st.text(max_size=5)),
        "interface": st.one_of(st.just("tap0"), st.text(max_size=20)),
        "uuid": st.one_of(st.uuids().map(str), st.text(max_size=40)),
    }.get(rule_type, st.text(max_size=40))


@st.composite
def argvs(draw: st.DrawFn, profile: Profile) -> list[str]:
    opts = sorted(profile.rules)
    dangerous = ["--privileged", "-v", "/:/host", "--dhcp-script=/bin/sh", "--conf-dir=/etc", "--", "-",
                 "--conf-file=/etc/shadow", "--pid-file", "-f", "/etc/shadow", "--cap-add=ALL", "--entrypoint=sh"]
    out: list[str] = []
    for _ in range(draw(st.integers(0, 8))):
        kind = draw(st.sampled_from(["flag", "opt=val", "sep", "junk", "danger"]))
        if kind == "danger" or not opts:
            out.append(draw(st.sampled_from(dangerous)))
        elif kind == "junk":
            out.append(draw(st.text(max_size=30)))
        else:
            o = draw(st.sampled_from(opts))
            r = profile.rules[o]
            v = draw(_value_for(r.type))
            if kind == "flag":
                out.append(o)
            elif kind == "sep":
                out += [o, v]
            else:
                out.append(f"{o}={v}")
    return out


@pytest.mark.parametrize("name", PROFILES)
def test_check_argv_accepts_or_refuses_with_a_code(name: str) -> None:
    profile = _profile(name)

    @FUZZ
    @given(argvs(profile))
    def run(argv: list[str]) -> None:
        try:
            seen = profile.check_argv(tuple(argv), (DATA,))
        except SafespawnError as e:
            assert isinstance(e, PolicyDenied)
            _coded(e)
            return
        # Accepted: every option is on the allowlist, and every path stays inside the data dir.
        assert set(seen) <= set(profile.rules)
        for opt, values in seen.items():
            rule = profile.rules[opt]
            for v in values:
                if rule.type == "path" and v not in rule.also:
                    assert v.startswith(DATA + "/") and ".." not in v.split("/")
                assert "\x00" not in v

    run()


@pytest.mark.parametrize("name", PROFILES)
def test_runtime_options_are_never_program_options(name: str) -> None:
    profile = _profile(name)
    for argv in (["--privileged"], ["-v", "/:/host"], ["--volume=/:/host"], ["--cap-add=ALL"], ["--pid=host"],
                 ["--entrypoint=/bin/sh"], ["--security-opt=seccomp=unconfined"], ["/bin/sh"], ["--"], ["-"]):
        with pytest.raises(PolicyDenied):
            profile.check_argv(tuple(argv), (DATA,))


@pytest.mark.parametrize("argv", [
    ["--dhcp-script=/bin/sh"], ["--dhcp-luascript=/x.lua"], ["--conf-dir=/etc"], ["--conf-file=/etc/shadow"],
    ["--servers-file=/etc/shadow"], ["--conf-file=" + DATA + "/../../etc/shadow"], ["--pid-file=relative/pid"],
    ["--pid-file=" + DATA + "//x"], ["--pid-file=" + DATA], ["--pid-file=" + DATA + "x/pid"],
    ["--interface=eth0;reboot"], ["--dhcp-lease-max=-1"], ["--dhcp-lease-max=99999999999"], ["--domain=a b"],
    ["--no-hosts=1"], ["--pid-file"], ["--dhcp-range=set:x,10.0.0.0,static,255.255.255.0,1d\n--dhcp-script=/x"],
    ["--conf-file=/dev/zero"], ["--log-facility=/dev/kmsg"],
])
def test_dnsmasq_profile_refuses_options_that_run_programs_or_escape_the_data_dirs(argv: list[str]) -> None:
    with pytest.raises(PolicyDenied):
        _profile("dnsmasq").check_argv(tuple(argv), (DATA,))


def test_dnsmasq_profile_accepts_a_neutron_command_line() -> None:
    net = f"{DATA}/dhcp/{uuid.uuid4()}"
    argv = ["--no-hosts", "--no-resolv", f"--pid-file={net}/pid", f"--dhcp-hostsfile={net}/host",
            f"--addn-hosts={net}/addn_hosts", f"--dhcp-optsfile={net}/opts", f"--dhcp-leasefile={net}/leases",
            "--dhcp-match=set:ipxe,175", "--dhcp-userclass=set:ipxe6,iPXE", "--local-service", "--bind-dynamic",
            f"--dhcp-range=set:subnet-{uuid.uuid4()},10.0.0.0,static,255.255.255.0,86400s",
            "--dhcp-option-force=option:mtu,1450", "--dhcp-lease-max=256", "--conf-file=/dev/null",
            "--domain=openstacklocal", "--interface=tap1234567-89"]
    seen = _profile("dnsmasq").check_argv(tuple(argv), (DATA,))
    assert seen["--pid-file"] == [f"{net}/pid"]


@pytest.mark.parametrize("name", [n for n in PROFILES if n in ("haproxy", "keepalived", "radvd",
                                                                 "neutron-keepalived-state-change")])
def test_other_profiles_refuse_program_running_and_foreign_config_options(name: str) -> None:
    profile = _profile(name)
    hostile = {
        "haproxy": [["-f", "/etc/shadow"], ["-f", DATA + "/../../etc/haproxy.cfg"], ["-x", "/run/podman.sock"],
                    ["-L", "x;reboot"], ["-C", "/"]],
        "keepalived": [["--use-file=/etc/shadow"], ["-f", "/etc/shadow"], ["--script-user=root"],
                       ["--enable-script-security"], ["-S", "0"]],
        "radvd": [["-C", "/etc/shadow"], ["-u", "root;reboot"], ["-m", "logfile"], ["-C", DATA + "/../../etc/radvd.conf"]],
        "neutron-keepalived-state-change": [["--config-file=/etc/shadow"], ["--log-file=/etc/cron.d/x"],
                                            ["--state_path=/"]],
    }[name]
    for argv in hostile:
        with pytest.raises(SafespawnError):
            profile.check_argv(tuple(argv), (DATA,))


# -- check_path -------------------------------------------------------------------------------------

def test_check_path_refuses_a_symlinked_folder_that_points_out(tmp_path) -> None:
    data = tmp_path / "data"
    (data / "net").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (data / "evil").symlink_to(outside)
    check_path(f"{data}/net/pid", (str(data),))
    with pytest.raises(PolicyDenied, match="resolves outside"):
        check_path(f"{data}/evil/pid", (str(data),))
    # a data dir that is itself reached through a symlink is still fine: both sides are resolved
    (tmp_path / "alias").symlink_to(data)
    check_path(f"{tmp_path}/alias/net/pid", (f"{tmp_path}/alias",))


@FUZZ
@given(st.text(alphabet=string.ascii_letters + "/.\x00\n ", max_size=40))
def test_check_path_accepts_only_normalized_paths_inside_the_data_dirs(tail: str) -> None:
    value = DATA + "/" + tail
    try:
        check_path(value, (DATA,))
    except PolicyDenied:
        return
    assert os.path.normpath(value) == value and value.startswith(DATA + "/")
    assert "\x00" not in value


# -- netns checks -----------------------------------------------------------------------------------

def _policy(tmp_path, host_ns=None) -> Policy:
    cfg = parse_config({"broker": {"netns_dir": str(tmp_path)},
                        "channels": {"ch": {"image": "img", "profiles": ["dnsmasq"], "data_dirs": [DATA]}}})
    return Policy(cfg, host_ns=host_ns)


def test_netns_pattern_existence_kind_and_links_are_checked(tmp_path) -> None:
    pol = _policy(tmp_path)
    prof = pol.profiles["dnsmasq"]
    good = f"qdhcp-{uuid.uuid4()}"
    with pytest.raises(PolicyDenied, match="pattern"):
        pol.check_netns(prof, "qrouter-" + str(uuid.uuid4()))
    with pytest.raises(PolicyDenied, match="must run in a network namespace"):
        pol.check_netns(prof, None)
    with pytest.raises(BadRequest, match="does not exist"):
        pol.check_netns(prof, good)
    (tmp_path / good).write_text("not a namespace")
    with pytest.raises(PolicyDenied, match="not a namespace"):
        pol.check_netns(prof, good)
    os.unlink(tmp_path / good)
    os.symlink("/proc/self/ns/net", tmp_path / good)
    with pytest.raises(PolicyDenied, match="not a network namespace mount"):
        pol.check_netns(prof, good)
    os.unlink(tmp_path / good)
    os.mkdir(tmp_path / good)
    with pytest.raises(PolicyDenied, match="not a network namespace mount"):
        pol.check_netns(prof, good)
    os.rmdir(tmp_path / good)
    os.mkfifo(tmp_path / good)
    with pytest.raises(PolicyDenied):
        pol.check_netns(prof, good)  # never opened for reading: no hang


def test_the_ioctl_tells_a_network_namespace_from_other_namespaces() -> None:
    import fcntl

    from safespawn.broker.policy import NS_GET_NSTYPE

    fd = os.open("/proc/self/ns/net", os.O_RDONLY)
    try:
        assert fcntl.ioctl(fd, NS_GET_NSTYPE) == CLONE_NEWNET
    finally:
        os.close(fd)
    fd = os.open("/proc/self/ns/uts", os.O_RDONLY)
    try:
        assert fcntl.ioctl(fd, NS_GET_NSTYPE) != CLONE_NEWNET
    finally:
        os.close(fd)


def test_signal_and_target_policy(tmp_path) -> None:
    pol = _policy(tmp_path)
    ch = pol.config.channel("ch")
    assert pol.authorize_signal(ch, "dnsmasq", "HUP").action == "deliver"
    assert pol.authorize_signal(ch, "dnsmasq", "TERM").action == "stop"
    assert pol.authorize_signal(ch, "dnsmasq", "KILL").action == "remove"
    with pytest.raises(PolicyDenied):
        pol.authorize_signal(ch, "dnsmasq", "USR1")
    with pytest.raises(PolicyDenied):
        pol.authorize_signal(ch, "haproxy", "HUP")  # not granted to this channel
    ns = f"qdhcp-{uuid.uuid4()}"
    # a target by profile+netns is always named inside the requesting channel
    assert pol.target_name(ch, Request(RID, "stop", "dnsmasq", ns)) == f"ch-dnsmasq-{ns}"
    with pytest.raises(NotFound):
        pol.target_name(ch, Request(RID, "stop", "dnsmasq", None))
    with pytest.raises(PolicyDenied):
        pol.target_name(ch, Request(RID, "stop", "dnsmasq", "other-chan-dnsmasq-x"))


# -- profiles: the host's own config is held to the same rules ---------------------------------------

@pytest.mark.parametrize("name", PROFILES)
def test_builtin_profiles_respect_the_confinement_rules(name: str) -> None:
    p = _profile(name)
    assert not FORBIDDEN_CAPS.intersection(p.capabilities)
    if p.pid_host:
        assert not FORBIDDEN_WITH_PID_HOST.intersection(p.capabilities)
    for opt, rule in p.rules.items():
        assert opt.startswith("-")
        # no rule may accept any value at all: that would let an option read or run anything
        if rule.type == "regex":
            assert rule.pattern is not None
            for probe in ("/etc/shadow", "x;reboot", "$(reboot)", "a b", ""):
                if rule.pattern.fullmatch(probe):
                    pytest.fail(f"{name}: {opt} pattern accepts {probe!r}")


@pytest.mark.parametrize("bad, why", [
    ({"capabilities": ["SYS_ADMIN"]}, "not allowed"),
    ({"capabilities": ["CAP_SYS_PTRACE"]}, "not allowed"),
    ({"capabilities": ["KILL"], "pid_host": True}, "pid_host"),
    ({"netns": "sometimes"}, "netns must be"),
    ({"signals": ["STOP"]}, "unknown signal"),
    ({"args": {"--x": {"type": "shell"}}}, "unknown type"),
    ({"args": {"--x": {"type": "regex"}}}, "needs a pattern"),
    ({"args": {"x": {}}}, "start with"),
    ({"privileged": True}, "unknown keys"),
])
def test_profiles_that_would_weaken_confinement_are_config_errors(bad: dict[str, object], why: str) -> None:
    base: dict[str, object] = {"name": "p", "command": ["p"], "netns_pattern": "qdhcp-.*"}
    base.update(bad)
    with pytest.raises(ConfigError, match=re.escape(why)):
        parse_profile(base, "test")
