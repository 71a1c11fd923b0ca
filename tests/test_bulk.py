"""Bulk jobs: streamed items, checkpointed chunks, results in files, exact resume."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select

from orchestrator import (
    Client,
    InvalidOption,
    InvalidPayload,
    JobCancelled,
    SubmitInProgress,
)
from orchestrator.db.models import jobs
from tests.conftest import WorkerProcess
from workers.runtime import Runtime


def _stream(n: int, consumed: list[int]) -> Iterator[str]:
    for i in range(n):
        consumed.append(i)
        yield f"item-{i}"


def test_bulk_items_stream_into_chunks_and_results_come_back_in_order(
    client: Client, runtime: Runtime
) -> None:
    consumed: list[int] = []
    handle = client.submit_bulk("upper", _stream(250, consumed), chunk_size=100,
                                tenant="acme")
    parent = handle.job()
    assert parent.items_total == 250 and parent.items_done == 0 and parent.tier == "offline"
    chunks = client.chunks(handle.id)
    assert [c.items_total for c in chunks] == [100, 100, 50]
    assert [c.chunk_index for c in chunks] == [0, 1, 2]
    assert all(c.state == "queued" and c.parent_id == handle.id for c in chunks)
    for chunk in chunks:
        assert runtime.execute(chunk.id) == "succeeded"
        progress = handle.job()
        assert progress.items_done == sum(c.items_total or 0 for c in chunks[: chunk.chunk_index
                                                                              + 1])
    assert handle.status() == "succeeded"
    assert handle.result(timeout=1)["items"] == 250
    assert list(client.bulk_results(handle.id, timeout=1)) == [f"ITEM-{i}" for i in range(250)]
    done = handle.job()
    assert done.items == 250 and done.cpu_seconds == pytest.approx(
        sum(c.cpu_seconds for c in client.chunks(handle.id)))


def test_a_redelivered_chunk_neither_writes_nor_counts_twice(
    client: Client, runtime: Runtime
) -> None:
    handle = client.submit_bulk("upper", [f"x{i}" for i in range(20)], chunk_size=10)
    first, second = client.chunks(handle.id)
    assert runtime.execute(first.id) == "succeeded"
    assert runtime.execute(first.id) is None  # duplicate delivery
    assert handle.job().items_done == 10
    files = sorted(Path(handle.job().result_ref or "").iterdir())
    assert [f.name for f in files] == [f"{first.id}.jsonl"]
    assert runtime.execute(second.id) == "succeeded"
    assert handle.job().items_done == 20 and handle.status() == "succeeded"


def test_a_bad_item_anywhere_refuses_the_bulk_job_and_leaves_nothing(
    client: Client, runtime: Runtime
) -> None:
    items: list[object] = [f"ok-{i}" for i in range(537)] + [{"not": "text"}] + ["tail"]
    with pytest.raises(InvalidPayload) as info:
        client.submit_bulk("upper", iter(items), chunk_size=100)
    assert [tuple(e["loc"]) for e in info.value.errors] == [("texts", 537)]
    with client.services.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(jobs)).scalar_one() == 0
    with pytest.raises(InvalidOption, match="does not take bulk items"):
        client.submit_bulk("echo", ["a"])
    consumed: list[int] = []
    for stream in (iter([]), _stream(5, consumed)):  # bad params: refused before any read
        with pytest.raises(InvalidPayload, match="nope"):
            client.submit_bulk("upper", stream, params={"nope": 1})
    assert consumed == []  # (and an empty stream's params were not checked at all)
    for size in (0, 2.5, "10", True):  # non-integers were raw TypeError / ValueError
        with pytest.raises(InvalidOption, match="chunk_size"):
            client.submit_bulk("upper", ["a"], chunk_size=size)  # type: ignore[arg-type]
    with client.services.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(jobs)).scalar_one() == 0


def test_a_chunk_whose_rows_cannot_be_written_fails_alone_with_the_reason(
    client: Client, runtime: Runtime
) -> None:
    bulk = client.submit_bulk("upper", ["a", "opaque", "b", "c"], chunk_size=2)
    first, second = client.chunks(bulk.id)
    # The rows go to a file, past the JSON check other results get: the failed write broke
    # the whole finish, so the chunk stayed running and came back as "worker lost" until dead.
    assert runtime.execute(first.id) == "failed"
    assert "cannot be written as JSON" in (client.get(first.id).error or "")
    assert bulk.status() == "failed"
    folder = Path(bulk.job().result_ref or "")
    assert not folder.exists() or not [p for p in folder.iterdir() if p.suffix == ".tmp"]
    assert runtime.execute(second.id) == "succeeded"  # the others are not stopped
    assert bulk.status() == "failed"


def test_a_duplicate_of_a_bulk_job_still_streaming_is_refused_as_in_progress(
    client: Client
) -> None:
    refused: list[Exception] = []

    def items() -> Iterator[object]:
        yield from ["a", "b", "c"]
        try:  # a second submit of the key while this one's items still stream in
            client.submit_bulk("upper", ["x"], chunk_size=2, idempotency_key="k")
        except SubmitInProgress as e:
            refused.append(e)
        yield {"not": "text"}  # and this one then turns out to be refused

    with pytest.raises(InvalidPayload):
        client.submit_bulk("upper", items(), chunk_size=2, idempotency_key="k")
    # The duplicate got the half-streamed job, which the bad item then removed: its handle
    # pointed at nothing (JobNotFound).
    assert len(refused) == 1 and "still streaming" in str(refused[0])
    with client.services.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(jobs)).scalar_one() == 0
    done = client.submit_bulk("upper", ["x"], chunk_size=2, idempotency_key="k")
    assert done.created and client.submit_bulk("upper", ["x"], idempotency_key="k").id == done.id


def test_a_bulk_job_cancelled_while_its_items_stream_in_says_so(client: Client) -> None:
    def items() -> Iterator[str]:
        yield from ["a", "b", "c"]
        [parent] = [j for j in client.services.store.find(tenant="cx") if j.parent_id is None]
        assert client.cancel(parent.id)
        yield "d"

    # It said the job was given up for streaming too slowly ("ORCH_BULK_STREAM_TIMEOUT_S").
    with pytest.raises(JobCancelled):
        client.submit_bulk("upper", items(), chunk_size=2, tenant="cx")


def test_bulk_idempotency_key_returns_the_same_job_without_reading_items(
    client: Client,
) -> None:
    first = client.submit_bulk("upper", ["a", "b"], idempotency_key="nightly-2026-11-24")
    consumed: list[int] = []
    again = client.submit_bulk("upper", _stream(10, consumed),
                               idempotency_key="nightly-2026-11-24")
    assert again.id == first.id and not again.created and consumed == []


def test_cancelling_a_bulk_job_cancels_its_chunks(client: Client, runtime: Runtime) -> None:
    handle = client.submit_bulk("upper", [f"c{i}" for i in range(30)], chunk_size=10)
    assert handle.cancel()
    assert {c.state for c in client.chunks(handle.id)} == {"cancelled"}
    assert all(runtime.execute(c.id) is None for c in client.chunks(handle.id))


@pytest.mark.e2e
def test_bulk_resumes_after_a_killed_worker_with_every_item_done_once(
    client: Client, start_worker: Callable[..., WorkerProcess]
) -> None:
    items = [f"slow-{i}" if i % 10 == 0 else f"i{i}" for i in range(60)]
    start_worker(concurrency=1)
    handle = client.submit_bulk("upper", items, chunk_size=10)
    deadline = time.monotonic() + 30
    running: list[str] = []
    while not running:  # a chunk is mid-run, after at least one has finished
        assert time.monotonic() < deadline, "no chunk ran"
        chunks = client.chunks(handle.id)
        if any(c.state == "succeeded" for c in chunks):
            running = [c.id for c in chunks if c.state == "running"]
        time.sleep(0.02)
    # Kill the pool process running it (the worker's parent requeues its message).
    attempt = client.attempts(running[0])[-1]
    os.kill(int(attempt.worker.rsplit(":", 1)[1]), signal.SIGKILL)
    start_worker(concurrency=1)
    result = handle.result(timeout=90)
    assert result["items"] == 60
    assert list(client.bulk_results(handle.id)) == [t.upper() for t in items]
    chunks = client.chunks(handle.id)
    assert all(c.state == "succeeded" for c in chunks)
    assert sum(c.items for c in chunks) == 60 == handle.job().items_done
    outcomes = [a.outcome for a in client.attempts(running[0])]
    assert outcomes == ["lost", "succeeded"]  # the killed run, then the one that finished it
