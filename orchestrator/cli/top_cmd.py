"""``orchestrator top``: every tier's live state, against its objective."""

from __future__ import annotations

import time

import redis
import typer
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from orchestrator.errors import ServiceUnavailable
from orchestrator.services import open_database
from orchestrator.settings import Settings
from orchestrator.top import RECENT_S, THROUGHPUT_S, Snapshot, snapshot

out = Console()


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
    w = snap.next_window
    if w is None:
        line = Text("windows: none defined")
    elif w.open_now:
        line = Text(f"window {w.name}: open now (since {w.opens_at:%Y-%m-%d %H:%M %Z})")
    else:
        wait = w.opens_at - snap.at
        hours, rest = divmod(int(wait.total_seconds()), 3600)
        line = Text(f"next window {w.name}: opens {w.opens_at:%Y-%m-%d %H:%M %Z} "
                    f"(in {hours}h{rest // 60:02d}m)")
    return Group(table, line)


def top(
    once: bool = typer.Option(False, "--once", help="print one frame and exit"),
    interval: float = typer.Option(2.0, "--interval", min=0.2, help="seconds between frames"),
) -> None:
    """Queue depth, in flight, throughput, queue-wait p95 against each tier's objective,
    sheds, preemptions, deferred work and the next window; refreshed live."""
    settings = Settings.from_env()
    engine = open_database(settings)
    client = redis.Redis.from_url(settings.redis_url(), socket_connect_timeout=5)
    try:
        try:
            client.ping()
        except redis.RedisError as e:
            raise ServiceUnavailable(f"Redis at {settings.redis_url()} does not answer: {e}"
                                     ) from e
        if once:
            out.print(render(snapshot(settings, engine, client)))
            return
        with Live(render(snapshot(settings, engine, client)), console=out,
                  refresh_per_second=4, screen=False) as live:
            while True:
                time.sleep(interval)
                live.update(render(snapshot(settings, engine, client)))
    finally:
        client.close()
        engine.dispose()
