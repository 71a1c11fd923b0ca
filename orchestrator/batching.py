"""Micro-batching buffers in Redis: small jobs wait per (tier, kind, key) with their enqueue time.

The unit of transport is a batch, not a job. Submitting a batchable job stores its row, then
RPUSHes ``"<job id> <enqueue ms>"`` onto its buffer and publishes a *trigger* message
(``orchestrator.batch``) on the tier's queue only when the buffer needs one:

- the push filled a batch (length is a multiple of ``max_batch_size``): trigger now;
- the push made the buffer non-empty: trigger in ``max_queue_delay_ms``, the cap on the new
  oldest job's time since enqueue (Triton's dynamic batcher bounds each request the same way).

A worker running a trigger atomically moves up to ``max_batch_size`` items into a processing
list named after the trigger message (so a redelivered trigger finds the same items), and if
items remain and no trigger is pending for them, it publishes one (now if a batch is full,
else when the oldest remaining item reaches its cap). A count of pending triggers per buffer
keeps a drain of a long backlog at about one message per batch.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import redis
from celery import Celery

from orchestrator.broker import TRANSPORT_KEY, time_limits
from orchestrator.tiers import Tier

BATCH_TASK = "orchestrator.batch"

# --- plain kinds travel in batches too, when they are short ----------------------------------
# A kind without a batch policy runs one job per call, but its jobs need not each be a Celery
# message with its own claim and finish transaction: once the kind's measured slot time per job
# (``kind_service_field`` in ``orch:svc``) says a few fit in ``PLAIN_TAKE_BUDGET_S``, submits
# push its jobs onto a buffer like a batch kind's (no delay: the trigger goes out when the
# buffer turns non-empty, or fills), and a worker takes as many as fit the budget, claims them
# in one statement, runs each alone and finishes them in one transaction. A long or never
# measured kind keeps one message per job, so a slow job never holds up others in one slot.

#: Redis hash of measured slot seconds per job: per tier (admission control) and per kind
SERVICE_KEY = "orch:svc"
#: seconds of expected work one take of plain jobs may hold (the priority inversion it bounds)
PLAIN_TAKE_BUDGET_S = 0.05
#: the most plain jobs one take runs
PLAIN_BATCH_MAX = 32
#: buffer key of a plain kind's jobs (one buffer per tier and kind)
PLAIN_KEY = "-"
#: how long a process trusts the service times it read
SERVICE_CACHE_S = 1.0
#: how long one trigger's task keeps taking a plain kind's newly arrived jobs before it hands
#: its slot back to Celery (which then serves the most urgent message): the drain loop's
#: bound on priority inversion
PLAIN_DRAIN_BUDGET_S = 0.25


# --- a batch kind's slot keeps taking batches while they keep coming --------------------------
# After a batch, the task that ran it looks at its buffer again instead of handing the slot back
# to Celery: a batch that is due (full, or its oldest job at its cap) is taken at once; one whose
# cap is at most ``BATCH_DRAIN_WAIT_MAX_S`` away is waited for in the process, so it starts on
# its cap rather than one broker and pool dispatch after it (Triton's model instances take the
# next batch the same way). The trigger the submit published stays the backstop: if this slot
# is busy at the cap, another one takes the batch. The loop ends when the buffer is empty, the
# next cap is further away, work of a higher tier or another buffer of the same tier is waiting,
# or the tier's ``drain_budget_s`` is spent.
#
# A draining slot also *promises* when it will look at the buffer again (``drainers_key``: the
# end of the batch it runs, from its own recent pace, or the cap it sleeps until).
# A push whose cap falls after a live promise publishes no trigger: that slot takes the job in
# time, and the trigger would only find an empty buffer (at low load, half of all triggers did).
# A broken promise (the slot is late, or died) no longer counts once its time has passed, so
# the next push publishes a trigger; a slot that stops draining withdraws its promise and
# triggers whatever is left, in one step.
#
# A draining slot that finds its buffer empty *lingers* (``lingering_key``: when its linger
# ends) instead of handing the slot back at once: it blocks on the buffer's wake list, and a
# push that sees a live lingerer wakes it (one RPUSH) instead of publishing a trigger. The
# woken slot takes the job on its cap, with no broker message, no dispatch by the worker's main
# process and no task start in between (at 25% load on 2 cores the worker's main process went
# from 1.3 to 0.58 ms of CPU per job, ``bench/batching.py --only open``).

#: the longest a draining slot sleeps for the next batch's cap
BATCH_DRAIN_WAIT_MAX_S = 0.02
#: a draining slot that finds its buffer empty waits this long for the next push (lingers)
#: before it hands the slot back to Celery, when its tier's cap is short enough for a broker
#: and pool dispatch to matter (``BATCH_LINGER_MAX_DELAY_MS``) and no lower tier has work
#: waiting; at most one slot lingers on a buffer
BATCH_LINGER_S = 0.1
#: buffers whose cap is longer than this do not keep a slot lingering
BATCH_LINGER_MAX_DELAY_MS = 100.0
#: a lingering slot looks at the other buffers, the higher tiers and the lower tiers this often
BATCH_LINGER_SLICE_S = 0.05
#: a push that makes a buffer non-empty publishes no trigger while this many are pending
PUSH_MAX_PENDING = 4
#: a trigger for a cap is due this much before it: the broker and the pool's dispatch take
#: about that long (2.2 ms median, 3.9 ms p99 at 5% load on 2 cores: "claim after cap" of
#: ``bench/batching.py --only open --loads 0.05``), so the task reaches its slot by the cap,
#: waits there for it, and takes the batch on time
TRIGGER_LEAD_S = 0.003


class Pace:
    """Seconds a batch of n jobs takes, a + b·n, fitted online (exponentially weighted).

    A draining slot's promise comes from it. A per-job average alone overstates small batches
    (the claim's round trip and the call's fixed cost are paid once per batch), which made
    promises miss caps they would have met.
    """

    WEIGHT = 0.1

    def __init__(self) -> None:
        self._n = self._t = self._nn = self._nt = 0.0
        self._seen = False

    def add(self, n: int, seconds: float) -> None:
        w = 1.0 if not self._seen else self.WEIGHT
        self._seen = True
        self._n += w * (n - self._n)
        self._t += w * (seconds - self._t)
        self._nn += w * (n * n - self._nn)
        self._nt += w * (n * seconds - self._nt)

    def seconds(self, n: int) -> float:
        var = self._nn - self._n * self._n
        if var <= 1e-9 or self._n <= 0:  # one batch size seen: scale its time
            return self._t * n / max(self._n, 1e-9)
        b = max((self._nt - self._n * self._t) / var, 0.0)
        a = max(self._t - b * self._n, 0.0)
        return a + b * n


def lead(countdown_s: float) -> float | None:
    """A trigger's countdown for a cap ``countdown_s`` away: ``TRIGGER_LEAD_S`` early."""
    return max(countdown_s - TRIGGER_LEAD_S, 0.0) or None


def kind_service_field(kind: str) -> str:
    """The ``orch:svc`` field holding a kind's slot seconds per job (an EWMA)."""
    return f"kind:{kind}"


def plain_take(service_s: float | None) -> int:
    """How many jobs of a plain kind one take runs; 0: send its jobs one message each."""
    if service_s is None:
        return 0
    if service_s <= 0:
        return PLAIN_BATCH_MAX
    n = int(PLAIN_TAKE_BUDGET_S / service_s)
    return min(n, PLAIN_BATCH_MAX) if n >= 2 else 0


class ServiceTimes:
    """A per-process cache of the kinds' measured slot seconds per job (from ``orch:svc``)."""

    def __init__(self, client: redis.Redis) -> None:
        self._redis = client
        self._cache: dict[str, tuple[float | None, float]] = {}

    def get(self, kind: str) -> float | None:
        now = time.monotonic()
        hit = self._cache.get(kind)
        if hit is not None and now - hit[1] < SERVICE_CACHE_S:
            return hit[0]
        try:
            raw = self._redis.hget(SERVICE_KEY, kind_service_field(kind))
        except redis.RedisError:
            raw = None  # unknown: one message per job, the safe path
        value = float(raw) if raw is not None else None
        self._cache[kind] = (value, now)
        return value

    def take(self, kind: str) -> int:
        return plain_take(self.get(kind))



# Shared by the scripts that take from a buffer or stop draining it (one KEYS/ARGV layout:
# KEYS[1] buffer, KEYS[2] processing list, KEYS[3] pending counter, KEYS[4] drainers or drain
# flag; ARGV[1] max batch, ARGV[2] now ms, ARGV[3] max delay ms, ARGV[4] processing ttl s,
# ARGV[5] pending ttl s).
# due_in: ms until the buffer's next batch is due (0 when it is full, else at its oldest job's
# cap), or -1 when the buffer is empty.
# retrigger: what remains gets a trigger unless one is pending (when it is due); returns its
# delay in ms (counted as pending), or -1.
# promise: a draining slot will look at the buffer again at ``at`` ms.
_SHARED_LUA = """
local function due_in(now)
  local len = redis.call('LLEN', KEYS[1])
  if len == 0 then return -1 end
  if len >= tonumber(ARGV[1]) then return 0 end
  local enq = tonumber(string.match(redis.call('LINDEX', KEYS[1], 0), ' (%d+)$')) or now
  return math.max(0, enq + tonumber(ARGV[3]) - now)
end
local function retrigger(now)
  local ms = due_in(now)
  if ms < 0 or tonumber(redis.call('GET', KEYS[3]) or '0') > 0 then return -1 end
  redis.call('INCR', KEYS[3])
  redis.call('EXPIRE', KEYS[3], tonumber(ARGV[5]))
  return ms
end
local function promise(drainers, id, at)
  redis.call('ZADD', drainers, at, id)
  redis.call('PEXPIRE', drainers, 60000)
end
"""

# A push's check for a lingering slot (KEYS[6] lingering set, KEYS[7] wake list): one whose
# linger has not ended is woken (at most one token waits on the list) and the push needs no
# trigger. Returns true when a lingerer will take the buffer.
_WAKE_LUA = """
local function wake(now)
  if not redis.call('ZRANGEBYSCORE', KEYS[6], now, '+inf', 'LIMIT', 0, 1)[1] then
    return false
  end
  if redis.call('LLEN', KEYS[7]) == 0 then
    redis.call('RPUSH', KEYS[7], '1')
    redis.call('PEXPIRE', KEYS[7], 1000)
  end
  return true
end
"""

# A trigger's take: up to max batch items into the processing list (a redelivered trigger finds
# its items there), one pending trigger fewer. Returns {retrigger ms or -1, item, ...}.
_TAKE = _SHARED_LUA + """
local items
if redis.call('EXISTS', KEYS[2]) == 1 then
  items = redis.call('LRANGE', KEYS[2], 0, -1)
  redis.call('EXPIRE', KEYS[2], tonumber(ARGV[4]))  -- taken again now (the reconciler's age)
else
  if tonumber(redis.call('GET', KEYS[3]) or '0') > 0 then redis.call('DECR', KEYS[3]) end
  items = redis.call('LRANGE', KEYS[1], 0, tonumber(ARGV[1]) - 1)
  if #items > 0 then
    redis.call('LTRIM', KEYS[1], #items, -1)
    redis.call('RPUSH', KEYS[2], unpack(items))
    redis.call('EXPIRE', KEYS[2], tonumber(ARGV[4]))
  end
end
local out = {retrigger(tonumber(ARGV[2]))}
for i = 1, #items do out[#out + 1] = items[i] end
return out
"""

# How long until a trigger's batch is due. KEYS: buffer, processing list. ARGV: max batch, now
# ms, max delay ms. Returns 0 when due (or a redelivered trigger's batch is already taken), -1
# when the buffer is empty, else ms until its oldest job's cap.
_DUE_IN = _SHARED_LUA + """
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
return due_in(tonumber(ARGV[2]))
"""


# A draining slot's next batch (KEYS[4]: drainers, KEYS[5]: lingering set, KEYS[6...]: the
# lower tiers' queues). More ARGV: the tier's buffer set, drainer id, ms of work per job (0:
# unknown, no promise), ms of work per batch, ms to linger on an empty buffer (0: do not),
# ARGV[11...]: the lower tiers' buffer sets ("b:<set>") and fair-turn prefixes ("f:<prefix>").
# Returns {'empty'} (promise withdrawn), {'linger'} (empty, no lower tier has work waiting,
# and this slot is the buffer's lingerer until now + ARGV[10] ms: a push wakes it), {'yield',
# retrigger ms or -1} (another buffer of the tier holds jobs: its turn; promise withdrawn, the
# rest triggered), {'wait', ms} (the oldest job's cap is ms away and the batch is not full:
# promised for then), or {'took', retrigger ms or -1, item, ...} (promised for the batch's
# end). A slot that stops for another reason calls ``_DRAIN_STOP``.
_DRAIN_TAKE = _SHARED_LUA + """
local now = tonumber(ARGV[2])
for _, other in ipairs(redis.call('SMEMBERS', ARGV[6])) do
  if other ~= KEYS[1] and redis.call('LLEN', other) > 0 then
    redis.call('ZREM', KEYS[4], ARGV[7])
    redis.call('ZREM', KEYS[5], ARGV[7])
    return {'yield', retrigger(now)}
  end
end
local len = redis.call('LLEN', KEYS[1])
if len == 0 then
  redis.call('ZREM', KEYS[4], ARGV[7])
  local linger = tonumber(ARGV[10])
  for i = 6, #KEYS do
    if linger > 0 and redis.call('LLEN', KEYS[i]) > 0 then linger = 0 end
  end
  for i = 11, #ARGV do
    if linger <= 0 then break end
    local kind, name = string.sub(ARGV[i], 1, 1), string.sub(ARGV[i], 3)
    if kind == 'b' then  -- a lower tier's batch buffers
      for _, lower in ipairs(redis.call('SMEMBERS', name)) do
        if redis.call('LLEN', lower) > 0 then linger = 0 break end
      end
    else  -- a lower tier's bulk chunks waiting for their fair turn
      for _, tenant in ipairs(redis.call('HKEYS', name .. ':weights')) do
        if redis.call('LLEN', name .. ':q:' .. tenant) > 0 then linger = 0 break end
      end
    end
  end
  if linger > 0 then
    local others = redis.call('ZRANGEBYSCORE', KEYS[5], now, '+inf', 'LIMIT', 0, 2)
    if not others[1] or (others[1] == ARGV[7] and not others[2]) then
      redis.call('ZADD', KEYS[5], now + linger, ARGV[7])
      redis.call('PEXPIRE', KEYS[5], 60000)
      return {'linger'}
    end
  end
  redis.call('ZREM', KEYS[5], ARGV[7])
  return {'empty'}
end
redis.call('ZREM', KEYS[5], ARGV[7])
local wait = due_in(now)
if wait > 0 then
  promise(KEYS[4], ARGV[7], now + wait)
  return {'wait', wait}
end
local items = redis.call('LRANGE', KEYS[1], 0, tonumber(ARGV[1]) - 1)
redis.call('LTRIM', KEYS[1], #items, -1)
redis.call('RPUSH', KEYS[2], unpack(items))
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[4]))
if tonumber(ARGV[8]) > 0 then
  promise(KEYS[4], ARGV[7], now + #items * tonumber(ARGV[8]) + tonumber(ARGV[9]))
end
local out = {'took', retrigger(now)}
for i = 1, #items do out[#out + 1] = items[i] end
return out
"""

# A slot stops draining (KEYS[4]: drainers, KEYS[5]: lingering set; ARGV[6]: drainer id):
# withdraws its promise (and its linger) and returns the retrigger ms for what is left, or -1.
_DRAIN_STOP = _SHARED_LUA + """
redis.call('ZREM', KEYS[4], ARGV[6])
redis.call('ZREM', KEYS[5], ARGV[6])
return retrigger(tonumber(ARGV[2]))
"""

# A slot starts draining (its first batch, taken by its trigger, runs until ARGV[2] ms).
# KEYS: drainers. ARGV: drainer id, promised ms.
_DRAIN_PROMISE = _SHARED_LUA + """
promise(KEYS[1], ARGV[1], tonumber(ARGV[2]))
"""

# A batch kind's push. KEYS: buffer, buffers set, transport hash, pending counter, drainers,
# lingering set, wake list. ARGV: item, job id, attempt, max batch, pending ttl s, now ms, max
# delay ms, most pending.
# Returns -1: no trigger; else publish one (counted as pending) in that many ms: 0 when a batch
# is full, else at the oldest buffered job's cap. A slot lingering on the buffer is woken
# instead. A job that makes the buffer non-empty needs a trigger unless a draining slot
# promised to be back by its cap, or ``PUSH_MAX_PENDING`` triggers are already on their way
# (while every slot drains, more would only pile up on the tier's queue and each find an empty
# buffer later); a later job needs one only if no trigger is pending and no live promise
# covers the oldest job (a promise was broken).
_PUSH_BATCH = _WAKE_LUA + """
local len = redis.call('RPUSH', KEYS[1], ARGV[1])
redis.call('SADD', KEYS[2], KEYS[1])
redis.call('HSET', KEYS[3], ARGV[2], ARGV[3])
local now = tonumber(ARGV[6])
if wake(now) then return -1 end
local function counted(ms)
  redis.call('INCR', KEYS[4])
  redis.call('EXPIRE', KEYS[4], tonumber(ARGV[5]))
  return ms
end
if len % tonumber(ARGV[4]) == 0 then return counted(0) end
local pending = tonumber(redis.call('GET', KEYS[4]) or '0')
if pending > 0 and (len > 1 or pending >= tonumber(ARGV[8])) then return -1 end
local oldest = redis.call('LINDEX', KEYS[1], 0)
local cap = (tonumber(string.match(oldest, ' (%d+)$')) or now) + tonumber(ARGV[7])
local live = redis.call('ZRANGEBYSCORE', KEYS[5], now, '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
if live[2] and tonumber(live[2]) <= cap then return -1 end
return counted(math.max(cap - now, 0))
"""


# A plain kind's push. KEYS: buffer, buffers set, transport hash, pending counter, drain flag.
# ARGV: item, job id, attempt, max batch, pending ttl s.
# Returns 1 when the caller must publish a trigger (already counted as pending), else 0.
# No trigger while a worker drains the buffer (it takes what arrives) or while one is pending
# (it will take this job), unless a full batch more has piled up (another slot may start).
_PUSH_PLAIN = """
local len = redis.call('RPUSH', KEYS[1], ARGV[1])
redis.call('SADD', KEYS[2], KEYS[1])
redis.call('HSET', KEYS[3], ARGV[2], ARGV[3])
local full = len % tonumber(ARGV[4]) == 0
if not full then
  if redis.call('EXISTS', KEYS[5]) == 1 then return 0 end
  if tonumber(redis.call('GET', KEYS[4]) or '0') > 0 then return 0 end
end
redis.call('INCR', KEYS[4])
redis.call('EXPIRE', KEYS[4], tonumber(ARGV[5]))
return 1
"""

# A draining worker's next take. KEYS: buffer, processing list, drain flag.
# ARGV: max batch, processing ttl s, drain ttl ms. Returns the items taken; none: the buffer
# was empty and the flag is cleared, in the same atomic step a push checks it in.
_TAKE_MORE = """
local items = redis.call('LRANGE', KEYS[1], 0, tonumber(ARGV[1]) - 1)
if #items == 0 then
  redis.call('DEL', KEYS[3])
  return {}
end
redis.call('LTRIM', KEYS[1], #items, -1)
redis.call('RPUSH', KEYS[2], unpack(items))
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[2]))
redis.call('SET', KEYS[3], '1', 'PX', tonumber(ARGV[3]))
return items
"""

# A draining worker stops (its budget is spent; KEYS[4]: the drain flag): the flag goes, and
# jobs left get a trigger now unless one is pending. Returns 0 (publish one, counted) or -1.
_STOP_DRAIN = _SHARED_LUA + """
redis.call('DEL', KEYS[4])
return retrigger(tonumber(ARGV[2]))
"""


# Taken items go back to the head of their buffer. KEYS: buffer, processing list, buffers set.
# ARGV: the items, oldest first.
_GIVE_BACK = """
for i = #ARGV, 1, -1 do redis.call('LPUSH', KEYS[1], ARGV[i]) end
if #ARGV > 0 then redis.call('SADD', KEYS[3], KEYS[1]) end
redis.call('DEL', KEYS[2])
"""


def buffer_key(tier: Tier | str, kind: str, key: str) -> str:
    return f"orch:buf:{Tier(tier).value}:{kind}:{key}"


_TIER_NAMES = frozenset(t.value for t in Tier)


def parse_buffer_key(buffer: bytes | str) -> tuple[Tier, str, str] | None:
    """(tier, kind, key) of a ``buffer_key``; None for anything else."""
    text = buffer.decode() if isinstance(buffer, bytes) else buffer
    parts = text.split(":", 4)
    if len(parts) != 5 or parts[:2] != ["orch", "buf"] or parts[2] not in _TIER_NAMES:
        return None
    return Tier(parts[2]), parts[3], parts[4]


def buffers_set(tier: Tier | str) -> str:
    """The set of a tier's buffer keys (read by the preemption check)."""
    return f"orch:bufs:{Tier(tier).value}"


def pending_key(buffer: str) -> str:
    return f"{buffer}:pending"


def drainers_key(buffer: str) -> str:
    """Draining slots' promises: when each will look at ``buffer`` again (ms since epoch)."""
    return f"{buffer}:drainers"


def lingering_key(buffer: str) -> str:
    """Sorted set: the slot lingering on ``buffer`` (at most one), scored by its linger's end."""
    return f"{buffer}:lingering"


def wake_key(buffer: str) -> str:
    """List a push wakes the slot lingering on ``buffer`` with (one token at most)."""
    return f"{buffer}:wake"


def drain_key(buffer: str) -> str:
    """Present while a worker drains ``buffer`` take after take (plain kinds)."""
    return f"{buffer}:draining"


#: every processing list's key starts so (the reconciler looks for abandoned ones)
PROCESSING_PREFIX = "orch:proc:"


def processing_key(message_id: str) -> str:
    return f"{PROCESSING_PREFIX}{message_id}"


def encode_item(job_id: str, enqueued_at: datetime) -> str:
    return f"{job_id} {int(enqueued_at.timestamp() * 1000)}"


def decode_item(item: bytes | str) -> tuple[str, int]:
    text = item.decode() if isinstance(item, bytes) else item
    job_id, _, ms = text.partition(" ")
    return job_id, int(ms or 0)


@dataclass(frozen=True)
class Taken:
    """What one trigger took: (job id, enqueue ms) pairs, and when to trigger the rest.

    From ``Buffers.drain_take`` also why nothing was taken: ``stop`` ("empty", "linger" or
    "yield"), or
    ``wait_s`` until the next batch is due.
    """

    items: list[tuple[str, int]]
    retrigger_in_s: float | None
    stop: str | None = None
    wait_s: float | None = None


class Buffers:
    """Pushes to and takes from the batch buffers; publishes triggers."""

    def __init__(self, client: redis.Redis, celery: Celery, *, processing_ttl_s: float,
                 pending_ttl_s: float = 60.0) -> None:
        self.redis = client
        self.celery = celery
        self.processing_ttl_s = int(processing_ttl_s)
        self.pending_ttl_s = int(pending_ttl_s)
        self._take = client.register_script(_TAKE)
        self._push_plain = client.register_script(_PUSH_PLAIN)
        self._take_more = client.register_script(_TAKE_MORE)
        self._stop_drain = client.register_script(_STOP_DRAIN)
        self._drain_take = client.register_script(_DRAIN_TAKE)
        self._due_in = client.register_script(_DUE_IN)
        self._drain_stop = client.register_script(_DRAIN_STOP)
        self._drain_promise = client.register_script(_DRAIN_PROMISE)
        self._push_batch = client.register_script(_PUSH_BATCH)
        self._give_back = client.register_script(_GIVE_BACK)

    def push(self, *, tier: Tier, kind: str, key: str, priority: int, job_id: str,
             enqueued_at: datetime, max_batch: int, delay_ms: float,
             time_limit: float | None = None, attempt: int = 0, plain: bool = False) -> None:
        """Buffer one job and publish the trigger it needs, if any.

        ``attempt`` is the job's attempt count now, recorded for the reconciler. ``plain``: a
        plain kind's job (no delay; no trigger while a worker drains the buffer or one is
        pending, see ``_PUSH_PLAIN``).
        """
        buffer = buffer_key(tier, kind, key)
        if plain:
            publish = self._push_plain(
                keys=[buffer, buffers_set(tier), TRANSPORT_KEY, pending_key(buffer),
                      drain_key(buffer)],
                args=[encode_item(job_id, enqueued_at), job_id, attempt, max_batch,
                      self.pending_ttl_s])
            if int(publish):
                self.trigger(tier=tier, kind=kind, key=key, priority=priority, countdown=None,
                             counted=True, time_limit=time_limit)
            return
        # The cap counts from enqueue, not from this push: the submit's own time (storing the
        # row) is already part of the job's wait.
        ms = int(self._push_batch(  # the buffer set lets running work see what waits above
            keys=[buffer, buffers_set(tier), TRANSPORT_KEY, pending_key(buffer),
                  drainers_key(buffer), lingering_key(buffer), wake_key(buffer)],
            args=[encode_item(job_id, enqueued_at), job_id, attempt, max_batch,
                  self.pending_ttl_s, int(time.time() * 1000), int(delay_ms),
                  PUSH_MAX_PENDING]))
        if ms >= 0:
            self.trigger(tier=tier, kind=kind, key=key, priority=priority,
                         countdown=lead(ms / 1000.0), counted=True, time_limit=time_limit)

    def remove(self, *, tier: Tier, kind: str, key: str, job_id: str,
               enqueued_at: datetime) -> None:
        """Take back a pushed job (its submit was refused after all)."""
        self.redis.lrem(buffer_key(tier, kind, key), 1, encode_item(job_id, enqueued_at))

    def trigger(self, *, tier: Tier, kind: str, key: str, priority: int,
                countdown: float | None, counted: bool = False,
                time_limit: float | None = None) -> None:
        """Publish a trigger; ``counted`` when ``take`` already counted it as pending."""
        if not counted:
            buffer = buffer_key(tier, kind, key)
            pipe = self.redis.pipeline(transaction=False)
            pipe.incr(pending_key(buffer))
            pipe.expire(pending_key(buffer), self.pending_ttl_s)
            pipe.execute()
        options: dict[str, Any] = {"queue": tier.value, "exchange": "", "routing_key": tier.value,
                                   "priority": priority}
        if countdown:
            options["countdown"] = countdown
        options.update(time_limits(self.celery, time_limit))
        self.celery.send_task(BATCH_TASK, args=[kind, key, tier.value], **options)

    def take(self, *, tier: Tier, kind: str, key: str, processing: str, max_batch: int,
             delay_ms: float) -> Taken:
        """Move up to ``max_batch`` items into ``processing`` (or return what it already holds)."""
        buffer = buffer_key(tier, kind, key)
        now_ms = int(time.time() * 1000)
        raw = self._take(
            keys=[buffer, processing, pending_key(buffer)],
            args=[max_batch, now_ms, int(delay_ms), self.processing_ttl_s, self.pending_ttl_s],
        )
        retrigger_ms = int(raw[0])
        return Taken(
            items=[decode_item(item) for item in raw[1:]],
            retrigger_in_s=None if retrigger_ms < 0 else retrigger_ms / 1000.0,
        )

    def due_in(self, *, tier: Tier, kind: str, key: str, processing: str, max_batch: int,
               delay_ms: float) -> float | None:
        """Seconds until a trigger's batch is due (0: now); None: the buffer is empty."""
        ms = int(self._due_in(keys=[buffer_key(tier, kind, key), processing],
                              args=[max_batch, int(time.time() * 1000), int(delay_ms)]))
        return None if ms < 0 else ms / 1000.0

    def drain_take(self, *, tier: Tier, kind: str, key: str, processing: str, max_batch: int,
                   delay_ms: float, drainer: str, pace: Pace | None,
                   linger_s: float = 0.0, lower_queues: Sequence[str] = (),
                   lower_buffer_sets: Sequence[str] = (),
                   lower_fair_prefixes: Sequence[str] = (), ahead_s: float = 0.0) -> Taken:
        """A draining slot's next batch of a batch kind (see ``_DRAIN_TAKE``).

        Takes a batch only when it is due (full, or its oldest job at its cap), promising to
        be back when it has run (as fast as its ``pace``; None: no promise); else says how long
        until it is due (promising to be back then), or why to stop: the buffer is empty, or
        another buffer of the tier holds jobs (then its promise is withdrawn and what is left
        is triggered: ``retrigger_in_s``). With ``linger_s``, an empty buffer makes this slot
        its lingerer for that long (``stop`` "linger"; wait with ``wait_push``) unless another
        slot already lingers on it or one of ``lower_queues`` (Celery queue keys), of the
        buffers in ``lower_buffer_sets`` or of the fair-turn lists under
        ``lower_fair_prefixes`` (bulk chunks) holds work: then the slot is better handed back.
        ``ahead_s``: the slot takes this batch while its current one still runs for about that
        long (claim-ahead): the promise starts then.
        """
        buffer = buffer_key(tier, kind, key)
        # The promise is a + b·n for the n jobs taken: Lua gets b and a in ms.
        per_job_ms = per_batch_ms = 0.0
        if pace is not None:
            per_batch_ms = (pace.seconds(0) + ahead_s) * 1000
            per_job_ms = max(pace.seconds(1) * 1000 - per_batch_ms, 1e-3)
        raw = self._drain_take(
            keys=[buffer, processing, pending_key(buffer), drainers_key(buffer),
                  lingering_key(buffer), *lower_queues],
            args=[max_batch, int(time.time() * 1000), int(delay_ms), self.processing_ttl_s,
                  self.pending_ttl_s, buffers_set(tier), drainer,
                  f"{per_job_ms:.3f}" if pace is not None else 0, f"{per_batch_ms:.3f}",
                  max(int(linger_s * 1000), 0), *(f"b:{b}" for b in lower_buffer_sets),
                  *(f"f:{f}" for f in lower_fair_prefixes)])
        status = raw[0].decode() if isinstance(raw[0], bytes) else str(raw[0])
        if status == "wait":
            return Taken(items=[], retrigger_in_s=None, wait_s=int(raw[1]) / 1000.0)
        retrigger_ms = int(raw[1]) if len(raw) > 1 else -1
        retrigger = None if retrigger_ms < 0 else retrigger_ms / 1000.0
        if status != "took":
            return Taken(items=[], retrigger_in_s=retrigger, stop=status)
        return Taken(items=[decode_item(item) for item in raw[2:]], retrigger_in_s=retrigger)

    def give_back(self, *, tier: Tier, kind: str, key: str, processing: str,
                  items: Sequence[tuple[str, int]]) -> None:
        """Put taken items back at the head of their buffer (in their order, with their
        enqueue times) and forget their processing list: a batch that will not run here."""
        buffer = buffer_key(tier, kind, key)
        self._give_back(keys=[buffer, processing, buffers_set(tier)],
                        args=[f"{job_id} {ms}" for job_id, ms in items])

    def wait_push(self, *, tier: Tier, kind: str, key: str, timeout_s: float) -> bool:
        """A lingering slot waits (blocked in Redis, no CPU) until a push wakes it or
        ``timeout_s`` passes; whether it was woken."""
        if timeout_s <= 0:
            return False
        return self.redis.blpop([wake_key(buffer_key(tier, kind, key))],
                                timeout=timeout_s) is not None

    def promise(self, *, tier: Tier, kind: str, key: str, drainer: str, seconds: float) -> None:
        """A slot that starts draining will look at the buffer again in ``seconds``."""
        buffer = buffer_key(tier, kind, key)
        self._drain_promise(keys=[drainers_key(buffer)],
                            args=[drainer, int((time.time() + seconds) * 1000)])

    def stop_promising(self, *, tier: Tier, kind: str, key: str, drainer: str,
                       max_batch: int, delay_ms: float) -> float | None:
        """A slot stops draining: withdraw its promise; the trigger delay (s) for what is left
        (already counted as pending), or None."""
        buffer = buffer_key(tier, kind, key)
        ms = int(self._drain_stop(
            keys=[buffer, buffer, pending_key(buffer), drainers_key(buffer),
                  lingering_key(buffer)],
            args=[max_batch, int(time.time() * 1000), int(delay_ms), 0, self.pending_ttl_s,
                  drainer]))
        return None if ms < 0 else ms / 1000.0

    def take_more(self, *, tier: Tier, kind: str, key: str, processing: str,
                  max_batch: int, hold_s: float) -> list[tuple[str, int]]:
        """A draining worker's next take (plain kinds): up to ``max_batch`` jobs, or none.

        Taking sets the drain flag for ``hold_s`` (pushes publish no trigger meanwhile); an
        empty buffer clears it atomically, so a push either lands before (and is taken) or
        sees no flag (and triggers).
        """
        buffer = buffer_key(tier, kind, key)
        raw = self._take_more(keys=[buffer, processing, drain_key(buffer)],
                              args=[max_batch, self.processing_ttl_s, int(hold_s * 1000)])
        return [decode_item(item) for item in raw]

    def hold(self, *, tier: Tier, kind: str, key: str, hold_s: float) -> None:
        """Set the drain flag: a worker is running this buffer's jobs and will look again."""
        self.redis.set(drain_key(buffer_key(tier, kind, key)), "1", px=int(hold_s * 1000))

    def stop_draining(self, *, tier: Tier, kind: str, key: str, priority: int,
                      time_limit: float | None = None) -> None:
        """Clear the drain flag; publish a trigger if jobs remain and none is pending."""
        buffer = buffer_key(tier, kind, key)
        if int(self._stop_drain(keys=[buffer, buffer, pending_key(buffer), drain_key(buffer)],
                                args=[1, int(time.time() * 1000), 0, 0,
                                      self.pending_ttl_s])) >= 0:
            self.trigger(tier=tier, kind=kind, key=key, priority=priority, countdown=None,
                         counted=True, time_limit=time_limit)

    def sweep(self, tiers: tuple[Tier, ...], *, priority_of: Callable[[Tier], int],
              time_limit_of: Callable[[Tier], float]) -> list[str]:
        """Trigger buffers that hold jobs no trigger or drainer will take (the reconciler's).

        A worker that died while draining leaves its flag to expire; jobs pushed meanwhile
        published no trigger. Returns the buffers triggered.
        """
        out: list[str] = []
        for tier in tiers:
            for raw in self.redis.smembers(buffers_set(tier)):
                parsed = parse_buffer_key(raw)
                if parsed is None:
                    continue
                _, kind, key = parsed
                buffer = buffer_key(tier, kind, key)
                if not self.redis.llen(buffer) or self.redis.exists(drain_key(buffer)) or \
                        int(self.redis.get(pending_key(buffer)) or 0) > 0:
                    continue
                self.trigger(tier=tier, kind=kind, key=key, priority=priority_of(tier),
                             countdown=None, time_limit=time_limit_of(tier))
                out.append(buffer)
        return out

    def done(self, processing: str) -> None:
        """The batch is recorded in the database: forget its processing list."""
        self.redis.delete(processing)
