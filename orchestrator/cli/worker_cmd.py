"""``orchestrator worker``: a Celery worker serving tiers in strict order."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import typer

from orchestrator.errors import ConfigurationError
from orchestrator.metrics import ENV as METRICS_ENV
from orchestrator.metrics import prepare_multiprocess_dir
from orchestrator.settings import Settings
from orchestrator.tiers import parse_tiers


def worker(
    tiers: str = typer.Option(
        "interactive,nearline,offline", "--tiers", "-t",
        help="tiers to serve, most urgent first; a free slot always takes the first that waits",
    ),
    concurrency: int = typer.Option(
        2, "--concurrency", "-c", min=1, help="pool processes (job slots)"),
    loglevel: str = typer.Option("INFO", "--loglevel", "-l", help="Celery log level"),
    hostname: str = typer.Option(
        None, "--hostname", "-n", help="worker name (default: <tiers>-<pid>@<host>)"),
    metrics_port: int = typer.Option(
        None, "--metrics-port", min=1, max=65535,
        help="serve the pool's Prometheus metrics on this port (/metrics)"),
    metrics_dir: Path = typer.Option(
        None, "--metrics-dir", file_okay=False,
        help="multiprocess metrics directory, emptied at start (default: "
             "$PROMETHEUS_MULTIPROC_DIR, else a private temporary one)"),
) -> None:
    """Start a worker: e.g. `--tiers interactive` for reserved interactive capacity."""
    try:
        chosen = parse_tiers(tiers)
    except ValueError as e:
        raise ConfigurationError(str(e)) from e
    settings = Settings.from_env()
    private = None
    if metrics_port is not None:
        # Before the worker imports prometheus_client and forks its pool.
        had_dir = bool(metrics_dir or os.environ.get(METRICS_ENV))
        chosen_dir = prepare_multiprocess_dir(metrics_dir)
        private = None if had_dir else chosen_dir
    from workers.app import run_worker

    try:
        code = run_worker(settings, chosen, concurrency, loglevel=loglevel, hostname=hostname,
                          metrics_port=metrics_port)
    finally:
        if private is not None:
            shutil.rmtree(private, ignore_errors=True)
    raise typer.Exit(code)
