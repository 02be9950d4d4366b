"""The Ansible role (ansible/ansible_collections/safespawn/host/roles/safespawn), run for real.

ansible-core from PyPI (scripts/ansible-venv, cached under /var/tmp) plays the role against this machine
(`connection: local`) with every path redirected into a temp dir and the systemd scope switched to a
real `systemd --user` manager of the test's own (docs/testbed.md). The package comes from a wheel built from
this repo. Then:

- a request from a generated wrapper, run under `ip netns exec` in a real netns, is served by systemd
  alone (path unit -> oneshot sync) and its dnsmasq sidecar hands out a real DHCP lease;
- a second run reports changed=0, and so does check mode on the deployed host;
- a config or profile change runs only the reconcile handler; a bad config or profile never lands;
- check mode on a fresh host changes nothing on disk;
- `safespawn_state: absent` leaves no units, config or channel folders, and leaves running sidecars
  alone unless `safespawn_stop_sidecars`;
- the README's DHCP + L3 example deploys, drops a channel, and goes;
- ansible-lint's production profile passes on the collection.

The tests that take the `host` fixture share one deployment and run in file order.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from support import netlab
from support.netlab import NetnsPair, dhcp_lease

REPO = Path(__file__).resolve().parents[2]
COLLECTIONS = REPO / "ansible"
ROLE = COLLECTIONS / "ansible_collections" / "safespawn" / "host" / "roles" / "safespawn"
UNIT_NAMES = ("safespawn-sync@.path", "safespawn-sync@.service", "safespawn-reconcile.timer",
              "safespawn-reconcile.service")


# --------------------------------------------------------------------------------------------------
# fixtures: ansible, the package wheel, a systemd user manager


@pytest.fixture(scope="module")
def ansible_bin() -> Path:
    """ansible-core + ansible-lint in a venv cached between runs (scripts/ansible-venv)."""
    out = subprocess.run(["bash", str(REPO / "scripts" / "ansible-venv")], capture_output=True, text=True,
                         timeout=600, check=False)
    assert out.returncode == 0, out.stderr
    return Path(out.stdout.strip()) / "bin"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("wheel")
    subprocess.run([str(REPO / ".venv" / "bin" / "pip"), "wheel", "-q", "--no-deps", "-w", str(d), str(REPO)],
                   check=True, capture_output=True, timeout=300)
    (w,) = d.glob("safespawn-*.whl")
    return w


@dataclass
class UserManager:
    """A real `systemd --user` (scripts/user-systemd) with its own runtime, config and home dirs."""

    root: Path

    @property
    def runtime_dir(self) -> Path:
        # Unique name: scripts/user-systemd names the manager's cgroups after it.
        return self.root / f"xdg-{self.root.name}"

    @property
    def env(self) -> dict[str, str]:
        return dict(os.environ, XDG_RUNTIME_DIR=str(self.runtime_dir), XDG_CONFIG_HOME=str(self.root / "config"),
                    HOME=str(self.root / "home"))

    @property
    def unit_dir(self) -> Path:
        return self.root / "config" / "systemd" / "user"

    @property
    def log(self) -> Path:
        return self.root / "units.log"

    def systemctl(self, *args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["systemctl", "--user", *args], capture_output=True, text=True, timeout=120,
                              env=self.env, check=check)

    def script(self, op: str) -> None:
        p = subprocess.run(["bash", str(REPO / "scripts" / "user-systemd"), op], capture_output=True, text=True,
                           timeout=60, env=self.env, check=False)
        assert p.returncode == 0, p.stderr

    def start(self) -> None:
        for d in ("config", "home"):
            (self.root / d).mkdir(mode=0o700, parents=True, exist_ok=True)
        # There is no journald here: send what every service prints to a file the tests can show.
        dropin = self.unit_dir / "service.d"
        dropin.mkdir(parents=True)
        (dropin / "test-log.conf").write_text(f"[Service]\nStandardOutput=append:{self.log}\n"
                                              f"StandardError=append:{self.log}\n")
        self.script("start")

    def stop(self) -> None:
        self.script("stop")


@pytest.fixture(scope="module")
def manager() -> Iterator[UserManager]:
    # A short path: the manager's socket lives under it (sun_path is 108 bytes).
    root = Path(tempfile.mkdtemp(prefix="ssa-", dir="/tmp"))
    m = UserManager(root)
    m.start()
    try:
        yield m
    finally:
        m.stop()
        shutil.rmtree(root, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# running the role


@dataclass
class Host:
    """One simulated host: every path the role writes lives under `root`."""

    root: Path
    channel: str
    manager: UserManager
    ansible_bin: Path
    wheel: Path
    image: str

    @property
    def config_dir(self) -> Path:
        return self.root / "etc" / "safespawn"

    @property
    def channels_dir(self) -> Path:
        return self.root / "var" / "lib" / "safespawn" / "channels"

    @property
    def wrappers_dir(self) -> Path:
        return self.root / "var" / "lib" / "safespawn" / "wrappers" / self.channel

    @property
    def data_dir(self) -> Path:
        return self.root / "var" / "lib" / "neutron"

    @property
    def venv(self) -> Path:
        return self.root / "opt" / "safespawn"

    def role_vars(self, **extra: Any) -> dict[str, Any]:
        r = str(self.root)
        v: dict[str, Any] = {
            "ansible_python_interpreter": "{{ ansible_playbook_python }}",
            "safespawn_package": str(self.wheel),
            "safespawn_venv": str(self.venv),
            # The Debian interpreter, not a pyenv shim: the units run the venv's python directly.
            "safespawn_python": "/usr/bin/python3",
            "safespawn_pip_extra_args": "--no-index",
            "safespawn_config_dir": f"{r}/etc/safespawn",
            "safespawn_channels_dir": str(self.channels_dir),
            "safespawn_state_dir": f"{r}/var/lib/safespawn/state",
            "safespawn_wrappers_dir": f"{r}/var/lib/safespawn/wrappers",
            "safespawn_systemd_scope": "user",
            "safespawn_channels": [{
                "name": self.channel,
                "image": self.image,
                "profiles": ["dnsmasq"],
                "data_dirs": [str(self.data_dir)],
                "max_sidecars": 8,
            }],
        }
        v.update(extra)
        return v

    def play(self, *args: str, **extra: Any) -> subprocess.CompletedProcess[str]:
        """Play the role once with these variables; returns the finished ansible-playbook."""
        self.root.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix="play-", dir=self.manager.root))
        (work / "vars.json").write_text(json.dumps(self.role_vars(**extra)))
        (work / "site.yml").write_text(
            "- name: Deploy safespawn\n"
            "  hosts: localhost\n"
            "  connection: local\n"
            "  gather_facts: false\n"
            "  roles:\n"
            "    - role: safespawn.host.safespawn\n"
            "  post_tasks:\n"
            "    - name: Show the agent mounts\n"
            "      ansible.builtin.debug:\n"
            "        var: safespawn_agent_mounts\n"
            "      when: safespawn_state | default('present') == 'present'\n")
        env = dict(self.manager.env, ANSIBLE_COLLECTIONS_PATH=str(COLLECTIONS), ANSIBLE_NOCOLOR="1",
                   ANSIBLE_FORCE_COLOR="0", ANSIBLE_RETRY_FILES_ENABLED="0", ANSIBLE_LOCAL_TEMP=str(work / "tmp"),
                   ANSIBLE_REMOTE_TEMP=str(work / "tmp"), ANSIBLE_HOME=str(work / "ansible-home"),
                   ANSIBLE_CONFIG=str(work / "none.cfg"),
                   PATH=f"{self.ansible_bin}:{os.environ.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}")
        p = subprocess.run([str(self.ansible_bin / "ansible-playbook"), "-i", "localhost,", "-e", "@vars.json",
                            *args, "site.yml"], cwd=work, capture_output=True, text=True, env=env, timeout=600,
                           check=False)
        (work / "output.txt").write_text(p.stdout + p.stderr)
        if p.returncode != 0:  # what the units printed, for the failure message
            log = self.manager.log.read_text(errors="replace").splitlines() if self.manager.log.exists() else []
            p.stderr += "\n--- what the units printed (tail) ---\n" + "\n".join(log[-40:])
        return p


def recap(p: subprocess.CompletedProcess[str]) -> dict[str, int]:
    m = re.search(r"^localhost\s*:\s*(.*)$", p.stdout, re.M)
    assert m, p.stdout[-3000:] + p.stderr[-3000:]
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", m.group(1))}


def ok(p: subprocess.CompletedProcess[str]) -> dict[str, int]:
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-5000:]
    r = recap(p)
    assert r["failed"] == 0 and r["unreachable"] == 0, p.stdout[-6000:]
    return r


def changed_tasks(p: subprocess.CompletedProcess[str]) -> list[str]:
    """The names of the tasks (and handlers) that reported a change."""
    names, current = [], None
    for line in p.stdout.splitlines():
        m = re.match(r"^(?:TASK|RUNNING HANDLER) \[(?:[^\]:]*: )?(.*?)\] \**$", line)
        if m:
            current = m.group(1)
        elif line.startswith("changed:") and current and current not in names:
            names.append(current)
    return names


def snapshot(*roots: Path) -> dict[str, tuple[int, int, float]]:
    """(mode, size, mtime) of every path under roots: what "nothing changed on disk" compares."""
    out = {}
    for root in roots:
        if not root.exists():
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            for name in [*dirnames, *filenames]:
                p = os.path.join(dirpath, name)
                st = os.lstat(p)
                out[p] = (st.st_mode, st.st_size, st.st_mtime)
        st = os.lstat(root)
        out[str(root)] = (st.st_mode, st.st_size, st.st_mtime)
    return out


def containers(channel: str) -> list[dict[str, Any]]:
    return netlab.podman_ps(f"safespawn.channel={channel}")


@pytest.fixture(scope="module")
def host(manager: UserManager, ansible_bin: Path, wheel: Path, test_image: str) -> Iterator[Host]:
    h = Host(manager.root / "host", f"ssa{uuid.uuid4().hex[:8]}", manager, ansible_bin, wheel, test_image)
    try:
        yield h
    finally:
        remove_containers(h.channel)


# --------------------------------------------------------------------------------------------------
# the tests, in the order a host lives through them


def test_role_passes_ansible_lint_production_profile(ansible_bin: Path, tmp_path: Path) -> None:
    env = dict(os.environ, PATH=f"{ansible_bin}:{os.environ['PATH']}", ANSIBLE_HOME=str(tmp_path / "ah"),
               ANSIBLE_COLLECTIONS_PATH=str(COLLECTIONS), NO_COLOR="1", ANSIBLE_LINT_NODEPS="0")
    # The whole collection: the role, galaxy.yml, meta/runtime.yml, the changelog.
    p = subprocess.run([str(ansible_bin / "ansible-lint"), "--offline", "--profile", "production"],
                       cwd=ROLE.parent.parent, capture_output=True, text=True, env=env, timeout=600, check=False)
    shutil.rmtree(ROLE.parent.parent / ".ansible", ignore_errors=True)
    assert p.returncode == 0, p.stdout[-6000:] + p.stderr[-3000:]
    assert "Passed" in p.stderr + p.stdout, p.stdout + p.stderr


def test_check_mode_on_a_fresh_host_changes_nothing_on_disk(manager: UserManager, ansible_bin: Path, wheel: Path,
                                                           test_image: str) -> None:
    fresh = Host(manager.root / "fresh", f"ssa{uuid.uuid4().hex[:8]}", manager, ansible_bin, wheel, test_image)
    fresh.root.mkdir()
    before = snapshot(fresh.root, manager.unit_dir)
    p = fresh.play("--check", "--diff")
    r = ok(p)
    assert r["changed"] > 0, "check mode must show what it would do"
    assert "safespawn.toml" in p.stdout and "+[channels." in p.stdout, "the diff shows the config to be written"
    assert snapshot(fresh.root, manager.unit_dir) == before
    assert not containers(fresh.channel)


def test_the_readme_example_for_a_dhcp_and_l3_host_deploys_and_goes(manager: UserManager, ansible_bin: Path,
                                                                   wheel: Path, test_image: str) -> None:
    """The role README's example playbook, with its paths redirected and its channels renamed."""
    readme = (ROLE / "README.md").read_text()
    block = readme.split("## Example: a Neutron DHCP + L3 host", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    plays = json.loads(subprocess.run([str(ansible_bin / "python"), "-c",
                                       "import json, sys, yaml; print(json.dumps(yaml.safe_load(sys.stdin)))"],
                                      input=block, capture_output=True, text=True, check=True, timeout=60).stdout)
    example = plays[0]["roles"][0]["vars"]
    token = uuid.uuid4().hex[:6]
    channels = [dict(c, name=f"{c['name']}-{token}") for c in example["safespawn_channels"]]
    assert [c["name"].rsplit("-", 1)[0] for c in channels] == ["neutron-dhcp", "neutron-l3"]
    h = Host(manager.root / "example", channels[0]["name"], manager, ansible_bin, wheel, test_image)
    try:
        ok(h.play(safespawn_channels=channels, neutron_sidecar_image=test_image))
        config = (h.config_dir / "safespawn.toml").read_text()
        for c in channels:
            assert f"[channels.{c['name']}]" in config
            assert os.access(h.root / "var/lib/safespawn/wrappers" / c["name"] / "keepalived", os.X_OK)
            mounts = json.loads((h.config_dir / "agent-mounts" / f"{c['name']}.json").read_text())
            assert mounts["neutron"] == {"AGENT": {"kill_scripts_path": "/usr/local/sbin"}}
            assert f"{h.channels_dir}/{c['name']}/outbox:{h.channels_dir}/{c['name']}/outbox:ro,nodev,nosuid,noexec" \
                in mounts["volumes"]
            assert (h.channels_dir / c["name"] / "inbox").stat().st_uid == 42435
        paths = [f"safespawn-sync@{c['name']}.path" for c in channels]
        assert manager.systemctl("is-active", *paths).stdout.split() == ["active", "active"]
        # The L3 channel dropped from the play: no longer watched, its mount file gone.
        p = h.play(safespawn_channels=channels[:1], neutron_sidecar_image=test_image)
        ok(p)
        assert "Stop watching the channels no longer configured" in changed_tasks(p)
        assert manager.systemctl("is-active", *paths).stdout.split() == ["active", "inactive"]
        assert manager.systemctl("is-enabled", paths[1]).stdout.strip() == "disabled"
        assert not (h.config_dir / "agent-mounts" / f"{channels[1]['name']}.json").exists()
        ok(h.play(safespawn_state="absent", safespawn_stop_sidecars=True,
                  safespawn_channels=[{"name": c["name"]} for c in channels]))
        assert leftovers(h) == set(), leftovers(h)
    finally:
        for c in channels:
            remove_containers(c["name"])


def test_deployed_host_serves_a_wrapper_request_through_systemd_alone(host: Host) -> None:
    r = ok(host.play())
    assert r["changed"] > 0
    # What `safespawn install --scope user` enabled, the manager now runs: the channel's path unit.
    for unit in UNIT_NAMES:
        assert (host.manager.unit_dir / unit).is_file(), unit
    active = host.manager.systemctl("is-active", f"safespawn-sync@{host.channel}.path",
                                    "safespawn-reconcile.timer")
    assert active.stdout.split() == ["active", "active"], active.stdout + active.stderr
    # The agent side: a wrapper folder, and the mounts the agent container needs, as a file and as a fact.
    wrapper = host.wrappers_dir / "dnsmasq"
    assert os.access(wrapper, os.X_OK)
    mounts = json.loads((host.config_dir / "agent-mounts" / f"{host.channel}.json").read_text())
    chan = host.channels_dir / host.channel
    by_target = {m["target"]: m for m in mounts["mounts"]}
    assert by_target[f"{chan}/inbox"]["options"] == ["rw", "nodev", "nosuid", "noexec"]
    assert by_target[f"{chan}/outbox"]["options"][0] == "ro"
    assert by_target[mounts["wrappers_dir"]]["source"] == str(host.wrappers_dir)
    assert str(host.data_dir) in by_target
    assert f"--volume={chan}/inbox:{chan}/inbox:rw,nodev,nosuid,noexec" in mounts["podman_args"]
    assert '"safespawn_agent_mounts"' in host_last_output(host)

    # As Neutron runs it: `ip netns exec qdhcp-... dnsmasq ARGS` with the wrapper first on PATH. Nothing
    # but the systemd manager serves the channel.
    host.data_dir.mkdir(parents=True, exist_ok=True)
    host.data_dir.chmod(0o755)
    with NetnsPair(server_ns=f"qdhcp-{uuid.uuid4()}") as pair:
        argv = dnsmasq_argv(host.data_dir, pair)
        env = dict(os.environ, PATH=f"{host.wrappers_dir}:/usr/sbin:/usr/bin:/sbin:/bin", SAFESPAWN_TIMEOUT="30")
        t0 = time.monotonic()
        p = subprocess.run(["ip", "netns", "exec", pair.server_ns, "dnsmasq", *argv], capture_output=True,
                           text=True, env=env, timeout=60, check=False)
        took = time.monotonic() - t0
        assert p.returncode == 0, (p.stdout, p.stderr, host.manager.systemctl("status", "--no-pager",
                                   f"safespawn-sync@{host.channel}.service").stdout)
        (c,) = containers(host.channel)
        assert c["State"] == "running"
        lease = dhcp_lease(pair.client_ns, pair.client_if, timeout=10)
        assert lease["ip"] == pair.host(50)
        print(f"wrapper request served by systemd in {took:.2f}s")
        remove_containers(host.channel)


def test_second_run_reports_no_change(host: Host) -> None:
    p = host.play()
    assert ok(p)["changed"] == 0, changed_tasks(p)


def test_check_mode_on_a_deployed_host_reports_no_change(host: Host) -> None:
    before = snapshot(host.root, host.manager.unit_dir)
    p = host.play("--check", "--diff")
    assert ok(p)["changed"] == 0, changed_tasks(p)
    assert snapshot(host.root, host.manager.unit_dir) == before


def test_a_config_change_reconciles_without_reinstalling(host: Host) -> None:
    channel = host.role_vars()["safespawn_channels"][0]
    changed = [dict(channel, max_sidecars=9, rollout_batch=3, rollout_pause=7, budget_memory="512m", budget_cpus=0.5,
                    budget_tasks=300)]
    # A custom profile too: the built-in dnsmasq one, as an operator would start an override.
    dnsmasq = (REPO / "src" / "safespawn" / "broker" / "profiles" / "dnsmasq.toml").read_text()
    prom = Path(tempfile.mkdtemp(prefix="sst-textfile-")) / "safespawn.prom"  # outside the snapshot
    p = host.play("--diff", safespawn_channels=changed, safespawn_custom_profiles={"dnsmasq": dnsmasq},
                  safespawn_metrics_file=str(prom))
    ok(p)
    assert "+max_sidecars = 9" in p.stdout
    for line in (f'+metrics_file = "{prom}"', "+rollout_batch = 3", "+rollout_pause = 7", '+budget_memory = "512m"',
                 "+budget_cpus = 0.5", "+budget_tasks = 300"):
        assert line in p.stdout, line
    names = changed_tasks(p)
    assert names == ["Write the custom profiles", "Write the host configuration, checked by safespawn before it is put in place",
                     "Reconcile safespawn channels"], names
    assert "max_sidecars = 9" in (host.config_dir / "safespawn.toml").read_text()
    assert (host.config_dir / "profiles" / "dnsmasq.toml").read_text().endswith(dnsmasq)
    # And back: the profile this role wrote goes, so the rest of the module sees the deployment it expects.
    p = host.play()
    ok(p)
    assert changed_tasks(p) == ["Remove the custom profiles no longer configured",
                                "Write the host configuration, checked by safespawn before it is put in place",
                                "Reconcile safespawn channels"], changed_tasks(p)
    assert not (host.config_dir / "profiles" / "dnsmasq.toml").exists()
    shutil.rmtree(prom.parent, ignore_errors=True)


def test_an_invalid_config_is_refused_before_it_is_put_in_place(host: Host) -> None:
    before = (host.config_dir / "safespawn.toml").read_text()
    channel = host.role_vars()["safespawn_channels"][0]
    p = host.play(safespawn_channels=[dict(channel, profiles=["no-such-profile"])])
    assert p.returncode != 0
    assert "failed validating" in p.stdout or "no profile named" in p.stdout, p.stdout[-3000:]
    assert (host.config_dir / "safespawn.toml").read_text() == before
    # A data dir that collides with a mount the sidecar gets anyway (the profiles' tmpfs on /tmp):
    # named by check-config in the validation, instead of every start failing later.
    p = host.play(safespawn_channels=[dict(channel, data_dirs=["/tmp"])])
    assert p.returncode != 0
    assert "collides with the tmpfs" in p.stdout, p.stdout[-3000:]
    assert (host.config_dir / "safespawn.toml").read_text() == before
    # Two channels on one sidecar uid (rendered from the channels' sidecar_uid), and a sidecar uid range
    # reaching the accounts' uids (rendered from safespawn_sidecar_uids): refused the same way.
    twin = dict(channel, name=channel["name"] + "-twin", sidecar_uid=250001, sidecar_gid=250001)
    p = host.play(safespawn_channels=[dict(channel, sidecar_uid=250001, sidecar_gid=250001), twin])
    assert p.returncode != 0
    assert "sidecar uid 250001 (configured) is also channel" in p.stdout, p.stdout[-3000:]
    p = host.play(safespawn_sidecar_uids=[1000, 10])
    assert p.returncode != 0
    assert "broker.sidecar_uids: FIRST must be at least 65536" in p.stdout, p.stdout[-3000:]
    assert (host.config_dir / "safespawn.toml").read_text() == before
    # A custom profile safespawn's parser refuses never reaches the profiles dir either.
    builtin = (REPO / "src" / "safespawn" / "broker" / "profiles" / "dnsmasq.toml").read_text()
    assert 'name = "dnsmasq"' in builtin
    for text, why in (('name = "dnsmasq"\ncommand = []\n', "profile dnsmasq: netns_pattern is required"),
                      (builtin.replace('name = "dnsmasq"', 'name = "other"'), "its name must be 'dnsmasq'")):
        p = host.play(safespawn_custom_profiles={"dnsmasq": text})
        assert p.returncode != 0
        assert why in p.stdout, p.stdout[-3000:]
        assert not (host.config_dir / "profiles" / "dnsmasq.toml").exists()


def test_absent_removes_units_config_and_channel_folders_but_leaves_sidecars(host: Host) -> None:
    with NetnsPair(server_ns=f"qdhcp-{uuid.uuid4()}") as pair:
        sidecar = start_dnsmasq_through_the_wrapper(host, pair)

        r = ok(host.play(safespawn_state="absent"))
        assert r["changed"] > 0
        for unit in UNIT_NAMES:
            assert not (host.manager.unit_dir / unit).exists(), unit
        # Nothing loaded from a file, nothing running. (The sync service that started the sidecar may stay
        # listed as "not-found inactive dead" while the sidecar's conmon lives on in its cgroup.)
        assert not loaded_units(host.manager), loaded_units(host.manager)
        assert not host.config_dir.exists()
        assert not host.channels_dir.exists()
        assert not host.wrappers_dir.exists()
        assert not host.venv.exists()
        assert [(c["Names"], c["State"]) for c in containers(host.channel)] == [(sidecar["Names"], "running")], \
            "a plain absent leaves the sidecars running"
        # Their state stays, so that a re-install resumes them; nothing else of safespawn's does.
        assert leftovers(host) == {"var/lib/safespawn", "var/lib/safespawn/state"} | state_files(host), \
            leftovers(host)

        # Again: nothing left to do.
        p = host.play(safespawn_state="absent")
        assert ok(p)["changed"] == 0, changed_tasks(p)

        # With safespawn_stop_sidecars the channel's sidecars go too, even without the venv (podman removes
        # them by label). A container started just now stands in for the sidecar: on the shared test bed,
        # other `systemd --user` managers can move a long-lived sidecar out of its cgroups, after which
        # podman can no longer stop it (see sidecar_diagnosis).
        remove_containers(host.channel)
        subprocess.run(["podman", "run", "-d", "--rm", "--network", "none", "--label", f"safespawn.channel={host.channel}",
                        "--name", f"{host.channel}-leftover", host.image, "sleep", "600"], check=True,
                       capture_output=True, timeout=60)
        p = host.play(safespawn_state="absent", safespawn_stop_sidecars=True)
        ok(p)
        assert "Remove the channels' sidecars" in changed_tasks(p)
        assert not containers(host.channel), sidecar_diagnosis(host)
        assert leftovers(host) == set(), leftovers(host)


def test_absent_with_stop_sidecars_stops_them_through_safespawn(host: Host) -> None:
    ok(host.play())
    with NetnsPair(server_ns=f"qdhcp-{uuid.uuid4()}") as pair:
        start_dnsmasq_through_the_wrapper(host, pair)
        p = host.play(safespawn_state="absent", safespawn_stop_sidecars=True)
        ok(p)
        assert "Remove the systemd units" in changed_tasks(p)
        assert not containers(host.channel), sidecar_diagnosis(host)
        assert not loaded_units(host.manager), loaded_units(host.manager)
        for unit in UNIT_NAMES:
            assert not (host.manager.unit_dir / unit).exists(), unit
        assert leftovers(host) == set(), leftovers(host)


# --------------------------------------------------------------------------------------------------
# helpers


def start_dnsmasq_through_the_wrapper(host: Host, pair: NetnsPair) -> dict[str, Any]:
    """`ip netns exec NS dnsmasq ARGS` with the channel's wrapper first on PATH; returns the sidecar."""
    host.data_dir.mkdir(parents=True, exist_ok=True)
    host.data_dir.chmod(0o755)
    env = dict(os.environ, PATH=f"{host.wrappers_dir}:/usr/sbin:/usr/bin:/sbin:/bin", SAFESPAWN_TIMEOUT="30")
    p = subprocess.run(["ip", "netns", "exec", pair.server_ns, "dnsmasq", *dnsmasq_argv(host.data_dir, pair)],
                       capture_output=True, text=True, env=env, timeout=60, check=False)
    assert p.returncode == 0, p.stderr
    (c,) = [c for c in containers(host.channel) if pair.server_ns in c["Names"][0]]
    assert c["State"] == "running"
    return c


def state_files(host: Host) -> set[str]:
    state = host.root / "var" / "lib" / "safespawn" / "state"
    return {str(p.relative_to(host.root)) for p in state.rglob("*")} if state.exists() else set()


def leftovers(host: Host) -> set[str]:
    """What is left under the host's root, but the data dir and the empty parents the test itself implies."""
    implied = {"etc", "opt", "var", "var/lib"}
    out = set()
    for p in host.root.rglob("*"):
        rel = str(p.relative_to(host.root))
        if p == host.data_dir or host.data_dir in p.parents:
            continue
        if rel in implied and p.is_dir():
            continue
        out.add(rel)
    return out


def sidecar_diagnosis(host: Host) -> str:
    """Why a sidecar may have survived `podman rm`: its processes' cgroups (see the module's notes)."""
    lines = []
    for c in containers(host.channel):
        lines.append(f"{c['Names']} {c['State']} pid {c.get('Pid')}")
        try:
            lines.append(Path(f"/proc/{c.get('Pid')}/cgroup").read_text())
        except OSError:
            pass
    return "\n".join(lines)


def remove_containers(channel: str) -> None:
    """Remove a channel's containers; kill their processes first, in case podman lost track of them."""
    for c in containers(channel):
        pid = c.get("Pid") or 0
        if pid > 1:
            try:
                os.kill(pid, 9)
            except OSError:
                pass
    netlab.podman_rm_by_label(f"safespawn.channel={channel}")


def loaded_units(manager: UserManager) -> list[str]:
    """safespawn units the manager has loaded from a file, or that are active, or failed."""
    out = manager.systemctl("list-units", "--all", "--plain", "--no-legend", "--no-pager", "safespawn*").stdout
    rows = [line.split() for line in out.splitlines() if line.strip()]
    return [" ".join(r[:4]) for r in rows if len(r) >= 4 and (r[1], r[2]) != ("not-found", "inactive")]


def host_last_output(host: Host) -> str:
    plays = sorted(host.manager.root.glob("play-*/output.txt"), key=lambda p: p.stat().st_mtime)
    return plays[-1].read_text() if plays else ""


def dnsmasq_argv(data: Path, pair: NetnsPair) -> list[str]:
    """A command line shaped like the one Neutron's Dnsmasq driver builds; the client's MAC gets .50."""
    net = data / pair.server_ns
    net.mkdir(parents=True, exist_ok=True)
    net.chmod(0o755)
    for f in ("host", "addn_hosts", "opts", "leases"):
        (net / f).touch()
    (net / "host").write_text(f"{netlab.get_mac(pair.client_ns, pair.client_if)},host-50,{pair.host(50)}\n")
    subnet = uuid.uuid4()
    return [
        "--no-hosts", "--no-resolv", f"--pid-file={net}/pid", f"--dhcp-hostsfile={net}/host",
        f"--addn-hosts={net}/addn_hosts", f"--dhcp-optsfile={net}/opts", f"--dhcp-leasefile={net}/leases",
        "--local-service", "--bind-dynamic",
        f"--dhcp-range=set:subnet-{subnet},{pair.network.network_address},static,{pair.network.netmask},86400s",
        "--dhcp-lease-max=256", "--conf-file=/dev/null", "--domain=openstacklocal", f"--interface={pair.server_if}",
        "--no-ping",
    ]
