"""The signal fast path: a recorded process identity, checked through /proc after a pidfd pins it.

The /proc files are hostile in one way: a process names itself (comm) and may put ')' and spaces in
that name. Fake /proc trees cover the parsing; real processes cover pidfd delivery.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from safespawn.broker import pidsignal
from safespawn.broker.pidsignal import Delivery, ProcessIdentity

CID = "a1e3127aabb0e85c9dc9a9c225edb8ba8145b2da356200173e62c30b4f957be6"
OTHER = "b" * 64


def stat_line(pid: int, comm: str, start: int) -> str:
    # fields 3.. : state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime
    # cutime cstime priority nice threads itrealvalue starttime ...
    rest = ["S", "1", "1", "1", "0", "-1", "4194560", "0", "0", "0", "0", "0", "0", "0", "0", "20", "0", "1",
            "0", str(start), "1000", "10"]
    return f"{pid} ({comm}) " + " ".join(rest) + "\n"


def fake_proc(tmp_path: Path, pid: int, comm: str = "dnsmasq", start: int = 4242,
              cgroup: str | None = None) -> str:
    d = tmp_path / str(pid)
    d.mkdir(parents=True, exist_ok=True)
    (d / "stat").write_text(stat_line(pid, comm, start))
    if cgroup is None:
        cgroup = "".join(f"{i}:{c}:/libpod_parent/libpod-{CID}\n" for i, c in
                         enumerate(["cpu", "memory", "pids"], 1)) + f"0::/libpod_parent/libpod-{CID}\n"
    (d / "cgroup").write_text(cgroup)
    return str(tmp_path)


def test_start_time_is_read_after_the_last_parenthesis_of_a_hostile_comm(tmp_path: Path) -> None:
    # A program can call itself "x) S 1 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 999": only the last ')' counts.
    proc = fake_proc(tmp_path, 77, comm="x) S 1 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 999", start=4242)
    assert pidsignal.start_ticks(77, proc) == 4242


def test_a_missing_or_malformed_stat_gives_no_start_time(tmp_path: Path) -> None:
    assert pidsignal.start_ticks(78, str(tmp_path)) is None
    (tmp_path / "79").mkdir()
    (tmp_path / "79" / "stat").write_text("79 (trunc) S 1 2")
    assert pidsignal.start_ticks(79, str(tmp_path)) is None


@pytest.mark.parametrize("cgroup", [
    f"0::/libpod_parent/libpod-{CID}\n",
    f"0::/machine.slice/libpod-{CID}.scope\n",
    f"0::/machine.slice/libpod-{CID}.scope/container\n",
    f"12:memory:/docker/{CID}\n0::/system.slice/docker-{CID}.scope\n",
])
def test_the_container_cgroup_is_recognised_in_the_runtimes_naming_schemes(tmp_path: Path, cgroup: str) -> None:
    assert pidsignal.cgroup_names_container(5, CID, fake_proc(tmp_path, 5, cgroup=cgroup))


@pytest.mark.parametrize("cgroup", [
    "",  # no cgroup file content at all
    "0::/user.slice/user-0.slice/session-1.scope\n",  # a host process
    f"0::/libpod_parent/libpod-{OTHER}\n",  # another container
    f"0::/libpod_parent/libpod-{CID}x\n",  # a name that merely starts with the id
    f"0::/libpod_parent/xlibpod-{CID}\n",
    f"4:memory:/libpod_parent/libpod-{CID}\n0::/user.slice\n",  # in it for one hierarchy only
])
def test_any_other_cgroup_is_not_the_container(tmp_path: Path, cgroup: str) -> None:
    assert not pidsignal.cgroup_names_container(5, CID, fake_proc(tmp_path, 5, cgroup=cgroup))


@pytest.mark.parametrize("cid", ["", "abc", CID.upper(), CID + "0", "../" + CID[:61]])
def test_a_malformed_container_id_never_matches(tmp_path: Path, cid: str) -> None:
    proc = fake_proc(tmp_path, 5, cgroup=f"0::/libpod_parent/libpod-{cid}\n")
    assert not pidsignal.cgroup_names_container(5, cid, proc)


def test_identify_records_start_time_only_for_a_process_in_the_container(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, 90, start=123)
    assert pidsignal.identify(90, CID, proc) == ProcessIdentity(90, 123, CID)
    assert pidsignal.identify(90, OTHER, proc) is None
    assert pidsignal.identify(91, CID, proc) is None
    assert pidsignal.identify(0, CID, proc) is None


def test_is_alive_needs_the_same_start_time_and_container(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, 90, start=123)
    assert pidsignal.is_alive(ProcessIdentity(90, 123, CID), proc)
    assert not pidsignal.is_alive(ProcessIdentity(90, 124, CID), proc)  # the pid was reused
    assert not pidsignal.is_alive(ProcessIdentity(90, 123, OTHER), proc)


@pytest.mark.parametrize(("name", "num"), [("HUP", 1), ("SIGHUP", 1), ("1", 1), ("USR2", 12), ("15", 15),
                                           ("KILL", 9), ("NOPE", None), ("999", None), ("", None)])
def test_signal_names_and_numbers(name: str, num: int | None) -> None:
    assert pidsignal.signal_number(name) == num


# -- real processes ------------------------------------------------------------------------------

def real_identity_with_fake_cgroup(tmp_path: Path, pid: int, cid: str = CID) -> tuple[ProcessIdentity, str]:
    """A /proc view where `pid`'s stat is the real one and its cgroup says container `cid`."""
    d = tmp_path / str(pid)
    d.mkdir()
    os.symlink(f"/proc/{pid}/stat", d / "stat")
    (d / "cgroup").write_text(f"0::/libpod_parent/libpod-{cid}\n")
    ticks = pidsignal.start_ticks(pid)
    assert ticks is not None
    return ProcessIdentity(pid, ticks, cid), str(tmp_path)


def wait_exit(p: subprocess.Popen[bytes], timeout: float = 5) -> int | None:
    try:
        return p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return None


def test_a_verified_process_gets_the_signal_through_its_pidfd(tmp_path: Path) -> None:
    p = subprocess.Popen(["sleep", "30"])
    try:
        ident, proc = real_identity_with_fake_cgroup(tmp_path, p.pid)
        assert pidsignal.send(ident, signal.SIGTERM, proc) is Delivery.SENT
        assert wait_exit(p) == -signal.SIGTERM
    finally:
        p.kill()
        p.wait()


def test_a_recorded_start_time_that_differs_means_another_process_which_is_not_signalled(tmp_path: Path) -> None:
    """The pid the broker holds now belongs to another process: refused, that process untouched."""
    p = subprocess.Popen(["sleep", "30"])
    try:
        ident, proc = real_identity_with_fake_cgroup(tmp_path, p.pid)
        stale = ProcessIdentity(p.pid, ident.start_ticks - 1, CID)
        assert pidsignal.send(stale, signal.SIGTERM, proc) is Delivery.MISMATCH
        assert wait_exit(p, 0.3) is None  # still running: no signal reached it
    finally:
        p.kill()
        p.wait()


def test_a_process_outside_the_container_cgroup_is_not_signalled() -> None:
    """The real /proc: this host `sleep` is in no container, whatever its start time."""
    p = subprocess.Popen(["sleep", "30"])
    try:
        ticks = pidsignal.start_ticks(p.pid)
        assert ticks is not None
        assert pidsignal.send(ProcessIdentity(p.pid, ticks, CID), signal.SIGTERM) is Delivery.MISMATCH
        assert wait_exit(p, 0.3) is None
    finally:
        p.kill()
        p.wait()


def test_a_process_that_is_gone_is_reported_gone(tmp_path: Path) -> None:
    p = subprocess.Popen(["sleep", "30"])
    ident, proc = real_identity_with_fake_cgroup(tmp_path, p.pid)
    p.kill()
    p.wait()
    deadline = time.monotonic() + 5
    while os.path.exists(f"/proc/{p.pid}") and time.monotonic() < deadline:
        time.sleep(0.01)
    assert pidsignal.send(ident, signal.SIGTERM, proc) in (Delivery.GONE, Delivery.MISMATCH)


# -- readiness: the profile's ready_pid_file -------------------------------------------------------

def _profile(**extra: object) -> dict[str, object]:
    base: dict[str, object] = {"name": "p", "command": ["prog"], "netns": "forbidden", "key_from": "--key",
                               "args": {"--key": {"type": "regex", "pattern": "[a-z]+"},
                                        "--pid-file": {"type": "path"},
                                        "-p": {"type": "path", "separate": True}}}
    base.update(extra)
    return base


@pytest.mark.parametrize("option", ["--nope", "--key"])
def test_ready_pid_file_must_name_a_path_option_of_the_profile(option: str) -> None:
    from safespawn.broker.policy import parse_profile
    from safespawn.errors import ConfigError

    with pytest.raises(ConfigError, match="ready_pid_file"):
        parse_profile(_profile(ready_pid_file=option), "test")


@pytest.mark.parametrize(("option", "args", "found"), [
    ("--pid-file", ("--key=a", "--pid-file=/d/one"), "/d/one"),
    ("--pid-file", ("--pid-file=/d/one", "--pid-file=/d/two"), "/d/two"),  # the last one, as programs read it
    ("--pid-file", ("--key=a",), None),
    ("-p", ("-p", "/d/three"), "/d/three"),
    ("-p", ("--key=a", "-p"), None),
])
def test_the_pid_file_is_read_from_the_checked_arguments(option: str, args: tuple[str, ...],
                                                         found: str | None) -> None:
    from safespawn.broker.policy import parse_profile

    assert parse_profile(_profile(ready_pid_file=option), "test").pid_file(args) == found


def test_only_a_fresh_regular_pid_file_counts_as_ready_never_what_a_link_points_to(tmp_path: Path) -> None:
    """The pid file lies in an agent-writable dir: it is lstat'ed, never followed or opened."""
    from safespawn.broker.readiness import written_since

    since = time.time()
    fresh = tmp_path / "pid"
    fresh.write_text("123\n")
    assert written_since(str(fresh), since)
    old = tmp_path / "old"
    old.write_text("1\n")
    os.utime(old, (since - 60, since - 60))
    assert not written_since(str(old), since)
    link = tmp_path / "link"
    link.symlink_to(fresh)
    os.utime(link, (since - 60, since - 60), follow_symlinks=False)
    assert not written_since(str(link), since)  # the link itself is not a regular file
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert not written_since(str(fifo), since)  # and a FIFO is never opened (it would block)
    assert not written_since(str(tmp_path / "missing"), since)
