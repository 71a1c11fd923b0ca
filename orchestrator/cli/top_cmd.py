"""``orchestrator top``: every tier's live state, against its objective."""

from __future__ import annotations

import time

import typer
from rich.console import Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from orchestrator.cli._console import make_console
from orchestrator.services import Services
from orchestrator.settings import Settings
from orchestrator.top import RECENT_S, THROUGHPUT_S, Snapshot, snapshot

out = make_console()


def render(snap: Snapshot) -> Group:
    table = Table(title=f"orchestrator top  {snap.at:%Y-%m-%d %H:%M:%S} UTC",
                  header_style="bold")
    for column in ("tier", "queued", "in flight", "slots", f"done/s ({THROUGHPUT_S}s)",
                   f"wait p95 ({RECENT_S // 60}m)", "objective", "sheds",
                   f"preempted ({RECENT_S // 60}m)", "deferred"):
        table.add_column(column, justify="left" if column == "tier" else "right")
    for t in snap.tiers:
        p95 = "-" if t.wait_p95_s is None else f"{t.wait_p95_s * 1000:.0f} ms"
        objective = "off" if not t.objective_s else f"{t.objective_s * 1000:.0f} ms"
        status = Text(p95, style="bold red" if t.over_objective else "green"
                      if t.objective_s and t.wait_p95_s is not None else "")
        table.add_row(t.tier, str(t.queued), str(t.in_flight), str(t.slots),
                      f"{t.throughput_per_s:.2f}", status, objective, str(t.sheds),
                      str(t.preemptions), str(t.deferred))
    lines: list[Text] = []
    for w in snap.windows:
        if w.open_now:
            lines.append(Text(f"window {w.name}: open now (since {w.opens_at:%Y-%m-%d %H:%M %Z})"))
        else:
            hours, rest = divmod(int((w.opens_at - snap.at).total_seconds()), 3600)
            lines.append(Text(f"next window {w.name}: opens {w.opens_at:%Y-%m-%d %H:%M %Z} "
                              f"(in {hours}h{rest // 60:02d}m)"))
    if not lines:
        lines.append(Text("windows: none will open again"))
    return Group(table, *lines)


def top(
    once: bool = typer.Option(False, "--once", help="print one frame and exit"),
    interval: float = typer.Option(2.0, "--interval", min=0.2, help="seconds between frames"),
) -> None:
    """Queue depth, in flight, throughput, queue-wait p95 against each tier's objective,
    sheds, preemptions, deferred work and the next window; refreshed live."""
    settings = Settings.from_env()
    services = Services.open(settings)  # attaches the embedded Redis when it is the broker
    engine, client = services.engine, services.redis
    try:
        if once:
            out.print(render(snapshot(settings, engine, client)))
            return
        with Live(render(snapshot(settings, engine, client)), console=out,
                  refresh_per_second=4, screen=False) as live:
            while True:
                time.sleep(interval)
                live.update(render(snapshot(settings, engine, client)))
    finally:
        services.close()
