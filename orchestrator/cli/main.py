"""``orchestrator``: the admin command line."""

from __future__ import annotations

import logging
import sys
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape

from orchestrator.cli import (
    costs_cmd,
    db_cmd,
    demo_cmd,
    jobs_cmd,
    metrics_cmd,
    models_cmd,
    scheduler_cmd,
    schedules_cmd,
    tenants_cmd,
    top_cmd,
    windows_cmd,
    worker_cmd,
)
from orchestrator.errors import OrchestratorError

app = typer.Typer(
    name="orchestrator",
    help="Tiered workload orchestrator for AI batch and offline work (Celery + Redis).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(db_cmd.app, name="db")
app.add_typer(jobs_cmd.app, name="jobs")
app.add_typer(metrics_cmd.app, name="metrics")
app.add_typer(models_cmd.app, name="models")
app.add_typer(tenants_cmd.app, name="tenants")
app.add_typer(windows_cmd.app, name="windows")
app.add_typer(schedules_cmd.app, name="schedules")
app.command("worker")(worker_cmd.worker)
app.command("scheduler")(scheduler_cmd.scheduler)
app.command("demo")(demo_cmd.demo)
app.command("costs")(costs_cmd.costs)
app.command("prices")(costs_cmd.prices)
app.command("top")(top_cmd.top)

err = Console(stderr=True)


def main() -> None:
    """Console-script entry point: every orchestrator error is one line and exit code 1."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        app(standalone_mode=False)
    except OrchestratorError as e:
        err.print(f"[red]error:[/red] {escape(str(e))}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except (typer.Abort, KeyboardInterrupt):
        err.print("aborted")
        sys.exit(130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except Exception as e:
        # Usage errors: Typer >= 0.29 raises its bundled click's ClickException, not click's,
        # so recognise it by what it does rather than by class.
        usage: Any = e
        if callable(getattr(usage, "show", None)) and isinstance(
                getattr(usage, "exit_code", None), int):
            usage.show()
            sys.exit(usage.exit_code)
        raise
