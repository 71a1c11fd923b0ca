"""Database side of windows and the reconciler: releasing deferred jobs, counting a window's
running work, recording events, and stamping attempts with the window they ran in.

Kept out of ``store``/``transitions``: none of this is on a worker's per-job hot path except
``stamp_attempts``, which runs only for jobs that belong to a window.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from decimal import Decimal
from typing import TYPE_CHECKING

from sqlalchemy import ColumnElement, Engine, and_, bindparam, func, insert, or_, select, update
from sqlalchemy.engine import Connection

from orchestrator.db.engine import reading
from orchestrator.db.models import JobState, UTCDateTime, attempts, job_events, jobs, utcnow

if TYPE_CHECKING:
    from orchestrator.db.store import JobView

#: A bulk parent names its window too, but it holds no slot (its chunks do).
_NOT_A_BULK_PARENT = or_(jobs.c.parent_id.is_not(None), jobs.c.items_total.is_(None))
#: A bulk parent whose items are still streaming in: created running and never claimed, its
#: total unknown until the stream ends (``release_chunks``/``defer_chunks`` fix it).
STREAMING = and_(jobs.c.state == JobState.RUNNING, jobs.c.parent_id.is_(None),
                 jobs.c.items_total.is_(None), jobs.c.attempts == 0)


def is_streaming(job: JobView) -> bool:
    """``STREAMING`` for a job already read: a bulk job whose items are still coming in."""
    return (job.state == JobState.RUNNING and job.parent_id is None
            and job.items_total is None and job.attempts == 0)


class StreamGivenUp(Exception):
    """The bulk job's stream ended after the reconciler gave the job up."""


def window_load(engine: Engine, window: str) -> int:
    """How many of the window's jobs are released and not finished (queued or running)."""
    with reading(engine) as conn:
        return int(conn.execute(
            select(func.count()).select_from(jobs).where(
                jobs.c.window == window,
                jobs.c.state.in_((JobState.QUEUED, JobState.RUNNING)), _NOT_A_BULK_PARENT)
        ).scalar_one())


def deferred_counts(engine: Engine) -> dict[str, int]:
    """Window name -> jobs deferred for it."""
    with reading(engine) as conn:
        return {row.window: int(row.n) for row in conn.execute(
            select(jobs.c.window, func.count().label("n"))
            .where(jobs.c.state == JobState.DEFERRED, jobs.c.window.is_not(None))
            .group_by(jobs.c.window))}


def release(engine: Engine, window: str, limit: int | None, *, now: datetime | None = None
            ) -> list[str]:
    """Move up to ``limit`` of the window's deferred jobs to queued, best priority then oldest
    first; return their ids in that order. Conditional on ``deferred``: a job released twice
    (two schedulers) is released once."""
    now = now or utcnow()
    query = (select(jobs.c.id)
             .where(jobs.c.state == JobState.DEFERRED, jobs.c.window == window)
             .order_by(jobs.c.priority, jobs.c.created_at, jobs.c.chunk_index, jobs.c.id))
    if limit is not None:
        query = query.limit(limit)
    with engine.begin() as conn:
        ids = list(conn.execute(query).scalars())
        if not ids:
            return []
        moved = set(conn.execute(
            update(jobs).where(and_(jobs.c.id.in_(ids), jobs.c.state == JobState.DEFERRED))
            .values(state=JobState.QUEUED, queued_at=now).returning(jobs.c.id)
        ).scalars())
    return [i for i in ids if i in moved]


def record_events(engine: Engine, events: Iterable[tuple[str, str, str]], *,
                  now: datetime | None = None) -> None:
    """Insert ``(job id, event, detail)`` rows in one statement."""
    rows = [{"job_id": j, "at": now or utcnow(), "event": e, "detail": d} for j, e, d in events]
    if rows:
        with engine.begin() as conn:
            conn.execute(insert(job_events), rows)


def events(engine: Engine, job_id: str) -> list[tuple[datetime, str, str | None]]:
    with reading(engine) as conn:
        return [(r.at, r.event, r.detail) for r in conn.execute(
            select(job_events.c.at, job_events.c.event, job_events.c.detail)
            .where(job_events.c.job_id == job_id).order_by(job_events.c.id))]


def stamp_attempts(engine: Engine, stamps: Sequence[tuple[str, int, str, Decimal]]) -> None:
    """Record ``(job id, attempt number, window, price multiplier)`` on attempt rows."""
    if not stamps:
        return
    with engine.begin() as conn:
        conn.execute(
            update(attempts).where(and_(attempts.c.job_id == bindparam("s_job"),
                                        attempts.c.number == bindparam("s_number")))
            .values(window=bindparam("s_window"), price_multiplier=bindparam("s_mult")),
            [{"s_job": j, "s_number": n, "s_window": w, "s_mult": m} for j, n, w, m in stamps])


def queued_due(engine: Engine, before: datetime, limit: int) -> list[tuple[str, int]]:
    """Queued jobs due before ``before`` (bulk parents excluded): ``(id, attempts)``."""
    with reading(engine) as conn:
        return [(r.id, r.attempts) for r in conn.execute(
            select(jobs.c.id, jobs.c.attempts)
            .where(jobs.c.state == JobState.QUEUED, jobs.c.queued_at < before,
                   _NOT_A_BULK_PARENT)
            .order_by(jobs.c.priority, jobs.c.queued_at).limit(limit))]


def lease_expired(engine: Engine, before: datetime, limit: int) -> list[tuple[str, int]]:
    """Running jobs whose lease expired before ``before``: ``(id, attempts)``."""
    with reading(engine) as conn:
        return [(r.id, r.attempts) for r in conn.execute(
            select(jobs.c.id, jobs.c.attempts)
            .where(jobs.c.state == JobState.RUNNING, jobs.c.lease_expires_at < before)
            .order_by(jobs.c.lease_expires_at).limit(limit))]


def defer_chunks(engine: Engine, parent_id: str, items_total: int, window: str, *,
                 now: datetime | None = None) -> None:
    """All of a bulk job's items are in: fix its total and let its staged chunks wait for
    ``window`` (one transaction)."""
    from orchestrator.db.transitions import complete_parent

    now = now or utcnow()
    with engine.begin() as conn:
        end_stream(conn, parent_id, items_total)
        conn.execute(update(jobs).where(and_(jobs.c.parent_id == parent_id,
                                             jobs.c.state == JobState.DEFERRED))
                     .values(window=window, queued_at=now))
        complete_parent(conn, parent_id, now)


def end_stream(conn: Connection, parent_id: str, items_total: int) -> None:
    """Fix a streamed bulk job's total, unless the reconciler gave it up meanwhile.

    Raises:
        StreamGivenUp: the parent is no longer streaming; the caller's transaction rolls back.
    """
    if conn.execute(update(jobs).where(jobs.c.id == parent_id, STREAMING)
                    .values(items_total=items_total)).rowcount != 1:
        raise StreamGivenUp(parent_id)


def abandoned_streams(engine: Engine, before: datetime, limit: int
                      ) -> list[tuple[str, int, datetime]]:
    """Bulk jobs still streaming that staged nothing since ``before``: ``(id, chunks staged,
    last staged at)``, oldest first."""
    chunk = jobs.alias("chunk")
    last = func.coalesce(func.max(chunk.c.created_at), jobs.c.created_at, type_=UTCDateTime())
    with reading(engine) as conn:
        return [(r.id, int(r.staged), r.last) for r in conn.execute(
            select(jobs.c.id, func.count(chunk.c.id).label("staged"), last.label("last"))
            .select_from(jobs.outerjoin(chunk, chunk.c.parent_id == jobs.c.id))
            .where(STREAMING, jobs.c.created_at < before)
            .group_by(jobs.c.id, jobs.c.created_at)
            .having(last < before)
            .order_by(last).limit(limit))]


def give_up_stream(engine: Engine, parent_id: str, before: datetime, error: str, *,
                   now: datetime | None = None) -> bool:
    """Fail a bulk job whose stream staged nothing since ``before`` and drop its staged chunks
    (none ever ran: they wait, unreleased, for the stream's end). False if it streamed again
    or ended meanwhile. One transaction."""
    chunk = jobs.alias("chunk")
    fresh = select(chunk.c.id).where(chunk.c.parent_id == parent_id,
                                     chunk.c.created_at >= before).exists()
    with engine.begin() as conn:
        failed = conn.execute(
            update(jobs).where(jobs.c.id == parent_id, STREAMING, ~fresh)
            .values(state=JobState.FAILED, finished_at=now or utcnow(), error=error)).rowcount
        if failed != 1:
            return False
        conn.execute(jobs.delete().where(staged_chunks(parent_id)))
        return True


def staged_chunks(parent_id: str) -> ColumnElement[bool]:
    """A bulk job's chunks staged while its stream is read (not released, no window yet)."""
    return and_(jobs.c.parent_id == parent_id, jobs.c.state == JobState.DEFERRED,
                jobs.c.window.is_(None))
