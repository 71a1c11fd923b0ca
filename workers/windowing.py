"""A worker's view of off-peak windows: is this job's window open, at what price?

The scheduler keeps ``orch:window:open:<name>`` in Redis while a window is open (its value is
the price multiplier; it expires at the window's close by itself). A worker reads it when it
claims a job that belongs to a window, and a running chunk checks it between mini-batches: a
closed window sends the job back to ``deferred`` at a checkpoint. A worker never needs the
window definitions or a clock that agrees with the scheduler's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from decimal import Decimal

import redis
from sqlalchemy import Engine

from orchestrator.broker import window_key
from orchestrator.db.deferral import stamp_attempts
from orchestrator.db.store import Claim


class WindowGate:
    """Splits claims into those whose window is open (stamped) and those that must wait."""

    def __init__(self, client: redis.Redis, engine: Engine) -> None:
        self.redis = client
        self.engine = engine

    def admit(self, claims: Sequence[Claim]) -> tuple[list[Claim], list[Claim]]:
        """``(runnable, closed)``. Runnable claims that belong to a window get the window and
        its price multiplier recorded on their attempt row; closed ones must not run."""
        names = sorted({c.window for c in claims if c.window})
        if not names:
            return list(claims), []
        values = self.redis.mget([window_key(n) for n in names])
        prices = {n: Decimal(v.decode() if isinstance(v, bytes) else v)
                  for n, v in zip(names, values, strict=True) if v is not None}
        runnable = [c for c in claims if not c.window or c.window in prices]
        closed = [c for c in claims if c.window and c.window not in prices]
        stamp_attempts(self.engine, [(c.job_id, c.attempt, c.window, prices[c.window])
                                     for c in runnable if c.window])
        return runnable, closed

    def open_check(self, window: str) -> Callable[[], bool]:
        """A cheap test (one EXISTS) a running chunk makes between mini-batches."""
        key = window_key(window)
        return lambda: bool(self.redis.exists(key))
