"""The live state of the tiers, read for ``orchestrator top`` (one snapshot per refresh).

Queue depth and worker slots come from Redis (the admission check's own reading); in-flight,
throughput, queue-wait p95, preemptions and deferred work from the database; sheds from the
counters admission control keeps in Redis; the next window from the ``windows`` table.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

import redis
from apscheduler.triggers.cron import CronTrigger
from sqlalchemy import and_, func, select
from sqlalchemy.engine import Engine

from orchestrator.admission import Admission, read_sheds
from orchestrator.costs.report import queue_wait_p95
from orchestrator.db.models import JobState, Outcome, attempts, jobs, utcnow, windows
from orchestrator.settings import Settings
from orchestrator.tiers import TIER_ORDER

#: Throughput is measured over the last minute; p95 and preemptions over the last 5 minutes.
THROUGHPUT_S = 60
RECENT_S = 300


@dataclass(frozen=True)
class TierState:
    tier: str
    queued: int
    in_flight: int
    slots: int
    throughput_per_s: float
    wait_p95_s: float | None
    objective_s: float
    sheds: int
    preemptions: int
    deferred: int

    @property
    def over_objective(self) -> bool:
        return bool(self.objective_s) and self.wait_p95_s is not None \
            and self.wait_p95_s > self.objective_s


@dataclass(frozen=True)
class NextWindow:
    name: str
    opens_at: datetime
    open_now: bool


@dataclass(frozen=True)
class Snapshot:
    at: datetime
    tiers: list[TierState]
    next_window: NextWindow | None


def _counts(engine: Engine, now: datetime) -> dict[str, dict[str, float]]:
    leaf = jobs.c.lease_expires_at.is_not(None)  # a bulk parent holds no lease
    out: dict[str, dict[str, float]] = {t.value: {} for t in TIER_ORDER}
    with engine.connect() as conn:
        for tier, n in conn.execute(
            select(jobs.c.tier, func.count())
            .where(and_(jobs.c.state == JobState.RUNNING, leaf)).group_by(jobs.c.tier)):
            out[tier]["in_flight"] = n
        for tier, n in conn.execute(
            select(jobs.c.tier, func.count())
            .where(jobs.c.state == JobState.DEFERRED).group_by(jobs.c.tier)):
            out[tier]["deferred"] = n
        for tier, n in conn.execute(
            select(jobs.c.tier, func.count())
            .where(and_(jobs.c.finished_at >= now - timedelta(seconds=THROUGHPUT_S),
                        jobs.c.attempts > 0))
            .group_by(jobs.c.tier)):
            out[tier]["done"] = n
        for tier, n in conn.execute(
            select(jobs.c.tier, func.count())
            .select_from(attempts.join(jobs, attempts.c.job_id == jobs.c.id))
            .where(and_(attempts.c.outcome == Outcome.PREEMPTED,
                        attempts.c.finished_at >= now - timedelta(seconds=RECENT_S)))
            .group_by(jobs.c.tier)):
            out[tier]["preemptions"] = n
        p95 = queue_wait_p95(conn, jobs.c.tier,
                             jobs.c.finished_at >= now - timedelta(seconds=RECENT_S))
    for tier, value in p95.items():
        out[tier]["p95"] = value
    return out


def next_window(engine: Engine, now: datetime) -> NextWindow | None:
    """The window open now, else the one that opens next (None when there are none)."""
    best: NextWindow | None = None
    with engine.connect() as conn:
        rows = conn.execute(select(windows.c.name, windows.c.cron, windows.c.duration_s,
                                   windows.c.starts_at, windows.c.ends_at,
                                   windows.c.timezone)).all()
    for row in rows:
        found: NextWindow | None = None
        if row.cron:
            trigger = CronTrigger.from_crontab(row.cron, timezone=row.timezone or "UTC")
            span = timedelta(seconds=row.duration_s or 0)
            fire = trigger.get_next_fire_time(None, now - span)
            if fire is not None:
                found = NextWindow(row.name, fire, fire <= now)
        elif row.starts_at is not None and (row.ends_at is None or row.ends_at > now):
            found = NextWindow(row.name, row.starts_at, row.starts_at <= now)
        if found is not None and (best is None or (found.open_now, -found.opens_at.timestamp())
                                  > (best.open_now, -best.opens_at.timestamp())):
            best = found
    return best


def snapshot(settings: Settings, engine: Engine, client: redis.Redis) -> Snapshot:
    """One reading of every tier.

    Raises:
        ServiceUnavailable: Redis does not answer.
    """
    now = utcnow()
    admission = Admission(client, settings)
    counts = _counts(engine, now)
    sheds = read_sheds(client)
    states = []
    for tier in TIER_ORDER:
        load = admission.load(tier)
        c = counts[tier.value]
        states.append(TierState(
            tier=tier.value, queued=load.backlog, in_flight=int(c.get("in_flight", 0)),
            slots=load.slots, throughput_per_s=c.get("done", 0) / THROUGHPUT_S,
            wait_p95_s=c.get("p95"), objective_s=settings.policy(tier).queue_wait_objective_s,
            sheds=sum(n for (t, _), n in sheds.items() if t == tier.value),
            preemptions=int(c.get("preemptions", 0)), deferred=int(c.get("deferred", 0))))
    return Snapshot(at=now, tiers=states, next_window=next_window(engine, now))
