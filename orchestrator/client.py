"""The Python client: submit jobs, follow them, cancel them.

    from orchestrator import Client

    with Client.from_env() as client:
        handle = client.submit("echo", {"hello": "world"}, tenant="acme")
        print(handle.result(timeout=10))
"""

from __future__ import annotations

import functools
import logging
import re
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any, ParamSpec, TypeVar

import redis
from kombu.exceptions import OperationalError as KombuOperationalError
from pydantic import BaseModel
from redis import RedisError
from sqlalchemy.exc import InterfaceError as SQLInterfaceError
from sqlalchemy.exc import OperationalError as SQLOperationalError

from orchestrator.admission import Admission
from orchestrator.batching import PLAIN_BATCH_MAX, PLAIN_KEY, Buffers, ServiceTimes
from orchestrator.broker import TRANSPORT_KEY, publish
from orchestrator.db.models import JobState
from orchestrator.db.store import AttemptView, JobView, NewJob, utcnow
from orchestrator.errors import (
    InvalidOption,
    JobCancelled,
    JobFailed,
    JobNotFound,
    JobTimeout,
    ServiceUnavailable,
)
from orchestrator.kinds import KindSpec
from orchestrator.model_check import ModelCheck
from orchestrator.quotas import UNREAD, VERSION_KEY, Quotas
from orchestrator.results import decode_result, iter_rows
from orchestrator.services import Services, done_channel
from orchestrator.settings import Settings
from orchestrator.tiers import Tier
from orchestrator.transport import mark_sent
from orchestrator.window_catalog import WindowCatalog
from orchestrator.windows import KIND_DEFAULT, NO_WINDOW_NAME, WindowSpec, _KindDefault

log = logging.getLogger(__name__)

_P = ParamSpec("_P")
_R = TypeVar("_R")


def _reachable(method: Callable[_P, _R]) -> Callable[_P, _R]:
    """The database stopped answering (refused, dropped, timed out) during the call: that is
    ``ServiceUnavailable``, as the methods document, not a driver's error."""

    @functools.wraps(method)
    def call(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return method(*args, **kwargs)
        except (SQLOperationalError, SQLInterfaceError) as e:
            raise ServiceUnavailable(f"database does not answer: {e.orig}") from e

    return call


_TENANT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class JobHandle:
    """A submitted job. ``created`` is False when an idempotency key matched an existing job."""

    def __init__(self, client: Client, job_id: str, *, created: bool = True) -> None:
        self.client = client
        self.id = job_id
        self.created = created

    def __repr__(self) -> str:
        return f"JobHandle({self.id!r})"

    def job(self) -> JobView:
        """The job's current row. Raises: JobNotFound."""
        return self.client.get(self.id)

    def status(self) -> str:
        """The job's state: deferred, queued, running, succeeded, failed, dead or cancelled."""
        return self.job().state

    def result(self, timeout: float | None = None) -> Any:
        """Wait for the job and return its result.

        Raises:
            JobFailed: the job ended failed or dead (the worker's error is attached).
            JobCancelled: the job was cancelled.
            JobTimeout: it did not finish within ``timeout`` seconds.
        """
        return self.client.result(self.id, timeout=timeout)

    def cancel(self) -> bool:
        return self.client.cancel(self.id)


class Client:
    """Submits and follows jobs. Thread-safe; close it (or use ``with``) when done."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self.settings = services.settings
        self._service = ServiceTimes(services.redis)
        self._buffers = Buffers(services.redis, services.celery,
                                processing_ttl_s=services.settings.visibility_timeout_s)
        self._admission = Admission(services.redis, services.settings, also_read=VERSION_KEY)
        self._quotas = Quotas(services.engine, services.redis)
        self._models = ModelCheck(services.redis, model_dir=services.settings.model_dir,
                                  embed_variant=services.settings.embed_variant)
        self.windows = WindowCatalog(services.engine, services.settings)

    @classmethod
    def from_env(cls) -> Client:
        """A client configured from ``ORCH_*`` variables (the embedded default when unset).

        Raises:
            ConfigurationError, ServiceUnavailable: see ``Services.open``.
        """
        return cls.from_settings(Settings.from_env())

    @classmethod
    def from_settings(cls, settings: Settings) -> Client:
        return cls(Services.open(settings))

    def close(self) -> None:
        self.services.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # --- submit ------------------------------------------------------------------------------

    @_reachable
    def submit(
        self,
        kind: str,
        payload: dict[str, Any],
        *,
        tier: Tier | str | None = None,
        tenant: str = "default",
        idempotency_key: str | None = None,
        deadline: datetime | timedelta | float | None = None,
        window: str | _KindDefault | None = KIND_DEFAULT,
    ) -> JobHandle:
        """Validate and enqueue a job; with a used ``(tenant, idempotency_key)``, return that job.

        ``tier=None`` takes the kind's default tier. ``deadline`` (a UTC datetime, or seconds or
        a timedelta from now) is the latest time the job may start; past it, it fails unrun.
        ``window`` names an off-peak window to wait for: the job is stored ``deferred`` and
        published when the scheduler sees the window open. By default the kind's own window
        applies (when it admits the job's tier and kind); ``None`` runs the job now. A kind
        declared ``BatchPolicy(chunked=True)`` (``index``, ``evaluate``) is submitted as a bulk
        job (``submit_bulk``) over its bulk field, so it checkpoints and yields to higher tiers.

        Raises:
            UnknownKind: no imported module declares ``kind``.
            InvalidPayload: the payload does not match the kind's schema (field by field).
            InvalidOption: tier, tenant, idempotency key, deadline or window is malformed, or
                the window does not admit the job's tier or kind.
            UnknownWindow: no window of that name is defined (an ``InvalidOption``).
            Overloaded: the tier sheds load (``retry_after`` says when to try again); not
                checked for a deferred job, which waits in the database, not on a queue.
            QuotaExceeded: one of the tenant's quotas refuses it (``quota`` names which).
            ServiceUnavailable: the job could not be stored or published; nothing is left
                behind, except for a job with an idempotency key, which another submit of
                the key may hold already: it is kept and sent once the broker answers (its
                id is the error's ``job_id``; submitting again with the key returns it).
        """
        spec = self.services.kinds.get(kind)
        model = spec.validate(payload)
        chosen = _parse_tier(tier) if tier is not None else spec.tier
        self._check_model(spec, model, chosen)
        _check_tenant(tenant)
        _check_key(idempotency_key)
        due = _parse_deadline(deadline)
        if spec.batch is not None and spec.batch.chunked and spec.batch.bulk_field:
            if due is not None:
                raise InvalidOption(f"kind {kind!r} runs as a bulk job, which takes no deadline")
            params = model.model_dump(mode="json")
            items = params.pop(spec.batch.bulk_field)
            return self.submit_bulk(kind, items, params=params, tier=chosen, tenant=tenant,
                                    idempotency_key=idempotency_key, window=window)
        target = self.window_for(spec, chosen, window)
        policy = self.settings.policy(chosen)
        self._admit(chosen, tenant, idempotency_key, shed=target is None)
        new = NewJob(
            tenant=tenant, kind=kind, tier=chosen.value, priority=policy.priority,
            payload=model.model_dump(mode="json"),
            max_attempts=spec.retry.resolve(policy).max_attempts or policy.max_attempts,
            idempotency_key=idempotency_key, deadline=due,
            state=JobState.QUEUED if target is None else JobState.DEFERRED,
            window=None if target is None else target.name,
        )
        store = self.services.store
        now = utcnow()
        job_id, created = store.create(new, now=now)
        if created and target is not None:
            log.debug("job %s deferred to window %s", job_id, target.name)
        elif created:
            try:
                if spec.batch is not None:
                    self._buffers.push(
                        tier=chosen, kind=kind, key=spec.batch_key(model),
                        priority=policy.priority, job_id=job_id, enqueued_at=now,
                        max_batch=spec.batch.size(policy), delay_ms=spec.batch.delay_ms(policy),
                        time_limit=policy.time_limit_s,
                    )
                elif self._service.take(kind):  # short: travels with others (batching.py)
                    self._buffers.push(
                        tier=chosen, kind=kind, key=PLAIN_KEY, priority=policy.priority,
                        job_id=job_id, enqueued_at=now, max_batch=PLAIN_BATCH_MAX,
                        delay_ms=0.0, time_limit=policy.time_limit_s, plain=True,
                    )
                else:
                    # Unkeyed, recorded first: once published, a worker may run the job at once,
                    # and a failed record after that would withdraw a running job. A keyed job
                    # is never withdrawn: recorded after its publish, so that a failed publish
                    # leaves no record and the reconciler sends the job.
                    if idempotency_key is None:
                        mark_sent(self.services.redis, [(job_id, 0)])
                    publish(self.services.celery, job_id, chosen, policy.priority,
                            time_limit=policy.time_limit_s)
                    if idempotency_key is not None:
                        mark_sent(self.services.redis, [(job_id, 0)])
            except (KombuOperationalError, RedisError, OSError) as e:
                if idempotency_key is not None:
                    # A concurrent submit of the same key may already hold this job: it is
                    # kept, with no transport record, and the reconciler sends it.
                    self._unsend(spec, model, chosen, job_id, now)
                    raise ServiceUnavailable(
                        f"broker refused the job; job {job_id} is stored under its idempotency "
                        "key and is sent once the broker answers (the scheduler's reconciler "
                        f"re-sends it); submitting again with the key returns it: {e}",
                        job_id=job_id) from e
                self._withdraw(spec, model, chosen, job_id, now)
                raise ServiceUnavailable(f"broker refused the job, nothing was kept: {e}") from e
            log.debug("submitted job %s kind=%s tier=%s tenant=%s", job_id, kind, chosen, tenant)
        return JobHandle(self, job_id, created=created)

    @_reachable
    def submit_bulk(
        self,
        kind: str,
        items: Iterable[Any],
        *,
        params: dict[str, Any] | None = None,
        tier: Tier | str = Tier.OFFLINE,
        tenant: str = "default",
        chunk_size: int | None = None,
        idempotency_key: str | None = None,
        window: str | _KindDefault | None = KIND_DEFAULT,
    ) -> JobHandle:
        """Submit a stream of items as one bulk job that runs as checkpointed chunks.

        With a ``window`` (as for ``submit``), the chunks wait ``deferred`` for it; when it
        closes, running chunks checkpoint at their next mini-batch and wait for the next
        opening.

        ``items`` is read one chunk at a time; each chunk's payload is ``params`` plus the items
        in the kind's bulk field (``texts`` for ``embed``, ``rows`` for ``score``). Results
        stream to files; read them with ``bulk_results``. Progress is the parent's
        ``items_done`` / ``items_total``.

        Raises:
            UnknownKind, InvalidOption: as for ``submit``; also a kind without bulk support.
            InvalidPayload: an item or a param is invalid (locations are indexes in the whole
                stream); nothing is kept.
            Overloaded, QuotaExceeded: as for ``submit`` (the bulk job counts as one
                submission; its tier's backlog is checked before the first item is read).
            ServiceUnavailable: the broker refused the chunks (the job is cancelled).
            SubmitInProgress: a bulk job with this idempotency key is still streaming its
                items in (another submit); try again once it has returned.
            JobCancelled: the job was cancelled while its items streamed in (none ran).
        """
        from orchestrator.bulk import submit_bulk

        _check_tenant(tenant)
        _check_key(idempotency_key)
        chosen = _parse_tier(tier)
        target = self.window_for(self.services.kinds.get(kind), chosen, window)
        return submit_bulk(self, kind, items, params=params, tier=chosen,
                           tenant=tenant, chunk_size=chunk_size,
                           idempotency_key=idempotency_key,
                           window=None if target is None else target.name)

    def window_for(self, spec: KindSpec, tier: Tier, window: str | _KindDefault | None
                   ) -> WindowSpec | None:
        """The window a submit waits for, or None to run now.

        The kind's default applies only where it admits the job's tier and kind (an
        interactive submit of a kind that defaults to an offline window runs now).

        Raises:
            UnknownWindow: the named (or the kind's default) window is not defined.
            InvalidOption: ``window`` is not a name, or that window does not admit the job.
        """
        if isinstance(window, _KindDefault):
            if spec.window is None:
                return None
            default = self.windows.get(spec.window)
            return _opens_again(default) if default.admits(tier.value, spec.name) else None
        if window is None or window == NO_WINDOW_NAME:
            return None
        if not isinstance(window, str):
            raise InvalidOption(f"window must be a window name or None, got {window!r}")
        chosen = self.windows.get(window)
        if not chosen.admits(tier.value, spec.name):
            raise InvalidOption(
                f"window {window!r} admits tiers {', '.join(chosen.tiers or ('all',))} and "
                f"kinds {', '.join(chosen.kinds or ('all',))}; this job is a {tier.value} "
                f"{spec.name!r} job")
        return _opens_again(chosen)

    def _check_model(self, spec: KindSpec, payload: BaseModel, tier: Tier) -> None:
        """Raises: InvalidPayload when no live worker of ``tier`` holds the payload's model."""
        ref = spec.model_of(payload) if spec.model_of is not None else None
        if ref is not None:
            self._models.check(spec.name, tier, *ref)

    def _admit(self, tier: Tier, tenant: str, idempotency_key: str | None, *,
               shed: bool = True, spend_rate: bool = True) -> None:
        """Refuse a submit that the tier's load or the tenant's quotas do not allow.

        Runs before anything is stored. A submit whose idempotency key already names a job
        passes: it adds no work and returns that job.

        Raises:
            Overloaded, QuotaExceeded, ServiceUnavailable.
        """
        if idempotency_key is not None and \
                self.services.store.find_by_key(tenant, idempotency_key) is not None:
            return
        load = self._admission.check(tier) if shed else None
        # The admission check's one round trip also read the quota version.
        self._quotas.check(tenant, tier, version=UNREAD if load is None else load.also_read,
                           spend_rate=spend_rate)

    @_reachable
    def chunks(self, job_id: str) -> list[JobView]:
        """A bulk job's chunks, in item order."""
        return self.services.store.chunks(job_id)

    @_reachable
    def bulk_results(self, job_id: str, timeout: float | None = None) -> Iterator[Any]:
        """Wait for a bulk job, then yield one result per item, in submission order.

        Raises:
            JobFailed, JobCancelled, JobTimeout, JobNotFound: as for ``result``.
        """
        self.result(job_id, timeout=timeout)
        return iter_rows(self.services.store.chunk_results(job_id))

    def _withdraw(self, spec: KindSpec, model: BaseModel, tier: Tier, job_id: str,
                  enqueued_at: datetime) -> None:
        self._unsend(spec, model, tier, job_id, enqueued_at)
        self.services.store.delete_unpublished(job_id)

    def _unsend(self, spec: KindSpec, model: BaseModel, tier: Tier, job_id: str,
                enqueued_at: datetime) -> None:
        """Take back what a failed send may have left: its buffer item and transport record."""
        try:  # a plain kind's job may be in its buffer too; removing a missing item is a no-op
            key = spec.batch_key(model) if spec.batch is not None else PLAIN_KEY
            self._buffers.remove(tier=tier, kind=spec.name, key=key, job_id=job_id,
                                 enqueued_at=enqueued_at)
        except RedisError:
            log.warning("job %s: could not take it back from its buffer", job_id)
        try:
            self.services.redis.hdel(TRANSPORT_KEY, job_id)
        except RedisError:
            log.warning("job %s: could not remove its transport record", job_id)

    # --- follow ------------------------------------------------------------------------------

    @_reachable
    def get(self, job_id: str) -> JobView:
        """Raises: JobNotFound."""
        job = self.services.store.get(job_id)
        if job is None:
            raise JobNotFound(job_id)
        return job

    @_reachable
    def attempts(self, job_id: str) -> list[AttemptView]:
        return self.services.store.attempts(job_id)

    @_reachable
    def cancel(self, job_id: str) -> bool:
        """Cancel a job that has not finished; False when it already had.

        A queued job never runs; a running one keeps running until it ends but its result is
        discarded. Raises: JobNotFound.
        """
        if self.services.store.cancel(job_id):
            self.services.signal_done(job_id, JobState.CANCELLED)
            return True
        self.get(job_id)
        return False

    @_reachable
    def wait(self, handles: Iterable[JobHandle | str], timeout: float | None = None
             ) -> list[JobView]:
        """Block until every job has ended (in any state); return them in the given order.

        Completion arrives through Redis pub/sub; the database is re-read every
        ``result_wait_poll_s`` as a safety net, so a lost signal only costs a poll.

        Raises:
            JobNotFound: an id does not exist.
            JobTimeout: some job had not ended within ``timeout`` seconds (names the first).
        """
        ids = [h.id if isinstance(h, JobHandle) else h for h in handles]
        store = self.services.store
        done: dict[str, JobView] = {}
        pending = set(ids)
        first_look = store.get_many(sorted(pending))
        missing = next((i for i in ids if i not in first_look), None)
        if missing is not None:
            raise JobNotFound(missing)
        self._refresh(first_look, pending, done)
        deadline = None if timeout is None else time.monotonic() + timeout
        poll = self.settings.result_wait_poll_s
        signals = _Signals(self.services.redis, [i for i in ids if i in pending])
        try:
            next_poll = time.monotonic()  # re-read once subscribed: no end slips between
            while pending:
                now = time.monotonic()
                if now >= next_poll:
                    self._refresh(store.get_many(sorted(pending)), pending, done)
                    next_poll = now + poll
                    continue
                if deadline is not None and now >= deadline:
                    first = next(i for i in ids if i in pending)
                    current = store.get(first)
                    raise JobTimeout(first, timeout or 0.0, current.state if current else "?")
                until = next_poll if deadline is None else min(next_poll, deadline)
                # A signal says "look now"; the row is the truth.
                woken = signals.wait(until - now) & pending
                if woken:
                    self._refresh(store.get_many(sorted(woken)), pending, done)
        finally:
            signals.close()
        return [done[i] for i in ids]

    @staticmethod
    def _refresh(views: dict[str, JobView], pending: set[str], done: dict[str, JobView]) -> None:
        for job_id, view in views.items():
            if view.terminal:
                done[job_id] = view
                pending.discard(job_id)

    @_reachable
    def result(self, job_id: str, timeout: float | None = None) -> Any:
        """Wait for one job and return its result.

        Raises:
            JobFailed, JobCancelled, JobTimeout, JobNotFound.
        """
        job = self.wait([job_id], timeout=timeout)[0]
        if job.state == JobState.SUCCEEDED:
            if job.items_total is not None and job.parent_id is None:
                return {"items": job.items_done, "result_dir": job.result_ref}
            return decode_result(job.result)
        if job.state == JobState.CANCELLED:
            raise JobCancelled(job_id)
        raise JobFailed(job_id, job.state, job.error)


def _parse_tier(tier: Tier | str) -> Tier:
    try:
        return Tier(tier)
    except ValueError:
        raise InvalidOption(
            f"unknown tier {tier!r}; choose from interactive, nearline, offline"
        ) from None


def _opens_again(window: WindowSpec) -> WindowSpec:
    """Raises: InvalidOption: the window will never open again (a job would wait for ever)."""
    if not window.opens_again(utcnow()):
        raise InvalidOption(f"window {window.name!r} will not open again (a one-off window "
                            "that has ended, or a cron that matches no date); nothing was "
                            "stored")
    return window


def _check_tenant(tenant: str) -> None:
    if not isinstance(tenant, str) or not _TENANT_RE.fullmatch(tenant):
        raise InvalidOption(
            f"invalid tenant {tenant!r}: 1-64 characters of letters, digits, '_', '.', '-', "
            "starting with a letter or digit"
        )


def _check_key(key: str | None) -> None:
    if key is None:
        return
    if not isinstance(key, str) or not key or len(key) > 255 or "\x00" in key:
        raise InvalidOption("idempotency_key must be a non-empty string of at most 255 chars, "
                            "without NUL characters")


def _parse_deadline(deadline: datetime | timedelta | float | None) -> datetime | None:
    if deadline is None:
        return None
    now = datetime.now(UTC)
    if isinstance(deadline, datetime):
        if deadline.tzinfo is None:
            raise InvalidOption("deadline must be timezone-aware (e.g. datetime.now(UTC))")
        due = deadline
    elif isinstance(deadline, timedelta | int | float) and not isinstance(deadline, bool):
        try:
            delta = deadline if isinstance(deadline, timedelta) \
                else timedelta(seconds=float(deadline))
            due = now + delta
        except (OverflowError, ValueError):  # nan, inf, or past year 9999
            raise InvalidOption(f"deadline {deadline!r} is not a time this job could start "
                                "by") from None
    else:
        raise InvalidOption(f"deadline must be a datetime, timedelta or seconds, not {deadline!r}")
    if due <= now:
        raise InvalidOption(f"deadline {due.isoformat()} is already past")
    return due



class _Signals:
    """Job-end announcements on Redis pub/sub. If Redis fails, waiting falls back to polling."""

    def __init__(self, client: redis.Redis, job_ids: list[str]) -> None:
        self._pubsub: Any = client.pubsub(ignore_subscribe_messages=True)
        try:
            for start in range(0, len(job_ids), 1000):
                self._pubsub.subscribe(*[done_channel(i) for i in job_ids[start:start + 1000]])
        except RedisError:
            self._lost()

    def _lost(self) -> None:
        log.warning("lost the Redis signal connection; waiting by polling the database",
                    exc_info=True)
        self._pubsub.close()
        self._pubsub = None

    def wait(self, seconds: float) -> set[str]:
        """Ids announced within ``seconds`` (all that arrived, once the first one has)."""
        if self._pubsub is None:
            time.sleep(max(seconds, 0.0))
            return set()
        woken: set[str] = set()
        try:
            message = self._pubsub.get_message(timeout=max(seconds, 0.001))
            while message is not None:
                woken.add(message["channel"].decode().removeprefix("orch:done:"))
                message = self._pubsub.get_message(timeout=0)
        except RedisError:
            self._lost()
        return woken

    def close(self) -> None:
        if self._pubsub is not None:
            self._pubsub.close()
