"""Admission control: tiers shed load at submit, before anything is stored."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from sqlalchemy import func, select

from orchestrator import Client
from orchestrator.admission import (
    UNKNOWN_DRAIN_RETRY_S,
    Admission,
    TierLoad,
    decide,
    record_service,
)
from orchestrator.broker import queue_key
from orchestrator.db.models import jobs
from orchestrator.db.store import utcnow
from orchestrator.errors import ConfigurationError, Overloaded
from orchestrator.settings import Settings
from orchestrator.tiers import DEFAULT_POLICIES, Tier
from orchestrator.window_catalog import WindowCatalog
from orchestrator.windows import WindowSpec
from tests.conftest import WorkerProcess
from workers.registry import register, unregister


def _waiting(r: redis.Redis) -> int:
    """Every queued message and buffered job: all Redis lists."""
    return sum(int(r.llen(k)) for k in r.keys("*") if r.type(k) == b"list")


def _rows(client: Client) -> int:
    with client.services.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(jobs)).scalar_one())


@pytest.fixture
def make_client(settings: Settings) -> Iterator[Callable[..., Client]]:
    """A client whose settings add ``ORCH_*`` overrides to the test settings."""
    made: list[Client] = []

    def make(**env: str) -> Client:
        made.append(Client.from_settings(Settings.from_env({**settings.to_env(), **env})))
        return made[-1]

    yield make
    for c in made:
        c.close()


def _refused(client: Client, r: redis.Redis, submit: Callable[[], object]) -> Overloaded:
    rows, waiting = _rows(client), _waiting(r)
    with pytest.raises(Overloaded) as info:
        submit()
    assert (_rows(client), _waiting(r)) == (rows, waiting), "a refused submit left something"
    return info.value


def test_interactive_submit_over_its_wait_objective_is_refused_and_leaves_nothing(
    client: Client, redis_client: redis.Redis
) -> None:
    register(redis_client, "fake-a@test", [Tier.INTERACTIVE], concurrency=2, ttl_s=60)
    record_service(redis_client, Tier.INTERACTIVE, 1.0, 1)  # one second a job
    # Waits of 0 and 1 x 1s / 2 slots = 0.5s meet the 0.5s objective; 2 jobs ahead do not.
    client.submit("echo", {"n": 1})
    client.submit("echo", {"n": 2})
    refusal = _refused(client, redis_client, lambda: client.submit("echo", {"n": 3}))
    assert (refusal.tier, refusal.reason) == ("interactive", "queue_wait_objective")
    assert refusal.retry_after == pytest.approx(0.5)  # 1.0s estimated - 0.5s objective
    assert "estimated queue wait 1s exceeds the objective 0.5s" in str(refusal)
    # Batched kinds are refused before their buffer is touched, too.
    _refused(client, redis_client, lambda: client.submit("upper", {"texts": ["a"]},
                                                         tier="interactive"))
    # Lower tiers have no wait objective by default.
    client.submit("echo", {"n": 4}, tier="nearline")


def test_the_estimate_counts_every_live_worker_slot_serving_the_tier(
    client: Client, redis_client: redis.Redis
) -> None:
    admission = Admission(redis_client, client.settings)
    register(redis_client, "fake-a@test", [Tier.INTERACTIVE], concurrency=2, ttl_s=60)
    register(redis_client, "fake-b@test", [Tier.INTERACTIVE, Tier.OFFLINE], concurrency=8,
             ttl_s=60)
    register(redis_client, "fake-c@test", [Tier.OFFLINE], concurrency=4, ttl_s=60)
    register(redis_client, "fake-gone@test", [Tier.INTERACTIVE], concurrency=50, ttl_s=0.05)
    record_service(redis_client, Tier.INTERACTIVE, 0.2, 1)
    time.sleep(0.3)  # fake-gone's heartbeat has lapsed
    for i in range(5):
        client.submit("echo", {"n": i})
    load = admission.load(Tier.INTERACTIVE)
    assert (load.backlog, load.slots, load.service_s) == (5, 10, pytest.approx(0.2))
    assert load.estimated_wait_s == pytest.approx(0.1)
    assert admission.load(Tier.OFFLINE).slots == 12  # a worker counts for each of its tiers
    client.submit("echo", {"n": 5})  # 0.1s < 0.5s: admitted
    unregister(redis_client, "fake-b@test")
    assert admission.load(Tier.INTERACTIVE).slots == 2
    refusal = _refused(client, redis_client, lambda: client.submit("echo", {"n": 6}))
    assert refusal.reason == "queue_wait_objective"  # 6 x 0.2s / 2 = 0.6s


def test_without_live_workers_interactive_is_admitted_up_to_its_hard_cap(
    make_client: Callable[..., Client], redis_client: redis.Redis
) -> None:
    client = make_client(ORCH_TIER_INTERACTIVE_HARD_BACKLOG="3")
    record_service(redis_client, Tier.INTERACTIVE, 100.0, 1)  # slow, but no one to wait for
    handles = [client.submit("echo", {"n": i}) for i in range(3)]
    assert all(h.created for h in handles)
    refusal = _refused(client, redis_client, lambda: client.submit("echo", {"n": 3}))
    assert refusal.reason == "hard_backlog"
    assert refusal.retry_after == UNKNOWN_DRAIN_RETRY_S  # nothing drains at a known rate


def test_nearline_is_shed_once_its_backlog_reaches_max_backlog(
    make_client: Callable[..., Client], redis_client: redis.Redis
) -> None:
    client = make_client(ORCH_TIER_NEARLINE_MAX_BACKLOG="3")
    register(redis_client, "fake@test", [Tier.NEARLINE], concurrency=4, ttl_s=60)
    record_service(redis_client, Tier.NEARLINE, 2.0, 1)
    for _ in range(3):
        client.submit("burn", {"ms": 1})
    refusal = _refused(client, redis_client, lambda: client.submit("burn", {"ms": 1}))
    assert (refusal.tier, refusal.reason) == ("nearline", "max_backlog")
    assert refusal.retry_after == pytest.approx(0.5)  # one job to drain: 2s / 4 slots
    _refused(client, redis_client, lambda: client.submit("upper", {"texts": ["a"]}))
    client.submit("burn", {"ms": 1}, tier="offline")  # another tier's backlog is its own


def test_batch_buffers_and_waiting_bulk_chunks_count_in_the_backlog(
    client: Client, redis_client: redis.Redis
) -> None:
    admission = Admission(redis_client, client.settings)
    for text in ("a", "b", "c"):
        client.submit("upper", {"texts": [text]})  # nearline, buffered, one trigger message
    assert redis_client.llen("orch:buf:nearline:upper:g") == 3
    assert redis_client.llen(queue_key(Tier.NEARLINE, 3)) == 1  # the trigger: not a job
    assert admission.load(Tier.NEARLINE).backlog == 3
    client.submit("burn", {"ms": 1})  # a plain job's own message is one
    assert admission.load(Tier.NEARLINE).backlog == 3 + 1
    # 10 items in chunks of 2: a window of 4 chunks on the queue, 1 waiting its fair turn.
    client.submit_bulk("upper", [str(i) for i in range(10)], chunk_size=2, tenant="acme")
    assert admission.load(Tier.OFFLINE).backlog == 5


def test_offline_is_accepted_until_its_hard_cap_then_refused_bulk_too(
    make_client: Callable[..., Client], redis_client: redis.Redis
) -> None:
    client = make_client(ORCH_TIER_OFFLINE_HARD_BACKLOG="5")
    for i in range(5):
        client.submit("echo", {"n": i}, tier="offline")
    refusal = _refused(client, redis_client,
                       lambda: client.submit("echo", {"n": 5}, tier="offline"))
    assert (refusal.tier, refusal.reason) == ("offline", "hard_backlog")
    consumed: list[int] = []

    def items() -> Iterator[str]:
        for i in range(10):
            consumed.append(i)
            yield str(i)

    _refused(client, redis_client, lambda: client.submit_bulk("upper", items(), chunk_size=2))
    assert consumed == []  # refused before reading a single item
    client.submit("echo", {"n": 0})  # interactive is unaffected
    # Work deferred to a window waits in the database, not on the queue: not shed, bulk or not
    # (bulk was shed before).
    hour = (utcnow().hour + 12) % 24  # closed whenever the test runs
    WindowCatalog(client.services.engine, client.settings, ttl_s=0).add(
        WindowSpec.build("later", cron=f"0 {hour} * * *", duration="1h"))
    assert client.submit("echo", {"n": 6}, tier="offline", window="later").status() == "deferred"
    bulk = client.submit_bulk("upper", items(), chunk_size=2, window="later")
    assert {c.state for c in client.chunks(bulk.id)} == {"deferred"} and len(consumed) == 10


def test_a_resubmit_with_a_used_idempotency_key_returns_its_job_even_when_overloaded(
    make_client: Callable[..., Client], redis_client: redis.Redis
) -> None:
    client = make_client(ORCH_TIER_OFFLINE_HARD_BACKLOG="1")
    first = client.submit("echo", {"n": 1}, tier="offline", idempotency_key="k")
    with pytest.raises(Overloaded):
        client.submit("echo", {"n": 2}, tier="offline")
    again = client.submit("echo", {"n": 1}, tier="offline", idempotency_key="k")
    assert (again.id, again.created) == (first.id, False)


def test_service_time_is_an_ewma_per_tier_weighted_by_jobs(
    redis_client: redis.Redis, tmp_path: Path
) -> None:
    admission_of = Admission(redis_client, Settings.from_env({"ORCH_STATE_DIR": str(tmp_path)}))
    record_service(redis_client, Tier.NEARLINE, 1.0, 1)
    record_service(redis_client, Tier.NEARLINE, 5.0, 0)  # no jobs: nothing to learn
    assert admission_of.load(Tier.NEARLINE).service_s == pytest.approx(1.0)
    record_service(redis_client, Tier.NEARLINE, 0.0, 10)  # a batch weighs as its 10 jobs
    assert admission_of.load(Tier.NEARLINE).service_s == pytest.approx(0.9 ** 10)
    assert admission_of.load(Tier.OFFLINE).service_s is None


def test_decide_bounds_retry_after_and_needs_workers_for_the_estimate() -> None:
    policy = DEFAULT_POLICIES[Tier.INTERACTIVE]
    idle = TierLoad(Tier.INTERACTIVE, backlog=10**6, service_s=1.0, slots=0)
    assert decide(policy.model_copy(update={"hard_backlog": 0}), idle) is None
    swamped = TierLoad(Tier.INTERACTIVE, backlog=10**6, service_s=1.0, slots=1)
    refusal = decide(policy.model_copy(update={"hard_backlog": 0}), swamped)
    assert refusal is not None and refusal.retry_after == 300.0  # capped advice
    tiny = TierLoad(Tier.INTERACTIVE, backlog=1, service_s=0.501, slots=1)
    refusal = decide(policy, tiny)
    assert refusal is not None and refusal.retry_after == 0.1  # at least 0.1s


def test_admission_fields_come_from_the_environment_and_are_checked(tmp_path: Path) -> None:
    s = Settings.from_env({"ORCH_STATE_DIR": str(tmp_path),
                           "ORCH_TIER_INTERACTIVE_QUEUE_WAIT_OBJECTIVE_S": "0.05",
                           "ORCH_TIER_NEARLINE_MAX_BACKLOG": "10"})
    assert s.policy(Tier.INTERACTIVE).queue_wait_objective_s == 0.05
    assert s.policy(Tier.NEARLINE).max_backlog == 10
    assert s.policy(Tier.OFFLINE).hard_backlog == 5_000_000
    assert Settings.from_env(s.to_env()) == s
    with pytest.raises(ConfigurationError, match="must not exceed hard_backlog"):
        Settings.from_env({"ORCH_STATE_DIR": str(tmp_path),
                           "ORCH_TIER_NEARLINE_HARD_BACKLOG": "10"})


@pytest.mark.e2e
def test_a_real_worker_registers_its_slots_records_service_time_and_leaves(
    client: Client, redis_client: redis.Redis, start_worker: Callable[..., WorkerProcess]
) -> None:
    admission = Admission(redis_client, client.settings)
    worker = start_worker(tiers="interactive,nearline", concurrency=2)
    assert admission.load(Tier.INTERACTIVE).slots == 2
    assert admission.load(Tier.NEARLINE).slots == 2
    assert admission.load(Tier.OFFLINE).slots == 0
    assert client.submit("echo", {"x": 1}).result(timeout=30) == {"x": 1}
    measured = admission.load(Tier.INTERACTIVE).service_s
    assert measured is not None and 0 < measured < 30
    worker.stop()
    assert admission.load(Tier.INTERACTIVE).slots == 0  # a clean stop unregisters at once


def test_a_tier_that_can_refuse_nothing_reads_no_load(
    redis_client: redis.Redis, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = Settings.from_env({
        "ORCH_STATE_DIR": str(tmp_path),
        "ORCH_TIER_INTERACTIVE_QUEUE_WAIT_OBJECTIVE_S": "0",
        "ORCH_TIER_INTERACTIVE_HARD_BACKLOG": "0",
    })
    admission = Admission(redis_client, settings)
    reads: list[Tier] = []
    original = Admission.load
    monkeypatch.setattr(Admission, "load",
                        lambda self, tier: reads.append(tier) or original(self, tier))
    assert admission.check(Tier.INTERACTIVE) is None
    assert admission.check(Tier.OFFLINE) is not None  # offline keeps its hard backlog
    assert reads == [Tier.OFFLINE]
