"""Worker-side transitions: claim, renew, finish; each a conditional UPDATE.

Invariant: a duplicate delivery, a late ack or a worker killed mid-task can never run a job's
effect twice or lose it, because a transition only happens when the row is still in the state
the caller saw, at the attempt the caller holds. Batches are claimed with one UPDATE and
finished with one transaction.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    Engine,
    and_,
    bindparam,
    case,
    column,
    delete,
    func,
    insert,
    or_,
    select,
    text,
    tuple_,
    update,
)
from sqlalchemy.engine import Connection

from orchestrator.costs.charge import Accountant, Charge, job_model
from orchestrator.db.models import JobState, Outcome, UTCDateTime, attempts, jobs, utcnow
from orchestrator.tiers import Tier

LEASE_LOST = "lease expired: worker lost"


@dataclass(frozen=True)
class Claim:
    """What a worker holds after claiming a job: the right to finish attempt ``attempt``."""

    job_id: str
    kind: str
    tenant: str
    tier: str
    payload: dict[str, Any]
    attempt: int
    max_attempts: int
    queued_at: datetime | None
    started_at: datetime
    lease_expires_at: datetime
    deadline: datetime | None
    parent_id: str | None
    took_over: bool
    items_done: int = 0
    preemptions: int = 0
    window: str | None = None

    @property
    def retries_used(self) -> int:
        """Attempts that count against ``max_attempts`` (preempted runs do not)."""
        return self.attempt - self.preemptions


@dataclass(frozen=True)
class Finish:
    """How one attempt ended; ``state`` QUEUED means "retry at ``requeue_at``"."""

    claim: Claim
    state: str
    outcome: str
    cpu_seconds: float
    wall_seconds: float
    result: Any = None
    result_ref: str | None = None
    error: str | None = None
    items: int = 0
    requeue_at: datetime | None = None
    batch_id: str | None = None
    batch_size: int | None = None
    checkpoint: int | None = None
    """For a preempted chunk: how many of its items are done (and their results on disk)."""

    @property
    def progress(self) -> int:
        """Items this attempt finished, to count into a bulk parent."""
        if self.state == JobState.SUCCEEDED:
            return max(self.items - self.claim.items_done, 0)
        if self.outcome == Outcome.PREEMPTED and self.checkpoint is not None:
            return max(self.checkpoint - self.claim.items_done, 0)
        return 0


class Transitions:
    """The worker's side of the job store."""

    engine: Engine
    #: prices and charges jobs as they end (``orchestrator.costs``); ``Services`` sets the
    #: deployment's price table
    accountant: Accountant = Accountant()

    def claim(self, job_id: str, worker: str, lease_s: Mapping[Tier, float], *,
              now: datetime | None = None) -> Claim | None:
        """Claim one job; see ``claim_many``."""
        claims = self.claim_many([job_id], worker, lease_s, now=now)
        return claims[0] if claims else None

    def claim_many(self, job_ids: Sequence[str], worker: str, lease_s: Mapping[Tier, float], *,
                   now: datetime | None = None, ahead: bool = False) -> list[Claim]:
        """Move queued jobs (or running ones whose lease expired) to running, attempt + 1.

        One UPDATE for all of them and one INSERT of their attempt rows (on PostgreSQL both in
        one statement, so one round trip). ``lease_s`` maps each tier to its lease length. Jobs
        not claimable (finished, cancelled, deferred, or held by a live lease) are left out of
        the result, which keeps the order of ``job_ids``.

        ``ahead``: claimed while the slot's current batch still runs, so a job's first start is
        not now: it is left unset, and the finish records when the run began (the claim's
        ``started_at``, which the runtime sets then). ``unclaim_many`` undoes such a claim.
        """
        if not job_ids:
            return []
        now = now or utcnow()
        params: dict[str, Any] = {"c_ids": list(job_ids), "c_now": now, "c_worker": worker,
                                  "c_started": None if ahead else now}
        for tier in Tier:
            params[f"c_lease_{tier.value}"] = now + timedelta(
                seconds=lease_s.get(tier, max(lease_s.values())))
        if self.engine.dialect.name == "postgresql":
            with self.engine.connect() as conn:  # one statement: autocommit is atomic
                rows = conn.execution_options(isolation_level="AUTOCOMMIT").execute(
                    _CLAIM_PG, {**params, "c_ids": params["c_ids"]}).all()
            lost = {row.id for row in rows if row.took_over}
        else:
            with self.engine.begin() as conn:
                rows = conn.execute(_CLAIM, params).all()
                if not rows:
                    return []
                again = [row.id for row in rows if row.attempts > 1]
                lost = set(conn.execute(_LOSE_ATTEMPTS, {"l_ids": again, "l_now": now})
                           .scalars()) if again else set()
                conn.execute(_NEW_ATTEMPT, [
                    {"a_job": row.id, "a_number": row.attempts, "a_worker": worker,
                     "a_now": now} for row in rows])
        by_id = {
            row.id: Claim(
                job_id=row.id, kind=row.kind, tenant=row.tenant, tier=row.tier,
                payload=row.payload, attempt=row.attempts, max_attempts=row.max_attempts,
                queued_at=row.queued_at, started_at=now, lease_expires_at=row.lease_expires_at,
                deadline=row.deadline, parent_id=row.parent_id, took_over=row.id in lost,
                items_done=row.items_done, preemptions=row.preemptions, window=row.window,
            )
            for row in rows
        }
        # One claim per job, even if an id came twice (a job sent again while its first
        # message still waited): the batch runs each job once.
        return [by_id[job_id] for job_id in dict.fromkeys(job_ids) if job_id in by_id]

    def unclaim_many(self, claims: Sequence[Claim]) -> set[str]:
        """Hand back jobs claimed ahead that will not run here: each goes back to queued with
        the attempt count it had and its attempt row is deleted, as if it was never claimed
        (a job the claim took over from a lost worker stays queued). Returns the ids still
        owned by these claims, i.e. the ones handed back."""
        if not claims:
            return set()
        with self.engine.begin() as conn:
            owned = set(conn.execute(_UNCLAIM.where(
                tuple_(jobs.c.id, jobs.c.attempts).in_([(c.job_id, c.attempt) for c in claims])
            )).scalars())
            handed = [{"d_job": c.job_id, "d_number": c.attempt}
                      for c in claims if c.job_id in owned]
            if handed:
                conn.execute(_DROP_ATTEMPT, handed)
        return owned

    def renew_leases(self, claims: Sequence[Claim], lease_s: float, *,
                     now: datetime | None = None) -> set[str]:
        """Extend held leases; return the ids still owned by these attempts."""
        if not claims:
            return set()
        until = (now or utcnow()) + timedelta(seconds=lease_s)
        owned: set[str] = set()
        with self.engine.begin() as conn:
            for claim in claims:
                if conn.execute(_RENEW, {"r_id": claim.job_id, "r_attempt": claim.attempt,
                                         "r_until": until}).rowcount == 1:
                    owned.add(claim.job_id)
        return owned

    def renew_lease(self, claim: Claim, lease_s: float, *, now: datetime | None = None) -> bool:
        """Extend a held lease; False when the attempt no longer owns the job."""
        return bool(self.renew_leases([claim], lease_s, now=now))

    def finish(self, claim: Claim, **fields: Any) -> bool:
        """End one attempt; see ``finish_many``. Returns whether it still owned the job."""
        return bool(self.finish_many([Finish(claim, **fields)]))

    def finish_many(self, done: Sequence[Finish], *, now: datetime | None = None) -> set[str]:
        """End attempts: succeeded, failed, dead, or back to queued for a retry.

        In one transaction: lock the rows these attempts still own, update them with one
        executemany, and close every attempt row. An attempt that no longer owns its job (it
        was cancelled, or taken over after its lease expired) changes nothing about the job and
        is recorded as cancelled or lost. Returns the ids of the jobs that were updated.

        On PostgreSQL, plain jobs that ended (the common case: a job or a batch that ran) are
        finished with a single statement instead: the conditional UPDATE of the jobs and the
        close of their attempts together.
        """
        if not done:
            return set()
        now = now or utcnow()
        if self.engine.dialect.name == "postgresql" and all(
                d.claim.parent_id is None and d.state != JobState.QUEUED
                and d.outcome != Outcome.PREEMPTED for d in done):
            return self._finish_ended_pg(done, now)
        ids = [d.claim.job_id for d in done]
        lock = _LOCK_PG if self.engine.dialect.name == "postgresql" else _LOCK
        with self.engine.begin() as conn:
            current = {row.id: row for row in conn.execute(lock, {"k_ids": ids})}
            owned = [d for d in done if _still_owns(current.get(d.claim.job_id), d.claim)]
            for stmt, params in _finish_statements(owned, now):
                conn.execute(stmt, params)
            parents = _parent_progress(owned)
            if parents:
                _advance_parents(conn, parents, now)
            owned_ids = {d.claim.job_id for d in owned}
            costs = self.accountant.attempt_costs(conn, [
                (d.claim.job_id, d.claim.attempt, d.claim.tier, d.cpu_seconds, d.wall_seconds)
                for d in done])
            conn.execute(_CLOSE_ATTEMPT, [
                {"a_job": d.claim.job_id, "a_number": d.claim.attempt, "a_now": now,
                 "a_outcome": d.outcome if d.claim.job_id in owned_ids
                 else _displaced(current.get(d.claim.job_id)),
                 "a_error": d.error, "a_cpu": d.cpu_seconds, "a_wall": d.wall_seconds,
                 "a_cost": cost, "a_started": d.claim.started_at}
                for d, cost in zip(done, costs, strict=True)
            ])
            charges = self.accountant.charge(conn, ids)  # jobs that ended: cost, written once
        self.accountant.committed(charges)
        return owned_ids

    def _finish_ended_pg(self, done: Sequence[Finish], now: datetime) -> set[str]:
        """Plain jobs that ended, on PostgreSQL: one statement finishes and charges them.

        Each attempt's charge before its window multiplier is priced here; the statement
        multiplies by the attempt row's ``price_multiplier`` and rounds half to even to 1e-8
        (as ``PriceTable.compute_charge``), and the job's cost adds its item charge and its
        earlier attempts' stored charges. A job that was not owned any more (cancelled while
        it ran) is charged by ``Accountant.charge`` afterwards.
        """
        prices, models = self.accountant.prices, self.accountant.models
        rows = []
        for d in done:
            model = job_model(d.claim.kind, d.claim.payload, models)
            rows.append({**_finish_params(d), **_ended_params(d), "f_outcome": d.outcome,
                         "f_model": model, "f_item_cost": prices.item_charge(model, d.items),
                         "f_base": prices.unscaled_charge(d.claim.tier, d.cpu_seconds,
                                                          d.wall_seconds)})
        params: dict[str, Any] = {
            f"a_{name}": [row[f"f_{name}"] for row in rows] for name in _ENDED_ARRAYS}
        # The results as one JSON array, not a text[] of documents: psycopg escapes every
        # quote of every element of a text array (a regex pass over each 2 KB embedding).
        params["a_results"] = json.dumps([row["f_result"] for row in rows])
        params["f_now"] = now
        with self.engine.connect() as conn:  # one statement: autocommit is atomic
            ended = conn.execution_options(isolation_level="AUTOCOMMIT").execute(
                _FINISH_ENDED_PG, params).all()
        charges = [Charge(row.id, row.tenant, row.tier, row.kind, row.model, row.cost)
                   for row in ended]
        owned = {row.id for row in ended}
        displaced = [d.claim.job_id for d in done if d.claim.job_id not in owned]
        if displaced:
            with self.engine.begin() as conn:
                charges += self.accountant.charge(conn, displaced)
        self.accountant.committed(charges)
        return owned

    def mark_dead_if_exhausted(self, job_id: str, *, now: datetime | None = None) -> bool:
        """A running job whose lease expired with no attempts left is dead (its worker was lost)."""
        now = now or utcnow()
        charges: list[Charge] = []
        with self.engine.begin() as conn:
            done = conn.execute(
                update(jobs)
                .where(and_(
                    jobs.c.id == job_id, jobs.c.state == JobState.RUNNING,
                    jobs.c.lease_expires_at < now,
                    jobs.c.attempts - jobs.c.preemptions >= jobs.c.max_attempts,
                ))
                .values(state=JobState.DEAD, finished_at=now, lease_expires_at=None,
                        error="worker lost on the last attempt (lease expired)")
            ).rowcount == 1
            if done:
                conn.execute(
                    update(attempts)
                    .where(and_(attempts.c.job_id == job_id,
                                attempts.c.outcome == Outcome.RUNNING))
                    .values(outcome=Outcome.LOST, finished_at=now, error=LEASE_LOST)
                )
                charges = self.accountant.charge(conn, [job_id])
        self.accountant.committed(charges)
        return done


# --- statements, built once --------------------------------------------------------------------
# Built at import with bindparam() rather than per call: SQLAlchemy then skips statement
# construction, coercion and cache-key generation on the hot path (about half the client CPU
# of a claim + finish, bench/store_variants.py).

_T = UTCDateTime()


def _p(name: str) -> Any:
    return bindparam(name, type_=_T)


_CLAIM = (
    update(jobs)
    .where(and_(
        jobs.c.id.in_(bindparam("c_ids", expanding=True)),
        or_(jobs.c.state == JobState.QUEUED,
            and_(jobs.c.state == JobState.RUNNING, jobs.c.lease_expires_at < _p("c_now"))),
        jobs.c.attempts - jobs.c.preemptions < jobs.c.max_attempts,
    ))
    .values(
        state=JobState.RUNNING, attempts=jobs.c.attempts + 1,
        lease_expires_at=case({t.value: _p(f"c_lease_{t.value}") for t in Tier},
                              value=jobs.c.tier, else_=_p("c_lease_offline")),
        started_at=func.coalesce(jobs.c.started_at, _p("c_started")),
    )
    .returning(
        jobs.c.id, jobs.c.kind, jobs.c.tenant, jobs.c.tier, jobs.c.payload,
        jobs.c.attempts, jobs.c.max_attempts, jobs.c.queued_at,
        jobs.c.lease_expires_at, jobs.c.deadline, jobs.c.parent_id,
        jobs.c.items_done, jobs.c.preemptions, jobs.c.window,
    )
)
_LOSE_ATTEMPTS = (
    update(attempts)
    .where(and_(attempts.c.job_id.in_(bindparam("l_ids", expanding=True)),
                attempts.c.outcome == Outcome.RUNNING))
    .values(outcome=Outcome.LOST, finished_at=_p("l_now"), error=LEASE_LOST)
    .returning(attempts.c.job_id)
)
_NEW_ATTEMPT = insert(attempts).values(
    job_id=bindparam("a_job"), number=bindparam("a_number"), worker=bindparam("a_worker"),
    started_at=_p("a_now"), outcome=Outcome.RUNNING,
)
# PostgreSQL: the claim, the lost attempts' close and the new attempts' insert in one statement.
# The data-modifying CTEs share one snapshot, so "lost" never sees the attempt "fresh" inserts.
_CLAIM_PG = text(f"""
WITH claimed AS (
  UPDATE jobs SET state = '{JobState.RUNNING}', attempts = attempts + 1,
    lease_expires_at = CASE tier
      {" ".join(f"WHEN '{t.value}' THEN :c_lease_{t.value}" for t in Tier)}
      ELSE :c_lease_offline END,
    started_at = coalesce(started_at, :c_started)
  WHERE id = ANY(:c_ids) AND attempts - preemptions < max_attempts
    AND CASE state WHEN '{JobState.QUEUED}' THEN true
                   WHEN '{JobState.RUNNING}' THEN lease_expires_at < :c_now ELSE false END
  RETURNING id, kind, tenant, tier, payload, attempts, max_attempts, queued_at,
    lease_expires_at, deadline, parent_id, items_done, preemptions, "window"
), lost AS (
  UPDATE attempts SET outcome = '{Outcome.LOST}', finished_at = :c_now, error = :c_lost
  WHERE job_id = ANY(:c_ids) AND job_id IN (SELECT id FROM claimed WHERE attempts > 1)
    AND outcome = '{Outcome.RUNNING}'
  RETURNING job_id
), fresh AS (
  INSERT INTO attempts (job_id, number, worker, started_at, outcome)
  SELECT id, attempts, :c_worker, :c_now, '{Outcome.RUNNING}' FROM claimed
)
SELECT claimed.*, claimed.id IN (SELECT job_id FROM lost) AS took_over FROM claimed
""").bindparams(
    bindparam("c_now", type_=_T), bindparam("c_started", type_=_T),
    bindparam("c_lost", value=LEASE_LOST),
    *(bindparam(f"c_lease_{t.value}", type_=_T) for t in Tier),
).columns(
    jobs.c.id, jobs.c.kind, jobs.c.tenant, jobs.c.tier, jobs.c.payload, jobs.c.attempts,
    jobs.c.max_attempts, jobs.c.queued_at, jobs.c.lease_expires_at, jobs.c.deadline,
    jobs.c.parent_id, jobs.c.items_done, jobs.c.preemptions, jobs.c.window,
    column("took_over", Boolean),
)
_UNCLAIM = (  # narrowed to the (id, attempt) pairs handed back
    update(jobs)
    .where(jobs.c.state == JobState.RUNNING)
    .values(state=JobState.QUEUED, attempts=jobs.c.attempts - 1, lease_expires_at=None)
    .returning(jobs.c.id)
)
_DROP_ATTEMPT = delete(attempts).where(and_(
    attempts.c.job_id == bindparam("d_job"), attempts.c.number == bindparam("d_number"),
    attempts.c.outcome == Outcome.RUNNING))
_RENEW = (
    update(jobs)
    .where(and_(jobs.c.id == bindparam("r_id"), jobs.c.state == JobState.RUNNING,
                jobs.c.attempts == bindparam("r_attempt")))
    .values(lease_expires_at=_p("r_until"))
)
_LOCK_COLUMNS = (jobs.c.id, jobs.c.state, jobs.c.attempts)
_LOCK = select(*_LOCK_COLUMNS).where(jobs.c.id.in_(bindparam("k_ids", expanding=True)))
# SQLite serialises writers with BEGIN IMMEDIATE; PostgreSQL needs the row locks.
_LOCK_PG = _LOCK.with_for_update()
_CLOSE_ATTEMPT = (
    update(attempts)
    .where(and_(attempts.c.job_id == bindparam("a_job"),
                attempts.c.number == bindparam("a_number")))
    .values(outcome=bindparam("a_outcome"), started_at=_p("a_started"),
            finished_at=_p("a_now"), error=bindparam("a_error"),
            cpu_seconds=bindparam("a_cpu"), wall_seconds=bindparam("a_wall"),
            cost=bindparam("a_cost"))
)
_OWNED = and_(jobs.c.id == bindparam("f_id"), jobs.c.state == JobState.RUNNING,
              jobs.c.attempts == bindparam("f_attempt"))
_SPENT = {
    "lease_expires_at": None,
    "error": bindparam("f_error"),
    "cpu_seconds": jobs.c.cpu_seconds + bindparam("f_cpu"),
    "wall_seconds": jobs.c.wall_seconds + bindparam("f_wall"),
    "queue_seconds": func.coalesce(jobs.c.queue_seconds, 0.0) + bindparam("f_waited"),
    "started_at": func.coalesce(jobs.c.started_at, _p("f_started")),
}
_RETRY = update(jobs).where(_OWNED).values(
    **_SPENT, state=JobState.QUEUED, queued_at=_p("f_requeue_at"))
_PREEMPTED = update(jobs).where(_OWNED).values(
    **_SPENT, state=bindparam("f_to"), queued_at=_p("f_now"),
    preemptions=jobs.c.preemptions + 1, items_done=bindparam("f_checkpoint"))
_ENDED = update(jobs).where(_OWNED).values(
    **_SPENT, state=bindparam("f_state"), finished_at=_p("f_now"),
    result=bindparam("f_result", type_=JSON), result_ref=bindparam("f_ref"),
    items=bindparam("f_items"), batch_id=bindparam("f_batch"),
    batch_size=bindparam("f_batch_size"), items_done=bindparam("f_done"),
)
# PostgreSQL, plain jobs that ended: their UPDATE and their attempts' close in one statement,
# the rows passed as arrays. The joins also filter on "= ANY(ids)": the planner guesses 100
# rows for unnest() and could otherwise scan the whole jobs and attempts tables per finish.
# "owned" and the job read in the CASE see the same snapshot: where "owned" lacks a job, this
# statement did not change its row, so its state tells whether it was cancelled or taken over.
_ENDED_ARRAYS = {
    "id": "text", "attempt": "int", "state": "text", "outcome": "text", "error": "text",
    "cpu": "float8", "wall": "float8", "waited": "float8", "ref": "text",
    "items": "int", "batch": "text", "batch_size": "int", "done": "int",
    "base": "numeric", "item_cost": "numeric", "model": "text", "started": "timestamptz",
}


def _half_even(x: str) -> str:
    """SQL rounding of a non-negative numeric to 1e-8, half to even (``round_money``)."""
    scaled = f"(({x}) * 100000000)"
    return (f"(CASE WHEN {scaled} - trunc({scaled}) = 0.5 AND mod(trunc({scaled}), 2) = 0 "
            f"THEN trunc({scaled}) / 100000000 ELSE round({x}, 8) END)")


#: Each row's attempt charge: its unscaled price times the attempt row's window multiplier
#: (read once per row in "input"), rounded like ``round_money``.
_ATTEMPT_COST = _half_even("i.base * i.multiplier")

_FINISH_ENDED_PG = text(f"""
WITH input AS (
  SELECT i.*, r.result, coalesce((SELECT m.price_multiplier FROM attempts m
                        WHERE m.job_id = i.id AND m.number = i.attempt), 1) AS multiplier
  FROM unnest({", ".join(f"CAST(:a_{n} AS {t}[])" for n, t in _ENDED_ARRAYS.items())})
    WITH ORDINALITY AS i({", ".join(_ENDED_ARRAYS)}, n)
  JOIN json_array_elements(CAST(:a_results AS json)) WITH ORDINALITY AS r(result, n)
    ON r.n = i.n
), owned AS (
  UPDATE jobs SET state = i.state, lease_expires_at = NULL, error = i.error,
    cpu_seconds = jobs.cpu_seconds + i.cpu, wall_seconds = jobs.wall_seconds + i.wall,
    queue_seconds = coalesce(jobs.queue_seconds, 0) + i.waited, finished_at = :f_now,
    started_at = coalesce(jobs.started_at, i.started),
    result = i.result, result_ref = i.ref, items = i.items, batch_id = i.batch,
    batch_size = i.batch_size, items_done = i.done, model = i.model,
    cost = {_ATTEMPT_COST} + i.item_cost
      + coalesce((SELECT sum(a.cost) FROM attempts a
                  WHERE a.job_id = i.id AND a.number < i.attempt), 0)
  FROM input i
  WHERE jobs.id = ANY(CAST(:a_id AS text[])) AND jobs.id = i.id
    AND jobs.state = '{JobState.RUNNING}' AND jobs.attempts = i.attempt
  RETURNING jobs.id, jobs.tenant, jobs.tier, jobs.kind, jobs.model, jobs.cost
), closed AS (
  UPDATE attempts SET
    outcome = CASE WHEN i.id IN (SELECT id FROM owned) THEN i.outcome
      WHEN (SELECT state FROM jobs WHERE id = i.id) = '{JobState.CANCELLED}'
        THEN '{Outcome.CANCELLED}'
      ELSE '{Outcome.LOST}' END,
    started_at = i.started, finished_at = :f_now, error = i.error, cpu_seconds = i.cpu,
    wall_seconds = i.wall, cost = {_ATTEMPT_COST}
  FROM input i
  WHERE attempts.job_id = ANY(CAST(:a_id AS text[])) AND attempts.job_id = i.id
    AND attempts.number = i.attempt
)
SELECT * FROM owned
""").bindparams(bindparam("f_now", type_=_T))
_PARENT_PROGRESS = update(jobs).where(jobs.c.id == bindparam("p_id")).values(
    items_done=jobs.c.items_done + bindparam("p_items"),
    cpu_seconds=jobs.c.cpu_seconds + bindparam("p_cpu"),
    wall_seconds=jobs.c.wall_seconds + bindparam("p_wall"),
    items=jobs.c["items"] + bindparam("p_items"),
)
_PARENT_FAILED = (
    update(jobs)
    .where(and_(jobs.c.id == bindparam("p_id"), jobs.c.state.in_(JobState.ACTIVE)))
    .values(state=JobState.FAILED, finished_at=_p("p_now"), error=bindparam("p_error"))
)
_PARENT_COMPLETE = (
    update(jobs)
    .where(and_(
        jobs.c.id == bindparam("p_id"), jobs.c.state.in_(JobState.ACTIVE),
        jobs.c.items_total.is_not(None), jobs.c.items_done >= jobs.c.items_total,
    ))
    .values(state=JobState.SUCCEEDED, finished_at=_p("p_now"))
)


def _still_owns(row: Any, claim: Claim) -> bool:
    return row is not None and row.state == JobState.RUNNING and row.attempts == claim.attempt


def _displaced(row: Any) -> str:
    return Outcome.CANCELLED if row is not None and row.state == JobState.CANCELLED \
        else Outcome.LOST


def _finish_params(d: Finish) -> dict[str, Any]:
    waited = 0.0
    if d.claim.queued_at is not None:
        waited = max((d.claim.started_at - d.claim.queued_at).total_seconds(), 0.0)
    return {"f_id": d.claim.job_id, "f_attempt": d.claim.attempt, "f_error": d.error,
            "f_cpu": d.cpu_seconds, "f_wall": d.wall_seconds, "f_waited": waited,
            "f_started": d.claim.started_at}


def _ended_params(d: Finish) -> dict[str, Any]:
    return {"f_state": d.state, "f_result": d.result, "f_ref": d.result_ref,
            "f_items": d.items, "f_batch": d.batch_id, "f_batch_size": d.batch_size,
            "f_done": d.items if d.state == JobState.SUCCEEDED else d.claim.items_done}


def _finish_statements(owned: Sequence[Finish], now: datetime) -> list[tuple[Any, list[Any]]]:
    """One executemany for the retries, one for the preempted, one for the jobs that ended."""
    out: list[tuple[Any, list[Any]]] = []
    retries = [d for d in owned if d.state == JobState.QUEUED and d.outcome != Outcome.PREEMPTED]
    # Preempted: back to queued (yielded to a higher tier) or deferred (its window closed).
    if retries:
        out.append((_RETRY, [{**_finish_params(d), "f_requeue_at": d.requeue_at or now}
                             for d in retries]))
    preempted = [d for d in owned if d.outcome == Outcome.PREEMPTED]
    if preempted:
        out.append((_PREEMPTED, [{**_finish_params(d), "f_now": now, "f_to": d.state,
                                  "f_checkpoint": d.checkpoint or 0} for d in preempted]))
    ended = [d for d in owned if d.state != JobState.QUEUED and d.outcome != Outcome.PREEMPTED]
    if ended:
        out.append((_ENDED, [{**_finish_params(d), **_ended_params(d), "f_now": now}
                             for d in ended]))
    return out


def _parent_progress(owned: Sequence[Finish]) -> dict[str, tuple[int, float, float, str | None]]:
    """Per parent: items done, CPU and wall seconds added, and the first chunk failure.

    Every attempt of a chunk (retried, preempted or finished) adds the CPU it used; items
    count once, as the checkpoint moves forward."""
    progress: dict[str, tuple[int, float, float, str | None]] = {}
    for d in owned:
        parent = d.claim.parent_id
        if parent is None:
            continue
        items, cpu, wall, failure = progress.get(parent, (0, 0.0, 0.0, None))
        items += d.progress  # every attempt's CPU counts, each item once
        if d.state in (JobState.FAILED, JobState.DEAD) and failure is None:
            failure = f"chunk {d.claim.job_id} {d.state}: {d.error}"
        progress[parent] = (items, cpu + d.cpu_seconds, wall + d.wall_seconds, failure)
    return progress


def _advance_parents(conn: Connection, progress: dict[str, tuple[int, float, float, str | None]],
                     now: datetime) -> None:
    """Count finished chunks into their bulk parent, exactly once (same transaction)."""
    for parent, (items, cpu, wall, failure) in progress.items():
        conn.execute(_PARENT_PROGRESS, {"p_id": parent, "p_items": items, "p_cpu": cpu,
                                        "p_wall": wall})
        if failure is not None:
            conn.execute(_PARENT_FAILED, {"p_id": parent, "p_now": now, "p_error": failure})
        complete_parent(conn, parent, now)


def complete_parent(conn: Connection, parent: str, now: datetime) -> bool:
    """A bulk parent whose every item is done (and whose total is known) has succeeded."""
    return conn.execute(_PARENT_COMPLETE, {"p_id": parent, "p_now": now}).rowcount == 1
