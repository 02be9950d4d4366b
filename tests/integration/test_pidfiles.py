"""Pid files are written by the host broker, with host pids, and planted paths cannot redirect it.

The agent owns its data dir, so at the pid-file path (or above it) it can plant a symlink to a host
file, a FIFO, a directory, a hard link to a host file, or a symlinked parent directory, before the
start or while the sidecar runs (the broker rewrites pid files on every start, respawn and sync).
Each time: no host file outside the data dir is written or truncated (content and mtime checked),
and the broker keeps serving. Real podman, real netns, real dnsmasq.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from support.netlab import NetnsPair, wait_for

from safespawn.agent import client

from .test_core import dnsmasq_argv, qdhcp

PLANTS = ["symlink", "fifo", "hardlink", "directory", "symlinked_parent"]
# A path that resolves outside the data dirs is already refused by the policy (check_path), before
# any start and again at every sync's re-check; the writer's own link-safety (tests/unit/test_pidfiles.py)
# covers a swap between that check and the write.
RESOLVES_OUTSIDE = {"symlink", "symlinked_parent"}


@pytest.fixture
def pair():
    with NetnsPair(server_ns=qdhcp()) as p:
        yield p


@pytest.fixture
def sentinel(tmp_path: Path) -> Path:
    """A host file outside the data dir, on the same filesystem (so it can be hard-linked)."""
    f = tmp_path / "host" / "sentinel"
    f.parent.mkdir()
    f.write_text("host secret\n")
    os.utime(f, (1_000_000_000, 1_000_000_000))
    return f


def untouched(sentinel: Path) -> None:
    assert sentinel.read_text() == "host secret\n" and sentinel.stat().st_mtime == 1_000_000_000
    assert os.listdir(sentinel.parent) == ["sentinel"], "nothing was created beside the host file"


def plant(kind: str, pid_file: Path, sentinel: Path) -> None:
    if pid_file.is_dir() and not pid_file.is_symlink():
        shutil.rmtree(pid_file)
    elif pid_file.exists() or pid_file.is_symlink():
        pid_file.unlink()
    if kind == "symlink":
        pid_file.symlink_to(sentinel)
    elif kind == "fifo":
        os.mkfifo(pid_file)
    elif kind == "hardlink":
        os.link(sentinel, pid_file)
    elif kind == "directory":
        (pid_file / "inside").mkdir(parents=True)
    elif kind == "symlinked_parent":
        # The network's folder becomes a link to the host folder; pid files would land beside the sentinel.
        net = pid_file.parent
        moved = net.with_name(net.name + ".real")
        net.rename(moved)
        net.symlink_to(sentinel.parent)


def unplant(kind: str, pid_file: Path) -> None:
    if kind == "symlink":
        pid_file.unlink()
    else:
        net = pid_file.parent
        net.unlink()
        net.with_name(net.name + ".real").rename(net)


def holds_host_pid(pid_file: Path, pid: int) -> bool:
    st = os.lstat(pid_file)
    return pid_file.is_file() and not pid_file.is_symlink() and st.st_nlink == 1 and \
        pid_file.read_text() == f"{pid}\n"


def running_pid(broker, name: str) -> int:
    [c] = [c for c in broker.containers() if name in c["Names"]]
    assert c["State"] == "running"
    return int(c["Pid"])


def still_serves(broker, pid: int) -> None:
    """The broker answers the next request (a HUP by pid, as Neutron's reload sends)."""
    r = broker.request(client.signal_request("HUP", pid=pid, profile="dnsmasq"))
    assert r["ok"], r


@pytest.mark.parametrize("kind", PLANTS)
def test_a_planted_pid_file_path_never_reaches_a_host_file(broker, pair, sentinel, kind):
    argv = dnsmasq_argv(broker.data_dir, pair)
    pid_file = broker.data_dir / pair.server_ns / "pid"

    # 1. Planted before the start.
    plant(kind, pid_file, sentinel)
    r = broker.request(client.start_request("dnsmasq", argv, netns=pair.server_ns))
    if kind in RESOLVES_OUTSIDE:
        assert not r["ok"] and r["error"]["code"] == "policy_denied", r
        assert broker.containers() == []
        untouched(sentinel)
        unplant(kind, pid_file)
        r = broker.request(client.start_request("dnsmasq", argv, netns=pair.server_ns))
    assert r["ok"], r
    untouched(sentinel)
    if kind == "directory":
        assert pid_file.is_dir()
    else:
        assert holds_host_pid(pid_file, r["pid"]), "the planted entry was replaced by the host's pid file"
    if kind == "directory":
        refusals = [e for e in broker.audit() if "pid file not written" in e.get("reason", "")]
        assert refusals and refusals[0]["decision"] == "deny" and refusals[0]["file"] == str(pid_file)
    still_serves(broker, r["pid"])

    # 2. Planted while the sidecar runs, then dnsmasq restarts (podman's restart policy gives it a
    #    new pid): the next sync refreshes the pid file, and is just as careful.
    if kind == "directory":
        shutil.rmtree(pid_file)
    plant(kind, pid_file, sentinel)
    old = r["pid"]
    os.kill(old, 9)
    new = wait_for(lambda: (p := running_pid(broker, r["sidecar"])) != old and p, timeout=20,
                   message="podman restarts the sidecar")
    result = broker.sync()
    assert result.errors == []
    untouched(sentinel)
    if kind in RESOLVES_OUTSIDE:
        # The sync's re-check drops the sidecar (its arguments now reach outside the data dirs);
        # once the agent undoes its plant, the same start runs again with a true pid file.
        assert broker.containers() == []
        assert any("dropped" in e.get("reason", "") for e in broker.audit())
        unplant(kind, pid_file)
        again = broker.request(client.start_request("dnsmasq", argv, netns=pair.server_ns))
        assert again["ok"] and holds_host_pid(pid_file, again["pid"])
        untouched(sentinel)
        return
    if kind == "directory":
        assert pid_file.is_dir()
    else:
        assert holds_host_pid(pid_file, new)
    still_serves(broker, new)


def test_a_pid_file_removed_while_the_sidecar_runs_is_written_again_by_the_next_sync(broker, pair):
    argv = dnsmasq_argv(broker.data_dir, pair)
    pid_file = broker.data_dir / pair.server_ns / "pid"
    r = broker.request(client.start_request("dnsmasq", argv, netns=pair.server_ns))
    assert r["ok"] and holds_host_pid(pid_file, r["pid"])
    # The program's own write went to its private /run, holding its namespace pid.
    private = subprocess.run(["podman", "exec", r["sidecar"], "cat", "/run/safespawn-pid-file-pid"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
    assert private.strip() == "1" and r["pid"] != 1
    pid_file.unlink()
    broker.sync()
    assert holds_host_pid(pid_file, r["pid"])
    # An idempotent start (same arguments, nothing to change) writes it too, before the reply.
    pid_file.unlink()
    again = broker.request(client.start_request("dnsmasq", argv, netns=pair.server_ns))
    assert again["ok"] and again["pid"] == r["pid"] and holds_host_pid(pid_file, r["pid"])
