"""The agent-side status reader of safespawn's ProcessManager class (safespawn.agent.neutron_pm), without Neutron.

The status is host-written, but the class must treat it as untrusted: whatever sits at
outbox/status.json, `active` answers quickly with "not active" (StatusError inside) and never blocks.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from support.vermin import VERMIN

from safespawn.agent import neutron_pm, scripts
from safespawn.agent.neutron_pm import ChannelStatus, StatusError, netns_candidates, parse_status, profile_for
from safespawn.ops import wrappers

NOW = 1_800_000_000.0
SRC = Path(neutron_pm.__file__).parent


_DEFAULT: Any = object()


def status(sidecars: Any = _DEFAULT, **top: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"v": 1, "channel": "c", "updated": int(NOW), "refresh": 60,
                           "sidecars": [dnsmasq()] if sidecars is _DEFAULT else sidecars}
    doc.update(top)
    return doc


def dnsmasq(**kw: Any) -> dict[str, Any]:
    d: dict[str, Any] = {"name": "c-dnsmasq-qdhcp-1", "profile": "dnsmasq", "netns": "qdhcp-1", "key": "qdhcp-1",
                         "state": "running", "pid": 4242, "started": 1, "restarts": 0, "generation": "abc-1-4242"}
    d.update(kw)
    return d


@pytest.fixture
def channel(tmp_path: Path) -> Path:
    (tmp_path / "outbox").mkdir()
    return tmp_path


def publish(channel: Path, doc: Any) -> None:
    """As the host does: a new file renamed over the old one."""
    tmp = channel / "outbox" / ".tmp"
    tmp.write_bytes(doc if isinstance(doc, bytes) else json.dumps(doc).encode())
    os.replace(tmp, channel / "outbox" / "status.json")


def reader(channel: Path, now: float = NOW) -> ChannelStatus:
    return ChannelStatus(str(channel), clock=lambda: now)


def test_a_running_sidecar_is_found_with_its_host_pid(channel):
    publish(channel, status())
    s = reader(channel).find("dnsmasq", ["qdhcp-1"])
    assert s is not None and s.running and s.pid == 4242 and s.key == "qdhcp-1" and s.generation == "abc-1-4242"
    assert reader(channel).find("dnsmasq", ["qdhcp-2"]) is None
    assert reader(channel).find("haproxy", ["qdhcp-1"]) is None


@pytest.mark.parametrize("state, pid", [("exited", None), ("absent", None), ("created", None), ("running", None)])
def test_a_sidecar_that_does_not_run_is_not_running(channel, state, pid):
    publish(channel, status([dnsmasq(state=state, pid=pid)]))
    s = reader(channel).find("dnsmasq", ["qdhcp-1"])
    assert s is not None and not s.running


def test_missing_status_is_a_clear_error(channel):
    with pytest.raises(StatusError, match="no channel status"):
        reader(channel).snapshot()


def test_stale_status_is_an_error_naming_the_broker(channel):
    publish(channel, status(updated=int(NOW) - 2 * 60 - 11))
    with pytest.raises(StatusError, match="stale"):
        reader(channel).snapshot()
    publish(channel, status(updated=int(NOW) - 2 * 60 - 9))
    assert reader(channel).snapshot().sidecars


def test_staleness_follows_the_hosts_refresh_interval(channel):
    publish(channel, status(updated=int(NOW) - 20, refresh=2))
    with pytest.raises(StatusError, match="stale"):
        reader(channel).snapshot()


def test_status_dated_in_the_future_is_refused(channel):
    publish(channel, status(updated=int(NOW) + 3600))
    with pytest.raises(StatusError, match="future"):
        reader(channel).snapshot()


def test_status_behind_a_symlink_is_not_followed(channel, tmp_path_factory):
    target = tmp_path_factory.mktemp("host") / "host-file.json"
    target.write_text(json.dumps(status()))
    os.symlink(target, channel / "outbox" / "status.json")
    with pytest.raises(StatusError, match="not a plain file"):
        reader(channel).snapshot()


def test_a_fifo_at_the_status_path_never_blocks(channel):
    os.mkfifo(channel / "outbox" / "status.json")
    done: list[BaseException] = []

    def read() -> None:
        try:
            reader(channel).snapshot()
        except BaseException as e:
            done.append(e)

    t = threading.Thread(target=read, daemon=True)
    t.start()
    t.join(2)
    assert not t.is_alive(), "reading a FIFO blocked"
    assert isinstance(done[0], StatusError)


def test_a_directory_at_the_status_path_is_refused(channel):
    (channel / "outbox" / "status.json").mkdir()
    with pytest.raises(StatusError, match="not a plain file"):
        reader(channel).snapshot()


def test_a_huge_status_is_refused_without_reading_it_all(channel):
    with open(channel / "outbox" / "status.json", "wb") as f:
        f.truncate(neutron_pm.STATUS_MAX_BYTES + 1)
    with pytest.raises(StatusError, match="larger than"):
        reader(channel).snapshot()


@pytest.mark.parametrize("raw", [
    b"", b"{", json.dumps(status())[:-5].encode(), b"\xff\xfe{}", b"[1]", b"null",
    b"[" * 100_000 + b"]" * 100_000, b'{"v": 1, "updated": ' + b"9" * 10_000 + b"}",
    b'{"v": 1, "updated": 1, "updated": 2, "sidecars": []} trailing',
], ids=["empty", "open-brace", "truncated", "not-utf8", "list", "null", "deep-nesting", "huge-int", "trailing"])
def test_malformed_bytes_are_a_status_error(raw):
    with pytest.raises(StatusError, match="malformed"):
        parse_status(raw)


@pytest.mark.parametrize("doc", [
    status(v=2), status(v="1"), status(updated="now"), status(updated=True), status(updated=None),
    status(refresh=0), status(refresh=-1), status(refresh=1.5), status(refresh=True), status(sidecars={}),
    status(sidecars=None), status(sidecars=["x"]), status([dnsmasq(pid="4242")]), status([dnsmasq(pid=True)]),
    status([dnsmasq(pid=1)]), status([dnsmasq(pid=-5)]), status([dnsmasq(pid=1 << 40)]), status([dnsmasq(pid=4.0)]),
    status([dnsmasq(state=1)]), status([dnsmasq(profile=None)]), status([dnsmasq(name=[])]),
    status([dnsmasq(netns=5)]), status([dnsmasq(key={})]), status([dnsmasq(generation=7)]),
])
def test_wrong_types_are_a_status_error(doc):
    with pytest.raises(StatusError, match="malformed"):
        parse_status(json.dumps(doc).encode())


def test_a_status_without_the_new_fields_still_reads():
    """Old brokers: no refresh, key or generation (docs/channel.md keeps every field optional-compatible)."""
    old = {"v": 1, "channel": "c", "updated": int(NOW), "sidecars": [
        {"name": "n", "profile": "dnsmasq", "netns": "qdhcp-1", "state": "running", "pid": 99, "started": 1,
         "restarts": 0}]}
    snap = parse_status(json.dumps(old).encode())
    assert snap.refresh == neutron_pm.DEFAULT_REFRESH and snap.sidecars[0].running


def test_the_status_is_parsed_once_per_published_version(channel, monkeypatch):
    publish(channel, status())
    r = reader(channel)
    calls = []
    real = neutron_pm.parse_status
    monkeypatch.setattr(neutron_pm, "parse_status", lambda raw, where="": calls.append(1) or real(raw, where))
    for _ in range(100):
        assert r.find("dnsmasq", ["qdhcp-1"]).running
    assert len(calls) == 1
    time.sleep(0.01)
    publish(channel, status([dnsmasq(state="exited", pid=None)]))
    assert not r.find("dnsmasq", ["qdhcp-1"]).running
    assert len(calls) == 2


def test_a_bad_version_stays_an_error_until_the_host_replaces_it(channel):
    publish(channel, b"{not json")
    r = reader(channel)
    for _ in range(3):
        with pytest.raises(StatusError):
            r.snapshot()
    time.sleep(0.01)
    publish(channel, status())
    assert r.snapshot().sidecars


def test_profiles_of_neutrons_process_managers():
    assert profile_for("dnsmasq", None) == "dnsmasq"
    assert profile_for("neutron-keepalived-state-change-monitor", None) == "neutron-keepalived-state-change"
    # KeepalivedManager's VRRP child: only a pid file, KeepalivedManager.get_vrrp_pid_file_name's suffix.
    assert profile_for(None, "/var/lib/neutron/ha_confs/R.pid.keepalived-vrrp") == "keepalived"
    assert profile_for(None, "/var/lib/neutron/external/pids/x.pid") is None
    assert profile_for("conntrackd", None) is None


def test_the_state_change_monitor_is_looked_up_in_the_routers_namespace():
    assert netns_candidates("neutron-keepalived-state-change", "R.monitor", None) == ["qrouter-R", "snat-R"]
    assert netns_candidates("dnsmasq", "N", "qdhcp-N") == ["qdhcp-N"]
    assert netns_candidates("haproxy", "N", None) == [None]


@pytest.mark.parametrize("name", ["neutron_pm.py", "neutron_hook.py"])
def test_agent_side_files_parse_as_python_3_9(name):
    ast.parse((SRC / name).read_text(), feature_version=(3, 9))
    out = subprocess.run([*VERMIN, "-t=3.9-", "--no-tips", "--violations", str(SRC / name)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_wrappers_install_writes_the_launcher_its_hook_and_the_class(tmp_path):
    changed = wrappers.install(str(tmp_path), "neutron-dhcp", "/var/lib/safespawn/channels/neutron-dhcp",
                               python=sys.executable)
    assert {"safespawn-neutron", "safespawn_neutron.py", "safespawn-neutron.d/sitecustomize.py"} <= set(changed)
    assert (tmp_path / "safespawn_neutron.py").read_text() == (SRC / "neutron_pm.py").read_text()
    assert (tmp_path / "safespawn-neutron.d" / "sitecustomize.py").read_text() == (SRC / "neutron_hook.py").read_text()
    assert os.access(tmp_path / "safespawn-neutron", os.X_OK)
    assert wrappers.install(str(tmp_path), "neutron-dhcp", "/var/lib/safespawn/channels/neutron-dhcp",
                            python=sys.executable) == []


def test_the_launcher_runs_the_command_with_the_hook_first_and_the_channel_set(tmp_path):
    wrappers.install(str(tmp_path), "neutron-dhcp", "/srv/ch", python=sys.executable)
    env = dict(os.environ, PYTHONPATH="/elsewhere")
    out = subprocess.run([str(tmp_path / "safespawn-neutron"), "env"], capture_output=True, text=True, env=env,
                         timeout=30, check=True).stdout.splitlines()
    assert f"PYTHONPATH={tmp_path / scripts.HOOK_DIR}:/elsewhere" in out
    assert "SAFESPAWN_CHANNEL_DIR=/srv/ch" in out
    bad = subprocess.run([str(tmp_path / "safespawn-neutron"), str(tmp_path / "nope")], capture_output=True,
                         text=True, timeout=30)
    assert bad.returncode == 127 and "cannot run" in bad.stderr
    assert subprocess.run([str(tmp_path / "safespawn-neutron")], capture_output=True, timeout=30).returncode == 2


def test_the_hook_still_runs_an_images_own_sitecustomize(tmp_path):
    wrappers.install(str(tmp_path / "w"), "c", "/srv/ch", python=sys.executable)
    image = tmp_path / "image-site"
    image.mkdir()
    (image / "sitecustomize.py").write_text("import os\nos.environ['IMAGE_SITE'] = 'ran'\n")
    env = dict(os.environ, PYTHONPATH=str(image))
    code = "import os, sys; print(os.environ.get('IMAGE_SITE'), any(type(f).__name__ == '_Finder' for f in sys.meta_path))"
    out = subprocess.run([str(tmp_path / "w" / "safespawn-neutron"), sys.executable, "-c", code],
                         capture_output=True, text=True, env=env, timeout=30, check=True).stdout
    assert out.split() == ["ran", "True"]


@pytest.mark.parametrize("body, said", [("raise ValueError('image site broke')\n", "image site broke"),
                                        ("import no_such_module_of_the_image\n", "no_such_module_of_the_image")])
def test_an_images_failing_sitecustomize_fails_as_without_the_hook_and_the_hook_still_works(tmp_path, body, said):
    wrappers.install(str(tmp_path / "w"), "c", "/srv/ch", python=sys.executable)
    image = tmp_path / "image-site"
    image.mkdir()
    (image / "sitecustomize.py").write_text(body)
    env = dict(os.environ, PYTHONPATH=str(image))
    code = "import sys; print(any(type(f).__name__ == '_Finder' for f in sys.meta_path))"
    p = subprocess.run([str(tmp_path / "w" / "safespawn-neutron"), sys.executable, "-c", code],
                       capture_output=True, text=True, env=env, timeout=30, check=True)
    assert p.stdout.split() == ["True"]
    assert "Error in sitecustomize" in p.stderr and said in p.stderr, p.stderr
    bare = subprocess.run([sys.executable, "-c", "pass"], capture_output=True, text=True, env=env, timeout=30)
    assert "Error in sitecustomize" in bare.stderr and said in bare.stderr  # what Python says without the hook


def test_own_start_counts_until_the_host_publishes_after_it(channel):
    """Between the reply and the next status (same sync), the reply's word stands; then the status's."""
    publish(channel, status([], published=NOW - 1))
    r = reader(channel)
    started = neutron_pm.SidecarStatus("n", "dnsmasq", "qdhcp-1", "qdhcp-1", "running", 77, None)
    r.expect("dnsmasq", "qdhcp-1", started, since=NOW - 0.5)
    assert r.find("dnsmasq", ["qdhcp-1"]) == started
    time.sleep(0.01)
    publish(channel, status([dnsmasq(state="exited", pid=None)], published=NOW))
    assert not r.find("dnsmasq", ["qdhcp-1"]).running, "a status published after the request wins"


def test_own_stop_counts_until_the_host_publishes_after_it(channel):
    publish(channel, status(published=NOW - 1))
    r = reader(channel)
    r.expect("dnsmasq", "qdhcp-1", None, since=NOW - 0.5)
    assert r.find("dnsmasq", ["qdhcp-1"]) is None
    time.sleep(0.01)
    publish(channel, status(published=NOW))
    assert r.find("dnsmasq", ["qdhcp-1"]).running


def test_a_status_from_before_the_reply_does_not_undo_it(channel):
    """A sync that published without having seen our request (it ran between write and handling)."""
    publish(channel, status(published=NOW + 0.2))  # still lists the sidecar we just stopped
    r = reader(channel, now=NOW + 0.3)
    r.expect("dnsmasq", "qdhcp-1", None, since=NOW + 0.5)  # the reply arrived after that publish
    assert r.find("dnsmasq", ["qdhcp-1"]) is None
    time.sleep(0.01)
    publish(channel, status([], published=NOW + 0.6))
    assert r.find("dnsmasq", ["qdhcp-1"]) is None
