"""Putting queued jobs (back) on their way, the same way a submit would have.

Used by the scheduler when a window releases deferred jobs, and by the reconciler when a job's
message is gone: a plain job is published on its tier queue, a batch kind's job goes into its
batch buffer, and a bulk chunk into its tenant's fair-turn list. Every path records the job's
attempt count in ``TRANSPORT_KEY`` so the reconciler can tell "sent" from "lost".
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

import redis

from orchestrator.batching import Buffers
from orchestrator.broker import TAKEOVER_KEY, TRANSPORT_KEY, publish
from orchestrator.db.store import JobView, utcnow
from orchestrator.errors import InvalidPayload, UnknownKind
from orchestrator.fairness import FairDispatcher
from orchestrator.services import Services
from orchestrator.tiers import TIER_ORDER, Tier

log = logging.getLogger(__name__)


def mark_sent(client: redis.Redis, sent: Iterable[tuple[str, int]]) -> None:
    """Record that these jobs have a message for their current attempt count."""
    mapping: dict[Any, Any] = {job_id: attempt for job_id, attempt in sent}
    if mapping:
        client.hset(TRANSPORT_KEY, mapping=mapping)


def is_bulk_parent(job: JobView) -> bool:
    """A bulk parent has no message of its own: its chunks finish it."""
    return job.parent_id is None and job.items_total is not None


class Transport:
    """Sends queued jobs to their queue, batch buffer or fair-turn list."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self.settings = services.settings
        self.buffers = Buffers(services.redis, services.celery,
                               processing_ttl_s=self.settings.visibility_timeout_s)
        self.fair = FairDispatcher(services.redis, services.celery,
                                   window=self.settings.fair_window)

    def send(self, queued: Sequence[JobView]) -> list[str]:
        """Send each queued job the way a submit does; return the ids sent."""
        sent: list[str] = []
        chunks: dict[tuple[Tier, str], list[JobView]] = defaultdict(list)
        plain: list[tuple[str, int]] = []
        for job in queued:
            if is_bulk_parent(job):
                continue
            tier = Tier(job.tier)
            policy = self.settings.policy(tier)
            if job.parent_id is not None:
                chunks[(tier, job.tenant)].append(job)
                continue
            try:
                spec = self.services.kinds.get(job.kind)
                key = spec.batch_key(spec.validate(job.payload)) if spec.batch else None
            except (UnknownKind, InvalidPayload):
                spec, key = None, None  # published plain: the worker fails it with the reason
            if spec is not None and spec.batch is not None and key is not None:
                self.buffers.push(
                    tier=tier, kind=job.kind, key=key, priority=policy.priority, job_id=job.id,
                    enqueued_at=job.queued_at or utcnow(), max_batch=spec.batch.size(policy),
                    delay_ms=spec.batch.delay_ms(policy), time_limit=policy.time_limit_s,
                    attempt=job.attempts)
            else:
                publish(self.services.celery, job.id, tier, policy.priority,
                        time_limit=policy.time_limit_s)
                plain.append((job.id, job.attempts))
            sent.append(job.id)
        mark_sent(self.services.redis, plain)
        for (tier, tenant), group in chunks.items():
            group.sort(key=lambda j: (j.chunk_index or 0))
            self.fair.enqueue(tier, tenant, self.services.store.tenant_weight(tenant),
                              [j.id for j in group], {j.id: j.attempts for j in group})
            sent.extend(j.id for j in group)
        for tier in TIER_ORDER:
            if any(t == tier for t, _ in chunks):
                self.fair.dispatch(tier, self.settings.policy(tier))
        return sent

    def take_over(self, running: Sequence[JobView]) -> list[str]:
        """Publish running jobs whose lease expired: the claim takes them over (or marks them
        dead when no attempt is left). Returns the ids published."""
        out: list[str] = []
        for job in running:
            if is_bulk_parent(job):
                continue
            tier = Tier(job.tier)
            policy = self.settings.policy(tier)
            publish(self.services.celery, job.id, tier, policy.priority,
                    time_limit=policy.time_limit_s)
            out.append(job.id)
        if out:
            self.services.redis.hset(TAKEOVER_KEY, mapping={
                j.id: j.attempts for j in running if j.id in set(out)})
        return out
