"""A real broker for tests: its own config, channel dirs, state dir and podman label namespace.

    with Broker.make(tmp_path, profiles=["dnsmasq"]) as b:
        rid = b.write(client.start_request("dnsmasq", argv, netns=ns))   # as the agent would
        b.sync()                                                         # as the path unit would
        reply = b.reply(rid)

Each Broker uses a unique channel name, so its sidecars (label safespawn.channel=NAME) never mix with
another test's, and teardown removes every container it labelled.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safespawn.agent import client
from safespawn.broker import budget
from safespawn.broker.engine import Engine
from safespawn.broker.inbox import create_channel_dirs
from safespawn.config import load_config
from safespawn.runtime.command import RuntimeCli
from safespawn.runtime.podman import cgroup_host_of

if TYPE_CHECKING:
    from support.dockerd import PrivateDockerd

TEST_IMAGE = os.environ.get("SAFESPAWN_TEST_IMAGE", "localhost/safespawn-test:latest")
REPO = Path(__file__).resolve().parents[2]


def remove_budget_cgroups(channel: str) -> None:
    """The channel's budget cgroups (safespawn.broker.budget), once its containers are gone: bottom-up."""
    global _CGROUP_HOST
    if _CGROUP_HOST is None:
        try:
            _CGROUP_HOST = cgroup_host_of(RuntimeCli("podman", "podman"))
        except Exception:
            return
    deadline = time.monotonic() + 5
    while not budget.remove(_CGROUP_HOST, channel) and time.monotonic() < deadline:
        time.sleep(0.1)  # conmon outlives `podman rm` briefly


_CGROUP_HOST: budget.CgroupHost | None = None


def unique_channel(prefix: str = "t") -> str:
    return f"{prefix}{secrets.token_hex(4)}"


@dataclass
class Broker:
    root: Path
    channel: str
    config_path: Path
    data_dir: Path
    extra_channels: list[str] = field(default_factory=list)
    dockerd: PrivateDockerd | None = None  # set: the broker runs its sidecars with this Docker daemon
    _engine: Engine | None = None
    _watch: subprocess.Popen[bytes] | None = None

    @classmethod
    def make(cls, root: Path, profiles: list[str] | None = None, channels: int = 1, image: str = TEST_IMAGE,
             extra: str = "", broker_extra: str = "", dockerd: PrivateDockerd | None = None,
             lay_out: bool = True) -> Broker:
        root.mkdir(parents=True, exist_ok=True)
        data = root / "data"
        data.mkdir(exist_ok=True)
        names = [unique_channel() for _ in range(channels)]
        profs = json.dumps(profiles or ["dnsmasq"])
        if dockerd is not None:
            from support.dockerd import DOCKER

            broker_extra = f'runtime = "docker"\ndocker = "{DOCKER}"\ndocker_host = "{dockerd.host}"\n{broker_extra}'
        text = (f'[broker]\nchannels_dir = "{root}/channels"\nstate_dir = "{root}/state"\n'
                f'profiles_dir = "{root}/profiles"\n{broker_extra}\n')
        for n in names:
            text += (f'[channels.{n}]\nimage = "{image}"\nprofiles = {profs}\ndata_dirs = ["{data}"]\n{extra}\n')
        cfg = root / "safespawn.toml"
        cfg.write_text(text)
        for n in names if lay_out else ():
            create_channel_dirs(str(root / "channels" / n))
        return cls(root, names[0], cfg, data, names[1:], dockerd)

    # -- the host side -------------------------------------------------------------------------
    @property
    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = Engine(load_config(str(self.config_path)))
        return self._engine

    def sync(self, channel: str | None = None) -> Any:
        return self.engine.sync(channel or self.channel)

    def cli(self, *args: str, timeout: float = 120, check: bool = False) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ, SAFESPAWN_CONFIG=str(self.config_path))
        return subprocess.run([sys.executable, "-m", "safespawn.cli", *args], capture_output=True, text=True,
                              timeout=timeout, env=env, check=check)

    def start_watch(self, *args: str) -> None:
        env = dict(os.environ, SAFESPAWN_CONFIG=str(self.config_path))
        self._watch = subprocess.Popen([sys.executable, "-m", "safespawn.cli", "watch", "--interval", "0.02", *args],
                                       env=env, stdout=subprocess.DEVNULL, stderr=open(self.root / "watch.log", "ab"))

    def stop_watch(self) -> int | None:
        if self._watch is None:
            return None
        self._watch.terminate()
        try:
            return self._watch.wait(timeout=30)
        finally:
            self._watch = None

    # -- the agent side ------------------------------------------------------------------------
    def channel_dir(self, channel: str | None = None) -> Path:
        return self.root / "channels" / (channel or self.channel)

    def write(self, request: dict[str, Any], channel: str | None = None) -> str:
        client._write_request(str(self.channel_dir(channel)), request)
        return str(request["id"])

    def write_raw(self, name: str, data: bytes, channel: str | None = None) -> Path:
        p = self.channel_dir(channel) / "inbox" / "new" / name
        p.write_bytes(data)
        return p

    def reply(self, rid: str, channel: str | None = None) -> dict[str, Any] | None:
        p = self.channel_dir(channel) / "outbox" / "replies" / f"{rid}.json"
        return json.loads(p.read_text()) if p.exists() else None

    def request(self, request: dict[str, Any], channel: str | None = None) -> dict[str, Any]:
        """Write a request, sync once, return its reply (which must exist)."""
        rid = self.write(request, channel)
        self.sync(channel)
        r = self.reply(rid, channel)
        assert r is not None, f"no reply for {rid}"
        return r

    def submit(self, request: dict[str, Any], timeout: float = 60, channel: str | None = None) -> dict[str, Any]:
        """The real client (blocking) while a thread syncs, as a path unit would."""
        stop = threading.Event()

        def syncer() -> None:
            while not stop.is_set():
                self.sync(channel)
                time.sleep(0.02)

        t = threading.Thread(target=syncer, daemon=True)
        t.start()
        try:
            return client.submit(str(self.channel_dir(channel)), request, timeout=timeout)
        finally:
            stop.set()
            t.join()

    def pending(self, channel: str | None = None) -> list[str]:
        return os.listdir(self.channel_dir(channel) / "inbox" / "new")

    def audit(self, channel: str | None = None) -> list[dict[str, Any]]:
        p = self.root / "state" / (channel or self.channel) / "audit.log"
        return [json.loads(line) for line in p.read_text().splitlines()] if p.exists() else []

    def desired(self, channel: str | None = None) -> dict[str, Any]:
        p = self.root / "state" / (channel or self.channel) / "desired.json"
        return {d["name"]: d for d in json.loads(p.read_text())["sidecars"]} if p.exists() else {}

    # -- podman --------------------------------------------------------------------------------
    def containers(self, channel: str | None = None) -> list[dict[str, Any]]:
        """The channel's containers as `podman ps --format json` shows them (Id, Names, State, Pid)."""
        if self.dockerd is not None:
            return self.dockerd.ps(f"safespawn.channel={channel or self.channel}")
        out = subprocess.run(["podman", "ps", "-a", "--format", "json", "--filter",
                              f"label=safespawn.channel={channel or self.channel}"],
                             capture_output=True, text=True, timeout=60, check=True).stdout
        return json.loads(out or "[]")

    def cleanup(self) -> None:
        self.stop_watch()
        for ch in [self.channel, *self.extra_channels]:
            if self.dockerd is not None:
                self.dockerd.rm_by_label(f"safespawn.channel={ch}")
                continue
            ids = [c["Id"] for c in self.containers(ch)]
            if ids:
                subprocess.run(["podman", "rm", "-f", "-t", "0", *ids], capture_output=True, timeout=120,
                               check=False)
            remove_budget_cgroups(ch)

    def __enter__(self) -> Broker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
