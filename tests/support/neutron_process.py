"""A Neutron agent process driven line by line over stdin/stdout (tests/neutron/neutron_agent.py's protocol).

    agent = AgentProcess([python, "tests/neutron/neutron_class_agent.py"], env, log)
    agent("dhcp_start", network_id=..., ...)   # -> {"ok": True, ...}; AssertionError with the log otherwise

The argv may be anything that speaks the protocol: the script on the host, the script through the
`safespawn-neutron` launcher, or `podman run -i ...` of an agent container.
"""

from __future__ import annotations

import json
import queue
import subprocess
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

NEUTRON_TESTS = Path(__file__).resolve().parents[1] / "neutron"


class AgentProcess:
    def __init__(self, argv: Sequence[str], env: dict[str, str], log: Path, ready_timeout: float = 120) -> None:
        self.log = log
        self.proc = subprocess.Popen(list(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=open(log, "ab"), env=env, text=True, cwd="/")
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        assert self._reply(ready_timeout).get("ready"), "the Neutron agent did not start"

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("{"):
                self.lines.put(line)

    def _reply(self, timeout: float) -> dict[str, Any]:
        try:
            return dict(json.loads(self.lines.get(timeout=timeout)))
        except queue.Empty:
            raise AssertionError(f"no answer from the Neutron agent in {timeout}s; log:\n"
                                 f"{self.log.read_text()[-3000:]}") from None

    def __call__(self, op: str, timeout: float = 120, **args: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self.proc.stdin.flush()
        r = self._reply(timeout)
        assert r["ok"], f"{op} failed in Neutron:\n{r.get('error')}\nagent log:\n{self.log.read_text()[-3000:]}"
        return r

    def stop(self, timeout: float = 30) -> None:
        """The agent goes away (a restart or an upgrade); its sidecars must not."""
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            try:
                self.proc.stdin.close()
            except OSError:
                pass
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
