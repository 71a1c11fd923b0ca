"""``orchestrator costs`` and ``orchestrator prices``: what work cost, and the price table."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import typer
from rich.table import Table

from orchestrator.cli._console import make_console
from orchestrator.costs import PriceTable
from orchestrator.costs.render import cost_csv, cost_html, cost_table, spend_chart
from orchestrator.costs.report import GROUPS, cost_report, daily_spend, parse_since
from orchestrator.errors import InvalidOption
from orchestrator.services import open_database
from orchestrator.settings import Settings
from orchestrator.tiers import TIER_ORDER

out = make_console()


def costs(
    by: str = typer.Option("tenant", "--by", help=f"group by: {', '.join(GROUPS)}"),
    since: str = typer.Option("7d", "--since", help="a span (7d, 12h, 30m, 2w) or a date"),
    tenant: str = typer.Option(None, "--tenant", help="only this tenant's jobs"),
    as_json: bool = typer.Option(False, "--json", help="the report as one JSON object"),
    as_csv: bool = typer.Option(False, "--csv", help="the report as CSV (total last)"),
    chart: bool = typer.Option(False, "--chart", help="also draw spend per day per tenant"),
    html_file: Path = typer.Option(None, "--html", help="also write a self-contained report",
                                   dir_okay=False, writable=True),
) -> None:
    """Jobs, items, CPU-hours, cost, queue-wait p95, retries and preemptions per group."""
    if by not in GROUPS:
        raise InvalidOption(f"--by {by!r}: choose from {', '.join(GROUPS)}")
    if as_json and as_csv:
        raise InvalidOption("choose one of --json and --csv")
    settings = Settings.from_env()
    prices = PriceTable.from_config(settings.config())
    now = datetime.now(UTC)
    start = parse_since(since, now)
    engine = open_database(settings)
    try:
        report = cost_report(engine, by=by, since=start, until=now, tenant=tenant,
                             currency=prices.currency)
        spend = daily_spend(engine, since=start, until=now, tenant=tenant) \
            if chart or html_file else {}
        if html_file is not None:
            extra = [cost_report(engine, by=other, since=start, until=now, tenant=tenant,
                                 currency=prices.currency)
                     for other in ("tenant", "kind", "tier") if other != by]
            html_file.write_text(cost_html([report, *extra], spend, prices))
    finally:
        engine.dispose()
    if as_json:
        typer.echo(json.dumps(report.to_json(), indent=2))
    elif as_csv:
        typer.echo(cost_csv(report), nl=False)
    else:
        out.print(cost_table(report))
        if chart:
            out.print(spend_chart(spend, prices.currency))
    if html_file is not None and not (as_json or as_csv):
        out.print(f"wrote {html_file}")


def prices(
    as_json: bool = typer.Option(False, "--json", help="the price table as JSON"),
) -> None:
    """The price table in force: per tier per CPU-hour and wall-hour, and per-model prices."""
    settings = Settings.from_env()
    table = PriceTable.from_config(settings.config())
    if as_json:
        typer.echo(json.dumps(table.to_json(), indent=2))
        return
    source = str(settings.config_file) if settings.config_file else "defaults (no config file)"
    tiers = Table(title=f"prices ({table.currency}) from {source}", header_style="bold")
    for column in ("tier", "per CPU-hour", "per wall-hour"):
        tiers.add_column(column, justify="left" if column == "tier" else "right")
    for tier in TIER_ORDER:
        tiers.add_row(tier.value, f"{table.cpu_hour[tier]}", f"{table.wall_hour[tier]}")
    out.print(tiers)
    if table.models:
        models = Table(title="per-model prices", header_style="bold")
        models.add_column("model")
        models.add_column("per 1,000 items", justify="right")
        for name, price in sorted(table.models.items()):
            models.add_row(name, f"{price.per_1k_items}")
        out.print(models)
    out.print("An attempt inside an off-peak window is charged at the window's multiplier.")
