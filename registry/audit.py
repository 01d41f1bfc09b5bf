"""The application half of the append-only promotion log (the database triggers are the other)."""

from __future__ import annotations

from sqlalchemy import Delete, Update, event
from sqlalchemy.orm import Session

from registry.errors import AppendOnlyError
from registry.schema import PromotionEvent

_MESSAGE = "promotion events are append-only: record a new event instead of changing one"


@event.listens_for(Session, "before_flush")
def _refuse_changed_events(session: Session, _context, _instances) -> None:
    for obj in list(session.dirty) + list(session.deleted):
        if isinstance(obj, PromotionEvent) and (obj in session.deleted or session.is_modified(obj)):
            raise AppendOnlyError(_MESSAGE)


@event.listens_for(Session, "do_orm_execute")
def _refuse_bulk_changes(state) -> None:
    statement = state.statement
    if isinstance(statement, (Update, Delete)) and statement.table.name == PromotionEvent.__tablename__:
        raise AppendOnlyError(_MESSAGE)
