"""The Celery baselines of ``bench/isolation.py``: the same model work as plain Celery tasks.

* ``vanilla``: Celery out of the box on Redis (one ``celery`` queue, prefetch 4 per process,
  early ack), interactive and offline tasks on the same queue.
* ``tuned``: separate ``interactive`` and ``offline`` queues served in that fixed order,
  priority steps that agree, late ack, prefetch disabled (Celery 5.6+) -- the best plain Celery
  can do; a running offline task still cannot be interrupted.

Tasks: ``offline_chunk(n)`` embeds ``n`` synthetic texts in model calls of 16 (as long as one
of the orchestrator's bulk chunks); ``interactive_one(sent_at)`` embeds one text and records
how long it waited (start minus ``sent_at``) in the Redis list ``bench:waits``.

    celery -A bench.isolation_celery:vanilla worker -c 2   (BENCH_REDIS_URL, BENCH_MODEL_DIR)
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import redis
from celery import Celery
from celery.signals import worker_process_init
from kombu import Queue

from workers.models.embedding import EmbeddingModel

WAITS_KEY = "bench:waits"
ITEMS_KEY = "bench:offline_items"
_state: dict[str, Any] = {}


def texts(n: int, seed: int = 0) -> list[str]:
    """``n`` deterministic sentences of about 32 tokens."""
    words = [
        "orchestrator", "queue", "tier", "batch", "embedding", "window", "tenant", "cost",
        "model", "worker", "latency", "throughput", "preempt", "chunk", "index", "score",
        "redis", "celery", "database", "interactive", "request", "answer", "vector", "search",
    ]
    out = []
    for i in range(n):
        k = (i * 7919 + seed * 104729) % 1000003
        out.append(" ".join(words[(k + j * j) % len(words)] for j in range(22)))
    return out


@worker_process_init.connect
def _open(**_: Any) -> None:
    _state["model"] = EmbeddingModel.from_dir(Path(os.environ["BENCH_MODEL_DIR"]), "int8",
                                              intra_op_threads=1)
    _state["redis"] = redis.Redis.from_url(os.environ["BENCH_REDIS_URL"])


def _offline_chunk(n: int, seed: int = 0) -> None:
    items = texts(n, seed)
    for start in range(0, n, 16):
        _state["model"].embed(items[start:start + 16])
        _state["redis"].incrby(ITEMS_KEY, min(16, n - start))


def _interactive_one(sent_at: float) -> None:
    waited = time.time() - sent_at
    _state["model"].embed(texts(1, int(sent_at * 1000) % 997))
    _state["redis"].rpush(WAITS_KEY, repr(waited))


def _app(name: str, *, tuned: bool) -> Celery:
    app = Celery(name, broker=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/9"),
                 set_as_current=False)
    app.conf.update(task_serializer="json", accept_content=["json"], task_ignore_result=True,
                    worker_hijack_root_logger=False)
    if tuned:
        app.conf.update(
            task_queues=[Queue("interactive"), Queue("offline")],
            broker_transport_options={"priority_steps": list(range(10)),
                                      "queue_order_strategy": "priority"},
            task_acks_late=True, task_reject_on_worker_lost=True,
            worker_prefetch_multiplier=1, worker_disable_prefetch=True,
        )
    app.task(name="bench.offline_chunk")(_offline_chunk)
    app.task(name="bench.interactive_one")(_interactive_one)
    return app


vanilla = _app("vanilla", tuned=False)
tuned = _app("tuned", tuned=True)
