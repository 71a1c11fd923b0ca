"""The live state of the tiers, read for ``orchestrator top`` (one snapshot per refresh).

Queue depth and worker slots come from Redis (the admission check's own reading); in-flight,
throughput, queue-wait p95, preemptions and deferred work from the database; sheds from the
counters admission control keeps in Redis; the next window from the ``windows`` table.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

import redis
from sqlalchemy import and_, func, select
from sqlalchemy.engine import Engine

from orchestrator.admission import Admission, read_sheds
from orchestrator.costs.report import queue_wait_p95
from orchestrator.db.engine import reading
from orchestrator.db.models import JobState, Outcome, attempts, jobs, utcnow
from orchestrator.settings import Settings
from orchestrator.tiers import TIER_ORDER
from orchestrator.window_catalog import WindowCatalog

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
    #: windows open now, then the next openings of the others (soonest first, at most 3)
    windows: list[NextWindow]


def _counts(engine: Engine, now: datetime) -> dict[str, dict[str, float]]:
    leaf = jobs.c.lease_expires_at.is_not(None)  # a bulk parent holds no lease
    out: dict[str, dict[str, float]] = {t.value: {} for t in TIER_ORDER}
    with reading(engine) as conn:
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


def window_view(engine: Engine, settings: Settings, now: datetime, *, upcoming: int = 3
                ) -> list[NextWindow]:
    """Every window open now (earliest opened first), then the next ``upcoming`` openings.

    Windows are the scheduler's own view of them (``WindowCatalog``: the built-in ``offpeak``,
    the ``windows`` table and the config file), evaluated by the same code.
    """
    open_now: list[NextWindow] = []
    later: list[NextWindow] = []
    for name, spec in WindowCatalog(engine, settings).all().items():
        opening = spec.opening(now)
        if opening is not None:
            open_now.append(NextWindow(name, opening[0], True))
        else:
            opens = spec.next_open(now)
            if opens is not None:
                later.append(NextWindow(name, opens, False))
    open_now.sort(key=lambda w: (w.opens_at, w.name))
    later.sort(key=lambda w: (w.opens_at, w.name))
    return open_now + later[:upcoming]


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
    return Snapshot(at=now, tiers=states, windows=window_view(engine, settings, now))
