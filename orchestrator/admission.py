"""Admission control: a tier sheds load at submit, before anything is stored.

Each submit reads its tier's load in one Lua call:

- **backlog**: jobs waiting in the tier, i.e. the lengths of its queue lists (every kombu
  priority step), of its batch buffers (the members of ``orch:bufs:<tier>``) and of the
  per-tenant lists where bulk chunks wait their fair turn. A batch trigger message counts as
  one more job; the error is one per waiting batch.
- **service time**: seconds of a worker slot per job, an EWMA that workers update after every
  batch or job they finish (``record_service``, hash ``orch:svc``).
- **slots**: the concurrency of the live workers serving the tier; each worker's main process
  keeps ``orch:workers:<name>`` alive with a heartbeat (``workers.registry``), and a worker
  serving several tiers counts for each.

The estimated queue wait is ``backlog * service_time / slots``. With no live worker for the
tier, or before any job was measured, there is nothing to estimate from: the wait objective is
not applied (refusing every interactive submit while the last worker restarts would turn a
blip into an outage; the job waits durably for a worker), and only the backlog caps hold.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from dataclasses import dataclass

import redis

from orchestrator.batching import SERVICE_KEY, buffers_set
from orchestrator.broker import queue_key
from orchestrator.errors import Overloaded, ServiceUnavailable
from orchestrator.fairness import prefix as fair_prefix
from orchestrator.settings import Settings
from orchestrator.tiers import PRIORITY_STEPS, Tier, TierPolicy

log = logging.getLogger(__name__)

#: Hash ``<tier>:<reason>`` -> submits refused with ``Overloaded`` (for ``top`` and metrics).
SHEDS_KEY = "orch:sheds"
WORKERS_SET = "orch:workers"
WORKER_KEY_PREFIX = "orch:workers:"

#: Weight of one job's sample in the service-time EWMA; a batch of n jobs weighs
#: ``1 - (1 - EWMA_ALPHA) ** n``, as if its jobs had been recorded one by one.
EWMA_ALPHA = 0.1
#: Bounds of the ``retry_after`` advice, and the advice when nothing drains at a known rate.
MIN_RETRY_S = 0.1
MAX_RETRY_S = 300.0
UNKNOWN_DRAIN_RETRY_S = 5.0

# KEYS: the tier's queue lists..., buffers set, fair weights hash, service hash, workers set.
# ARGV: tier, fair-share key prefix, worker key prefix.
# Buffers, fair lists and worker entries are found through the sets (like fairness._DISPATCH).
# Returns {backlog, service seconds or '', worker entry JSON...}; prunes expired workers.
_LOAD = """
local nq = #KEYS - 5
local n = 0
for i = 1, nq do n = n + redis.call('LLEN', KEYS[i]) end
local queued = n
local triggers = 0
for _, buffer in ipairs(redis.call('SMEMBERS', KEYS[nq + 1])) do
  n = n + redis.call('LLEN', buffer)
  triggers = triggers + (tonumber(redis.call('GET', buffer .. ':pending')) or 0)
end
-- A batch trigger on a queue is not a job (its jobs are counted in their buffer): leave out
-- as many queued messages as triggers are pending.
n = n - math.min(triggers, queued)
for _, tenant in ipairs(redis.call('HKEYS', KEYS[nq + 2])) do
  n = n + redis.call('LLEN', ARGV[2] .. ':q:' .. tenant)
end
local out = {n, redis.call('HGET', KEYS[nq + 3], ARGV[1]) or '', redis.call('GET', KEYS[nq + 5])
  or ''}
for _, name in ipairs(redis.call('SMEMBERS', KEYS[nq + 4])) do
  local entry = redis.call('GET', ARGV[3] .. name)
  if entry then out[#out + 1] = entry else redis.call('SREM', KEYS[nq + 4], name) end
end
return out
"""

# KEYS: service hash. ARGV: tier, seconds per job, weight of this sample.
_RECORD = """
local old = tonumber(redis.call('HGET', KEYS[1], ARGV[1]))
local x = tonumber(ARGV[2])
if old ~= nil then x = old + tonumber(ARGV[3]) * (x - old) end
redis.call('HSET', KEYS[1], ARGV[1], string.format('%.9g', x))
return 1
"""


def worker_key(name: str) -> str:
    """The heartbeat entry of one worker: JSON ``{"tiers": [...], "concurrency": n}``."""
    return f"{WORKER_KEY_PREFIX}{name}"


@dataclass(frozen=True)
class TierLoad:
    """One reading of a tier's load."""

    tier: Tier
    backlog: int
    service_s: float | None
    slots: int
    #: the value of the key ``Admission`` was told to read along (``also_read``), or None
    also_read: bytes | None = None

    @property
    def estimated_wait_s(self) -> float | None:
        """Queue wait of a job submitted now; None when no worker or measurement exists."""
        if self.slots <= 0 or self.service_s is None:
            return None
        return self.backlog * self.service_s / self.slots

    def drain_s(self, jobs: int) -> float | None:
        """Seconds the live slots need to run ``jobs`` jobs; None when unknown."""
        if self.slots <= 0 or self.service_s is None:
            return None
        return max(jobs, 0) * self.service_s / self.slots


def record_service(client: redis.Redis, tier: Tier | str, wall_seconds: float, jobs: int,
                   *, pipe: redis.client.Pipeline | None = None,
                   field: str | None = None) -> None:
    """Fold one finished batch (or job) into the tier's seconds-per-job EWMA (or ``field``'s).

    Called by the worker runtime once per batch, not per job; with ``pipe`` the update is only
    queued on that pipeline (the caller sends it with its other commands). Best effort: a Redis
    error is logged and dropped, since a worker must not fail jobs over a statistic.
    """
    if jobs <= 0 or wall_seconds < 0 or not math.isfinite(wall_seconds):
        return
    weight = 1.0 - (1.0 - EWMA_ALPHA) ** jobs
    args = (field or Tier(tier).value, repr(wall_seconds / jobs), repr(weight))
    if pipe is not None:  # EVAL, not EVALSHA: a pipeline with scripts adds a SCRIPT EXISTS trip
        pipe.eval(_RECORD, 1, SERVICE_KEY, *args)
        return
    try:
        client.eval(_RECORD, 1, SERVICE_KEY, *args)
    except redis.RedisError:
        log.warning("could not record the %s tier's service time", tier, exc_info=True)


def _retry(seconds: float | None) -> float:
    if seconds is None:
        seconds = UNKNOWN_DRAIN_RETRY_S
    return round(min(max(seconds, MIN_RETRY_S), MAX_RETRY_S), 3)


def decide(policy: TierPolicy, load: TierLoad) -> Overloaded | None:
    """The refusal a submit to a tier under ``load`` gets, or None when it is admitted."""
    tier = load.tier.value
    for reason, cap in (("hard_backlog", policy.hard_backlog),
                        ("max_backlog", policy.max_backlog)):
        if cap and load.backlog >= cap:
            return Overloaded(
                tier, reason=reason, retry_after=_retry(load.drain_s(load.backlog - cap + 1)),
                detail=f"{load.backlog} jobs wait, the {reason} is {cap}")
    wait = load.estimated_wait_s
    objective = policy.queue_wait_objective_s
    if objective and wait is not None and wait > objective:
        return Overloaded(
            tier, reason="queue_wait_objective", retry_after=_retry(wait - objective),
            detail=(f"estimated queue wait {wait:.3g}s exceeds the objective {objective:g}s "
                    f"({load.backlog} jobs wait, {load.service_s:.3g}s each, "
                    f"{load.slots} slot(s))"))
    return None


class Admission:
    """Reads tier load from Redis and refuses submits that a tier cannot take."""

    def __init__(self, client: redis.Redis, settings: Settings, *,
                 also_read: str | None = None) -> None:
        """``also_read``: a key whose value each reading returns too (the client reads the
        tenants' quota version this way, in the same round trip)."""
        self.redis = client
        self.settings = settings
        self.also_read = also_read
        self._load = client.register_script(_LOAD)

    def load(self, tier: Tier) -> TierLoad:
        """Backlog, service time and live slots of ``tier``, in one round trip.

        Raises:
            ServiceUnavailable: Redis does not answer.
        """
        fair = fair_prefix(tier)
        keys = [queue_key(tier, step) for step in PRIORITY_STEPS]
        keys += [buffers_set(tier), f"{fair}:weights", SERVICE_KEY, WORKERS_SET,
                 self.also_read or "orch:none"]
        try:
            raw = self._load(keys=keys, args=[tier.value, fair, WORKER_KEY_PREFIX])
        except redis.RedisError as e:
            raise ServiceUnavailable(f"Redis does not answer the admission check: {e}") from e
        service = raw[1].decode() if isinstance(raw[1], bytes) else raw[1]
        return TierLoad(tier=tier, backlog=int(raw[0]),
                        service_s=float(service) if service else None,
                        slots=_slots(tier, raw[3:]),
                        also_read=(raw[2] or None) if self.also_read else None)

    def check(self, tier: Tier) -> TierLoad | None:
        """Admit one more job to ``tier`` or refuse it; return the load it was judged on.

        A tier with no backlog cap and no wait objective can refuse nothing: no load is read
        (and None is returned), which saves a Redis round trip per submit.

        Raises:
            Overloaded: the tier's objective or one of its backlog caps refuses the job.
            ServiceUnavailable: Redis does not answer.
        """
        policy = self.settings.policy(tier)
        if not (policy.hard_backlog or policy.max_backlog or policy.queue_wait_objective_s):
            return None
        load = self.load(tier)
        refusal = decide(policy, load)
        if refusal is not None:
            log.info("refused a %s submit (%s): backlog %d, est. wait %s, retry after %gs",
                     tier.value, refusal.reason, load.backlog, load.estimated_wait_s,
                     refusal.retry_after)
            with contextlib.suppress(redis.RedisError):  # a statistic: never fail the caller
                self.redis.hincrby(SHEDS_KEY, f"{tier.value}:{refusal.reason}", 1)
            raise refusal
        return load


def read_sheds(client: redis.Redis) -> dict[tuple[str, str], int]:
    """(tier, reason) -> submits refused with ``Overloaded`` since Redis last lost its data."""
    out: dict[tuple[str, str], int] = {}
    for field, value in client.hgetall(SHEDS_KEY).items():
        name = field.decode() if isinstance(field, bytes) else str(field)
        tier, _, reason = name.partition(":")
        out[(tier, reason)] = int(value)
    return out


def _slots(tier: Tier, entries: list[bytes | str]) -> int:
    slots = 0
    for entry in entries:
        try:
            info = json.loads(entry)
            if tier.value in info["tiers"]:
                slots += max(int(info["concurrency"]), 0)
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring a malformed worker entry: %r", entry)
    return slots
