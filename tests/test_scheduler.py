"""The scheduler process: one acts at a time, recurring occurrences are submitted once and
coalesce, and end to end a short window releases deferred work, checkpoints a chunk at its
close and resumes it at the next opening with no item run twice."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from orchestrator.client import Client
from orchestrator.db.store import utcnow
from orchestrator.errors import AlreadyDefined, InvalidSchedule
from orchestrator.kinds import registry
from orchestrator.local import LocalWorker
from orchestrator.scheduler.process import SchedulerProcess
from orchestrator.scheduler.recurring import (
    ScheduleStore,
    build_schedule,
    fire,
    latest_occurrence,
    occurrence_key,
)
from orchestrator.settings import Settings
from orchestrator.window_catalog import WindowCatalog
from orchestrator.windows import WindowSpec, cron_trigger


def at(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


@pytest.fixture
def schedules(client: Client) -> ScheduleStore:
    return ScheduleStore(client.services.engine)


def _add(schedules: ScheduleStore, client: Client, name: str, cron: str, **kw: object) -> None:
    kw.setdefault("payload", "{}")
    schedules.add(build_schedule(name, cron=cron, kinds=registry,
                                 catalog=WindowCatalog(client.services.engine, client.settings),
                                 **kw))  # type: ignore[arg-type]


def test_latest_occurrence_on_an_injected_clock() -> None:
    hourly = cron_trigger("0 * * * *", "UTC")
    assert latest_occurrence(hourly, at(2026, 5, 1, 10, 30)) == at(2026, 5, 1, 10)
    assert latest_occurrence(hourly, at(2026, 5, 1, 10, 0)) == at(2026, 5, 1, 10)
    yearly = cron_trigger("0 0 1 1 *", "Europe/Paris")
    assert latest_occurrence(yearly, at(2026, 5, 1)) == at(2025, 12, 31, 23)
    # In the hour London repeats (25 October 2026), stepping one second in local time lost
    # the fold and found the same occurrence again, for ever (the scheduler hung).
    london = cron_trigger("0 * * * *", "Europe/London")
    assert latest_occurrence(london, at(2026, 10, 25, 1, 30)) == at(2026, 10, 25, 1)
    daily = cron_trigger("30 1 * * *", "Europe/London")
    assert latest_occurrence(daily, at(2026, 10, 25, 2)) == at(2026, 10, 25, 0, 30)
    # A fixed-time schedule fires once that night (it fired at both 01:30s, two jobs).
    fires, t = [], at(2026, 10, 24, 12)
    for _ in range(3):
        fire = daily.get_next_fire_time(None, t)
        assert fire is not None
        fires.append(fire.astimezone(UTC))
        t = fires[-1] + timedelta(seconds=1)
    assert fires == [at(2026, 10, 25, 0, 30), at(2026, 10, 26, 1, 30), at(2026, 10, 27, 1, 30)]


def test_missed_occurrences_coalesce_and_each_occurrence_is_submitted_once(
    client: Client, schedules: ScheduleStore
) -> None:
    _add(schedules, client, "hourly", "0 * * * *", kind="echo", payload='{"n": 1}',
         window="none")
    first = fire(client, schedules, "hourly", at(2026, 5, 1, 10, 30))
    assert first is not None and first.created
    assert first.job().idempotency_key == occurrence_key("hourly", at(2026, 5, 1, 10))
    # Down from 10:30 to 13:05: 11:00 and 12:00 coalesce into 13:00.
    late = fire(client, schedules, "hourly", at(2026, 5, 1, 13, 5))
    assert late is not None and late.created
    assert late.job().idempotency_key == occurrence_key("hourly", at(2026, 5, 1, 13))
    # A second scheduler (or a restart) firing the same occurrence gets the same job back.
    again = fire(client, schedules, "hourly", at(2026, 5, 1, 13, 10))
    assert again is not None and (again.id, again.created) == (late.id, False)
    assert len(client.services.store.find(kind="echo")) == 2
    assert schedules.get("hourly").last_job_id == late.id  # type: ignore[union-attr]


def test_bad_schedules_are_refused_and_nothing_is_stored(
    client: Client, schedules: ScheduleStore
) -> None:
    for fields, message in [
        ({"cron": "nope", "kind": "echo"}, "crontab"),
        ({"cron": "0 1 * * *", "kind": "nosuch"}, "unknown job kind"),
        ({"cron": "0 1 * * *", "kind": "record", "payload": "{}"}, "invalid payload"),
        ({"cron": "0 1 * * *", "kind": "echo", "payload": "{not json"}, "not JSON"),
        ({"cron": "0 1 * * *", "kind": "echo", "window": "weekend"}, "unknown window"),
        ({"cron": "0 1 * * *", "kind": "echo", "tier": "urgent"}, "unknown tier"),
    ]:
        with pytest.raises(InvalidSchedule, match=message):
            _add(schedules, client, "bad", **fields)  # type: ignore[arg-type]
    assert schedules.all() == []
    _add(schedules, client, "ok", "0 1 * * *", kind="echo")
    with pytest.raises(AlreadyDefined):
        _add(schedules, client, "ok", "0 2 * * *", kind="echo")


@pytest.fixture
def scheduler_runner(settings: Settings) -> Iterator[Callable[..., tuple[SchedulerProcess,
                                                                          threading.Event]]]:
    running: list[tuple[threading.Event, threading.Thread]] = []

    def start(holder: str, **overrides: object) -> tuple[SchedulerProcess, threading.Event]:
        process = SchedulerProcess(settings.model_copy(update=overrides), holder=holder)
        stop = threading.Event()
        thread = threading.Thread(target=process.run, args=(stop,), daemon=True)
        thread.start()
        running.append((stop, thread))
        return process, stop

    yield start
    for stop, thread in running:
        stop.set()
        thread.join(timeout=30)


def _wait(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.mark.e2e
def test_two_schedulers_one_acts_the_other_takes_over_and_no_occurrence_runs_twice(
    client: Client, schedules: ScheduleStore,
    scheduler_runner: Callable[..., tuple[SchedulerProcess, threading.Event]]
) -> None:
    _add(schedules, client, "everysecond", "* * * * * *", kind="echo", payload='{"n": 1}',
         window="none")
    a, stop_a = scheduler_runner("A", scheduler_lease_s=1.5)
    _wait(lambda: a.acting_since is not None, 10, "A to act")
    b, _ = scheduler_runner("B", scheduler_lease_s=1.5)
    _wait(lambda: len(client.services.store.find(kind="echo")) >= 3, 15, "occurrences")
    assert b.acting_since is None  # B waits while A holds the lease
    stop_a.set()  # A stops (and gives the lease up)
    _wait(lambda: b.acting_since is not None, 10, "B to take over")
    before = len(client.services.store.find(kind="echo", limit=1000))
    _wait(lambda: len(client.services.store.find(kind="echo", limit=1000)) >= before + 2, 15,
          "B to submit")
    found = client.services.store.find(kind="echo", limit=1000)
    keys = Counter(j.idempotency_key for j in found)
    assert all(n == 1 for n in keys.values()) and len(keys) == len(found)
    # Both firing the same occurrence (e.g. after a pause) still makes one job.
    now = utcnow()
    one = fire(a.client, a.schedules, "everysecond", now)
    two = fire(b.client, b.schedules, "everysecond", now)
    assert one is not None and two is not None and one.id == two.id
    assert not two.created


@pytest.mark.e2e
def test_a_short_window_releases_deferred_work_and_suspends_a_chunk_at_its_close(
    client: Client, start_worker: Callable[..., LocalWorker],
    scheduler_runner: Callable[..., tuple[SchedulerProcess, threading.Event]],
    tmp_path: Path
) -> None:
    catalog = WindowCatalog(client.services.engine, client.settings, ttl_s=0)
    # Open for 4 s every 10 s.
    catalog.add(WindowSpec.build("blink", cron="*/10 * * * * *", duration="4s", slots=2,
                                 price_multiplier="0.5"))
    window = catalog.get("blink")
    start_worker(concurrency=2)
    path = tmp_path / "tally.txt"
    items = [f"i{n:02d}" for n in range(16)]
    # 8 mini-batches of 0.8 s: longer than one opening.
    bulk = client.submit_bulk("tally", items, params={"path": str(path), "sleep_s": 0.8},
                              chunk_size=100, window="blink")
    effects = tmp_path / "effects.txt"
    plain = client.submit("record", {"path": str(effects), "label": "p"}, window="blink")
    assert plain.status() == "deferred"
    scheduler, _ = scheduler_runner("S", scheduler_tick_s=0.2)
    client.wait([plain, bulk], timeout=90)
    assert bulk.status() == "succeeded" and plain.status() == "succeeded"
    # Released within a second of the window opening, or of the scheduler starting to act if
    # the window was already open then (on a busy machine start-up can fall inside an opening).
    released = plain.job().queued_at
    assert released is not None and scheduler.acting_since is not None
    opened = window.opening(released)
    assert opened is not None
    assert (released - max(opened[0], scheduler.acting_since)).total_seconds() < 1.0
    [chunk] = client.chunks(bulk.id)
    tries = client.attempts(chunk.id)
    assert any(a.outcome == "preempted" and "window blink closed" in (a.error or "")
               for a in tries), [(a.outcome, a.error) for a in tries]
    for attempt in tries:  # no chunk attempt starts outside its window
        assert window.is_open(attempt.started_at), attempt
    # Every item processed exactly once, results complete and in order.
    assert Counter(path.read_text().split()) == dict.fromkeys(items, 1)
    assert list(client.bulk_results(bulk.id, timeout=5)) == [i.upper() for i in items]
    assert chunk.items_done == 16
    assert timedelta(0) <= (tries[-1].started_at - tries[0].started_at)
