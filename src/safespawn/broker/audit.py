"""The audit log: one JSON line per decision, host-private, per channel.

    {"t": "2026-11-29T05:00:00Z", "channel": "neutron-dhcp", "id": "...", "op": "start",
     "decision": "deny", "code": "policy_denied", "reason": "...", "sidecar": null}
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import deque
from typing import Any

from .files import append_line

log = logging.getLogger("safespawn.audit")
MAX_BYTES = 16 << 20  # rotate to audit.log.1 past this size


class AuditLog:
    def __init__(self, path: str, channel: str) -> None:
        self.path = path
        self.channel = channel
        self._lines: list[bytes] = []

    def record(self, decision: str, rid: str | None, reason: str = "", code: str | None = None,
               **fields: Any) -> None:
        entry: dict[str, Any] = {
            "t": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "channel": self.channel,
            "id": rid,
            "decision": decision,
        }
        if code:
            entry["code"] = code
        if reason:
            entry["reason"] = reason[:500]
        entry.update({k: v for k, v in fields.items() if v is not None})
        self._lines.append(json.dumps(entry, separators=(",", ":")).encode() + b"\n")
        lvl = logging.INFO if decision in ("allow", "replay", "reconcile") else logging.WARNING
        log.log(lvl, "%s %s %s %s", self.channel, decision, rid or "-", reason or entry.get("sidecar", ""))

    def flush(self) -> None:
        """Write what was recorded; called before the replies are published."""
        if not self._lines:
            return
        try:
            if os.stat(self.path).st_size > MAX_BYTES:
                os.replace(self.path, self.path + ".1")
        except FileNotFoundError:
            pass
        append_line(self.path, b"".join(self._lines), fsync=True)
        self._lines.clear()


def read_recent(path: str, limit: int = 20, decisions: tuple[str, ...] = ("deny", "quarantine")) -> list[
        dict[str, Any]]:
    """The last `limit` entries with one of `decisions`."""
    out: deque[dict[str, Any]] = deque(maxlen=limit)
    try:
        with open(path, "rb") as f:
            for raw in f:
                try:
                    e = json.loads(raw)
                except ValueError:
                    continue
                if isinstance(e, dict) and e.get("decision") in decisions:
                    out.append(e)
    except FileNotFoundError:
        pass
    return list(out)
