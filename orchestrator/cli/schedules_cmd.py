"""``orchestrator schedules``: recurring jobs (the scheduler submits one per occurrence)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager

import typer
from rich.table import Table

from orchestrator.cli._console import make_console
from orchestrator.db.store import utcnow
from orchestrator.kinds import registry
from orchestrator.scheduler.recurring import ScheduleStore, build_schedule
from orchestrator.services import open_database
from orchestrator.settings import Settings
from orchestrator.window_catalog import WindowCatalog

app = typer.Typer(help="Recurring jobs on a cron schedule.", no_args_is_help=True)
out = make_console()


@contextmanager
def _stores() -> Iterator[tuple[ScheduleStore, WindowCatalog, Settings]]:
    settings = Settings.from_env()
    engine = open_database(settings)
    try:
        yield ScheduleStore(engine), WindowCatalog(engine, settings, ttl_s=0), settings
    finally:
        engine.dispose()


@app.command("add")
def add(
    name: str = typer.Argument(..., help="the schedule's name"),
    cron: str = typer.Option(..., help="crontab: when each occurrence is (5 or 6 fields)"),
    kind: str = typer.Option(..., help="the job kind to submit"),
    payload: str = typer.Option("{}", help="the job's payload, JSON"),
    timezone: str = typer.Option("UTC", help="IANA timezone of the cron"),
    tier: str = typer.Option(None, help="tier (default: the kind's)"),
    tenant: str = typer.Option("default", help="tenant the jobs belong to"),
    window: str = typer.Option(None, help="window to wait for; 'none' runs at once "
                               "(default: the kind's window)"),
) -> None:
    """Define a recurring job, e.g. a nightly re-index at 01:30 waiting for `offpeak`."""
    with _stores() as (store, catalog, settings):
        kinds = registry.load(settings.all_imports())
        spec = build_schedule(name, cron=cron, timezone=timezone, kind=kind, payload=payload,
                              tier=tier, tenant=tenant, window=window, kinds=kinds,
                              catalog=catalog)
        store.add(spec)
    nxt = spec.trigger().get_next_fire_time(None, utcnow())
    out.print(f"schedule {name}: {kind} at cron '{cron}' {timezone}; next occurrence "
              f"{nxt.isoformat() if nxt else 'never'}", highlight=False, soft_wrap=True)


@app.command("list")
def list_schedules(as_json: bool = typer.Option(False, "--json", help="JSON on stdout")) -> None:
    """Every schedule with its next occurrence and the last job it submitted."""
    with _stores() as (store, _, _s):
        found = store.all()
    now = utcnow()
    if as_json:
        typer.echo(json.dumps([s.to_json() for s in found], indent=2))
        return
    table = Table(box=None, header_style="bold")
    for column in ("name", "cron", "tz", "kind", "tier", "tenant", "window", "next",
                   "last occurrence", "last job"):
        table.add_column(column)
    for s in found:
        nxt = s.trigger().get_next_fire_time(None, now)
        table.add_row(s.name, s.cron, s.timezone, s.kind, s.tier or "(kind)", s.tenant,
                      s.window or "(kind)", nxt.isoformat() if nxt else "-",
                      s.last_occurrence.isoformat() if s.last_occurrence else "-",
                      s.last_job_id or "-")
    out.print(table)


@app.command("remove")
def remove(name: str = typer.Argument(...)) -> None:
    """Remove a schedule (jobs it already submitted are not touched)."""
    with _stores() as (store, _, _s):
        store.remove(name)
    out.print(f"removed schedule {name}")
