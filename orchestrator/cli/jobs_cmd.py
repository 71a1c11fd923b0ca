"""``orchestrator jobs``: review jobs and their attempts."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime

import typer
from rich.table import Table

from orchestrator.cli._console import make_console
from orchestrator.costs import PriceTable
from orchestrator.costs.breakdown import explain
from orchestrator.costs.render import breakdown_text
from orchestrator.db.deferral import events
from orchestrator.db.models import JobState
from orchestrator.db.store import AttemptView, JobStore, JobView, utcnow
from orchestrator.errors import InvalidOption, JobNotFound, OrchestratorError
from orchestrator.results import decode_result
from orchestrator.services import open_database
from orchestrator.settings import Settings
from orchestrator.tiers import Tier
from orchestrator.window_catalog import WindowCatalog

app = typer.Typer(help="Review jobs.", no_args_is_help=True)
out = make_console()


@contextmanager
def _store(settings: Settings | None = None) -> Iterator[JobStore]:
    engine = open_database(settings or Settings.from_env())
    try:
        yield JobStore(engine)
    finally:
        engine.dispose()


def _fmt_time(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value else "-"


def _fmt_s(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


@app.command("list")
def list_jobs(
    state: str = typer.Option(None, help=f"one of: {', '.join(JobState.ALL)}"),
    tenant: str = typer.Option(None),
    kind: str = typer.Option(None),
    tier: str = typer.Option(None, help="interactive, nearline or offline"),
    window: str = typer.Option(None, help="only jobs that wait for (or ran in) this window"),
    limit: int = typer.Option(50, min=1, max=10_000),
    as_json: bool = typer.Option(False, "--json", help="one JSON array on stdout"),
) -> None:
    """List the newest jobs, filtered."""
    if state is not None and state not in JobState.ALL:
        raise InvalidOption(f"unknown state {state!r}; one of: {', '.join(JobState.ALL)}")
    if tier is not None and tier not in {t.value for t in Tier}:
        raise InvalidOption(f"unknown tier {tier!r}; choose from interactive, nearline, offline")
    with _store() as store:
        rows = store.find(state=state, tenant=tenant, kind=kind, tier=tier, limit=limit,
                          window=window)
    if as_json:
        typer.echo(json.dumps([row.to_json() for row in rows], indent=2))
        return
    table = Table(box=None, header_style="bold")
    for column in ("id", "tenant", "kind", "tier", "state", "window", "att", "created",
                   "queue s", "cpu s", "wall s"):
        table.add_column(column, justify="right" if column.endswith(" s") else "left")
    for job in rows:
        table.add_row(job.id, job.tenant, job.kind, job.tier, job.state, job.window or "-",
                      f"{job.attempts}/{job.max_attempts}", _fmt_time(job.created_at),
                      _fmt_s(job.queue_seconds), _fmt_s(job.cpu_seconds),
                      _fmt_s(job.wall_seconds))
    out.print(table)
    out.print(f"{len(rows)} job(s)")


@app.command("show")
def show(
    job_id: str = typer.Argument(..., help="the job's id"),
    as_json: bool = typer.Option(False, "--json", help="the job and its attempts as JSON"),
) -> None:
    """Show one job: state, timings, cost columns, result or error, and every attempt."""
    settings = Settings.from_env()
    prices = PriceTable.from_config(settings.config())
    with _store(settings) as store:
        job = store.get(job_id)
        if job is None:
            raise JobNotFound(job_id)
        tries = store.attempts(job_id)
        notes = events(store.engine, job_id)
        eligible = next_eligible(job, WindowCatalog(store.engine, settings), utcnow())
        breakdown = explain(store.engine, job_id, prices)
    if as_json:
        typer.echo(json.dumps({
            **job.to_json(), "next_eligible": eligible[0].isoformat() if eligible[0] else None,
            "eligibility": eligible[1],
            "attempt_log": [a.to_json() for a in tries],
            "events": [{"at": at.isoformat(), "event": ev, "detail": d} for at, ev, d in notes],
            "cost_breakdown": breakdown and breakdown.to_json(),
        }, indent=2))
        return
    _print_job(job, tries, eligible[1])
    if breakdown is not None:
        out.print(breakdown_text(breakdown, prices.currency))
    if notes:
        log = Table(title="events", header_style="bold")
        for column in ("at", "event", "detail"):
            log.add_column(column)
        for at, ev, detail in notes:
            log.add_row(_fmt_time(at), ev, detail or "")
        out.print(log)


def _print_job(job: JobView, tries: list[AttemptView], eligibility: str | None) -> None:
    table = Table(box=None, show_header=False)
    table.add_column(style="bold")
    table.add_column()
    rows = [
        ("id", job.id), ("tenant", job.tenant), ("kind", job.kind), ("tier", job.tier),
        ("state", job.state), ("attempts", f"{job.attempts} of {job.max_attempts}"),
        ("idempotency key", job.idempotency_key or "-"),
        ("created", _fmt_time(job.created_at)), ("queued", _fmt_time(job.queued_at)),
        ("started", _fmt_time(job.started_at)), ("finished", _fmt_time(job.finished_at)),
        ("deadline", _fmt_time(job.deadline)), ("lease until", _fmt_time(job.lease_expires_at)),
        ("queue seconds", _fmt_s(job.queue_seconds)), ("cpu seconds", _fmt_s(job.cpu_seconds)),
        ("wall seconds", _fmt_s(job.wall_seconds)), ("items", str(job.items)),
        ("cost", "-" if job.cost is None else f"{job.cost:f}"),
    ]
    if job.window:
        rows.append(("window", job.window))
    if eligibility:
        rows.append(("eligible", eligibility))
    if job.items_total is not None:
        rows.append(("progress", f"{job.items_done} / {job.items_total}"))
    if job.parent_id:
        rows.append(("parent", job.parent_id))
    rows.append(("payload", json.dumps(job.payload)[:500]))
    if job.result_ref:
        rows.append(("result file", job.result_ref))
    elif job.result is not None:
        value = decode_result(job.result)
        rows.append(("result", f"{value.dtype} array of shape {list(value.shape)}"
                     if hasattr(value, "shape") else json.dumps(value)[:500]))
    if job.error:
        rows.append(("error", job.error))
    for key, value in rows:
        table.add_row(key, value)
    out.print(table)
    if tries:
        log = Table(title="attempts", header_style="bold")
        for column in ("#", "worker", "started", "finished", "outcome", "cpu s", "wall s",
                       "error"):
            log.add_column(column)
        for a in tries:
            log.add_row(str(a.number), a.worker, _fmt_time(a.started_at),
                        _fmt_time(a.finished_at), a.outcome, _fmt_s(a.cpu_seconds),
                        _fmt_s(a.wall_seconds), (a.error or "")[:80])
        out.print(log)


def next_eligible(job: JobView, catalog: WindowCatalog, now: datetime
                  ) -> tuple[datetime | None, str | None]:
    """When a deferred job may next run, and a sentence saying so (None for other jobs)."""
    if job.state != JobState.DEFERRED or not job.window:
        return None, None
    try:
        window = catalog.get(job.window)
    except OrchestratorError as e:
        return None, f"never, until window {job.window} is defined ({e})"
    start = window.next_open(now)
    if start is None:
        return None, f"never: window {job.window} has closed for good"
    if start <= now:
        return now, (f"now: window {job.window} is open until "
                     f"{_fmt_time(window.closes_at(now))} UTC (waiting for a slot or the "
                     "scheduler's next tick)")
    return start, f"{_fmt_time(start)} UTC, when window {job.window} opens"


@app.command("cancel")
def cancel(job_id: str = typer.Argument(..., help="the job's id")) -> None:
    """Cancel a job that has not finished."""
    from orchestrator.client import Client

    with Client.from_env() as client:
        if client.cancel(job_id):
            out.print(f"cancelled {job_id}")
        else:
            out.print(f"{job_id} had already ended ({client.get(job_id).state})")
