"""``orchestrator scheduler``: windows, recurring jobs and the reconciler (one acts at a time)."""

from __future__ import annotations

import signal
import threading
from types import FrameType

import typer


def scheduler(
    holder: str = typer.Option(None, "--name", help="this scheduler's name in the lease "
                               "(default: host:pid:<random id>)"),
    metrics_port: int = typer.Option(None, "--metrics-port", min=1, max=65535,
                                     help="serve the scheduler's Prometheus metrics (window "
                                     "releases, re-publishes, lease) on this port"),
) -> None:
    """Run the scheduler until SIGTERM/SIGINT; a second one waits for the lease."""
    from orchestrator.metrics import SchedulerMetrics
    from orchestrator.scheduler.process import SchedulerProcess
    from orchestrator.settings import Settings

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    settings = Settings.from_env()
    process = SchedulerProcess(settings, holder=holder)
    server = None
    if metrics_port is not None:
        from prometheus_client import start_http_server

        # Its own counters only: the deployment gauges are the `metrics serve` exporter's (one
        # per deployment); served here too, Prometheus scraped them twice and sums doubled.
        process.metrics = SchedulerMetrics()
        server, _ = start_http_server(metrics_port, registry=process.metrics.registry)
    try:
        process.run(stop)
    finally:
        if server is not None:
            server.shutdown()
