"""The publish phase: the desired state after a batch, then the replies, durably and in that order
(the ledger's "done" records, the replies, then the requests are removed).
"""

from __future__ import annotations

from ..runtime import Container
from . import metrics, pidsignal
from .audit import AuditLog
from .inbox import ChannelDir
from .intake import _age
from .policy import Remove, Start, Stop
from .state import ChannelState, DesiredSidecar, Done
from .sync import Answered, Outcome, SyncContext

# -- publish -------------------------------------------------------------------------------------


def update_desired(state: ChannelState, outcomes: list[Outcome], now: float) -> None:
    """The desired state after a batch: what started is desired, what stopped is not."""
    for o in outcomes:
        d = o.decision
        if isinstance(d, Start) and o.reply.ok:
            req = o.incoming.request
            old = state.desired.get(d.target)
            if old is None or old.argv != req.argv or old.netns != req.netns or o.started:
                state.desired[d.target] = DesiredSidecar(d.target, d.spec.profile, req.netns, req.argv,
                                                         req.id, now)
        elif (isinstance(d, Start) and o.started) or (isinstance(d, Stop | Remove) and o.reply.ok):
            # a start that created a container but failed, or a successful stop/kill
            state.desired.pop(d.target, None)


def record_processes(state: ChannelState, outcomes: list[Outcome], containers: dict[str, Container]) -> None:
    """Record the container and process each verified start runs as (the signal fast path's
    identity, pidsignal.py)."""
    for o in outcomes:
        d = o.decision
        if isinstance(d, Start) and o.reply.ok:
            c = containers.get(d.target)
            desired = state.desired.get(d.target)
            if c is None or desired is None or not c.running:
                continue
            if desired.identity is not None and desired.pid == c.pid and desired.container_id == c.id \
                    and desired.spec_hash == d.spec.spec_hash and desired.started_at == c.started:
                continue
            state.desired[d.target] = desired.running_as(pidsignal.identify(c.pid, c.id), d.spec.spec_hash,
                                                         c.started)


def publish(s: SyncContext, chan: ChannelDir, answered: list[Answered], outcomes: list[Outcome]) -> None:
    """Record the replies durably, publish them, then remove the requests."""
    for o in outcomes:
        _audit_outcome(s.audit, o)
        if not o.reply.ok:
            s.result.refused += 1
    s.audit.flush()
    s.state.complete([Done(a.rid, a.digest, a.reply.to_dict()) for a in answered]
                     + [Done(o.incoming.request.id, o.incoming.digest, o.reply.to_dict()) for o in outcomes])
    for a in answered:
        chan.write_reply(a.reply.to_dict())
    for o in outcomes:
        chan.write_reply(o.reply.to_dict())
    chan.sync_replies()
    for o in outcomes:
        chan.remove(o.incoming.entry)
        s.result.replies.append(metrics.ReplyObservation(o.incoming.request.op, "allowed" if o.reply.ok else "refused",
                                                 o.reply.error.code if o.reply.error else "",
                                                 _age(o.incoming.entry)))
    s.result.handled += len(outcomes) + len(answered)
    s.result.refused += len(answered)


def _audit_outcome(audit: AuditLog, o: Outcome) -> None:
    r = o.reply
    req = o.incoming.request
    audit.record("allow" if r.ok else "deny", req.id, "" if r.ok else (r.error.message if r.error else ""),
                 code=r.error.code if r.error else None, op=req.op, profile=req.profile, netns=req.netns,
                 sidecar=r.sidecar, pid=r.pid, signal=req.signal,
                 argv=list(req.argv) if req.op == "start" else None)
