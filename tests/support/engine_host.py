"""A channel served by a real Engine over the in-memory runtime, for unit tests (no root).

    host = Host(tmp_path, max_sidecars=2)       # channel options as in safespawn.toml
    reply = host.ask(host.start("a"))           # write a request as the agent would, sync, read the reply
"""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path
from typing import Any

from safespawn.agent import client
from safespawn.broker.engine import Engine
from safespawn.broker.inbox import create_channel_dirs
from safespawn.broker.policy import Policy, parse_profile
from safespawn.broker.state import ChannelState
from safespawn.broker.sync import SyncResult
from safespawn.config import parse_config
from support.fake_runtime import FakeRuntime

CH = "ch"
SLEEPER = tomllib.loads("""
name = "sleeper"
command = ["/bin/sh", "-c", "exec sleep 100000", "sleeper"]
netns = "forbidden"
key_from = "--key"
signals = ["HUP", "TERM", "KILL"]
stop_grace = 3
tmpfs = []

[args]
"--key" = { type = "regex", pattern = "[a-z0-9]{1,32}" }
"--verbose" = {}
""")


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


class Host:
    """One channel served by a real Engine over the fake runtime."""

    def __init__(self, root: Path, lay_out: bool = True, **channel: Any) -> None:
        self.root = root
        self.cfg = parse_config({
            "broker": {"channels_dir": str(root / "channels"), "state_dir": str(root / "state"),
                       "profiles_dir": str(root / "profiles"), "start_settle_ms": 0},
            "channels": {CH: {"image": "localhost/x:1", "profiles": ["sleeper"], "agent_uid": os.getuid(),
                              "agent_gid": os.getgid(), **channel}},
        })
        if lay_out:
            create_channel_dirs(str(self.chdir), os.getuid(), os.getgid())
        self.rt = FakeRuntime()
        self.clock = Clock()
        self.engine = self.new_engine()

    def new_engine(self) -> Engine:
        """A fresh broker process (after a crash): nothing carried over but the files."""
        policy = Policy(self.cfg, profiles={"sleeper": parse_profile(SLEEPER, "sleeper")})
        return Engine(self.cfg, runtime=self.rt, policy=policy, clock=self.clock)

    @property
    def chdir(self) -> Path:
        return self.root / "channels" / CH

    def write(self, req: dict[str, Any]) -> str:
        client._write_request(str(self.chdir), req)
        return str(req["id"])

    def start(self, key: str, *extra: str) -> dict[str, Any]:
        return client.start_request("sleeper", [f"--key={key}", *extra])

    def sync(self, **kw: Any) -> SyncResult:
        return self.engine.sync(CH, **kw)

    def reply(self, rid: str) -> dict[str, Any] | None:
        p = self.chdir / "outbox" / "replies" / f"{rid}.json"
        return json.loads(p.read_text()) if p.exists() else None

    def ask(self, req: dict[str, Any]) -> dict[str, Any]:
        rid = self.write(req)
        self.sync()
        r = self.reply(rid)
        assert r is not None, f"no reply for {rid}"
        return r

    def pending(self) -> list[str]:
        return os.listdir(self.chdir / "inbox" / "new")

    def state(self) -> ChannelState:
        st = ChannelState.of(self.cfg.broker.state_dir, CH)
        st.load()
        return st

    def audit(self) -> list[dict[str, Any]]:
        p = Path(self.state().audit_path)
        return [json.loads(line) for line in p.read_text().splitlines()] if p.exists() else []

    def running(self) -> list[str]:
        return sorted(n for n, c in self.rt.containers.items() if c.running)
