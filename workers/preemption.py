"""What running chunked work does between mini-batches when higher-tier work is waiting.

``HigherTierCheck`` is the cheap check: one Lua call sums the lengths of the higher tiers' queue
lists (every priority step) and of their batch buffers. No database query: it runs after every
mini-batch of bulk work. It only looks at the tiers the worker serves: a worker dedicated to
offline work cannot run interactive work, so yielding its slot would help no one.

``InPlaceServer`` is the first answer to waiting interactive work: the chunk's process takes the
waiting interactive messages off their queue itself (through kombu, with the same unacked
bookkeeping as the Celery consumer, so a crash mid-run restores them), runs them with the same
runtime a Celery task would, acknowledges them, and goes on with its chunk. The chunk's state
stays in memory, so this preemption costs no checkpoint, no database write and no republish,
and it needs no minimum slice: interactive work waits at most one mini-batch. Only the
interactive tier is served in place (its work is short by definition and each message runs
under its tier's soft time limit); any other higher-tier work, or interactive work that cannot
be taken (a message not yet due, a message held by the consumer), leads to the full
preemption of ``workers.chunks``: checkpoint, record the attempt as preempted, free the slot.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from types import FrameType
from typing import Any

import redis
from billiard.exceptions import SoftTimeLimitExceeded
from celery import Celery

from orchestrator.batching import (
    BATCH_TASK,
    buffer_key,
    buffers_set,
    decode_item,
    parse_buffer_key,
)
from orchestrator.broker import RUN_TASK, queue_key
from orchestrator.fairness import prefix as fair_prefix
from orchestrator.tiers import PRIORITY_STEPS, TIER_ORDER, Tier

log = logging.getLogger(__name__)

# KEYS: the queue lists of each higher tier (steps), in tier order.
# ARGV: number of queue keys per tier, then the buffer set of each higher tier in tier order.
# Returns the waiting count per higher tier, in tier order.
_WAITING = """
local per = tonumber(ARGV[1])
local out = {}
for t = 1, #ARGV - 1 do
  local n = 0
  for i = (t - 1) * per + 1, t * per do n = n + redis.call('LLEN', KEYS[i]) end
  for _, buffer in ipairs(redis.call('SMEMBERS', ARGV[t + 1])) do
    n = n + redis.call('LLEN', buffer)
  end
  out[t] = n
end
return out
"""


@dataclass(frozen=True)
class TierWork:
    """Where work of some tiers waits in Redis: their Celery queues (every priority step),
    the sets naming their batch buffers, and the key prefixes of their fair turns (bulk chunks
    not yet released onto a queue)."""

    queues: list[str]
    buffer_sets: list[str]
    fair_prefixes: list[str]

    @classmethod
    def of(cls, tiers: Sequence[Tier]) -> TierWork:
        return cls(queues=[queue_key(t, step) for t in tiers for step in PRIORITY_STEPS],
                   buffer_sets=[buffers_set(t) for t in tiers],
                   fair_prefixes=[fair_prefix(t) for t in tiers])

    @classmethod
    def below(cls, tier: Tier, served: Sequence[Tier]) -> TierWork:
        """The served tiers under ``tier`` (a slot lingering for ``tier`` hands itself back
        when they have work)."""
        return cls.of([t for t in TIER_ORDER if t.rank > tier.rank and t in served])


class HigherTierCheck:
    """Counts messages and buffered jobs waiting in the served tiers above ``tier``.

    Disabled (``ORCH_PREEMPTION=0``), it always answers 0: chunks run to their end.
    """

    def __init__(self, client: redis.Redis, tier: Tier, *, enabled: bool = True,
                 served: Sequence[Tier] | None = None) -> None:
        served = TIER_ORDER if served is None else served
        self.above = [t for t in TIER_ORDER if t.rank < tier.rank and t in served] \
            if enabled else []
        work = TierWork.of(self.above)
        self._keys = work.queues
        self._args: list[str | int] = [len(PRIORITY_STEPS), *work.buffer_sets]
        self._script = client.register_script(_WAITING)

    def waiting_by_tier(self) -> dict[Tier, int]:
        if not self.above:
            return {}
        counts = self._script(keys=self._keys, args=self._args)
        return {t: int(n) for t, n in zip(self.above, counts, strict=True)}

    def waiting(self) -> int:
        return sum(self.waiting_by_tier().values())


Dispatch = Callable[[str, list[Any], str], None]
#: kind name -> its interactive batch delay in seconds (raises for a kind this worker lacks)
DelayOf = Callable[[str], float]


class InPlaceServer:
    """Runs waiting interactive messages inside the process of a running chunk.

    ``dispatch(task_name, args, message_id)`` runs one message the way its Celery task would.
    One server lives per worker process; its broker connection is opened on first use.
    """

    #: a message due this soon runs now (an interactive batch trigger's delay is ~10 ms: the
    #: paused chunk's slot is the one the batch was waiting for, and it would sit idle);
    #: messages due later are put back and left to the consumer's timer
    MAX_WAIT_S = 0.05
    #: messages looked at per call: a checkpoint does not turn into an unbounded loop
    MAX_MESSAGES = 32

    def __init__(self, celery: Celery, client: redis.Redis, dispatch: Dispatch, *,
                 time_limit_s: float, delay_of: DelayOf, grace_s: float = 30.0) -> None:
        """``grace_s``: the paused chunk's time between its soft and hard limits."""
        self._celery = celery
        self._redis = client
        self._delay_of = delay_of
        self._dispatch = dispatch
        self._time_limit_s = time_limit_s
        self._grace_s = grace_s
        self._conn: Any = None
        self._queue: Any = None
        self.served = 0  # messages run in place by this process (for tests and logs)
        #: the paused chunk's soft time limit came during the last ``serve``: what ran is
        #: acknowledged and counted, and the caller raises ``SoftTimeLimitExceeded`` for it
        self.limit_due = False

    def _bound_queue(self) -> Any:
        if self._queue is None:
            self._conn = self._celery.connection_for_read()
            queue = self._celery.amqp.queues[Tier.INTERACTIVE.value]
            self._queue = queue(self._conn.default_channel)
        return self._queue

    def close(self) -> None:
        if self._conn is not None:
            self._conn.release()
        self._conn = self._queue = None

    def serve(self) -> tuple[int, float, float]:
        """Run the interactive messages that are due; return (count, cpu s, wall s) spent.

        A message due within ``MAX_WAIT_S`` runs now. One due later (a retry's backoff, a batch
        still filling) goes back to the queue for the consumer's timer, except a batch
        trigger whose buffer another trigger already emptied: running it early is a no-op that
        keeps the buffer's trigger count right, and it stops looking like waiting work.
        """
        wall0, cpu0 = time.perf_counter(), time.process_time()
        count, skipped = 0, set()
        self.limit_due = False
        for _ in range(self.MAX_MESSAGES):
            message = self._bound_queue().get(no_ack=False, accept=["json"])
            if message is None:
                break
            headers = message.headers or {}
            task, message_id = headers.get("task"), headers.get("id")
            if task not in (RUN_TASK, BATCH_TASK) or not message_id:
                message.requeue()  # not ours to run here: the consumer will see it
                break
            args = list(message.decode()[0])
            wait = _seconds_until(headers.get("eta"))
            if wait > self.MAX_WAIT_S and not (task == BATCH_TASK and self._empty(args)):
                message.requeue()
                if message_id in skipped:  # around the queue once: nothing more is due
                    break
                skipped.add(message_id)
                continue
            if not self._run(task, args, message_id):
                message.requeue()  # left to redelivery, as a Celery task's would be
                break
            message.ack()
            count += 1
            if self.limit_due:
                break
        if not self.limit_due:
            count += self._take_buffers()
        self.served += count
        return count, time.process_time() - cpu0, time.perf_counter() - wall0

    def _take_buffers(self) -> int:
        """Run interactive batches whose trigger is out of reach, straight from their buffers.

        A trigger due later than this chunk waits may have been fetched by the worker's
        consumer, which holds it in its timer until it is due and then needs a free slot: none
        is free while chunks fill them all. So a buffer whose oldest job is (nearly) due is
        taken here, as its trigger would take it, under a processing list of its own; the
        trigger, when it runs, finds the jobs gone and does nothing.
        """
        count = 0
        for raw in self._redis.smembers(buffers_set(Tier.INTERACTIVE)):
            parsed = parse_buffer_key(raw)
            if parsed is None:
                continue
            tier, kind, key = parsed
            oldest = self._redis.lindex(buffer_key(tier, kind, key), 0)
            if oldest is None:
                continue
            try:
                delay = self._delay_of(kind)
            except Exception:  # a kind this worker does not run: its own workers will
                continue
            if decode_item(oldest)[1] / 1000.0 + delay - time.time() > self.MAX_WAIT_S:
                continue
            if not self._run(BATCH_TASK, [kind, key, tier.value], f"in-place-{uuid.uuid4()}"):
                break  # its jobs stay claimed or buffered: their leases or triggers recover them
            count += 1
            if self.limit_due:
                break
        return count

    def _run(self, task: str, args: list[Any], message_id: str) -> bool:
        """Run one message under the tier's time limit; False when it could not be run.

        Job failures are the runtime's to record; what comes here is a time limit hit outside
        the kind, a broken message or a lost connection. None of it may fail the paused chunk.
        The paused chunk's own soft limit, should it fire meanwhile, waits until this work is
        done (see ``_soft_limit``) and sets ``limit_due``.
        """
        fired = _Fired()
        try:
            with _soft_limit(self._time_limit_s, fired, outer_grace_s=self._grace_s / 2):
                self._dispatch(task, args, message_id)
        except SoftTimeLimitExceeded:
            if not fired.own:  # the paused chunk's own limit: the chunk's to handle
                raise
            log.warning("interactive message %s run in place hit the tier's time limit",
                        message_id)
        except Exception:
            log.exception("interactive message %s failed when run in place", message_id)
            return False
        if fired.outer:  # the chunk's limit came while the work ran in place: now it is due
            self.limit_due = True
        return True

    def _empty(self, args: list[Any]) -> bool:
        kind, key, tier = args
        return self._redis.llen(buffer_key(tier, kind, key)) == 0


def _seconds_until(eta: str | None) -> float:
    if not eta:
        return 0.0
    try:
        due = datetime.fromisoformat(eta)
    except ValueError:
        return 0.0
    return due.timestamp() - time.time()


@dataclass
class _Fired:
    """Which soft time limit fired while work ran in place."""

    own: bool = False  #: the interactive tier's, set for the work run in place
    outer: bool = False  #: the paused chunk's (Celery's, signalled by billiard)


@contextmanager
def _soft_limit(seconds: float, fired: _Fired, *, outer_grace_s: float = 0.0
                ) -> Iterator[None]:
    """Raise ``SoftTimeLimitExceeded`` in this (main) thread after ``seconds``, as Celery would.

    Celery's own soft limit for the paused chunk (``SIGUSR1`` from billiard) may fire meanwhile.
    Raised into the work run in place, it would fail interactive jobs that had nothing to do
    with it (an attempt each), and the chunk would not learn that its time was up. So it is
    only marked in ``fired``: the work goes on, and the caller raises it for the chunk once the
    work is done. The chunk's hard limit comes its grace period after its soft one, so the work
    now has at most ``outer_grace_s`` left (half the grace: the chunk still has to stop) before
    its own limit cuts it.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    closing = False

    def expired(signum: int, frame: FrameType | None) -> None:
        fired.own = True
        raise SoftTimeLimitExceeded()

    def outer(signum: int, frame: FrameType | None) -> None:
        first, fired.outer = not fired.outer, True
        if closing or not first or outer_grace_s <= 0:
            return  # (tearing down, or a second signal: recorded, nothing re-armed)
        left, _ = signal.getitimer(signal.ITIMER_REAL)
        if not fired.own and (left == 0 or left > outer_grace_s):
            signal.setitimer(signal.ITIMER_REAL, outer_grace_s)

    previous = signal.signal(signal.SIGALRM, expired)
    try:
        if seconds > 0:  # armed before ``outer`` is there to shorten it
            signal.setitimer(signal.ITIMER_REAL, seconds)
        chunk_limit = signal.signal(signal.SIGUSR1, outer)
        try:
            yield
        finally:
            closing = True  # from here a SIGUSR1 is only recorded: nothing re-arms the timer
            signal.signal(signal.SIGUSR1, chunk_limit)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
