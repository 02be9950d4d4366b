"""Per-sidecar limits (profiles) and per-channel budgets (safespawn.broker.budget): the pure parts.

The cgroup writers run against a directory laid out like /sys/fs/cgroup, and the slice path against
a recording stand-in for systemctl; tests/integration/test_limits.py runs them for real.
"""

from __future__ import annotations

import dataclasses
import os
import stat
import tomllib
from pathlib import Path

import pytest

from safespawn.broker import budget
from safespawn.broker.budget import CgroupHost, ChannelBudget
from safespawn.broker.policy import Policy, builtin_profile_names, load_profile, parse_profile
from safespawn.broker.request import Request
from safespawn.config import parse_config
from safespawn.errors import ConfigError, RuntimeFailed
from safespawn.runtime.docker import run_argv as docker_argv
from safespawn.runtime.podman import run_argv

NS = "qdhcp-11111111-2222-3333-4444-555555555555"


def cfg(**channel: object) -> dict[str, object]:
    return {"channels": {"neutron-dhcp": {"image": "localhost/example:latest", "profiles": ["dnsmasq"],
                                          "data_dirs": ["/var/lib/neutron"], **channel}}}


def spec_of(config: dict[str, object]):  # type: ignore[no-untyped-def]
    c = parse_config(config)
    policy = Policy(c, host_ns=[])
    policy.check_netns = lambda profile, netns, resolve=True: f"/run/netns/{netns}"  # type: ignore[method-assign]
    return policy.authorize_start(c.channel("neutron-dhcp"), Request("a" * 32, "start", "dnsmasq", NS, ("--no-hosts",)))


# -- per-sidecar limits -------------------------------------------------------------------------

def test_every_builtin_profile_bounds_memory_cpu_and_processes_and_prefers_itself_for_the_oom_killer():
    for name in builtin_profile_names():
        p = load_profile(name, None)
        assert 8 << 20 <= p.memory <= 256 << 20, name
        assert 0 < p.cpus <= 1, name
        assert 8 <= p.pids_limit <= 256, name
        assert p.oom_score_adj >= 500, name


def test_the_run_line_carries_the_profiles_limits_with_swap_no_way_around_memory():
    spec = spec_of(cfg())
    cmd = run_argv(spec, cgroup_parent="/safespawn/neutron-dhcp")
    before = cmd[:cmd.index("localhost/example:latest")]
    assert "--memory=67108864" in before and "--memory-swap=67108864" in before
    assert "--cpus=0.5" in before and "--pids-limit=64" in before and "--oom-score-adj=500" in before
    assert "--cgroup-parent=/safespawn/neutron-dhcp" in before
    d = docker_argv(spec, cgroup_parent="safespawn-neutron_dhcp.slice")
    before = d[:d.index("localhost/example:latest")]
    assert {"--memory=67108864", "--memory-swap=67108864", "--cpus=0.5", "--pids-limit=64", "--oom-score-adj=500",
            "--cgroup-parent=safespawn-neutron_dhcp.slice"} <= set(before)


def test_a_changed_limit_changes_the_spec_hash_so_the_sidecar_is_replaced():
    spec = spec_of(cfg())
    assert dataclasses.replace(spec, memory=spec.memory * 2).spec_hash != spec.spec_hash
    assert dataclasses.replace(spec, cpus=1.0).spec_hash != spec.spec_hash
    assert dataclasses.replace(spec, pids_limit=32).spec_hash != spec.spec_hash
    assert dataclasses.replace(spec, oom_score_adj=900).spec_hash != spec.spec_hash


def _profile(**limits: object) -> dict[str, object]:
    d = tomllib.loads((Path(__file__).parents[2] / "src/safespawn/broker/profiles/radvd.toml").read_text())
    d.update(limits)
    return d


@pytest.mark.parametrize("limits,why", [
    ({"memory": "lots"}, "memory"), ({"memory": "1m"}, "from 8m"), ({"memory": "65g"}, "from 8m"),
    ({"memory": True}, "memory"), ({"cpus": 0}, "cpus"), ({"cpus": "1"}, "cpus"), ({"cpus": 65}, "cpus"),
    ({"pids_limit": 2}, "pids_limit"), ({"pids_limit": 1.5}, "pids_limit"),
    ({"oom_score_adj": -1000}, "never below"), ({"oom_score_adj": 1001}, "oom_score_adj"),
])
def test_bad_profile_limits_are_a_config_error_naming_the_key(limits, why):
    with pytest.raises(ConfigError, match=why):
        parse_profile(_profile(**limits), "profile radvd")


def test_a_profile_without_limits_gets_bounded_defaults():
    d = _profile()
    for k in ("memory", "cpus", "pids_limit", "oom_score_adj"):
        d.pop(k)
    p = parse_profile(d, "profile radvd")
    assert (p.memory, p.cpus, p.pids_limit, p.oom_score_adj) == (128 << 20, 0.5, 128, 500)


# -- channel budgets: configuration -------------------------------------------------------------

def test_a_channel_without_budget_keys_is_bounded_by_default():
    ch = parse_config(cfg()).channel("neutron-dhcp")
    assert ch.budget.memory == budget.host_memory() // 4
    assert ch.budget.cpus == max(1.0, budget.host_cpus() / 2)
    assert ch.budget.tasks == 4096


def test_budget_keys_take_sizes_shares_and_counts():
    ch = parse_config(cfg(budget_memory="512m", budget_cpus=0.5, budget_tasks=300)).channel("neutron-dhcp")
    assert ch.budget == ChannelBudget(512 << 20, 0.5, 300)
    ch = parse_config(cfg(budget_memory="10%", budget_cpus="50%")).channel("neutron-dhcp")
    assert ch.budget.memory == budget.host_memory() // 10
    assert ch.budget.cpus == round(budget.host_cpus() / 2, 2)


@pytest.mark.parametrize("keys,why", [
    ({"budget_memory": "1m"}, "budget_memory"), ({"budget_memory": "lots"}, "budget_memory"),
    ({"budget_memory": "1000000g"}, "host's memory"), ({"budget_memory": "0%"}, "budget_memory"),
    ({"budget_cpus": 0}, "budget_cpus"), ({"budget_cpus": 10_000}, "budget_cpus"), ({"budget_cpus": "x"}, "budget_cpus"),
    ({"budget_tasks": 2}, "budget_tasks"), ({"budget_tasks": "many"}, "budget_tasks"),
])
def test_bad_budget_keys_are_a_config_error_naming_the_key(keys, why):
    with pytest.raises(ConfigError, match=why):
        parse_config(cfg(**keys))


def test_a_budget_below_one_sidecars_memory_limit_is_refused():
    with pytest.raises(ConfigError, match="budget_memory"):
        Policy(parse_config(cfg(budget_memory="40m", profiles=["dnsmasq", "haproxy"])), host_ns=[])


# -- channel budgets: cgroups -------------------------------------------------------------------

def fake_v1(root: Path) -> None:
    for c in ("memory", "cpu", "pids", "cpuacct"):
        (root / c).mkdir(parents=True)


@pytest.fixture
# mkdir in the fake cgroup v1 tree makes the controller's files, as the kernel would.
def v1(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> CgroupHost:
    fake_v1(tmp_path)
    real_mkdir = os.mkdir

    def mkdir(path: os.PathLike[str] | str, mode: int = 0o777) -> None:
        real_mkdir(path, mode)
        p = Path(path)
        files = {"memory": ["memory.limit_in_bytes", "memory.memsw.limit_in_bytes"],
                 "cpu": ["cpu.cfs_period_us", "cpu.cfs_quota_us"], "pids": ["pids.max"]}
        for c, names in files.items():
            if str(p).startswith(str(tmp_path / c)):
                for n in names:
                    (p / n).write_text("max\n" if n == "pids.max" else "-1\n")

    monkeypatch.setattr(budget.os, "mkdir", mkdir)
    return CgroupHost("cgroupfs", 1, tmp_path)


def test_cgroupfs_v1_makes_the_channels_parent_in_each_controller_with_the_budget(v1):
    parent = budget.ensure(v1, "neutron-dhcp", ChannelBudget(256 << 20, 0.5, 300))
    assert parent == "/safespawn/neutron-dhcp"
    d = v1.root
    assert (d / "memory/safespawn/neutron-dhcp/memory.limit_in_bytes").read_text() == str(256 << 20)
    assert (d / "memory/safespawn/neutron-dhcp/memory.memsw.limit_in_bytes").read_text() == str(256 << 20)
    assert (d / "cpu/safespawn/neutron-dhcp/cpu.cfs_quota_us").read_text() == "50000"
    assert (d / "cpu/safespawn/neutron-dhcp/cpu.cfs_period_us").read_text() == "100000"
    assert (d / "pids/safespawn/neutron-dhcp/pids.max").read_text() == "300"
    # A changed budget is written over the old one, at the next start.
    budget.ensure(v1, "neutron-dhcp", ChannelBudget(128 << 20, 1.0, 200))
    assert (d / "pids/safespawn/neutron-dhcp/pids.max").read_text() == "200"
    assert (d / "cpu/safespawn/neutron-dhcp/cpu.cfs_quota_us").read_text() == "100000"
    # Removed bottom-up once empty (the fake has plain files: rmdir finds it not empty).
    assert budget.remove(v1, "neutron-dhcp") is False


def test_a_budget_that_cannot_be_written_fails_the_start_rather_than_run_unbounded(v1):
    budget.ensure(v1, "c1", ChannelBudget(256 << 20, 0.5, 300))
    f = v1.root / "pids/safespawn/c1/pids.max"
    f.unlink()
    f.mkdir()  # not writable as a file
    with pytest.raises(RuntimeFailed, match="pids.max"):
        budget.ensure(v1, "c1", ChannelBudget(256 << 20, 0.5, 301))


def test_cgroupfs_v2_makes_one_unified_cgroup_with_swap_excluded_and_controllers_enabled(tmp_path):
    (tmp_path / "cgroup.subtree_control").write_text("")
    host = CgroupHost("cgroupfs", 2, tmp_path)
    assert budget.ensure(host, "l3", ChannelBudget(1 << 30, 1.5, 1000)) == "/safespawn/l3"
    d = tmp_path / "safespawn" / "l3"
    assert (d / "memory.max").read_text() == str(1 << 30)
    assert (d / "memory.swap.max").read_text() == "0"
    assert (d / "cpu.max").read_text() == "150000 100000"
    assert (d / "pids.max").read_text() == "1000"
    for p in (tmp_path, tmp_path / "safespawn", d):
        assert (p / "cgroup.subtree_control").read_text() == "+cpu +memory +pids"


def test_slice_names_escape_systemds_hierarchy_dash_one_to_one():
    assert budget.slice_name("neutron-dhcp") == "safespawn-neutron_dhcp.slice"
    assert budget.slice_name("neutron") == "safespawn-neutron.slice"
    # Channel "a"'s slice must not contain channel "a-b"'s: no name is a prefix-level of another.
    names = {budget.slice_name(c) for c in ("a", "a-b", "a-b-c", "ab")}
    assert len(names) == 4
    for n in names:
        assert n.count("-") == 1  # one level below safespawn.slice, whatever the channel name


def _fake_systemctl(tmp_path: Path) -> Path:
    log = tmp_path / "calls"
    exe = tmp_path / "systemctl"
    exe.write_text(f"#!/bin/sh\necho \"$@\" >> {log}\n")
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    return exe


def test_systemd_hosts_get_a_slice_set_and_started_and_no_call_when_it_already_matches(tmp_path):
    exe = _fake_systemctl(tmp_path)
    host = CgroupHost("systemd", 2, tmp_path)
    b = ChannelBudget(512 << 20, 0.5, 300)
    assert budget.ensure(host, "neutron-dhcp", b, systemctl=str(exe)) == "safespawn-neutron_dhcp.slice"
    calls = (tmp_path / "calls").read_text().splitlines()
    assert calls == [f"set-property --runtime safespawn-neutron_dhcp.slice MemoryMax={512 << 20} MemorySwapMax=0 "
                     "CPUQuota=50% TasksMax=300", "start safespawn-neutron_dhcp.slice"]
    # What systemd then shows in the slice's cgroup: no further call.
    d = tmp_path / "safespawn.slice" / "safespawn-neutron_dhcp.slice"
    d.mkdir(parents=True)
    for name, value in (("memory.max", str(512 << 20)), ("memory.swap.max", "0"), ("cpu.max", "50000 100000"),
                        ("pids.max", "300")):
        (d / name).write_text(value + "\n")
    budget.ensure(host, "neutron-dhcp", b, systemctl=str(exe))
    assert len((tmp_path / "calls").read_text().splitlines()) == 2
    budget.ensure(host, "neutron-dhcp", dataclasses.replace(b, tasks=400), systemctl=str(exe))
    assert "TasksMax=400" in (tmp_path / "calls").read_text().splitlines()[-2]


def test_use_reads_what_the_channel_uses_against_its_budget(tmp_path):
    d = tmp_path / "safespawn.slice" / "safespawn-c.slice"
    d.mkdir(parents=True)
    for name, value in (("memory.current", "1048576"), ("memory.max", "2097152"), ("pids.current", "7"),
                        ("pids.max", "max"), ("cpu.max", "50000 100000"),
                        ("cpu.stat", "usage_usec 2500000\nthrottled_usec 500000")):
        (d / name).write_text(value + "\n")
    u = budget.use(CgroupHost("systemd", 2, tmp_path), "c")
    assert u is not None
    assert u.as_dict() == {"memory_bytes": 1048576, "memory_max_bytes": 2097152, "tasks": 7, "tasks_max": None,
                           "cpu_seconds": 2.5, "cpus_max": 0.5, "cpu_throttled_seconds": 0.5}
    assert budget.use(CgroupHost("systemd", 2, tmp_path), "other") is None


@pytest.mark.parametrize("text,bytes_", [("64m", 64 << 20), ("2g", 2 << 30), ("512k", 512 << 10), ("1GiB", 1 << 30),
                                         (1234, 1234), ("100", 100)])
def test_sizes(text, bytes_):
    assert budget.parse_size(text) == bytes_


def test_the_metrics_show_each_channels_use_against_its_budget():
    from safespawn.broker.metrics import ChannelMetrics, render

    use = budget.BudgetUse(memory=3 << 20, memory_max=64 << 20, tasks=5, tasks_max=4096, cpu_seconds=1.5,
                           cpus_max=1.0, throttled_seconds=0.25)
    text = render([("a", ChannelMetrics()), ("b", ChannelMetrics())], {"a": use, "b": None})
    assert f'safespawn_budget_memory_bytes{{channel="a"}} {3 << 20}' in text
    assert f'safespawn_budget_memory_limit_bytes{{channel="a"}} {64 << 20}' in text
    assert 'safespawn_budget_tasks{channel="a"} 5' in text and 'safespawn_budget_tasks_limit{channel="a"} 4096' in text
    assert 'safespawn_budget_cpu_seconds_total{channel="a"} 1.5' in text
    assert 'safespawn_budget_cpu_limit{channel="a"} 1.0' in text
    assert 'channel="b"' not in "".join(line for line in text.splitlines() if line.startswith("safespawn_budget"))


def test_locate_finds_the_channels_cgroup_by_looking(tmp_path):
    assert budget.locate("c", tmp_path) is None
    (tmp_path / "memory" / "safespawn" / "c").mkdir(parents=True)
    assert budget.locate("c", tmp_path) == CgroupHost("cgroupfs", 1, tmp_path)
    (tmp_path / "safespawn.slice" / "safespawn-c.slice").mkdir(parents=True)
    assert budget.locate("c", tmp_path) == CgroupHost("systemd", 2, tmp_path)


def test_systemd_on_cgroup_v1_sets_memorylimit_and_reads_the_v1_hierarchies(tmp_path):
    exe = _fake_systemctl(tmp_path)
    host = CgroupHost("systemd", 1, tmp_path)
    b = ChannelBudget(256 << 20, 1.0, 100)
    budget.ensure(host, "c", b, systemctl=str(exe))
    assert (tmp_path / "calls").read_text().splitlines()[0] == (
        f"set-property --runtime safespawn-c.slice MemoryLimit={256 << 20} CPUQuota=100% TasksMax=100")
    for c, f, v in (("memory", "memory.limit_in_bytes", str(256 << 20)), ("pids", "pids.max", "100"),
                    ("cpu", "cpu.cfs_quota_us", "100000")):
        d = tmp_path / c / "safespawn.slice" / "safespawn-c.slice"
        d.mkdir(parents=True)
        (d / f).write_text(v + "\n")
    budget.ensure(host, "c", b, systemctl=str(exe))
    assert len((tmp_path / "calls").read_text().splitlines()) == 2  # matched: no further call
    assert budget.locate("c", tmp_path) == host


def test_podmans_cgroup_manager_is_asked_once_and_remembered_until_podman_or_its_config_changes(tmp_path):
    calls = []

    def detect():
        calls.append(1)
        return CgroupHost("systemd", 2)

    fake = tmp_path / "podman"
    fake.write_text("#!/bin/sh\n")
    assert budget.cached_detect(str(fake), str(tmp_path / "state"), detect) == CgroupHost("systemd", 2)
    assert budget.cached_detect(str(fake), str(tmp_path / "state"), detect) == CgroupHost("systemd", 2)
    assert len(calls) == 1
    assert oct((tmp_path / "state" / "cgroup-host.json").stat().st_mode & 0o777) == "0o600"
    fake.write_text("#!/bin/sh\n# upgraded\n")
    budget.cached_detect(str(fake), str(tmp_path / "state"), detect)
    assert len(calls) == 2
