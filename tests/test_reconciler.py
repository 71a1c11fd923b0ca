"""The reconciler: queued jobs whose message is gone and running jobs whose lease expired are
re-published once, with the reason recorded; and after a Redis flush mid-run every job still
finishes exactly once."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import redis
from sqlalchemy import update

from orchestrator.client import Client
from orchestrator.db.deferral import events
from orchestrator.db.models import jobs
from orchestrator.db.store import utcnow
from orchestrator.local import LocalWorker
from orchestrator.scheduler.process import SchedulerProcess
from orchestrator.scheduler.reconciler import Reconciler
from orchestrator.settings import Settings
from orchestrator.tiers import Tier
from orchestrator.transport import Transport
from workers.runtime import Runtime


@pytest.fixture
def reconciler(client: Client) -> Reconciler:
    return Reconciler(client.services, Transport(client.services), grace_s=0.0)


def test_jobs_with_a_message_are_left_alone_and_lost_ones_are_republished_once(
    client: Client, reconciler: Reconciler, runtime: Runtime, redis_client: redis.Redis,
    tmp_path: Path
) -> None:
    path = tmp_path / "effects.txt"
    plain = client.submit("record", {"path": str(path), "label": "plain"})
    batched = client.submit("upper", {"texts": ["a"]})
    bulk = client.submit_bulk("upper", ["b", "c", "d"], chunk_size=1)
    later = utcnow() + timedelta(seconds=1)
    assert reconciler.check(later).republished == []  # every message is there
    redis_client.flushdb()  # Redis loses everything
    report = reconciler.check(later)
    chunk_ids = [c.id for c in client.chunks(bulk.id)]
    assert sorted(report.republished) == sorted([plain.id, batched.id, *chunk_ids])
    assert reconciler.check(later).republished == []  # at most once: now they have messages
    [(_, event, detail)] = events(client.services.engine, plain.id)
    assert event == "republished" and "broker message gone" in (detail or "")
    for job_id in [plain.id, *chunk_ids]:
        assert runtime.execute(job_id) == "succeeded"
    assert runtime.execute_batch("upper", "g", "nearline", "m1") == {batched.id: "succeeded"}
    assert list(client.bulk_results(bulk.id, timeout=5)) == ["B", "C", "D"]
    assert path.read_text().count("plain") == 1


def test_a_retry_whose_publish_was_lost_is_found_by_its_attempt_count(
    client: Client, reconciler: Reconciler, redis_client: redis.Redis
) -> None:
    handle = client.submit("echo", {"x": 1})
    store = client.services.store
    claim = store.claim(handle.id, "w", {Tier.INTERACTIVE: 30.0})
    assert claim is not None
    # The retry is recorded, but its publish never happens (Redis hiccup, process killed).
    store.finish(claim, state="queued", outcome="retry", cpu_seconds=0, wall_seconds=0,
                 requeue_at=utcnow())
    assert reconciler.check(utcnow() + timedelta(seconds=1)).republished == [handle.id]


def test_a_running_job_whose_lease_expired_is_republished_once_and_taken_over(
    client: Client, reconciler: Reconciler, runtime: Runtime, tmp_path: Path
) -> None:
    handle = client.submit("record", {"path": str(tmp_path / "e.txt"), "label": "r"})
    store = client.services.store
    assert store.claim(handle.id, "dead-worker", {Tier.NEARLINE: 30.0}) is not None
    now = utcnow()
    assert reconciler.check(now).taken_over == []  # the lease is live
    with client.services.engine.begin() as conn:  # the worker died an hour ago
        conn.execute(update(jobs).where(jobs.c.id == handle.id)
                     .values(lease_expires_at=now - timedelta(hours=1)))
    assert reconciler.check(now).taken_over == [handle.id]
    assert reconciler.check(now).taken_over == []  # once per expired attempt
    assert "lease of attempt 1 expired" in (events(client.services.engine, handle.id)[0][2]
                                            or "")
    assert runtime.execute(handle.id) == "succeeded"
    assert [a.outcome for a in client.attempts(handle.id)] == ["lost", "succeeded"]


@pytest.fixture
def scheduler_runner(settings: Settings) -> Iterator[Callable[..., SchedulerProcess]]:
    running: list[tuple[SchedulerProcess, threading.Event, threading.Thread]] = []

    def start(holder: str, **overrides: object) -> SchedulerProcess:
        process = SchedulerProcess(settings.model_copy(update=overrides), holder=holder)
        stop = threading.Event()
        thread = threading.Thread(target=process.run, args=(stop,), daemon=True)
        thread.start()
        running.append((process, stop, thread))
        return process

    yield start
    for _, stop, thread in running:
        stop.set()
        thread.join(timeout=30)


@pytest.mark.e2e
def test_after_a_redis_flush_mid_run_every_job_finishes_exactly_once(
    client: Client, start_worker: Callable[..., LocalWorker],
    scheduler_runner: Callable[..., SchedulerProcess], redis_client: redis.Redis,
    tmp_path: Path
) -> None:
    period = 1.5
    start_worker(concurrency=2)
    scheduler_runner("s1", reconcile_interval_s=period, reconcile_grace_s=0.5)
    path = tmp_path / "effects.txt"
    plain = [client.submit("record", {"path": str(path), "label": f"job{i}", "sleep_s": 0.15})
             for i in range(16)]
    batched = [client.submit("upper", {"texts": [f"t{i}"]}, tier="offline") for i in range(6)]
    bulk = client.submit_bulk("upper", [f"b{i}" for i in range(40)], chunk_size=10)
    deadline = time.monotonic() + 60
    while path.exists() is False or path.read_text().count("\n") < 3:
        assert time.monotonic() < deadline, "no job started"
        time.sleep(0.05)
    redis_client.flushdb()
    flushed = utcnow()
    everything = [*plain, *batched, bulk]
    done = client.wait(everything, timeout=90)
    assert {j.state for j in done} == {"succeeded"}
    counts = Counter(line.split()[0] for line in path.read_text().splitlines())
    assert counts == {f"job{i}": 1 for i in range(16)}  # every effect exactly once
    assert list(client.bulk_results(bulk.id, timeout=5)) == [f"B{i}" for i in range(40)]
    republished = [(at, job.id) for job in [*plain, *batched, *client.chunks(bulk.id)]
                   for at, event, _ in events(client.services.engine, job.id)
                   if event == "republished"]
    assert republished, "the flush lost no message? then the test proved nothing"
    latest = max(at for at, _ in republished)
    # Re-published within two reconciler periods of the flush (plus the grace).
    assert (latest - flushed).total_seconds() <= 2 * period + 0.5
