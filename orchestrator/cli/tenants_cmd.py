"""``orchestrator tenants``: fair-share weights and quotas per tenant."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from decimal import Decimal
from typing import Any

import redis
import typer
from rich.table import Table

from orchestrator.cli._console import make_console
from orchestrator.client import _check_tenant
from orchestrator.errors import InvalidOption
from orchestrator.quotas import KEEP, RateRule, TenantQuotas, TenantStore, parse_budget
from orchestrator.services import open_database
from orchestrator.settings import Settings
from orchestrator.tiers import TIER_ORDER

app = typer.Typer(help="Tenants: fair-share weight and quotas.", no_args_is_help=True)
out = make_console()

_OFF = ("none", "off")


@contextmanager
def _tenants() -> Iterator[TenantStore]:
    settings = Settings.from_env()
    engine = open_database(settings)
    # Changes bump a version in Redis so running clients re-read quotas at their next submit.
    client = redis.Redis.from_url(settings.redis_url(), socket_connect_timeout=2,
                                  socket_timeout=2)
    try:
        yield TenantStore(engine, client)
    finally:
        client.close()
        engine.dispose()


def _number(text: str | None, name: str, kind: type[int] | type[float]) -> Any:
    """None when the option was not given, a value to store, or None to clear ('none')."""
    if text is None:
        return KEEP
    if text.strip().lower() in _OFF:
        return None
    try:
        return kind(text)
    except ValueError:
        raise InvalidOption(f"--{name} {text!r} is not a number (or 'none' to remove it)"
                            ) from None


def _inflight_caps(pairs: list[str]) -> dict[str, int | None]:
    caps: dict[str, int | None] = {}
    for pair in pairs:
        tier, sep, value = pair.partition("=")
        if not sep:
            raise InvalidOption(f"--max-inflight {pair!r}: write TIER=N, e.g. interactive=50")
        number = _number(value, "max-inflight", int)
        caps[tier.strip()] = number
    return caps


@app.command("set")
def set_tenant(
    name: str = typer.Argument(..., help="the tenant"),
    weight: int = typer.Option(None, "--weight", min=1, help="fair-share weight of bulk work"),
    max_inflight: list[str] = typer.Option(
        None, "--max-inflight", metavar="TIER=N",
        help="most submissions deferred, queued or running in a tier (repeat per tier; "
             "N=none removes)"),
    rate: str = typer.Option(None, "--rate", help="submissions per second ('none' removes)"),
    burst: str = typer.Option(None, "--burst", help="submissions at once (default: the rate)"),
    budget: str = typer.Option(None, "--budget", help="cost per calendar month ('none' removes)"),
) -> None:
    """Create a tenant or change its weight and quotas; options not given stay as they are."""
    _check_tenant(name)
    new_rate = _number(rate, "rate", float)
    new_burst = _number(burst, "burst", int)
    if new_rate is None and burst is None:
        new_burst = None  # a burst means nothing without its rate
    new_budget: Decimal | Any | None = KEEP
    if budget is not None:
        new_budget = None if budget.strip().lower() in _OFF else parse_budget(budget)
    with _tenants() as store:
        quotas = store.set(
            name, weight=KEEP if weight is None else weight,
            max_inflight=_inflight_caps(max_inflight or []),
            rate_per_s=new_rate, burst=new_burst, monthly_budget=new_budget,
        )
    out.print(f"tenant {name}: {_describe(quotas)}", highlight=False, soft_wrap=True)


def _describe(q: TenantQuotas) -> str:
    caps = ", ".join(f"{t}={n}" for t, n in sorted(q.max_inflight.items())) or "none"
    rate = "none"
    if q.rate_per_s is not None:
        rate = RateRule.of(q.rate_per_s, q.burst).describe()
    budget = "none" if q.monthly_budget is None else str(q.monthly_budget.normalize())
    return f"weight {q.weight}; max in flight {caps}; rate {rate}; monthly budget {budget}"


@app.command("list")
def list_tenants(
    as_json: bool = typer.Option(False, "--json", help="one JSON array on stdout"),
) -> None:
    """List tenants with their quotas, in-flight submissions per tier, and spend this month."""
    with _tenants() as store:
        rows = store.all()
        inflight = store.inflight_by_tier()
        spent = {q.name: store.spend(q.name) for q in rows}
    if as_json:
        typer.echo(json.dumps([
            {**q.to_json(),
             "inflight": {t.value: inflight.get(q.name, {}).get(t.value, 0) for t in TIER_ORDER},
             "spent_this_month": str(spent[q.name])}
            for q in rows
        ], indent=2))
        return
    table = Table(box=None, header_style="bold")
    for column in ("tenant", "weight", *(f"{t.value} in flight" for t in TIER_ORDER),
                   "rate/s", "burst", "budget", "spent"):
        table.add_column(column)
    for q in rows:
        now = inflight.get(q.name, {})
        table.add_row(
            q.name, str(q.weight),
            *(f"{now.get(t.value, 0)}/{q.max_inflight.get(t.value, '-')}" for t in TIER_ORDER),
            "-" if q.rate_per_s is None else f"{q.rate_per_s:g}",
            "-" if q.burst is None else str(q.burst),
            "-" if q.monthly_budget is None else str(q.monthly_budget.normalize()),
            str(spent[q.name].normalize()),
        )
    out.print(table)
    out.print(f"{len(rows)} tenant(s)")
