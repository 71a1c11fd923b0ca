"""``orchestrator windows``: off-peak windows (CLI-defined, config-file and built-in)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime

import typer
from rich.table import Table

from orchestrator.cli._console import make_console
from orchestrator.db.deferral import deferred_counts
from orchestrator.db.store import utcnow
from orchestrator.errors import InvalidWindow
from orchestrator.services import open_database
from orchestrator.settings import Settings
from orchestrator.window_catalog import WindowCatalog
from orchestrator.windows import WindowSpec

app = typer.Typer(help="Off-peak windows: when deferred work may run.", no_args_is_help=True)
out = make_console()


@contextmanager
def _catalog() -> Iterator[WindowCatalog]:
    settings = Settings.from_env()
    engine = open_database(settings)
    try:
        yield WindowCatalog(engine, settings, ttl_s=0)
    finally:
        engine.dispose()


def _when(value: str | None, what: str) -> datetime | None:
    if value is None:
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        raise InvalidWindow(f"--{what} {value!r} is not an ISO date and time "
                            "(e.g. 2026-12-24T22:00, read in --timezone)") from None


def _fmt(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S UTC") if value else "-"


@app.command("add")
def add(
    name: str = typer.Argument(..., help="the window's name"),
    cron: str = typer.Option(None, help="when it opens: crontab (5 fields, or 6 with seconds)"),
    duration: str = typer.Option(None, help="how long it stays open: e.g. 5h, 90m, 3600"),
    starts_at: str = typer.Option(None, "--starts-at", help="one-off window: ISO start"),
    ends_at: str = typer.Option(None, "--ends-at", help="one-off window: ISO end"),
    timezone: str = typer.Option("UTC", help="IANA timezone of the cron and of naive dates"),
    tiers: str = typer.Option(None, help="tiers it admits, comma-separated (default: all)"),
    kinds: str = typer.Option(None, help="kinds it admits, comma-separated (default: all)"),
    slots: int = typer.Option(None, help="most of its jobs running at once (default: no cap)"),
    price_multiplier: str = typer.Option("1", "--price-multiplier",
                                         help="compute price factor inside it, e.g. 0.6"),
) -> None:
    """Define a window, e.g. `--cron '0 1 * * *' --duration 5h --timezone Europe/London`."""
    spec = WindowSpec.build(name, cron=cron, duration=duration,
                            starts_at=_when(starts_at, "starts-at"),
                            ends_at=_when(ends_at, "ends-at"), timezone=timezone, tiers=tiers,
                            kinds=kinds, slots=slots, price_multiplier=price_multiplier)
    with _catalog() as catalog:
        catalog.add(spec)
        now = utcnow()
        out.print(f"window {name}: {spec.describe()}; next open {_fmt(spec.next_open(now))}",
                  highlight=False, soft_wrap=True)


@app.command("list")
def list_windows(as_json: bool = typer.Option(False, "--json", help="JSON on stdout")) -> None:
    """Every window with its source, whether it is open now, and when it next opens/closes."""
    with _catalog() as catalog:
        found = catalog.all()
        waiting = deferred_counts(catalog.engine)
    now = utcnow()
    if as_json:
        typer.echo(json.dumps([{**w.to_json(), "open": w.is_open(now),
                                "next_open": _iso(w.next_open(now)),
                                "closes_at": _iso(w.closes_at(now)),
                                "deferred": waiting.get(n, 0)}
                               for n, w in sorted(found.items())], indent=2))
        return
    table = Table(box=None, header_style="bold")
    for column in ("name", "source", "when", "tiers", "kinds", "slots", "price x", "open",
                   "next open", "closes", "deferred"):
        table.add_column(column)
    for name, w in sorted(found.items()):
        table.add_row(name, w.source, w.describe(), ",".join(w.tiers or ("all",)),
                      ",".join(w.kinds or ("all",)), str(w.slots or "-"),
                      str(w.price_multiplier.normalize()), "yes" if w.is_open(now) else "no",
                      _fmt(w.next_open(now)), _fmt(w.closes_at(now)), str(waiting.get(name, 0)))
    out.print(table)


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


@app.command("show")
def show(name: str = typer.Argument(...),
         count: int = typer.Option(5, min=1, max=100, help="upcoming openings to list")) -> None:
    """One window: its definition, the next openings, and how many jobs wait for it."""
    with _catalog() as catalog:
        w = catalog.get(name)
        waiting = deferred_counts(catalog.engine).get(name, 0)
    now = utcnow()
    out.print(f"[bold]{name}[/bold] ({w.source}): {w.describe()}", soft_wrap=True)
    out.print(f"tiers {','.join(w.tiers or ('all',))}; kinds {','.join(w.kinds or ('all',))}; "
              f"slots {w.slots or 'no cap'}; price multiplier {w.price_multiplier.normalize()}",
              highlight=False)
    out.print(f"open now: {'yes, until ' + _fmt(w.closes_at(now)) if w.is_open(now) else 'no'}; "
              f"deferred jobs: {waiting}", highlight=False)
    for start, end in w.openings(now, count):
        out.print(f"  {_fmt(start)} -> {_fmt(end)}", highlight=False)


@app.command("remove")
def remove(name: str = typer.Argument(...)) -> None:
    """Remove a CLI-defined window that no unfinished job names."""
    with _catalog() as catalog:
        catalog.remove(name)
    out.print(f"removed window {name}")
