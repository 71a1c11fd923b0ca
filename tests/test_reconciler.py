"""The reconciler: queued jobs whose message is gone and running jobs whose lease expired are
re-published once, with the reason recorded; and after a Redis flush mid-run every job still
finishes exactly once."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import redis
from sqlalchemy import update
from sqlalchemy.exc import OperationalError

from orchestrator.client import Client
from orchestrator.db.deferral import events
from orchestrator.db.models import jobs
from orchestrator.db.store import utcnow
from orchestrator.errors import ServiceUnavailable
from orchestrator.local import LocalWorker
from orchestrator.scheduler.process import SchedulerProcess
from orchestrator.scheduler.reconciler import Reconciler
from orchestrator.settings import Settings
from orchestrator.tiers import Tier
from orchestrator.transport import Transport
from tests.conftest import fail_call
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


def test_jobs_taken_from_a_buffer_that_nothing_claimed_are_sent_again(
    client: Client, reconciler: Reconciler, runtime: Runtime, redis_client: redis.Redis,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    # The drain takes its second batch, then its claim fails.
    fail_call(monkeypatch, runtime.services.store, "claim_many", 2,
              OperationalError("UPDATE jobs ...", {}, Exception("connection reset")))
    handles = [client.submit("upper", {"texts": [f"o{i}"]}) for i in range(8)]
    with pytest.raises(OperationalError):
        runtime.execute_batch("upper", "g", "nearline", "m1")
    monkeypatch.undo()
    stranded = [h.id for h in handles[4:]]
    assert [h.status() for h in handles] == ["succeeded"] * 4 + ["queued"] * 4
    # They sat in the second batch's processing list, which no trigger looks for again, with
    # transport entries that looked current: nothing would ever have run them.
    assert redis_client.llen("orch:buf:nearline:upper:g") == 0
    late = Reconciler(client.services, Transport(client.services), grace_s=3600)
    assert late.check().recovered == []  # taken just now: within the grace
    report = reconciler.check(utcnow() + timedelta(seconds=1))
    assert report.republished == []  # their transport entries look current
    assert sorted(report.recovered) == sorted(stranded)
    assert reconciler.check(utcnow() + timedelta(seconds=1)).recovered == []  # once
    assert redis_client.keys("orch:proc:*") == []
    assert "never claimed" in (events(client.services.engine, stranded[0])[0][2] or "")
    assert runtime.execute_batch("upper", "g", "nearline", "m2") == {
        job_id: "succeeded" for job_id in stranded}
    assert [h.result(timeout=1) for h in handles] == [[f"O{i}"] for i in range(8)]


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


_DIES_MID_STREAM = """
import os, signal
from orchestrator.client import Client
from orchestrator.settings import Settings

def items():
    for i in range(10):
        if i == 5:  # two chunks of 2 staged, the third half read: the client dies
            os.kill(os.getpid(), signal.SIGKILL)
        yield f"x{i}"

client = Client.from_settings(Settings.from_env())
client.submit_bulk("upper", items(), chunk_size=2, idempotency_key="stream-1")
"""


def test_a_bulk_job_whose_client_died_mid_stream_is_failed_and_its_staged_chunks_dropped(
    client: Client, reconciler: Reconciler, settings: Settings, tmp_path: Path
) -> None:
    script = tmp_path / "dies.py"
    script.write_text(_DIES_MID_STREAM)
    env = {**os.environ, **settings.to_env(), "PYTHONPATH": str(Path(__file__).parent.parent)}
    died = subprocess.run([sys.executable, str(script)], env=env, timeout=60)
    assert died.returncode == -9
    parent_id = client.services.store.find_by_key("default", "stream-1")
    assert parent_id is not None
    parent = client.services.store.get(parent_id)
    assert parent.state == "running" and parent.items_total is None
    assert [c.state for c in client.chunks(parent_id)] == ["deferred", "deferred"]
    timeout = settings.bulk_stream_timeout_s
    # Within the timeout a slow stream is left alone.
    assert reconciler.check(utcnow() + timedelta(seconds=timeout - 5)).given_up == []
    report = reconciler.check(utcnow() + timedelta(seconds=timeout + 1))
    assert report.given_up == [parent_id]
    parent = client.services.store.get(parent_id)
    assert parent.state == "failed" and "bulk submission abandoned" in (parent.error or "")
    assert "staged 2 chunk(s)" in (parent.error or "")
    assert client.chunks(parent_id) == []  # staged, never released, never ran: dropped
    [(_, event, _)] = events(client.services.engine, parent_id)
    assert event == "given up"
    # The same key now names the failed job; nothing else is given up.
    again = client.submit_bulk("upper", ["y"], idempotency_key="stream-1")
    assert again.id == parent_id and not again.created
    assert reconciler.check(utcnow() + timedelta(seconds=timeout + 1)).given_up == []


def test_a_stream_that_ends_after_it_was_given_up_is_refused_and_leaves_no_chunk(
    client: Client, reconciler: Reconciler, settings: Settings, redis_client: redis.Redis
) -> None:
    running = client.submit("upper", {"texts": ["not a stream"]})
    given_up: list[str] = []

    def slow_items() -> Iterator[str]:
        yield from ("a", "b")
        # The client stalls past the timeout; the reconciler gives the job up meanwhile.
        later = utcnow() + timedelta(seconds=settings.bulk_stream_timeout_s + 1)
        given_up.extend(reconciler.check(later).given_up)
        yield from ("c", "d")

    with pytest.raises(ServiceUnavailable, match="given up while its items streamed in"):
        client.submit_bulk("upper", slow_items(), chunk_size=2, idempotency_key="slow")
    parent_id = client.services.store.find_by_key("default", "slow")
    assert given_up == [parent_id]
    parent = client.services.store.get(parent_id)
    assert parent.state == "failed" and parent.items_total is None
    assert client.chunks(parent_id) == []
    assert running.status() == "queued"  # a plain job is never a stream
