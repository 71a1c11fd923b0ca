"""The worker runtime in-process: claims, duplicates, retries, leases, cancellation."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
import redis

from orchestrator import Client
from orchestrator.db.store import utcnow
from orchestrator.settings import Settings
from orchestrator.tiers import Tier
from workers.runtime import Runtime, backoff_delay


def test_a_job_runs_once_and_records_its_attempt_and_costs(
    client: Client, runtime: Runtime
) -> None:
    handle = client.submit("burn", {"ms": 30})
    assert runtime.execute(handle.id) == "succeeded"
    job = handle.job()
    assert job.state == "succeeded" and job.attempts == 1
    assert job.result["ms"] == 30
    assert job.cpu_seconds >= 0.025 and job.wall_seconds >= job.cpu_seconds * 0.9
    assert job.queue_seconds is not None and job.queue_seconds >= 0
    assert job.items == 1 and job.started_at and job.finished_at
    [attempt] = client.attempts(handle.id)
    assert (attempt.number, attempt.outcome, attempt.worker) == (1, "succeeded", "test-worker")
    assert handle.result(timeout=1) == job.result


def test_duplicate_delivery_of_a_finished_job_does_nothing(
    client: Client, runtime: Runtime, tmp_path: Path
) -> None:
    out = tmp_path / "effects.txt"
    handle = client.submit("record", {"path": str(out), "label": "once"})
    assert runtime.execute(handle.id) == "succeeded"
    finished = handle.job()
    assert runtime.execute(handle.id) is None
    assert runtime.execute(handle.id) is None
    assert out.read_text().count("once") == 1
    assert handle.job() == finished
    assert len(client.attempts(handle.id)) == 1


def test_transient_errors_retry_with_backoff_then_succeed(
    client: Client, runtime: Runtime, redis_client: redis.Redis
) -> None:
    handle = client.submit("burn", {"ms": 1, "fail_attempts": 2})
    assert runtime.execute(handle.id) == "queued"
    job = handle.job()
    assert job.state == "queued" and job.attempts == 1 and "TransientError" in (job.error or "")
    assert job.queued_at is not None and job.queued_at > utcnow() - timedelta(seconds=1)
    assert runtime.execute(handle.id) == "queued"
    assert runtime.execute(handle.id) == "succeeded"
    assert [a.outcome for a in client.attempts(handle.id)] == ["retry", "retry", "succeeded"]
    assert handle.job().error is None


def test_transient_errors_past_max_attempts_make_the_job_dead_with_its_error(
    client: Client, runtime: Runtime
) -> None:
    handle = client.submit("burn", {"ms": 1, "fail_attempts": 99}, tier="interactive")
    states = [runtime.execute(handle.id) for _ in range(3)]
    assert states == ["queued", "queued", "dead"]
    job = handle.job()
    assert job.state == "dead" and job.attempts == 3
    assert "fail attempt 3" in (job.error or "") and "after 3 attempts" in (job.error or "")
    assert runtime.execute(handle.id) is None  # nothing left to run
    from orchestrator import JobFailed

    with pytest.raises(JobFailed) as info:
        handle.result(timeout=1)
    assert info.value.state == "dead" and "fail attempt 3" in (info.value.error or "")


def test_permanent_errors_fail_at_once_without_retry(client: Client, runtime: Runtime) -> None:
    handle = client.submit("burn", {"ms": 1, "fail_permanently": True})
    assert runtime.execute(handle.id) == "failed"
    assert handle.job().attempts == 1
    assert [a.outcome for a in client.attempts(handle.id)] == ["failed"]


def test_a_running_job_with_a_live_lease_is_not_taken_twice(
    client: Client, runtime: Runtime, settings: Settings
) -> None:
    handle = client.submit("echo", {"n": 1})
    leases = {tier: p.lease_s for tier, p in settings.tiers.items()}
    first = runtime.services.store.claim(handle.id, "other-worker", leases)
    assert first is not None
    assert runtime.services.store.claim(handle.id, "me", leases) is None
    # The runtime neither runs it nor drops it: it looks again when the lease runs out.
    assert runtime.execute(handle.id) is None
    assert handle.job().state == "running" and handle.job().attempts == 1


def test_a_running_job_whose_lease_expired_is_taken_over(
    client: Client, runtime: Runtime, settings: Settings
) -> None:
    handle = client.submit("echo", {"n": 2})
    store = runtime.services.store
    lost = store.claim(handle.id, "dead-worker", {t: p.lease_s for t, p in settings.tiers.items()},
                       now=utcnow() - timedelta(seconds=60))
    assert lost is not None
    assert runtime.execute(handle.id) == "succeeded"
    outcomes = [(a.number, a.worker, a.outcome) for a in client.attempts(handle.id)]
    assert outcomes == [(1, "dead-worker", "lost"), (2, "test-worker", "succeeded")]
    # The lost worker coming back cannot overwrite the result.
    assert store.finish(lost, state="succeeded", outcome="succeeded", cpu_seconds=0,
                        wall_seconds=0, result={"stale": True}) is False
    assert handle.job().result == {"n": 2}


def test_expired_lease_on_the_last_attempt_makes_the_job_dead(
    client: Client, runtime: Runtime, settings: Settings
) -> None:
    handle = client.submit("burn", {"ms": 1}, tier="interactive")
    store = runtime.services.store
    leases = {t: p.lease_s for t, p in settings.tiers.items()}
    past = utcnow() - timedelta(seconds=120)
    for n in range(3):
        claim = store.claim(handle.id, f"w{n}", leases, now=past + timedelta(seconds=n * 10))
        assert claim is not None
    assert runtime.execute(handle.id) == "dead"
    job = handle.job()
    assert job.state == "dead" and "worker lost" in (job.error or "")


def test_cancelling_a_running_job_discards_its_result(
    client: Client, runtime: Runtime, settings: Settings
) -> None:
    handle = client.submit("echo", {"n": 3})
    store = runtime.services.store
    claim = store.claim(handle.id, "w", {t: p.lease_s for t, p in settings.tiers.items()})
    assert claim is not None
    assert client.cancel(handle.id) is True
    assert store.finish(claim, state="succeeded", outcome="succeeded", cpu_seconds=0.1,
                        wall_seconds=0.1, result={"late": True}) is False
    job = handle.job()
    assert job.state == "cancelled" and job.result is None
    assert [a.outcome for a in client.attempts(handle.id)] == ["cancelled"]


def test_a_job_past_its_deadline_fails_without_running(
    client: Client, runtime: Runtime, tmp_path: Path
) -> None:
    out = tmp_path / "effects.txt"
    handle = client.submit("record", {"path": str(out), "label": "late"}, deadline=0.05)
    import time

    time.sleep(0.1)
    assert runtime.execute(handle.id) == "failed"
    assert "deadline" in (handle.job().error or "")
    assert not out.exists()


def test_backoff_grows_exponentially_with_jitter_and_is_capped() -> None:
    import random

    rng = random.Random(7)
    delays = [[backoff_delay(n, 1.0, 30.0, rng) for _ in range(200)] for n in range(1, 8)]
    for n, ds in enumerate(delays, start=1):
        step = min(30.0, 2 ** (n - 1))
        assert all(step / 2 <= d <= step for d in ds)
        assert len({round(d, 6) for d in ds}) > 100  # jittered, not constant
    assert max(delays[-1]) <= 30.0


def test_a_job_longer_than_its_lease_keeps_it_renewed(
    client: Client, runtime: Runtime, settings: Settings, tmp_path: Path
) -> None:
    import threading
    import time

    lease = settings.policy(Tier.NEARLINE).lease_s  # 3 s in the tests
    handle = client.submit("record", {"path": str(tmp_path / "out"), "label": "long",
                                      "sleep_s": lease + 1.5})
    states: list[str | None] = []
    thread = threading.Thread(target=lambda: states.append(runtime.execute(handle.id)))
    thread.start()
    time.sleep(lease + 0.5)  # past the first lease: only renewal keeps another claim out
    leases = {t: p.lease_s for t, p in settings.tiers.items()}
    assert runtime.services.store.claim(handle.id, "intruder", leases) is None
    thread.join(timeout=30)
    assert states == ["succeeded"]
    assert [a.worker for a in client.attempts(handle.id)] == ["test-worker"]
