"""The connections one process of a deployment holds: database, Redis, Celery, kinds.

Opened explicitly (``Services.open(settings)``), closed explicitly; nothing here is global.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis
from celery import Celery
from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError

from orchestrator.broker import TAKEOVER_KEY, TRANSPORT_KEY, make_celery
from orchestrator.costs import Accountant, PriceTable, default_models
from orchestrator.db.engine import make_engine
from orchestrator.db.migrate import current_revision, head_revision, upgrade
from orchestrator.db.store import JobStore
from orchestrator.embedded import EmbeddedRedis
from orchestrator.errors import ConfigurationError, ServiceUnavailable
from orchestrator.kinds import KindRegistry, registry
from orchestrator.settings import Settings

log = logging.getLogger(__name__)

def done_channel(job_id: str) -> str:
    """The Redis pub/sub channel on which a job's end is announced."""
    return f"orch:done:{job_id}"


@dataclass
class Services:
    settings: Settings
    engine: Engine
    store: JobStore
    redis: redis.Redis
    celery: Celery
    kinds: KindRegistry
    embedded: EmbeddedRedis | None = field(default=None)

    @classmethod
    def open(cls, settings: Settings, *, kinds: KindRegistry | None = None) -> Services:
        """Connect to the database and broker (starting the embedded Redis if it applies).

        The embedded SQLite database is migrated on first use; any other database must have
        been migrated with ``orchestrator db upgrade``.

        Raises:
            ConfigurationError: the database is not migrated, a kinds module fails to import, or
                the config file's price table is invalid.
            ServiceUnavailable: the database or Redis does not answer.
        """
        kinds = (kinds or registry).load(settings.all_imports())
        accountant = Accountant(PriceTable.from_config(settings.config()),
                                default_models(kinds.specs()))
        embedded = EmbeddedRedis(settings.state_dir) if settings.embedded_broker else None
        if embedded is not None:
            embedded.attach()
        try:
            engine = open_database(settings)
            client = redis.Redis.from_url(settings.redis_url(), socket_connect_timeout=5,
                                          health_check_interval=30)
            try:
                client.ping()
            except redis.RedisError as e:
                engine.dispose()
                raise ServiceUnavailable(
                    f"Redis at {settings.redis_url()} does not answer: {e}") from e
        except BaseException:
            if embedded is not None:
                embedded.detach()
            raise
        store = JobStore(engine)
        store.accountant = accountant
        return cls(
            settings=settings, engine=engine, store=store, redis=client,
            celery=make_celery(settings), kinds=kinds, embedded=embedded,
        )

    def signal_done(self, job_id: str, state: str) -> None:
        """Wake whoever waits on this job; losing the signal only delays them to their poll."""
        self.signal_many([(job_id, state)])

    def signal_many(self, ended: list[tuple[str, str]],
                    also: Callable[[Any], None] | None = None) -> None:
        """Announce several job ends in one round trip (a batch's), and drop their reconciler
        entries.

        ``also`` queues more best-effort commands on the same pipeline (the runtime's service
        time statistic), so a finished batch costs one Redis round trip in all.
        """
        if not ended and also is None:
            return
        try:
            pipe = self.redis.pipeline(transaction=False)
            for job_id, state in ended:
                pipe.publish(done_channel(job_id), state)
            if ended:
                ids = [job_id for job_id, _ in ended]
                pipe.hdel(TRANSPORT_KEY, *ids)  # an ended job needs no message any more
                pipe.hdel(TAKEOVER_KEY, *ids)
            if also is not None:
                also(pipe)
            pipe.execute()
        except redis.RedisError:
            log.warning("could not signal the end of %d job(s)", len(ended), exc_info=True)

    def close(self) -> None:
        self.celery.close()
        self.redis.close()
        self.engine.dispose()
        if self.embedded is not None:
            self.embedded.detach()
            self.embedded = None


def open_database(settings: Settings) -> Engine:
    """An engine on a migrated database (the embedded SQLite file is migrated here).

    Raises:
        ConfigurationError: a configured database is not at the current schema.
        ServiceUnavailable: the database does not answer.
    """
    url = settings.resolved_database_url()
    if settings.database_url is None:
        upgrade(url)
    engine = make_engine(url)
    try:
        revision = current_revision(engine)
    except OperationalError as e:
        engine.dispose()
        raise ServiceUnavailable(f"database does not answer: {e.orig}") from e
    head = head_revision()
    if revision != head:
        engine.dispose()
        raise ConfigurationError(
            f"database schema is at {revision or 'nothing'}, this version needs {head}; "
            "run `orchestrator db upgrade`"
        )
    return engine
