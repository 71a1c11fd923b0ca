"""Opening and closing windows, and releasing their deferred jobs.

Every tick (``ORCH_SCHEDULER_TICK_S``), for each defined window at time ``now``:

- open: ``orch:window:open:<name>`` is set in Redis with the price multiplier, expiring at the
  close (so a window closes on time even if the scheduler stops); then deferred jobs are
  released, best priority then oldest, until the window's queued plus running jobs reach its
  ``slots`` (all of them without a cap). Released jobs are sent the way a submit sends them.
- closed: the key is removed. Workers see it gone: a chunk checkpoints at its next mini-batch
  and goes back to ``deferred``; a released job not yet started goes back unrun. Plain
  (unchunked) jobs already running finish.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime

from orchestrator.broker import window_key
from orchestrator.db.deferral import deferred_counts, record_events, release, window_load
from orchestrator.db.store import utcnow
from orchestrator.services import Services
from orchestrator.transport import Transport
from orchestrator.window_catalog import WindowCatalog

log = logging.getLogger(__name__)


class WindowKeeper:
    """Runs the window tick; ``now`` is always passed in (or taken from ``clock``)."""

    def __init__(self, services: Services, catalog: WindowCatalog, transport: Transport, *,
                 clock: Callable[[], datetime] = utcnow) -> None:
        self.services = services
        self.catalog = catalog
        self.transport = transport
        self.clock = clock
        self._open: set[str] = set()
        self._warned: set[str] = set()

    def tick(self, now: datetime | None = None) -> dict[str, list[str]]:
        """One pass over every window; returns the job ids released per window."""
        now = now or self.clock()
        defined = self.catalog.all()
        waiting = deferred_counts(self.services.engine)
        released: dict[str, list[str]] = {}
        pipe = self.services.redis.pipeline(transaction=False)
        for name, window in defined.items():
            span = window.opening(now)
            if span is None:
                if name in self._open:
                    log.info("window %s closed", name)
                pipe.delete(window_key(name))
                self._open.discard(name)
                continue
            ttl_ms = max(int((span[1] - now).total_seconds() * 1000), 1)
            pipe.set(window_key(name), str(window.price_multiplier), px=ttl_ms)
            if name not in self._open:
                log.info("window %s open until %s (%d deferred job(s))", name,
                         span[1].isoformat(), waiting.get(name, 0))
                self._open.add(name)
        for gone in self._open - set(defined):
            pipe.delete(window_key(gone))
            self._open.discard(gone)
        pipe.execute()  # workers see the window open before any of its jobs is released
        for name in sorted(self._open):
            if waiting.get(name):
                released[name] = self._release(name, now)
        for name in set(waiting) - set(defined) - self._warned:
            log.warning("%d job(s) wait for window %s, which is not defined; define it or "
                        "cancel them", waiting[name], name)
            self._warned.add(name)
        return released

    def _release(self, name: str, now: datetime) -> list[str]:
        window = self.catalog.all().get(name)
        if window is None:  # removed since this tick read the windows: nothing to release
            return []
        engine = self.services.engine
        free = None if window.slots is None else window.slots - window_load(engine, name)
        if free is not None and free <= 0:
            return []
        ids = release(engine, name, free, now=now)
        if not ids:
            return []
        views = self.services.store.get_many(ids)
        self.transport.send([views[i] for i in ids if i in views])
        record_events(engine, [(i, "released", f"window {name} open") for i in ids], now=now)
        log.info("window %s: released %d job(s)", name, len(ids))
        return ids
