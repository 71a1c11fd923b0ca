"""Run the Alembic migrations that ship inside the package."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, event, inspect

import migrations
from orchestrator.db.engine import make_engine, normalize_url


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(Path(migrations.__file__).parent))
    config.set_main_option("sqlalchemy.url", normalize_url(url).replace("%", "%%"))
    return config


#: the PostgreSQL advisory lock two migrating processes take turns on
MIGRATION_LOCK = 7_340_233_117
#: how often a process waiting for that lock tries again
LOCK_POLL_S = 0.2


def upgrade(url: str, revision: str = "head") -> None:
    """Bring the database at ``url`` up to ``revision`` (creating the SQLite file if needed)."""
    _migrate(url, lambda config: command.upgrade(config, revision))


def downgrade(url: str, revision: str) -> None:
    _migrate(url, lambda config: command.downgrade(config, revision))


def _migrate(url: str, run: Callable[[Config], None]) -> None:
    engine = make_engine(url)
    if engine.dialect.name == "sqlite":
        # Revisions rebuild tables by copying them (batch mode): with foreign keys enforced,
        # dropping the old jobs table deleted every attempt and event row (ON DELETE
        # CASCADE), or failed. Off for the migration (it cannot change inside a transaction),
        # and checked before it commits.
        event.listen(engine, "connect",
                     lambda dbapi_conn, _: dbapi_conn.execute("PRAGMA foreign_keys=OFF"))
    try:
        with _connection(engine) as conn:
            config = alembic_config(url)
            config.attributes["connection"] = conn
            run(config)
            if engine.dialect.name == "sqlite":
                broken = conn.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                if broken:
                    raise RuntimeError(f"migration left rows without their parent: {broken[:5]}")
    finally:
        engine.dispose()


@contextmanager
def _connection(engine: Engine) -> Iterator[Connection]:
    """SQLite migrates in one transaction (its ``BEGIN IMMEDIATE`` keeps a second process
    out); PostgreSQL in one transaction per revision, which lets a revision build an index
    ``CONCURRENTLY`` outside any (Alembic's ``autocommit_block``), under an advisory lock that
    makes a second migrating process wait, then find nothing left to do."""
    if engine.dialect.name == "sqlite":
        with engine.begin() as conn:
            yield conn
        return
    with engine.connect() as conn:
        # Polled, with no transaction open between tries: one waiting inside pg_advisory_lock
        # is a transaction that the holder's CREATE INDEX CONCURRENTLY waits for (deadlock).
        while not conn.exec_driver_sql(
                f"SELECT pg_try_advisory_lock({MIGRATION_LOCK})").scalar():
            conn.commit()
            time.sleep(LOCK_POLL_S)
        conn.commit()
        try:
            yield conn
        finally:
            conn.rollback()
            conn.exec_driver_sql(f"SELECT pg_advisory_unlock({MIGRATION_LOCK})")
            conn.commit()


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
