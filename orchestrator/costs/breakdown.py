"""Why a job cost what it did: its batch share, each attempt's charge, and its items."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.engine import Engine

from orchestrator.costs.prices import PriceTable
from orchestrator.db.engine import reading
from orchestrator.db.models import attempts, jobs
from orchestrator.tiers import Tier


@dataclass(frozen=True)
class AttemptCharge:
    number: int
    outcome: str
    cpu_seconds: float | None
    wall_seconds: float | None
    window: str | None
    multiplier: Decimal | None
    cost: Decimal | None

    def to_json(self) -> dict[str, Any]:
        return {"number": self.number, "outcome": self.outcome,
                "cpu_seconds": self.cpu_seconds, "wall_seconds": self.wall_seconds,
                "window": self.window,
                "multiplier": None if self.multiplier is None else str(self.multiplier),
                "cost": None if self.cost is None else str(self.cost)}


@dataclass(frozen=True)
class Breakdown:
    """A job's recorded charges, with the prices in force now for reference."""

    job_id: str
    tier: str
    model: str | None
    cost: Decimal | None
    cpu_hour_price: Decimal
    wall_hour_price: Decimal
    batch_id: str | None
    batch_size: int | None
    #: this job's fraction of its batch call's CPU seconds (None outside a batch)
    batch_share: float | None
    attempts: list[AttemptCharge]
    #: charged for the items at the model's price: the cost beyond the attempts' charges
    items: int
    item_charge: Decimal | None
    #: for a bulk job: its chunks, and how many of them have been charged
    chunks: int
    chunks_charged: int

    def to_json(self) -> dict[str, Any]:
        def money(value: Decimal | None) -> str | None:
            return None if value is None else str(value)

        return {
            "cost": money(self.cost), "tier": self.tier, "model": self.model,
            "cpu_hour_price": str(self.cpu_hour_price),
            "wall_hour_price": str(self.wall_hour_price),
            "batch_id": self.batch_id, "batch_size": self.batch_size,
            "batch_share": self.batch_share,
            "attempts": [a.to_json() for a in self.attempts],
            "items": self.items, "item_charge": money(self.item_charge),
            "chunks": self.chunks, "chunks_charged": self.chunks_charged,
        }


def explain(engine: Engine, job_id: str, prices: PriceTable) -> Breakdown | None:
    """The breakdown of one job's cost, or None when no job has that id."""
    with reading(engine) as conn:
        job = conn.execute(
            select(jobs.c.tier, jobs.c.model, jobs.c.cost, jobs.c.batch_id, jobs.c.batch_size,
                   jobs.c.cpu_seconds, jobs.c["items"]).where(jobs.c.id == job_id)).first()
        if job is None:
            return None
        tries = [AttemptCharge(*row) for row in conn.execute(
            select(attempts.c.number, attempts.c.outcome, attempts.c.cpu_seconds,
                   attempts.c.wall_seconds, attempts.c.window, attempts.c.price_multiplier,
                   attempts.c.cost)
            .where(attempts.c.job_id == job_id).order_by(attempts.c.number))]
        share = None
        if job.batch_id is not None:
            batch_cpu = conn.execute(select(func.sum(jobs.c.cpu_seconds))
                                     .where(jobs.c.batch_id == job.batch_id)).scalar()
            share = float(job.cpu_seconds / batch_cpu) if batch_cpu else None
        chunks, charged = conn.execute(
            select(func.count(), func.count(jobs.c.cost)).where(jobs.c.parent_id == job_id)
        ).one()
    item_charge = None
    if job.cost is not None and not chunks:
        item_charge = job.cost - sum((a.cost or Decimal(0) for a in tries), Decimal(0))
    tier = Tier(job.tier)
    return Breakdown(
        job_id=job_id, tier=job.tier, model=job.model, cost=job.cost,
        cpu_hour_price=prices.cpu_hour[tier], wall_hour_price=prices.wall_hour[tier],
        batch_id=job.batch_id, batch_size=job.batch_size, batch_share=share, attempts=tries,
        items=int(job.items or 0), item_charge=item_charge, chunks=int(chunks),
        chunks_charged=int(charged))
