"""Cooperative preemption: chunked work yields to higher tiers at checkpoints, resumes exactly."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from orchestrator import Client
from orchestrator.broker import queue_key
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
    client.submit("echo", {"urgent": True})  # interactive work now waits
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
    client.submit("echo", {"urgent": True})
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
        client.submit("echo", {"urgent": True})
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
    urgent = client.submit("echo", {"urgent": True})
    assert runtime.execute(chunk.id) == "queued"  # preempted at item 10
    for part in Path(bulk.job().result_ref or "").glob("*.part-*"):
        part.unlink()  # e.g. the next worker has no shared result store
    urgent.cancel()
    client.services.redis.flushdb()  # nothing waits above any more
    assert runtime.execute(chunk.id) == "succeeded"
    assert list(client.bulk_results(bulk.id, timeout=1)) == [t.upper() for t in items]
    assert bulk.job().items_done == 35
