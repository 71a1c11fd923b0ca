"""Cooperative preemption: chunked work yields to higher tiers at checkpoints, resumes exactly."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from orchestrator import Client
from orchestrator.broker import queue_key
from orchestrator.client import JobHandle
from orchestrator.services import Services
from orchestrator.settings import Settings
from orchestrator.tiers import Tier
from workers.preemption import HigherTierCheck
from workers.runtime import Runtime


@pytest.fixture
def eager(settings: Settings) -> Settings:
    """Offline chunks may yield after any mini-batch (no minimum slice)."""
    tiers = dict(settings.tiers)
    tiers[Tier.OFFLINE] = tiers[Tier.OFFLINE].model_copy(update={"preempt_min_slice_s": 0.0})
    return settings.model_copy(update={"tiers": tiers})


@pytest.fixture
def runtime(eager: Settings) -> Iterator[Runtime]:
    rt = Runtime(Services.open(eager), worker="preempt-test")
    yield rt
    rt.close()


def test_the_check_sees_queued_messages_and_buffered_jobs_of_higher_tiers_only(
    client: Client, redis_client: redis.Redis
) -> None:
    offline = HigherTierCheck(redis_client, Tier.OFFLINE)
    nearline = HigherTierCheck(redis_client, Tier.NEARLINE)
    interactive = HigherTierCheck(redis_client, Tier.INTERACTIVE)
    assert offline.waiting() == 0
    client.submit("burn", {"ms": 1}, tier="offline")
    assert offline.waiting() == 0 and nearline.waiting() == 0
    client.submit("burn", {"ms": 1}, tier="nearline")  # a queued message
    assert offline.waiting() == 1 and nearline.waiting() == 0
    client.submit("upper", {"texts": ["x"]}, tier="interactive")  # a buffered batch job
    assert offline.waiting() >= 2 and nearline.waiting() >= 1
    assert interactive.waiting() == 0


def test_a_chunk_yields_to_waiting_interactive_work_and_resumes_from_its_checkpoint(
    client: Client, runtime: Runtime, redis_client: redis.Redis
) -> None:
    items = [f"item-{i}" for i in range(35)]
    bulk = client.submit_bulk("upper", items, chunk_size=100)
    [chunk] = client.chunks(bulk.id)
    client.submit("burn", {"ms": 1}, tier="nearline")  # waits above; not run in place
    assert runtime.execute(chunk.id) == "queued"
    after = client.get(chunk.id)
    assert (after.state, after.items_done, after.preemptions, after.attempts) == (
        "queued", 10, 1, 1)
    assert client.attempts(chunk.id)[0].outcome == "preempted"
    assert bulk.job().items_done == 10  # the parent's progress moved with the checkpoint
    # It went back to the front of its tier: offline's resume step, ahead of offline's own.
    resume = runtime.settings.policy(Tier.OFFLINE).resume_priority
    assert redis_client.llen(queue_key(Tier.OFFLINE, resume)) == 1
    parts = list(Path(bulk.job().result_ref or "").glob("*.part-*"))
    assert len(parts) == 1
    # The interactive job still waits, so every run yields after one mini-batch; each run
    # starts where the last one stopped.
    states = [runtime.execute(chunk.id) for _ in range(3)]
    assert states == ["queued", "queued", "succeeded"]
    done = client.get(chunk.id)
    assert done.items_done == 35 and done.preemptions == 3 and done.attempts == 4
    assert [a.outcome for a in client.attempts(chunk.id)] == ["preempted"] * 3 + ["succeeded"]
    assert list(client.bulk_results(bulk.id, timeout=1)) == [t.upper() for t in items]
    assert not list(Path(bulk.job().result_ref or "").glob("*.part-*"))
    # Cost counted once: the parent's CPU is the sum of every attempt's, nothing more.
    per_attempt = sum(a.cpu_seconds or 0 for a in client.attempts(chunk.id))
    assert done.cpu_seconds == pytest.approx(per_attempt)
    assert bulk.job().cpu_seconds == pytest.approx(per_attempt)
    assert bulk.job().items_done == 35 and bulk.status() == "succeeded"


def test_preemptions_do_not_use_up_retries(client: Client, runtime: Runtime) -> None:
    # upper allows 2 attempts; a chunk of 55 items needs 6 runs when it yields after each.
    bulk = client.submit_bulk("upper", [f"p{i}" for i in range(55)], chunk_size=100)
    [chunk] = client.chunks(bulk.id)
    client.submit("burn", {"ms": 1}, tier="nearline")
    states = [runtime.execute(chunk.id) for _ in range(6)]
    assert states[-1] == "succeeded" and states[:-1] == ["queued"] * 5
    assert client.get(chunk.id).preemptions == 5


def test_a_chunk_with_nothing_waiting_above_runs_through(
    client: Client, runtime: Runtime
) -> None:
    bulk = client.submit_bulk("upper", [f"q{i}" for i in range(35)], chunk_size=100)
    [chunk] = client.chunks(bulk.id)
    client.submit("burn", {"ms": 1}, tier="offline")  # same tier: no reason to yield
    assert runtime.execute(chunk.id) == "succeeded"
    assert client.get(chunk.id).preemptions == 0


def test_with_preemption_off_a_chunk_runs_through_whatever_waits(
    client: Client, eager: Settings
) -> None:
    rt = Runtime(Services.open(eager.model_copy(update={"preemption": False})), worker="off")
    try:
        bulk = client.submit_bulk("upper", [f"o{i}" for i in range(35)], chunk_size=100)
        [chunk] = client.chunks(bulk.id)
        client.submit("burn", {"ms": 1}, tier="nearline")
        assert rt.execute(chunk.id) == "succeeded"
        assert client.get(chunk.id).preemptions == 0
    finally:
        rt.close()


def test_a_resume_that_cannot_see_its_checkpoint_redoes_the_chunk_instead_of_losing_items(
    client: Client, runtime: Runtime
) -> None:
    items = [f"m{i}" for i in range(35)]
    bulk = client.submit_bulk("upper", items, chunk_size=100)
    [chunk] = client.chunks(bulk.id)
    urgent = client.submit("burn", {"ms": 1}, tier="nearline")
    assert runtime.execute(chunk.id) == "queued"  # preempted at item 10
    for part in Path(bulk.job().result_ref or "").glob("*.part-*"):
        part.unlink()  # e.g. the next worker has no shared result store
    urgent.cancel()
    client.services.redis.flushdb()  # nothing waits above any more
    assert runtime.execute(chunk.id) == "succeeded"
    assert list(client.bulk_results(bulk.id, timeout=1)) == [t.upper() for t in items]
    assert bulk.job().items_done == 35


def test_a_chunk_redone_from_0_does_not_stop_before_its_old_checkpoint(
    client: Client, runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    plan: list[bool] = []  # answers of the checks between mini-batches: higher work waits?
    monkeypatch.setattr(HigherTierCheck, "waiting_by_tier",
                        lambda self: {Tier.NEARLINE: 1} if plan and plan.pop(0) else {})
    items = [f"r{i}" for i in range(70)]
    bulk = client.submit_bulk("upper", items, chunk_size=35)
    a, b = client.chunks(bulk.id)
    plan[:] = [False, False, True]
    assert runtime.execute(a.id) == "queued"  # yields at item 30
    assert (client.get(a.id).items_done, bulk.job().items_done) == (30, 30)
    for part in Path(bulk.job().result_ref or "").glob("*.part-*"):
        part.unlink()  # the next worker cannot see the checkpoint: it redoes the chunk
    plan[:] = [True]  # higher work waits at every check from now on
    assert runtime.execute(a.id) == "queued"
    # It stopped at 30 again, not at 10: a checkpoint moved back to 10 made the parent count
    # items 10-30 twice (it reached 75 of 70 and succeeded with chunk B unfinished).
    assert (client.get(a.id).items_done, bulk.job().items_done) == (30, 30)
    plan[:] = []
    assert runtime.execute(a.id) == "succeeded"
    plan[:] = [False, True]
    assert runtime.execute(b.id) == "queued"  # yields at item 20 of 35
    assert bulk.job().items_done == 55 and bulk.status() == "running"
    assert runtime.execute(b.id) == "succeeded"
    assert bulk.job().items_done == 70 and bulk.status() == "succeeded"
    assert list(client.bulk_results(bulk.id, timeout=1)) == [t.upper() for t in items]


# --- interactive work run in place -----------------------------------------------------------


def _unacked(redis_client: redis.Redis) -> int:
    return int(redis_client.hlen("unacked"))


def test_waiting_interactive_work_runs_in_the_chunks_process_and_the_chunk_carries_on(
    client: Client, runtime: Runtime, redis_client: redis.Redis
) -> None:
    items = [f"r{i}" for i in range(35)]
    bulk = client.submit_bulk("upper", items, chunk_size=100)
    [chunk] = client.chunks(bulk.id)
    urgent = client.submit("burn", {"ms": 300}, tier="interactive")
    assert runtime.execute(chunk.id) == "succeeded"
    done = client.get(chunk.id)
    # No checkpoint, no requeue: one attempt, no preemption, every item once.
    assert (done.attempts, done.preemptions, done.items_done) == (1, 0, 35)
    assert list(client.bulk_results(bulk.id, timeout=1)) == [t.upper() for t in items]
    job = urgent.job()
    assert job.state == "succeeded" and job.attempts == 1
    assert client.attempts(urgent.id)[0].worker == runtime.worker
    # The interactive job's CPU is its own, not the chunk's as well.
    assert (job.cpu_seconds or 0) >= 0.25
    assert (done.cpu_seconds or 0) < 0.2
    assert redis_client.llen(queue_key(Tier.INTERACTIVE, 0)) == 0
    assert _unacked(redis_client) == 0  # taken with kombu's bookkeeping, and acknowledged
    assert runtime.in_place is not None and runtime.in_place.served == 1


def test_a_full_interactive_batch_runs_in_place_as_one_batch(
    client: Client, runtime: Runtime
) -> None:
    bulk = client.submit_bulk("upper", [f"b{i}" for i in range(35)], chunk_size=100)
    [chunk] = client.chunks(bulk.id)
    # upper batches 4 jobs: the fourth fills the batch and publishes a trigger due now.
    handles = [client.submit("upper", {"texts": [f"hi{i}"]}, tier="interactive")
               for i in range(4)]
    assert runtime.execute(chunk.id) == "succeeded"
    assert client.get(chunk.id).preemptions == 0
    jobs = [h.job() for h in handles]
    assert [j.result for j in jobs] == [[f"HI{i}"] for i in range(4)]
    assert {j.batch_size for j in jobs} == {4} and len({j.batch_id for j in jobs}) == 1


def test_interactive_work_not_yet_due_is_left_to_the_consumer_and_the_chunk_yields(
    client: Client, runtime: Runtime, redis_client: redis.Redis
) -> None:
    bulk = client.submit_bulk("upper", [f"d{i}" for i in range(35)], chunk_size=100)
    [chunk] = client.chunks(bulk.id)
    # One upper job: its trigger is due in upper's 300 ms, longer than a chunk waits for.
    handle = client.submit("upper", {"texts": ["later"]}, tier="interactive")
    assert runtime.execute(chunk.id) == "queued"  # the classic preemption frees the slot
    assert client.get(chunk.id).preemptions == 1
    assert handle.status() == "queued"
    assert redis_client.llen(queue_key(Tier.INTERACTIVE, 0)) == 1  # put back, not lost
    assert _unacked(redis_client) == 0


def test_a_worker_that_does_not_serve_interactive_work_neither_runs_it_nor_yields_to_it(
    client: Client, eager: Settings, redis_client: redis.Redis
) -> None:
    rt = Runtime(Services.open(eager), worker="offline-only", tiers=[Tier.OFFLINE])
    try:
        assert rt.in_place is None
        bulk = client.submit_bulk("upper", [f"o{i}" for i in range(35)], chunk_size=100)
        [chunk] = client.chunks(bulk.id)
        urgent = client.submit("echo", {"urgent": True})
        assert rt.execute(chunk.id) == "succeeded"
        assert client.get(chunk.id).preemptions == 0
        assert urgent.status() == "queued"
        assert redis_client.llen(queue_key(Tier.INTERACTIVE, 0)) == 1
    finally:
        rt.close()


def test_interactive_work_run_in_place_keeps_its_tiers_time_limit(
    client: Client, eager: Settings
) -> None:
    tiers = dict(eager.tiers)
    tiers[Tier.INTERACTIVE] = tiers[Tier.INTERACTIVE].model_copy(
        update={"time_limit_s": 0.2, "backoff_base_s": 0.0, "backoff_max_s": 0.0})
    rt = Runtime(Services.open(eager.model_copy(update={"tiers": tiers})), worker="limits")
    try:
        bulk = client.submit_bulk("upper", [f"t{i}" for i in range(15)], chunk_size=100)
        [chunk] = client.chunks(bulk.id)
        slow = client.submit("burn", {"ms": 5000}, tier="interactive")
        started = time.monotonic()
        assert rt.execute(chunk.id) == "succeeded"
        assert time.monotonic() - started < 4  # cut at 0.2 s each time, not 5 s
        [first, *_] = client.attempts(slow.id)
        assert "time limit of the interactive tier exceeded" in (first.error or "")
        assert slow.job().state in ("queued", "dead")  # retried with backoff, or out of tries
    finally:
        rt.close()


def _chunk_limit_while_in_place(client: Client, rt: Runtime, burn_ms: int
                                ) -> tuple[str | None, float, JobHandle, str]:
    """Run a chunk that serves a ``burn`` in place at item 10, and send the chunk its soft time
    limit 0.5 s into that burn: (chunk's state, seconds it took, the burn, chunk id)."""
    # Celery signals a task's soft time limit with SIGUSR1 (billiard); in a test process its
    # default would end the process, so a stand-in handler is there outside the run in place.
    previous = signal.signal(signal.SIGUSR1, lambda *_: None)
    try:
        bulk = client.submit_bulk("upper", [f"t{i}" for i in range(15)], chunk_size=100)
        [chunk] = client.chunks(bulk.id)
        burn = client.submit("burn", {"ms": burn_ms}, tier="interactive")
        timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGUSR1))
        started = time.monotonic()
        timer.start()
        state = rt.execute(chunk.id)
        timer.join()
        return state, time.monotonic() - started, burn, chunk.id
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_the_chunks_time_limit_waits_for_the_work_run_in_place_then_reaches_the_chunk(
    client: Client, runtime: Runtime, redis_client: redis.Redis
) -> None:
    state, took, burn, chunk_id = _chunk_limit_while_in_place(client, runtime, 1500)
    # The interactive job was not the chunk's to fail: it ran to the end, on its one attempt,
    # and its message was acknowledged (not left to come back and run again).
    assert burn.job().state == "succeeded" and burn.job().attempts == 1
    assert redis_client.hlen("unacked") == 0
    # Then the chunk stopped, at once, with its own time limit (and goes again).
    assert state == "queued" and 1.4 < took < 6
    [attempt] = client.attempts(chunk_id)
    assert "time limit of the offline tier exceeded" in (attempt.error or "")


def test_work_run_in_place_gets_half_the_chunks_grace_once_the_chunks_limit_has_come(
    client: Client, eager: Settings
) -> None:
    rt = Runtime(Services.open(eager.model_copy(update={"hard_limit_grace_s": 1.0})),
                 worker="grace-test")
    try:
        state, took, burn, chunk_id = _chunk_limit_while_in_place(client, rt, 5000)
    finally:
        rt.close()
    # Cut 0.5 s after the chunk's limit (its hard kill comes 1 s after): the burn's attempt
    # failed, and the chunk stopped with its time limit well before the burn's 5 s.
    assert state == "queued" and took < 3.5
    [first, *_] = client.attempts(burn.id)
    assert "time limit of the interactive tier exceeded" in (first.error or "")
    [attempt] = client.attempts(chunk_id)
    assert "time limit of the offline tier exceeded" in (attempt.error or "")


def test_a_due_interactive_batch_whose_trigger_is_out_of_reach_is_taken_from_its_buffer(
    client: Client, runtime: Runtime, redis_client: redis.Redis
) -> None:
    bulk = client.submit_bulk("upper", [f"h{i}" for i in range(35)], chunk_size=100)
    [chunk] = client.chunks(bulk.id)
    handle = client.submit("upper", {"texts": ["held"]}, tier="interactive")
    # The worker's consumer fetched the trigger (due in upper's 300 ms) and holds it in its
    # timer: it is no longer in Redis, and no slot is free to run it when it is due.
    redis_client.delete(queue_key(Tier.INTERACTIVE, 0))
    time.sleep(0.35)
    assert runtime.execute(chunk.id) == "succeeded"
    assert client.get(chunk.id).preemptions == 0
    assert handle.job().result == ["HELD"]
    # The held trigger runs later and finds nothing left to do.
    assert runtime.execute_batch("upper", "g", "interactive", "the-held-trigger") == {}
    assert handle.job().attempts == 1


# --- mini-batches sized by time --------------------------------------------------------------


def _paced_runtime(settings: Settings, check_ms: float, model_batch: int = 8) -> Runtime:
    tiers = dict(settings.tiers)
    tiers[Tier.OFFLINE] = tiers[Tier.OFFLINE].model_copy(update={"preempt_check_ms": check_ms})
    return Runtime(Services.open(settings.model_copy(
        update={"tiers": tiers, "model_batch": model_batch})), worker="pace-test")


def _call_sizes(path: Path) -> list[int]:
    return [int(line) for line in path.read_text().split()]


def test_a_slow_kinds_mini_batches_shrink_to_the_tiers_check_interval(
    client: Client, settings: Settings, tmp_path: Path
) -> None:
    # 30 ms an item against a 105 ms check interval: after the first mini-batch (one model
    # batch, 8 items, before anything was measured) the chunk looks up every 3 items.
    rt = _paced_runtime(settings, check_ms=105)
    try:
        sizes = tmp_path / "sizes"
        bulk = client.submit_bulk("pace", [f"s{i}" for i in range(20)],
                                  params={"path": str(sizes), "per_item_s": 0.03})
        [chunk] = client.chunks(bulk.id)
        assert rt.execute(chunk.id) == "succeeded"
        assert _call_sizes(sizes) == [8, 3, 3, 3, 3]
        assert list(client.bulk_results(bulk.id, timeout=1)) == [f"s{i}" for i in range(20)]
        # The process remembers the kind's pace: its next chunk starts small.
        sizes.unlink()
        again = client.submit_bulk("pace", [f"t{i}" for i in range(7)],
                                   params={"path": str(sizes), "per_item_s": 0.03})
        [chunk] = client.chunks(again.id)
        assert rt.execute(chunk.id) == "succeeded"
        assert _call_sizes(sizes) == [3, 3, 1]
        # Another batch key of the kind (another model, say) keeps a pace of its own.
        fast = tmp_path / "fast"
        other = client.submit_bulk("pace", [f"u{i}" for i in range(20)],
                                   params={"path": str(fast), "per_item_s": 0.0})
        assert rt.execute(client.chunks(other.id)[0].id) == "succeeded"
        assert _call_sizes(fast) == [8, 8, 4]
    finally:
        rt.close()


def test_a_slow_chunk_yields_after_its_first_short_mini_batch(
    client: Client, eager: Settings, tmp_path: Path
) -> None:
    tiers = dict(eager.tiers)
    tiers[Tier.OFFLINE] = tiers[Tier.OFFLINE].model_copy(update={"preempt_check_ms": 55})
    rt = Runtime(Services.open(eager.model_copy(update={"tiers": tiers, "model_batch": 16})),
                 worker="pace-yield")
    try:
        sizes = tmp_path / "sizes"
        warm = client.submit_bulk("pace", ["w"] * 16, params={"path": str(sizes),
                                                              "per_item_s": 0.02})
        assert rt.execute(client.chunks(warm.id)[0].id) == "succeeded"
        sizes.unlink()
        bulk = client.submit_bulk("pace", [f"y{i}" for i in range(40)],
                                  params={"path": str(sizes), "per_item_s": 0.02})
        [chunk] = client.chunks(bulk.id)
        client.submit("burn", {"ms": 1}, tier="nearline")  # waits above
        assert rt.execute(chunk.id) == "queued"
        # 2 items (55 ms / 20 ms), not a whole model batch of 16 (320 ms), before it yields.
        assert _call_sizes(sizes) == [2]
        assert client.get(chunk.id).items_done == 2
    finally:
        rt.close()


@pytest.mark.parametrize(("kind", "check_ms", "expected"), [
    ("pace", 0, [8, 8, 4]),  # pacing off: every mini-batch is one model batch
    ("pace_fixed", 105, [4, 4, 4, 4, 4]),  # a kind's own segment size is kept
])
def test_mini_batches_keep_a_fixed_size_when_pacing_does_not_apply(
    client: Client, settings: Settings, tmp_path: Path, kind: str, check_ms: float,
    expected: list[int]
) -> None:
    rt = _paced_runtime(settings, check_ms=check_ms)
    try:
        sizes = tmp_path / "sizes"
        bulk = client.submit_bulk(kind, [f"f{i}" for i in range(20)],
                                  params={"path": str(sizes), "per_item_s": 0.03})
        assert rt.execute(client.chunks(bulk.id)[0].id) == "succeeded"
        assert _call_sizes(sizes) == expected
    finally:
        rt.close()
