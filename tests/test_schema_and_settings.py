"""Migrations build exactly the models' schema; settings come from the environment, typed."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from orchestrator.db.engine import make_engine, normalize_url, reading
from orchestrator.db.migrate import current_revision, downgrade, head_revision, upgrade
from orchestrator.db.models import Base
from orchestrator.errors import ConfigurationError
from orchestrator.settings import Settings
from orchestrator.tiers import Tier


def test_migrated_schema_matches_the_models(database_url: str) -> None:
    engine = make_engine(database_url)
    try:
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
        assert diff == []
        assert current_revision(engine) == head_revision()
        tables = set(inspect(engine).get_table_names())
        assert {"jobs", "attempts", "tenants", "alembic_version"} <= tables
    finally:
        engine.dispose()


def test_downgrade_then_upgrade_round_trips(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    upgrade(url)
    downgrade(url, "base")
    engine = make_engine(url)
    try:
        assert "jobs" not in inspect(engine).get_table_names()
        upgrade(url)
        assert current_revision(engine) == head_revision()
    finally:
        engine.dispose()


def test_a_sqlite_downgrade_keeps_the_rows_of_tables_it_rebuilds(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    upgrade(url)
    engine = make_engine(url)
    now = "2026-11-25 12:00:00"
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql(f"INSERT INTO tenants(name, weight, created_at) "
                                 f"VALUES ('t', 1, '{now}')")
            conn.exec_driver_sql(
                "INSERT INTO jobs(id, tenant, kind, tier, state, priority, payload, attempts, "
                "max_attempts, created_at, items_done, cpu_seconds, wall_seconds, items, "
                f"preemptions) VALUES ('j1', 't', 'k', 'offline', 'queued', 0, '{{}}', 1, 3, "
                f"'{now}', 0, 0, 0, 0, 0)")
            conn.exec_driver_sql("INSERT INTO attempts(job_id, number, worker, started_at, "
                                 f"outcome) VALUES ('j1', 1, 'w', '{now}', 'running')")
    finally:
        engine.dispose()
    # Rebuilding jobs with foreign keys enforced deleted its attempts (ON DELETE CASCADE),
    # and 0004 -> 0003 failed outright.
    for revision in ("0006", "0003"):
        downgrade(url, revision)
        engine = make_engine(url)
        try:
            with engine.connect() as conn:
                assert conn.exec_driver_sql("SELECT count(*) FROM attempts").scalar() == 1
                assert conn.exec_driver_sql("SELECT count(*) FROM jobs").scalar() == 1
        finally:
            engine.dispose()
    upgrade(url)


@pytest.mark.postgres
def test_two_upgrades_at_once_on_postgresql_take_turns(postgres_url: str) -> None:
    import threading
    import uuid

    from sqlalchemy import text

    from tests.conftest import PG_ADMIN_URL

    admin = make_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = f"orch_mig_{uuid.uuid4().hex[:10]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    errors: list[BaseException] = []

    def run() -> None:
        try:
            upgrade(url)
        except BaseException as e:
            errors.append(e)

    try:
        # One failed with a duplicate type, or a deadlock on the index builds.
        threads = [threading.Thread(target=run) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert errors == []
        engine = make_engine(url)
        try:
            assert current_revision(engine) == head_revision()
        finally:
            engine.dispose()
    finally:
        with admin.connect() as conn:
            conn.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                              "WHERE datname = :n"), {"n": name})
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        admin.dispose()


def test_a_postgresql_server_that_never_answers_times_out(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    import socket

    from sqlalchemy.exc import OperationalError

    import orchestrator.db.engine as engine_module

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)  # accepts, then says nothing: `db current` hung for good
    port = silent.getsockname()[1]
    monkeypatch.setattr(engine_module, "CONNECT_TIMEOUT_S", 1)
    engine = make_engine(f"postgresql://u@127.0.0.1:{port}/db")
    try:
        with pytest.raises(OperationalError, match="timeout"):
            engine.connect()
    finally:
        engine.dispose()
        silent.close()


def test_a_short_time_limit_brings_the_default_drain_budget_under_it(tmp_path: Path) -> None:
    s = Settings.from_env({"ORCH_STATE_DIR": str(tmp_path),
                           "ORCH_TIER_INTERACTIVE_TIME_LIMIT_S": "1",
                           "ORCH_TIER_NEARLINE_TIME_LIMIT_S": "2"})
    assert s.policy(Tier.INTERACTIVE).drain_budget_s == 0.5  # the default 1 s was refused
    assert s.policy(Tier.NEARLINE).drain_budget_s == 1.0
    with pytest.raises(ConfigurationError, match="drain_budget_s"):  # set: left to the check
        Settings.from_env({"ORCH_STATE_DIR": str(tmp_path),
                           "ORCH_TIER_INTERACTIVE_TIME_LIMIT_S": "1",
                           "ORCH_TIER_INTERACTIVE_DRAIN_BUDGET_S": "1"})


def test_embedded_default_when_no_urls_are_set(tmp_path: Path) -> None:
    s = Settings.from_env({"ORCH_STATE_DIR": str(tmp_path)})
    assert s.embedded_broker
    assert s.resolved_database_url() == f"sqlite:///{tmp_path / 'orchestrator.db'}"
    assert s.resolved_broker_url() == f"redis+socket://{tmp_path / 'redis.sock'}"
    assert s.redis_url() == f"unix://{tmp_path / 'redis.sock'}"
    assert s.model_dir == tmp_path / "models"
    assert s.all_imports()[0] == "workers.kinds.basic"


def test_tier_policy_overrides_and_round_trip_through_the_environment(tmp_path: Path) -> None:
    s = Settings.from_env({
        "ORCH_STATE_DIR": str(tmp_path),
        "ORCH_DATABASE_URL": "postgresql://u@db/x",
        "ORCH_BROKER_URL": "redis://r:6379/2",
        "ORCH_IMPORTS": "a.kinds, b.kinds",
        "ORCH_TIER_INTERACTIVE_LEASE_S": "7.5",
        "ORCH_TIER_OFFLINE_MAX_ATTEMPTS": "2",
        "ORCH_TIER_NEARLINE_DRAIN_BUDGET_S": "0.5",
    })
    assert s.policy(Tier.NEARLINE).drain_budget_s == 0.5
    assert s.policy(Tier.INTERACTIVE).lease_s == 7.5
    assert s.policy(Tier.OFFLINE).max_attempts == 2
    assert s.imports == ("a.kinds", "b.kinds")
    assert Settings.from_env(s.to_env()) == s


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"ORCH_DATABSE_URL": "x"}, "unknown setting ORCH_DATABSE_URL"),
        ({"ORCH_TIER_NEARLINE_PRIORITY": "1"}, "nearline priority 1 must be above"),
        ({"ORCH_TIER_OFFLINE_PRIORITY": "2"}, "offline priority 2 must be above"),
        ({"ORCH_TIER_OFFLINE_LEASE_S": "-1"}, "lease_s"),
        ({"ORCH_TIER_NEARLINE_DRAIN_BUDGET_S": "0"}, "drain_budget_s"),
        ({"ORCH_TIER_OFFLINE_PREEMPT_CHECK_MS": "-5"}, "preempt_check_ms"),
        ({"ORCH_TIER_BATCH_LEASE_S": "1"}, "unknown setting"),
        ({"ORCH_VISIBILITY_TIMEOUT_S": "soon"}, "visibility_timeout_s"),
        # Accepted before, then timedelta(seconds=inf) raised OverflowError on every claim.
        ({"ORCH_VISIBILITY_TIMEOUT_S": "inf"}, "finite number"),
        ({"ORCH_TIER_OFFLINE_LEASE_S": "inf"}, "finite number"),
        ({"ORCH_TIER_OFFLINE_LEASE_S": "nan"}, "finite number"),
        ({"ORCH_TIER_NEARLINE_BACKOFF_BASE_S": "5", "ORCH_TIER_NEARLINE_BACKOFF_MAX_S": "1"},
         "backoff_max_s"),
        ({"ORCH_TIER_INTERACTIVE_DRAIN_BUDGET_S": "60"}, "drain_budget_s .* below time_limit_s"),
    ],
)
def test_bad_settings_are_refused_with_the_variable_named(
    tmp_path: Path, env: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigurationError, match=message):
        Settings.from_env({"ORCH_STATE_DIR": str(tmp_path), **env})


def test_database_urls_are_normalised_or_refused() -> None:
    assert normalize_url("postgresql://u@h/db").startswith("postgresql+psycopg://")
    assert normalize_url("sqlite:///x.db") == "sqlite:///x.db"
    with pytest.raises(ConfigurationError, match="unsupported database"):
        normalize_url("mysql://u@h/db")
    with pytest.raises(ConfigurationError, match="does not parse"):
        normalize_url("::::")


def test_a_broker_that_is_not_redis_is_refused(tmp_path: Path) -> None:
    s = Settings.from_env({"ORCH_STATE_DIR": str(tmp_path), "ORCH_BROKER_URL": "amqp://h//"})
    with pytest.raises(ConfigurationError, match="must be Redis"):
        s.redis_url()


def test_config_file_from_env_and_state_dir(tmp_path: Path) -> None:
    assert Settings.from_env({"ORCH_STATE_DIR": str(tmp_path)}).config() == {}
    (tmp_path / "orchestrator.toml").write_text('[windows.nightly]\ncron = "0 1 * * *"\n')
    settings = Settings.from_env({"ORCH_STATE_DIR": str(tmp_path)})
    assert settings.config()["windows"]["nightly"]["cron"] == "0 1 * * *"
    assert Settings.from_env(settings.to_env()).config_file == tmp_path / "orchestrator.toml"
    bad = tmp_path / "bad.toml"
    bad.write_text("[windows\n")
    with pytest.raises(ConfigurationError, match="not TOML"):
        Settings.from_env({"ORCH_STATE_DIR": str(tmp_path), "ORCH_CONFIG": str(bad)}).config()
    with pytest.raises(ConfigurationError, match="cannot read"):
        Settings.from_env({"ORCH_STATE_DIR": str(tmp_path),
                           "ORCH_CONFIG": str(tmp_path / "missing.toml")}).config()


def test_a_pooled_postgres_connection_dropped_while_idle_is_replaced(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import time

    import psycopg
    from sqlalchemy import text

    from orchestrator.db import engine as engine_module

    monkeypatch.setattr(engine_module, "IDLE_PING_S", 0.2)
    engine = make_engine(postgres_url)
    try:
        with engine.connect() as conn:
            pid = conn.execute(text("SELECT pg_backend_pid()")).scalar()
        with psycopg.connect(postgres_url, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        time.sleep(0.5)
        with engine.connect() as conn:  # no error: the idle connection was pinged and replaced
            assert conn.execute(text("SELECT pg_backend_pid()")).scalar() != pid
    finally:
        engine.dispose()


def test_sqlite_reads_hold_up_no_writer_while_other_transactions_take_the_write_lock(
    tmp_path: Path
) -> None:
    path = tmp_path / "db.sqlite"
    engine = make_engine(f"sqlite:///{path}")
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE t (x INTEGER)")
    writer = sqlite3.connect(path, timeout=0, isolation_level=None)  # no busy wait
    with reading(engine) as conn:  # a report's read, mid-transaction
        assert conn.exec_driver_sql("SELECT count(*) FROM t").scalar_one() == 0
        writer.execute("BEGIN IMMEDIATE")  # a worker's claim goes ahead
        writer.execute("INSERT INTO t VALUES (1)")
        writer.execute("COMMIT")
        assert conn.exec_driver_sql("SELECT count(*) FROM t").scalar_one() == 0  # its snapshot
    with engine.connect() as conn:  # not marked as a read: BEGIN IMMEDIATE, the write lock
        assert conn.exec_driver_sql("SELECT count(*) FROM t").scalar_one() == 1
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            writer.execute("BEGIN IMMEDIATE")
    writer.close()
    engine.dispose()
