"""Deferred submits, releases by window with slots, and the worker's side of a closed window,
on the real database and Redis with an injected clock for the scheduler's tick."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import pytest
import redis
from sqlalchemy import select

from orchestrator.broker import TRANSPORT_KEY, queue_key, window_key
from orchestrator.cli.jobs_cmd import next_eligible
from orchestrator.client import Client
from orchestrator.db.deferral import events
from orchestrator.db.models import attempts
from orchestrator.db.store import utcnow
from orchestrator.errors import InvalidOption, UnknownWindow
from orchestrator.scheduler.keeper import WindowKeeper
from orchestrator.tiers import TIER_ORDER
from orchestrator.transport import Transport
from orchestrator.window_catalog import WindowCatalog
from orchestrator.windows import WindowSpec
from tests.kinds_for_tests import NightlyPayload  # noqa: F401  (declares "nightly")
from workers.runtime import Runtime


def _queues_empty(r: redis.Redis) -> bool:
    return all(r.llen(queue_key(t, s)) == 0 for t in TIER_ORDER
               for s in range(10))


@pytest.fixture
def catalog(client: Client) -> WindowCatalog:
    return WindowCatalog(client.services.engine, client.settings, ttl_s=0)


@pytest.fixture
def keeper(client: Client, catalog: WindowCatalog) -> Iterator[WindowKeeper]:
    yield WindowKeeper(client.services, catalog, Transport(client.services))


def test_a_deferred_submit_stores_the_job_and_publishes_nothing(
    client: Client, catalog: WindowCatalog, redis_client: redis.Redis
) -> None:
    # Opens 12 hours from now for an hour: closed whenever the test runs (a fixed "0 1 * * *"
    # was open, and the test failed, from 01:00 to 06:00 UTC).
    hour = (utcnow().hour + 12) % 24
    catalog.add(WindowSpec.build("nightly", cron=f"0 {hour} * * *", duration="1h"))
    handle = client.submit("echo", {"x": 1}, window="nightly")
    job = handle.job()
    assert (job.state, job.window) == ("deferred", "nightly")
    assert _queues_empty(redis_client) and not redis_client.hexists(TRANSPORT_KEY, handle.id)
    now = utcnow()
    start, text = next_eligible(job, catalog, now)
    assert start == catalog.get("nightly").next_open(now) and "opens" in (text or "")
    assert client.services.store.find(state="deferred", window="nightly")[0].id == handle.id


def test_kind_default_window_versus_no_window_versus_a_tier_it_does_not_admit(
    client: Client, redis_client: redis.Redis
) -> None:
    by_default = client.submit("nightly", {"note": "a"})
    assert (by_default.job().state, by_default.job().window) == ("deferred", "offpeak")
    now_please = client.submit("nightly", {"note": "b"}, window=None)
    assert (now_please.job().state, now_please.job().window) == ("queued", None)
    # offpeak admits offline work only: an interactive submit of the kind runs now.
    urgent = client.submit("nightly", {"note": "c"}, tier="interactive")
    assert urgent.job().state == "queued"
    # Naming a window that does not admit the job is the caller's error.
    with pytest.raises(InvalidOption, match="admits tiers offline"):
        client.submit("nightly", {"note": "d"}, tier="interactive", window="offpeak")


def test_an_unknown_window_is_refused_and_nothing_is_stored(client: Client) -> None:
    with pytest.raises(UnknownWindow, match="weekend"):
        client.submit("echo", {"x": 1}, window="weekend", idempotency_key="k1")
    assert client.services.store.find_by_key("default", "k1") is None
    with pytest.raises(InvalidOption):
        client.submit("echo", {"x": 1}, window=3)  # type: ignore[arg-type]


def test_a_window_that_will_not_open_again_is_refused_and_nothing_is_stored(
    client: Client, catalog: WindowCatalog
) -> None:
    now = utcnow()
    catalog.add(WindowSpec.build("feb30", cron="0 0 30 2 *", duration="1h"))
    catalog.add(WindowSpec.build("over", starts_at=now - timedelta(days=2),
                                 ends_at=now - timedelta(days=1)))
    # Deferred for ever before, holding the tenant's in-flight quota.
    for name in ("feb30", "over"):
        with pytest.raises(InvalidOption, match="will not open again"):
            client.submit("echo", {"x": 1}, window=name, idempotency_key=name)
        with pytest.raises(InvalidOption, match="will not open again"):
            client.submit_bulk("upper", ["a"], window=name)
        assert client.services.store.find_by_key("default", name) is None
    assert client.services.store.find(state="deferred") == []


def test_release_follows_priority_then_age_and_never_exceeds_the_slots(
    client: Client, catalog: WindowCatalog, keeper: WindowKeeper, runtime: Runtime,
    redis_client: redis.Redis, tmp_path: Path
) -> None:
    real = utcnow()
    opens = real - timedelta(minutes=10)
    catalog.add(WindowSpec.build("slot2", starts_at=opens, ends_at=real + timedelta(hours=1),
                                 slots=2, price_multiplier="0.25"))
    path = str(tmp_path / "effects.txt")
    offline = [client.submit("record", {"path": path, "label": f"off{i}"}, tier="offline",
                             window="slot2") for i in range(3)]
    nearline = [client.submit("record", {"path": path, "label": f"near{i}"}, window="slot2")
                for i in range(2)]
    assert keeper.tick(opens - timedelta(seconds=1)) == {}  # closed: nothing moves
    assert not redis_client.exists(window_key("slot2"))
    released = keeper.tick(real)["slot2"]
    assert released == [nearline[0].id, nearline[1].id]  # better tier first, oldest first
    assert redis_client.get(window_key("slot2")) == b"0.2500"
    assert keeper.tick(real) == {"slot2": []}  # both slots are taken
    assert runtime.execute(nearline[0].id) == "succeeded"
    assert keeper.tick(real)["slot2"] == [offline[0].id]  # one finished: one more
    for handle in (nearline[1], offline[0]):
        assert runtime.execute(handle.id) == "succeeded"
    assert keeper.tick(real)["slot2"] == [offline[1].id, offline[2].id]
    [attempt] = client.attempts(nearline[0].id)
    with client.services.engine.connect() as conn:
        row = conn.execute(select(attempts.c.window, attempts.c.price_multiplier)
                           .where(attempts.c.job_id == nearline[0].id)).one()
    assert (row.window, row.price_multiplier) == ("slot2", Decimal("0.25"))
    assert [e[1] for e in events(client.services.engine, offline[0].id)] == ["released"]
    assert attempt.outcome == "succeeded"


def test_a_released_job_whose_window_closed_before_it_started_goes_back_unrun(
    client: Client, catalog: WindowCatalog, keeper: WindowKeeper, runtime: Runtime,
    tmp_path: Path
) -> None:
    real = utcnow()
    catalog.add(WindowSpec.build("brief", starts_at=real - timedelta(minutes=1),
                                 ends_at=real + timedelta(hours=1)))
    path = tmp_path / "effects.txt"
    handle = client.submit("record", {"path": str(path), "label": "x"}, window="brief")
    assert keeper.tick(real)["brief"] == [handle.id]
    keeper.tick(real + timedelta(hours=2))  # past the close: the open flag is gone
    assert runtime.execute(handle.id) == "deferred"
    job = handle.job()
    assert (job.state, job.preemptions, job.attempts) == ("deferred", 1, 1)
    assert not path.exists()  # the kind never ran
    [attempt] = client.attempts(handle.id)
    assert attempt.outcome == "preempted" and "window brief closed" in (attempt.error or "")
    later = catalog.get("brief")
    assert later.next_open(real + timedelta(hours=2)) is None
    assert "closed for good" in (next_eligible(job, catalog, real + timedelta(hours=2))[1]
                                 or "")


def test_bulk_chunks_wait_for_the_window_and_are_released_into_fair_turns(
    client: Client, catalog: WindowCatalog, keeper: WindowKeeper, runtime: Runtime,
    tmp_path: Path
) -> None:
    real = utcnow()
    catalog.add(WindowSpec.build("bulkw", starts_at=real - timedelta(minutes=1),
                                 ends_at=real + timedelta(hours=1), slots=1))
    path = tmp_path / "tally.txt"
    items = [f"i{n}" for n in range(30)]
    bulk = client.submit_bulk("tally", items, params={"path": str(path)}, chunk_size=10,
                              window="bulkw")
    chunks = client.chunks(bulk.id)
    assert [c.state for c in chunks] == ["deferred"] * 3
    assert {c.window for c in chunks} == {"bulkw"} and bulk.job().window == "bulkw"
    for expected in chunks:
        assert keeper.tick(real)["bulkw"] == [expected.id]  # one slot: one chunk at a time
        assert runtime.execute(expected.id) == "succeeded"
    assert list(client.bulk_results(bulk.id, timeout=5)) == [i.upper() for i in items]
    assert sorted(path.read_text().split()) == sorted(items)


