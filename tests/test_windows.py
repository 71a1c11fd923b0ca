"""Window logic on an injected clock: cron windows across DST and timezones, one-off windows,
validation, the config file, and the catalog's precedence."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from orchestrator.client import Client
from orchestrator.db.engine import make_engine
from orchestrator.errors import (
    AlreadyDefined,
    ConfigurationError,
    InvalidWindow,
    NotDefined,
    UnknownWindow,
    WindowInUse,
)
from orchestrator.settings import Settings
from orchestrator.window_catalog import WindowCatalog, config_windows
from orchestrator.windows import BUILTIN_WINDOWS, WindowSpec, parse_duration


def at(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def test_a_nightly_london_window_keeps_local_time_across_the_spring_dst_change() -> None:
    w = WindowSpec.build("nightly", cron="0 1 * * *", duration="5h", timezone="Europe/London")
    # GMT: 01:00 local is 01:00 UTC.
    assert w.opening(at(2026, 3, 28, 1, 30)) == (at(2026, 3, 28, 1), at(2026, 3, 28, 6))
    # BST from 29 March: 01:00 local is 00:00 UTC, and the window lasts 5 real hours.
    assert w.opening(at(2026, 3, 30, 0, 30)) == (at(2026, 3, 30, 0), at(2026, 3, 30, 5))
    assert not w.is_open(at(2026, 3, 30, 5, 0))  # the close is exclusive
    assert w.next_open(at(2026, 3, 30, 5, 30)) == at(2026, 3, 31, 0)
    assert w.next_open(at(2026, 3, 28, 3)) == at(2026, 3, 28, 3)  # open now: eligible now
    assert w.closes_at(at(2026, 3, 28, 3)) == at(2026, 3, 28, 6)
    assert w.closes_at(at(2026, 3, 28, 12)) is None


def test_a_local_time_that_exists_twice_opens_once_when_clocks_go_back() -> None:
    # London goes back from 02:00 BST to 01:00 GMT on 25 October 2026: 01:00 local is both
    # 00:00 and 01:00 UTC. The window opened at both, one 6-hour opening of a 5-hour window.
    w = WindowSpec.build("nightly", cron="0 1 * * *", duration="5h", timezone="Europe/London")
    assert w.opening(at(2026, 10, 25, 3)) == (at(2026, 10, 25, 0), at(2026, 10, 25, 5))
    assert w.next_open(at(2026, 10, 25, 5)) == at(2026, 10, 26, 1)
    short = WindowSpec.build("short", cron="30 1 * * *", duration="10m",
                             timezone="Europe/London")
    assert [o for o, _ in short.openings(at(2026, 10, 24, 12), 3)] == [
        at(2026, 10, 25, 0, 30), at(2026, 10, 26, 1, 30), at(2026, 10, 27, 1, 30)]
    # An every-hour window opens in both of the repeated hours: each is an hour of real time.
    hourly = WindowSpec.build("hourly", cron="0 * * * *", duration="10m",
                              timezone="Europe/London")
    assert [o for o, _ in hourly.openings(at(2026, 10, 24, 23, 30), 3)] == [
        at(2026, 10, 25, 0), at(2026, 10, 25, 1), at(2026, 10, 25, 2)]


def test_a_local_time_that_does_not_exist_fires_just_after_the_gap() -> None:
    # New York skips 02:00-03:00 on 8 March 2026: 02:30 EST would be 07:30 UTC.
    w = WindowSpec.build("ny", cron="30 2 * * *", duration="1h", timezone="America/New_York")
    assert w.next_open(at(2026, 3, 8, 0)) == at(2026, 3, 8, 7, 30)
    assert w.next_open(at(2026, 3, 9, 0)) == at(2026, 3, 9, 6, 30)  # EDT from then on


def test_the_same_cron_opens_at_different_instants_in_different_timezones() -> None:
    tokyo = WindowSpec.build("tokyo", cron="0 22 * * *", duration="2h", timezone="Asia/Tokyo")
    utc = WindowSpec.build("utc", cron="0 22 * * *", duration="2h")
    assert tokyo.next_open(at(2026, 6, 1, 0)) == at(2026, 6, 1, 13)
    assert utc.next_open(at(2026, 6, 1, 0)) == at(2026, 6, 1, 22)


def test_day_and_weekday_both_set_mean_either_as_in_crontab() -> None:
    first_or_monday = WindowSpec.build("fm", cron="0 1 1 * 1", duration="1h")
    # APScheduler alone wanted both: only Mondays that fall on the 1st.
    assert [o for o, _ in first_or_monday.openings(at(2026, 6, 22), 3)] == [
        at(2026, 6, 22, 1), at(2026, 6, 29, 1), at(2026, 7, 1, 1)]  # Mon, Mon, Wed 1st
    mondays = WindowSpec.build("m", cron="0 1 * * 1", duration="1h")  # day "*": weekday only
    assert mondays.next_open(at(2026, 7, 1)) == at(2026, 7, 6, 1)
    every_other = WindowSpec.build("eo", cron="0 1 * * 1/2", duration="1h")  # 1, 3, 5, 7
    assert [o.strftime("%a") for o, _ in every_other.openings(at(2026, 6, 1), 4)] == [
        "Mon", "Wed", "Fri", "Sun"]


def test_terms_crontab_does_not_know_are_refused() -> None:
    # APScheduler read a term's prefix: "mon#1" and "fri;rm" were every Monday / Friday.
    for cron in ("0 1 * * mon#1", "0 1 * * fri;rm", "0 1 ? * *", "0 1 L * *"):
        with pytest.raises(InvalidWindow, match="not a crontab"):
            WindowSpec.build("w", cron=cron, duration="1h")


def test_crontab_weekday_numbers_mean_what_they_mean_in_crontab() -> None:
    sundays = WindowSpec.build("sun", cron="0 1 * * 0", duration="1h")
    weekdays = WindowSpec.build("wk", cron="0 1 * * 1-5", duration="1h")
    assert sundays.next_open(at(2026, 1, 1)) == at(2026, 1, 4, 1)  # 4 Jan 2026 is a Sunday
    assert weekdays.next_open(at(2026, 1, 3)) == at(2026, 1, 5, 1)  # Saturday -> Monday


def test_overlapping_occurrences_are_one_opening_and_seconds_cron_works() -> None:
    w = WindowSpec.build("tight", cron="*/10 * * * * *", duration="15s")
    assert w.opening(at(2026, 1, 1, 0, 0, 3)) is not None  # every 10 s for 15 s: always open
    short = WindowSpec.build("short", cron="*/10 * * * * *", duration="4s")
    assert short.opening(at(2026, 1, 1, 0, 0, 13)) == (at(2026, 1, 1, 0, 0, 10),
                                                       at(2026, 1, 1, 0, 0, 14))
    assert short.next_open(at(2026, 1, 1, 0, 0, 15)) == at(2026, 1, 1, 0, 0, 20)
    assert [s for s, _ in short.openings(at(2026, 1, 1, 0, 0, 15), 3)] == [
        at(2026, 1, 1, 0, 0, 20), at(2026, 1, 1, 0, 0, 30), at(2026, 1, 1, 0, 0, 40)]


def test_a_continuous_chain_of_occurrences_closes_at_the_end_of_the_chain() -> None:
    w = WindowSpec.build("chain", cron="0 * * * *", duration="90m", timezone="UTC")
    # Every hour for 90 minutes: always open, so the close is where the walk stops.
    assert w.is_open(at(2026, 1, 1, 5, 59))
    close = w.closes_at(at(2026, 1, 1, 5, 59))
    assert close is not None and close > at(2026, 1, 1, 7)
    assert w.is_open(close)  # the walk's end moves on when time reaches it


def test_one_off_window_boundaries() -> None:
    w = WindowSpec.build("once", starts_at=datetime(2026, 12, 24, 22), ends_at=datetime(
        2026, 12, 25, 6), timezone="Europe/Berlin", slots=3, price_multiplier="0.6")
    start, end = at(2026, 12, 24, 21), at(2026, 12, 25, 5)  # CET is UTC+1
    assert w.next_open(at(2026, 12, 1)) == start
    assert w.is_open(start) and not w.is_open(start - timedelta(microseconds=1))
    assert not w.is_open(end) and w.closes_at(start) == end
    assert w.next_open(end) is None  # a one-off window never reopens
    assert w.price_multiplier == Decimal("0.6000") and w.slots == 3


@pytest.mark.parametrize(("fields", "message"), [
    ({"cron": "61 * * * *", "duration": "1h"}, "not a crontab"),
    ({"cron": "* * *", "duration": "1h"}, "not a crontab"),
    ({"cron": "0 1 * * *", "duration": "1h", "timezone": "Mars/Olympus"}, "unknown timezone"),
    ({"cron": "0 1 * * *"}, "needs a duration"),
    ({"cron": "0 1 * * *", "duration": "0s"}, "positive"),
    ({"cron": "0 1 * * *", "duration": "soon"}, "not a duration"),
    ({"cron": "0 1 * * *", "duration": "1h", "starts_at": datetime(2026, 1, 1)}, "not both"),
    ({"starts_at": datetime(2026, 1, 2), "ends_at": datetime(2026, 1, 1)}, "after"),
    ({}, "give a cron"),
    ({"cron": "0 1 * * *", "duration": "1h", "tiers": ["batch"]}, "unknown tier"),
    ({"cron": "0 1 * * *", "duration": "1h", "slots": 0}, "slots"),
    ({"cron": "0 1 * * *", "duration": "1h", "price_multiplier": "-1"}, "price_multiplier"),
    ({"cron": "0 1 * * *", "duration": "1h", "price_multiplier": "cheap"}, "not a number"),
])
def test_bad_window_definitions_are_refused_with_the_field_named(
    fields: dict[str, Any], message: str
) -> None:
    with pytest.raises(InvalidWindow, match=message):
        WindowSpec.build("w", **fields)


def test_values_the_database_cannot_hold_are_refused_before_it() -> None:
    # 999999.99999 passed the range check, was rounded to 1000000.0000 and stored: every
    # later read of the windows failed (SQLite) or the insert raised a DataError (PostgreSQL).
    for fields, message in [
        ({"price_multiplier": "999999.99999"}, "price_multiplier"),
        ({"duration": "99999d"}, "duration must be at most"),
        ({"slots": 3_000_000_000}, "slots"),
        ({"price_multiplier": "0.00004"}, "rounds to 0"),  # made the window's compute free
    ]:
        with pytest.raises(InvalidWindow, match=message):
            WindowSpec.build("w", **{"cron": "0 1 * * *", "duration": "1h", **fields})
    assert WindowSpec.build("w", cron="0 1 * * *", duration="1h",
                            price_multiplier="999999.9999").price_multiplier == \
        Decimal("999999.9999")


def test_window_names_are_checked_and_none_is_reserved() -> None:
    for name in ("none", "", "a b", "x" * 65, "nightly\n"):
        with pytest.raises(InvalidWindow, match="name"):
            WindowSpec.build(name, cron="0 1 * * *", duration="1h")


def test_durations_parse() -> None:
    assert [parse_duration(v) for v in (90, "90", "5h", "90m", "1h30m", "2d", "45s")] == [
        90, 90, 18000, 5400, 5400, 172800, 45]


def test_config_file_windows_validate_and_override_the_builtin(tmp_path: Path) -> None:
    found = config_windows({"windows": {
        "offpeak": {"cron": "0 2 * * *", "duration": "4h", "timezone": "Europe/Paris",
                    "tiers": ["offline", "nearline"], "price_multiplier": 0.5},
        "xmas": {"starts_at": datetime(2026, 12, 24, 18), "ends_at": datetime(2026, 12, 26),
                 "slots": 2},
    }})
    assert found["offpeak"].source == "config" and found["offpeak"].tiers == (
        "offline", "nearline")
    assert found["xmas"].slots == 2
    with pytest.raises(ConfigurationError, match=r"windows.bad has unknown key\(s\) crn"):
        config_windows({"windows": {"bad": {"crn": "0 1 * * *"}}})
    with pytest.raises(ConfigurationError, match=r"windows\.bad: .*not a crontab"):
        config_windows({"windows": {"bad": {"cron": "nope", "duration": "1h"}}})
    assert BUILTIN_WINDOWS["offpeak"].tiers == ("offline",)


def _with_config(settings: Settings, tmp_path: Path, text: str) -> Settings:
    path = tmp_path / "orchestrator.toml"
    path.write_text(text)
    return settings.model_copy(update={"config_file": path})


def test_catalog_precedence_add_and_remove(
    settings: Settings, database_url: str, tmp_path: Path, client: Client
) -> None:
    settings = _with_config(settings, tmp_path, '[windows.filed]\ncron = "0 3 * * *"\n'
                            'duration = "1h"\n[prices]\ncpu_second = 0.001\n')
    engine = make_engine(database_url)
    try:
        catalog = WindowCatalog(engine, settings, ttl_s=0)
        assert set(catalog.all()) == {"offpeak", "filed"}
        catalog.add(WindowSpec.build("nightly", cron="0 1 * * *", duration="5h", slots=2))
        assert catalog.get("nightly").source == "database"
        with pytest.raises(AlreadyDefined):
            catalog.add(WindowSpec.build("nightly", cron="0 2 * * *", duration="1h"))
        with pytest.raises(AlreadyDefined, match="config file"):
            catalog.add(WindowSpec.build("filed", cron="0 2 * * *", duration="1h"))
        # The database may override the built-in offpeak.
        catalog.add(WindowSpec.build("offpeak", cron="0 23 * * *", duration="2h"))
        assert catalog.get("offpeak").cron == "0 23 * * *"
        with pytest.raises(UnknownWindow, match="weekend"):
            catalog.get("weekend")
        # A window that jobs wait for cannot be removed; nothing changes.
        job = client.submit("echo", {"x": 1}, window="nightly")
        with pytest.raises(WindowInUse, match="1 unfinished"):
            catalog.remove("nightly")
        assert "nightly" in catalog.all()
        job.cancel()
        catalog.remove("nightly")
        assert "nightly" not in catalog.all()
        with pytest.raises(NotDefined, match="config file"):
            catalog.remove("filed")
        with pytest.raises(NotDefined):
            catalog.remove("nightly")
    finally:
        engine.dispose()
