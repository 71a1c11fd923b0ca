"""Recurring jobs: every occurrence of a schedule's cron submits one job.

Each occurrence submits with the idempotency key ``schedule:<name>:<occurrence, UTC ISO>`` under
the schedule's tenant, so a scheduler that restarts, or a second scheduler that fires the same
occurrence, gets the existing job back instead of a second one.

Missed occurrences **coalesce**: APScheduler keeps each schedule's next run time in the
database; after downtime it fires once, however late, and that run submits the *latest*
occurrence that is due (earlier missed ones are skipped, and logged). A schedule whose
submit is refused (its window was removed, a quota) logs the refusal; the next occurrence
tries again.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from apscheduler.triggers.base import BaseTrigger
from sqlalchemy import Engine, delete, insert, select, update
from sqlalchemy.exc import IntegrityError

from orchestrator.client import Client, JobHandle, _check_tenant, _parse_tier
from orchestrator.db.engine import reading
from orchestrator.db.models import schedules, utcnow
from orchestrator.errors import (
    AlreadyDefined,
    InvalidOption,
    InvalidSchedule,
    InvalidWindow,
    NotDefined,
    OrchestratorError,
    SubmitError,
)
from orchestrator.kinds import KindRegistry
from orchestrator.window_catalog import WindowCatalog
from orchestrator.windows import KIND_DEFAULT, NAME_RE, NO_WINDOW_NAME, cron_trigger

log = logging.getLogger(__name__)

_LOOKBACKS = (timedelta(minutes=2), timedelta(hours=3), timedelta(days=3), timedelta(days=40),
              timedelta(days=400), timedelta(days=3000))


@dataclass(frozen=True)
class ScheduleSpec:
    """A validated recurring schedule. ``window`` None: the kind's default; "none": no window."""

    name: str
    cron: str
    timezone: str
    kind: str
    payload: dict[str, Any]
    tier: str | None
    tenant: str
    window: str | None
    last_occurrence: datetime | None = None
    last_job_id: str | None = None

    def trigger(self) -> BaseTrigger:
        return cron_trigger(self.cron, self.timezone)

    def submit_window(self) -> Any:
        if self.window is None:
            return KIND_DEFAULT
        return None if self.window == NO_WINDOW_NAME else self.window

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "cron": self.cron, "timezone": self.timezone,
                "kind": self.kind, "payload": self.payload, "tier": self.tier,
                "tenant": self.tenant, "window": self.window,
                "last_occurrence": self.last_occurrence.isoformat()
                if self.last_occurrence else None, "last_job_id": self.last_job_id}


def occurrence_key(name: str, occurrence: datetime) -> str:
    return f"schedule:{name}:{occurrence.astimezone(UTC).isoformat()}"


def latest_occurrence(trigger: BaseTrigger, now: datetime) -> datetime | None:
    """The last time ``trigger`` fired at or before ``now`` (None: never, as far as 8 years)."""
    for lookback in _LOOKBACKS:
        fire = trigger.get_next_fire_time(None, now - lookback)
        if fire is None or fire > now:
            continue
        while True:  # stepped in UTC: local time + 1 s lost the fold of a repeated hour
            after = trigger.get_next_fire_time(None, fire.astimezone(UTC) + timedelta(seconds=1))
            if after is None or after > now:
                return fire.astimezone(UTC)
            fire = after
    return None


def build_schedule(name: str, *, cron: str, timezone: str = "UTC", kind: str,
                   payload: Any, tier: str | None = None, tenant: str = "default",
                   window: str | None = None, kinds: KindRegistry,
                   catalog: WindowCatalog | None = None) -> ScheduleSpec:
    """Validate a schedule as a submit would validate its job.

    Raises:
        InvalidSchedule: naming the field that is wrong.
    """
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise InvalidSchedule(f"invalid schedule name {name!r}: 1-64 letters, digits, '_', "
                              "'.', '-'")
    if isinstance(payload, str):
        try:
            payload = json.loads(payload)
        except json.JSONDecodeError as e:
            raise InvalidSchedule(f"schedule {name!r}: payload is not JSON: {e}") from None
    try:
        cron_trigger(cron, timezone)
        spec = kinds.get(kind)
        model = spec.validate(payload)
        if tier is not None:
            tier = _parse_tier(tier).value
        _check_tenant(tenant)
        if window is not None and window != NO_WINDOW_NAME and catalog is not None:
            target = catalog.get(window)
            chosen = tier or spec.tier.value
            if not target.admits(chosen, kind):
                raise InvalidOption(f"window {window!r} does not admit {chosen} {kind!r} jobs")
    except (InvalidWindow, SubmitError) as e:
        raise InvalidSchedule(f"schedule {name!r}: {e}") from e
    return ScheduleSpec(name=name, cron=cron, timezone=timezone, kind=kind,
                        payload=model.model_dump(mode="json"), tier=tier, tenant=tenant,
                        window=window)


class ScheduleStore:
    """The ``schedules`` table."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def add(self, spec: ScheduleSpec, *, now: datetime | None = None) -> None:
        """Raises: AlreadyDefined."""
        try:
            with self.engine.begin() as conn:
                conn.execute(insert(schedules).values(
                    name=spec.name, cron=spec.cron, timezone=spec.timezone, kind=spec.kind,
                    payload=spec.payload, tier=spec.tier, tenant=spec.tenant,
                    window=spec.window, created_at=now or utcnow()))
        except IntegrityError:
            raise AlreadyDefined(f"schedule {spec.name!r} already exists; remove it first"
                                 ) from None

    def remove(self, name: str) -> None:
        """Raises: NotDefined."""
        with self.engine.begin() as conn:
            if conn.execute(delete(schedules).where(schedules.c.name == name)).rowcount != 1:
                raise NotDefined(f"no schedule {name!r}")

    def all(self) -> list[ScheduleSpec]:
        with reading(self.engine) as conn:
            return [_spec(row) for row in conn.execute(select(schedules)
                                                       .order_by(schedules.c.name))]

    def get(self, name: str) -> ScheduleSpec | None:
        with reading(self.engine) as conn:
            row = conn.execute(select(schedules).where(schedules.c.name == name)).first()
        return None if row is None else _spec(row)

    def record(self, name: str, occurrence: datetime, job_id: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(update(schedules).where(schedules.c.name == name)
                         .values(last_occurrence=occurrence, last_job_id=job_id))


def _spec(row: Any) -> ScheduleSpec:
    return ScheduleSpec(name=row.name, cron=row.cron, timezone=row.timezone, kind=row.kind,
                        payload=row.payload, tier=row.tier, tenant=row.tenant,
                        window=row.window, last_occurrence=row.last_occurrence,
                        last_job_id=row.last_job_id)


def fire(client: Client, store: ScheduleStore, name: str, now: datetime | None = None
         ) -> JobHandle | None:
    """Submit the schedule's latest due occurrence (once, whoever calls); None when nothing is
    due or the submit was refused (logged)."""
    now = now or utcnow()
    spec = store.get(name)
    if spec is None:
        return None
    occurrence = latest_occurrence(spec.trigger(), now)
    if occurrence is None:
        return None
    if spec.last_occurrence is not None and occurrence > spec.last_occurrence:
        skipped = latest_occurrence(spec.trigger(), occurrence - timedelta(seconds=1))
        if skipped is not None and skipped > spec.last_occurrence:
            log.info("schedule %s: occurrences after %s coalesced into %s", name,
                     spec.last_occurrence.isoformat(), occurrence.isoformat())
    try:
        handle = client.submit(spec.kind, spec.payload, tier=spec.tier, tenant=spec.tenant,
                               idempotency_key=occurrence_key(name, occurrence),
                               window=spec.submit_window())
    except OrchestratorError as e:
        log.warning("schedule %s: occurrence %s was refused: %s", name,
                    occurrence.isoformat(), e)
        return None
    if handle.created:
        log.info("schedule %s: occurrence %s submitted job %s", name, occurrence.isoformat(),
                 handle.id)
    store.record(name, occurrence, handle.id)
    return handle
