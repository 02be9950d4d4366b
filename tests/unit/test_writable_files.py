"""The host hands a file the program writes (dnsmasq's lease file) to the sidecar's uid.

Before each start the host makes every path the profile's `writable_files` name a plain file owned
by the sidecar's uid:gid, through directory fds, as it writes pid files. Each case plants what an
agent could at (or above) the path; a host file outside the data dir keeps its content, mtime and
owner, and the entry at the path is either handed over, replaced by a fresh file, or refused.
The target uid is the test's own (no root needed to chown to oneself; the integration tests hand
files to real, other uids).
"""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest

from safespawn.broker.pidfiles import PidFileRefused, hand_over_file, hand_over_files
from safespawn.broker.sidecar import SidecarSpec

ME = (os.getuid(), os.getgid())


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
    f.chmod(0o600)
    os.utime(f, (1_000_000_000, 1_000_000_000))
    return f


def untouched(f: Path) -> bool:
    st = os.stat(f)
    return f.read_text() == "root:secret\n" and st.st_mtime == 1_000_000_000 and stat.S_IMODE(st.st_mode) == 0o600


def fresh_file_of_mine(path: Path) -> bool:
    st = os.lstat(path)
    return (stat.S_ISREG(st.st_mode) and st.st_nlink == 1 and (st.st_uid, st.st_gid) == ME
            and stat.S_IMODE(st.st_mode) == 0o644 and path.read_text() == "")


def test_an_agent_written_lease_file_keeps_its_content_and_becomes_the_sidecars(data: Path) -> None:
    leases = data / "dhcp" / "net" / "leases"
    leases.write_text("1700000000 fa:16:3e:00:00:01 10.0.0.5 host-10-0-0-5 *\n")
    leases.chmod(0o600)
    ino = leases.stat().st_ino
    assert hand_over_file(str(leases), *ME, [str(data)]) == "chowned"
    st = leases.stat()
    assert st.st_ino == ino and (st.st_uid, st.st_gid) == ME and stat.S_IMODE(st.st_mode) == 0o644
    assert "10.0.0.5" in leases.read_text(), "the leases Neutron wrote before the start survive"
    assert hand_over_file(str(leases), *ME, [str(data)]) == "kept", "the next start changes nothing"
    assert sorted(os.listdir(leases.parent)) == ["leases"], "no temp file is left behind"


def test_a_missing_file_is_created_for_the_sidecar(data: Path) -> None:
    leases = data / "dhcp" / "net" / "leases"
    assert hand_over_file(str(leases), *ME, [str(data)]) == "created"
    assert fresh_file_of_mine(leases)


def test_a_symlink_at_the_path_is_replaced_never_followed_or_chowned(data: Path, host_file: Path) -> None:
    leases = data / "dhcp" / "net" / "leases"
    leases.symlink_to(host_file)
    assert hand_over_file(str(leases), *ME, [str(data)]) == "created"
    assert fresh_file_of_mine(leases) and untouched(host_file)


def test_a_hard_link_to_a_host_file_is_replaced_not_chowned(data: Path, host_file: Path) -> None:
    leases = data / "dhcp" / "net" / "leases"
    os.link(host_file, leases)
    assert hand_over_file(str(leases), *ME, [str(data)]) == "created"
    assert fresh_file_of_mine(leases) and untouched(host_file)
    assert os.stat(host_file).st_nlink == 1, "the host file lost its second name, nothing else"


def test_a_fifo_at_the_path_is_replaced_without_being_opened(data: Path) -> None:
    leases = data / "dhcp" / "net" / "leases"
    os.mkfifo(leases)
    done = threading.Event()

    def hand() -> None:
        hand_over_file(str(leases), *ME, [str(data)])
        done.set()

    threading.Thread(target=hand, daemon=True).start()
    assert done.wait(5), "a FIFO must not hang the broker"
    assert fresh_file_of_mine(leases)


def test_a_directory_at_the_path_is_refused(data: Path) -> None:
    leases = data / "dhcp" / "net" / "leases"
    leases.mkdir()
    with pytest.raises(PidFileRefused, match="is a directory"):
        hand_over_file(str(leases), *ME, [str(data)])
    assert leases.is_dir()


@pytest.mark.parametrize("level", ["net", "dhcp"])
def test_a_symlinked_parent_directory_is_refused(data: Path, tmp_path: Path, host_file: Path, level: str) -> None:
    target = host_file.parent
    if level == "net":
        (data / "dhcp" / "net").rmdir()
        (data / "dhcp" / "net").symlink_to(target)
    else:
        (data / "dhcp" / "net").rmdir()
        (data / "dhcp").rmdir()
        (data / "dhcp").symlink_to(tmp_path / "host-parent")
        (tmp_path / "host-parent" / "net").mkdir(parents=True)
    with pytest.raises(PidFileRefused, match="symlink or not a directory"):
        hand_over_file(str(data / "dhcp" / "net" / "shadow"), *ME, [str(data)])
    assert untouched(host_file)


@pytest.mark.parametrize("path", ["/etc/passwd", "{data}/../host/shadow", "{data}x/leases", "relative/leases",
                                  "{data}/dhcp//net/leases"])
def test_a_path_outside_the_data_dirs_is_refused(data: Path, host_file: Path, path: str) -> None:
    with pytest.raises(PidFileRefused):
        hand_over_file(path.format(data=data), *ME, [str(data)])
    assert untouched(host_file)


def test_a_missing_directory_is_not_created(data: Path) -> None:
    with pytest.raises(PidFileRefused):
        hand_over_file(str(data / "dhcp" / "other" / "leases"), *ME, [str(data)])
    assert not (data / "dhcp" / "other").exists()


def test_the_broker_hands_over_each_writable_file_of_a_spec_and_reports_refusals(data: Path) -> None:
    (data / "dhcp" / "net" / "log").mkdir()
    spec = SidecarSpec(name="c-dnsmasq-x", channel="c", profile="dnsmasq", key="x", netns=None, netns_path=None,
                       image="i", entrypoint=("dnsmasq",), args=(), capabilities=(), mounts=(str(data),), tmpfs=(),
                       pid_host=False, read_only=True, stop_grace=1, user=f"{ME[0]}:{ME[1]}",
                       writable_files=(str(data / "dhcp" / "net" / "leases"), str(data / "dhcp" / "net" / "log")))
    refused = hand_over_files(spec, [str(data)])
    assert fresh_file_of_mine(data / "dhcp" / "net" / "leases")
    assert [p for p, _ in refused] == [str(data / "dhcp" / "net" / "log")]
