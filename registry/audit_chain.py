"""The promotion log as a hash chain: each event carries the sha256 of its canonical content chained with the
previous event's hash, as Certificate Transparency and Rekor chain their entries.

    event_hash = sha256("mergeyard-audit-v1" ‖ prev_hash ‖ canonical JSON of the event)

The canonical content names models by digest (not by row id), so pointing an event at another model breaks it
as surely as editing its numbers. `seq` is the event's place in the chain (unique: two writers racing for the
same place cannot both land; the loser appends after the winner). Verification walks the chain and names the
first event that was edited (its hash no longer matches), inserted or removed (its predecessor is not the one
its hash chains to), or reordered (it chains to a later event). Anyone holding the log can verify it; to catch a
rewrite of the whole chain or a cut tail, the head (seq and hash) is also written to MLflow as a witness, and
`mergeyard audit --head` prints it for a team to publish wherever it keeps such things.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone

from sqlalchemy import select, text
from sqlalchemy.orm import Session

from registry.schema import Model, PromotionEvent

GENESIS = "0" * 64
DOMAIN = b"mergeyard-audit-v1"


def _timestamp(dt: datetime) -> str:
    """A timestamp as every database returns it the same way: UTC, microseconds, no zone suffix."""
    if dt.tzinfo is not None:
        dt = dt.astimezone(timezone.utc).replace(tzinfo=None)
    return dt.isoformat(timespec="microseconds")


def canonical(event: PromotionEvent, model_digest: str, previous_digest: str | None) -> bytes:
    content = {"seq": event.seq, "model": model_digest, "model_name": event.model_name, "alias": event.alias,
               "previous": previous_digest, "decision": event.decision, "gate": event.gate, "actor": event.actor,
               "reason": event.reason, "created_at": _timestamp(event.created_at)}
    return json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def event_hash(prev_hash: str, content: bytes) -> str:
    return hashlib.sha256(DOMAIN + prev_hash.encode() + content).hexdigest()


def _digests(session: Session, ids: set[int | None]) -> dict[int, str]:
    ids = {i for i in ids if i is not None}
    return dict(session.execute(select(Model.id, Model.digest).where(Model.id.in_(ids))).all()) if ids else {}


def seal(session: Session, event: PromotionEvent) -> None:
    """Give a new event its place in the chain and its hash (before it is flushed)."""
    last = session.scalar(select(PromotionEvent).where(PromotionEvent.seq.is_not(None))
                          .order_by(PromotionEvent.seq.desc()).limit(1))
    event.seq = (last.seq + 1) if last is not None else 1
    event.prev_hash = last.event_hash if last is not None else GENESIS
    if event.created_at is None:
        from registry.schema import utcnow

        event.created_at = utcnow()
    digests = _digests(session, {event.model_id, event.previous_model_id})
    event.event_hash = event_hash(event.prev_hash, canonical(event, digests.get(event.model_id, ""),
                                                             digests.get(event.previous_model_id)))


def rechain(connection) -> int:
    """Chain every event in `id` order anew, by plain SQL (what migration 0004 does once for events written before
    the chain existed; also what anyone who can write the database could do, which the MLflow witness catches).
    The append-only triggers must be off. Returns how many events were chained."""
    from sqlalchemy.orm import Session as OrmSession

    with OrmSession(bind=connection) as session:
        events = session.scalars(select(PromotionEvent).order_by(PromotionEvent.id)).all()
        digests = _digests(session, {e.model_id for e in events} | {e.previous_model_id for e in events})
        rows, prev = [], GENESIS
        for seq, e in enumerate(events, start=1):
            e.seq = seq  # on the detached copy only: the content hashed includes the place
            h = event_hash(prev, canonical(e, digests.get(e.model_id, ""), digests.get(e.previous_model_id)))
            rows.append({"id": e.id, "seq": seq, "prev": prev, "hash": h})
            prev = h
        session.expunge_all()
    table = PromotionEvent.__table__
    connection.execute(table.update().values(seq=None))  # no unique clash while places move
    for row in rows:
        connection.execute(table.update().where(table.c.id == row["id"])
                           .values(seq=row["seq"], prev_hash=row["prev"], event_hash=row["hash"]))
    return len(rows)


def log_name(registry) -> str:
    """The name the witness keeps a log's head under: its database, by URL (without a password). Not its content,
    which whoever rewrites the log controls; two registries sharing one MLflow keep two witnesses."""
    url = registry.engine.url.render_as_string(hide_password=True)
    return hashlib.sha256(url.encode()).hexdigest()


def intact(session: Session, event: PromotionEvent) -> bool:
    """Whether one event's hash still matches its content (what alias resolution checks, in O(1))."""
    digests = _digests(session, {event.model_id, event.previous_model_id})
    if event.event_hash is None or event.prev_hash is None or event.seq is None:
        return False
    return event.event_hash == event_hash(event.prev_hash, canonical(event, digests.get(event.model_id, ""),
                                                                     digests.get(event.previous_model_id)))


@dataclass
class Problem:
    event_id: int
    seq: int | None
    kind: str  # edited | inserted | removed | reordered | witness | unchained
    detail: str


@dataclass
class ChainReport:
    events: int
    head: str  # the last event's hash (GENESIS for an empty log)
    head_seq: int
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def chain_broken(self) -> bool:
        """A break in the chain itself (a row outside it is reported, but the chain still stands)."""
        return any(p.kind != "unchained" for p in self.problems)

    def as_dict(self) -> dict:
        return {"ok": self.ok, "events": self.events, "head": self.head, "head_seq": self.head_seq,
                "problems": [vars(p) for p in self.problems]}


def verify(session: Session, witness: tuple[int, str] | None = None) -> ChainReport:
    """Walk the chain in `seq` order (ties and gaps in `id` order reveal rewrites too) and report the first break."""
    events = session.scalars(select(PromotionEvent).order_by(PromotionEvent.id)).all()
    digests = _digests(session, {e.model_id for e in events} | {e.previous_model_id for e in events})
    by_hash = {e.event_hash: e for e in events if e.event_hash}
    previous_hash, previous_seq = GENESIS, 0
    report = ChainReport(len(events), GENESIS, 0)
    unchained = [e for e in events if e.event_hash is None or e.prev_hash is None or e.seq is None]
    for e in unchained:  # reported, and passed over: a row outside the chain cannot break (or wedge) it
        report.problems.append(Problem(e.id, e.seq, "unchained", "it carries no place in the chain: it was written "
                                       "into the table directly, not appended by mergeyard; nothing reads it"))
    events = [e for e in events if e not in unchained]
    for position, e in enumerate(events):
        content = canonical(e, digests.get(e.model_id, ""), digests.get(e.previous_model_id))
        if e.event_hash != event_hash(e.prev_hash, content):
            report.problems.append(Problem(e.id, e.seq, "edited", "its content no longer matches its hash: it was "
                                           "changed after it was written"))
            break
        if e.prev_hash != previous_hash or e.seq != previous_seq + 1:
            target = by_hash.get(e.prev_hash)
            if target is not None and events.index(target) > position:
                kind, detail = "reordered", f"it chains to event {target.id}, which stands after it"
            elif target is None and e.prev_hash != GENESIS:
                kind, detail = "removed", "the event it chains to is gone: an event before it was deleted"
            else:
                kind, detail = "inserted", (f"it chains to event {target.id if target else 'genesis'}, but the "
                                            f"event before it is {events[position - 1].id if position else 'none'}: "
                                            "an event was inserted before it")
            report.problems.append(Problem(e.id, e.seq, kind, detail))
            break
        previous_hash, previous_seq = e.event_hash, e.seq
    report.head, report.head_seq = previous_hash, previous_seq
    if not report.chain_broken and witness is not None:
        seq, head = witness
        at = next((e for e in events if e.seq == seq), None)
        if seq > report.head_seq:
            report.problems.append(Problem(events[-1].id if events else 0, report.head_seq, "removed",
                                           f"the witness saw {seq} events, the log holds {report.head_seq}: "
                                           "events were cut from its end"))
        elif seq < report.head_seq:
            extra = next(e for e in events if e.seq == seq + 1)
            report.problems.append(Problem(extra.id, extra.seq, "inserted",
                                           f"the witness saw {seq} events, the log holds {report.head_seq}: "
                                           "events were appended without mergeyard"))
        elif at is None or at.event_hash != head:
            report.problems.append(Problem(at.id if at else 0, seq, "witness",
                                           f"event {seq} is not the one the witness saw: the chain was rewritten"))
    return report


def effective_witness(session: Session, mirror, chain: str) -> tuple[int, str] | None:
    """MLflow's witness of the chain's head. A pending head (a promote killed between its commit and moving the
    witness, or one in flight) counts when the log's last event is exactly it: the commit happened."""
    witness, pending = mirror.audit_head(chain), mirror.audit_pending(chain)
    if pending is not None:
        last = session.scalar(select(PromotionEvent).where(PromotionEvent.seq.is_not(None))
                              .order_by(PromotionEvent.seq.desc()).limit(1))
        if last is not None and (last.seq, last.event_hash) == pending:
            return pending
    return witness


def walk(session: Session, since: tuple[int, str] | None = None) -> tuple[int, str, Problem | None]:
    """The chain's head (seq, hash) walked from `since` (an event verified before: only what came after it is read,
    so checking the head stays cheap however long the log grows), or the first break after it."""
    start_seq, start_hash = since or (0, GENESIS)
    if start_seq:
        anchor = session.scalar(select(PromotionEvent).where(PromotionEvent.seq == start_seq))
        if anchor is None or anchor.event_hash != start_hash or not intact(session, anchor):
            return start_seq, start_hash, Problem(anchor.id if anchor else 0, start_seq, "edited",
                                                  "the event verified last was changed or removed")
    events = session.scalars(select(PromotionEvent).where(PromotionEvent.seq > start_seq)
                             .order_by(PromotionEvent.seq)).all()
    digests = _digests(session, {e.model_id for e in events} | {e.previous_model_id for e in events})
    seq, head = start_seq, start_hash
    for e in events:
        if e.event_hash is None or e.prev_hash is None or e.prev_hash != head or e.seq != seq + 1:
            return seq, head, Problem(e.id, e.seq, "removed" if e.seq != seq + 1 else "inserted",
                                      f"event {e.seq} does not follow event {seq}")
        if e.event_hash != event_hash(e.prev_hash, canonical(e, digests.get(e.model_id, ""),
                                                             digests.get(e.previous_model_id))):
            return seq, head, Problem(e.id, e.seq, "edited", "its content no longer matches its hash")
        seq, head = e.seq, e.event_hash
    return seq, head, None


CHAIN_LOCK = 0x6D657267  # "merg": the audit chain's advisory lock on PostgreSQL


def lock_chain(s) -> None:
    """One appender at a time: on PostgreSQL an advisory lock held to the commit; on SQLite the write lock, taken
    now by a write that changes nothing (others wait on the busy timeout), so the chain's next place and the
    alias's holder read below stay what they are until this event commits."""
    if s.bind.dialect.name == "postgresql":
        s.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": CHAIN_LOCK})
    else:
        s.execute(text("UPDATE models SET id = id WHERE 0"))
