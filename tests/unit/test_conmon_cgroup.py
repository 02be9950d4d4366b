"""Which conmon the broker moves, and where to (runtime/conmon.py); the real move is shown under a
real systemd manager in tests/integration/test_conmon_cgroup.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from safespawn.runtime import conmon
from safespawn.runtime.podman import PodmanRuntime

SERVICE = "/system.slice/safespawn-sync@ch.service"
MINE = {"memory": SERVICE, "pids": SERVICE, "name=systemd": SERVICE, "": SERVICE}


def test_a_conmon_podman_moved_in_the_controllers_goes_to_that_path() -> None:
    theirs = {"memory": "/libpod_parent/conmon", "pids": "/libpod_parent/conmon", "name=systemd": SERVICE,
              "": SERVICE}
    assert conmon.podman_conmon_path(theirs, MINE) == "/libpod_parent/conmon"


def test_a_conmon_under_a_configured_cgroup_parent_goes_to_that_parent() -> None:
    theirs = {"memory": "/safespawn/ch/conmon", "name=systemd": SERVICE, "": SERVICE}
    assert conmon.podman_conmon_path(theirs, MINE) == "/safespawn/ch/conmon"


@pytest.mark.parametrize("path", [SERVICE, "/libpod_parent/libpod-abc", "/a/../conmon", "conmon", "/a//conmon",
                                  "/"])
def test_a_process_podman_did_not_move_to_a_conmon_cgroup_stays(path: str) -> None:
    # Not moved by podman (started with $INVOCATION_ID, --cgroups=no-conmon, cgroup v2 only), a
    # container's own cgroup, or a path of another shape: nothing to mirror.
    assert conmon.podman_conmon_path({"memory": path, "name=systemd": SERVICE, "": SERVICE}, MINE) is None


def test_the_tracking_hierarchies_are_found_in_mountinfo(tmp_path: Path) -> None:
    mi = tmp_path / "mountinfo"
    mi.write_text(
        "30 25 0:26 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755\n"
        "31 30 0:27 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"
        "32 30 0:28 / /sys/fs/cgroup/systemd rw,nosuid - cgroup cgroup rw,xattr,name=systemd\n"
        "35 30 0:31 / /sys/fs/cgroup/memory rw,nosuid - cgroup cgroup rw,memory\n"
        "90 40 0:27 /some/sub /mnt/elsewhere rw - cgroup2 cgroup2 rw\n")
    assert conmon.tracking_mounts(str(mi)) == {"": "/sys/fs/cgroup/unified", "name=systemd": "/sys/fs/cgroup/systemd"}


def test_cgroups_of_this_process_are_read() -> None:
    mine = conmon.cgroups_of("self")
    assert mine and all(p.startswith("/") for p in mine.values())


def test_podman_runs_without_invocation_id(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INVOCATION_ID", "0123456789abcdef0123456789abcdef")
    monkeypatch.setenv("SAFESPAWN_SOMETHING", "kept")
    env = PodmanRuntime().cli.env
    assert "INVOCATION_ID" not in env and env["SAFESPAWN_SOMETHING"] == "kept"
    assert os.environ["INVOCATION_ID"]  # the broker's own environment is left as it is
