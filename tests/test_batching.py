"""Micro-batching: coalescing, the delay cap, per-item isolation, shares, one write per batch."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import timedelta

import pytest
import redis
from sqlalchemy import event, func, select
from sqlalchemy.exc import OperationalError

from orchestrator import Client, JobFailed
from orchestrator.batching import (
    BATCH_TASK,
    PLAIN_BATCH_MAX,
    PLAIN_KEY,
    PLAIN_TAKE_BUDGET_S,
    PUSH_MAX_PENDING,
    SERVICE_CACHE_S,
    Pace,
    buffer_key,
    buffers_set,
    drain_key,
    drainers_key,
    kind_service_field,
    lingering_key,
    pending_key,
    plain_take,
    wake_key,
)
from orchestrator.broker import queue_key
from orchestrator.db.models import attempts, jobs
from orchestrator.db.store import utcnow
from orchestrator.errors import ServiceUnavailable
from orchestrator.fairness import prefix as fair_prefix
from orchestrator.tiers import Tier
from tests.conftest import WorkerProcess, fail_call
from workers.execution import BACKGROUND_CPU
from workers.runtime import WRITE_BEHIND_GATE_S, Runtime


def _drain_budget(runtime: Runtime, monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    """The nearline tier's drain budget, for this test."""
    policy = runtime.settings.policy(Tier.NEARLINE)
    monkeypatch.setitem(runtime.settings.tiers, Tier.NEARLINE,
                        policy.model_copy(update={"drain_budget_s": seconds}))


def _drain(runtime: Runtime, n: int = 50) -> None:
    """Run batch triggers in-process until the upper buffer is empty."""
    for i in range(n):
        if not runtime.services.redis.llen(buffer_key("nearline", "upper", "g")):
            return
        runtime.execute_batch("upper", "g", "nearline", f"msg-{i}")


def test_buffered_jobs_are_coalesced_up_to_the_batch_size(
    client: Client, runtime: Runtime
) -> None:
    handles = [client.submit("upper", {"texts": [f"t{i}"]}) for i in range(10)]
    assert all(h.status() == "queued" for h in handles)
    _drain(runtime)
    jobs = [h.job() for h in handles]
    assert [j.result for j in jobs] == [[f"T{i}"] for i in range(10)]
    assert [j.batch_size for j in jobs] == [4] * 4 + [4] * 4 + [2] * 2
    assert len({j.batch_id for j in jobs}) == 3
    assert jobs[0].batch_id == jobs[3].batch_id != jobs[4].batch_id


def test_jobs_with_different_batch_keys_never_share_a_batch(
    client: Client, runtime: Runtime
) -> None:
    a = client.submit("upper", {"texts": ["a"], "group": "g"})
    b = client.submit("upper", {"texts": ["b"], "group": "other"})
    runtime.execute_batch("upper", "g", "nearline", "m1")
    assert a.status() == "succeeded" and b.status() == "queued"
    runtime.execute_batch("upper", "other", "nearline", "m2")
    assert b.job().batch_id != a.job().batch_id


def test_one_bad_input_fails_alone_and_its_neighbours_succeed(
    client: Client, runtime: Runtime
) -> None:
    good = [client.submit("upper", {"texts": [f"ok{i}"]}) for i in range(2)]
    boom = client.submit("upper", {"texts": ["boom"]})  # makes the whole call raise
    bad = client.submit("upper", {"texts": ["bad"]})  # fails only itself
    runtime.execute_batch("upper", "g", "nearline", "m1")
    assert [h.status() for h in good] == ["succeeded", "succeeded"]
    assert bad.status() == "failed" and "bad text" in (bad.job().error or "")
    # The batch call failed, so each job ran alone; "boom" is transient and retries singly.
    assert boom.status() == "queued" and boom.job().attempts == 1
    assert runtime.execute(boom.id) == "dead"
    with pytest.raises(JobFailed, match="boom"):
        boom.result(timeout=1)


def test_a_soft_time_limit_in_a_batch_call_fails_the_batch_without_rerunning_each_job(
    client: Client, runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    kinds = runtime.services.kinds
    spec = kinds.get("upper")

    def counted(payloads, ctx):  # type: ignore[no-untyped-def]
        calls.append(len(payloads))
        return spec.fn(payloads, ctx)

    monkeypatch.setitem(kinds._kinds, "upper", replace(spec, fn=counted))
    handles = [client.submit("upper", {"texts": [t]}) for t in ("a", "late", "b")]
    runtime.execute_batch("upper", "g", "nearline", "m1")
    # One call, no job run alone after it (each would have gone on past the soft limit toward
    # the hard kill); every job is retried, with the tier's time limit as the reason.
    assert calls == [3]
    jobs = [h.job() for h in handles]
    assert [(j.state, j.attempts) for j in jobs] == [("queued", 1)] * 3
    assert all("time limit of the nearline tier exceeded" in (j.error or "") for j in jobs)


def test_a_retry_whose_message_fails_does_not_hold_up_the_rest_of_the_batch(
    client: Client, runtime: Runtime, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kombu.exceptions import OperationalError as BrokerError

    import workers.runtime as runtime_module
    from orchestrator.scheduler.reconciler import Reconciler
    from orchestrator.transport import Transport

    def blip(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise BrokerError("simulated broker blip")

    good = client.submit("upper", {"texts": ["fine"]})
    boom = client.submit("upper", {"texts": ["boom"]})  # fails, and its retry's publish too
    monkeypatch.setattr(runtime_module, "publish", blip)
    signals = redis_client.pubsub(ignore_subscribe_messages=True)
    signals.subscribe(f"orch:done:{good.id}")
    states = runtime.execute_batch("upper", "g", "nearline", "m1")
    # The failed follow-up of one job skipped the others' signals and kept the batch's
    # processing list; now only that job waits, for the reconciler.
    assert states == {good.id: "succeeded", boom.id: "queued"}
    deadline, message = time.monotonic() + 2, None
    while message is None and time.monotonic() < deadline:  # (the subscribe reads as None)
        message = signals.get_message(timeout=0.2)
    assert message is not None and message["channel"] == f"orch:done:{good.id}".encode()
    assert redis_client.keys("orch:proc:*") == []
    monkeypatch.undo()
    reconciler = Reconciler(client.services, Transport(client.services), grace_s=0)
    assert reconciler.check(utcnow() + timedelta(seconds=1)).republished == [boom.id]
    signals.close()


def test_a_job_buffered_twice_runs_once_in_its_batch(
    client: Client, runtime: Runtime, redis_client: redis.Redis
) -> None:
    from orchestrator.transport import Transport

    handle = client.submit("upper", {"texts": ["twice"]})
    Transport(client.services).send([handle.job()])  # sent again while it still waits
    assert redis_client.llen(buffer_key("nearline", "upper", "g")) == 2
    assert runtime.execute_batch("upper", "g", "nearline", "m1") == {handle.id: "succeeded"}
    job = handle.job()  # one claim, one run: it was claimed and run twice in one batch
    assert (job.attempts, job.batch_size, job.result) == (1, 1, ["TWICE"])
    assert len(client.attempts(handle.id)) == 1


def test_a_result_with_nan_fails_its_own_job_and_not_the_batchs_finish(
    client: Client, runtime: Runtime
) -> None:
    good = client.submit("upper", {"texts": ["fine"]})
    bad = client.submit("upper", {"texts": ["nan"]})
    states = runtime.execute_batch("upper", "g", "nearline", "m1")
    # PostgreSQL's json refuses NaN: the batch's one finish failed and both stayed running.
    assert states == {good.id: "succeeded", bad.id: "failed"}
    assert "not JSON-serialisable" in (bad.job().error or "")


def test_batch_cpu_is_shared_by_the_weights_the_kind_sets(
    client: Client, runtime: Runtime
) -> None:
    short = client.submit("upper", {"texts": ["ab"]})
    long = client.submit("upper", {"texts": ["abcdefgh"]})
    runtime.execute_batch("upper", "g", "nearline", "m1")
    s, ln = short.job(), long.job()
    assert s.batch_id == ln.batch_id and s.batch_size == 2
    assert ln.cpu_seconds == pytest.approx(4 * s.cpu_seconds, rel=1e-6)
    assert ln.wall_seconds == pytest.approx(4 * s.wall_seconds, rel=1e-6)


def test_the_database_is_written_a_fixed_number_of_times_per_batch(
    client: Client, runtime: Runtime
) -> None:
    statements: list[str] = []

    def count(conn, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
        if statement.lstrip().upper().startswith(("INSERT", "UPDATE", "DELETE", "WITH")):
            statements.append(statement)

    event.listen(runtime.services.engine, "before_cursor_execute", count)
    try:
        per_batch = []
        for size in (2, 4):  # (one job alone takes a shorter path on PostgreSQL)
            for i in range(size):
                client.submit("upper", {"texts": [f"x{i}"]})
            statements.clear()
            runtime.execute_batch("upper", "g", "nearline", f"m{size}")
            per_batch.append(len(statements))
        # Two full batches in one task (the second taken by the drain): twice the statements.
        for i in range(8):
            client.submit("upper", {"texts": [f"y{i}"]})
        statements.clear()
        runtime.execute_batch("upper", "g", "nearline", "m8")
    finally:
        event.remove(runtime.services.engine, "before_cursor_execute", count)
    assert per_batch[0] == per_batch[1]
    assert per_batch[1] <= 5
    assert len(statements) == 2 * per_batch[1]


def test_a_redelivered_trigger_finds_its_own_jobs_and_runs_nothing_twice(
    client: Client, runtime: Runtime
) -> None:
    handles = [client.submit("upper", {"texts": [f"r{i}"]}) for i in range(3)]
    # Take the batch into a processing list as a worker would, then "die" before finishing.
    taken = runtime.buffers.take(tier="nearline", kind="upper", key="g",  # type: ignore[arg-type]
                                 processing="orch:proc:dead-msg", max_batch=4, delay_ms=300)
    assert len(taken.items) == 3
    later = client.submit("upper", {"texts": ["later"]})
    # The redelivered message (same id) gets the same three jobs, not the newer one.
    runtime.execute_batch("upper", "g", "nearline", "dead-msg")
    assert [h.status() for h in handles] == ["succeeded"] * 3
    assert later.status() == "queued"
    runtime.execute_batch("upper", "g", "nearline", "dead-msg")  # again: nothing runs twice
    assert [len(client.attempts(h.id)) for h in handles] == [1, 1, 1]


# --- a slot keeps taking its buffer's batches while they come --------------------------------


def test_a_slot_waits_in_process_for_the_next_batch_due_within_reach(
    client: Client, runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("workers.runtime.BATCH_DRAIN_WAIT_MAX_S", 1.0)
    handles = [client.submit("upper", {"texts": [f"d{i}"]}) for i in range(5)]
    states = runtime.execute_batch("upper", "g", "nearline", "m1")
    # The trigger took four; the same task took the fifth at its cap (300 ms), not before.
    assert set(states) == {h.id for h in handles}
    fifth = handles[4].job()
    assert fifth.state == "succeeded" and fifth.batch_size == 1
    assert fifth.queue_seconds is not None and 0.29 <= fifth.queue_seconds < 1.0


def test_a_slot_does_not_wait_for_a_cap_beyond_reach(client: Client, runtime: Runtime) -> None:
    handles = [client.submit("upper", {"texts": [f"d{i}"]}) for i in range(5)]
    states = runtime.execute_batch("upper", "g", "nearline", "m1")
    assert set(states) == {h.id for h in handles[:4]}  # 300 ms away: the trigger's job
    assert handles[4].status() == "queued"


def test_a_draining_slot_hands_back_once_its_tiers_drain_budget_is_spent(
    client: Client, runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    _drain_budget(runtime, monkeypatch, 0.3)
    spec = runtime.services.kinds.get("upper")

    def slow(models, ctx):  # type: ignore[no-untyped-def]
        time.sleep(0.2)
        return spec.fn(models, ctx)

    monkeypatch.setitem(runtime.services.kinds._kinds, "upper", replace(spec, fn=slow))
    handles = [client.submit("upper", {"texts": [f"b{i}"]}) for i in range(24)]
    states = runtime.execute_batch("upper", "g", "nearline", "m1")
    # Six full batches were due; 200 ms each, the 300 ms budget ended the task after two.
    assert set(states) == {h.id for h in handles[:8]}
    assert [h.status() for h in handles[8:]] == ["queued"] * 16
    assert runtime.services.redis.llen(buffer_key("nearline", "upper", "g")) == 16


def test_a_draining_slot_hands_back_for_higher_tiers_other_buffers_and_in_place_runs(
    client: Client, runtime: Runtime
) -> None:
    batch = [client.submit("upper", {"texts": [f"n{i}"]}) for i in range(16)]
    client.submit("upper", {"texts": ["u"]}, tier="interactive")
    assert len(runtime.execute_batch("upper", "g", "nearline", "m1")) == 4
    runtime.execute_batch("upper", "g", "interactive", "m2")  # the waiting interactive job
    client.submit("upper", {"texts": ["o"], "group": "h"})
    assert len(runtime.execute_batch("upper", "g", "nearline", "m3")) == 4  # h's turn next
    runtime.execute_batch("upper", "h", "nearline", "m4")
    runtime.run_message("orchestrator.batch", ["upper", "g", "nearline"], "m5")
    assert [h.status() for h in batch].count("succeeded") == 12  # in place: one batch only
    assert len(runtime.execute_batch("upper", "g", "nearline", "m6")) == 4


def _claim_ahead_off(runtime: Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
    """Drained batches are claimed by the slot itself, after the previous one ran."""
    monkeypatch.setattr(runtime, "settings", runtime.settings.model_copy(
        update={"claim_ahead": False}))


def _job_rows(client: Client, ids: list[str]) -> dict[str, object]:
    with client.services.engine.connect() as conn:
        return {row.id: row for row in conn.execute(select(jobs).where(jobs.c.id.in_(ids)))}


def test_a_draining_slot_claims_its_next_due_batch_while_the_current_one_runs(
    client: Client, runtime: Runtime
) -> None:
    handles = [client.submit("upper", {"texts": [f"a{i}"]}) for i in range(12)]
    first, second = [h.id for h in handles[:4]], [h.id for h in handles[4:8]]
    seen: dict[str, object] = {}
    original = runtime._run

    def run(claims):  # type: ignore[no-untyped-def]
        batch = [c.job_id for c in claims]
        if batch == first:  # the next batch is claimed while this one runs
            deadline = time.monotonic() + 5
            while {r.state for r in _job_rows(client, second).values()} != {"running"}:
                assert time.monotonic() < deadline, "the next batch was not claimed ahead"
                time.sleep(0.01)
            seen["running"] = {r.id: r.started_at for r in _job_rows(client, second).values()}
        out = original(claims)
        if batch == first:
            seen["first_ran_until"] = out.ran_until or utcnow()
            time.sleep(0.05)
        return out

    runtime._run = run  # type: ignore[method-assign]
    states = runtime.execute_batch("upper", "g", "nearline", "m1")
    assert set(states) == {h.id for h in handles}  # three batches in one task
    # Claimed ahead, a job had no start time until its batch started; then the run's start.
    assert seen["running"] == {job_id: None for job_id in second}
    rows = _job_rows(client, second)
    with client.services.engine.connect() as conn:
        tries = conn.execute(select(attempts).where(attempts.c.job_id.in_(second))).all()
    assert len(tries) == 4 and {t.number for t in tries} == {1}
    for t in tries:
        row = rows[t.job_id]
        assert row.state == "succeeded" and row.attempts == 1
        assert row.started_at == t.started_at >= seen["first_ran_until"]  # type: ignore[operator]
        assert row.queue_seconds == pytest.approx(
            (row.started_at - row.queued_at).total_seconds(), abs=0.002)


def test_a_batch_claimed_ahead_is_handed_back_when_higher_tier_work_arrives(
    client: Client, runtime: Runtime, redis_client: redis.Redis
) -> None:
    handles = [client.submit("upper", {"texts": [f"a{i}"]}) for i in range(12)]
    second = [h.id for h in handles[4:8]]
    buffer = buffer_key("nearline", "upper", "g")
    items_before = redis_client.lrange(buffer, 4, 7)
    original = runtime._run

    def run(claims):  # type: ignore[no-untyped-def]
        if [c.job_id for c in claims] == [h.id for h in handles[:4]]:
            deadline = time.monotonic() + 5
            while {r.state for r in _job_rows(client, second).values()} != {"running"}:
                assert time.monotonic() < deadline, "the next batch was not claimed ahead"
                time.sleep(0.01)
            client.submit("upper", {"texts": ["urgent"]}, tier="interactive")
        return original(claims)

    runtime._run = run  # type: ignore[method-assign]
    queue = queue_key(Tier.NEARLINE, 3)
    redis_client.delete(queue, pending_key(buffer))
    states = runtime.execute_batch("upper", "g", "nearline", "m1")
    assert set(states) == {h.id for h in handles[:4]}  # the slot stopped for the interactive job
    # The batch claimed ahead is as if never claimed: queued, no attempt, at the buffer's head
    # in its order with its enqueue times, and a trigger for the buffer is on its way.
    rows = _job_rows(client, second)
    assert {(r.state, r.attempts, r.started_at) for r in rows.values()} == {("queued", 0, None)}
    with client.services.engine.connect() as conn:
        assert not conn.execute(select(attempts).where(attempts.c.job_id.in_(second))).all()
    assert redis_client.lrange(buffer, 0, 7) == items_before + redis_client.lrange(buffer, 4, 7)
    assert redis_client.llen(buffer) == 8
    assert redis_client.llen(queue) == 1
    runtime.execute_batch("upper", "g", "interactive", "m2")
    runtime._run = original  # type: ignore[method-assign]
    _drain(runtime)
    assert [h.status() for h in handles] == ["succeeded"] * 12
    assert {r.attempts for r in _job_rows(client, [h.id for h in handles]).values()} == {1}


def test_claiming_ahead_can_be_switched_off(client: Client, runtime: Runtime,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    _claim_ahead_off(runtime, monkeypatch)
    handles = [client.submit("upper", {"texts": [f"a{i}"]}) for i in range(8)]
    second = [h.id for h in handles[4:]]
    states_during: list[set[str]] = []
    original = runtime._run

    def run(claims):  # type: ignore[no-untyped-def]
        out = original(claims)
        states_during.append({r.state for r in _job_rows(client, second).values()})
        return out

    runtime._run = run  # type: ignore[method-assign]
    runtime.execute_batch("upper", "g", "nearline", "m1")
    assert states_during[0] == {"queued"}
    assert [h.status() for h in handles] == ["succeeded"] * 8


def test_a_push_needs_no_trigger_when_a_draining_slot_promised_to_be_back_by_its_cap(
    client: Client, runtime: Runtime, redis_client: redis.Redis
) -> None:
    queue = queue_key(Tier.NEARLINE, 3)
    buffer = buffer_key("nearline", "upper", "g")
    # A first submit pays the tenant's row and the client's caches: the two below must both
    # land while the promise is live (on a slow, loaded machine a cold first submit did not).
    client.submit("echo", {"warm": True})
    runtime.buffers.promise(tier=Tier.NEARLINE, kind="upper", key="g", drainer="slot-a",
                            seconds=0.25)  # back before a new job's 300 ms cap
    client.submit("upper", {"texts": ["a"]})
    client.submit("upper", {"texts": ["b"]})
    assert redis_client.llen(queue) == 0 and redis_client.llen(buffer) == 2
    # The slot is late: its promise has passed, so the next push triggers the oldest job's cap.
    redis_client.zadd(drainers_key(buffer), {"slot-a": int(time.time() * 1000) - 1})
    client.submit("upper", {"texts": ["c"]})
    assert redis_client.llen(queue) == 1
    redis_client.delete(queue, pending_key(buffer))
    # A promise later than the cap does not cover a job: it gets its trigger.
    redis_client.delete(buffer)
    runtime.buffers.promise(tier=Tier.NEARLINE, kind="upper", key="g", drainer="slot-a",
                            seconds=5.0)
    client.submit("upper", {"texts": ["d"]})
    assert redis_client.llen(queue) == 1


def _drain_take(runtime: Runtime, drainer: str, *, linger_s: float,
                lower_queues: tuple[str, ...] = (), lower_fair: tuple[str, ...] = ()
                ) -> str | None:
    """One draining slot's look at the empty nearline buffer; its stop reason."""
    return runtime.buffers.drain_take(
        tier=Tier.NEARLINE, kind="upper", key="g", processing=f"proc-{drainer}", max_batch=4,
        delay_ms=300, drainer=drainer, pace=None, linger_s=linger_s,
        lower_queues=lower_queues, lower_buffer_sets=(buffers_set(Tier.OFFLINE),),
        lower_fair_prefixes=lower_fair).stop


def test_one_slot_lingers_on_an_empty_buffer_unless_a_lower_tier_has_work(
    runtime: Runtime, redis_client: redis.Redis
) -> None:
    buffer = buffer_key("nearline", "upper", "g")
    offline = queue_key(Tier.OFFLINE, 3)
    redis_client.rpush(offline, "a waiting offline message")
    assert _drain_take(runtime, "slot-a", linger_s=0.5, lower_queues=(offline,)) == "empty"
    assert not redis_client.zrange(lingering_key(buffer), 0, -1)
    redis_client.delete(offline)
    # Offline chunks waiting for their fair turn, or jobs in an offline buffer, are work too.
    fair = fair_prefix(Tier.OFFLINE)
    redis_client.hset(f"{fair}:weights", "acme", 1)
    redis_client.rpush(f"{fair}:q:acme", "chunk-1")
    assert _drain_take(runtime, "slot-a", linger_s=0.5, lower_fair=(fair,)) == "empty"
    redis_client.delete(f"{fair}:q:acme")
    offline_buffer = buffer_key("offline", "upper", "g")
    redis_client.sadd(buffers_set(Tier.OFFLINE), offline_buffer)
    redis_client.rpush(offline_buffer, "job-1 0")
    assert _drain_take(runtime, "slot-a", linger_s=0.5, lower_fair=(fair,)) == "empty"
    redis_client.delete(offline_buffer)
    assert _drain_take(runtime, "slot-a", linger_s=0.5, lower_queues=(offline,),
                       lower_fair=(fair,)) == "linger"
    assert _drain_take(runtime, "slot-a", linger_s=0.5) == "linger"  # still it: renewed
    assert _drain_take(runtime, "slot-b", linger_s=0.5) == "empty"  # one lingerer is enough
    assert _drain_take(runtime, "slot-a", linger_s=0) == "empty"  # its linger is over
    assert not redis_client.zrange(lingering_key(buffer), 0, -1)
    assert _drain_take(runtime, "slot-b", linger_s=0.5) == "linger"
    runtime.buffers.stop_promising(tier=Tier.NEARLINE, kind="upper", key="g",
                                   drainer="slot-b", max_batch=4, delay_ms=300)
    assert not redis_client.zrange(lingering_key(buffer), 0, -1)


def test_a_push_wakes_a_lingering_slot_instead_of_publishing_a_trigger(
    client: Client, runtime: Runtime, redis_client: redis.Redis
) -> None:
    queue = queue_key(Tier.NEARLINE, 3)
    buffer = buffer_key("nearline", "upper", "g")
    assert _drain_take(runtime, "slot-a", linger_s=0.5) == "linger"
    client.submit("upper", {"texts": ["a"]})
    client.submit("upper", {"texts": ["b"]})
    assert redis_client.llen(queue) == 0 and redis_client.llen(buffer) == 2
    assert redis_client.lrange(wake_key(buffer), 0, -1) == [b"1"]  # one token, not one a push
    assert runtime.buffers.wait_push(tier=Tier.NEARLINE, kind="upper", key="g", timeout_s=1)
    # A linger that has ended (the slot died, or went back to Celery) wakes no one.
    redis_client.delete(buffer)
    redis_client.zadd(lingering_key(buffer), {"slot-a": int(time.time() * 1000) - 1})
    client.submit("upper", {"texts": ["c"]})
    assert redis_client.llen(queue) == 1 and not redis_client.llen(wake_key(buffer))


def test_a_draining_slot_lingers_and_takes_the_next_job_on_its_cap_with_no_trigger(
    client: Client, runtime: Runtime, redis_client: redis.Redis,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("workers.runtime.BATCH_LINGER_MAX_DELAY_MS", 1000.0)
    monkeypatch.setattr("workers.runtime.BATCH_LINGER_S", 1.0)
    _drain_budget(runtime, monkeypatch, 8.0)
    monkeypatch.setattr("workers.runtime.BATCH_DRAIN_WAIT_MAX_S", 1.0)  # the 300 ms cap
    queue = queue_key(Tier.NEARLINE, 3)
    buffer = buffer_key("nearline", "upper", "g")
    first = client.submit("upper", {"texts": ["first"]})
    redis_client.delete(queue, pending_key(buffer))  # its trigger: run by hand below
    states: dict[str, str] = {}
    slot = threading.Thread(target=lambda: states.update(
        runtime.execute_batch("upper", "g", "nearline", "slot-a")))
    slot.start()
    deadline = time.monotonic() + 10
    while not redis_client.zrange(lingering_key(buffer), 0, -1):
        assert time.monotonic() < deadline and slot.is_alive(), "the slot never lingered"
        time.sleep(0.01)
    # Its finish is written behind, once the slot lingers: wait for it, not for a status.
    assert first.result(timeout=10) == ["FIRST"]
    second = client.submit("upper", {"texts": ["second"]})
    assert redis_client.llen(queue) == 0  # no trigger: the lingering slot takes it
    assert second.result(timeout=10) == ["SECOND"]
    job = second.job()
    assert job.batch_id != first.job().batch_id
    assert job.started_at is not None
    waited = (job.started_at - job.created_at).total_seconds()
    assert 0.29 <= waited < 1.0  # on its cap, not before
    # Nothing more comes: the slot hands itself back when its linger ends.
    slot.join(timeout=10)
    assert not slot.is_alive() and states[second.id] == "succeeded"
    assert not redis_client.zrange(lingering_key(buffer), 0, -1)


def test_triggers_for_an_emptied_buffer_stop_piling_up_at_a_few_pending(
    client: Client, runtime: Runtime, redis_client: redis.Redis
) -> None:
    queue = queue_key(Tier.NEARLINE, 3)
    buffer = buffer_key("nearline", "upper", "g")
    redis_client.set(pending_key(buffer), PUSH_MAX_PENDING - 1)  # slots busy, triggers waiting
    client.submit("upper", {"texts": ["a"]})
    assert redis_client.llen(queue) == 1  # one more may still find a free slot
    redis_client.delete(buffer)  # a draining slot took it
    client.submit("upper", {"texts": ["b"]})
    assert redis_client.llen(queue) == 1  # enough are on their way: they take this job
    assert int(redis_client.get(pending_key(buffer)) or 0) == PUSH_MAX_PENDING


def test_a_slot_that_stops_draining_withdraws_its_promise_and_triggers_what_is_left(
    client: Client, runtime: Runtime, redis_client: redis.Redis
) -> None:
    queue = queue_key(Tier.NEARLINE, 3)
    buffer = buffer_key("nearline", "upper", "g")
    redis_client.hset("orch:svc", kind_service_field("upper"), "0.05")  # measured: it promises
    handles = [client.submit("upper", {"texts": [f"s{i}"]}) for i in range(4)]
    redis_client.delete(queue, pending_key(buffer))  # the full batch's trigger: run it by hand
    # One job arrives while the slot runs the batch: its cap (300 ms) is beyond the 20 ms the
    # slot waits, so the slot stops, and the job must get a trigger even though the slot had
    # promised to be back in time when it was pushed.
    original = runtime._run

    def run_and_push(claims):  # type: ignore[no-untyped-def]
        out = original(claims)
        if len(handles) == 4:
            handles.append(client.submit("upper", {"texts": ["late"]}))
        return out

    runtime._run = run_and_push  # type: ignore[method-assign]
    runtime.execute_batch("upper", "g", "nearline", "slot-b")
    assert [h.status() for h in handles] == ["succeeded"] * 4 + ["queued"]
    assert not redis_client.zrange(drainers_key(buffer), 0, -1)
    assert redis_client.llen(queue) == 1  # the stop published the trigger the push did not


def test_a_trigger_waits_in_its_slot_for_its_cap_but_a_run_in_place_does_not(
    client: Client, runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("workers.runtime.BATCH_DRAIN_WAIT_MAX_S", 1.0)
    early = client.submit("upper", {"texts": ["early"]})
    runtime.execute_batch("upper", "g", "nearline", "m1")  # arrived before the 300 ms cap
    job = early.job()
    assert job.queue_seconds is not None and job.queue_seconds >= 0.29
    now = client.submit("upper", {"texts": ["in place"]})
    start = time.monotonic()
    runtime.run_message("orchestrator.batch", ["upper", "g", "nearline"], "m2")
    assert time.monotonic() - start < 0.25  # a paused chunk's slot does not sit idle
    assert now.status() == "succeeded"


def test_a_pace_fits_a_fixed_cost_per_batch_and_a_cost_per_job() -> None:
    pace = Pace()
    pace.add(4, 0.010)  # one size seen: its time scales with the batch
    assert pace.seconds(8) == pytest.approx(0.020)
    for n in (1, 2, 4, 8, 16) * 30:
        pace.add(n, 0.003 + 0.002 * n)  # 3 ms a batch, 2 ms a job
    assert pace.seconds(1) == pytest.approx(0.005, rel=0.02)
    assert pace.seconds(10) == pytest.approx(0.023, rel=0.02)


def test_cpu_the_write_behind_thread_spends_is_not_charged_to_the_call_it_overlaps(
    client: Client, runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = runtime.services.kinds.get("upper")

    def overlapped(models, ctx):  # type: ignore[no-untyped-def]
        out = spec.fn(models, ctx)
        start = time.process_time()
        while time.process_time() - start < 0.03:  # CPU the helper thread spent meanwhile
            pass
        BACKGROUND_CPU.add(time.process_time() - start)
        return out

    monkeypatch.setitem(runtime.services.kinds._kinds, "upper", replace(spec, fn=overlapped))
    handle = client.submit("upper", {"texts": ["x"]})
    runtime.execute_batch("upper", "g", "nearline", "m1")
    job = handle.job()
    assert job.state == "succeeded" and job.cpu_seconds < 0.015


def test_a_slot_time_written_behind_counts_the_run_not_the_wait_for_the_database(
    client: Client, runtime: Runtime, redis_client: redis.Redis,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    store = runtime.services.store
    original = store.finish_many

    def slow(*args, **kwargs):  # type: ignore[no-untyped-def]
        time.sleep(0.3)  # a slow commit, written while the slot goes on
        return original(*args, **kwargs)

    monkeypatch.setattr(store, "finish_many", slow)
    handles = [client.submit("upper", {"texts": [f"w{i}"]}) for i in range(2)]
    runtime.execute_batch("upper", "g", "nearline", "m1")
    assert [h.status() for h in handles] == ["succeeded"] * 2
    per_job = float(redis_client.hget("orch:svc", "nearline") or 0)
    assert 0 < per_job < 0.1  # admission's estimate: not the 0.15 s a job the commit took


def _record_store_calls(runtime: Runtime, monkeypatch: pytest.MonkeyPatch, *,
                        claim_delay_s: float = 0.0) -> list[tuple[str, float]]:
    """Wrap claim_many and finish_many: each call's name and start time, in call order."""
    store, calls = runtime.services.store, []
    claim_many, finish_many = store.claim_many, store.finish_many

    def claim(ids, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(("claim", time.monotonic()))
        if len(calls) > 1:
            time.sleep(claim_delay_s)
        return claim_many(ids, *args, **kwargs)

    def finish(done, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(("finish", time.monotonic()))
        return finish_many(done, *args, **kwargs)

    monkeypatch.setattr(store, "claim_many", claim)
    monkeypatch.setattr(store, "finish_many", finish)
    return calls


def test_a_batch_written_behind_starts_after_the_slot_claimed_its_next_batch(
    client: Client, runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    _claim_ahead_off(runtime, monkeypatch)  # the slot claims: the gate waits for it
    calls = _record_store_calls(runtime, monkeypatch)
    handles = [client.submit("upper", {"texts": [f"g{i}"]}) for i in range(8)]
    runtime.execute_batch("upper", "g", "nearline", "m1")
    assert [h.status() for h in handles] == ["succeeded"] * 8
    # Two full batches: the first one's finish waited for the second one's claim.
    assert [name for name, _ in calls] == ["claim", "claim", "finish", "finish"]


def test_a_batch_written_behind_waits_for_the_next_claim_only_so_long(
    client: Client, runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    _claim_ahead_off(runtime, monkeypatch)  # the slot claims: the gate waits for it
    calls = _record_store_calls(runtime, monkeypatch, claim_delay_s=0.5)
    handles = [client.submit("upper", {"texts": [f"s{i}"]}) for i in range(8)]
    runtime.execute_batch("upper", "g", "nearline", "m1")
    assert [h.status() for h in handles] == ["succeeded"] * 8
    # The second claim is slow: the first batch's finish starts after the gate's timeout.
    assert [name for name, _ in calls] == ["claim", "claim", "finish", "finish"]
    second_claim, first_finish = calls[1][1], calls[2][1]
    assert WRITE_BEHIND_GATE_S * 0.8 <= first_finish - second_claim < 0.4


def test_a_failed_write_behind_finish_does_not_lose_the_next_batch_it_overlapped(
    client: Client, runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    fail_call(monkeypatch, runtime.services.store, "finish_many", 1,
              OperationalError("UPDATE jobs ...", {}, Exception("deadlock detected")))
    handles = [client.submit("upper", {"texts": [f"w{i}"]}) for i in range(8)]
    with pytest.raises(OperationalError):
        runtime.execute_batch("upper", "g", "nearline", "m1")
    # The first batch's finish failed: its jobs stay running until their leases run out (the
    # reconciler takes them over). The second batch had run meanwhile: its outcomes are kept
    # (they were dropped, so its jobs ran again after their leases, or went dead on a last
    # attempt although they had succeeded).
    assert [h.status() for h in handles] == ["running"] * 4 + ["succeeded"] * 4
    assert [h.result(timeout=1) for h in handles[4:]] == [[f"W{i}"] for i in range(4, 8)]


@pytest.mark.e2e
def test_a_lone_job_is_flushed_by_the_delay_cap_counted_from_enqueue(
    client: Client, start_worker: Callable[..., WorkerProcess]
) -> None:
    start_worker(concurrency=1)
    handle = client.submit("upper", {"texts": ["alone"]})
    assert handle.result(timeout=30) == ["ALONE"]
    job = handle.job()
    assert job.batch_size == 1
    # It waited for the cap (300 ms from enqueue), not for a batch that never filled.
    assert job.queue_seconds is not None and 0.29 <= job.queue_seconds < 10


@pytest.mark.e2e
def test_a_full_batch_is_flushed_at_once_by_real_workers(
    client: Client, start_worker: Callable[..., WorkerProcess], redis_client: redis.Redis
) -> None:
    start_worker(concurrency=2)
    handles = [client.submit("upper", {"texts": [f"w{i}"]}) for i in range(40)]
    jobs = client.wait(handles, timeout=60)
    assert [j.result for j in jobs] == [[f"W{i}"] for i in range(40)]
    assert sum(j.batch_size or 0 for j in jobs) / len(jobs) > 2
    time.sleep(0.5)
    assert redis_client.llen(buffer_key("nearline", "upper", "g")) == 0


# --- plain kinds travel in batches once they are known to be short ---------------------------


def _plain_buffer(tier: str, kind: str) -> str:
    return buffer_key(tier, kind, PLAIN_KEY)


def test_a_plain_kind_travels_alone_until_it_is_measured_short(
    client: Client, runtime: Runtime, redis_client: redis.Redis
) -> None:
    first = client.submit("burn", {"ms": 1})
    # Never measured: one message of its own, no buffer.
    assert redis_client.llen(queue_key(Tier.NEARLINE, 3)) == 1
    assert redis_client.llen(_plain_buffer("nearline", "burn")) == 0
    assert runtime.execute(first.id) == "succeeded"
    measured = float(redis_client.hget("orch:svc", kind_service_field("burn")) or 0)
    assert measured > 0  # the run recorded the kind's slot time per job
    # (Claim and finish are part of it: on a slow disk that may exceed the budget; pin it.)
    redis_client.hset("orch:svc", kind_service_field("burn"), str(PLAIN_TAKE_BUDGET_S / 10))
    time.sleep(SERVICE_CACHE_S)  # the client re-reads what it cached
    handles = [client.submit("burn", {"ms": 1}) for _ in range(5)]
    assert redis_client.llen(_plain_buffer("nearline", "burn")) == 5
    # One trigger for the lot (the buffer turned non-empty once), not five messages.
    assert redis_client.llen(queue_key(Tier.NEARLINE, 3)) == 2
    states = runtime.execute_batch("burn", PLAIN_KEY, "nearline", "plain-1")
    assert sorted(states.values()) == ["succeeded"] * 5
    jobs = [h.job() for h in handles]
    # Each ran alone: its own result, attempt and CPU; no batch id (no shared model call).
    assert all(j.result is not None and j.result["ms"] == 1 for j in jobs)
    assert all(j.batch_id is None and j.attempts == 1 for j in jobs)
    assert all((j.cpu_seconds or 0) >= 0.0009 for j in jobs)


def test_plain_jobs_in_one_take_fail_and_retry_each_on_their_own(
    client: Client, runtime: Runtime, redis_client: redis.Redis
) -> None:
    redis_client.hset("orch:svc", kind_service_field("burn"), "0.001")
    good = client.submit("burn", {"ms": 1})
    flaky = client.submit("burn", {"ms": 1, "fail_attempts": 1})
    broken = client.submit("burn", {"ms": 1, "fail_permanently": True})
    states = runtime.execute_batch("burn", PLAIN_KEY, "nearline", "plain-2")
    assert states == {good.id: "succeeded", flaky.id: "queued", broken.id: "failed"}
    assert "fail attempt 1" in (client.attempts(flaky.id)[0].error or "")


def test_a_take_of_plain_jobs_holds_only_what_fits_its_budget(
    client: Client, runtime: Runtime, redis_client: redis.Redis
) -> None:
    redis_client.hset("orch:svc", kind_service_field("burn"), "0.01")  # 10 ms a job: 5 fit
    assert plain_take(0.01) == 5 and plain_take(0.04) == 0 and plain_take(None) == 0
    handles = [client.submit("burn", {"ms": 1}) for _ in range(8)]
    # One trigger's task drains the buffer take after take: 5 jobs, then the other 3.
    states = runtime.execute_batch("burn", PLAIN_KEY, "nearline", "take-1")
    assert len(states) == 8 and all(h.status() == "succeeded" for h in handles)
    starts = [client.attempts(h.id)[0].started_at for h in handles]
    assert sorted(starts.count(t) for t in set(starts)) == [3, 5]
    assert redis_client.llen(_plain_buffer("nearline", "burn")) == 0
    assert not redis_client.exists(drain_key(_plain_buffer("nearline", "burn")))


def test_plain_jobs_run_in_place_take_one_take_and_trigger_the_rest(
    client: Client, runtime: Runtime, redis_client: redis.Redis
) -> None:
    redis_client.hset("orch:svc", kind_service_field("burn"), "0.01")  # 5 fit a take
    handles = [client.submit("burn", {"ms": 1}) for _ in range(8)]
    queue = queue_key(Tier.NEARLINE, 3)
    triggers = redis_client.llen(queue)
    runtime.run_message(BATCH_TASK, ["burn", PLAIN_KEY, "nearline"], "in-place-1")
    # Run in place (a chunk paused for it), one take only: it drained the buffer for up to
    # PLAIN_DRAIN_BUDGET_S while the chunk waited for its slot.
    assert [h.status() for h in handles] == ["succeeded"] * 5 + ["queued"] * 3
    assert redis_client.llen(queue) == triggers + 1  # the rest have their trigger
    assert not redis_client.exists(drain_key(_plain_buffer("nearline", "burn")))


def test_no_trigger_is_published_while_a_worker_drains_the_buffer_or_one_is_pending(
    client: Client, runtime: Runtime, redis_client: redis.Redis
) -> None:
    redis_client.hset("orch:svc", kind_service_field("burn"), "0.001")
    queue = queue_key(Tier.NEARLINE, 3)
    client.submit("burn", {"ms": 1})
    assert redis_client.llen(queue) == 1  # empty buffer, nothing pending: a trigger
    client.submit("burn", {"ms": 1})
    assert redis_client.llen(queue) == 1  # that trigger is still pending: it takes this too
    redis_client.delete(queue, pending_key(_plain_buffer("nearline", "burn")))
    redis_client.set(drain_key(_plain_buffer("nearline", "burn")), "1")  # a worker drains
    client.submit("burn", {"ms": 1})
    assert redis_client.llen(queue) == 0
    states = runtime.execute_batch("burn", PLAIN_KEY, "nearline", "drainer")
    assert len(states) == 3  # it took everything, then cleared the flag when it found none
    assert not redis_client.exists(drain_key(_plain_buffer("nearline", "burn")))
    client.submit("burn", {"ms": 1})
    assert redis_client.llen(queue) == 1  # nobody drains any more: the push triggers


def test_the_reconciler_triggers_a_buffer_that_nothing_would_take(
    client: Client, redis_client: redis.Redis
) -> None:
    from orchestrator.scheduler.reconciler import Reconciler
    from orchestrator.transport import Transport

    redis_client.hset("orch:svc", kind_service_field("burn"), "0.001")
    queue = queue_key(Tier.NEARLINE, 3)
    # A drainer held the flag when this job was pushed, then died: no trigger was published.
    redis_client.set(drain_key(_plain_buffer("nearline", "burn")), "1", px=50)
    handle = client.submit("burn", {"ms": 1})
    assert redis_client.llen(queue) == 0
    time.sleep(0.1)  # the dead worker's flag expires
    reconciler = Reconciler(client.services, Transport(client.services), grace_s=30)
    report = reconciler.check()
    assert report.triggered == [_plain_buffer("nearline", "burn")]
    assert redis_client.llen(queue) == 1 and handle.status() == "queued"
    assert reconciler.check().triggered == []  # now a trigger is pending


def test_a_plain_job_refused_after_its_push_leaves_nothing_in_its_buffer(
    client: Client, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    redis_client.hset("orch:svc", kind_service_field("echo"), "0.001")
    from orchestrator.batching import Buffers

    def refuse(self: Buffers, **_: object) -> None:
        raise redis.ConnectionError("broker went away")

    original = Buffers.trigger
    monkeypatch.setattr(Buffers, "trigger", refuse)
    with pytest.raises(ServiceUnavailable):
        client.submit("echo", {"n": 1})
    monkeypatch.setattr(Buffers, "trigger", original)
    assert redis_client.llen(_plain_buffer("interactive", "echo")) == 0
    with client.services.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(jobs)).scalar() == 0


@pytest.mark.e2e
def test_a_backlog_of_short_plain_jobs_drains_through_real_workers_in_takes(
    client: Client, start_worker: Callable[..., WorkerProcess], redis_client: redis.Redis
) -> None:
    redis_client.hset("orch:svc", kind_service_field("echo"), "0.002")  # 25 fit a take
    handles = [client.submit("echo", {"n": i}) for i in range(200)]
    assert redis_client.llen(_plain_buffer("interactive", "echo")) == 200
    start_worker(concurrency=2)
    jobs = client.wait(handles, timeout=60)
    assert [j.result for j in jobs] == [{"n": i} for i in range(200)]
    assert {len(client.attempts(h.id)) for h in handles} == {1}
    # A take's jobs are claimed together (one start time); takes are bounded by the budget.
    starts = [client.attempts(h.id)[0].started_at for h in handles]
    assert 200 / PLAIN_BATCH_MAX <= len(set(starts)) <= 200 / 4
