"""Bulk jobs: millions of items streamed from the caller into one parent and many chunks.

Items are read from the iterable one chunk at a time (never all in memory). Each chunk becomes a
child job whose payload holds its items, staged as ``deferred`` while the stream is read and
validated; only when the whole stream is in are the chunks queued and published. So a bad item
anywhere refuses the whole submit with nothing left behind, and no chunk starts on a job that
could still be refused. Workers write each chunk's results to a file in the result store and
count its items into the parent in the same transaction as the chunk's own finish, so a
redelivered chunk neither writes twice nor counts twice. A client that dies while it reads the
stream leaves a parent that never ends: the reconciler fails it once no chunk has been staged
for ``ORCH_BULK_STREAM_TIMEOUT_S`` and drops its staged chunks (none of them ran).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from kombu.exceptions import OperationalError as KombuOperationalError
from pydantic import BaseModel
from redis import RedisError

from orchestrator.db.deferral import StreamGivenUp, defer_chunks, is_streaming
from orchestrator.db.models import JobState
from orchestrator.db.store import NewJob
from orchestrator.errors import (
    InvalidOption,
    InvalidPayload,
    JobCancelled,
    ServiceUnavailable,
    SubmitInProgress,
)
from orchestrator.fairness import FairDispatcher
from orchestrator.kinds import KindSpec
from orchestrator.tiers import Tier

if TYPE_CHECKING:
    from orchestrator.client import Client, JobHandle

MAX_CHUNK = 100_000


def result_dir(client: Client, parent_id: str) -> str:
    return str(client.settings.state_dir / "results" / parent_id)


def _chunk_payload(spec: KindSpec, field: str, items: list[Any], params: dict[str, Any],
                   offset: int) -> BaseModel:
    try:
        return spec.validate({**params, field: items})
    except InvalidPayload as e:
        errors = []
        for err in e.errors:
            loc = list(err.get("loc", ()))
            if len(loc) >= 2 and loc[0] == field and isinstance(loc[1], int):
                loc[1] += offset  # the item's index in the whole stream
            errors.append({**err, "loc": tuple(loc)})
        raise InvalidPayload(spec.name, errors) from e


def _check_params(spec: KindSpec, field: str, params: dict[str, Any]) -> None:
    """The fixed params against the schema, whatever the items (even none) turn out to be:
    every error but those about the bulk field itself (checked per chunk) is raised."""
    try:
        spec.validate({**params, field: []})
    except InvalidPayload as e:
        errors = [err for err in e.errors if tuple(err.get("loc", ()))[:1] != (field,)]
        if errors:
            raise InvalidPayload(spec.name, errors) from e


def submit_bulk(
    client: Client,
    kind: str,
    items: Iterable[Any],
    *,
    params: dict[str, Any] | None,
    tier: Tier,
    tenant: str,
    chunk_size: int | None,
    idempotency_key: str | None,
    window: str | None = None,
) -> JobHandle:
    """See ``Client.submit_bulk``. ``window`` is the resolved window name (None: run now)."""
    from orchestrator.client import JobHandle

    spec = client.services.kinds.get(kind)
    if spec.batch is None or spec.batch.bulk_field is None:
        raise InvalidOption(f"kind {kind!r} does not take bulk items")
    size = spec.batch.chunk_size if chunk_size is None else chunk_size
    if not isinstance(size, int) or isinstance(size, bool) or not 1 <= size <= MAX_CHUNK:
        raise InvalidOption(f"chunk_size must be a whole number between 1 and {MAX_CHUNK}, "
                            f"got {chunk_size!r}")
    params = dict(params or {})
    field = spec.batch.bulk_field
    if field in params:
        raise InvalidOption(f"params must not contain {field!r}: the items fill it")
    store = client.services.store
    policy = client.settings.policy(tier)
    max_attempts = spec.retry.resolve(policy).max_attempts or policy.max_attempts
    _check_params(spec, field, params)  # before reading anything
    parent = NewJob(
        tenant=tenant, kind=kind, tier=tier.value, priority=policy.priority,
        payload={**params, "bulk": {"field": field, "chunk_size": size}},
        max_attempts=max_attempts, idempotency_key=idempotency_key, state=JobState.RUNNING,
        window=window,
    )
    # Load shedding (not for a job that waits for its window in the database, as for submit)
    # and quotas; nothing is stored yet.
    # The rate is only looked at here, and spent once every item is in and valid.
    client._admit(tier, tenant, idempotency_key, shed=window is None, spend_rate=False)
    parent_id, created = store.create(parent)
    if not created:
        existing = store.get(parent_id)
        if existing is not None and is_streaming(existing):
            # Its items are still streaming in, and a bad one would still refuse (and remove)
            # it: a handle to it now could be left pointing at nothing.
            raise SubmitInProgress(parent_id, "its items are still streaming in; submit "
                                   "again once that submit has returned")
        return JobHandle(client, parent_id, created=False)
    total = 0
    try:
        for index, chunk in enumerate(_chunks(iter(items), size)):
            validated = _chunk_payload(spec, field, chunk, params, total)
            if index == 0:  # its model, as validation normalised it (the params alone do not
                client._check_model(spec, validated, tier)  # validate without items)
            payload = validated.model_dump(mode="json")
            store.create(NewJob(
                tenant=tenant, kind=kind, tier=tier.value, priority=policy.priority,
                payload=payload, max_attempts=max_attempts, parent_id=parent_id,
                items_total=len(chunk), chunk_index=index, state=JobState.DEFERRED,
            ))
            total += len(chunk)
        client._quotas.spend_rate(tenant)
    except BaseException:
        store.delete_bulk(parent_id)
        raise
    _set_result_dir(client, parent_id)
    try:
        if window is not None:
            # Staged chunks had no window, so no scheduler could release part of a stream that
            # might still be refused; now they all wait for it.
            defer_chunks(client.services.engine, parent_id, total, window)
            return JobHandle(client, parent_id, created=True)
        chunk_ids = store.release_chunks(parent_id, total)
    except StreamGivenUp:
        store.drop_staged(parent_id)
        ended = store.get(parent_id)
        if ended is not None and ended.state == JobState.CANCELLED:  # while its items streamed
            raise JobCancelled(parent_id) from None
        raise ServiceUnavailable(
            f"bulk job {parent_id} was given up while its items streamed in: no chunk was "
            f"staged for ORCH_BULK_STREAM_TIMEOUT_S ({client.settings.bulk_stream_timeout_s:g} "
            "s); it is failed and none of its items ran") from None
    try:
        # Chunks wait per tenant and reach the queue in fair turns (orchestrator.fairness).
        fair = FairDispatcher(client.services.redis, client.services.celery,
                              window=client.settings.fair_window)
        fair.enqueue(tier, tenant, store.tenant_weight(tenant), chunk_ids)
        fair.dispatch(tier, policy)
    except (KombuOperationalError, RedisError, OSError) as e:
        store.cancel(parent_id)
        raise ServiceUnavailable(
            f"broker refused bulk job {parent_id}; it was cancelled: {e}") from e
    return JobHandle(client, parent_id, created=True)


def _set_result_dir(client: Client, parent_id: str) -> None:
    from sqlalchemy import update

    from orchestrator.db.models import jobs

    with client.services.engine.begin() as conn:
        conn.execute(update(jobs).where(jobs.c.id == parent_id)
                     .values(result_ref=result_dir(client, parent_id)))


def _chunks(items: Iterator[Any], size: int) -> Iterator[list[Any]]:
    while True:
        chunk = list(itertools.islice(items, size))
        if not chunk:
            return
        yield chunk
