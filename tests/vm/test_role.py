"""The Ansible role in system scope on a real systemd host: the real playbook.

The `host` fixture (conftest.py) has already played the role once (Debian's ansible-core, the wheel
of the commit under test, `safespawn_systemd_scope: system`). Here: that run changed things and the
units it enabled run under PID 1. That a second run reports no change is shown in the sandbox tier
(tests/integration/test_ansible.py, the same role in user scope under a real systemd manager, and
in check mode): here a second play cost 110 s of emulated CPU, a sixth of the VM tier's budget.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import CHANNELS, SAFESPAWN, Host, sh

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
