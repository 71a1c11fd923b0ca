"""The Celery app: three tier queues on Redis, JSON only, strict priority, no prefetch.

One task name carries every job: ``orchestrator.run(job_id)``. The job's kind, payload and state
live in the database; the message is only transport. The worker side binds the implementation
(``workers.app``); the client only publishes by name.
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from kombu import Queue

from orchestrator.settings import Settings
from orchestrator.tiers import PRIORITY_STEPS, TIER_ORDER, Tier

RUN_TASK = "orchestrator.run"
REDIS_SEP = "\x06\x16"  # kombu's separator between a queue name and its priority step


def make_celery(settings: Settings, *, name: str = "orchestrator") -> Celery:
    """Build a configured Celery app; nothing connects until it is used."""
    app = Celery(name, set_as_current=False)
    longest = max(policy.time_limit_s for policy in settings.tiers.values())
    app.conf.update(
        broker_url=settings.resolved_broker_url(),
        broker_connection_retry_on_startup=True,
        broker_transport_options={
            # kombu serves the lowest step first across all queues, then queues in this order.
            "priority_steps": PRIORITY_STEPS,
            "queue_order_strategy": "priority",
            # Longer than any task may run, or Redis hands a running task to a second worker.
            "visibility_timeout": int(settings.visibility_timeout_s),
            "unacked_restore_interval": settings.unacked_restore_s,
            "unacked_restore_throttle": 1,
        },
        task_queues=[Queue(tier.value, routing_key=tier.value) for tier in TIER_ORDER],
        task_default_queue=Tier.NEARLINE.value,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        event_serializer="json",
        task_ignore_result=True,
        result_backend=None,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,
        worker_disable_prefetch=True,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        task_soft_time_limit=longest,
        task_time_limit=longest + settings.hard_limit_grace_s,
        orch_hard_limit_grace_s=settings.hard_limit_grace_s,
        broker_pool_limit=10,
    )
    return app


def publish(
    app: Celery,
    job_id: str,
    tier: Tier,
    priority: int,
    *,
    countdown: float | None = None,
    time_limit: float | None = None,
) -> None:
    """Put a job's message on its tier queue with its tier's priority step.

    The anonymous exchange routes by queue name, so publishing needs no binding table in Redis
    (a flushed Redis still routes). A message with no priority would land in kombu's best step,
    ahead of interactive work, so the priority is always set.
    """
    options: dict[str, Any] = {
        "queue": tier.value,
        "exchange": "",
        "routing_key": tier.value,
        "priority": priority,
    }
    if countdown:
        options["countdown"] = countdown
    options.update(time_limits(app, time_limit))
    app.send_task(RUN_TASK, args=[job_id], **options)


def time_limits(app: Celery, limit_s: float | None) -> dict[str, float]:
    """Celery options for a tier's time limit: soft at the limit, hard a grace period later."""
    if not limit_s:
        return {}
    grace = float(app.conf.get("orch_hard_limit_grace_s", 30.0))
    return {"soft_time_limit": limit_s, "time_limit": limit_s + grace}


def queue_key(tier: Tier, priority: int) -> str:
    """The Redis list kombu keeps for a tier's messages at a priority step."""
    return tier.value if priority == 0 else f"{tier.value}{REDIS_SEP}{priority}"


#: Redis hash: job id -> the job's attempt count when its message (or buffer entry, or fair-turn
#: entry) was made. The reconciler compares it with the database: a queued job whose entry is
#: missing or older than its attempts has no message any more (Redis lost it, or a publish
#: failed after the database recorded the retry).
TRANSPORT_KEY = "orch:transport"
#: Redis hash: job id -> the attempt whose expired lease the reconciler already re-published.
TAKEOVER_KEY = "orch:takeover"


def window_key(name: str) -> str:
    """Present (holding the price multiplier) while the window is open; expires at its close."""
    return f"orch:window:open:{name}"
