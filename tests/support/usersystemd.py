"""A real `systemd --user` manager for tests and benchmarks (scripts/user-systemd does the work).

    with UserManager.start(tmp_path) as m:
        m.safespawn("install", "--scope", "user", config=cfg)
        m.show("safespawn-sync@CH.path", "ActiveState")      # {'ActiveState': 'active'}

Each manager has its own XDG_RUNTIME_DIR (under /run, so its socket path stays short) and its own
XDG_CONFIG_HOME (where `safespawn install --scope user` writes the units), whatever the caller's
$HOME and $XDG_RUNTIME_DIR are: the CI's root defaults are never touched. It is stopped by the PID
it recorded, and its runtime dir is removed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from .broker import TEST_IMAGE, Broker, unique_channel

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "user-systemd"
SAFESPAWN = Path(sys.executable).parent / "safespawn"
T = TypeVar("T")


@dataclass
class UserManager:
    runtime_dir: Path
    config_home: Path
    env: dict[str, str]

    @classmethod
    def start(cls, root: Path) -> UserManager:
        runtime_dir = Path(tempfile.mkdtemp(prefix="safespawn-rt-", dir="/run"))
        config_home = root / "xdg-config"
        config_home.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, XDG_RUNTIME_DIR=str(runtime_dir), XDG_CONFIG_HOME=str(config_home))
        env.pop("DBUS_SESSION_BUS_ADDRESS", None)
        # The services run as on a host, where the installed package has its bytecode: a test
        # environment's PYTHONDONTWRITEBYTECODE would make every sync compile safespawn anew.
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        m = cls(runtime_dir, config_home, env)
        subprocess.run([str(SCRIPT), "start"], env=env, check=True, capture_output=True, timeout=30)
        return m

    def stop(self) -> None:
        subprocess.run([str(SCRIPT), "stop"], env=self.env, check=False, capture_output=True, timeout=60)
        shutil.rmtree(self.runtime_dir, ignore_errors=True)

    def __enter__(self) -> UserManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def unit_dir(self) -> Path:
        return self.config_home / "systemd" / "user"

    @property
    def log(self) -> Path:
        return self.runtime_dir / "safespawn-user-systemd.log"

    def systemctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["systemctl", "--user", *args], env=self.env, capture_output=True, text=True,
                              timeout=60, check=check)

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.systemctl("show", f"--property={','.join(props)}", "--", unit).stdout
        return dict(line.partition("=")[::2] for line in out.splitlines() if "=" in line)

    def safespawn(self, *args: str, config: Path | None = None, check: bool = True,
                  timeout: float = 120) -> subprocess.CompletedProcess[str]:
        argv = [str(SAFESPAWN)] + (["--config", str(config)] if config else []) + list(args)
        p = subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=timeout, check=False)
        if check and p.returncode != 0:
            raise AssertionError(f"{argv} failed (rc {p.returncode}):\n{p.stdout}\n{p.stderr}")
        return p

    def drop_in(self, unit: str, name: str, text: str) -> Path:
        """A drop-in for one of the installed units (a test's own setting); caller reloads."""
        d = self.unit_dir / f"{unit}.d"
        d.mkdir(parents=True, exist_ok=True)
        p = d / f"{name}.conf"
        p.write_text(text)
        return p

    def log_to(self, unit: str, path: Path) -> None:
        """Send a service's stderr (where safespawn logs) to a file: this manager has no journal."""
        self.drop_in(unit, "test-log", f"[Service]\nStandardError=append:{path}\n")


def wait_until(predicate: Callable[[], T], timeout: float = 30.0, interval: float = 0.05, what: str = "") -> T:
    deadline = time.monotonic() + timeout
    while True:
        v = predicate()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(interval)


def count_lines(path: Path, needle: str) -> int:
    try:
        return sum(1 for line in path.read_text().splitlines() if needle in line)
    except FileNotFoundError:
        return 0


SLEEPER = """\
name = "sleeper"
description = "test-only: a sidecar that only sleeps; one per --key"
command = ["/bin/sh", "-c", "exec sleep 100000", "sleeper"]
capabilities = []
netns = "forbidden"
key_from = "--key"
signals = ["HUP", "TERM", "KILL"]
stop_grace = 0
tmpfs = []

[args]
"--key" = { type = "regex", pattern = "[a-z0-9]{1,32}" }
"""

def write_config(root: Path, *, reconcile_interval: int = 60, podman: str = "podman",
                 max_sidecars: int = 256, sync_linger: float | None = None,
                 sync_resident: bool | None = None, profiles: tuple[str, ...] = ("sleeper",),
                 extra_channel: str = "") -> Broker:
    """A host config with one sleeper channel; nothing is created on disk but the config itself."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "profiles").mkdir(exist_ok=True)
    (root / "profiles" / "sleeper.toml").write_text(SLEEPER)
    channel = unique_channel("sd")
    cfg = root / "safespawn.toml"
    cfg.write_text(f'[broker]\nchannels_dir = "{root}/channels"\nstate_dir = "{root}/state"\n'
                   f'profiles_dir = "{root}/profiles"\nreconcile_interval = {reconcile_interval}\n'
                   f'podman = "{podman}"\n'
                   + (f"sync_linger = {sync_linger}\n" if sync_linger is not None else "")
                   + (f"sync_resident = {str(sync_resident).lower()}\n" if sync_resident is not None else "") + "\n"
                   f'[channels.{channel}]\nimage = "{TEST_IMAGE}"\nprofiles = {json.dumps(list(profiles))}\n'
                   f'max_sidecars = {max_sidecars}\n{extra_channel}')
    return Broker(root, channel, cfg, root / "data")
