"""Around every execution: claim, run, account, finish, each step a compare-and-set.

One ``Runtime`` lives in each worker process (made at process start, closed at shutdown). The
Celery task only hands it a job id; what happens next is decided by the job's row.
"""

from __future__ import annotations

import json
import logging
import os
import random
import socket
import threading
import time
from datetime import timedelta
from typing import Any

from billiard.exceptions import SoftTimeLimitExceeded

from orchestrator.broker import publish
from orchestrator.db.models import JobState, Outcome
from orchestrator.db.store import Claim, utcnow
from orchestrator.errors import PermanentError, SubmitError, UnknownKind
from orchestrator.kinds import JobContext, KindSpec
from orchestrator.services import Services
from orchestrator.settings import Settings
from orchestrator.tiers import Tier

log = logging.getLogger(__name__)


def backoff_delay(attempt: int, base_s: float, max_s: float, rng: random.Random) -> float:
    """Exponential backoff with equal jitter: half the step is fixed, half is random."""
    step = min(max_s, base_s * (2 ** max(attempt - 1, 0)))
    return step / 2 + rng.uniform(0, step / 2)


class _Heartbeat:
    """Renews a claim's lease every third of the lease while the kind runs."""

    def __init__(self, runtime: Runtime, claim: Claim, lease_s: float) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(runtime, claim, lease_s), daemon=True,
            name=f"lease-{claim.job_id[:8]}",
        )
        self.lost = False

    def _run(self, runtime: Runtime, claim: Claim, lease_s: float) -> None:
        while not self._stop.wait(lease_s / 3):
            try:
                if not runtime.services.store.renew_lease(claim, lease_s):
                    self.lost = True
                    return
            except Exception:
                log.warning("job %s: lease renewal failed", claim.job_id, exc_info=True)

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class Runtime:
    """Executes jobs by id inside one worker process."""

    def __init__(self, services: Services, *, worker: str | None = None) -> None:
        self.services = services
        self.settings: Settings = services.settings
        self.worker = worker or f"{socket.gethostname()}:{os.getpid()}"
        self._rng = random.Random()

    def close(self) -> None:
        self.services.close()

    def execute(self, job_id: str) -> str | None:
        """Run one delivery of a job; return the state it left the job in (None: untouched)."""
        store = self.services.store
        leases = {tier: policy.lease_s for tier, policy in self.settings.tiers.items()}
        claim = store.claim(job_id, self.worker, leases)
        if claim is None:
            return self._not_claimable(job_id)
        policy = self.settings.policy(Tier(claim.tier))
        if claim.took_over:
            log.warning("job %s: took over from a lost worker (attempt %d)", job_id, claim.attempt)
        try:
            spec = self.services.kinds.get(claim.kind)
            model = spec.validate(claim.payload)
        except (UnknownKind, SubmitError) as e:
            return self._end(claim, JobState.FAILED, Outcome.FAILED, 0.0, 0.0, error=str(e))
        if claim.deadline is not None and claim.started_at > claim.deadline:
            return self._end(claim, JobState.FAILED, Outcome.FAILED, 0.0, 0.0,
                             error=f"deadline {claim.deadline.isoformat()} passed before the "
                             "job could start")
        return self._run(claim, spec, model, policy.lease_s)

    def _run(self, claim: Claim, spec: KindSpec, model: Any, lease_s: float) -> str | None:
        ctx = JobContext(
            job_id=claim.job_id, tenant=claim.tenant, tier=Tier(claim.tier),
            attempt=claim.attempt, max_attempts=claim.max_attempts, queued_at=claim.queued_at,
            worker=self.worker,
            log=logging.LoggerAdapter(logging.getLogger(spec.module), {"job_id": claim.job_id}),
        )
        wall0, cpu0 = time.perf_counter(), time.process_time()
        error: BaseException | None = None
        result: Any = None
        with _Heartbeat(self, claim, lease_s):
            try:
                result = spec.fn(model, ctx)
            except BaseException as e:  # noqa: BLE001 - every failure is recorded on the job
                error = e
            else:
                try:
                    json.dumps(result)
                except (TypeError, ValueError) as e:
                    error = PermanentError(f"result is not JSON-serialisable: {e}")
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        if error is None:
            return self._end(claim, JobState.SUCCEEDED, Outcome.SUCCEEDED, cpu, wall,
                             result=result, items=1)
        if isinstance(error, KeyboardInterrupt | SystemExit):
            raise error
        return self._failed(claim, spec, error, cpu, wall)

    def _failed(self, claim: Claim, spec: KindSpec, error: BaseException, cpu: float,
                wall: float) -> str | None:
        message = f"{type(error).__name__}: {error}"
        if isinstance(error, PermanentError | SubmitError):
            log.info("job %s failed permanently: %s", claim.job_id, message)
            return self._end(claim, JobState.FAILED, Outcome.FAILED, cpu, wall, error=message)
        if isinstance(error, SoftTimeLimitExceeded):
            message = f"time limit of the {claim.tier} tier exceeded"
        elif not isinstance(error, Exception):
            raise error
        else:
            log.info("job %s attempt %d failed: %s", claim.job_id, claim.attempt, message,
                     exc_info=not isinstance(error, PermanentError))
        policy = self.settings.policy(Tier(claim.tier))
        retry = spec.retry.resolve(policy)
        if claim.attempt >= claim.max_attempts:
            return self._end(claim, JobState.DEAD, Outcome.DEAD, cpu, wall,
                             error=f"{message} (after {claim.attempt} attempts)")
        delay = backoff_delay(claim.attempt, retry.backoff_base_s or 0.0,
                              retry.backoff_max_s or 0.0, self._rng)
        requeue_at = utcnow() + timedelta(seconds=delay)
        owned = self.services.store.finish(
            claim, state=JobState.QUEUED, outcome=Outcome.RETRY, cpu_seconds=cpu,
            wall_seconds=wall, error=message, requeue_at=requeue_at,
        )
        if owned:
            publish(self.services.celery, claim.job_id, Tier(claim.tier), policy.priority,
                    countdown=delay, time_limit=policy.time_limit_s)
            log.info("job %s: retry %d/%d in %.2fs", claim.job_id, claim.attempt + 1,
                     claim.max_attempts, delay)
            return JobState.QUEUED
        return None

    def _end(self, claim: Claim, state: str, outcome: str, cpu: float, wall: float, *,
             result: Any = None, error: str | None = None, items: int = 0) -> str | None:
        owned = self.services.store.finish(
            claim, state=state, outcome=outcome, cpu_seconds=cpu, wall_seconds=wall,
            result=result, error=error, items=items,
        )
        if not owned:
            log.info("job %s: attempt %d no longer owns the job; its outcome is discarded",
                     claim.job_id, claim.attempt)
            return None
        self.services.signal_done(claim.job_id, state)
        return state

    def _not_claimable(self, job_id: str) -> str | None:
        """A delivery we may not run: finished, cancelled, unknown, or held by a live lease."""
        store = self.services.store
        job = store.get(job_id)
        if job is None:
            log.warning("job %s: message for a job that does not exist; dropped", job_id)
            return None
        if job.state != JobState.RUNNING:
            log.info("job %s: duplicate delivery of a %s job ignored", job_id, job.state)
            return None
        now = utcnow()
        if job.lease_expires_at is not None and job.lease_expires_at < now:
            # Expired with no attempts left: the last worker died holding it.
            if store.mark_dead_if_exhausted(job_id):
                self.services.signal_done(job_id, JobState.DEAD)
                return JobState.DEAD
            return None
        # Another worker holds a live lease. It may be alive (a true duplicate) or dead (this is
        # the redelivery of its message): look again once the lease has run out.
        remaining = (job.lease_expires_at - now).total_seconds() if job.lease_expires_at else 0
        policy = self.settings.policy(Tier(job.tier))
        publish(self.services.celery, job_id, Tier(job.tier), policy.priority,
                countdown=remaining + 0.5, time_limit=policy.time_limit_s)
        log.info("job %s: running elsewhere; checking again in %.1fs", job_id, remaining + 0.5)
        return None
