"""Cost reports: jobs, items, CPU-hours, cost, queue wait and retries per group.

Rows are top-level jobs that have been charged (a bulk job counts once, with the sum of its
chunks' costs; its chunks' retries and preemptions count toward it), created in
``[since, until)``. Money is summed in the database where that is exact: PostgreSQL sums
``numeric``; SQLite has no decimal type, so it sums each cost as a whole number of
``QUANTUM`` units (exact for costs below 9e7 a job). The total is the sum of the groups, so
it equals the sum of the job costs to the last unit. The queue-wait p95 is the nearest-rank
percentile computed with window functions (portable across SQLite and PostgreSQL).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import Integer, and_, case, cast, func, literal_column, select
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import aliased

from orchestrator.costs.prices import QUANTUM, round_money
from orchestrator.db.engine import reading
from orchestrator.db.models import jobs
from orchestrator.errors import InvalidOption

GROUPS = ("tenant", "kind", "tier", "window", "day", "model")
NONE_KEY = "-"
_SINCE = re.compile(r"^(\d+)\s*([mhdw])$")
_UNITS = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_since(text: str, now: datetime) -> datetime:
    """``7d``, ``12h``, ``30m``, ``2w`` before ``now``, or an ISO date or time (UTC if naive).

    Raises:
        InvalidOption: the text is neither.
    """
    match = _SINCE.match(text.strip().lower())
    if match:
        try:
            return now - timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})
        except OverflowError:  # before year 1
            raise InvalidOption(f"--since {text!r} reaches back past the calendar") from None
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise InvalidOption(
            f"--since {text!r}: write a span such as 7d, 12h, 30m, 2w, or a date 2026-11-01"
        ) from None
    when = when if when.tzinfo else when.replace(tzinfo=UTC)
    if when > now:
        raise InvalidOption(f"--since {text!r} is in the future: nothing has cost anything yet")
    return when


@dataclass(frozen=True)
class CostRow:
    """One group's figures (``key`` is "total" for the total)."""

    key: str
    jobs: int
    items: int
    cpu_seconds: float
    cost: Decimal
    queue_wait_p95_s: float | None
    retries: int
    preemptions: int

    @property
    def cpu_hours(self) -> float:
        return self.cpu_seconds / 3600

    @property
    def cost_per_job(self) -> Decimal | None:
        return round_money(self.cost / self.jobs) if self.jobs else None

    @property
    def cost_per_1k_items(self) -> Decimal | None:
        return round_money(self.cost * 1000 / self.items) if self.items else None

    def to_json(self) -> dict[str, Any]:
        def money(value: Decimal | None) -> str | None:
            return None if value is None else str(value)

        return {
            "key": self.key, "jobs": self.jobs, "items": self.items,
            "cpu_hours": round(self.cpu_hours, 9), "cost": money(self.cost),
            "cost_per_job": money(self.cost_per_job),
            "cost_per_1k_items": money(self.cost_per_1k_items),
            "queue_wait_p95_s": self.queue_wait_p95_s, "retries": self.retries,
            "preemptions": self.preemptions,
        }


@dataclass(frozen=True)
class CostReport:
    by: str
    since: datetime
    until: datetime
    tenant: str | None
    currency: str
    rows: list[CostRow]
    total: CostRow

    def to_json(self) -> dict[str, Any]:
        return {
            "by": self.by, "since": self.since.isoformat(), "until": self.until.isoformat(),
            "tenant": self.tenant, "currency": self.currency,
            "groups": [row.to_json() for row in self.rows], "total": self.total.to_json(),
        }


def exact_sum(column: Any, dialect: str) -> Any:
    """SUM of a Numeric(…, 8) money column, exact on both backends (see module docstring)."""
    if dialect == "sqlite":
        return func.sum(cast(func.round(column * int(1 / QUANTUM)), Integer))
    return func.sum(column)


def money_from_sum(value: Any, dialect: str) -> Decimal:
    if value is None:
        return Decimal(0).quantize(QUANTUM)
    if dialect == "sqlite":
        return (Decimal(int(value)) * QUANTUM).quantize(QUANTUM)
    return Decimal(value).quantize(QUANTUM)


def group_key(table: Any, by: str, dialect: str) -> Any:
    """The SQL expression a report groups by (``NONE_KEY`` where a job has no value)."""
    if by in ("tenant", "kind", "tier"):
        return table.c[by]
    # Constants are inlined, not bound: PostgreSQL only matches a GROUP BY expression to the
    # selected one when they are identical, and two bind parameters are not.
    if by in ("window", "model"):
        return func.coalesce(table.c[by], literal_column(f"'{NONE_KEY}'"))
    if by == "day":
        if dialect == "sqlite":  # stored as naive UTC text
            return func.strftime(literal_column("'%Y-%m-%d'"), table.c.created_at)
        return func.to_char(func.timezone(literal_column("'UTC'"), table.c.created_at),
                            literal_column("'YYYY-MM-DD'"))
    raise InvalidOption(f"--by {by!r}: choose from {', '.join(GROUPS)}")


def _retries(table: Any) -> Any:
    """Attempts beyond the first that were not preemptions (retries and takeovers)."""
    extra = table.c.attempts - table.c.preemptions - 1
    return func.sum(case((extra > 0, extra), else_=0))


def _filters(table: Any, since: datetime, until: datetime, tenant: str | None) -> Any:
    conditions = [table.c.parent_id.is_(None), table.c.cost.is_not(None),
                  table.c.created_at >= since, table.c.created_at < until]
    if tenant is not None:
        conditions.append(table.c.tenant == tenant)
    return and_(*conditions)


def queue_wait_p95(conn: Connection, key: Any, where: Any) -> dict[str, float]:
    """Nearest-rank p95 of queue seconds per key: the smallest value with rank >= 0.95 n."""
    ranked = (
        select(key.label("k"), jobs.c.queue_seconds.label("q"),
               func.row_number().over(partition_by=key, order_by=jobs.c.queue_seconds)
               .label("rn"),
               func.count().over(partition_by=key).label("n"))
        .where(and_(where, jobs.c.queue_seconds.is_not(None)))
        .subquery()
    )
    query = (select(ranked.c.k, func.min(ranked.c.q))
             .where(ranked.c.rn * 100 >= ranked.c.n * 95).group_by(ranked.c.k))
    return {str(k): float(q) for k, q in conn.execute(query)}


def cost_report(engine: Engine, *, by: str = "tenant", since: datetime,
                until: datetime | None = None, tenant: str | None = None,
                currency: str = "USD") -> CostReport:
    """Figures per group and their total.

    Raises:
        InvalidOption: ``by`` is not one of ``GROUPS``.
    """
    until = until or datetime.now(UTC)
    dialect = engine.dialect.name
    key = group_key(jobs, by, dialect)
    where = _filters(jobs, since, until, tenant)
    parent = aliased(jobs)
    chunk = aliased(jobs)
    with reading(engine) as conn:
        main = conn.execute(
            select(key.label("k"), func.count(), func.coalesce(func.sum(jobs.c["items"]), 0),
                   func.coalesce(func.sum(jobs.c.cpu_seconds), 0.0),
                   exact_sum(jobs.c.cost, dialect), _retries(jobs),
                   func.coalesce(func.sum(jobs.c.preemptions), 0))
            .where(where).group_by(key).order_by(key)
        ).all()
        in_chunks = {
            str(k): (int(r or 0), int(p or 0)) for k, r, p in conn.execute(
                select(group_key(parent, by, dialect), _retries(chunk),
                       func.sum(chunk.c.preemptions))
                .select_from(chunk.join(parent, chunk.c.parent_id == parent.c.id))
                .where(_filters(parent, since, until, tenant))
                .group_by(group_key(parent, by, dialect)))
        }
        p95 = queue_wait_p95(conn, key, where)
        p95_total = queue_wait_p95(conn, literal_column("'total'"), where).get("total")
    rows = []
    for k, count, items, cpu, cost, retries, preemptions in main:
        extra = in_chunks.get(str(k), (0, 0))
        rows.append(CostRow(
            key=str(k), jobs=int(count), items=int(items), cpu_seconds=float(cpu),
            cost=money_from_sum(cost, dialect), queue_wait_p95_s=p95.get(str(k)),
            retries=int(retries or 0) + extra[0], preemptions=int(preemptions) + extra[1]))
    rows.sort(key=lambda r: (-r.cost, r.key) if by != "day" else (r.key,))
    total = CostRow(
        key="total", jobs=sum(r.jobs for r in rows), items=sum(r.items for r in rows),
        cpu_seconds=sum(r.cpu_seconds for r in rows),
        cost=sum((r.cost for r in rows), Decimal(0).quantize(QUANTUM)),
        queue_wait_p95_s=p95_total, retries=sum(r.retries for r in rows),
        preemptions=sum(r.preemptions for r in rows))
    return CostReport(by=by, since=since, until=until, tenant=tenant, currency=currency,
                      rows=rows, total=total)


def daily_spend(engine: Engine, *, since: datetime, until: datetime | None = None,
                tenant: str | None = None) -> dict[str, dict[str, Decimal]]:
    """Day (UTC, ``YYYY-MM-DD``) -> tenant -> cost, for the spend-over-time chart."""
    until = until or datetime.now(UTC)
    dialect = engine.dialect.name
    day = group_key(jobs, "day", dialect)
    out: dict[str, dict[str, Decimal]] = {}
    with reading(engine) as conn:
        for d, name, cost in conn.execute(
            select(day, jobs.c.tenant, exact_sum(jobs.c.cost, dialect))
            .where(_filters(jobs, since, until, tenant))
            .group_by(day, jobs.c.tenant).order_by(day, jobs.c.tenant)
        ):
            out.setdefault(str(d), {})[str(name)] = money_from_sum(cost, dialect)
    return out
