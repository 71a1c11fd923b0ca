"""``orchestrator scheduler``: windows, recurring jobs and the reconciler (one acts at a time)."""

from __future__ import annotations

import signal
import threading
from types import FrameType

import typer


def scheduler(
    holder: str = typer.Option(None, "--name", help="this scheduler's name in the lease "
                               "(default: host:pid)"),
) -> None:
    """Run the scheduler until SIGTERM/SIGINT; a second one waits for the lease."""
    from orchestrator.scheduler.process import SchedulerProcess
    from orchestrator.settings import Settings

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    SchedulerProcess(Settings.from_env(), holder=holder).run(stop)
