"""Cost reports as a terminal table, CSV, a spend-over-time chart, and a self-contained page."""

from __future__ import annotations

import csv
import html
import io
from decimal import Decimal

from rich.table import Table
from rich.text import Text

from orchestrator.costs.breakdown import Breakdown
from orchestrator.costs.prices import PriceTable
from orchestrator.costs.report import CostReport, CostRow
from orchestrator.tiers import TIER_ORDER

COLUMNS = ("jobs", "items", "cpu_hours", "cost", "cost_per_job", "cost_per_1k_items",
           "queue_wait_p95_s", "retries", "preemptions")
#: Colours of tenants in charts, in order of first appearance (cycled).
PALETTE = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1",
           "#ff9da7", "#9c755f", "#bab0ac")
BAR_WIDTH = 48


def _cells(row: CostRow) -> list[str]:
    def money(value: Decimal | None) -> str:
        return "-" if value is None else f"{value:f}"

    return [
        str(row.jobs), str(row.items), f"{row.cpu_hours:.6f}", money(row.cost),
        money(row.cost_per_job), money(row.cost_per_1k_items),
        "-" if row.queue_wait_p95_s is None else f"{row.queue_wait_p95_s:.3f}",
        str(row.retries), str(row.preemptions),
    ]


def cost_table(report: CostReport) -> Table:
    tenant = f", tenant {report.tenant}" if report.tenant else ""
    table = Table(
        title=(f"cost by {report.by} ({report.currency}) since "
               f"{report.since:%Y-%m-%d %H:%M} UTC{tenant}"),
        header_style="bold", show_footer=True)
    footer = _cells(report.total)
    table.add_column(report.by, footer="total")
    for name, total in zip(COLUMNS, footer, strict=True):
        table.add_column(name.replace("_", " "), justify="right", footer=total)
    for row in report.rows:
        table.add_row(row.key, *_cells(row))
    return table


def cost_csv(report: CostReport) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([report.by, *COLUMNS])
    for row in [*report.rows, report.total]:
        data = row.to_json()
        writer.writerow([row.key, *("" if data[c] is None else data[c] for c in COLUMNS)])
    return out.getvalue()


def _colours(spend: dict[str, dict[str, Decimal]]) -> dict[str, str]:
    names = sorted({t for day in spend.values() for t in day})
    return {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(names)}


def spend_chart(spend: dict[str, dict[str, Decimal]], currency: str) -> Text:
    """One stacked bar per day, a segment per tenant, scaled to the busiest day."""
    text = Text()
    if not spend:
        text.append("no charged jobs in this period\n")
        return text
    colours = _colours(spend)
    peak = max(sum(day.values(), Decimal(0)) for day in spend.values()) or Decimal(1)
    text.append(f"spend per day ({currency}), per tenant\n", style="bold")
    for day, by_tenant in sorted(spend.items()):
        text.append(f"{day} ")
        drawn = 0
        for name, cost in sorted(by_tenant.items()):
            width = round(float(cost / peak) * BAR_WIDTH)
            text.append("█" * width, style=colours[name])
            drawn += width
        text.append(" " * max(BAR_WIDTH - drawn, 0))
        text.append(f" {sum(by_tenant.values(), Decimal(0)):f}\n")
    for name, colour in colours.items():
        text.append("■ ", style=colour)
        text.append(f"{name}  ")
    text.append("\n")
    return text


def _svg_chart(spend: dict[str, dict[str, Decimal]]) -> str:
    if not spend:
        return "<p>No charged jobs in this period.</p>"
    colours = _colours(spend)
    days = sorted(spend)
    peak = max(sum(d.values(), Decimal(0)) for d in spend.values()) or Decimal(1)
    bar, gap, height = 28, 10, 180
    width = len(days) * (bar + gap) + gap
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height + 40}" '
             'role="img" aria-label="spend per day per tenant">']
    for i, day in enumerate(days):
        x, y = gap + i * (bar + gap), float(height)
        for name, cost in sorted(spend[day].items()):
            h = float(cost / peak) * height
            y -= h
            parts.append(f'<rect x="{x}" y="{y:.1f}" width="{bar}" height="{h:.1f}" '
                         f'fill="{colours[name]}"><title>{html.escape(day)} '
                         f'{html.escape(name)}: {cost:f}</title></rect>')
        parts.append(f'<text x="{x + bar / 2}" y="{height + 14}" font-size="9" '
                     f'text-anchor="middle">{html.escape(day[5:])}</text>')
    parts.append("</svg>")
    legend = " ".join(f'<span style="color:{c}">&#9632;</span> {html.escape(n)}'
                      for n, c in colours.items())
    return "".join(parts) + f"<p>{legend}</p>"


def cost_html(reports: list[CostReport], spend: dict[str, dict[str, Decimal]],
              prices: PriceTable) -> str:
    """A page with no outside references: styles and the chart inline."""
    first = reports[0]
    sections = []
    for report in reports:
        head = "".join(f"<th>{html.escape(c.replace('_', ' '))}</th>" for c in COLUMNS)
        body = "".join(
            f"<tr><td>{html.escape(row.key)}</td>"
            + "".join(f"<td>{html.escape(cell)}</td>" for cell in _cells(row)) + "</tr>"
            for row in report.rows)
        total = "".join(f"<td>{html.escape(c)}</td>" for c in _cells(report.total))
        sections.append(
            f"<h2>By {html.escape(report.by)}</h2><table><thead><tr>"
            f"<th>{html.escape(report.by)}</th>{head}</tr></thead><tbody>{body}</tbody>"
            f"<tfoot><tr><td>total</td>{total}</tr></tfoot></table>")
    price_rows = "".join(
        f"<tr><td>{t.value}</td><td>{prices.cpu_hour[t]}</td><td>{prices.wall_hour[t]}</td></tr>"
        for t in TIER_ORDER)
    tenant = f" &middot; tenant {html.escape(first.tenant)}" if first.tenant else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Orchestrator cost report</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin-bottom: 1.5em; }}
th, td {{ padding: 4px 10px; border-bottom: 1px solid #ddd; text-align: right; }}
th:first-child, td:first-child {{ text-align: left; }}
tfoot td {{ font-weight: bold; border-top: 2px solid #888; }}
</style></head><body>
<h1>Cost report</h1>
<p>{first.since:%Y-%m-%d %H:%M} to {first.until:%Y-%m-%d %H:%M} UTC &middot;
currency {html.escape(first.currency)}{tenant}. Totals are the exact sums of the job costs.</p>
<h2>Spend per day, per tenant</h2>
{_svg_chart(spend)}
{''.join(sections)}
<h2>Prices per hour</h2>
<table><thead><tr><th>tier</th><th>CPU-hour</th><th>wall-hour</th></tr></thead>
<tbody>{price_rows}</tbody></table>
</body></html>
"""


def breakdown_text(b: Breakdown, currency: str) -> Table:
    """``jobs show``: each attempt's charge, the item charge, and the total."""
    title = f"cost ({currency}): {'-' if b.cost is None else f'{b.cost:f}'}"
    table = Table(title=title, header_style="bold")
    for column in ("", "cpu s", "wall s", "window", "multiplier", "cost"):
        table.add_column(column, justify="left" if column in ("", "window") else "right")
    for a in b.attempts:
        table.add_row(
            f"attempt {a.number} ({a.outcome})",
            "-" if a.cpu_seconds is None else f"{a.cpu_seconds:.6f}",
            "-" if a.wall_seconds is None else f"{a.wall_seconds:.6f}",
            a.window or "-", "1 (peak)" if a.multiplier is None else f"{a.multiplier:f}",
            "-" if a.cost is None else f"{a.cost:f}")
    if b.item_charge is not None:
        table.add_row(f"{b.items} item(s) of model {b.model or '-'}", "", "", "", "",
                      f"{b.item_charge:f}")
    if b.chunks:
        table.add_row(f"{b.chunks_charged} of {b.chunks} chunks charged", "", "", "", "",
                      "-" if b.cost is None else f"{b.cost:f}")
    table.caption = (
        f"{b.tier} tier: {b.cpu_hour_price} per CPU-hour, {b.wall_hour_price} per wall-hour "
        "(prices now); an attempt costs (cpu s x CPU-hour price + wall s x wall-hour price) "
        "/ 3600 x multiplier, rounded half-even to 1e-8")
    if b.batch_id is not None:
        share = "-" if b.batch_share is None else f"{100 * b.batch_share:.1f}%"
        table.caption += (f"; ran in batch {b.batch_id} of {b.batch_size} job(s), "
                          f"with {share} of its CPU")
    return table
