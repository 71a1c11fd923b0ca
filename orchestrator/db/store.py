"""The job store: submits, reads and control; the worker's transitions are in ``transitions``.

Every state change is a conditional UPDATE on (id, state, attempt). Hot paths use Core
statements, not the ORM.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    Engine,
    and_,
    bindparam,
    insert,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from orchestrator.costs.charge import Charge
from orchestrator.db.deferral import end_stream, staged_chunks
from orchestrator.db.engine import reading
from orchestrator.db.models import JobState, UTCDateTime, attempts, jobs, tenants, utcnow
from orchestrator.db.transitions import Claim, Finish, Transitions, complete_parent

__all__ = ["AttemptView", "Claim", "Finish", "JobStore", "JobView", "NewJob", "utcnow"]


def new_job_id() -> str:
    return str(uuid.uuid4())


@dataclass(frozen=True)
class JobView:
    """A job as read from the database."""

    id: str
    tenant: str
    kind: str
    tier: str
    state: str
    priority: int
    idempotency_key: str | None
    payload: dict[str, Any]
    result: Any
    result_ref: str | None
    error: str | None
    attempts: int
    max_attempts: int
    preemptions: int
    created_at: datetime
    queued_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    lease_expires_at: datetime | None
    deadline: datetime | None
    parent_id: str | None
    items_total: int | None
    items_done: int
    chunk_index: int | None
    batch_id: str | None
    batch_size: int | None
    queue_seconds: float | None
    cpu_seconds: float
    wall_seconds: float
    items: int
    cost: Decimal | None
    window: str | None = None

    @property
    def terminal(self) -> bool:
        return self.state in JobState.TERMINAL

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        for key, value in out.items():
            if isinstance(value, datetime):
                out[key] = value.isoformat()
            elif isinstance(value, Decimal):
                out[key] = str(value)
        return out


@dataclass(frozen=True)
class AttemptView:
    number: int
    worker: str
    started_at: datetime
    finished_at: datetime | None
    outcome: str
    error: str | None
    cpu_seconds: float | None
    wall_seconds: float | None

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("started_at", "finished_at"):
            out[key] = out[key].isoformat() if out[key] else None
        return out


@dataclass(frozen=True)
class NewJob:
    tenant: str
    kind: str
    tier: str
    priority: int
    payload: dict[str, Any]
    max_attempts: int
    idempotency_key: str | None = None
    deadline: datetime | None = None
    parent_id: str | None = None
    items_total: int | None = None
    chunk_index: int | None = None
    state: str = JobState.QUEUED
    window: str | None = None


_JOB_COLUMNS = [jobs.c[name] for name in JobView.__dataclass_fields__]
_NOW = bindparam("now", type_=UTCDateTime())
#: Built once (bindparams), not per submit: statement construction is most of its client CPU.
_INSERT_JOB = insert(jobs).values(
    id=bindparam("id"), tenant=bindparam("tenant"), kind=bindparam("kind"),
    tier=bindparam("tier"), state=bindparam("state"), priority=bindparam("priority"),
    idempotency_key=bindparam("idempotency_key"),
    payload=bindparam("payload", type_=jobs.c.payload.type), attempts=0,
    max_attempts=bindparam("max_attempts"), preemptions=0, created_at=_NOW, queued_at=_NOW,
    deadline=bindparam("deadline", type_=UTCDateTime()), parent_id=bindparam("parent_id"),
    items_total=bindparam("items_total"), chunk_index=bindparam("chunk_index"), items_done=0,
    cpu_seconds=0.0, wall_seconds=0.0, items=0, window=bindparam("window"),
)


def _insert_ignore(conn: Connection, table: Any, values: dict[str, Any]) -> None:
    dialect = conn.dialect.name
    stmt: Any
    if dialect == "postgresql":
        stmt = postgresql.insert(table).values(**values).on_conflict_do_nothing()
    elif dialect == "sqlite":
        stmt = sqlite.insert(table).values(**values).on_conflict_do_nothing()
    else:  # pragma: no cover - other databases are refused by normalize_url
        raise NotImplementedError(dialect)
    conn.execute(stmt)


class JobStore(Transitions):
    """Reads and conditional writes of jobs and attempts (worker-side transitions inherited)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._tenants_seen: set[str] = set()

    # --- submit ------------------------------------------------------------------------------

    def create(self, job: NewJob, *, now: datetime | None = None) -> tuple[str, bool]:
        """Insert a queued job; with an idempotency key already used, return the existing one.

        Returns ``(job_id, created)``. Concurrent submits of one key create one row: the
        unique constraint decides, and the losers read the winner's id.
        """
        now = now or utcnow()
        if job.idempotency_key is not None:
            existing = self.find_by_key(job.tenant, job.idempotency_key)
            if existing is not None:
                return existing, False
        job_id = new_job_id()
        row = {
            "id": job_id, "tenant": job.tenant, "kind": job.kind, "tier": job.tier,
            "state": job.state, "priority": job.priority,
            "idempotency_key": job.idempotency_key, "payload": job.payload,
            "max_attempts": job.max_attempts, "now": now, "deadline": job.deadline,
            "parent_id": job.parent_id, "items_total": job.items_total,
            "chunk_index": job.chunk_index, "window": job.window,
        }
        try:
            if job.tenant in self._tenants_seen and self.engine.dialect.name == "postgresql":
                with self.engine.connect() as conn:  # one statement: autocommit is atomic
                    conn.execution_options(isolation_level="AUTOCOMMIT").execute(_INSERT_JOB, row)
            else:
                with self.engine.begin() as conn:
                    if job.tenant not in self._tenants_seen:  # once per tenant per process
                        _insert_ignore(conn, tenants,
                                       {"name": job.tenant, "weight": 1, "created_at": now})
                    conn.execute(_INSERT_JOB, row)
        except IntegrityError:
            if job.tenant in self._tenants_seen:
                # The tenant row this process saw is gone (a test emptied the table): retry
                # once with the upsert.
                self._tenants_seen.discard(job.tenant)
                return self.create(job, now=now)
            if job.idempotency_key is None:
                raise
            existing = self.find_by_key(job.tenant, job.idempotency_key)
            if existing is None:
                raise
            return existing, False
        self._tenants_seen.add(job.tenant)
        return job_id, True

    def delete_unpublished(self, job_id: str) -> None:
        """Remove a job whose message could not be published (the submit is refused)."""
        with self.engine.begin() as conn:
            conn.execute(
                jobs.delete().where(and_(jobs.c.id == job_id, jobs.c.attempts == 0))
            )

    def find_by_key(self, tenant: str, key: str) -> str | None:
        with reading(self.engine) as conn:
            return conn.execute(
                select(jobs.c.id).where(
                    and_(jobs.c.tenant == tenant, jobs.c.idempotency_key == key)
                )
            ).scalar_one_or_none()

    # --- reads -------------------------------------------------------------------------------

    def get(self, job_id: str) -> JobView | None:
        with reading(self.engine) as conn:
            row = conn.execute(select(*_JOB_COLUMNS).where(jobs.c.id == job_id)).first()
        return JobView(**row._mapping) if row else None

    def get_many(self, job_ids: Sequence[str]) -> dict[str, JobView]:
        if not job_ids:
            return {}
        out: dict[str, JobView] = {}
        with reading(self.engine) as conn:
            for start in range(0, len(job_ids), 500):
                chunk = list(job_ids[start:start + 500])
                for row in conn.execute(select(*_JOB_COLUMNS).where(jobs.c.id.in_(chunk))):
                    out[row.id] = JobView(**row._mapping)
        return out

    def find(
        self,
        *,
        state: str | None = None,
        tenant: str | None = None,
        kind: str | None = None,
        tier: str | None = None,
        since: datetime | None = None,
        limit: int = 50,
        window: str | None = None,
    ) -> list[JobView]:
        query = select(*_JOB_COLUMNS).order_by(jobs.c.created_at.desc(), jobs.c.id).limit(limit)
        for column, value in (
            (jobs.c.state, state), (jobs.c.tenant, tenant), (jobs.c.kind, kind),
            (jobs.c.tier, tier), (jobs.c.window, window),
        ):
            if value is not None:
                query = query.where(column == value)
        if since is not None:
            query = query.where(jobs.c.created_at >= since)
        with reading(self.engine) as conn:
            return [JobView(**row._mapping) for row in conn.execute(query)]

    def attempts(self, job_id: str) -> list[AttemptView]:
        query = (
            select(
                attempts.c.number, attempts.c.worker, attempts.c.started_at,
                attempts.c.finished_at, attempts.c.outcome, attempts.c.error,
                attempts.c.cpu_seconds, attempts.c.wall_seconds,
            )
            .where(attempts.c.job_id == job_id)
            .order_by(attempts.c.number)
        )
        with reading(self.engine) as conn:
            return [AttemptView(**row._mapping) for row in conn.execute(query)]

    # --- control -----------------------------------------------------------------------------

    def cancel(self, job_id: str, *, now: datetime | None = None) -> bool:
        """Cancel a job that has not finished. A running attempt's result is then discarded."""
        now = now or utcnow()
        charges: list[Charge] = []
        with self.engine.begin() as conn:
            result = conn.execute(
                update(jobs)
                .where(and_(jobs.c.id == job_id, jobs.c.state.in_(JobState.ACTIVE)))
                .values(state=JobState.CANCELLED, finished_at=now, lease_expires_at=None)
            )
            if result.rowcount == 1:  # a bulk job's chunks go with it
                conn.execute(
                    update(jobs)
                    .where(and_(jobs.c.parent_id == job_id, jobs.c.state.in_(JobState.ACTIVE)))
                    .values(state=JobState.CANCELLED, finished_at=now, lease_expires_at=None)
                )
                charges = self.accountant.charge_tree(conn, job_id)  # what already ran
        self.accountant.committed(charges)
        return result.rowcount == 1

    # --- bulk jobs ---------------------------------------------------------------------------

    def drop_staged(self, parent_id: str) -> None:
        """Remove a bulk job's chunks that were staged and never released."""
        with self.engine.begin() as conn:
            conn.execute(jobs.delete().where(staged_chunks(parent_id)))

    def delete_bulk(self, parent_id: str) -> None:
        """Remove a bulk job that was refused while its items streamed in."""
        with self.engine.begin() as conn:
            conn.execute(jobs.delete().where(jobs.c.parent_id == parent_id))
            conn.execute(jobs.delete().where(jobs.c.id == parent_id))

    def release_chunks(self, parent_id: str, items_total: int, *,
                       now: datetime | None = None) -> list[str]:
        """All items are in: queue the staged chunks and fix the parent's total.

        Raises:
            StreamGivenUp: the reconciler gave the job up meanwhile; nothing changed.
        """
        now = now or utcnow()
        with self.engine.begin() as conn:
            end_stream(conn, parent_id, items_total)
            conn.execute(
                update(jobs)
                .where(and_(jobs.c.parent_id == parent_id, jobs.c.state == JobState.DEFERRED))
                .values(state=JobState.QUEUED, queued_at=now)
            )
            complete_parent(conn, parent_id, now)
            return list(conn.execute(
                select(jobs.c.id).where(jobs.c.parent_id == parent_id)
                .order_by(jobs.c.chunk_index)
            ).scalars())

    def tenant_weight(self, tenant: str) -> int:
        with reading(self.engine) as conn:
            weight = conn.execute(
                select(tenants.c.weight).where(tenants.c.name == tenant)).scalar_one_or_none()
        return int(weight or 1)

    def chunk_results(self, parent_id: str) -> list[str]:
        """A bulk job's result files, in item order (not its chunks' payloads: the items)."""
        with reading(self.engine) as conn:
            return [ref for ref in conn.execute(
                select(jobs.c.result_ref).where(jobs.c.parent_id == parent_id)
                .order_by(jobs.c.chunk_index)).scalars() if ref]

    def chunks(self, parent_id: str) -> list[JobView]:
        """A bulk job's chunks in item order."""
        with reading(self.engine) as conn:
            return [JobView(**row._mapping) for row in conn.execute(
                select(*_JOB_COLUMNS).where(jobs.c.parent_id == parent_id)
                .order_by(jobs.c.chunk_index)
            )]
