"""The unit files `safespawn install` writes: the settings each guarantee rests on (pure, no systemd)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from safespawn.config import parse_config
from safespawn.errors import ConfigError
from safespawn.ops.units import InstallError, render_units


def units(scope: str = "system", channels_dir: str = "/var/lib/safespawn/channels", **broker: Any) -> dict[str, str]:
    cfg = parse_config({"broker": {"channels_dir": channels_dir, **broker},
                        "channels": {"neutron-dhcp": {"image": "localhost/x:1", "profiles": ["dnsmasq"]}}},
                       Path("/etc/safespawn/safespawn.toml"))
    return render_units(cfg, scope, "/usr/bin/safespawn", "/etc/safespawn/safespawn.toml")


def settings(text: str) -> list[str]:
    return [line for line in text.splitlines() if line and not line.startswith(("#", "["))]


def test_the_path_unit_is_level_triggered_on_the_inbox_and_watches_the_trigger_file() -> None:
    s = settings(units()["safespawn-sync@.path"])
    assert "DirectoryNotEmpty=/var/lib/safespawn/channels/%i/inbox/new" in s
    assert "PathChanged=/var/lib/safespawn/channels/%i/inbox/trigger" in s
    assert "Unit=safespawn-sync@%i.service" in s
    assert "TriggerLimitIntervalSec=10s" in s and "TriggerLimitBurst=100" in s
    assert "WantedBy=paths.target" in s


def test_the_sync_service_is_a_resident_broker_restarted_on_failure_with_start_limits_on_purpose() -> None:
    s = settings(units()["safespawn-sync@.service"])
    assert "Type=notify" in s and "NotifyAccess=main" in s
    assert "ExecStart=/usr/bin/safespawn watch --quick --channel %i" in s
    assert "Restart=on-failure" in s and "RestartSec=1s" in s
    assert "StartLimitIntervalSec=60s" in s and "StartLimitBurst=10" in s
    assert "WatchdogSec=15min" in s
    assert "KillMode=process" in s
    assert "MemoryHigh=768M" in s and "MemoryMax=1536M" in s and "CPUQuota=200%" in s and "CPUWeight=50" in s
    assert "Environment=SAFESPAWN_CONFIG=/etc/safespawn/safespawn.toml" in s
    # No mount namespace: the sidecars' mounts must stay visible to the host.
    assert not [x for x in s if x.startswith(("ProtectSystem", "PrivateTmp", "ProtectHome", "ReadWritePaths",
                                               "PrivateDevices", "NoNewPrivileges"))]
    # The timer's re-arm starts the brokers that do not run (at boot, after a crash loop).
    assert "ExecStartPre=-/usr/bin/safespawn rearm --scope system --brokers" in settings(
        units()["safespawn-reconcile.service"])


def test_the_oneshot_sync_service_has_no_start_limit_and_never_kills_the_sidecars() -> None:
    s = settings(units(sync_resident=False)["safespawn-sync@.service"])
    assert "Type=oneshot" in s
    assert "ExecStart=/usr/bin/safespawn sync --quick --linger=2 %i" in s
    assert "StartLimitIntervalSec=0" in s
    assert "KillMode=process" in s
    assert "Environment=SAFESPAWN_CONFIG=/etc/safespawn/safespawn.toml" in s
    assert not [x for x in s if x.startswith(("ProtectSystem", "PrivateTmp", "ProtectHome", "ReadWritePaths",
                                               "PrivateDevices", "NoNewPrivileges", "Restart"))]
    assert "ExecStartPre=-/usr/bin/safespawn rearm --scope system" in settings(
        units(sync_resident=False)["safespawn-reconcile.service"])


def test_the_oneshot_sync_service_lingers_as_configured_and_not_at_all_with_0() -> None:
    assert "ExecStart=/usr/bin/safespawn sync --quick --linger=0.5 %i" in settings(
        units(sync_linger=0.5, sync_resident=False)["safespawn-sync@.service"])
    assert "ExecStart=/usr/bin/safespawn sync --quick %i" in settings(
        units(sync_linger=0, sync_resident=False)["safespawn-sync@.service"])
    for bad in (-1, 31, "2", True):
        with pytest.raises(ConfigError, match="sync_linger"):
            units(sync_linger=bad)
    with pytest.raises(ConfigError, match="sync_resident"):
        units(sync_resident="yes")


def test_the_reconcile_service_rearms_then_syncs_every_channel() -> None:
    u = units(scope="user", reconcile_interval=5)
    s = settings(u["safespawn-reconcile.service"])
    assert s.index("ExecStartPre=-/usr/bin/safespawn rearm --scope user --brokers") < s.index(
        "ExecStart=/usr/bin/safespawn sync --all --no-wait")
    assert "SuccessExitStatus=5" in s and "KillMode=process" in s
    t = settings(u["safespawn-reconcile.timer"])
    assert "OnUnitActiveSec=5s" in t and "OnBootSec=10s" in t and "WantedBy=timers.target" in t


def test_every_unit_carries_the_install_marker() -> None:
    assert all(text.startswith("# Installed by `safespawn install`") for text in units().values())


@pytest.mark.parametrize("bad", ["/var/lib/safe spawn", "/var/lib/100%", '/var/lib/"x"', "/var/lib/x\nExecStart=/bin/sh"])
def test_a_path_that_would_change_a_unit_line_is_refused(bad: str) -> None:
    with pytest.raises(InstallError):
        cfg = parse_config({"broker": {}, "channels": {}})
        render_units(cfg, "system", bad, "/etc/safespawn/safespawn.toml")
