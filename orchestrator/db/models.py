"""Typed SQLAlchemy models: jobs, their attempts, and tenants.

Schema changes go through Alembic only (``migrations/``); these models are what the migrations
build, and the test suite checks that the two agree.
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, ClassVar, cast

from sqlalchemy import (
    JSON,
    Column,
    DateTime,
    Double,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    Numeric,
    String,
    Table,
    Text,
    TypeDecorator,
    Unicode,
    UniqueConstraint,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC on the Python side on every backend (SQLite stores naive UTC)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetimes are refused; use datetime.now(UTC)")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: ClassVar[dict[Any, Any]] = {datetime: UTCDateTime, dict[str, Any]: JSON}


class JobState:
    """Job states as plain strings (the column is a string so later states need no migration)."""

    DEFERRED = "deferred"
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    DEAD = "dead"
    CANCELLED = "cancelled"

    ACTIVE = (DEFERRED, QUEUED, RUNNING)
    TERMINAL = (SUCCEEDED, FAILED, DEAD, CANCELLED)
    ALL = (*ACTIVE, *TERMINAL)


class Outcome:
    """How one attempt ended."""

    RUNNING = "running"
    SUCCEEDED = "succeeded"
    RETRY = "retry"
    FAILED = "failed"
    DEAD = "dead"
    LOST = "lost"
    CANCELLED = "cancelled"
    PREEMPTED = "preempted"


class Tenant(Base):
    """A tenant: its fair-share weight and its quotas (NULL: that quota is off)."""

    __tablename__ = "tenants"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    weight: Mapped[int] = mapped_column(Integer, default=1)
    created_at: Mapped[datetime]
    #: tier -> most jobs queued or running at once (tiers not listed are unlimited)
    max_inflight: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    rate_per_s: Mapped[float | None] = mapped_column(Double)
    burst: Mapped[int | None] = mapped_column(Integer)
    monthly_budget: Mapped[Decimal | None] = mapped_column(Numeric(18, 8))


class Window(Base):
    """A named off-peak window: when it is open, which work it admits, and what compute costs.

    Recurring windows have ``cron`` (evaluated in ``timezone``) and ``duration_s``; a one-off
    window has ``starts_at`` and ``ends_at`` instead. ``tiers``/``kinds`` NULL admit all.
    """

    __tablename__ = "windows"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    cron: Mapped[str | None] = mapped_column(String(128))
    duration_s: Mapped[int | None] = mapped_column(Integer)
    starts_at: Mapped[datetime | None]
    ends_at: Mapped[datetime | None]
    timezone: Mapped[str] = mapped_column(String(64), default="UTC")
    tiers: Mapped[list[str] | None] = mapped_column(JSON)
    kinds: Mapped[list[str] | None] = mapped_column(JSON)
    #: most of this window's jobs running at once (NULL: no cap)
    slots: Mapped[int | None] = mapped_column(Integer)
    price_multiplier: Mapped[Decimal] = mapped_column(Numeric(10, 4), default=Decimal("1"))
    created_at: Mapped[datetime]


_ACTIVE = text("state IN ('deferred', 'queued', 'running')")
_CHUNK = text("parent_id IS NOT NULL")
_DEFERRED = text('"window" IS NOT NULL')


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("tenant", "idempotency_key"),
        # Partial indexes: a finished job leaves the indexes of active jobs, and a plain
        # single job never enters those of chunks and deferred jobs (migration 0008). Fewer
        # index entries per write, and these indexes stay the size of the backlog.
        Index("ix_jobs_active_state_tier", "state", "tier",
              postgresql_where=_ACTIVE, sqlite_where=_ACTIVE),
        Index("ix_jobs_tenant_created", "tenant", "created_at"),
        Index("ix_jobs_kind_created", "kind", "created_at"),
        Index("ix_jobs_chunk_parent_id", "parent_id",
              postgresql_where=_CHUNK, sqlite_where=_CHUNK),
        # Counts a tenant's in-flight submissions per tier from the index alone.
        Index("ix_jobs_active_tenant_tier_state", "tenant", "tier", "state", "parent_id",
              postgresql_where=_ACTIVE, sqlite_where=_ACTIVE),
        Index("ix_jobs_deferred_state_window", "state", "window",
              postgresql_where=_DEFERRED, sqlite_where=_DEFERRED),
        # Cost reports and `top` read a time range of jobs.
        Index("ix_jobs_created_at", "created_at"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(64), ForeignKey("tenants.name"))
    kind: Mapped[str] = mapped_column(String(64))
    tier: Mapped[str] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(16))
    priority: Mapped[int] = mapped_column(Integer, default=0)
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    result: Mapped[Any | None] = mapped_column(JSON)
    result_ref: Mapped[str | None] = mapped_column(String(1024))
    error: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer)
    preemptions: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    created_at: Mapped[datetime]
    queued_at: Mapped[datetime | None]
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    lease_expires_at: Mapped[datetime | None]
    deadline: Mapped[datetime | None]
    parent_id: Mapped[str | None] = mapped_column(String(36), ForeignKey("jobs.id"))
    items_total: Mapped[int | None] = mapped_column(Integer)
    items_done: Mapped[int] = mapped_column(Integer, default=0)
    chunk_index: Mapped[int | None] = mapped_column(Integer)
    batch_id: Mapped[str | None] = mapped_column(String(36))
    batch_size: Mapped[int | None] = mapped_column(Integer)
    queue_seconds: Mapped[float | None]
    cpu_seconds: Mapped[float] = mapped_column(default=0.0)
    wall_seconds: Mapped[float] = mapped_column(default=0.0)
    items: Mapped[int] = mapped_column(Integer, default=0)
    cost: Mapped[Decimal | None] = mapped_column(Numeric(18, 8))
    #: the window this job waits for (state ``deferred``) or runs in; NULL: no window
    window: Mapped[str | None] = mapped_column(String(64))
    #: the model the job was priced by (``orchestrator.costs``); NULL for kinds without one
    model: Mapped[str | None] = mapped_column(String(128))


class Attempt(Base):
    __tablename__ = "attempts"
    __table_args__ = (UniqueConstraint("job_id", "number"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(36), ForeignKey("jobs.id", ondelete="CASCADE"))
    number: Mapped[int] = mapped_column(Integer)
    worker: Mapped[str] = mapped_column(String(255))
    started_at: Mapped[datetime]
    finished_at: Mapped[datetime | None]
    outcome: Mapped[str] = mapped_column(String(16))
    error: Mapped[str | None] = mapped_column(Text)
    cpu_seconds: Mapped[float | None]
    wall_seconds: Mapped[float | None]
    #: the window this attempt ran inside and its price multiplier then (NULL: peak price)
    window: Mapped[str | None] = mapped_column(String(64))
    price_multiplier: Mapped[Decimal | None] = mapped_column(Numeric(10, 4))
    #: what this attempt's compute was charged (``orchestrator.costs``); NULL until charged
    cost: Mapped[Decimal | None] = mapped_column(Numeric(18, 8))


class Schedule(Base):
    """A recurring job: every occurrence of ``cron`` (in ``timezone``) submits one job.

    ``window`` NULL means the kind's default window; ``"none"`` means no window (run at once).
    """

    __tablename__ = "schedules"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    cron: Mapped[str] = mapped_column(String(128))
    timezone: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(64))
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    tier: Mapped[str | None] = mapped_column(String(16))
    tenant: Mapped[str] = mapped_column(String(64))
    window: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime]
    #: the last occurrence that submitted a job, and that job
    last_occurrence: Mapped[datetime | None]
    last_job_id: Mapped[str | None] = mapped_column(String(36))


class JobEvent(Base):
    """Something the control plane did to a job outside an attempt: released by its window,
    re-published by the reconciler (and why)."""

    __tablename__ = "job_events"
    __table_args__ = (Index("ix_job_events_job_id", "job_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(36), ForeignKey("jobs.id", ondelete="CASCADE"))
    at: Mapped[datetime]
    event: Mapped[str] = mapped_column(String(32))
    detail: Mapped[str | None] = mapped_column(Text)


class SchedulerLease(Base):
    """Who may act as the scheduler: one row per lease, taken over once ``expires_at`` passes."""

    __tablename__ = "scheduler_lease"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    holder: Mapped[str] = mapped_column(String(255))
    acquired_at: Mapped[datetime]
    expires_at: Mapped[datetime]


#: APScheduler 3's SQLAlchemyJobStore table, exactly as it defines it (it only creates the
#: table when missing). Built by migration 0006 so that Alembic owns every table.
apscheduler_jobs = Table(
    "apscheduler_jobs",
    Base.metadata,
    Column("id", Unicode(191), primary_key=True),
    Column("next_run_time", Float(25), index=True),
    Column("job_state", LargeBinary, nullable=False),
)

jobs = cast(Table, Job.__table__)
attempts = cast(Table, Attempt.__table__)
tenants = cast(Table, Tenant.__table__)
windows = cast(Table, Window.__table__)
schedules = cast(Table, Schedule.__table__)
job_events = cast(Table, JobEvent.__table__)
scheduler_lease = cast(Table, SchedulerLease.__table__)
