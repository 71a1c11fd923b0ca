"""``orchestrator db``: schema migrations."""

from __future__ import annotations

import typer

from orchestrator.cli._console import make_console
from orchestrator.db import migrate
from orchestrator.db.engine import make_engine
from orchestrator.settings import Settings

app = typer.Typer(help="Database schema.", no_args_is_help=True)
out = make_console()


@app.command()
def upgrade(revision: str = typer.Argument("head", help="target revision")) -> None:
    """Migrate the database (ORCH_DATABASE_URL, or the embedded SQLite file) to REVISION."""
    settings = Settings.from_env()
    url = settings.resolved_database_url()
    migrate.upgrade(url, revision)
    engine = make_engine(url)
    try:
        rev = migrate.current_revision(engine)
    finally:
        engine.dispose()
    out.print(f"database at revision {rev}: {engine.url.render_as_string(hide_password=True)}")


@app.command()
def current() -> None:
    """Print the database's schema revision and the newest one this version ships."""
    settings = Settings.from_env()
    engine = make_engine(settings.resolved_database_url())
    try:
        rev = migrate.current_revision(engine)
    finally:
        engine.dispose()
    out.print(f"current: {rev or 'none'}  head: {migrate.head_revision()}")
