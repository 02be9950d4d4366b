"""The Ansible role in system scope on a real systemd host: the real playbook, then a second run.

The `host` fixture (conftest.py) has already played the role once (Debian's ansible-core, the wheel
of the commit under test, `safespawn_systemd_scope: system`). Here: that run changed things and the
units it enabled run under PID 1; a second run of the same playbook reports no change.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import CHANNELS, SAFESPAWN, Host, play, sh

UNITS = ("safespawn-sync@.path", "safespawn-sync@.service", "safespawn-reconcile.timer",
         "safespawn-reconcile.service")


@pytest.mark.order(1)
def test_first_run_deploys_units_into_the_system_manager(host: Host) -> None:
    if host.first_play is None:
        pytest.skip("deployed in an earlier boot")
    assert host.first_play.recap["changed"] > 0, host.first_play.stdout[-3000:]
    for u in UNITS:
        assert Path("/etc/systemd/system", u).is_file(), u
    names = [c["name"] for c in CHANNELS]
    out = sh("systemctl", "is-active", *[f"safespawn-sync@{n}.path" for n in names], "safespawn-reconcile.timer",
             check=False)
    assert out.stdout.split() == ["active"] * (len(names) + 1), out.stdout + out.stderr
    assert sh("systemctl", "is-enabled", "safespawn-reconcile.timer").stdout.strip() == "enabled"
    sh(SAFESPAWN, "check-config")


@pytest.mark.order(2)
def test_second_run_reports_no_change(host: Host) -> None:
    p = play()
    assert p.rc == 0, p.stdout[-4000:] + p.stderr[-2000:]
    assert p.recap.get("changed") == 0, p.changed_tasks()
