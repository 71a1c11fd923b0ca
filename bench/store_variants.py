"""Prototypes of a cheaper claim + finish, to put numbers on proposed changes to ``JobStore``.

Each builder takes an engine and returns ``step(job_id)``, which claims a queued job and finishes
it as succeeded with the same effect on the rows as ``JobStore.claim`` + ``JobStore.finish``:

* ``shipped``: ``JobStore`` itself.
* ``prebuilt``: the statements ``JobStore`` sends for one job (claim: UPDATE ... RETURNING,
  INSERT attempt; finish: SELECT ... FOR UPDATE, UPDATE job, UPDATE attempt) in the same two
  transactions, but built once at import with ``bindparam()`` instead of per call, so
  SQLAlchemy skips statement construction, coercion and cache-key generation.
* ``cte``: one statement per transition (data-modifying CTEs), each its own implicit
  transaction: 2 round trips per job instead of 2 BEGIN, 5 statements and 2 COMMIT (plus a
  pre-ping per checkout).

Only the benchmark uses these; they are not wired into the worker.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from sqlalchemy import Engine, and_, bindparam, case, func, insert, or_, select, text, update

from orchestrator.db.models import JobState, Outcome, UTCDateTime, attempts, jobs
from orchestrator.db.store import JobStore, utcnow
from orchestrator.tiers import Tier

LEASES = {Tier.INTERACTIVE: 30.0, Tier.NEARLINE: 60.0, Tier.OFFLINE: 120.0}
RESULT = {"i": 0}
Step = Callable[[str], None]

_T = UTCDateTime()


def _lease_params(now: Any) -> dict[str, Any]:
    out = {f"lease_{tier}": now + timedelta(seconds=s) for tier, s in LEASES.items()}
    out["lease_max"] = now + timedelta(seconds=max(LEASES.values()))
    return out


def shipped(engine: Engine) -> Step:
    store = JobStore(engine)

    def step(job_id: str) -> None:
        claim = store.claim(job_id, "bench:variant", LEASES)
        assert claim is not None
        store.finish(claim, state=JobState.SUCCEEDED, outcome=Outcome.SUCCEEDED,
                     cpu_seconds=0.0, wall_seconds=0.0, result=RESULT, items=1)
    return step


_CLAIM = (
    update(jobs)
    .where(and_(
        jobs.c.id == bindparam("b_id"),
        or_(jobs.c.state == JobState.QUEUED,
            and_(jobs.c.state == JobState.RUNNING,
                 jobs.c.lease_expires_at < bindparam("b_now", type_=_T))),
        jobs.c.attempts < jobs.c.max_attempts,
    ))
    .values(
        state=JobState.RUNNING, attempts=jobs.c.attempts + 1,
        lease_expires_at=case({t: bindparam(f"lease_{t}", type_=_T) for t in LEASES},
                              value=jobs.c.tier, else_=bindparam("lease_max", type_=_T)),
        started_at=func.coalesce(jobs.c.started_at, bindparam("b_now", type_=_T)),
    )
    .returning(jobs.c.kind, jobs.c.tenant, jobs.c.tier, jobs.c.payload, jobs.c.attempts,
               jobs.c.max_attempts, jobs.c.queued_at, jobs.c.lease_expires_at, jobs.c.deadline)
)
_TAKE_OVER = (
    update(attempts)
    .where(and_(attempts.c.job_id == bindparam("b_id"), attempts.c.outcome == Outcome.RUNNING))
    .values(outcome=Outcome.LOST, finished_at=bindparam("b_now", type_=_T),
            error="lease expired: worker lost")
)
_NEW_ATTEMPT = insert(attempts).values(
    job_id=bindparam("b_id"), number=bindparam("b_number"), worker=bindparam("b_worker"),
    started_at=bindparam("b_now", type_=_T), outcome=Outcome.RUNNING,
)
_LOCK = (
    select(jobs.c.id, jobs.c.state, jobs.c.attempts)
    .where(jobs.c.id == bindparam("b_id"))
    .with_for_update()
)
_FINISH_JOB = (
    update(jobs)
    .where(and_(jobs.c.id == bindparam("b_id"), jobs.c.state == JobState.RUNNING,
                jobs.c.attempts == bindparam("b_attempt")))
    .values(
        state=bindparam("b_state"), lease_expires_at=None, error=bindparam("b_error"),
        cpu_seconds=jobs.c.cpu_seconds + bindparam("b_cpu"),
        wall_seconds=jobs.c.wall_seconds + bindparam("b_wall"),
        queue_seconds=func.coalesce(jobs.c.queue_seconds, 0.0) + bindparam("b_waited"),
        finished_at=bindparam("b_now", type_=_T),
        result=bindparam("b_result", type_=jobs.c.result.type), items=bindparam("b_items"),
    )
)
_FINISH_ATTEMPT = (
    update(attempts)
    .where(and_(attempts.c.job_id == bindparam("b_id"),
                attempts.c.number == bindparam("b_attempt")))
    .values(outcome=bindparam("b_outcome"), finished_at=bindparam("b_now", type_=_T),
            error=bindparam("b_error"), cpu_seconds=bindparam("b_cpu"),
            wall_seconds=bindparam("b_wall"))
)


def prebuilt(engine: Engine) -> Step:
    def step(job_id: str) -> None:
        now = utcnow()
        with engine.begin() as conn:
            row = conn.execute(_CLAIM, {"b_id": job_id, "b_now": now, **_lease_params(now)}
                               ).one()
            if row.attempts > 1:
                conn.execute(_TAKE_OVER, {"b_id": job_id, "b_now": now})
            conn.execute(_NEW_ATTEMPT, {"b_id": job_id, "b_number": row.attempts,
                                        "b_worker": "bench:variant", "b_now": now})
        done = {"b_id": job_id, "b_attempt": row.attempts, "b_now": utcnow(), "b_error": None,
                "b_cpu": 0.0, "b_wall": 0.0}
        with engine.begin() as conn:
            current = conn.execute(_LOCK, {"b_id": job_id}).one()
            assert current.state == JobState.RUNNING and current.attempts == row.attempts
            conn.execute(_FINISH_JOB, {**done, "b_state": JobState.SUCCEEDED, "b_waited": 0.0,
                                       "b_result": RESULT, "b_items": 1})
            conn.execute(_FINISH_ATTEMPT, {**done, "b_outcome": Outcome.SUCCEEDED})
    return step


_CLAIM_CTE = text("""
WITH claimed AS (
  UPDATE jobs SET state = 'running', attempts = attempts + 1,
    lease_expires_at = CASE tier WHEN 'interactive' THEN :lease_interactive
      WHEN 'nearline' THEN :lease_nearline WHEN 'offline' THEN :lease_offline
      ELSE :lease_max END,
    started_at = coalesce(started_at, :now)
  WHERE id = :id AND attempts < max_attempts
    AND (state = 'queued' OR (state = 'running' AND lease_expires_at < :now))
  RETURNING id, kind, tenant, tier, payload, attempts, max_attempts, queued_at,
    lease_expires_at, deadline
), lost AS (
  UPDATE attempts SET outcome = 'lost', finished_at = :now,
    error = 'lease expired: worker lost'
  WHERE job_id IN (SELECT id FROM claimed) AND outcome = 'running'
  RETURNING 1
), attempt AS (
  INSERT INTO attempts (job_id, number, worker, started_at, outcome)
  SELECT id, attempts, :worker, :now, 'running' FROM claimed
)
SELECT claimed.*, (SELECT count(*) FROM lost) > 0 AS took_over FROM claimed
""")
_FINISH_CTE = text("""
WITH owned AS (
  UPDATE jobs SET state = :state, lease_expires_at = NULL, error = :error,
    cpu_seconds = cpu_seconds + :cpu, wall_seconds = wall_seconds + :wall,
    queue_seconds = coalesce(queue_seconds, 0) + :waited, finished_at = :now,
    result = CAST(:result AS json), items = :items
  WHERE id = :id AND state = 'running' AND attempts = :attempt
  RETURNING id
)
UPDATE attempts SET
  outcome = CASE WHEN EXISTS (SELECT 1 FROM owned) THEN :outcome
    WHEN (SELECT state FROM jobs WHERE id = :id) = 'cancelled' THEN 'cancelled'
    ELSE 'lost' END,
  finished_at = :now, error = :error, cpu_seconds = :cpu, wall_seconds = :wall
WHERE job_id = :id AND number = :attempt
RETURNING (SELECT count(*) FROM owned) = 1 AS owned
""")


def cte(engine: Engine) -> Step:
    auto = engine.execution_options(isolation_level="AUTOCOMMIT")

    def step(job_id: str) -> None:
        now = utcnow()
        with auto.connect() as conn:  # the job runs between claim and finish: two checkouts
            row = conn.execute(_CLAIM_CTE, {"id": job_id, "now": now, "worker": "bench:variant",
                                            **_lease_params(now)}).one()
        with auto.connect() as conn:
            owned = conn.execute(_FINISH_CTE, {
                "id": job_id, "attempt": row.attempts, "state": JobState.SUCCEEDED,
                "outcome": Outcome.SUCCEEDED, "error": None, "cpu": 0.0, "wall": 0.0,
                "waited": 0.0, "now": utcnow(), "result": json.dumps(RESULT), "items": 1,
            }).scalar_one()
        assert owned
    return step


BUILDERS: dict[str, Callable[[Engine], Step]] = {
    "shipped": shipped, "prebuilt": prebuilt, "cte": cte,
}
