"""The host's pid-file writer against what an agent can plant in its data dir (no podman needed).

Each case plants something at (or above) the pid file's path that points at a host file outside
the data dir, then asks the writer for a pid file there. The host file keeps its content and mtime;
the writer either replaces the planted entry with a plain file of its own or refuses.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from safespawn.broker import pidfiles
from safespawn.broker.pidfiles import PidFileRefused, read_pid_file, write_pid_file
from safespawn.broker.policy import load_profile, parse_profile
from safespawn.errors import ConfigError, PolicyDenied


@pytest.fixture
def data(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    (d / "dhcp" / "net").mkdir(parents=True)
    return d


@pytest.fixture
def host_file(tmp_path: Path) -> Path:
    """A host file outside the data dir (same filesystem, so a hard link to it is possible)."""
    f = tmp_path / "host" / "shadow"
    f.parent.mkdir()
    f.write_text("root:secret\n")
    os.utime(f, (1_000_000_000, 1_000_000_000))
    return f


def untouched(f: Path) -> bool:
    return f.read_text() == "root:secret\n" and f.stat().st_mtime == 1_000_000_000


def plain_file_with(path: Path, pid: int) -> bool:
    st = os.lstat(path)
    return path.is_file() and not path.is_symlink() and st.st_nlink == 1 and path.read_text() == f"{pid}\n"


def test_a_pid_file_is_written_with_the_pid_and_readable_by_the_agent(data: Path) -> None:
    path = data / "dhcp" / "net" / "pid"
    write_pid_file(str(path), 4321, [str(data)])
    assert plain_file_with(path, 4321) and (path.stat().st_mode & 0o777) == 0o644
    assert read_pid_file(str(path), [str(data)]) == 4321
    assert [p for p in os.listdir(path.parent) if p != "pid"] == [], "no temp file is left behind"


def test_a_symlink_at_the_path_is_replaced_not_followed(data: Path, host_file: Path) -> None:
    path = data / "dhcp" / "net" / "pid"
    path.symlink_to(host_file)
    assert read_pid_file(str(path), [str(data)]) is None
    write_pid_file(str(path), 4321, [str(data)])
    assert untouched(host_file) and plain_file_with(path, 4321)


def test_a_hard_link_to_a_host_file_is_replaced_not_written_into(data: Path, host_file: Path) -> None:
    path = data / "dhcp" / "net" / "pid"
    os.link(host_file, path)
    assert read_pid_file(str(path), [str(data)]) is None, "a hard-linked file is never taken as ours"
    write_pid_file(str(path), 4321, [str(data)])
    assert untouched(host_file) and plain_file_with(path, 4321)


def test_a_fifo_at_the_path_is_replaced_without_blocking(data: Path) -> None:
    path = data / "dhcp" / "net" / "pid"
    os.mkfifo(path)
    assert read_pid_file(str(path), [str(data)]) is None  # O_NONBLOCK: returns at once
    write_pid_file(str(path), 4321, [str(data)])
    assert plain_file_with(path, 4321)


def test_a_directory_at_the_path_is_refused(data: Path) -> None:
    path = data / "dhcp" / "net" / "pid"
    (path / "inner").mkdir(parents=True)
    with pytest.raises(PidFileRefused, match="is a directory"):
        write_pid_file(str(path), 4321, [str(data)])
    assert os.listdir(path) == ["inner"]


@pytest.mark.parametrize("level", ["dhcp", "dhcp/net"])
def test_a_symlinked_parent_directory_is_refused(data: Path, tmp_path: Path, host_file: Path, level: str) -> None:
    target = data / level
    for p in sorted(target.rglob("*"), reverse=True):
        p.rmdir()
    target.rmdir()
    target.symlink_to(host_file.parent)  # e.g. /var/lib/neutron/dhcp -> /etc
    with pytest.raises(PidFileRefused, match="symlink"):
        write_pid_file(str(data / "dhcp" / "net" / "shadow"), 4321, [str(data)])
    with pytest.raises(PidFileRefused, match="symlink"):
        write_pid_file(str(data / "dhcp" / "net" / "pid"), 4321, [str(data)])
    assert untouched(host_file) and os.listdir(host_file.parent) == ["shadow"]


@pytest.mark.parametrize("path", ["/etc/safespawn-test-pid", "{data}/../host/shadow", "{data}/dhcp//pid",
                                  "{data}/dhcp/net/", "{data}", "relative/pid", "{data}x/pid"])
def test_a_path_outside_the_data_dirs_is_refused(data: Path, host_file: Path, path: str) -> None:
    with pytest.raises(PidFileRefused):
        write_pid_file(path.format(data=data), 4321, [str(data)])
    assert untouched(host_file) and not os.path.exists("/etc/safespawn-test-pid")


def test_a_missing_directory_is_not_created(data: Path) -> None:
    with pytest.raises(PidFileRefused):
        write_pid_file(str(data / "nope" / "pid"), 4321, [str(data)])
    assert not (data / "nope").exists()


def test_garbage_in_a_pid_file_reads_as_absent(data: Path) -> None:
    path = data / "dhcp" / "net" / "pid"
    for text in ["", "abc", "12 34", "9" * 40, "-5"]:
        path.write_text(text)
        assert read_pid_file(str(path), [str(data)]) is None


def test_refresh_writes_only_what_changed_and_reports_refusals(data: Path) -> None:
    pid = os.getpid()
    main, bad = data / "dhcp" / "net" / "pid", data / "dhcp" / "dir"
    bad.mkdir()
    assert pidfiles.refresh([(str(main), "main"), (str(bad), "main")], pid, [str(data)]) == \
        [(str(bad), f"{str(bad)!r} is a directory")]
    ino = main.stat().st_ino
    assert pidfiles.refresh([(str(main), "main")], pid, [str(data)]) == []
    assert main.stat().st_ino == ino, "an unchanged pid file is not rewritten"


def test_a_child_pid_file_holds_the_main_process_s_child(data: Path) -> None:
    child = subprocess.Popen(["sleep", "30"])
    try:
        path = data / "dhcp" / "net" / "vrrp"
        assert pidfiles.refresh([(str(path), "child")], os.getpid(), [str(data)]) == []
        assert child.pid in pidfiles.child_pids(os.getpid())
        assert int(path.read_text()) in pidfiles.child_pids(os.getpid())
    finally:
        child.kill()
        child.wait()


# -- the profiles' pid-file declarations --------------------------------------------------------

def test_the_program_gets_a_private_pid_file_and_the_host_keeps_the_requested_one() -> None:
    p = load_profile("keepalived", None)
    args, files = p.private_pid_args(("-P", "-f", "/d/k.conf", "-p", "/d/k.pid", "-r", "/d/k.pid-vrrp"))
    # The private name keeps the requested file's name: Neutron looks for its uuid in the cmdline.
    assert args == ("-P", "-f", "/d/k.conf", "-p", "/run/safespawn-p-k.pid", "-r", "/run/safespawn-r-k.pid-vrrp")
    assert files == (("/d/k.pid", "main"), ("/d/k.pid-vrrp", "child"))
    args, files = load_profile("dnsmasq", None).private_pid_args(("--pid-file=/d/pid", "--no-hosts"))
    assert args == ("--pid-file=/run/safespawn-pid-file-pid", "--no-hosts") and files == (("/d/pid", "main"),)


@pytest.mark.parametrize("argv", [("-p", "/d/a", "-p", "/d/b"), ("-p", "/d/a", "-r", "/d/a")])
def test_a_pid_file_option_twice_or_one_file_twice_is_refused(argv: tuple[str, ...]) -> None:
    with pytest.raises(PolicyDenied, match="pid-file"):
        load_profile("keepalived", None).private_pid_args(argv)


@pytest.mark.parametrize("extra, match", [
    ({"pid_files": {"--nope": "main"}}, "not a path option"),
    ({"pid_files": {"--p": "grandchild"}}, "main"),
    ({"pid_files": {"--p": "main"}, "tmpfs": ["/tmp"]}, "/run"),
])
def test_a_bad_pid_files_declaration_is_a_config_error(extra: dict[str, object], match: str) -> None:
    data = {"name": "x", "command": ["x"], "netns_pattern": "q-.*", "args": {"--p": {"type": "path"}}, **extra}
    with pytest.raises(ConfigError, match=match):
        parse_profile(data, "test")


def test_every_built_in_profile_stays_out_of_the_host_pid_namespace() -> None:
    from safespawn.broker.policy import builtin_profile_names

    for name in builtin_profile_names():
        p = load_profile(name, None)
        assert p.pid_host is False, name
        assert p.pid_files, f"{name}: Neutron reads its pid file, so the host must write it"


# -- which sidecar a pid reaches (policy.sidecar_for_pid), with real pid namespaces --------------

def _in_own_pid_namespace() -> tuple[subprocess.Popen[bytes], int, int]:
    """A stand-in sidecar: `sh` as pid 1 of a new pid namespace (exec'd into sleep) with one child.

    As a normal user the pid namespace needs a user namespace of its own (unit tests run without
    root too: scripts/unit-tests-unprivileged); as root it is a plain pid namespace, as a sidecar's.
    """
    userns = [] if os.geteuid() == 0 else ["--user", "--map-root-user"]
    p = subprocess.Popen(["unshare", *userns, "--pid", "--fork", "--kill-child", "sh", "-c", "sleep 60 & exec sleep 61"])
    main = wait_for_one(lambda: pidfiles.child_pids(p.pid))
    child = wait_for_one(lambda: pidfiles.child_pids(main))
    return p, main, child


def wait_for_one(f):  # type: ignore[no-untyped-def]
    import time

    for _ in range(200):
        found = f()
        if found:
            return found[0]
        time.sleep(0.01)
    raise AssertionError("no process appeared")


def test_a_pid_reaches_a_sidecar_through_its_main_process_or_its_own_pid_namespace_only() -> None:
    from safespawn.broker.policy import sidecar_for_pid

    a, a_main, a_child = _in_own_pid_namespace()
    b, b_main, b_child = _in_own_pid_namespace()
    try:
        assert pidfiles.pid_namespace(a_child) == pidfiles.pid_namespace(a_main) != pidfiles.pid_namespace(b_main)
        assert sidecar_for_pid(a_main, [a_main, b_main]) == a_main
        assert sidecar_for_pid(a_child, [a_main, b_main]) == a_main, "keepalived's VRRP child"
        assert sidecar_for_pid(b_child, [a_main]) is None, "another channel's sidecar"
        assert sidecar_for_pid(os.getpid(), [a_main, b_main]) is None, "a host process"
        assert sidecar_for_pid(a.pid, [a_main]) is None, "the host-side parent is not inside"
        # A sidecar sharing the host's pid namespace (a custom pid_host profile): only its main pid.
        assert sidecar_for_pid(os.getpid(), [os.getppid()]) is None
        assert sidecar_for_pid(999_999_999, [a_main]) is None
    finally:
        for p in (a, b):
            p.kill()
            p.wait()
