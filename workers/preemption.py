"""The cheap check running chunked work makes between mini-batches: is higher-tier work waiting?

One Lua call sums the lengths of the higher tiers' queue lists (every priority step) and of
their batch buffers. No database query: it runs after every mini-batch of bulk work.
"""

from __future__ import annotations

import redis

from orchestrator.batching import buffers_set
from orchestrator.broker import queue_key
from orchestrator.tiers import PRIORITY_STEPS, TIER_ORDER, Tier

_WAITING = """
local n = 0
for i = 1, #KEYS do n = n + redis.call('LLEN', KEYS[i]) end
for i = 1, #ARGV do
  for _, buffer in ipairs(redis.call('SMEMBERS', ARGV[i])) do
    n = n + redis.call('LLEN', buffer)
  end
end
return n
"""


class HigherTierCheck:
    """Counts messages and buffered jobs waiting in the tiers above ``tier``.

    Disabled (``ORCH_PREEMPTION=0``), it always answers 0: chunks run to their end.
    """

    def __init__(self, client: redis.Redis, tier: Tier, *, enabled: bool = True) -> None:
        above = [t for t in TIER_ORDER if t.rank < tier.rank] if enabled else []
        self._keys = [queue_key(t, step) for t in above for step in PRIORITY_STEPS]
        self._sets = [buffers_set(t) for t in above]
        self._script = client.register_script(_WAITING)

    def waiting(self) -> int:
        if not self._keys:
            return 0
        return int(self._script(keys=self._keys, args=self._sets))
