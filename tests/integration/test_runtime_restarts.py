"""`safespawn status` counts the restarts done by the runtime's own restart policy, not only the
broker's respawns: real podman, a sidecar's program killed with SIGKILL and restarted by podman."""

from __future__ import annotations

import json
import os
import signal
from typing import Any

from support.broker import Broker
from support.usersystemd import SLEEPER, wait_until

from safespawn.agent import client


def sidecar_status(b: Broker) -> dict[str, Any]:
    p = b.cli("status", b.channel, "--json", check=True)
    [s] = json.loads(p.stdout)["sidecars"]
    return s


def kill_and_wait_for_restart(b: Broker, name: str, pid: int) -> int:
    os.kill(pid, signal.SIGKILL)
    [c] = wait_until(lambda: [c for c in b.containers() if c["Names"] == [name] and c["State"] == "running"
                              and c["Pid"] not in (0, pid)], timeout=30, what="podman to restart the sidecar")
    return int(c["Pid"])


def test_status_shows_restarts_by_the_runtime_restart_policy(make_broker: Any, tmp_path: Any) -> None:
    prom = tmp_path / "safespawn.prom"
    b: Broker = make_broker(profiles=["sleeper"], broker_extra=f'metrics_file = "{prom}"')
    (b.root / "profiles").mkdir(exist_ok=True)
    (b.root / "profiles" / "sleeper.toml").write_text(SLEEPER)
    r = b.request(client.start_request("sleeper", ["--key=one"]))
    assert r["ok"], r
    name, pid = r["sidecar"], r["pid"]
    first = sidecar_status(b)
    assert (first["restarts"], first["runtime_restarts"], first["respawns"]) == (0, 0, 0)

    pid = kill_and_wait_for_restart(b, name, pid)
    # Straight from podman (inspect's RestartCount), before any sync noticed.
    now = sidecar_status(b)
    assert (now["restarts"], now["runtime_restarts"], now["respawns"], now["pid"]) == (1, 1, 0, pid)
    text = b.cli("status", b.channel, check=True).stdout
    [row] = [line for line in text.splitlines() if name in line]
    assert row.split()[3:5] == [str(pid), "1"], text

    # A sync notices the restart: recorded for outbox/status.json, counted in the metrics.
    b.sync()
    [published] = json.loads((b.channel_dir() / "outbox" / "status.json").read_text())["sidecars"]
    assert (published["restarts"], published["runtime_restarts"], published["pid"]) == (1, 1, pid)
    assert b.desired()[name]["runtime_restarts"] == 1
    assert f'safespawn_runtime_restarts_total{{channel="{b.channel}"}} 1' in prom.read_text()

    pid = kill_and_wait_for_restart(b, name, pid)
    b.sync()
    assert sidecar_status(b)["runtime_restarts"] == 2
    [published] = json.loads((b.channel_dir() / "outbox" / "status.json").read_text())["sidecars"]
    assert (published["runtime_restarts"], published["pid"]) == (2, pid)
    assert f'safespawn_runtime_restarts_total{{channel="{b.channel}"}} 2' in prom.read_text()
    b.sync()  # nothing new: the counter stays
    assert f'safespawn_runtime_restarts_total{{channel="{b.channel}"}} 2' in prom.read_text()
