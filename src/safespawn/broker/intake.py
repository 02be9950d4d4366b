"""The intake phase: read each inbox entry safely, check its id against the ledger, parse it.

Everything here is hostile input. What it hands on is an `Intake` (sync.py): the parsed requests
(`Incoming`) and the entries answered at once (`Answered`); the rest is quarantined or answered
from the ledger.
"""

from __future__ import annotations

import hashlib
import time

from ..errors import BadRequest, SafespawnError
from . import metrics
from .inbox import ChannelDir, Entry
from .policy import IdVerdict, judge_id
from .request import Reply, parse_request
from .sync import Answered, Incoming, Intake, SyncContext

# -- intake ------------------------------------------------------------------------------------


def _quarantine(s: SyncContext, chan: ChannelDir, entry: Entry, rid: str | None, reason: str,
                code: str = "bad_request", replied: bool = False) -> None:
    where = chan.quarantine(entry)
    s.audit.record("quarantine", rid, reason, code=code, file=where)
    s.result.quarantined += 1
    s.result.replies.append(metrics.ReplyObservation("unknown", "quarantined", code, _age(entry) if replied else None))


def _age(entry: Entry) -> float | None:
    """Seconds since the agent wrote the entry (its mtime); None when unknown or implausible.

    The agent sets the mtime: one in the future counts as 0, one over a day old is not observed.
    """
    if not entry.mtime_ns:
        return None
    age = max(0.0, time.time() - entry.mtime_ns / 1e9)
    return age if age <= 86400 else None


def intake(s: SyncContext, chan: ChannelDir, entries: list[Entry]) -> Intake:
    """Read, check against the ledger and parse each entry; everything here is hostile input."""
    taken = Intake()
    for entry in entries:
        if entry.rid is None:
            _quarantine(s, chan, entry, None, f"inbox entry {entry.name[:80]!r} is not named ID.json")
            continue
        prior = s.state.ledger.get(entry.rid)
        try:
            raw = chan.read(entry, s.channel.max_request_bytes)
        except FileNotFoundError:
            continue  # withdrawn by the client after its timeout
        except (SafespawnError, OSError) as e:
            err = e if isinstance(e, SafespawnError) else BadRequest(f"unreadable inbox entry: {e.strerror}")
            if judge_id(prior, None) is IdVerdict.ANSWERED:
                # DENY: an id that was already answered keeps its first reply.
                _quarantine(s, chan, entry, entry.rid, f"{err.message} (id already answered)", err.code.value)
                continue
            _quarantine(s, chan, entry, entry.rid, err.message, err.code.value, replied=True)
            taken.answered.append(Answered(entry.rid, "", Reply.failure(entry.rid, err.code, err.message)))
            continue
        digest = hashlib.sha256(raw).hexdigest()
        verdict = judge_id(prior, digest)
        if verdict is IdVerdict.REPLAY:
            assert prior is not None and prior.reply is not None  # what REPLAY means
            if not chan.has_reply(entry.rid):
                chan.write_reply(prior.reply)
            chan.remove(entry)
            s.audit.record("replay", entry.rid, "answered from the ledger")
            s.result.replayed += 1
            s.result.replies.append(metrics.ReplyObservation("unknown", "replayed", "", _age(entry)))
            continue
        if verdict is IdVerdict.ANSWERED:
            _quarantine(s, chan, entry, entry.rid, "id collides with an earlier request")
            continue
        try:
            req = parse_request(raw, entry.rid)
        except BadRequest as e:
            _quarantine(s, chan, entry, entry.rid, e.message, e.code.value, replied=True)
            taken.answered.append(Answered(entry.rid, digest, Reply.failure(entry.rid, e.code, e.message)))
            continue
        taken.incoming.append(Incoming(entry, req, digest, verdict is IdVerdict.INTERRUPTED))
    return taken
