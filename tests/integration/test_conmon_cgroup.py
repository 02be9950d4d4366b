"""The sync service's cgroup holds no sidecar process: each conmon leaves it (runtime/conmon.py).

A real `systemd --user` manager with `safespawn install --scope user`; requests go in the way an
agent sends them, the path unit starts the sync. The manager tracks its units in the unified
hierarchy of this test bed's cgroup v1 hybrid (and in name=systemd): both are read. Podman here
uses its cgroupfs manager; the systemd cgroup manager is the VM tier's (tests/vm).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.broker import Broker
from support.usersystemd import UserManager, wait_until, write_config

from safespawn.agent import client
from safespawn.runtime.conmon import TRACKING, cgroups_of, tracking_mounts

SYNC = "safespawn-sync@.service"


@pytest.fixture
def unit_host(tmp_path: Path, test_image: str) -> Iterator[tuple[UserManager, Broker]]:
    # The oneshot units (sync_resident = false), lingering 4 s: what ends after a run is what this
    # test looks at; the resident broker's cgroup is checked on the systemd host (tests/vm/test_wrapper.py).
    b = write_config(tmp_path, sync_linger=4, sync_resident=False)
    m = UserManager.start(tmp_path)
    try:
        m.log_to(SYNC, tmp_path / "sync.log")
        m.safespawn("install", "--scope", "user", config=b.config_path)
        m.systemctl("stop", "safespawn-reconcile.timer")  # only the path unit serves
        yield m, b
    finally:
        m.stop()
        b.cleanup()


def procs(cgroup: str) -> dict[str, list[int]]:
    """The pids in a unit's cgroup, per tracking hierarchy ([] once the cgroup is gone)."""
    out = {}
    for key, mount in tracking_mounts().items():
        try:
            out[key] = [int(p) for p in Path(mount, cgroup.lstrip("/"), "cgroup.procs").read_text().split()]
        except FileNotFoundError:
            out[key] = []
    return out


def comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "(gone)"


def conmon_of(pid: int) -> int:
    """A sidecar's conmon: the parent of its main process."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


def submit(b: Broker, key: str) -> dict[str, Any]:
    return client.submit(str(b.channel_dir()), client.start_request("sleeper", [f"--key={key}"]), timeout=60)


def test_the_sync_service_cgroup_holds_no_sidecar_process_and_sidecars_outlive_it(unit_host: Any) -> None:
    m, b = unit_host
    service = f"safespawn-sync@{b.channel}.service"
    assert tracking_mounts(), "no tracking hierarchy mounted"
    replies = [submit(b, f"k{i}") for i in range(3)]
    assert all(r["ok"] for r in replies), replies
    # The service still lingers (sync_linger = 4): its cgroup holds the sync and nothing else.
    shown = m.show(service, "ActiveState", "MainPID", "ControlGroup")
    assert shown["ActiveState"] == "activating", shown
    cg, main_pid = shown["ControlGroup"], int(shown["MainPID"])
    assert cg.endswith(f"/{service}")
    during = procs(cg)
    assert all(pids == [main_pid] for pids in during.values()), \
        {k: [(p, comm(p)) for p in v] for k, v in during.items()}
    for r in replies:
        conmon = conmon_of(r["pid"])
        assert comm(conmon) == "conmon"
        theirs = cgroups_of(conmon)
        # In no hierarchy at or below the service's cgroup; in the same place in all of them.
        assert all(not theirs.get(k, "").startswith(cg) for k in TRACKING), theirs
        assert len({p for p in theirs.values()}) == 1 and theirs[""].endswith("/conmon"), theirs

    # A `systemctl stop` of the lingering service ends the sync; the sidecars live on.
    # (SIGTERM ends the lingering sync: systemd counts that as a failed run of the oneshot.)
    m.systemctl("stop", service)
    assert m.show(service, "ActiveState")["ActiveState"] in ("inactive", "failed")
    assert all(not v for v in procs(cg).values())
    running = [c for c in b.containers() if c["State"] == "running"]
    assert sorted(c["Pid"] for c in running) == sorted(r["pid"] for r in replies)

    # A fresh activation (another request) that runs to its end: the unit's cgroup is empty
    # (gone) afterwards, so the next activation finds no process left over in it -- what systemd
    # reads at every start, and logs as "Found left-over process N (conmon) ..." on a host with a
    # journal (this test manager has none and logs nothing of it).
    assert submit(b, "k3")["ok"]
    wait_until(lambda: m.show(service, "ActiveState")["ActiveState"] == "inactive", timeout=30,
               what="the service to end after its linger")
    assert all(not v for v in procs(cg).values())
    assert len([c for c in b.containers() if c["State"] == "running"]) == 4

    # podman's restart policy restarts a killed sidecar: its new conmon is outside the unit too.
    os.kill(replies[0]["pid"], signal.SIGKILL)
    restarted = wait_until(lambda: [c for c in b.containers() if c["Names"] == [replies[0]["sidecar"]]
                                    and c["State"] == "running" and c["Pid"] not in (0, replies[0]["pid"])],
                           timeout=30, what="podman to restart the killed sidecar")
    theirs = cgroups_of(conmon_of(restarted[0]["Pid"]))
    assert all(not theirs.get(k, "").startswith(cg) for k in TRACKING), theirs
    assert all(not v for v in procs(cg).values())

