"""The worker process: a Celery worker whose one task hands job ids to the ``Runtime``.

Process resources follow the worker lifecycle: each pool process opens its own database
engine and Redis pool in ``worker_process_init`` and closes them at ``worker_process_shutdown``.
All Celery signal handlers are connected here, in one place.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

import redis
from celery import Celery, Task
from celery.exceptions import Reject
from celery.signals import worker_process_init, worker_process_shutdown

from orchestrator.batching import BATCH_TASK
from orchestrator.broker import RUN_TASK, make_celery
from orchestrator.embedded import EmbeddedRedis
from orchestrator.metrics import ENV as METRICS_ENV
from orchestrator.metrics import mark_process_dead, serve
from orchestrator.services import Services, open_database
from orchestrator.settings import Settings
from orchestrator.tiers import Tier
from workers.models.catalog import installed
from workers.registry import Heartbeat
from workers.runtime import Runtime

log = logging.getLogger(__name__)

#: a pool process that cannot start waits this long before it puts a message back
REJECT_PAUSE_S = 1.0


class _ProcessRuntime:
    """Holds the runtime of the current pool process."""

    def __init__(self, settings: Settings, worker_name: str,
                 tiers: list[Tier] | None = None) -> None:
        self.settings = settings
        self.worker_name = worker_name
        self.tiers = tiers
        self.runtime: Runtime | None = None

    def start(self, **_: Any) -> None:
        # The parent's connections must not be shared across fork: open fresh ones.
        services = Services.open(self.settings.model_copy(), kinds=None)
        runtime = None
        try:
            runtime = Runtime(services, worker=f"{self.worker_name}:{os.getpid()}",
                              tiers=self.tiers)
            runtime.setup_kinds()
        except BaseException:  # not half started: a later message tries again from scratch
            services.embedded = None  # detaching from the embedded Redis is the parent's job
            if runtime is not None:
                runtime.close()
            else:
                services.close()
            raise
        self.runtime = runtime

    def stop(self, **_: Any) -> None:
        mark_process_dead(os.getpid())
        if self.runtime is not None:
            # Detaching from the embedded Redis is the parent's job; children only disconnect.
            self.runtime.services.embedded = None
            self.runtime.close()
            self.runtime = None

    def get(self) -> Runtime:
        if self.runtime is None:
            # Its start failed (the database or Redis did not answer when the pool forked):
            # try again, and if it still fails put the message back rather than acknowledge
            # it as run (its jobs would wait in the database with nothing to send them again).
            try:
                self.start()
            except Exception as e:
                log.error("worker process cannot start, message put back: %s", e)
                time.sleep(REJECT_PAUSE_S)  # not a hot loop of redeliveries
                raise Reject(f"worker process cannot start: {e}", requeue=True) from e
        assert self.runtime is not None
        return self.runtime


def make_worker_app(settings: Settings, *, worker_name: str | None = None,
                    tiers: list[Tier] | None = None) -> Celery:
    """A Celery app with the job task bound and the process lifecycle connected.

    ``tiers`` are the tiers the worker serves (None: all); running chunks yield only to those.
    """
    app = make_celery(settings, name="orchestrator-worker")
    holder = _ProcessRuntime(settings, worker_name or socket.gethostname(), tiers)

    @app.task(name=RUN_TASK, bind=True, ignore_result=True)
    def run(self: Task, job_id: str) -> None:
        holder.get().execute(job_id)

    @app.task(name=BATCH_TASK, bind=True, ignore_result=True)
    def run_batch(self: Task, kind: str, key: str, tier: str) -> None:
        # The message id names the batch's processing list: a redelivery finds the same jobs.
        holder.get().execute_batch(kind, key, tier, str(self.request.id))

    worker_process_init.connect(holder.start, weak=False)
    worker_process_shutdown.connect(holder.stop, weak=False)
    return app


def run_worker(settings: Settings, tiers: list[Tier], concurrency: int, *,
               loglevel: str = "INFO", hostname: str | None = None,
               metrics_port: int | None = None) -> int:
    """Run a worker serving ``tiers`` in that order until it is told to stop; return its code.

    A free slot takes a message from the first listed tier that has one (and, within Redis,
    from the best priority step first; each tier owns one step, so the orders agree). While it
    runs, the main process registers its slots for admission control (``workers.registry``)
    and, with ``metrics_port``, serves the pool's Prometheus metrics (``orchestrator.metrics``;
    the caller has run ``prepare_multiprocess_dir`` before anything imported prometheus_client).
    """
    embedded = EmbeddedRedis(settings.state_dir) if settings.embedded_broker else None
    if embedded is not None:
        embedded.attach()
    try:  # refuse to start, rather than take messages it cannot run
        open_database(settings).dispose()
    except BaseException:
        if embedded is not None:
            embedded.detach()
        raise
    # The pid keeps two workers on one host apart (Celery, the registry and attempts use it).
    name = hostname or f"{'-'.join(t.value for t in tiers)}-{os.getpid()}@{socket.gethostname()}"
    try:
        app = make_worker_app(settings, worker_name=name, tiers=tiers)
        worker = app.Worker(
            queues=[tier.value for tier in tiers],
            concurrency=concurrency,
            pool="prefork",
            hostname=name,
            loglevel=loglevel,
            without_gossip=True,
            without_mingle=True,
            without_heartbeat=True,
            optimization="fair",
        )
        server = None
        if metrics_port is not None:
            server = serve(metrics_port, multiprocess_dir=Path(os.environ[METRICS_ENV]))
        registry = redis.Redis.from_url(settings.redis_url(), socket_connect_timeout=5)
        try:
            with Heartbeat(registry, name, tiers, concurrency, models=functools.partial(
                    installed, settings.model_dir, settings.embed_variant)):
                worker.start()
        finally:
            registry.close()
            if server is not None:
                server.shutdown()
        return int(worker.exitcode or 0)
    finally:
        if embedded is not None:
            embedded.detach()
