from pathlib import Path

import pytest

from safespawn.config import parse_config
from safespawn.errors import ConfigError
from safespawn.policy import Policy, builtin_profile_names, load_profile
from safespawn.request import Request
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
    policy.check_netns = lambda profile, netns: f"/run/netns/{netns}"  # type: ignore[method-assign]
    argv = ["--no-hosts", "--interface=tap1"]
    spec = policy.authorize_start(cfg.channel("neutron-dhcp"), Request("a" * 32, "start", "dnsmasq", ns, tuple(argv)))
    cmd = run_argv(spec)
    i = cmd.index("localhost/example:latest")
    assert cmd[i + 1:] == argv  # the request's arguments follow the image, and only there
    before = cmd[:i]
    assert "--privileged" not in " ".join(before)
    assert "--cap-drop=ALL" in before and "--security-opt=no-new-privileges" in before
    assert f"--network=ns:/run/netns/{ns}" in before
    # Every host-side option is one token: a value can never become an option of its own.
    assert all(a.startswith("--") for a in before[2:]) and before[:2] == ["podman", "run"]
    assert "--entrypoint=[\"dnsmasq\", \"-k\"]" in before


@pytest.mark.parametrize("cmdline,netns,argv", [
    (["start", "dnsmasq", "--netns", "qdhcp-x", "--", "--no-hosts"], "qdhcp-x", ["--no-hosts"]),
    (["start", "dnsmasq", "--", "--no-hosts", "--bind-dynamic"], None, ["--no-hosts", "--bind-dynamic"]),
    (["start", "--netns", "qdhcp-y", "dnsmasq", "--", "--netns"], "qdhcp-y", ["--netns"]),
    (["start", "dnsmasq", "--netns=qdhcp-z", "--", "-k"], "qdhcp-z", ["-k"]),
])
def test_submit_start_separates_its_options_from_the_programs(tmp_path, monkeypatch, cmdline, netns, argv):
    from safespawn import cli, client

    seen = {}

    def fake_submit(channel_dir, request, timeout):
        seen.update(request)
        return {"v": 1, "id": request["id"], "ok": True, "sidecar": "s", "pid": 2, "error": None}

    monkeypatch.setattr(client, "submit", fake_submit)
    assert cli.main(["submit", "--channel-dir", str(tmp_path), *cmdline]) == 0
    assert (seen["netns"], seen["argv"]) == (netns, argv)
