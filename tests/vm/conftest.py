"""Fixtures for the tests that run inside the VM (tests/vm/README.md): the role deployment, helpers.

Runs with the VM's own python3 and Debian's pytest, as root, on a real systemd host.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

PAYLOAD = Path(os.environ.get("SAFESPAWN_VM_PAYLOAD", "/payload"))
OUT = PAYLOAD / "out"
VENV = Path("/opt/safespawn")
SAFESPAWN = VENV / "bin" / "safespawn"
IMAGE = "localhost/safespawn-test:latest"
CHANNELS_DIR = Path("/var/lib/safespawn/channels")
WRAPPERS_DIR = Path("/var/lib/safespawn/wrappers")
STATE_DIR = Path("/var/lib/safespawn/state")
VMTEST = Path("/var/lib/vmtest")

# Every channel the VM tests use: the role writes one config for the host. Add yours here.
CHANNELS: list[dict[str, Any]] = [
    {"name": "vm-dhcp", "image": IMAGE, "profiles": ["dnsmasq"], "data_dirs": [str(VMTEST / "dhcp")],
     "max_sidecars": 16},
    {"name": "vm-reboot", "image": IMAGE, "profiles": ["dnsmasq"], "data_dirs": [str(VMTEST / "reboot")],
     "max_sidecars": 16},
    {"name": "vm-class", "image": IMAGE, "profiles": ["dnsmasq"], "data_dirs": [str(VMTEST / "class")],
     "max_sidecars": 16},
]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "after_reboot: runs in the second boot only (tests/vm/README.md)")
    config.addinivalue_line("markers", "order(n): run earlier (smaller n) or later than the default 50")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    def key(item: pytest.Item) -> int:
        m = item.get_closest_marker("order")
        return int(m.args[0]) if m else 50
    items.sort(key=key)  # stable: file order within the same n


# --------------------------------------------------------------------------------------------------
# helpers


def sh(*argv: str | Path, timeout: float = 120, check: bool = True, env: dict[str, str] | None = None,
       input: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run argv (no shell) with a timeout; on check failure the assertion carries the output."""
    cp = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=timeout, check=False,
                        env=env, input=input)
    if check:
        assert cp.returncode == 0, f"rc={cp.returncode}: {argv}\nstdout: {cp.stdout[-3000:]}\nstderr: {cp.stderr[-3000:]}"
    return cp


def containers(channel: str, *, all: bool = True) -> list[dict[str, Any]]:
    argv = ["podman", "ps", "--format", "json", "--filter", f"label=safespawn.channel={channel}"]
    if all:
        argv.insert(2, "-a")
    return json.loads(sh(*argv).stdout or "[]")


def inspect(name: str) -> dict[str, Any]:
    return json.loads(sh("podman", "inspect", name).stdout)[0]


def wait_until(pred: Any, timeout: float, interval: float = 0.2, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while True:
        last = pred()
        if last:
            return last
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")
        time.sleep(interval)


def unit_log(unit: str, lines: int = 60) -> str:
    return sh("journalctl", "-u", unit, "-n", str(lines), "--no-pager", check=False).stdout


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


@pytest.fixture(scope="session")
def measure() -> Any:
    """measure(name, **numbers): record numbers for the host's report (/payload/out/measure-NAME.json)."""
    def record(name: str, **numbers: Any) -> None:
        OUT.mkdir(parents=True, exist_ok=True)
        (OUT / f"measure-{name}.json").write_text(json.dumps(numbers, indent=1, sort_keys=True))
        print(f"MEASURE {name}: {json.dumps(numbers, sort_keys=True)}")
    return record


# --------------------------------------------------------------------------------------------------
# the deployment: the real playbook, system scope


@dataclass
class Play:
    rc: int
    stdout: str
    stderr: str
    recap: dict[str, int] = field(default_factory=dict)

    def changed_tasks(self) -> list[str]:
        names, current = [], None
        for line in self.stdout.splitlines():
            m = re.match(r"^(?:TASK|RUNNING HANDLER) \[(?:[^\]:]*: )?(.*?)\] \**$", line)
            if m:
                current = m.group(1)
            elif line.startswith("changed:") and current and current not in names:
                names.append(current)
        return names


def role_vars(**extra: Any) -> dict[str, Any]:
    (wheel,) = sorted((PAYLOAD / "wheel").glob("safespawn-*.whl"))
    v: dict[str, Any] = {
        "ansible_python_interpreter": "/usr/bin/python3",
        "safespawn_package": str(wheel),
        "safespawn_venv": str(VENV),
        "safespawn_python": "/usr/bin/python3",
        "safespawn_pip_extra_args": "--no-index",
        "safespawn_systemd_scope": "system",
        "safespawn_agent_python": "/usr/bin/python3",
        "safespawn_channels": CHANNELS,
    }
    v.update(extra)
    return v


def play(**extra: Any) -> Play:
    work = VMTEST / "play"
    work.mkdir(parents=True, exist_ok=True)
    (work / "vars.json").write_text(json.dumps(role_vars(**extra)))
    (work / "site.yml").write_text(
        "- name: Deploy safespawn\n"
        "  hosts: localhost\n"
        "  connection: local\n"
        "  gather_facts: false\n"
        "  roles:\n"
        "    - role: safespawn.host.safespawn\n")
    env = dict(os.environ, ANSIBLE_COLLECTIONS_PATH=str(PAYLOAD / "ansible"), ANSIBLE_NOCOLOR="1",
               ANSIBLE_FORCE_COLOR="0", ANSIBLE_RETRY_FILES_ENABLED="0", ANSIBLE_CONFIG=str(work / "none.cfg"),
               # Pipelining: one python per task instead of a temp dir, a copy and a python (half the
               # time under emulation: ~100 s for the whole role instead of ~200 s).
               ANSIBLE_PIPELINING="1",
               ANSIBLE_HOME=str(work / "home"), ANSIBLE_LOCAL_TEMP=str(work / "tmp"))
    cp = subprocess.run(["ansible-playbook", "-i", "localhost,", "-e", "@vars.json", "site.yml"], cwd=work,
                        capture_output=True, text=True, env=env, timeout=900, check=False)
    p = Play(cp.returncode, cp.stdout, cp.stderr)
    m = re.search(r"^localhost\s*:\s*(.*)$", cp.stdout, re.M)
    if m:
        p.recap = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", m.group(1))}
    (OUT / "plays").mkdir(parents=True, exist_ok=True)
    n = len(list((OUT / "plays").iterdir()))
    (OUT / "plays" / f"play{n + 1}.txt").write_text(cp.stdout + cp.stderr)
    return p


@dataclass
class Host:
    first_play: Play | None  # None in boot 2: deployed in boot 1

    def channel_dir(self, ch: str) -> Path:
        return CHANNELS_DIR / ch

    def wrappers(self, ch: str) -> Path:
        return WRAPPERS_DIR / ch


@pytest.fixture(scope="session")
def host(request: pytest.FixtureRequest) -> Host:
    """safespawn deployed by the role in system scope (once, in boot 1; boot 2 finds it deployed)."""
    marker = VMTEST / "deployed"
    if marker.exists():
        return Host(None)
    VMTEST.mkdir(parents=True, exist_ok=True)
    for ch in CHANNELS:
        for d in ch.get("data_dirs", []):
            Path(d).mkdir(parents=True, exist_ok=True)
            Path(d).chmod(0o755)
    t0 = time.monotonic()
    p = play()
    took = time.monotonic() - t0
    assert p.rc == 0 and p.recap.get("failed", 1) == 0, (p.stdout[-6000:] + p.stderr[-4000:])
    marker.write_text(json.dumps({"first_play_seconds": round(took, 1)}))
    print(f"role deployed in {took:.1f}s")
    return Host(p)
