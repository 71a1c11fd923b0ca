"""Worker-side transitions: claim, renew, finish; each a conditional UPDATE.

Invariant: a duplicate delivery, a late ack or a worker killed mid-task can never run a job's
effect twice or lose it, because a transition only happens when the row is still in the state
the caller saw, at the attempt the caller holds. Batches are claimed with one UPDATE and
finished with one transaction.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    JSON,
    Engine,
    and_,
    bindparam,
    case,
    func,
    insert,
    literal,
    or_,
    select,
    update,
)
from sqlalchemy.engine import Connection

from orchestrator.costs.charge import Accountant, Charge
from orchestrator.db.models import JobState, Outcome, UTCDateTime, attempts, jobs, utcnow
from orchestrator.tiers import Tier


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
                   now: datetime | None = None) -> list[Claim]:
        """Move queued jobs (or running ones whose lease expired) to running, attempt + 1.

        One UPDATE for all of them and one INSERT of their attempt rows. ``lease_s`` maps each
        tier to its lease length. Jobs not claimable (finished, cancelled, deferred, or held by
        a live lease) are left out of the result, which keeps the order of ``job_ids``.
        """
        if not job_ids:
            return []
        now = now or utcnow()
        lease = case(
            {tier: literal(now + timedelta(seconds=s), UTCDateTime())
             for tier, s in lease_s.items()},
            value=jobs.c.tier,
            else_=literal(now + timedelta(seconds=max(lease_s.values())), UTCDateTime()),
        )
        claimable = or_(
            jobs.c.state == JobState.QUEUED,
            and_(jobs.c.state == JobState.RUNNING, jobs.c.lease_expires_at < now),
        )
        with self.engine.begin() as conn:
            rows = conn.execute(
                update(jobs)
                .where(and_(jobs.c.id.in_(list(job_ids)), claimable,
                            jobs.c.attempts - jobs.c.preemptions < jobs.c.max_attempts))
                .values(
                    state=JobState.RUNNING, attempts=jobs.c.attempts + 1, lease_expires_at=lease,
                    started_at=func.coalesce(jobs.c.started_at, now),
                )
                .returning(
                    jobs.c.id, jobs.c.kind, jobs.c.tenant, jobs.c.tier, jobs.c.payload,
                    jobs.c.attempts, jobs.c.max_attempts, jobs.c.queued_at,
                    jobs.c.lease_expires_at, jobs.c.deadline, jobs.c.parent_id,
                    jobs.c.items_done, jobs.c.preemptions,
                )
            ).all()
            if not rows:
                return []
            again = [row.id for row in rows if row.attempts > 1]
            lost: set[str] = set()
            if again:
                lost = set(conn.execute(
                    update(attempts)
                    .where(and_(attempts.c.job_id.in_(again),
                                attempts.c.outcome == Outcome.RUNNING))
                    .values(outcome=Outcome.LOST, finished_at=now,
                            error="lease expired: worker lost")
                    .returning(attempts.c.job_id)
                ).scalars())
            conn.execute(insert(attempts), [
                {"job_id": row.id, "number": row.attempts, "worker": worker, "started_at": now,
                 "outcome": Outcome.RUNNING} for row in rows
            ])
        by_id = {
            row.id: Claim(
                job_id=row.id, kind=row.kind, tenant=row.tenant, tier=row.tier,
                payload=row.payload, attempt=row.attempts, max_attempts=row.max_attempts,
                queued_at=row.queued_at, started_at=now, lease_expires_at=row.lease_expires_at,
                deadline=row.deadline, parent_id=row.parent_id, took_over=row.id in lost,
                items_done=row.items_done, preemptions=row.preemptions,
            )
            for row in rows
        }
        return [by_id[job_id] for job_id in job_ids if job_id in by_id]

    def renew_leases(self, claims: Sequence[Claim], lease_s: float, *,
                     now: datetime | None = None) -> set[str]:
        """Extend held leases; return the ids still owned by these attempts."""
        now = now or utcnow()
        owned: set[str] = set()
        with self.engine.begin() as conn:
            for claim in claims:
                if conn.execute(
                    update(jobs).where(_owns(claim))
                    .values(lease_expires_at=now + timedelta(seconds=lease_s))
                ).rowcount == 1:
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
        """
        if not done:
            return set()
        now = now or utcnow()
        ids = [d.claim.job_id for d in done]
        with self.engine.begin() as conn:
            current = {
                row.id: row for row in conn.execute(
                    _for_update(select(jobs.c.id, jobs.c.state, jobs.c.attempts)
                                .where(jobs.c.id.in_(ids)), conn)
                )
            }
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
            conn.execute(
                update(attempts).where(and_(
                    attempts.c.job_id == bindparam("a_job"),
                    attempts.c.number == bindparam("a_number"),
                )).values(
                    outcome=bindparam("a_outcome"), finished_at=now, error=bindparam("a_error"),
                    cpu_seconds=bindparam("a_cpu"), wall_seconds=bindparam("a_wall"),
                    cost=bindparam("a_cost"),
                ),
                [
                    {"a_job": d.claim.job_id, "a_number": d.claim.attempt,
                     "a_outcome": d.outcome if d.claim.job_id in owned_ids
                     else _displaced(current.get(d.claim.job_id)),
                     "a_error": d.error, "a_cpu": d.cpu_seconds, "a_wall": d.wall_seconds,
                     "a_cost": cost}
                    for d, cost in zip(done, costs, strict=True)
                ],
            )
            charges = self.accountant.charge(conn, ids)  # jobs that ended: cost, written once
        self.accountant.committed(charges)
        return owned_ids

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
                    .values(outcome=Outcome.LOST, finished_at=now,
                            error="lease expired: worker lost")
                )
                charges = self.accountant.charge(conn, [job_id])
        self.accountant.committed(charges)
        return done


def _owns(claim: Claim) -> Any:
    return and_(
        jobs.c.id == claim.job_id,
        jobs.c.state == JobState.RUNNING,
        jobs.c.attempts == claim.attempt,
    )



def _for_update(query: Any, conn: Connection) -> Any:
    # SQLite serialises writers with BEGIN IMMEDIATE; PostgreSQL needs the row locks.
    return query.with_for_update() if conn.dialect.name == "postgresql" else query


def _still_owns(row: Any, claim: Claim) -> bool:
    return row is not None and row.state == JobState.RUNNING and row.attempts == claim.attempt


def _displaced(row: Any) -> str:
    return Outcome.CANCELLED if row is not None and row.state == JobState.CANCELLED \
        else Outcome.LOST


def _finish_statements(owned: Sequence[Finish], now: datetime) -> list[tuple[Any, list[Any]]]:
    """One executemany for the retries and one for the jobs that ended."""
    out: list[tuple[Any, list[Any]]] = []
    base = {
        "lease_expires_at": None,
        "error": bindparam("f_error"),
        "cpu_seconds": jobs.c.cpu_seconds + bindparam("f_cpu"),
        "wall_seconds": jobs.c.wall_seconds + bindparam("f_wall"),
        "queue_seconds": func.coalesce(jobs.c.queue_seconds, 0.0) + bindparam("f_waited"),
    }
    where = and_(jobs.c.id == bindparam("f_id"), jobs.c.state == JobState.RUNNING,
                 jobs.c.attempts == bindparam("f_attempt"))

    def params(d: Finish) -> dict[str, Any]:
        waited = 0.0
        if d.claim.queued_at is not None:
            waited = max((d.claim.started_at - d.claim.queued_at).total_seconds(), 0.0)
        return {"f_id": d.claim.job_id, "f_attempt": d.claim.attempt, "f_error": d.error,
                "f_cpu": d.cpu_seconds, "f_wall": d.wall_seconds, "f_waited": waited}

    retries = [d for d in owned if d.state == JobState.QUEUED and d.outcome != Outcome.PREEMPTED]
    if retries:
        stmt = update(jobs).where(where).values(
            **base, state=JobState.QUEUED, queued_at=bindparam("f_requeue_at"))
        out.append((stmt, [{**params(d), "f_requeue_at": d.requeue_at or now} for d in retries]))
    preempted = [d for d in owned if d.outcome == Outcome.PREEMPTED]
    if preempted:
        stmt = update(jobs).where(where).values(
            **base, state=JobState.QUEUED, queued_at=now, preemptions=jobs.c.preemptions + 1,
            items_done=bindparam("f_checkpoint"))
        out.append((stmt, [{**params(d), "f_checkpoint": d.checkpoint or 0} for d in preempted]))
    ended = [d for d in owned if d.state != JobState.QUEUED]
    if ended:
        stmt = update(jobs).where(where).values(
            **base, state=bindparam("f_state"), finished_at=now,
            result=bindparam("f_result", type_=JSON), result_ref=bindparam("f_ref"),
            items=bindparam("f_items"), batch_id=bindparam("f_batch"),
            batch_size=bindparam("f_batch_size"), items_done=bindparam("f_done"),
        )
        out.append((stmt, [{**params(d), "f_state": d.state, "f_result": d.result,
                            "f_ref": d.result_ref, "f_items": d.items, "f_batch": d.batch_id,
                            "f_batch_size": d.batch_size,
                            "f_done": d.items if d.state == JobState.SUCCEEDED
                            else d.claim.items_done} for d in ended]))
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
        conn.execute(
            update(jobs).where(jobs.c.id == parent).values(
                items_done=jobs.c.items_done + items,
                cpu_seconds=jobs.c.cpu_seconds + cpu,
                wall_seconds=jobs.c.wall_seconds + wall,
                items=jobs.c["items"] + items,
            )
        )
        if failure is not None:
            conn.execute(
                update(jobs)
                .where(and_(jobs.c.id == parent, jobs.c.state.in_(JobState.ACTIVE)))
                .values(state=JobState.FAILED, finished_at=now, error=failure)
            )
        complete_parent(conn, parent, now)


def complete_parent(conn: Connection, parent: str, now: datetime) -> bool:
    """A bulk parent whose every item is done (and whose total is known) has succeeded."""
    return conn.execute(
        update(jobs)
        .where(and_(
            jobs.c.id == parent, jobs.c.state.in_(JobState.ACTIVE),
            jobs.c.items_total.is_not(None), jobs.c.items_done >= jobs.c.items_total,
        ))
        .values(state=JobState.SUCCEEDED, finished_at=now)
    ).rowcount == 1
