"""Off-peak windows: when a named window is open, and what it admits.

A window is either recurring (a cron expression evaluated in its timezone, open for
``duration_s`` seconds from each occurrence) or one-off (``starts_at`` to ``ends_at``). Every
question here takes the time as an argument (an aware datetime), so the logic runs on any clock:
the scheduler passes the wall clock, tests pass whatever instant they need.

Durations are real elapsed seconds: a 5-hour window that opens at 01:00 local time on the night
clocks go forward still lasts 5 hours. A cron occurrence at a local time that does not exist
that night (02:30 when clocks jump from 02:00 to 03:00) fires at the same instant shifted past
the gap, as APScheduler's CronTrigger computes it; one at a fixed time that exists twice (01:30
when clocks go back) fires once, at the first (``OnceCronTrigger``), while a wildcard one
(``0 * * * *``) fires at both, as cron does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any, Final
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.combining import OrTrigger
from apscheduler.triggers.cron import CronTrigger

from orchestrator.errors import InvalidWindow
from orchestrator.tiers import Tier

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
#: Reserved: ``--window none`` and a schedule's ``window = "none"`` mean "no window".
NO_WINDOW_NAME = "none"
_DURATION_RE = re.compile(r"^\s*(?:(\d+)d)?\s*(?:(\d+)h)?\s*(?:(\d+)m)?\s*(?:(\d+)s)?\s*$")
#: occurrences walked to find the end of overlapping openings. A window whose occurrences
#: overlap for longer (a 2-hour window every hour is always open) reports the end of the
#: walked part as its close, which moves on as time reaches it: walking 10,000 cost 0.3 s of
#: CPU per look, and the scheduler looks twice a second.
_MAX_STEPS = 200


class _KindDefault:
    """The type of ``KIND_DEFAULT``."""

    _instance: _KindDefault | None = None

    def __new__(cls) -> _KindDefault:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "KIND_DEFAULT"


#: ``submit(..., window=KIND_DEFAULT)`` (the default): the kind's default window, if any.
#: ``window=None``: no window, run now. ``window="nightly"``: wait for that window.
KIND_DEFAULT: Final = _KindDefault()


#: the longest window (about 68 years: its seconds fit the database's 32-bit integer)
MAX_DURATION_S: Final = 2**31 - 1
#: the most slots a window can have (a 32-bit integer in the database)
MAX_SLOTS: Final = 2**31 - 1


def parse_duration(value: Any) -> int:
    """Seconds from an int, or from text such as ``"5h"``, ``"90m"``, ``"1h30m"``, ``"3600"``.

    Raises:
        InvalidWindow: not a positive duration.
    """
    if isinstance(value, bool):
        raise InvalidWindow(f"duration {value!r} is not a duration")
    if isinstance(value, int):
        seconds = value
    elif isinstance(value, str) and value.strip().isdigit():
        seconds = int(value.strip())
    elif isinstance(value, str) and (m := _DURATION_RE.match(value)) and any(m.groups()):
        d, h, mi, s = (int(g or 0) for g in m.groups())
        seconds = ((d * 24 + h) * 60 + mi) * 60 + s
    else:
        raise InvalidWindow(
            f"duration {value!r} is not a duration: give seconds or e.g. '5h', '90m', '1h30m'")
    if seconds <= 0:
        raise InvalidWindow(f"duration must be positive, got {value!r}")
    if seconds > MAX_DURATION_S:  # stored as a 32-bit integer
        raise InvalidWindow(f"duration must be at most {MAX_DURATION_S // 86400} days, "
                            f"got {value!r}")
    return seconds


def check_timezone(name: str) -> ZoneInfo:
    """Raises: InvalidWindow: not an IANA timezone name."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, TypeError):
        raise InvalidWindow(
            f"unknown timezone {name!r}: use an IANA name such as 'UTC' or 'Europe/London'"
        ) from None


_CRON_DAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat", "sun")


def _crontab_weekdays(field: str) -> str:
    """Crontab numbers Sunday 0 (or 7); APScheduler 3 numbers Monday 0. Rewrite numeric
    weekday terms (``1-5``, ``0,6``, ``*/2``) as names, which both read the same way."""
    out: list[str] = []
    for part in field.split(","):
        base, _, step = part.partition("/")
        numeric = (base == "*" and step) or re.fullmatch(r"[0-7](-[0-7])?", base)
        if not numeric:
            out.append(part)
            continue
        if base != "*" and step and "-" not in base:  # N/S: from N to 7, as cron reads it
            base = f"{base}-7"
        first, _, last = ("0-6" if base == "*" else base).partition("-")
        days = list(range(int(first), int(last or first) + 1))
        if not days:
            raise ValueError(f"empty weekday range {base!r}")
        picked = days[::int(step)] if step else days
        out.extend(dict.fromkeys(_CRON_DAYS[d] for d in picked))
    return ",".join(dict.fromkeys(out))


class OnceCronTrigger(CronTrigger):
    """A CronTrigger whose fixed-time occurrences fire once on the night clocks go back.

    APScheduler fires ``30 1 * * *`` at both 01:30s of the repeated hour (the second one has
    ``fold=1``). Like Vixie cron, a job at a fixed time (neither minute nor hour starting with
    ``*``) fires at the first of them only; a wildcard job (``0 * * * *``, every hour) fires at
    both, as each is a new hour of real time.
    """

    def __init__(self, *args: Any, once: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.once = once

    def get_next_fire_time(self, previous_fire_time: datetime | None, now: datetime
                           ) -> datetime | None:
        fire = super().get_next_fire_time(previous_fire_time, now)
        while fire is not None and self.once and _second_of_two(fire):
            fire = super().get_next_fire_time(None, fire.astimezone(UTC)
                                              + timedelta(microseconds=1))
        return fire

    def __getstate__(self) -> dict[str, Any]:  # APScheduler's job store pickles triggers
        return {**super().__getstate__(), "once": self.once}

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        once = state.pop("once", True)
        super().__setstate__(state)
        self.once = once


def _second_of_two(local: datetime) -> bool:
    """The later of the two instants a wall-clock time names on the night clocks go back."""
    return local.fold == 1 and local.replace(fold=0).utcoffset() != local.utcoffset()


#: one comma-separated term of a crontab field: ``*``, a number or name, a range, a step
_CRON_TERM = re.compile(r"(?:\*|(?:\d+|[a-z]{3})(?:-(?:\d+|[a-z]{3}))?)(?:/\d+)?")


def cron_trigger(cron: str, timezone: str) -> BaseTrigger:
    """APScheduler's trigger for a crontab expression: five fields (minute hour day month
    weekday), or six with a leading seconds field (``*/10 * * * * *``: every 10 seconds).
    It means what crontab means: weekday numbers count from Sunday (0 and 7), not from
    Monday as in APScheduler 3; with both day of month and weekday restricted (neither
    starting with ``*``), a day that matches either fires (``0 1 1 * 1``: the 1st and every
    Monday), where APScheduler wants both; ``N/S`` steps from N to the field's end.

    Raises:
        InvalidWindow: the expression or the timezone is malformed.
    """
    tz = check_timezone(timezone)
    try:
        fields = cron.lower().split() if isinstance(cron, str) else []
        if len(fields) == 5:
            fields.insert(0, "0")
        if len(fields) != 6:
            raise ValueError(f"got {len(fields)} fields, expected 5 or 6")
        for field_ in fields:  # APScheduler reads a term's prefix: "mon#1" was Monday
            for term in field_.split(","):
                if not _CRON_TERM.fullmatch(term):
                    raise ValueError(f"{term!r} is not a crontab term")
        second, minute, hour, day, month, weekday = fields
        common: dict[str, Any] = {
            "second": second, "minute": minute, "hour": hour, "month": month, "timezone": tz,
            "once": not (minute.startswith("*") or hour.startswith("*"))}
        days = _crontab_weekdays(weekday)
        if day.startswith("*") or weekday.startswith("*"):
            return OnceCronTrigger(day=day, day_of_week=days, **common)
        return OrTrigger([OnceCronTrigger(day=day, day_of_week="*", **common),
                          OnceCronTrigger(day="*", day_of_week=days, **common)])
    except (ValueError, TypeError) as e:
        raise InvalidWindow(
            f"cron {cron!r} is not a crontab expression (seconds optional, then minute "
            f"hour day month weekday): {e}") from None


def _aware(value: datetime, tz: ZoneInfo, what: str) -> datetime:
    if not isinstance(value, datetime):
        raise InvalidWindow(f"{what} must be a date and time, got {value!r}")
    return (value.replace(tzinfo=tz) if value.tzinfo is None else value).astimezone(UTC)


def _tiers(values: Any) -> tuple[str, ...] | None:
    if values is None:
        return None
    if isinstance(values, str):
        values = [v for v in values.split(",") if v.strip()]
    out = []
    for value in values:
        try:
            out.append(Tier(str(value).strip()).value)
        except ValueError:
            raise InvalidWindow(
                f"unknown tier {value!r}; choose from interactive, nearline, offline") from None
    if not out:
        raise InvalidWindow("tiers must name at least one tier (leave it out to admit all)")
    return tuple(dict.fromkeys(out))


def _kinds(values: Any) -> tuple[str, ...] | None:
    if values is None:
        return None
    if isinstance(values, str):
        values = [v for v in values.split(",") if v.strip()]
    out = [str(v).strip() for v in values]
    if not out or any(not v for v in out):
        raise InvalidWindow("kinds must be non-empty names (leave it out to admit all)")
    return tuple(dict.fromkeys(out))


def _multiplier(value: Any) -> Decimal:
    try:
        number = Decimal(str(value))
    except InvalidOperation:
        raise InvalidWindow(f"price_multiplier {value!r} is not a number") from None
    if not number.is_finite() or number < 0 or number >= Decimal("1000000"):
        raise InvalidWindow(f"price_multiplier must be between 0 and 999999, got {value!r}")
    quantized = number.quantize(Decimal("0.0001"))  # rounded as stored, then checked again
    if quantized >= Decimal("1000000"):
        raise InvalidWindow(f"price_multiplier must be between 0 and 999999, got {value!r}")
    if number and not quantized:  # would make the window's compute free
        raise InvalidWindow(f"price_multiplier {value!r} rounds to 0 (4 decimal places); give "
                            "0 for free, or at least 0.0001")
    return quantized


@dataclass(frozen=True)
class WindowSpec:
    """One validated window. Build it with ``WindowSpec.build``."""

    name: str
    cron: str | None
    duration_s: int | None
    starts_at: datetime | None
    ends_at: datetime | None
    timezone: str
    tiers: tuple[str, ...] | None
    kinds: tuple[str, ...] | None
    slots: int | None
    price_multiplier: Decimal
    #: where it was defined: "database" (the CLI), "config" (the config file) or "built-in"
    source: str = "database"
    _trigger: BaseTrigger | None = field(default=None, compare=False, repr=False)

    @classmethod
    def build(cls, name: str, *, cron: str | None = None, duration: Any = None,
              starts_at: datetime | None = None, ends_at: datetime | None = None,
              timezone: str = "UTC", tiers: Any = None, kinds: Any = None,
              slots: int | None = None, price_multiplier: Any = "1",
              source: str = "database") -> WindowSpec:
        """Validate a definition.

        Raises:
            InvalidWindow: any field is malformed, or the window is neither a cron plus a
                duration nor a start plus an end.
        """
        if not isinstance(name, str) or not NAME_RE.fullmatch(name) or name == NO_WINDOW_NAME:
            raise InvalidWindow(
                f"invalid window name {name!r}: 1-64 letters, digits, '_', '.', '-' "
                f"(and not {NO_WINDOW_NAME!r}, which means no window)")
        tz = check_timezone(timezone)
        trigger = None
        duration_s = None
        if cron is not None:
            if starts_at is not None or ends_at is not None:
                raise InvalidWindow(f"window {name!r}: give a cron and a duration, or a start "
                                    "and an end, not both")
            if duration is None:
                raise InvalidWindow(f"window {name!r}: a cron window needs a duration")
            trigger = cron_trigger(cron, timezone)
            duration_s = parse_duration(duration)
        elif starts_at is not None and ends_at is not None:
            if duration is not None:
                raise InvalidWindow(f"window {name!r}: a one-off window has an end, not a "
                                    "duration")
            starts_at = _aware(starts_at, tz, "starts_at")
            ends_at = _aware(ends_at, tz, "ends_at")
            if ends_at <= starts_at:
                raise InvalidWindow(f"window {name!r}: ends_at must be after starts_at")
        else:
            raise InvalidWindow(f"window {name!r}: give a cron and a duration (recurring) or "
                                "starts_at and ends_at (one-off)")
        if slots is not None and (isinstance(slots, bool) or not isinstance(slots, int)
                                  or not 1 <= slots <= MAX_SLOTS):
            raise InvalidWindow(f"window {name!r}: slots must be a whole number from 1 to "
                                f"{MAX_SLOTS}")
        return cls(name=name, cron=cron, duration_s=duration_s, starts_at=starts_at,
                   ends_at=ends_at, timezone=timezone, tiers=_tiers(tiers), kinds=_kinds(kinds),
                   slots=slots, price_multiplier=_multiplier(price_multiplier), source=source,
                   _trigger=trigger)

    # --- when ----------------------------------------------------------------------------------

    def _fire_at_or_after(self, t: datetime) -> datetime | None:
        assert self._trigger is not None
        fire = self._trigger.get_next_fire_time(None, t)
        return None if fire is None else fire.astimezone(UTC)

    def opening(self, t: datetime) -> tuple[datetime, datetime] | None:
        """``(opened_at, closes_at)`` of the opening that contains ``t``; None when closed.

        Overlapping or touching occurrences of a cron window count as one opening.
        """
        t = t.astimezone(UTC)
        if self._trigger is None:
            assert self.starts_at is not None and self.ends_at is not None
            return (self.starts_at, self.ends_at) if self.starts_at <= t < self.ends_at else None
        assert self.duration_s is not None
        span = timedelta(seconds=self.duration_s)
        # Occurrences in (t - duration, t] keep the window open at t.
        first = self._fire_at_or_after(t - span + timedelta(microseconds=1))
        if first is None or first > t:
            return None
        opened = closes = first
        fire: datetime | None = first
        for _ in range(_MAX_STEPS):
            if fire is None or fire > closes:
                break
            closes = fire + span
            fire = self._fire_at_or_after(fire + timedelta(seconds=1))
        return opened, closes

    def is_open(self, t: datetime) -> bool:
        return self.opening(t) is not None

    def closes_at(self, t: datetime) -> datetime | None:
        """When the opening that contains ``t`` ends; None when closed at ``t``."""
        span = self.opening(t)
        return None if span is None else span[1]

    def opens_again(self, t: datetime) -> bool:
        """Whether the window is open at ``t`` or opens after it (cheap: no walk of its
        occurrences)."""
        t = t.astimezone(UTC)
        if self._trigger is None:
            assert self.ends_at is not None
            return t < self.ends_at
        assert self.duration_s is not None
        since = t - timedelta(seconds=self.duration_s) + timedelta(microseconds=1)
        return self._fire_at_or_after(since) is not None

    def next_open(self, t: datetime) -> datetime | None:
        """``t`` itself when open, else the next time it opens; None when it never will."""
        t = t.astimezone(UTC)
        if self.is_open(t):
            return t
        if self._trigger is None:
            assert self.starts_at is not None
            return self.starts_at if t < self.starts_at else None
        return self._fire_at_or_after(t)

    def openings(self, t: datetime, count: int) -> list[tuple[datetime, datetime]]:
        """The opening containing ``t`` (if any) and the next ones, up to ``count``."""
        out: list[tuple[datetime, datetime]] = []
        at: datetime | None = t.astimezone(UTC)
        while at is not None and len(out) < count:
            start = self.next_open(at)
            if start is None:
                break
            span = self.opening(start)
            if span is None:  # pragma: no cover - next_open returns an open instant
                break
            out.append(span)
            at = span[1]
        return out

    # --- what ----------------------------------------------------------------------------------

    def admits(self, tier: str, kind: str) -> bool:
        return (self.tiers is None or tier in self.tiers) and \
            (self.kinds is None or kind in self.kinds)

    def describe(self) -> str:
        if self.cron is not None:
            return f"cron '{self.cron}' {self.timezone}, {format_duration(self.duration_s or 0)}"
        assert self.starts_at is not None and self.ends_at is not None
        return f"{self.starts_at.isoformat()} to {self.ends_at.isoformat()}"

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name, "source": self.source, "cron": self.cron,
            "duration_s": self.duration_s, "timezone": self.timezone,
            "starts_at": self.starts_at.isoformat() if self.starts_at else None,
            "ends_at": self.ends_at.isoformat() if self.ends_at else None,
            "tiers": list(self.tiers) if self.tiers else None,
            "kinds": list(self.kinds) if self.kinds else None,
            "slots": self.slots, "price_multiplier": str(self.price_multiplier),
        }


def format_duration(seconds: int) -> str:
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return "".join(f"{v}{u}" for v, u in ((h, "h"), (m, "m"), (s, "s")) if v) or "0s"


#: The window a kind's ``window="offpeak"`` means when no config or CLI definition overrides
#: it: 01:00-06:00 UTC every night, offline work only, no slot cap, list price.
BUILTIN_WINDOWS: dict[str, WindowSpec] = {
    "offpeak": WindowSpec.build("offpeak", cron="0 1 * * *", duration="5h", timezone="UTC",
                                tiers=["offline"], source="built-in"),
}
