"""Calling a kind: one job, or a batch with per-item failure isolation and CPU shares."""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from billiard.exceptions import SoftTimeLimitExceeded

from orchestrator.db.store import Claim, JobStore
from orchestrator.errors import PermanentError
from orchestrator.kinds import BatchShare, JobContext, KindSpec
from orchestrator.tiers import Tier

log = logging.getLogger(__name__)


class BackgroundCpu:
    """CPU seconds this process spent writing finished batches behind the next model call.

    A kind's call measures the process's CPU (a model's own threads included); what the
    write-behind thread spent meanwhile is not the call's, so ``call_kind`` takes it out.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.total = 0.0

    def add(self, seconds: float) -> None:
        with self._lock:
            self.total += seconds


BACKGROUND_CPU = BackgroundCpu()


@dataclass
class Outcomes:
    """What happened to each claim: (claim, result, error, cpu seconds, wall seconds)."""

    items: list[tuple[Claim, Any, BaseException | None, float, float]] = field(
        default_factory=list)
    #: job id -> (batch id, batch size) for jobs that ran in a batch call
    batches: dict[str, tuple[str, int]] = field(default_factory=dict)
    #: job id -> items done, for chunks that yielded to higher-tier work
    preempted: dict[str, int] = field(default_factory=dict)
    #: job id -> items done, for jobs whose window closed (they go back to deferred)
    deferred: dict[str, int] = field(default_factory=dict)
    #: when the run ended (UTC): the slot was free from then, even if the finish is written
    #: later (write-behind); None: at the finish
    ran_until: datetime | None = None

    def ok(self, claim: Claim, result: Any, cpu: float, wall: float) -> None:
        self.items.append((claim, result, None, cpu, wall))

    def preempt(self, claim: Claim, checkpoint: int, cpu: float, wall: float) -> None:
        self.preempted[claim.job_id] = checkpoint
        self.items.append((claim, None, None, cpu, wall))

    def defer(self, claim: Claim, checkpoint: int, cpu: float = 0.0, wall: float = 0.0
              ) -> None:
        self.deferred[claim.job_id] = checkpoint
        self.items.append((claim, None, None, cpu, wall))

    def fail(self, claim: Claim, error: BaseException, cpu: float = 0.0, wall: float = 0.0
             ) -> None:
        self.items.append((claim, None, error, cpu, wall))


class LeaseKeeper:
    """One thread per process renews the leases of every claim the process is running.

    A claim is held from ``holding()`` until its block exits; its lease is renewed every third
    of its length. One long-lived thread instead of one per execution keeps thread start and
    join off the path of every short job.
    """

    def __init__(self, store: JobStore) -> None:
        self._store = store
        self._held: dict[int, tuple[list[Claim], float, float]] = {}  # token -> claims, lease, due
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._next = 0

    @contextmanager
    def holding(self, claims: Sequence[Claim], lease_s: float) -> Iterator[None]:
        with self._wake:
            token = self._next
            self._next += 1
            self._held[token] = (list(claims), lease_s, time.monotonic() + lease_s / 3)
            if self._thread is None or not self._thread.is_alive():  # first use, or forked
                self._thread = threading.Thread(target=self._run, daemon=True,
                                                name="lease-keeper")
                self._thread.start()
            self._wake.notify()
        try:
            yield
        finally:
            with self._wake:
                self._held.pop(token, None)

    def _run(self) -> None:
        while True:
            with self._wake:
                now = time.monotonic()
                due = [(t, c, s) for t, (c, s, at) in self._held.items() if at <= now]
                if not due:
                    nearest = min((at for _, _, at in self._held.values()), default=now + 60)
                    self._wake.wait(max(nearest - now, 0.01))
                    continue
                for token, claims, lease_s in due:
                    self._held[token] = (claims, lease_s, now + lease_s / 3)
            for token, claims, lease_s in due:
                try:
                    owned = self._store.renew_leases(claims, lease_s)
                except Exception:
                    log.warning("lease renewal failed for %d job(s)", len(claims), exc_info=True)
                    continue
                with self._wake:
                    held = self._held.get(token)
                    if held is not None:
                        kept = [c for c in held[0] if c.job_id in owned]
                        if kept:
                            self._held[token] = (kept, held[1], held[2])
                        else:
                            self._held.pop(token)


def context(spec: KindSpec, claims: Sequence[Claim], worker: str, resources: Any
             ) -> JobContext:
    first = claims[0]
    return JobContext(
        job_id=first.job_id, tenant=first.tenant, tier=Tier(first.tier), attempt=first.attempt,
        max_attempts=first.max_attempts, queued_at=first.queued_at, worker=worker,
        log=logging.LoggerAdapter(logging.getLogger(spec.module), {"job_id": first.job_id}),
        resources=resources, batch_ids=tuple(c.job_id for c in claims), share=BatchShare(),
    )


def _checked(result: Any, chunk: bool) -> Any:
    """Results go to the database as JSON (or, for bulk chunks, to a file): check early."""
    if chunk or isinstance(result, BaseException) or hasattr(result, "tolist"):
        return result
    try:  # NaN and Infinity are not JSON: PostgreSQL refuses them, failing the whole finish
        json.dumps(result, allow_nan=False)
    except (TypeError, ValueError) as e:
        return PermanentError(f"result is not JSON-serialisable: {e}")
    return result


def call_kind(spec: KindSpec, runnable: Sequence[tuple[Claim, Any]], worker: str,
              resources: Any, outcomes: Outcomes) -> None:
    """Run ``runnable`` (claims with validated payloads) and record every outcome.

    A batch kind gets all payloads in one call; if that call raises, each job is run alone so
    that one bad input fails only itself. The call's CPU is shared by the weights the kind set
    (tokens, rows), else equally.
    """
    claims = [c for c, _ in runnable]
    models = [m for _, m in runnable]
    ctx = context(spec, claims, worker, resources)
    wall0, cpu0, lent0 = time.perf_counter(), time.process_time(), BACKGROUND_CPU.total

    def spent() -> tuple[float, float]:
        lent = BACKGROUND_CPU.total - lent0
        return max(time.process_time() - cpu0 - lent, 0.0), time.perf_counter() - wall0

    try:
        if spec.batch is not None:
            results = list(spec.fn(models, ctx))
            if len(results) != len(models):
                raise PermanentError(
                    f"kind {spec.name} returned {len(results)} results for {len(models)} jobs")
        else:
            results = [spec.fn(models[0], ctx)]
    except Exception as e:
        if isinstance(e, SoftTimeLimitExceeded):
            # The tier's time is up for the whole call: running each job alone would go on past
            # the soft limit toward the hard kill. Every job of the call fails with it (and is
            # retried as its kind says).
            cpu, wall = spent()
            for claim in claims:
                outcomes.fail(claim, e, cpu / len(claims), wall / len(claims))
            return
        if len(runnable) > 1:
            log.info("batch of %d %s jobs failed (%s); running each alone", len(runnable),
                     spec.name, e)
            for pair in runnable:
                call_kind(spec, [pair], worker, resources, outcomes)
            return
        cpu, wall = spent()
        outcomes.fail(claims[0], e, cpu, wall)
        return
    cpu, wall = spent()
    if spec.batch is not None:
        batch_id = str(uuid.uuid4())
        outcomes.batches.update((c.job_id, (batch_id, len(claims))) for c in claims)
    weights = ctx.share.weights if ctx.share.weights and len(ctx.share.weights) == len(claims) \
        else [1.0] * len(claims)
    total = sum(weights) or 1.0
    for claim, result, weight in zip(claims, results, weights, strict=True):
        share = weight / total
        result = _checked(result, claim.parent_id is not None)
        if isinstance(result, BaseException):
            outcomes.fail(claim, result, cpu * share, wall * share)
        else:
            outcomes.ok(claim, result, cpu * share, wall * share)
