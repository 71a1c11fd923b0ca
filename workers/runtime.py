"""Around every execution: claim, run, account, finish, each step a compare-and-set.

One ``Runtime`` lives in each worker process (made at process start, closed at shutdown). A
Celery task hands it either one job id (``orchestrator.run``) or a batch trigger
(``orchestrator.batch``); either way the jobs are claimed together, run together, and finished
with one transaction, so the database is written once per batch, not once per item.
"""

from __future__ import annotations

import itertools
import logging
import os
import random
import socket
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from datetime import timedelta
from typing import Any

from billiard.exceptions import SoftTimeLimitExceeded

from orchestrator.admission import record_service
from orchestrator.batching import (
    BATCH_DRAIN_WAIT_MAX_S,
    BATCH_LINGER_MAX_DELAY_MS,
    BATCH_LINGER_S,
    BATCH_LINGER_SLICE_S,
    BATCH_TASK,
    PLAIN_DRAIN_BUDGET_S,
    Buffers,
    Pace,
    ServiceTimes,
    Taken,
    kind_service_field,
    lead,
    processing_key,
)
from orchestrator.broker import RUN_TASK, publish
from orchestrator.db.models import JobState, Outcome
from orchestrator.db.store import Claim, Finish, utcnow
from orchestrator.errors import PermanentError, SubmitError, TransientError, UnknownKind
from orchestrator.fairness import FairDispatcher
from orchestrator.kinds import KindSpec
from orchestrator.metrics import WorkerMetrics
from orchestrator.results import ResultStore, encode_array
from orchestrator.services import Services
from orchestrator.settings import Settings
from orchestrator.tiers import Tier, TierPolicy
from orchestrator.transport import mark_sent
from workers.chunks import Pacer, run_chunk
from workers.execution import BACKGROUND_CPU, LeaseKeeper, Outcomes, call_kind, context
from workers.preemption import HigherTierCheck, InPlaceServer, TierWork
from workers.windowing import WindowGate

log = logging.getLogger(__name__)

#: how long a drain flag outlives its last take: a worker that dies while draining stops
#: suppressing triggers this long after (the reconciler's sweep triggers what was pushed then)
DRAIN_HOLD_S = 2.0
#: longest a write-behind finish waits for the slot to claim its next batch before it starts
#: anyway (a bound on what the ordering adds to a batch's end-to-end latency)
WRITE_BEHIND_GATE_S = 0.05

#: a batch taken and claimed ahead: (processing list, what was taken, the claims)
Ahead = tuple[str, Taken, list[Claim]]


def backoff_delay(attempt: int, base_s: float, max_s: float, rng: random.Random) -> float:
    """Exponential backoff with equal jitter: half the step is fixed, half is random."""
    step = min(max_s, base_s * (2 ** max(attempt - 1, 0)))
    return step / 2 + rng.uniform(0, step / 2)


class Runtime:
    """Executes jobs inside one worker process."""

    def __init__(self, services: Services, *, worker: str | None = None,
                 tiers: Sequence[Tier] | None = None) -> None:
        self.services = services
        #: the tiers this worker serves: a chunk only yields to work the worker can take
        self.tiers: tuple[Tier, ...] = tuple(tiers) if tiers else tuple(Tier)
        self.settings: Settings = services.settings
        self.worker = worker or f"{socket.gethostname()}:{os.getpid()}"
        self.buffers = Buffers(services.redis, services.celery,
                               processing_ttl_s=self.settings.visibility_timeout_s)
        self.results = ResultStore(self.settings.state_dir / "results")
        #: this process's wall seconds per item of each chunked kind: sizes mini-batches
        self.pacer = Pacer()
        self.fair = FairDispatcher(services.redis, services.celery,
                                   window=self.settings.fair_window)
        self.resources: dict[str, Any] = {}
        self.windows = WindowGate(services.redis, services.engine)
        self._rng = random.Random()
        self._leases = {tier: policy.lease_s for tier, policy in self.settings.tiers.items()}
        self.leases = LeaseKeeper(services.store)
        self.metrics = WorkerMetrics()
        self.service_times = ServiceTimes(services.redis)
        self._higher: dict[Tier, HigherTierCheck] = {}
        #: tier -> where work of the served tiers under it waits
        self._below: dict[Tier, TierWork] = {}
        #: kind -> how long this process's drained batches take to claim and run (the slot's
        #: time before it looks at the buffer again), for its promises
        self._pace: dict[str, Pace] = {}
        self._write_behind: ThreadPoolExecutor | None = None
        self._claim_ahead: ThreadPoolExecutor | None = None
        #: opened when the slot's thread stops needing the GIL (its next batch is claimed, or
        #: it waits): the write-behind finish starts then (see ``_run_batches``)
        self._writer_gate = threading.Event()
        self.in_place = InPlaceServer(
            services.celery, services.redis, self.run_message,
            time_limit_s=self.settings.policy(Tier.INTERACTIVE).time_limit_s,
            delay_of=self._interactive_delay_s, grace_s=self.settings.hard_limit_grace_s) \
            if self.settings.preemption and Tier.INTERACTIVE in self.tiers else None
        store = services.store
        store.accountant = replace(store.accountant,
                                   observers=(*store.accountant.observers, self.metrics.charged))

    def setup_kinds(self) -> None:
        """Make each kind's process resources (model sessions, tokenizers) once."""
        for spec in self.services.kinds.specs():
            if spec.setup is not None and spec.name not in self.resources:
                self.resources[spec.name] = spec.setup(self.settings)

    def close(self) -> None:
        if self._claim_ahead is not None:
            self._claim_ahead.shutdown(wait=True)
        if self._write_behind is not None:
            self._write_behind.shutdown(wait=True)
        if self.in_place is not None:
            self.in_place.close()
        self.services.close()

    # --- entry points ------------------------------------------------------------------------

    def execute(self, job_id: str) -> str | None:
        """Run one delivery of one job; return the state it left the job in (None: untouched)."""
        claims = self.services.store.claim_many([job_id], self.worker, self._leases)
        if not claims:
            return self._not_claimable(job_id)
        return self._run_claims(claims).get(job_id)

    def execute_batch(self, kind: str, key: str, tier: str, message_id: str, *,
                      drain: bool = True) -> dict[str, str]:
        """Run one batch trigger: take buffered jobs, run them as one call, finish them at once.

        Then, with ``drain``, the task keeps its slot while batches keep coming: a batch kind's
        next batch is taken when due (``_run_batches``, up to the tier's ``drain_budget_s``); a
        plain kind's newly arrived jobs take after take for up to ``PLAIN_DRAIN_BUDGET_S``
        (``_drain``; while it does, submits publish no trigger). Returns the new state of every
        job it ran.
        """
        spec = self.services.kinds.get(kind)
        policy = self.settings.policy(Tier(tier))
        size, delay = self._take_shape(spec, policy)
        processing = processing_key(message_id)
        start = time.monotonic()
        if spec.batch is not None and drain:
            # Triggers come a little before their cap (batching.TRIGGER_LEAD_S): wait for it.
            # (Run in place, the paused chunk's slot would sit idle: take what is there now.)
            wait = self.buffers.due_in(tier=Tier(tier), kind=kind, key=key,
                                       processing=processing, max_batch=size, delay_ms=delay)
            if wait is not None and 0 < wait <= BATCH_DRAIN_WAIT_MAX_S:
                time.sleep(wait)
        taken = self.buffers.take(tier=Tier(tier), kind=kind, key=key, processing=processing,
                                  max_batch=size, delay_ms=delay)
        self._retrigger(taken.retrigger_in_s, Tier(tier), kind, key)
        if spec.batch is not None:
            return self._run_batches(kind, key, Tier(tier), message_id, size, delay, start,
                                     taken, drain=drain)
        if not taken.items:
            return {}
        self.buffers.hold(tier=Tier(tier), kind=kind, key=key, hold_s=DRAIN_HOLD_S)
        try:
            states = self._run_taken([job_id for job_id, _ in taken.items], processing)
            if not drain:  # run in place: the paused chunk wants its slot back now
                self.buffers.stop_draining(tier=Tier(tier), kind=kind, key=key,
                                           priority=policy.priority,
                                           time_limit=policy.time_limit_s)
                return states
            return {**states, **self._drain(kind, key, Tier(tier), message_id, size, start)}
        except BaseException:
            self.buffers.stop_draining(tier=Tier(tier), kind=kind, key=key,
                                       priority=policy.priority, time_limit=policy.time_limit_s)
            raise

    def _retrigger(self, retrigger_in_s: float | None, tier: Tier, kind: str, key: str) -> None:
        """More is buffered than a take took: let another slot start on it (when due)."""
        if retrigger_in_s is not None:
            policy = self.settings.policy(tier)
            self.buffers.trigger(tier=tier, kind=kind, key=key, priority=policy.priority,
                                 countdown=lead(retrigger_in_s), counted=True,
                                 time_limit=policy.time_limit_s)

    def _run_batches(self, kind: str, key: str, tier: Tier, message_id: str, size: int,
                     delay_ms: float, start: float, taken: Taken, *, drain: bool
                     ) -> dict[str, str]:
        """Run the trigger's batch, then (``drain``) keep taking the buffer's batches in this
        slot while they come (see batching.py): until the buffer is empty (and stays empty
        while the slot lingers), the next cap is further than ``BATCH_DRAIN_WAIT_MAX_S`` away
        or past the budget, a higher tier or another buffer of the tier has work waiting, or
        the tier's ``drain_budget_s`` is spent.

        Each batch's finish (its one transaction, signals, retries) is written by a helper
        thread while the next batch's model call runs, so the slot does not wait on the
        database between batches; the task returns once every finish is written. The finish
        starts once the slot has claimed its next batch (or waits, or stops; at the latest
        after ``WRITE_BEHIND_GATE_S``): its Python work would otherwise hold the GIL while the
        slot takes and claims, and that is when the slot's model is idle (on 2 cores the
        slot's gap between batches of a drain fell from about 21 to 13 ms).

        In tiers that do not linger (``settings.claim_ahead``), the next batch is taken and
        claimed on another helper thread while this one's model runs, when one is due then
        (``_take_ahead``), so in a backlog the slot goes from one model call to the next.
        """
        processing = processing_key(message_id)
        if not taken.items or not drain:
            return self._run_taken([job_id for job_id, _ in taken.items], processing)
        pace = self._pace.get(kind)
        if pace is not None:  # pushes meanwhile need no trigger if this slot is back by their cap
            self.buffers.promise(tier=tier, kind=kind, key=key, drainer=message_id,
                                 seconds=pace.seconds(len(taken.items)))
        states: dict[str, str] = {}
        writing: Future[dict[str, str]] | None = None
        # The next batch, taken and claimed on a helper thread while this one's model runs
        # (tiers whose cap is long enough not to linger; see ``_take_ahead``).
        ahead: Future[Ahead | None] | None = None
        claims: list[Claim] | None = None  # the batch, when it was claimed ahead
        withdrawn = False
        try:
            for n in itertools.count(1):
                began = time.monotonic()
                claims = self._claim([job_id for job_id, _ in taken.items]) \
                    if claims is None else self._started(claims)
                if self.settings.claim_ahead and delay_ms > BATCH_LINGER_MAX_DELAY_MS:
                    pace = self._pace.get(kind)
                    ahead = self._ahead().submit(
                        self._take_ahead, kind, key, tier, message_id, n, size, delay_ms,
                        start, pace.seconds(len(taken.items)) if pace is not None else 0.0)
                outcomes = self._run(claims) if claims else Outcomes()
                outcomes.ran_until = utcnow()
                self._pace.setdefault(kind, Pace()).add(len(taken.items),
                                                        time.monotonic() - began)
                if writing is not None:
                    pending_write, writing = writing, None
                    states.update(self._written(pending_write, outcomes, processing))
                self._writer_gate = gate = threading.Event()
                writing = self._writer().submit(self._finish_gated, gate, outcomes,
                                                processing)
                claims = None
                if ahead is not None:
                    pending, ahead = ahead, None
                    got = pending.result()
                    if got is not None:
                        if self._higher_check(tier).waiting():
                            self._hand_back(tier, kind, key, got)
                            break
                        processing, taken, claims = got
                        continue
                following = self._next_batch(kind, key, tier, message_id, n, size, delay_ms,
                                             start)
                if isinstance(following, bool):
                    withdrawn = following
                    break
                processing, taken = following
        finally:
            self._writer_gate.set()
            if ahead is not None:  # the run failed while the next batch was being claimed
                self._settle_ahead(tier, kind, key, ahead)
            if not withdrawn:  # stopped here (or failed): what is left needs a trigger
                self._retrigger(self.buffers.stop_promising(
                    tier=tier, kind=kind, key=key, drainer=message_id, max_batch=size,
                    delay_ms=delay_ms), tier, kind, key)
            if writing is not None:
                states.update(writing.result())
        return states

    def _written(self, writing: Future[dict[str, str]], outcomes: Outcomes,
                 processing: str) -> dict[str, str]:
        """The previous batch's write-behind finish, once written. If it failed (its jobs come
        back when their leases run out), the batch that has run since (``outcomes``) is
        recorded here before the error stops the drain: it is not run again."""
        try:
            return writing.result()
        except Exception:
            log.exception("a batch's finish failed; recording the next batch's outcomes and "
                          "stopping this drain")
            self._finish_taken(outcomes, processing)
            raise

    def _started(self, claims: list[Claim]) -> list[Claim]:
        """A batch claimed ahead starts now: its claims' start time is this moment."""
        self._writer_gate.set()
        now = utcnow()
        return [replace(c, started_at=now) for c in claims]

    def _take_ahead(self, kind: str, key: str, tier: Tier, message_id: str, n: int, size: int,
                    delay_ms: float, start: float, eta_s: float) -> Ahead | None:
        """On the claim-ahead thread, while batch ``n`` runs: take and claim batch n + 1 if
        one is due now (a backlog), so the slot starts it the moment batch n ends instead of
        spending a claim's round trips (about 8 ms per 64 jobs on 2 cores) with its model idle.

        Nothing is taken when higher-tier work waits, when the drain budget would be spent by
        the time batch n ends (``eta_s`` from now, by the slot's pace), or when no batch is due
        yet: the slot then looks the usual way (``_next_batch``) once batch n is done. A batch
        claimed ahead that cannot start (higher-tier work arrived meanwhile, or batch n
        failed) is handed back (``_hand_back``). Claimed ahead, jobs keep no start time until
        they start (``claim_many(ahead=True)``)."""
        if self._higher_check(tier).waiting():
            return None
        if self.settings.policy(tier).drain_budget_s - (time.monotonic() - start) <= eta_s:
            return None
        processing = processing_key(f"{message_id}:{n}")
        lower = self._lower(tier)
        taken = self.buffers.drain_take(tier=tier, kind=kind, key=key, processing=processing,
                                        max_batch=size, delay_ms=delay_ms, drainer=message_id,
                                        pace=self._pace.get(kind), ahead_s=eta_s,
                                        lower_queues=lower.queues,
                                        lower_buffer_sets=lower.buffer_sets,
                                        lower_fair_prefixes=lower.fair_prefixes)
        self._retrigger(taken.retrigger_in_s, tier, kind, key)
        if not taken.items:  # not due yet, empty, or another buffer's turn: decided later
            return None
        return processing, taken, self._claim([job_id for job_id, _ in taken.items], ahead=True)

    def _hand_back(self, tier: Tier, kind: str, key: str, got: Ahead | None) -> None:
        """A batch claimed ahead will not run here: its jobs go back to queued (as if never
        claimed) and to the head of their buffer, with their enqueue times."""
        if got is None:
            return
        processing, taken, claims = got
        owned = self.services.store.unclaim_many(claims)
        self.buffers.give_back(tier=tier, kind=kind, key=key, processing=processing,
                               items=[item for item in taken.items if item[0] in owned])
        log.info("handed back %d jobs claimed ahead to the %s buffer", len(owned), tier.value)

    def _settle_ahead(self, tier: Tier, kind: str, key: str,
                      ahead: Future[Ahead | None]) -> None:
        """The run stopped on an error while the next batch was being claimed: hand it back."""
        try:
            self._hand_back(tier, kind, key, ahead.result())
        except Exception:  # its jobs come back when their lease runs out (the reconciler)
            log.exception("could not hand back a batch claimed ahead")

    def _ahead(self) -> ThreadPoolExecutor:
        """The process's claim-ahead thread (made on first use, after the pool's fork)."""
        if self._claim_ahead is None:
            self._claim_ahead = ThreadPoolExecutor(max_workers=1,
                                                   thread_name_prefix="orch-ahead")
        return self._claim_ahead

    def _next_batch(self, kind: str, key: str, tier: Tier, message_id: str, n: int, size: int,
                    delay_ms: float, start: float) -> tuple[str, Taken] | bool:
        """A draining slot's next due batch (waiting for its cap if near), or False: stop (the
        caller withdraws the slot's promise), or True: stopped, promise already withdrawn.

        On an empty buffer with a short cap the slot lingers up to ``BATCH_LINGER_S``, blocked
        on the buffer's wake list (a push wakes it instead of publishing a trigger), looking
        at the higher tiers, the tier's other buffers and the lower tiers every
        ``BATCH_LINGER_SLICE_S``; work waiting in a lower tier ends the linger."""
        higher = self._higher_check(tier)
        processing = processing_key(f"{message_id}:{n}")
        linger_until: float | None = None  # lingering on the empty buffer until then
        budget = self.settings.policy(tier).drain_budget_s
        while (left := budget - (time.monotonic() - start)) > 0:
            if higher.waiting():
                return False
            linger = 0.0
            if delay_ms <= BATCH_LINGER_MAX_DELAY_MS:
                linger = min(BATCH_LINGER_S, left) if linger_until is None \
                    else min(linger_until - time.monotonic(), left)
            lower = self._lower(tier)
            taken = self.buffers.drain_take(tier=tier, kind=kind, key=key,
                                            processing=processing, max_batch=size,
                                            delay_ms=delay_ms, drainer=message_id,
                                            pace=self._pace.get(kind), linger_s=linger,
                                            lower_queues=lower.queues,
                                            lower_buffer_sets=lower.buffer_sets,
                                            lower_fair_prefixes=lower.fair_prefixes)
            if taken.stop == "linger":
                if linger_until is None:
                    linger_until = time.monotonic() + linger
                self._writer_gate.set()
                self.buffers.wait_push(tier=tier, kind=kind, key=key,
                                       timeout_s=min(linger, BATCH_LINGER_SLICE_S))
                continue
            if taken.wait_s is not None:
                if taken.wait_s > min(BATCH_DRAIN_WAIT_MAX_S, left):
                    return False
                self._writer_gate.set()
                time.sleep(taken.wait_s)
                continue
            self._retrigger(taken.retrigger_in_s, tier, kind, key)
            if taken.stop is not None:
                return True
            return processing, taken
        return False

    def _lower(self, tier: Tier) -> TierWork:
        """Where work of the served tiers under ``tier`` waits (made once per tier)."""
        lower = self._below.get(tier)
        if lower is None:
            lower = self._below[tier] = TierWork.below(tier, self.tiers)
        return lower

    def _writer(self) -> ThreadPoolExecutor:
        """The process's write-behind thread (made on first use, after the pool's fork)."""
        if self._write_behind is None:
            self._write_behind = ThreadPoolExecutor(max_workers=1,
                                                    thread_name_prefix="orch-finish")
        return self._write_behind

    def _higher_check(self, tier: Tier) -> HigherTierCheck:
        check = self._higher.get(tier)
        if check is None:
            check = self._higher[tier] = HigherTierCheck(
                self.services.redis, tier, enabled=self.settings.preemption, served=self.tiers)
        return check

    def _drain(self, kind: str, key: str, tier: Tier, message_id: str, size: int,
               start: float) -> dict[str, str]:
        """Take a plain kind's newly arrived jobs until the buffer is empty or the budget ends."""
        states: dict[str, str] = {}
        taken = 0
        while time.monotonic() - start < PLAIN_DRAIN_BUDGET_S:
            taken += 1
            processing = processing_key(f"{message_id}:{taken}")
            items = self.buffers.take_more(tier=tier, kind=kind, key=key, processing=processing,
                                           max_batch=size, hold_s=DRAIN_HOLD_S)
            if not items:  # empty: the flag is already cleared
                return states
            states.update(self._run_taken([job_id for job_id, _ in items], processing))
        # Budget spent: hand the slot back to Celery; a trigger goes out if jobs remain.
        policy = self.settings.policy(tier)
        self.buffers.stop_draining(tier=tier, kind=kind, key=key, priority=policy.priority,
                                   time_limit=policy.time_limit_s)
        return states

    def _run_taken(self, ids: list[str], processing: str) -> dict[str, str]:
        """Claim, run and finish jobs taken into ``processing``; their new states."""
        return self._finish_taken(self._claim_and_run(ids), processing)

    def _claim_and_run(self, ids: list[str]) -> Outcomes:
        claims = self._claim(ids)
        return self._run(claims) if claims else Outcomes()

    def _claim(self, ids: list[str], *, ahead: bool = False) -> list[Claim]:
        """Claim taken jobs (those not claimable are dealt with); the claims, in order.

        ``ahead``: on the claim-ahead thread, for the batch after the one running.
        """
        claims = self.services.store.claim_many(ids, self.worker, self._leases, ahead=ahead)
        if not ahead:  # the model call is next: the write-behind finish may start
            self._writer_gate.set()
        claimed = {c.job_id for c in claims}
        for job_id in ids:
            if job_id not in claimed:
                self._not_claimable(job_id)
        return claims

    def _finish_gated(self, gate: threading.Event, outcomes: Outcomes, processing: str
                      ) -> dict[str, str]:
        """A write-behind finish, started once the slot's thread has taken and claimed its
        next batch (or waits, or stopped): both want the GIL, and the slot's round trips
        between batches are what keep the model idle, so they go first."""
        gate.wait(WRITE_BEHIND_GATE_S)
        return self._finish_taken(outcomes, processing, timed=True)

    def _finish_taken(self, outcomes: Outcomes, processing: str, *,
                      timed: bool = False) -> dict[str, str]:
        """Record what ran, then forget the processing list it was taken into.

        ``timed``: on the write-behind thread, whose CPU the kinds' calls leave out.
        """
        cpu0 = time.thread_time() if timed else 0.0
        try:
            states = self._finish(outcomes) if outcomes.items else {}
            self.buffers.done(processing)
            return {k: v for k, v in states.items() if v is not None}
        finally:
            if timed:
                BACKGROUND_CPU.add(time.thread_time() - cpu0)

    def _take_shape(self, spec: KindSpec, policy: TierPolicy) -> tuple[int, float]:
        """(jobs per take, batching delay ms) of a kind's buffer in a tier."""
        if spec.batch is not None:
            return spec.batch.size(policy), spec.batch.delay_ms(policy)
        # A plain kind's jobs: as many as fit the take budget, no batching delay.
        return max(self.service_times.take(spec.name), 1), 0.0

    def _interactive_delay_s(self, kind: str) -> float:
        spec = self.services.kinds.get(kind)
        return self._take_shape(spec, self.settings.policy(Tier.INTERACTIVE))[1] / 1000

    def run_message(self, task: str, args: list[Any], message_id: str) -> None:
        """Run one task message the way its Celery task would (for work run in place)."""
        if task == BATCH_TASK:
            kind, key, tier = args
            # In place, the paused chunk wants its slot back: run this batch, not the next ones.
            self.execute_batch(kind, key, tier, message_id, drain=False)
        elif task == RUN_TASK:
            self.execute(args[0])
        else:
            raise ValueError(f"not a job task: {task!r}")

    # --- running -----------------------------------------------------------------------------

    def _run_claims(self, claims: Sequence[Claim]) -> dict[str, str | None]:
        """Validate, run and finish claims of one kind; return each job's new state."""
        return self._finish(self._run(claims))

    def _run(self, claims: Sequence[Claim]) -> Outcomes:
        """Validate and run claims of one kind; what happened to each, not yet recorded."""
        outcomes = Outcomes()
        runnable: list[tuple[Claim, Any]] = []
        spec: KindSpec | None = None
        claims, closed = self.windows.admit(claims)
        for claim in closed:  # its window closed before it could start: no item runs
            outcomes.defer(claim, claim.items_done)
        for claim in claims:
            if claim.took_over:
                log.warning("job %s: took over from a lost worker (attempt %d)",
                            claim.job_id, claim.attempt)
            try:
                spec = self.services.kinds.get(claim.kind)
                model = spec.validate(claim.payload)
            except (UnknownKind, SubmitError) as e:
                outcomes.fail(claim, PermanentError(str(e)))
                continue
            if claim.deadline is not None and claim.started_at > claim.deadline:
                outcomes.fail(claim, PermanentError(
                    f"deadline {claim.deadline.isoformat()} passed before the job could start"))
                continue
            runnable.append((claim, model))
        if runnable and spec is not None:
            policy = self.settings.policy(Tier(runnable[0][0].tier))
            with self.leases.holding([c for c, _ in runnable], policy.lease_s):
                chunks = [(c, m) for c, m in runnable if self._is_chunk(spec, c)]
                for claim, model in chunks:
                    run_chunk(spec, claim, model,
                              context(spec, [claim], self.worker, self.resources.get(spec.name)),
                              policy=policy, segment=self._segment(spec),
                              check=HigherTierCheck(self.services.redis, Tier(claim.tier),
                                                    enabled=self.settings.preemption,
                                                    served=self.tiers),
                              in_place=self.in_place, pacer=self.pacer,
                              step_s=self._step_s(spec, policy),
                              results=self.results, outcomes=outcomes,
                              window_open=self.windows.open_check(claim.window)
                              if claim.window else None)
                rest = [(c, m) for c, m in runnable if not self._is_chunk(spec, c)]
                resources = self.resources.get(spec.name)
                if rest and spec.batch is not None:
                    call_kind(spec, rest, self.worker, resources, outcomes)
                else:  # a plain kind runs each job alone, even when they travelled together
                    for pair in rest:
                        call_kind(spec, [pair], self.worker, resources, outcomes)
        return outcomes

    @staticmethod
    def _is_chunk(spec: KindSpec, claim: Claim) -> bool:
        return (claim.parent_id is not None and spec.batch is not None
                and spec.batch.bulk_field is not None)

    @staticmethod
    def _step_s(spec: KindSpec, policy: TierPolicy) -> float:
        """How long a chunk's mini-batch should take: the tier's ``preempt_check_ms``, unless
        the kind fixed its own ``segment_size`` (e.g. ``index``, which commits per mini-batch)."""
        if spec.batch is not None and spec.batch.segment_size:
            return 0.0
        return policy.preempt_check_ms / 1000

    def _segment(self, spec: KindSpec) -> int:
        """Items per mini-batch of a chunk: the preemption points are this far apart."""
        return spec.batch.segment_size if spec.batch and spec.batch.segment_size \
            else self.settings.model_batch

    def _finish(self, outcomes: Outcomes) -> dict[str, str | None]:
        """Record every outcome in one transaction, then act on what was recorded."""
        finishes = [self._to_finish(outcomes, *item) for item in outcomes.items]
        owned = self.services.store.finish_many(finishes)
        record: Callable[[Any], None] | None = None
        self.metrics.record(finishes, owned)
        if finishes:  # slot seconds per job, claim to finish: admission control's estimate
            started = min(f.claim.started_at for f in finishes)
            until = outcomes.ran_until or utcnow()  # a write-behind finish: the run's end
            seconds, tier = (until - started).total_seconds(), finishes[0].claim.tier

            kinds = {f.claim.kind for f in finishes}

            def record(pipe: Any) -> None:
                record_service(self.services.redis, tier, seconds, len(finishes), pipe=pipe)
                if len(kinds) == 1:  # the kind's own slot time per job (batching.plain_take)
                    record_service(self.services.redis, tier, seconds, len(finishes),
                                   pipe=pipe, field=kind_service_field(kinds.pop()))
        states: dict[str, str | None] = {}
        ended: list[tuple[str, str]] = []
        for finish in finishes:
            job_id = finish.claim.job_id
            if job_id in owned:
                states[job_id] = finish.state
                try:
                    if self._after(finish):
                        ended.append((job_id, finish.state))
                except Exception:  # the others' follow-ups and signals still go out
                    log.exception("job %s: %s is recorded, but what it calls for (a retry's or "
                                  "a resume's message, a fair-turn place) failed; the "
                                  "reconciler sends it again", job_id, finish.state)
            else:
                log.info("job %s: attempt %d no longer owns the job; its outcome is discarded",
                         job_id, finish.claim.attempt)
                states[job_id] = None
        self.services.signal_many(ended, also=record)
        return states

    def _to_finish(self, outcomes: Outcomes, claim: Claim, result: Any,
                   error: BaseException | None, cpu: float, wall: float) -> Finish:
        if claim.job_id in outcomes.deferred:
            finish = Finish(claim, state=JobState.DEFERRED, outcome=Outcome.PREEMPTED,
                            cpu_seconds=cpu, wall_seconds=wall,
                            checkpoint=outcomes.deferred[claim.job_id],
                            error=f"window {claim.window} closed; waits for its next opening")
        elif claim.job_id in outcomes.preempted:
            finish = Finish(claim, state=JobState.QUEUED, outcome=Outcome.PREEMPTED,
                            cpu_seconds=cpu, wall_seconds=wall,
                            checkpoint=outcomes.preempted[claim.job_id])
        elif error is None:
            finish = self._success(claim, result, cpu, wall)
        else:
            finish = self._failure(claim, error, cpu, wall)
        batch = outcomes.batches.get(claim.job_id)
        if batch is not None:
            finish = replace(finish, batch_id=batch[0], batch_size=batch[1])
        return finish

    def _after(self, finish: Finish) -> bool:
        """Publish what a recorded outcome calls for (a retry, a resume); True if it ended."""
        claim = finish.claim
        policy = self.settings.policy(Tier(claim.tier))
        if finish.outcome == Outcome.PREEMPTED and finish.state == JobState.DEFERRED:
            log.info("job %s: window %s closed at item %s; deferred", claim.job_id,
                     claim.window, finish.checkpoint)
            if claim.parent_id is not None:
                self._chunk_left(claim.job_id, claim.tier)  # its fair-turn place is free
        elif finish.outcome == Outcome.PREEMPTED:
            self._resume_later(finish)
        elif finish.state == JobState.QUEUED:
            delay = max(((finish.requeue_at or utcnow()) - utcnow()).total_seconds(), 0.0)
            publish(self.services.celery, claim.job_id, Tier(claim.tier), policy.priority,
                    countdown=delay, time_limit=policy.time_limit_s)
            mark_sent(self.services.redis, [(claim.job_id, claim.attempt)])
            log.info("job %s: retry %d/%d in %.2fs", claim.job_id, claim.attempt + 1,
                     claim.max_attempts, delay)
        else:
            if claim.parent_id is not None:
                self._chunk_left(claim.job_id, claim.tier)
                if finish.result_ref:
                    self.results.drop_parts(claim.parent_id, claim.job_id)
            return True
        return False

    def _chunk_left(self, chunk_id: str, tier: str) -> None:
        """A bulk chunk has ended: its place in the fair window goes to the next tenant."""
        self.fair.dispatch(Tier(tier), self.settings.policy(Tier(tier)), released=chunk_id)

    def _resume_later(self, finish: Finish) -> None:
        """Put a preempted chunk back at the front of its tier (behind every higher tier)."""
        claim = finish.claim
        policy = self.settings.policy(Tier(claim.tier))
        publish(self.services.celery, claim.job_id, Tier(claim.tier), policy.resume_priority,
                time_limit=policy.time_limit_s)
        mark_sent(self.services.redis, [(claim.job_id, claim.attempt)])
        log.info("job %s: preempted at item %s after %.2fs; resumes at the front of %s",
                 claim.job_id, finish.checkpoint, finish.wall_seconds, claim.tier)

    def _success(self, claim: Claim, result: Any, cpu: float, wall: float) -> Finish:
        # (a 0-d array or numpy scalar has a shape but no len: one item)
        items = len(result) if isinstance(result, list | tuple) or \
            getattr(result, "ndim", 0) > 0 else 1
        ref = None
        if claim.parent_id is not None:
            # A chunk's rows go to a file, not through the JSON check the other results pass
            # at the call: a row the file cannot take fails this chunk, not the whole finish.
            try:
                ref = self.results.write_chunk(claim.parent_id, claim.job_id, result)
            except (TypeError, ValueError) as e:
                return self._failure(claim, PermanentError(
                    f"result rows cannot be written as JSON: {e}"), cpu, wall)
            except OSError as e:  # e.g. a full disk: retried
                return self._failure(claim, TransientError(
                    f"could not write the chunk's results: {e}"), cpu, wall)
            result = None
        elif hasattr(result, "dtype"):
            result = encode_array(result)  # bytes, not thousands of JSON floats
        return Finish(claim, state=JobState.SUCCEEDED, outcome=Outcome.SUCCEEDED,
                      cpu_seconds=cpu, wall_seconds=wall, result=result, result_ref=ref,
                      items=items)

    def _failure(self, claim: Claim, error: BaseException, cpu: float, wall: float) -> Finish:
        message = f"{type(error).__name__}: {error}"
        if isinstance(error, PermanentError | SubmitError):
            log.info("job %s failed permanently: %s", claim.job_id, message)
            return Finish(claim, state=JobState.FAILED, outcome=Outcome.FAILED, cpu_seconds=cpu,
                          wall_seconds=wall, error=message)
        if isinstance(error, SoftTimeLimitExceeded):
            message = f"time limit of the {claim.tier} tier exceeded"
        log.info("job %s attempt %d failed: %s", claim.job_id, claim.attempt, message)
        if claim.retries_used >= claim.max_attempts:
            return Finish(claim, state=JobState.DEAD, outcome=Outcome.DEAD, cpu_seconds=cpu,
                          wall_seconds=wall,
                          error=f"{message} (after {claim.attempt} attempts)")
        spec = self.services.kinds.get(claim.kind)
        retry = spec.retry.resolve(self.settings.policy(Tier(claim.tier)))
        delay = backoff_delay(claim.attempt, retry.backoff_base_s or 0.0,
                              retry.backoff_max_s or 0.0, self._rng)
        return Finish(claim, state=JobState.QUEUED, outcome=Outcome.RETRY, cpu_seconds=cpu,
                      wall_seconds=wall, error=message,
                      requeue_at=utcnow() + timedelta(seconds=delay))

    def _not_claimable(self, job_id: str) -> str | None:
        """A delivery we may not run: finished, cancelled, unknown, or held by a live lease."""
        store = self.services.store
        job = store.get(job_id)
        if job is None:
            log.warning("job %s: message for a job that does not exist; dropped", job_id)
            return None
        if job.state != JobState.RUNNING:
            log.info("job %s: duplicate delivery of a %s job ignored", job_id, job.state)
            if job.parent_id is not None and job.terminal:
                self._chunk_left(job_id, job.tier)  # e.g. cancelled while it waited its turn
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
