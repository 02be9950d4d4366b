from pathlib import Path

import pytest

from safespawn.broker.policy import Policy, builtin_profile_names, load_profile
from safespawn.broker.request import Request
from safespawn.config import DEFAULT_SIDECAR_UIDS, allocated_uid, host_id_conflicts, parse_config
from safespawn.errors import ConfigError
from safespawn.runtime.podman import run_argv

CFG = {
    "broker": {"channels_dir": "/var/lib/safespawn/channels", "state_dir": "/var/lib/safespawn/state"},
    "channels": {"neutron-dhcp": {"image": "localhost/example:latest", "profiles": ["dnsmasq"],
                                  "data_dirs": ["/var/lib/neutron"]}},
}


def test_the_documented_example_config_parses():
    cfg = parse_config(CFG)
    ch = cfg.channel("neutron-dhcp")
    assert ch.image == "localhost/example:latest" and ch.data_dirs == ("/var/lib/neutron",)
    assert cfg.broker.state_dir == Path("/var/lib/safespawn/state")


@pytest.mark.parametrize("patch,why", [
    ({"channels": {"Bad Name": {"image": "x", "profiles": ["dnsmasq"]}}}, "channel names"),
    ({"channels": {"c": {"profiles": ["dnsmasq"]}}}, "image"),
    ({"channels": {"c": {"image": "x", "profiles": []}}}, "profiles"),
    ({"channels": {"c": {"image": "x", "profiles": ["dnsmasq"], "data_dirs": ["/"]}}}, "other than /"),
    ({"channels": {"c": {"image": "x", "profiles": ["dnsmasq"], "data_dirs": ["/a/../etc"]}}}, "normalized"),
    ({"channels": {"c": {"image": "x", "profiles": ["dnsmasq"], "max_sidecars": 0}}}, "at least 1"),
    ({"channels": {"c": {"image": "x", "profiles": ["dnsmasq"], "surprise": 1}}}, "unknown keys"),
    ({"broker": {"state_dir": "relative"}}, "absolute"),
    ({"brokr": {}}, "unknown top-level"),
])
def test_invalid_configs_are_refused_with_the_key_named(patch, why):
    with pytest.raises(ConfigError, match=why):
        parse_config(patch)


def test_every_builtin_profile_loads():
    names = builtin_profile_names()
    assert "dnsmasq" in names
    for n in names:
        assert load_profile(n, None).name == n


def test_nothing_from_the_request_goes_before_the_image_except_checked_fused_values(tmp_path):
    cfg = parse_config(CFG)
    ns = "qdhcp-11111111-2222-3333-4444-555555555555"
    policy = Policy(cfg, host_ns=[])
    policy.check_netns = lambda profile, netns, resolve=True: f"/run/netns/{netns}"  # type: ignore[method-assign]
    argv = ["--no-hosts", "--interface=tap1"]
    spec = policy.authorize_start(cfg.channel("neutron-dhcp"), Request("a" * 32, "start", "dnsmasq", ns, tuple(argv)))
    # The broker's own command line carries the host's pid file (PodmanRuntime.pid_dir) too.
    cmd = run_argv(spec, pidfile=f"/var/lib/safespawn/state/neutron-dhcp/pids/{spec.name}.pid")
    assert f"--pidfile=/var/lib/safespawn/state/neutron-dhcp/pids/{spec.name}.pid" in cmd
    i = cmd.index("localhost/example:latest")
    assert cmd[i + 1:] == argv  # the request's arguments follow the image, and only there
    before = cmd[:i]
    assert "--privileged" not in " ".join(before)
    assert "--cap-drop=ALL" in before and "--security-opt=no-new-privileges" in before
    assert f"--network=ns:/run/netns/{ns}" in before
    # Every host-side option is one token: a value can never become an option of its own.
    assert all(a.startswith("--") for a in before[2:]) and before[:2] == ["podman", "run"]
    assert "--entrypoint=[\"dnsmasq\", \"-k\"]" in before
    # The container log is a size-capped file whatever the host's default driver (journald ignores it).
    assert "--log-driver=k8s-file" in before and "--log-opt=max-size=1mb" in before
    # The profile's tmpfs are the sidecar uid's to write (podman 5 makes /run root's, 755, otherwise).
    assert [a for a in before if a.startswith("--tmpfs=")] == [
        f"--tmpfs={d}:rw,nosuid,nodev,noexec,size=16m,mode=1777" for d in spec.tmpfs] and spec.tmpfs


@pytest.mark.parametrize("cmdline,netns,argv", [
    (["start", "dnsmasq", "--netns", "qdhcp-x", "--", "--no-hosts"], "qdhcp-x", ["--no-hosts"]),
    (["start", "dnsmasq", "--", "--no-hosts", "--bind-dynamic"], None, ["--no-hosts", "--bind-dynamic"]),
    (["start", "--netns", "qdhcp-y", "dnsmasq", "--", "--netns"], "qdhcp-y", ["--netns"]),
    (["start", "dnsmasq", "--netns=qdhcp-z", "--", "-k"], "qdhcp-z", ["-k"]),
])
def test_submit_start_separates_its_options_from_the_programs(tmp_path, monkeypatch, cmdline, netns, argv):
    from safespawn import cli
    from safespawn.agent import client

    seen = {}

    def fake_submit(channel_dir, request, timeout):
        seen.update(request)
        return {"v": 1, "id": request["id"], "ok": True, "sidecar": "s", "pid": 2, "error": None}

    monkeypatch.setattr(client, "submit", fake_submit)
    assert cli.main(["submit", "--channel-dir", str(tmp_path), *cmdline]) == 0
    assert (seen["netns"], seen["argv"]) == (netns, argv)


# -- sidecar uids and the host pid namespace -----------------------------------------------------

def _spec(channel_extra, profile="dnsmasq"):
    cfg = parse_config({**CFG, "channels": {"neutron-dhcp": {**CFG["channels"]["neutron-dhcp"],
                                                             "profiles": [profile], **channel_extra}}})
    policy = Policy(cfg, host_ns=[])
    policy.check_netns = lambda profile, netns, resolve=True: f"/run/netns/{netns}"  # type: ignore[method-assign]
    ns = "qdhcp-11111111-2222-3333-4444-555555555555"
    return policy.authorize_start(cfg.channel("neutron-dhcp"), Request("a" * 32, "start", profile, ns, ("--no-hosts",)))


def test_sidecars_run_as_the_channels_own_allocated_uid_by_default_and_as_sidecar_uid_when_set():
    uid = allocated_uid("neutron-dhcp")
    first, count = DEFAULT_SIDECAR_UIDS
    assert first <= uid < first + count and first >= 65536 and first + count <= 2**31, "never 0, never signed"
    assert _spec({}).user == f"{uid}:{uid}", "a root agent (agent_uid 0) does not make its sidecars root"
    assert _spec({"agent_uid": 42435, "agent_gid": 42436}).user == f"{uid}:{uid}", "nor the agent's uid"
    spec = _spec({"agent_uid": 42435, "agent_gid": 42435, "sidecar_uid": 200001, "sidecar_gid": 200002})
    assert spec.user == "200001:200002"
    cmd = run_argv(spec)
    assert "--user=200001:200002" in cmd[:cmd.index("localhost/example:latest")]
    assert "--pid=host" not in cmd
    # An existing explicit sidecar_uid without sidecar_gid keeps its meaning (and its spec): the agent's gid.
    assert _spec({"agent_gid": 42436, "sidecar_uid": 200001}).user == "200001:42436"
    assert _spec({"sidecar_uid": 0, "sidecar_gid": 0}).user == "0:0", "root only when asked for"


def test_the_allocated_uid_depends_on_the_channel_name_and_the_range_only():
    a = parse_config({**CFG, "channels": {"a": {"image": "x", "profiles": ["dnsmasq"]}}}).channel("a")
    ab = parse_config({**CFG, "channels": {"a": {"image": "x", "profiles": ["dnsmasq"]},
                                           "b": {"image": "x", "profiles": ["dnsmasq"]}}})
    assert a.sidecar_user == ab.channel("a").sidecar_user != ab.channel("b").sidecar_user
    moved = parse_config({**CFG, "broker": {"sidecar_uids": [300000, 1000]},
                          "channels": {"a": {"image": "x", "profiles": ["dnsmasq"]}}}).channel("a")
    assert 300000 <= moved.sidecar_user[0] < 301000 and moved.sidecar_user[0] == moved.sidecar_user[1]


@pytest.mark.parametrize("channels,match", [
    ({"a": {"sidecar_uid": 200001}, "b": {"sidecar_uid": 200001}}, "is also channel a's"),
    ({"a": {}, "b": {"sidecar_uid": allocated_uid("a")}}, "is also channel a's"),
    ({"a": {"agent_uid": 42435}, "b": {"sidecar_uid": 42435}}, "is channel a's agent_uid"),
])
def test_two_channels_never_share_a_sidecar_uid(channels, match):
    with pytest.raises(ConfigError, match=match):
        parse_config({**CFG, "channels": {n: {"image": "x", "profiles": ["dnsmasq"], **t} for n, t in channels.items()}})


def test_two_channels_whose_names_land_on_one_uid_are_a_config_error_not_a_shared_uid():
    with pytest.raises(ConfigError, match="set sidecar_uid for one of them"):
        parse_config({**CFG, "broker": {"sidecar_uids": [300000, 1]},
                      "channels": {"a": {"image": "x", "profiles": ["dnsmasq"]},
                                   "b": {"image": "x", "profiles": ["dnsmasq"]}}})
    cfg = parse_config({**CFG, "broker": {"sidecar_uids": [300000, 1]},
                        "channels": {"a": {"image": "x", "profiles": ["dnsmasq"]},
                                     "b": {"image": "x", "profiles": ["dnsmasq"], "sidecar_uid": 300001}}})
    assert (cfg.channel("a").sidecar_user[0], cfg.channel("b").sidecar_user[0]) == (300000, 300001)


@pytest.mark.parametrize("value", [[0, 100], [1000, 10], [65536, 0], [4294967290, 10], [1, 2, 3], "70000"])
def test_a_sidecar_uid_range_reaching_ordinary_accounts_or_past_the_last_uid_is_a_config_error(value):
    with pytest.raises(ConfigError, match="sidecar_uids"):
        parse_config({**CFG, "broker": {"sidecar_uids": value}})


def test_check_config_finds_a_sidecar_uid_that_the_host_already_gives_out(tmp_path):
    etc = tmp_path / "etc"
    etc.mkdir()
    cfg = parse_config({**CFG, "channels": {"a": {"image": "x", "profiles": ["dnsmasq"]},
                                            "b": {"image": "x", "profiles": ["dnsmasq"], "sidecar_uid": 1000,
                                                  "sidecar_gid": 1000},
                                            "c": {"image": "x", "profiles": ["dnsmasq"], "sidecar_uid": 165000,
                                                  "sidecar_gid": 165000},
                                            "d": {"image": "x", "profiles": ["dnsmasq"], "sidecar_uid": 0}}})
    a = allocated_uid("a")
    (etc / "passwd").write_text(f"root:x:0:0::/root:/bin/sh\nalice:x:1000:1000::/home/alice:/bin/sh\n"
                                f"svc:x:{a}:{a}::/:/bin/false\n")
    (etc / "group").write_text("root:x:0:\nalice:x:1000:\n")
    (etc / "subuid").write_text("alice:100000:65536\n")
    (etc / "subgid").write_text("alice:100000:65536\n")
    found = {c.name: why for c, why in host_id_conflicts(cfg, str(etc))}
    assert found["a"] == f"uid {a} is an account in {etc}/passwd"
    assert found["b"] == f"uid 1000 is an account in {etc}/passwd; gid 1000 is a group in {etc}/group"
    assert found["c"] == (f"uid 165000 is in alice's range 100000-165535 in {etc}/subuid; "
                          f"gid 165000 is in alice's range 100000-165535 in {etc}/subgid")
    assert "d" not in found, "uid 0 has its own warning"


def test_a_non_root_sidecar_never_gets_setuid_or_setgid():
    root = _spec({"sidecar_uid": 0, "sidecar_gid": 0})
    assert {"SETUID", "SETGID"} <= set(root.capabilities), "dnsmasq as root drops to its own user"
    assert not {"SETUID", "SETGID"} & set(_spec({}).capabilities), "the default (allocated) uid is unprivileged"
    unpriv = _spec({"sidecar_uid": 200001, "sidecar_gid": 200001})
    assert set(unpriv.capabilities) == set(root.capabilities) - {"SETUID", "SETGID"}


@pytest.mark.parametrize("key,value", [("sidecar_uid", -1), ("sidecar_gid", 2**32), ("sidecar_uid", "0"),
                                       ("sidecar_uid", True)])
def test_a_bad_sidecar_uid_is_a_config_error(key, value):
    with pytest.raises(ConfigError, match=key):
        parse_config({**CFG, "channels": {"c": {"image": "x", "profiles": ["dnsmasq"], key: value}}})


def test_check_config_warns_about_root_sidecars_and_pid_host(tmp_path, capsys):
    from safespawn.cli import main

    profiles = tmp_path / "profiles"
    profiles.mkdir()
    text = load_profile_text("dnsmasq").replace("pid_host = false", "pid_host = true")
    (profiles / "dnsmasq.toml").write_text(text)
    cfg = tmp_path / "safespawn.toml"
    cfg.write_text(f'[broker]\nprofiles_dir = "{profiles}"\n'
                   '[channels.a]\nimage = "x"\nprofiles = ["dnsmasq"]\n'
                   '[channels.b]\nimage = "x"\nprofiles = ["haproxy"]\nagent_uid = 42435\nagent_gid = 42435\n')
    assert main(["--config", str(cfg), "check-config"]) == 0
    err = capsys.readouterr().err
    assert "channel a: profile dnsmasq sets pid_host = true" in err
    assert "channel a: sidecar_uid = 0" not in err, "a root agent alone does not make root sidecars"
    assert "channel b" not in err


def test_check_config_warns_about_an_explicit_root_sidecar_uid_and_a_root_run_as_agent_profile(tmp_path, capsys):
    from safespawn.cli import main

    cfg = tmp_path / "safespawn.toml"
    cfg.write_text('[channels.a]\nimage = "x"\nprofiles = ["dnsmasq"]\nsidecar_uid = 0\nsidecar_gid = 0\n'
                   '[channels.b]\nimage = "x"\nprofiles = ["keepalived", "neutron-keepalived-state-change"]\n'
                   '[channels.c]\nimage = "x"\nprofiles = ["neutron-keepalived-state-change"]\n'
                   'agent_uid = 42435\nagent_gid = 42435\n')
    assert main(["--config", str(cfg), "check-config"]) == 0
    out, err = capsys.readouterr()
    assert "channel a: sidecar_uid = 0: sidecars run as host uid 0" in err
    assert "channel b: profile neutron-keepalived-state-change runs as the agent's uid" in err
    assert "channel b: sidecar_uid" not in err and "channel c" not in err
    assert f"channel b: image x, profiles keepalived, neutron-keepalived-state-change, data dirs -, sidecar uid:gid " \
           f"{allocated_uid('b')}:{allocated_uid('b')} (allocated)" in out


def test_an_unprivileged_sidecar_gets_its_writable_files_and_loses_the_user_to_switch_to():
    ns = "qrouter-11111111-2222-3333-4444-555555555555"
    cfg = parse_config({**CFG, "channels": {"l3": {"image": "x", "profiles": ["radvd", "neutron-keepalived-state-change"],
                                                   "data_dirs": ["/var/lib/neutron"]},
                                            "r": {"image": "x", "profiles": ["radvd"], "sidecar_uid": 0,
                                                  "data_dirs": ["/var/lib/neutron"]}}})
    policy = Policy(cfg, host_ns=[])
    policy.check_netns = lambda profile, netns, resolve=True: f"/run/netns/{netns}"  # type: ignore[method-assign]
    argv = ("-C", "/var/lib/neutron/ra/r.radvd.conf", "-p", "/var/lib/neutron/external/pids/r.pid.radvd",
            "-m", "syslog", "-u", "root")
    unpriv = policy.authorize_start(cfg.channel("l3"), Request("a" * 32, "start", "radvd", ns, argv))
    assert "-u" not in unpriv.args and "root" not in unpriv.args and "/var/lib/neutron/ra/r.radvd.conf" in unpriv.args
    root = policy.authorize_start(cfg.channel("r"), Request("a" * 32, "start", "radvd", ns, argv))
    assert root.args[-2:] == ("-u", "root"), "a root sidecar can switch users: the argument stays"
    mon = policy.authorize_start(cfg.channel("l3"), Request("a" * 32, "start", "neutron-keepalived-state-change", ns, (
        "--router_id", "11111111-2222-3333-4444-555555555555", "--namespace", ns,
        "--conf_dir", "/var/lib/neutron/ha_confs/r", "--pid_file", "/var/lib/neutron/ha_confs/r.monitor.pid",
        "--state_path", "/var/lib/neutron")))
    assert mon.user == "0:0" and mon.capabilities == (), "run_as = agent: the (root) agent's uid, no capability"
    uid = allocated_uid("l3")
    cfg2 = parse_config({**CFG, "channels": {"l3": {"image": "x", "profiles": ["haproxy"], "agent_gid": 42436}}})
    p2 = Policy(cfg2, host_ns=[])
    p2.check_netns = lambda profile, netns, resolve=True: f"/run/netns/{netns}"  # type: ignore[method-assign]
    hap = p2.authorize_start(cfg2.channel("l3"), Request("a" * 32, "start", "haproxy", ns, ()))
    assert hap.user == f"{uid}:42436", "haproxy: the channel's own uid, the agent's gid (its metadata socket)"
    dhcp = _spec({"data_dirs": ["/var/lib/neutron"]})
    assert dhcp.writable_files == ()
    ns4 = "qdhcp-11111111-2222-3333-4444-555555555555"
    cfg4 = parse_config({**CFG, "channels": {"d": {"image": "x", "profiles": ["dnsmasq"], "data_dirs": ["/var/lib/neutron"]},
                                             "z": {"image": "x", "profiles": ["dnsmasq"], "data_dirs": ["/var/lib/neutron"],
                                                   "sidecar_uid": 0}}})
    p4 = Policy(cfg4, host_ns=[])
    p4.check_netns = lambda profile, netns, resolve=True: f"/run/netns/{netns}"  # type: ignore[method-assign]
    dargv = ("--dhcp-leasefile=/var/lib/neutron/dhcp/n/leases", "--pid-file=/var/lib/neutron/dhcp/n/pid",
             "--log-facility=/var/lib/neutron/dhcp/n/log")
    d = p4.authorize_start(cfg4.channel("d"), Request("a" * 32, "start", "dnsmasq", ns4, dargv))
    assert d.writable_files == ("/var/lib/neutron/dhcp/n/leases", "/var/lib/neutron/dhcp/n/log")
    assert p4.authorize_start(cfg4.channel("z"), Request("a" * 32, "start", "dnsmasq", ns4, dargv)).writable_files == ()


def test_check_config_warns_about_channels_that_share_a_data_dir(tmp_path, capsys):
    from safespawn.cli import main

    cfg = tmp_path / "safespawn.toml"
    cfg.write_text('[channels.a]\nimage = "x"\nprofiles = ["dnsmasq"]\ndata_dirs = ["/var/lib/neutron"]\n'
                   'agent_uid = 42435\nagent_gid = 42435\n'
                   '[channels.b]\nimage = "x"\nprofiles = ["haproxy"]\ndata_dirs = ["/var/lib/neutron/ha"]\n'
                   'agent_uid = 42435\nagent_gid = 42435\n'
                   '[channels.c]\nimage = "x"\nprofiles = ["haproxy"]\ndata_dirs = ["/var/lib/neutron-c"]\n'
                   'agent_uid = 42435\nagent_gid = 42435\n')
    assert main(["--config", str(cfg), "check-config"]) == 0
    err = capsys.readouterr().err
    assert "channels a and b share data dir /var/lib/neutron / /var/lib/neutron/ha" in err
    assert "channels a and c" not in err and "channels b and c" not in err  # a name prefix is not a dir prefix


def load_profile_text(name):
    from importlib import resources

    return resources.files("safespawn.broker.profiles").joinpath(f"{name}.toml").read_text()


def test_remove_retries_once_when_podman_loses_the_race_with_a_restart(tmp_path):
    from safespawn.errors import RuntimeFailed
    from safespawn.runtime.podman import PodmanRuntime

    calls = tmp_path / "calls"
    fake = tmp_path / "podman"
    fake.write_text(f"""#!/bin/sh
echo "$@" >> {calls}
n=$(wc -l < {calls})
if [ "$n" -eq 1 ] || [ "$1" = "fail" ]; then
  echo "Error: cannot remove container X as it could not be stopped: container state improper: stopped" >&2
  exit 2
fi
exit 0
""")
    fake.chmod(0o755)
    PodmanRuntime(str(fake)).remove("c1")
    assert calls.read_text().count("rm --force --ignore --time=0 -- c1") == 2
    # Any other failure is not retried.
    fake.write_text("#!/bin/sh\necho \"Error: boom\" >&2\nexit 125\n")
    with pytest.raises(RuntimeFailed, match="boom"):
        PodmanRuntime(str(fake)).remove("c1")


def test_the_spec_hash_is_the_digest_it_always_was():
    """Running sidecars carry the hash as a label: a changed digest would roll every one of them."""
    import hashlib
    import json
    from dataclasses import asdict

    cfg = parse_config(CFG)
    policy = Policy(cfg, host_ns=[])
    policy.check_netns = lambda profile, netns, resolve=True: f"/run/netns/{netns}"  # type: ignore[method-assign]
    ns = "qdhcp-11111111-2222-3333-4444-555555555555"
    spec = policy.authorize_start(cfg.channel("neutron-dhcp"), Request(
        "a" * 32, "start", "dnsmasq", ns, ("--no-hosts", "--pid-file=/var/lib/neutron/dhcp/x/pid")))
    assert spec.pid_files  # nested tuples, as asdict() saw them
    old = hashlib.sha256(json.dumps(asdict(spec), sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:32]
    assert spec.spec_hash == old
