"""Run the Alembic migrations that ship inside the package."""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, inspect

import migrations
from orchestrator.db.engine import make_engine, normalize_url


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(Path(migrations.__file__).parent))
    config.set_main_option("sqlalchemy.url", normalize_url(url).replace("%", "%%"))
    return config


def upgrade(url: str, revision: str = "head") -> None:
    """Bring the database at ``url`` up to ``revision`` (creating the SQLite file if needed)."""
    engine = make_engine(url)
    try:
        with _connection(engine) as conn:
            config = alembic_config(url)
            config.attributes["connection"] = conn
            command.upgrade(config, revision)
    finally:
        engine.dispose()


def downgrade(url: str, revision: str) -> None:
    engine = make_engine(url)
    try:
        with _connection(engine) as conn:
            config = alembic_config(url)
            config.attributes["connection"] = conn
            command.downgrade(config, revision)
    finally:
        engine.dispose()


def _connection(engine: Engine) -> AbstractContextManager[Connection]:
    """SQLite migrates in one transaction (its ``BEGIN IMMEDIATE`` keeps a second process
    out); PostgreSQL in one transaction per revision, which lets a revision build an index
    ``CONCURRENTLY`` outside any (Alembic's ``autocommit_block``)."""
    return engine.begin() if engine.dialect.name == "sqlite" else engine.connect()


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at, or None when it was never migrated."""
    with engine.connect() as conn:
        if not inspect(conn).has_table("alembic_version"):
            return None
        row = conn.exec_driver_sql("SELECT version_num FROM alembic_version").first()
        return row[0] if row else None


def head_revision() -> str | None:
    """The newest revision that ships with this version."""
    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()
