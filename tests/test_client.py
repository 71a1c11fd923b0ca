"""The client's contract, on SQLite and on PostgreSQL, against the real Redis."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
import redis
from sqlalchemy import event, func, select

from orchestrator import (
    Client,
    InvalidOption,
    InvalidPayload,
    JobCancelled,
    JobNotFound,
    JobTimeout,
    UnknownKind,
)
from orchestrator.broker import TRANSPORT_KEY
from orchestrator.db.models import attempts, jobs, tenants
from orchestrator.db.store import utcnow
from orchestrator.errors import ServiceUnavailable
from orchestrator.scheduler.reconciler import Reconciler
from orchestrator.settings import Settings
from orchestrator.transport import Transport


def _queued_messages(r: redis.Redis) -> int:
    return sum(r.llen(k) for k in r.keys("*") if r.type(k) == b"list")


def _job_rows(client: Client) -> int:
    with client.services.engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(jobs)).scalar_one()


def test_submit_stores_a_queued_job_and_publishes_one_message(
    client: Client, redis_client: redis.Redis
) -> None:
    handle = client.submit("echo", {"hello": "world"}, tenant="acme")
    job = handle.job()
    assert (job.kind, job.tier, job.tenant, job.state) == ("echo", "interactive", "acme", "queued")
    assert job.payload == {"hello": "world"}
    assert job.attempts == 0 and job.max_attempts == 3
    assert handle.status() == "queued"
    assert _queued_messages(redis_client) == 1


def test_tier_none_takes_the_kinds_default_and_an_explicit_tier_wins(client: Client) -> None:
    assert client.submit("burn", {"ms": 1}).job().tier == "nearline"
    assert client.submit("burn", {"ms": 1}, tier="offline").job().tier == "offline"


def test_same_idempotency_key_from_20_threads_creates_one_job(
    client: Client, redis_client: redis.Redis
) -> None:
    barrier = threading.Barrier(20)
    ids: list[str] = []
    errors: list[BaseException] = []

    def submit() -> None:
        try:
            barrier.wait()
            ids.append(client.submit("echo", {"n": 1}, tenant="t1", idempotency_key="k-1").id)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=submit) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(ids) == 20 and len(set(ids)) == 1
    assert _job_rows(client) == 1
    assert _queued_messages(redis_client) == 1


def test_idempotency_key_is_per_tenant(client: Client) -> None:
    a = client.submit("echo", {}, tenant="a", idempotency_key="same")
    b = client.submit("echo", {}, tenant="b", idempotency_key="same")
    again = client.submit("echo", {"other": True}, tenant="a", idempotency_key="same")
    assert a.id != b.id
    assert again.id == a.id and again.created is False


def test_invalid_payload_is_refused_field_by_field_and_leaves_nothing(
    client: Client, redis_client: redis.Redis
) -> None:
    with pytest.raises(InvalidPayload) as info:
        client.submit("burn", {"ms": "lots", "colour": "red"})
    fields = {tuple(err["loc"]) for err in info.value.errors}
    assert fields == {("ms",), ("colour",)}
    assert "ms:" in str(info.value) and "colour:" in str(info.value)
    with pytest.raises(InvalidPayload, match="JSON object"):
        client.submit("echo", ["not", "an", "object"])  # type: ignore[arg-type]
    assert _job_rows(client) == 0
    assert _queued_messages(redis_client) == 0


def test_unknown_kind_and_bad_options_are_typed_errors_that_leave_nothing(
    client: Client, redis_client: redis.Redis
) -> None:
    with pytest.raises(UnknownKind, match=r"'embedd'.*declared kinds: .*echo"):
        client.submit("embedd", {})
    with pytest.raises(InvalidOption, match="unknown tier"):
        client.submit("echo", {}, tier="urgent")
    with pytest.raises(InvalidOption, match="invalid tenant"):
        client.submit("echo", {}, tenant="no spaces please")
    with pytest.raises(InvalidOption, match="idempotency_key"):
        client.submit("echo", {}, idempotency_key="")
    with pytest.raises(InvalidOption, match="already past"):
        client.submit("echo", {}, deadline=datetime.now(UTC) - timedelta(seconds=1))
    with pytest.raises(InvalidOption, match="timezone-aware"):
        client.submit("echo", {}, deadline=datetime.now() + timedelta(hours=1))
    # A trailing newline slipped past a ``$`` anchor: "acme\n" was a second tenant of its own
    # (outside acme's quotas), and on PostgreSQL a 64-character name plus it a raw DataError.
    for tenant in ("acme\n", "a" * 64 + "\n"):
        with pytest.raises(InvalidOption, match="invalid tenant"):
            client.submit("echo", {}, tenant=tenant)
    # NUL is refused by PostgreSQL's text type (a raw DataError) but stored by SQLite.
    with pytest.raises(InvalidOption, match="NUL"):
        client.submit("echo", {}, idempotency_key="a\x00b")
    # Deadlines no clock reaches were raw ValueError / OverflowError.
    for deadline in (float("nan"), float("inf"), 1e12, timedelta.max):
        with pytest.raises(InvalidOption, match="not a time"):
            client.submit("echo", {}, deadline=deadline)
    assert _job_rows(client) == 0
    assert _queued_messages(redis_client) == 0
    with client.services.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(tenants)).scalar_one() == 0


def test_submit_with_the_broker_down_is_refused_and_keeps_no_row(
    settings: Settings, database_url: str
) -> None:
    dead = settings.model_copy(update={"broker_url": "redis://127.0.0.1:1/0"})
    with Client.from_settings(settings) as healthy:
        services = healthy.services
        from orchestrator.broker import make_celery

        services.celery = make_celery(dead)
        services.celery.conf.broker_connection_max_retries = 0
        services.celery.conf.broker_transport_options = {
            **services.celery.conf.broker_transport_options, "max_retries": 0,
        }
        with pytest.raises(ServiceUnavailable, match="nothing was kept"):
            healthy.submit("echo", {"x": 1})
        assert _job_rows(healthy) == 0
        assert services.redis.hlen(TRANSPORT_KEY) == 0  # its record went with it
        # With an idempotency key, another submit of the key may hold the job already (it was
        # deleted under it): it is kept, unsent, for the reconciler.
        with pytest.raises(ServiceUnavailable, match="stored under its idempotency key") as info:
            healthy.submit("echo", {"x": 1}, idempotency_key="k")
        kept = info.value.job_id
        assert kept is not None and healthy.get(kept).state == "queued"
        assert services.redis.hlen(TRANSPORT_KEY) == 0
    with Client.from_settings(settings) as client:
        again = client.submit("echo", {"x": 1}, idempotency_key="k")
        assert (again.id, again.created) == (kept, False)
        reconciler = Reconciler(client.services, Transport(client.services), grace_s=0)
        assert reconciler.check(utcnow() + timedelta(seconds=1)).republished == [kept]


def test_a_database_that_stops_answering_is_service_unavailable_not_a_driver_error(
    client: Client
) -> None:
    handle = client.submit("echo", {"x": 1})
    engine = client.services.engine
    dbapi = engine.dialect.loaded_dbapi

    def refuse(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise dbapi.OperationalError("connection refused (the server went away)")

    event.listen(engine, "do_connect", refuse)
    engine.dispose()  # pooled connections go with the server
    try:
        calls: list[Callable[[], object]] = [
            lambda: client.submit("echo", {"x": 2}),
            lambda: client.submit("echo", {"x": 3}, idempotency_key="k"),
            lambda: client.submit_bulk("upper", ["a", "b"]),
            lambda: client.get(handle.id), handle.status, handle.cancel,
            lambda: client.attempts(handle.id), lambda: client.chunks(handle.id),
            lambda: client.result(handle.id, timeout=0.1),
            lambda: client.wait([handle], timeout=0.1),
        ]
        for call in calls:
            with pytest.raises(ServiceUnavailable, match="database does not answer"):
                call()
    finally:
        event.remove(engine, "do_connect", refuse)
    assert handle.status() == "queued" and _job_rows(client) == 1


def test_a_keyed_job_kept_after_a_broker_blip_has_no_transport_record_left(
    client: Client, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kombu.exceptions import OperationalError as BrokerError
    from redis import RedisError

    import orchestrator.client as client_module

    def refused(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise BrokerError("simulated broker blip")

    def blip(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise RedisError("simulated Redis blip")

    monkeypatch.setattr(client_module, "publish", refused)
    monkeypatch.setattr(client._buffers, "remove", blip)  # taking back fails too
    with pytest.raises(ServiceUnavailable) as info:
        client.submit("echo", {"x": 1}, idempotency_key="blip")
    kept = info.value.job_id
    assert kept is not None
    # The record was written before the publish and its removal shared a try with the
    # buffer's: it stayed, matched attempt 0, and the reconciler never sent the job.
    assert not redis_client.hexists(TRANSPORT_KEY, kept)
    monkeypatch.undo()
    reconciler = Reconciler(client.services, Transport(client.services), grace_s=0)
    assert reconciler.check(utcnow() + timedelta(seconds=1)).republished == [kept]


def test_cancel_a_queued_job_then_result_raises_cancelled(client: Client) -> None:
    handle = client.submit("echo", {"x": 1})
    assert handle.cancel() is True
    assert handle.status() == "cancelled"
    assert handle.cancel() is False
    with pytest.raises(JobCancelled):
        handle.result(timeout=1)


def test_unknown_job_id_raises_not_found(client: Client) -> None:
    with pytest.raises(JobNotFound):
        client.get("no-such-job")
    with pytest.raises(JobNotFound):
        client.cancel("no-such-job")
    with pytest.raises(JobNotFound):
        client.wait(["no-such-job"], timeout=1)


def test_waiting_on_a_job_nobody_runs_times_out_with_its_state(client: Client) -> None:
    handle = client.submit("echo", {})
    with pytest.raises(JobTimeout) as info:
        handle.result(timeout=0.3)
    assert info.value.state == "queued" and info.value.job_id == handle.id
    assert isinstance(info.value, TimeoutError)


def test_no_attempt_rows_before_a_worker_claims(client: Client) -> None:
    client.submit("echo", {})
    with client.services.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(attempts)).scalar_one() == 0


def test_errors_cross_a_process_boundary_as_themselves() -> None:
    import pickle

    from orchestrator import errors

    raised = [errors.UnknownKind("k", ["a"]), errors.InvalidPayload("k", [{"loc": ("x",),
                                                                             "msg": "bad"}]),
              errors.Overloaded("interactive", reason="r", retry_after=1.0, detail="d"),
              errors.QuotaExceeded("t", quota="rate", limit=3, retry_after=None),
              errors.JobNotFound("j"), errors.JobFailed("j", "failed", "boom"),
              errors.JobCancelled("j"), errors.JobTimeout("j", 1.0, "queued"),
              errors.UnknownWindow("w", ["a"]), errors.DimensionMismatch("i", 3, 4)]
    for error in raised:  # these took their own arguments and failed to unpickle
        again = pickle.loads(pickle.dumps(error))
        assert (type(again), str(again), again.__dict__) == (type(error), str(error),
                                                              error.__dict__)
