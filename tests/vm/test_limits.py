"""Per-channel budgets on a systemd host (cgroup v2, podman's systemd cgroup manager): the slice path.

The sandbox (cgroup v1, cgroupfs manager) runs tests/integration/test_limits.py; here the broker must
make a slice per channel (`safespawn-CHANNEL.slice`, the channel's '-' written '_') with MemoryMax=,
MemorySwapMax=0, CPUQuota= and TasksMax=, and podman must put each sidecar under it. The test runs
its own broker (`safespawn watch` with a config of its own, two channels), so it needs no channel in
the role's deployment; haproxy runs agent-written Lua that allocates without end, then forks without
end, while the other channel still gets a sidecar started.
"""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import IMAGE, SAFESPAWN, VMTEST, Host, sh, wait_until
from support import netlab

ROOT = VMTEST / "limits"
CH, OTHER = "vm-limits", "vm-limits-b"
SLICE = Path("/sys/fs/cgroup/safespawn.slice/safespawn-vm_limits.slice")
BUDGET_MEMORY = 256 << 20


def config() -> Path:
    text = (f'[broker]\nchannels_dir = "{ROOT}/channels"\nstate_dir = "{ROOT}/state"\n'
            f'profiles_dir = "{ROOT}/profiles"\n')
    for ch in (CH, OTHER):
        text += (f'\n[channels.{ch}]\nimage = "{IMAGE}"\nprofiles = ["haproxy"]\ndata_dirs = ["{ROOT}/data"]\n'
                 f'budget_memory = "256m"\nbudget_cpus = 0.5\nbudget_tasks = 200\n')
    ROOT.mkdir(parents=True, exist_ok=True)
    (ROOT / "data").mkdir(exist_ok=True)
    (ROOT / "data").chmod(0o755)
    p = ROOT / "safespawn.toml"
    p.write_text(text)
    return p


@pytest.fixture(scope="module")
def broker(host: Host) -> Iterator[dict[str, str]]:  # host: the role installed safespawn
    env = dict(os.environ, SAFESPAWN_CONFIG=str(config()))
    sh(SAFESPAWN, "check-config", env=env)
    log = open(ROOT / "watch.log", "ab")
    w = subprocess.Popen([str(SAFESPAWN), "watch", "--interval", "0.1"], env=env, stdout=log, stderr=log)
    try:
        wait_until(lambda: (ROOT / "channels" / OTHER / "inbox" / "new").is_dir(), 60, what="channels laid out")
        yield env
    finally:
        w.terminate()
        w.wait(timeout=60)
        for ch in (CH, OTHER):
            ids = [c["Id"] for c in json.loads(sh("podman", "ps", "-a", "--format", "json", "--filter",
                                                  f"label=safespawn.channel={ch}").stdout or "[]")]
            if ids:
                sh("podman", "rm", "-f", "-t", "0", *ids, timeout=300, check=False)
            sh("systemctl", "stop", f"safespawn-{ch.replace('-', '_')}.slice", check=False)


def netns() -> str:
    name = f"qdhcp-{uuid.uuid4()}"
    netlab.netns_add(name)
    sh("ip", "-n", name, "link", "set", "lo", "up")
    return name


def start(env: dict[str, str], ch: str, ns: str, lua: str) -> dict[str, object]:
    d = ROOT / "data" / ns
    d.mkdir(parents=True, exist_ok=True)
    (d / "attack.lua").write_text(lua)
    (d / "haproxy.cfg").write_text(
        f"global\n    maxconn 64\n    lua-load {d}/attack.lua\n"
        "defaults\n    mode http\n    timeout connect 5s\n    timeout client 5s\n    timeout server 5s\n"
        "listen listener\n    bind 127.0.0.1:80\n    http-request return status 200\n")
    cp = sh(SAFESPAWN, "submit", "--channel-dir", ROOT / "channels" / ch, "start", "haproxy", "--netns", ns, "--",
            "-f", d / "haproxy.cfg", env=dict(env, SAFESPAWN_TIMEOUT="300"), timeout=330, check=False)
    reply = json.loads(cp.stdout.strip().splitlines()[-1]) if cp.stdout.strip() else {}
    assert reply.get("ok"), (cp.stdout, cp.stderr)
    return reply


def events(p: Path) -> dict[str, int]:
    return {k: int(v) for k, v in (line.split() for line in p.read_text().splitlines())}


HOG = """core.register_task(function()
  local t = {}
  for i = 1, 64 do
    t[i] = string.rep("x", 8 * 1048576 - 64) .. i
    core.msleep(5)
  end
  while true do core.msleep(1000) end
end)
"""

FORK_BOMB = """core.register_task(function()
  while true do
    os.execute("busybox sh -c 'b() { b | b & }; b' >/dev/null 2>&1")
    core.msleep(50)
  end
end)
"""


def test_a_channels_sidecars_run_in_its_slice_with_the_budget_and_their_own_limits(broker, measure) -> None:
    ns = netns()
    try:
        reply = start(broker, CH, ns, "-- nothing\n")
        pid = int(str(reply["pid"]))
        assert SLICE.is_dir()
        assert (SLICE / "memory.max").read_text().strip() == str(BUDGET_MEMORY)
        assert (SLICE / "memory.swap.max").read_text().strip() == "0"
        assert (SLICE / "cpu.max").read_text().split() == ["50000", "100000"]
        assert (SLICE / "pids.max").read_text().strip() == "200"
        cg = Path(f"/proc/{pid}/cgroup").read_text().strip().partition("::")[2]
        assert cg.startswith("/safespawn.slice/safespawn-vm_limits.slice/"), cg
        own = Path("/sys/fs/cgroup" + cg)
        while own.parent != SLICE and not (own / "memory.max").read_text().strip().isdigit():
            own = own.parent  # podman 5 may put the program in a child of the container's cgroup
        assert (own / "memory.max").read_text().strip() == str(128 << 20)  # haproxy's profile
        show = sh("systemctl", "show", "safespawn-vm_limits.slice", "-p", "MemoryMax", "-p", "TasksMax").stdout
        assert f"MemoryMax={BUDGET_MEMORY}" in show and "TasksMax=200" in show, show
        st = json.loads(sh(SAFESPAWN, "status", CH, "--json", env=broker).stdout)
        assert st["budget"]["use"]["memory_max_bytes"] == BUDGET_MEMORY, st["budget"]
        measure("limits-slice", memory_bytes=st["budget"]["use"]["memory_bytes"], tasks=st["budget"]["use"]["tasks"])
    finally:
        netlab.netns_delete(ns)
