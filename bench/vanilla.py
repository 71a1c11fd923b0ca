"""The baseline for ``bench/overhead.py``: a Celery app whose one task does (almost) nothing.

Two flavours, both on the same Redis as the orchestrator:

* ``default``: a plain Celery app (JSON, otherwise Celery's defaults: early ack, prefetch 4 per
  process) with one task on the default ``celery`` queue.
* ``matched``: the orchestrator's own Celery configuration (``orchestrator.broker.make_celery``:
  three priority queues, late ack, no prefetch, fair scheduling) with the no-op task bound to
  the orchestrator's task name. The gap between ``default`` and ``matched`` is what our Celery
  settings cost; the gap between ``matched`` and the orchestrator is what the database costs.

The task records its completion in Redis (one pipelined round trip: a counter, the first and
the last completion time), the counterpart of the orchestrator's done signal. Run a worker with
``python -m bench.vanilla --broker redis://127.0.0.1:6379/12 --concurrency 2 [--matched]``.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

import redis
from celery import Celery
from celery.signals import worker_process_init, worker_process_shutdown

from orchestrator.broker import RUN_TASK, make_celery
from orchestrator.settings import Settings
from orchestrator.tiers import TIER_ORDER

TASK_NAME = "bench.noop"
DONE_KEY = "bench:done"
FIRST_KEY = "bench:first_done"
LAST_KEY = "bench:last_done"


class _Recorder:
    """The Redis connection of one pool process, opened after the fork."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.client: redis.Redis | None = None

    def open(self, **_: Any) -> None:
        self.client = redis.Redis.from_url(self.url)

    def close(self, **_: Any) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None

    def record(self) -> None:
        if self.client is None:  # the pool's process_init did not run (e.g. a solo pool)
            self.open()
        assert self.client is not None
        now = repr(time.time())
        pipe = self.client.pipeline(transaction=False)
        pipe.incr(DONE_KEY)
        pipe.setnx(FIRST_KEY, now)
        pipe.set(LAST_KEY, now)
        pipe.execute()


def make_app(broker_url: str, *, matched: bool = False) -> Celery:
    """The baseline app; nothing connects until it is used."""
    if matched:
        settings = Settings.from_env({
            "ORCH_BROKER_URL": broker_url,
            "ORCH_DATABASE_URL": "sqlite://",
            "ORCH_STATE_DIR": str(Path("/tmp") / "bench-vanilla"),
        })
        app = make_celery(settings, name="bench-matched")
        name = RUN_TASK
    else:
        app = Celery("bench-vanilla", broker=broker_url, set_as_current=False)
        app.conf.update(task_serializer="json", accept_content=["json"])
        name = TASK_NAME
    recorder = _Recorder(broker_url)

    @app.task(name=name, ignore_result=True)
    def noop(*_args: Any) -> None:
        recorder.record()

    worker_process_init.connect(recorder.open, weak=False)
    worker_process_shutdown.connect(recorder.close, weak=False)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--broker", required=True)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--matched", action="store_true")
    parser.add_argument("--loglevel", default="INFO")
    args = parser.parse_args()
    # The orchestrator CLI's logging set-up: Celery's "ready." line needs a root handler.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    app = make_app(args.broker, matched=args.matched)
    if not args.matched:
        app.worker_main(["worker", "--pool=prefork", f"--concurrency={args.concurrency}",
                         f"--loglevel={args.loglevel}"])
        return
    # The same worker options as ``workers.app.run_worker``.
    worker = app.Worker(
        queues=[tier.value for tier in TIER_ORDER], concurrency=args.concurrency,
        pool="prefork", loglevel=args.loglevel, without_gossip=True, without_mingle=True,
        without_heartbeat=True, optimization="fair",
    )
    worker.start()


if __name__ == "__main__":
    main()
