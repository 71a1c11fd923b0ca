"""``orchestrator worker``: a Celery worker serving tiers in strict order."""

from __future__ import annotations

import typer

from orchestrator.errors import ConfigurationError
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
        None, "--hostname", "-n", help="worker name (default: tiers@host)"),
) -> None:
    """Start a worker: e.g. `--tiers interactive` for reserved interactive capacity."""
    from workers.app import run_worker

    try:
        chosen = parse_tiers(tiers)
    except ValueError as e:
        raise ConfigurationError(str(e)) from e
    raise typer.Exit(run_worker(Settings.from_env(), chosen, concurrency,
                                loglevel=loglevel, hostname=hostname))
