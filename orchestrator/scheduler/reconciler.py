"""The reconciler: jobs the database says are waiting or running, that nothing will run.

Every ``ORCH_RECONCILE_INTERVAL_S`` it looks for two things, and re-publishes each job it finds
at most once per check, recording why in ``job_events``:

- **queued jobs whose message is gone.** Each way a job is put on its way (a queue message, a
  batch buffer entry, a fair-turn list entry) records the job's attempt count in the Redis hash
  ``orch:transport``; finishing removes it. A queued job due for longer than
  ``ORCH_RECONCILE_GRACE_S`` whose entry is missing (Redis was flushed or restarted without
  persistence) or older than its attempts (the retry's publish failed after the database
  recorded it) has no message. The grace covers a submit between its row and its publish.
- **running jobs whose lease expired** more than the grace ago (a worker lost, a hard
  time-limit kill that acknowledged the message). The message goes out once per expired
  attempt (``orch:takeover``); the claim takes the job over, or marks it dead when no attempt
  is left.
- **bulk submissions whose client died while streaming**: a bulk parent still reading its
  items (``STREAMING``) that staged no chunk for ``ORCH_BULK_STREAM_TIMEOUT_S`` is failed with
  the reason, and its staged chunks, which never ran, are dropped. A client still streaming
  after that gets ``ServiceUnavailable`` when its stream ends.
- **batch buffers nothing will take**: jobs in a buffer with no trigger pending and no worker
  draining it (a worker died while draining a plain kind's buffer, and the jobs pushed while
  its flag lasted published no trigger). Each such buffer gets a trigger.
- **jobs taken from a buffer that nothing claimed**: a slot moves a batch into a processing
  list (``orch:proc:*``) and claims it at once; a process killed in between, or a claim that
  failed, leaves queued jobs there whose transport entry still looks current and which no
  trigger will look for again (only a trigger's first batch is found by its redelivery, hours
  later). Jobs still queued in a list taken longer than the grace ago are sent again and
  removed from it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from orchestrator.batching import PROCESSING_PREFIX, Buffers, decode_item
from orchestrator.broker import TAKEOVER_KEY, TRANSPORT_KEY
from orchestrator.db.deferral import (
    abandoned_streams,
    give_up_stream,
    lease_expired,
    queued_due,
    record_events,
)
from orchestrator.db.models import JobState
from orchestrator.db.store import utcnow
from orchestrator.services import Services
from orchestrator.tiers import Tier
from orchestrator.transport import Transport

log = logging.getLogger(__name__)


@dataclass
class Report:
    """What one check did."""

    republished: list[str] = field(default_factory=list)
    taken_over: list[str] = field(default_factory=list)
    given_up: list[str] = field(default_factory=list)  # bulk jobs whose stream stopped
    triggered: list[str] = field(default_factory=list)  # buffers
    recovered: list[str] = field(default_factory=list)  # taken from a buffer, never claimed


def _stale(client_values: Sequence[bytes | str | None], rows: Sequence[tuple[str, int]]
           ) -> list[str]:
    """Ids whose Redis entry is missing or records another attempt count than the row's."""
    return [job_id for (job_id, attempt), value in zip(rows, client_values, strict=True)
            if value is None or int(value) != attempt]


class Reconciler:
    """Finds and re-publishes jobs whose transport is gone; ``now`` is injectable."""

    def __init__(self, services: Services, transport: Transport, *, grace_s: float,
                 batch: int = 1000, limit: int = 200_000,
                 clock: Callable[[], datetime] = utcnow) -> None:
        self.services = services
        self.transport = transport
        self.grace = timedelta(seconds=grace_s)
        self.batch = batch
        self.limit = limit
        self.clock = clock
        self.buffers = Buffers(services.redis, services.celery,
                               processing_ttl_s=services.settings.visibility_timeout_s)

    def check(self, now: datetime | None = None) -> Report:
        now = now or self.clock()
        report = Report()
        engine = self.services.engine
        rows = queued_due(engine, now - self.grace, self.limit)
        lost = self._without(TRANSPORT_KEY, rows)
        if lost:
            views = self.services.store.get_many(lost)
            queued = [views[i] for i in lost if i in views and views[i].state == JobState.QUEUED]
            report.republished = self.transport.send(queued)
            record_events(engine, [
                (j.id, "republished", f"broker message gone (attempts {j.attempts}, queued "
                 f"since {j.queued_at.isoformat() if j.queued_at else '?'}); re-published")
                for j in queued if j.id in set(report.republished)], now=now)
        rows = lease_expired(engine, now - self.grace, self.limit)
        expired = self._without(TAKEOVER_KEY, rows)
        if expired:
            views = self.services.store.get_many(expired)
            running = [views[i] for i in expired
                       if i in views and views[i].state == JobState.RUNNING]
            report.taken_over = self.transport.take_over(running)
            record_events(engine, [
                (j.id, "takeover", f"lease of attempt {j.attempts} expired at "
                 f"{j.lease_expires_at.isoformat() if j.lease_expires_at else '?'}; "
                 "re-published for takeover") for j in running
                if j.id in set(report.taken_over)], now=now)
        report.recovered = self._recover_taken(now)
        settings = self.services.settings
        report.given_up = self._give_up_streams(now, settings.bulk_stream_timeout_s)
        report.triggered = self.buffers.sweep(
            tuple(Tier), priority_of=lambda t: settings.policy(t).priority,
            time_limit_of=lambda t: settings.policy(t).time_limit_s)
        if report.triggered:
            log.warning("reconciler: triggered %d batch buffer(s) that nothing would take: %s",
                        len(report.triggered), ", ".join(report.triggered))
        if report.recovered:
            log.warning("reconciler: re-sent %d queued job(s) taken from a buffer by a worker "
                        "that never claimed them", len(report.recovered))
        if report.republished or report.taken_over:
            log.warning("reconciler: re-published %d queued job(s) whose message was gone and "
                        "%d running job(s) whose lease expired", len(report.republished),
                        len(report.taken_over))
        return report

    def _recover_taken(self, now: datetime) -> list[str]:
        """Queued jobs left in processing lists taken more than the grace ago: sent again (then
        removed from the list, so a crash in between sends them twice at worst, which the
        claim's compare-and-set makes harmless)."""
        client = self.services.redis
        ttl_ms = self.buffers.processing_ttl_s * 1000
        grace_ms = self.grace.total_seconds() * 1000
        found: dict[str, tuple[str, str]] = {}  # job id -> (processing list, its item)
        for raw_key in client.scan_iter(match=f"{PROCESSING_PREFIX}*", count=1000):
            key = raw_key.decode() if isinstance(raw_key, bytes) else str(raw_key)
            left = int(client.pttl(key))  # lists expire processing_ttl_s after their take
            if left < 0 or ttl_ms - left < grace_ms:
                continue
            for raw in client.lrange(key, 0, -1):
                item = raw.decode() if isinstance(raw, bytes) else str(raw)
                found[decode_item(item)[0]] = (key, item)
        if not found:
            return []
        before = now - self.grace
        views = self.services.store.get_many(list(found))
        queued = [v for v in views.values() if v.state == JobState.QUEUED
                  and (v.queued_at is None or v.queued_at < before)]
        sent = self.transport.send(queued)
        pipe = client.pipeline(transaction=False)  # one round trip for all the removals
        for job_id in sent:
            key, item = found[job_id]
            pipe.lrem(key, 0, item)
        pipe.execute()
        record_events(self.services.engine, [
            (job_id, "republished", f"taken from its buffer into {found[job_id][0]} "
             "by a worker that never claimed it; re-sent") for job_id in sent], now=now)
        return sent

    def _give_up_streams(self, now: datetime, timeout_s: float) -> list[str]:
        before = now - timedelta(seconds=timeout_s)
        given_up: list[str] = []
        for parent_id, staged, last in abandoned_streams(self.services.engine, before,
                                                         self.limit):
            error = (f"bulk submission abandoned: the submitting client staged {staged} "
                     f"chunk(s), the last at {last.isoformat()}, then no more for "
                     f"{timeout_s:g} s (ORCH_BULK_STREAM_TIMEOUT_S); none of its items ran, "
                     "submit it again")
            if give_up_stream(self.services.engine, parent_id, before, error, now=now):
                given_up.append(parent_id)
                record_events(self.services.engine, [(parent_id, "given up", error)], now=now)
                log.warning("reconciler: bulk job %s failed: %s", parent_id, error)
        return given_up

    def _without(self, key: str, rows: Sequence[tuple[str, int]]) -> list[str]:
        out: list[str] = []
        for start in range(0, len(rows), self.batch):
            part = rows[start:start + self.batch]
            values = self.services.redis.hmget(key, [job_id for job_id, _ in part])
            out.extend(_stale(values, part))
        return out
