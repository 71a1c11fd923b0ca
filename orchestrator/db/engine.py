"""Engines and sessions for PostgreSQL (production) and SQLite (the embedded default)."""

from __future__ import annotations

import functools
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DisconnectionError
from sqlalchemy.orm import Session, sessionmaker

from orchestrator.errors import ConfigurationError


def normalize_url(url: str) -> str:
    """Spell a database URL with the driver this package ships with (psycopg 3 for PostgreSQL).

    Raises:
        ConfigurationError: the URL does not parse or names an unsupported database.
    """
    try:
        parsed = make_url(url)
    except ArgumentError as e:
        raise ConfigurationError(f"ORCH_DATABASE_URL does not parse: {url!r}") from e
    backend = parsed.get_backend_name()
    if backend not in ("postgresql", "sqlite"):
        raise ConfigurationError(f"unsupported database {backend!r}; use PostgreSQL or SQLite")
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


def make_engine(url: str, **kwargs: Any) -> Engine:
    """Create an engine; SQLite gets WAL, a busy timeout and enforced foreign keys."""
    url = normalize_url(url)
    if url.startswith("sqlite"):
        database = make_url(url).database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30}, **kwargs)
        event.listen(engine, "connect", _sqlite_pragmas)
        # pysqlite's own transaction handling defers BEGIN; take the write lock up front so two
        # writers wait on busy_timeout instead of failing to upgrade a read lock (reads opened
        # with ``reading`` begin deferred, and take no lock).
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    # psycopg prepares a statement after a few executions, and PostgreSQL may then settle on a
    # generic plan costed on the table statistics of that moment: for a jobs table that grew
    # from empty, a sequential scan per claim (backend CPU per job grew with the table, 3.2 ms
    # at 8,000 jobs against 0.7 ms planned per execution). Plan every execution with its values.
    connect_args = dict(kwargs.pop("connect_args", {}))
    query = make_url(url).query
    from_url = query.get("options")  # ?options=-c search_path=... (was overridden, so lost)
    connect_args["options"] = " ".join(filter(None, [
        from_url if isinstance(from_url, str) else None, connect_args.get("options"),
        "-c plan_cache_mode=force_custom_plan"]))
    if "connect_timeout" not in query:  # a server that accepts and never answers: fail
        connect_args.setdefault("connect_timeout", CONNECT_TIMEOUT_S)
    engine = create_engine(url, connect_args=connect_args, **kwargs)
    event.listen(engine, "checkout", functools.partial(_ping_if_idle, engine.dialect))
    event.listen(engine, "checkin", _note_checkin)
    return engine


#: seconds to wait for PostgreSQL to answer a new connection (the URL's connect_timeout wins)
CONNECT_TIMEOUT_S = 10

#: A pooled connection idle longer than this is pinged before use (a dropped connection is then
#: replaced instead of failing the caller's statement); busier ones are not, which saves a round
#: trip per checkout on the hot path, where ``pool_pre_ping`` would ping every time.
IDLE_PING_S = 5.0


def _note_checkin(_dbapi_conn: Any, record: Any) -> None:
    record.info["checked_in"] = time.monotonic()


def _ping_if_idle(dialect: Any, dbapi_conn: Any, record: Any, _proxy: Any) -> None:
    checked_in = record.info.get("checked_in")
    if checked_in is None or time.monotonic() - checked_in < IDLE_PING_S:
        return  # fresh from connect(), or in use a moment ago
    try:
        alive = dialect.do_ping(dbapi_conn)
    except Exception as e:
        alive = False
        cause: Exception | None = e
    else:
        cause = None
    if not alive:  # the pool retries the checkout with a fresh connection
        raise DisconnectionError(f"stale pooled connection: {cause}") from cause


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    dbapi_conn.isolation_level = None  # let the "begin" listener issue BEGIN
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """One unit of work: commit on success, roll back on any error."""
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


#: the execution option that marks a connection as reading only (see ``reading``)
READ_ONLY_OPTION = "orch_read_only"


def reading(engine: Engine) -> Connection:
    """A connection for reads only: ``with reading(engine) as conn: ...``.

    On SQLite its transaction is a deferred ``BEGIN``, a WAL reader that neither waits for nor
    holds up a writer. Every other transaction there starts ``BEGIN IMMEDIATE`` (it takes the
    write lock up front, so two writers queue on the busy timeout instead of failing to
    upgrade), which on a read would make reports, ``jobs list`` and metric scrapes stall the
    workers' claims and the submits for as long as they read. On PostgreSQL, a plain connection.
    """
    return engine.connect().execution_options(**{READ_ONLY_OPTION: True})


def _sqlite_begin(conn: Connection) -> None:
    read_only = conn.get_execution_options().get(READ_ONLY_OPTION)
    conn.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")
