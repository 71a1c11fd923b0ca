"""Charging finished jobs: each attempt's compute at its tier's price and window multiplier,
plus the job's items at its model's price, written once in the transaction that ends the job.

A job's cost is the sum of what each of its attempts ran (retried, preempted, lost or final)
and not a re-estimate from the job's totals: a preempted-and-resumed chunk pays each slice at
the multiplier of the window that slice ran in (``attempts.price_multiplier``, NULL meaning
1), and the items it produced once. Each attempt's charge is stored on the attempt row, so
``jobs show`` can explain the total. A bulk job's cost is the sum of its chunks' costs, added
to the parent row as each chunk is charged (as its CPU seconds already are).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from sqlalchemy import and_, bindparam, exists, func, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.orm import aliased

from orchestrator.costs.prices import PriceTable
from orchestrator.db.models import JobState, Outcome, attempts, jobs


@dataclass(frozen=True)
class Charge:
    """One job's recorded cost."""

    job_id: str
    tenant: str
    tier: str
    kind: str
    model: str | None
    cost: Decimal


def default_models(specs: Iterable[Any]) -> dict[str, str]:
    """Kind name -> the model its payload uses when it names none (for kinds with a model)."""
    out: dict[str, str] = {}
    for spec in specs:
        field_info = spec.schema.model_fields.get("model")
        if field_info is not None and isinstance(field_info.default, str):
            out[spec.name] = field_info.default
    return out


def job_model(kind: str, payload: Any, defaults: Mapping[str, str]) -> str | None:
    """The model a job ran with: its payload's ``model``, else its kind's default."""
    named = payload.get("model") if isinstance(payload, dict) else None
    return str(named) if isinstance(named, str) else defaults.get(kind)


@dataclass(frozen=True)
class Accountant:
    """Prices and charges jobs inside the job store's transactions."""

    prices: PriceTable = field(default_factory=PriceTable)
    models: Mapping[str, str] = field(default_factory=dict)
    #: called with the charges of each committed transaction (e.g. Prometheus counters)
    observers: tuple[Callable[[Sequence[Charge]], None], ...] = ()

    def attempt_costs(self, conn: Connection, ended: Sequence[tuple[str, int, str, float | None,
                                                                   float | None]]
                      ) -> list[Decimal]:
        """What each ending attempt ``(job id, number, tier, cpu s, wall s)`` costs.

        Reads the attempts' window multipliers (one SELECT); the caller stores each cost on
        the attempt row in the UPDATE that closes it.
        """
        if not ended:
            return []
        multipliers = {
            (row.job_id, row.number): row.price_multiplier
            for row in conn.execute(
                select(attempts.c.job_id, attempts.c.number, attempts.c.price_multiplier)
                .where(and_(attempts.c.job_id.in_(list({e[0] for e in ended})),
                            attempts.c.price_multiplier.is_not(None))))
        }
        return [self.prices.compute_charge(tier, cpu, wall, multipliers.get((job_id, number)))
                for job_id, number, tier, cpu, wall in ended]

    def charge(self, conn: Connection, job_ids: Sequence[str]) -> list[Charge]:
        """Write the cost of every job in ``job_ids`` that has ended and has none yet.

        The cost is the sum of its attempts' stored charges (an attempt lost with its worker
        measured nothing and costs nothing) plus its items at its model's price. Skipped: jobs
        still active, jobs already charged, bulk parents (their chunks are charged), and jobs
        with an attempt still running (a job cancelled while it ran is charged when that
        attempt's worker reports its end).
        """
        if not job_ids:
            return []
        chunk = aliased(jobs)
        found = conn.execute(  # one round trip: the jobs to charge and their attempts
            select(jobs.c.id, jobs.c.tenant, jobs.c.kind, jobs.c.tier, jobs.c.payload,
                   jobs.c["items"], jobs.c.parent_id, attempts.c.outcome,
                   attempts.c.cost.label("attempt_cost"))
            .select_from(jobs.outerjoin(attempts, attempts.c.job_id == jobs.c.id))
            .where(and_(
                jobs.c.id.in_(list(job_ids)), jobs.c.cost.is_(None),
                jobs.c.state.in_(JobState.TERMINAL),
                ~exists().where(chunk.c.parent_id == jobs.c.id),
            ))
        ).all()
        if not found:
            return []
        rows = list({row.id: row for row in found}.values())
        spent: dict[str, Decimal | None] = {row.id: Decimal(0) for row in rows}
        for a in found:
            so_far = spent[a.id]
            if a.outcome == Outcome.RUNNING or so_far is None:
                spent[a.id] = None
            else:
                spent[a.id] = so_far + (a.attempt_cost or Decimal(0))
        charges: list[Charge] = []
        parents: dict[str, Decimal] = {}
        for row in rows:
            compute = spent[row.id]
            if compute is None:
                continue
            model = job_model(row.kind, row.payload, self.models)
            total = compute + self.prices.item_charge(model, int(row.items or 0))
            charges.append(Charge(row.id, row.tenant, row.tier, row.kind, model, total))
            if row.parent_id is not None:
                parents[row.parent_id] = parents.get(row.parent_id, Decimal(0)) + total
        if charges:
            conn.execute(
                update(jobs).where(and_(jobs.c.id == bindparam("c_id"), jobs.c.cost.is_(None)))
                .values(cost=bindparam("c_cost"), model=bindparam("c_model")),
                [{"c_id": c.job_id, "c_cost": c.cost, "c_model": c.model} for c in charges])
        for parent, cost in parents.items():
            conn.execute(update(jobs).where(jobs.c.id == parent)
                         .values(cost=func.coalesce(jobs.c.cost, 0) + cost))
        return charges

    def charge_tree(self, conn: Connection, job_id: str) -> list[Charge]:
        """Charge a job and its bulk chunks (after a cancel)."""
        ids = [job_id, *conn.execute(
            select(jobs.c.id).where(jobs.c.parent_id == job_id)).scalars()]
        return self.charge(conn, ids)

    def committed(self, charges: Sequence[Charge]) -> None:
        """Tell the observers about charges whose transaction has committed."""
        if charges:
            for observer in self.observers:
                observer(charges)
