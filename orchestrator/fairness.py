"""Fair sharing of a tier between tenants' bulk work: weighted round robin over chunk queues.

A bulk job's chunks do not all go onto the Celery queue at once (one tenant's million-row job
would then sit in front of everyone else's). They wait in a per-tenant list, and only a small
window of chunks per tier is on the queue at any time. Whenever a chunk leaves the window
(finished, failed, cancelled), the next one is chosen by smooth weighted round robin (nginx's
algorithm) across the tenants that have chunks waiting, so tenants of equal weight get equal
turns, and a tenant of weight 2 gets two turns for every one of a tenant of weight 1.

The window is a Redis set of chunk ids: releasing a chunk is idempotent (a duplicate delivery
of a finished chunk cannot free a second place), and a preempted or retried chunk keeps its
place while it waits to resume.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import redis
from celery import Celery

from orchestrator.broker import TRANSPORT_KEY, publish
from orchestrator.tiers import Tier, TierPolicy

log = logging.getLogger(__name__)

# ARGV: key prefix, window size, chunk id to release ("" for none).
# Returns the chunk ids to publish now, in order.
_DISPATCH = """
local prefix = ARGV[1]
local window_key = prefix .. ':window'
if ARGV[3] ~= '' then redis.call('SREM', window_key, ARGV[3]) end
local out = {}
local window = tonumber(ARGV[2])
while redis.call('SCARD', window_key) < window do
  local weights = redis.call('HGETALL', prefix .. ':weights')
  local total, best, best_cw = 0, nil, nil
  for i = 1, #weights, 2 do
    local tenant, weight = weights[i], tonumber(weights[i + 1])
    if redis.call('LLEN', prefix .. ':q:' .. tenant) > 0 then
      local cw = tonumber(redis.call('HGET', prefix .. ':cw', tenant) or '0') + weight
      redis.call('HSET', prefix .. ':cw', tenant, cw)
      total = total + weight
      if best == nil or cw > best_cw then best, best_cw = tenant, cw end
    else
      redis.call('HDEL', prefix .. ':weights', tenant)
      redis.call('HDEL', prefix .. ':cw', tenant)
    end
  end
  if best == nil then break end
  redis.call('HSET', prefix .. ':cw', best, best_cw - total)
  local chunk = redis.call('LPOP', prefix .. ':q:' .. best)
  redis.call('SADD', window_key, chunk)
  out[#out + 1] = chunk
end
return out
"""


def prefix(tier: Tier) -> str:
    return f"orch:fair:{tier.value}"


class FairDispatcher:
    """Queues bulk chunks per tenant and releases them onto the tier queue in fair turns."""

    def __init__(self, client: redis.Redis, celery: Celery, *, window: int) -> None:
        self.redis = client
        self.celery = celery
        self.window = window
        self._dispatch = client.register_script(_DISPATCH)

    def enqueue(self, tier: Tier, tenant: str, weight: int, chunk_ids: Sequence[str],
                attempts: Mapping[str, int] | None = None) -> None:
        """Add a tenant's chunks behind its earlier ones (not yet published).

        ``attempts`` (default 0 each) is recorded for the reconciler.
        """
        if not chunk_ids:
            return
        pipe = self.redis.pipeline(transaction=False)
        for start in range(0, len(chunk_ids), 1000):
            part = chunk_ids[start:start + 1000]
            pipe.rpush(f"{prefix(tier)}:q:{tenant}", *part)
            pipe.hset(TRANSPORT_KEY, mapping={c: (attempts or {}).get(c, 0) for c in part})
        pipe.hset(f"{prefix(tier)}:weights", tenant, max(int(weight), 1))
        pipe.execute()

    def dispatch(self, tier: Tier, policy: TierPolicy, *, released: str | None = None
                 ) -> list[str]:
        """Free ``released``'s place (if any) and publish chunks until the window is full."""
        chunks = [c.decode() if isinstance(c, bytes) else c for c in self._dispatch(
            keys=[], args=[prefix(tier), self.window, released or ""])]
        for i, chunk_id in enumerate(chunks):
            try:
                publish(self.celery, chunk_id, tier, policy.priority,
                        time_limit=policy.time_limit_s)
            except Exception:
                self._unplace(tier, chunks[i:])
                raise
        return chunks

    def _unplace(self, tier: Tier, chunk_ids: Sequence[str]) -> None:
        """Chunks given a place in the window whose publish failed: nothing would deliver
        them, so nothing would free their places, and the tier's bulk work would be held up
        for good. Their places are freed and their transport entries dropped, so that the
        reconciler sends any that are still queued again (a cancelled bulk job's are not)."""
        try:
            pipe = self.redis.pipeline(transaction=False)
            pipe.srem(f"{prefix(tier)}:window", *chunk_ids)
            pipe.hdel(TRANSPORT_KEY, *chunk_ids)
            pipe.execute()
        except redis.RedisError:
            log.warning("could not free the fair-window places of %d unpublished chunk(s) of "
                        "the %s tier", len(chunk_ids), tier.value, exc_info=True)

    def in_window(self, tier: Tier) -> int:
        return int(self.redis.scard(f"{prefix(tier)}:window"))

    def waiting(self, tier: Tier, tenant: str) -> int:
        return int(self.redis.llen(f"{prefix(tier)}:q:{tenant}"))
