"""``index``, ``search`` and ``evaluate`` on tiny ONNX models, through the client and workers."""

from __future__ import annotations

import functools
import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import func, select

from orchestrator import Client, InvalidPayload, JobFailed, retrieval
from orchestrator.client import JobHandle
from orchestrator.db.models import jobs
from orchestrator.errors import DimensionMismatch, InvalidSource, UnknownIndex
from orchestrator.retrieval import evaluation_report, submit_search
from orchestrator.services import Services
from orchestrator.settings import Settings
from orchestrator.tiers import Tier
from orchestrator.vector_index import VectorIndex, index_root
from tests.conftest import WorkerProcess
from workers.models.builders import build_scoring_models, build_tiny_embedding_model
from workers.runtime import Runtime

# Words of the tiny model's vocabulary, so that no two texts share a vector.
TEXTS = ["the cat sleeps on the red house", "a dog runs in the rain", "a bird flies to the moon",
         "the fish swims in the river", "an old car is slow", "the new train is fast",
         "a big plane at the city", "a small boat on the river", "the green tree and the sun",
         "blue snow in the city", "search query for a document", "fraud score of the payment",
         "the model reads an invoice", "the cat eats a fish"]

# index and evaluate jobs wait for the offpeak window by default; these tests run them now.
submit_index = functools.partial(retrieval.submit_index, window=None)
submit_evaluate = functools.partial(retrieval.submit_evaluate, window=None)


@pytest.fixture
def models(settings: Settings, tmp_path: Path) -> Path:
    """Tiny embedding models "tiny" and "tiny2" (same graph) and the synthetic scoring pair."""
    model_path, tokenizer_path = build_tiny_embedding_model(tmp_path / "build")
    for name in ("tiny", "tiny2"):
        folder = settings.model_dir / name
        folder.mkdir(parents=True)
        shutil.copy(model_path, folder / "model-int8.onnx")
        shutil.copy(tokenizer_path, folder / "tokenizer.json")
    build_scoring_models(settings.model_dir / "scoring-synthetic")
    return settings.model_dir


@pytest.fixture
def runtime(settings: Settings, models: Path) -> Iterator[Runtime]:
    """A runtime in this process whose offline chunks may yield after any mini-batch."""
    tiers = dict(settings.tiers)
    tiers[Tier.OFFLINE] = tiers[Tier.OFFLINE].model_copy(update={"preempt_min_slice_s": 0.0})
    rt = Runtime(Services.open(settings.model_copy(update={"tiers": tiers})),
                 worker="retrieval-test")
    rt.setup_kinds()
    yield rt
    rt.close()


def _embed(client: Client, runtime: Runtime, texts: list[str], model: str = "tiny"
           ) -> JobHandle:
    handle = client.submit("embed", {"texts": texts, "model": model})
    runtime.execute_batch("embed", model, "interactive", f"embed-{handle.id}")
    assert handle.status() == "succeeded"
    return handle


def _embed_bulk(client: Client, runtime: Runtime, texts: list[str], chunk_size: int
                ) -> JobHandle:
    handle = client.submit_bulk("embed", texts, params={"model": "tiny"}, chunk_size=chunk_size)
    for chunk in client.chunks(handle.id):
        assert runtime.execute(chunk.id) == "succeeded"
    return handle


def _run_chunks(client: Client, runtime: Runtime, handle: JobHandle) -> None:
    for chunk in client.chunks(handle.id):
        assert runtime.execute(chunk.id) == "succeeded"


def _search(client: Client, runtime: Runtime, index: str, **query: Any) -> dict[str, Any]:
    handle = submit_search(client, index, **query)
    runtime.execute_batch("search", index, "interactive", f"search-{handle.id}")
    result: dict[str, Any] = handle.result(timeout=1)
    return result


def _brute_force(matrix: np.ndarray, ids: list[str], query: np.ndarray, k: int
                 ) -> tuple[list[str], np.ndarray]:
    scores = matrix @ query
    order = np.argsort(-scores, kind="stable")[:k]
    return [ids[i] for i in order], scores[order]


def _job_count(client: Client) -> int:
    with client.services.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(jobs)).scalar_one())


def test_an_index_built_from_plain_and_bulk_embed_jobs_answers_exact_nearest_neighbours(
    client: Client, runtime: Runtime
) -> None:
    a = _embed(client, runtime, TEXTS[:3])
    b = _embed(client, runtime, TEXTS[3:5])
    bulk = _embed_bulk(client, runtime, TEXTS[5:], chunk_size=4)  # 9 texts: chunks 4, 4, 1
    handle = submit_index(client, "docs", [a.id, b.id, bulk.id], chunk_size=2)
    assert handle.job().tier == "offline" and handle.job().items_total == 5  # 2 jobs + 3 chunks
    _run_chunks(client, runtime, handle)
    rows = list(client.bulk_results(handle.id, timeout=1))
    assert [r["added"] for r in rows] == [3, 2, 4, 4, 1]
    assert all(r["already_present"] == 0 for r in rows)

    manifest = VectorIndex(index_root(client.settings.state_dir), "docs").manifest()
    assert (manifest.count, manifest.dim, manifest.model) == (14, 8, "tiny")
    assert manifest.version == 3 and len(manifest.sources) == 5  # one commit per index chunk
    matrix = np.concatenate([a.result(timeout=1), b.result(timeout=1),
                             np.stack(list(client.bulk_results(bulk.id, timeout=1)))])
    ids = ([f"{a.id}:{i}" for i in range(3)] + [f"{b.id}:{i}" for i in range(2)]
           + [f"{bulk.id}:{i}" for i in range(9)])

    rng = np.random.default_rng(7)
    queries = rng.standard_normal((3, 8)).astype(np.float32)
    found = _search(client, runtime, "docs", vectors=queries, k=5)
    assert found["version"] == 3 and found["model"] == "tiny"
    for query, hits in zip(queries, found["hits"], strict=True):
        want_ids, want_scores = _brute_force(matrix, ids, query, 5)
        assert [h["id"] for h in hits] == want_ids
        assert [h["score"] for h in hits] == pytest.approx(want_scores.tolist(), rel=1e-5)
    # A text query is embedded with the index's model: its own text is its nearest neighbour.
    text_hits = _search(client, runtime, "docs", queries=[TEXTS[9], TEXTS[1]], k=3)["hits"]
    assert text_hits[0][0]["id"] == f"{bulk.id}:4" and text_hits[0][0]["text"] == TEXTS[9]
    assert text_hits[1][0]["id"] == f"{a.id}:1" and text_hits[1][0]["score"] == \
        pytest.approx(1.0, abs=1e-4)
    assert len(text_hits[0]) == 3


def test_extending_an_index_adds_only_new_vectors_and_search_sees_the_new_version(
    client: Client, runtime: Runtime
) -> None:
    a = _embed(client, runtime, TEXTS[:4])
    b = _embed(client, runtime, TEXTS[4:7])
    first = submit_index(client, "docs", [a.id])
    _run_chunks(client, runtime, first)
    index = VectorIndex(index_root(client.settings.state_dir), "docs")
    assert (index.manifest().count, index.manifest().version) == (4, 1)
    b_vector = b.result(timeout=1)[0]
    before = _search(client, runtime, "docs", vectors=[b_vector.tolist()], k=1)
    assert before["version"] == 1 and before["hits"][0][0]["id"].startswith(a.id)

    labelled = {"job": b.id, "ids": ["doc-x", "doc-y", "doc-z"],
                "metadata": [{"lang": "en"}, {"lang": "fr"}, {"lang": "de"}]}
    second = submit_index(client, "docs", [a.id, labelled])
    _run_chunks(client, runtime, second)
    rows = list(client.bulk_results(second.id, timeout=1))
    assert [(r["added"], r["already_present"]) for r in rows] == [(0, 1), (3, 0)]
    [chunk] = client.chunks(second.id)
    assert runtime.execute(chunk.id) is None  # a duplicate delivery changes nothing
    third = submit_index(client, "docs", [b.id, a.id])  # everything already there
    _run_chunks(client, runtime, third)
    manifest = index.manifest()
    assert (manifest.count, manifest.version) == (7, 2)

    after = _search(client, runtime, "docs", vectors=[b_vector.tolist()], k=1)
    assert after["version"] == 2
    assert after["hits"][0][0]["id"] == "doc-x" and after["hits"][0][0]["meta"] == {"lang": "en"}
    assert runtime.resources["search"].indexes.loads == 2  # loaded once per version


def test_a_preempted_index_job_resumes_with_every_vector_exactly_once(
    client: Client, runtime: Runtime
) -> None:
    extra = ["the dog writes", "a cat reads", "the sun is big", "a river of snow",
             "the plane flies fast", "an invoice for the payment"]
    bulk = _embed_bulk(client, runtime, TEXTS + extra, chunk_size=1)
    handle = submit_index(client, "docs", [bulk.id])  # 20 units, one index chunk
    [chunk] = client.chunks(handle.id)
    index = VectorIndex(index_root(client.settings.state_dir), "docs")
    urgent = client.submit("burn", {"ms": 1}, tier="nearline")  # nearline work waits above
    assert runtime.execute(chunk.id) == "queued"
    assert (client.get(chunk.id).items_done, index.manifest().count) == (8, 8)
    assert [a.outcome for a in client.attempts(chunk.id)] == ["preempted"]
    assert runtime.execute(chunk.id) == "queued"  # resumed at 8, yields again at 16
    assert index.manifest().count == 16
    # Next, the resume cannot see its checkpoint and redoes the chunk from the start (as on a
    # crash after a commit but before its checkpoint): committed sources are skipped.
    for part in Path(handle.job().result_ref or "").glob("*.part-*"):
        part.unlink()
    urgent.cancel()
    client.services.redis.flushdb()
    assert runtime.execute(chunk.id) == "succeeded"
    manifest = index.manifest()
    rows = [row for s in manifest.segments for row in index.read_segment(s)[1]]
    assert manifest.count == 20 == len(rows)
    assert [s["count"] for s in manifest.segments] == [8, 8, 4]
    assert sorted(r["id"] for r in rows) == sorted(f"{bulk.id}:{i}" for i in range(20))
    assert sorted(r["source"] for r in rows) == sorted(c.id for c in client.chunks(bulk.id))
    results = list(client.bulk_results(handle.id, timeout=1))
    assert [r["added"] for r in results] == [0] * 16 + [1] * 4  # the redo's own account
    assert [r["already_present"] for r in results] == [1] * 16 + [0] * 4


def test_evaluate_reports_recall_mrr_and_accuracy_on_a_hand_checked_case(
    client: Client, runtime: Runtime, tmp_path: Path
) -> None:
    docs = _embed(client, runtime, TEXTS[:6])
    _run_chunks(client, runtime, submit_index(client, "docs", [docs.id]))
    vectors = docs.result(timeout=1)
    ids = [f"{docs.id}:{i}" for i in range(6)]
    second_of_2 = ids[int(np.argsort(-(vectors @ vectors[2]), kind="stable")[1])]
    queries = [
        {"vector": vectors[0].tolist(), "relevant": [ids[0]]},             # rank 1
        {"vector": vectors[1].tolist(), "relevant": [ids[1], "missing"]},  # rank 1, half found
        {"vector": vectors[2].tolist(), "relevant": [second_of_2]},        # rank 2
        {"query": TEXTS[3], "relevant": [ids[3]]},                         # rank 1, embedded
        {"vector": vectors[4].tolist(), "relevant": ["missing"]},          # not found
    ]
    rows = np.random.default_rng(3).standard_normal((6, 16)).astype(np.float32)
    scored = client.submit("score", {"rows": rows.tolist(), "model": "scoring-synthetic"})
    runtime.execute_batch("score", "scoring-synthetic@0.8", "nearline", "score-1")
    predicted = [r["label"] for r in scored.result(timeout=1)]
    labels = [*predicted[:5], 1 - predicted[5]]  # the models get 5 of 6 right
    rows_file = tmp_path / "rows.jsonl"
    rows_file.write_text("".join(json.dumps({"row": r.tolist(), "label": lab}) + "\n"
                                 for r, lab in zip(rows, labels, strict=True)))

    handle = submit_evaluate(client, index="docs", queries=queries, rows=rows_file, ks=[1, 5],
                             score_model="scoring-synthetic", chunk_size=4)
    assert len(client.chunks(handle.id)) == 3
    _run_chunks(client, runtime, handle)
    report = evaluation_report(client, handle.id, timeout=1)
    assert report["queries"] == 5 and report["rows"] == 6
    assert report["recall_at"] == pytest.approx({"1": (1 + .5 + 0 + 1 + 0) / 5,
                                                 "5": (1 + .5 + 1 + 1 + 0) / 5})
    assert report["mrr"] == pytest.approx((1 + 1 + .5 + 1 + 0) / 5)
    assert report["hit_rate_at"] == pytest.approx({"1": 3 / 5, "5": 4 / 5})
    assert report["accuracy"] == pytest.approx(5 / 6) and report["correct"] == 5
    assert report["embedding_models"] == ["tiny"] and report["index_versions"] == [1]
    assert report["scoring_model"] == "scoring-synthetic"
    assert set(report["answered_by"]) <= {"scoring-synthetic/small", "scoring-synthetic/large"}
    stored = json.loads((client.settings.state_dir / "results" / handle.id / "report.json")
                        .read_text())
    assert stored == report


def test_bad_retrieval_inputs_are_refused_at_the_edge_and_change_nothing(
    client: Client, runtime: Runtime
) -> None:
    with pytest.raises(UnknownIndex, match="nope"):
        submit_search(client, "nope", queries=["x"])
    docs = _embed(client, runtime, TEXTS[:3])
    _run_chunks(client, runtime, submit_index(client, "docs", [docs.id]))
    index = VectorIndex(index_root(client.settings.state_dir), "docs")
    echo = client.submit("echo", {"x": 1})
    runtime.execute(echo.id)
    pending = client.submit("embed", {"texts": ["later"], "model": "tiny"})
    other_model = _embed(client, runtime, ["elsewhere"], model="tiny2")
    count = _job_count(client)

    with pytest.raises(DimensionMismatch, match="8-dimensional"):
        submit_search(client, "docs", vectors=[[0.1, 0.2, 0.3]])
    for sources, message in [
        ([echo.id], "'echo' job"), ([pending.id], "queued"), (["no-such-job"], "no such job"),
        ([], "no sources"), ([{"job": docs.id, "ids": ["only-one"]}], "ids has 1 entries"),
        ([other_model.id], "model 'tiny2'"),
    ]:
        with pytest.raises(InvalidSource, match=message):
            submit_index(client, "docs", sources)
    with pytest.raises(DimensionMismatch):
        submit_evaluate(client, index="docs", queries=[
            {"vector": [0.0] * 8, "relevant": ["a"]}, {"vector": [1.0, 2.0], "relevant": ["b"]}])
    with pytest.raises(UnknownIndex, match="name"):
        submit_index(client, "../escape", [docs.id])
    for vector in ([float("nan")] * 8, [1e39] * 8):  # a raw DataError, or NaN scores
        with pytest.raises(InvalidPayload, match="vectors"):
            client.submit("search", {"index": "docs", "vectors": [vector]})
    with pytest.raises(InvalidPayload, match="same length"):  # was retried in the worker
        client.submit("evaluate", {"index": "docs", "items": [
            {"vector": [0.0] * 8, "relevant": ["a"]}, {"vector": [1.0, 2.0], "relevant": ["b"]}]},
            window=None)
    assert _job_count(client) == count
    assert (index.manifest().count, index.manifest().version) == (3, 1)

    # The same inputs submitted past the edge fail in the worker, at once and changing nothing.
    lost = client.submit("search", {"index": "nope", "queries": ["x"]})
    runtime.execute_batch("search", "nope", "interactive", "bad-search")
    with pytest.raises(JobFailed, match="UnknownIndex"):
        lost.result(timeout=1)
    wrong = client.submit("index", {"index": "docs", "sources": [{"job": echo.id}]},
                          window=None)
    [chunk] = client.chunks(wrong.id)  # a plain submit of a chunked kind is a bulk job
    assert runtime.execute(chunk.id) == "failed"
    with pytest.raises(JobFailed, match="InvalidSource"):
        wrong.result(timeout=1)
    assert lost.job().attempts == 1 and client.get(chunk.id).attempts == 1
    assert (index.manifest().count, index.manifest().version) == (3, 1)


@pytest.mark.e2e
def test_embed_index_and_search_through_real_workers(
    client: Client, models: Path, start_worker: Callable[..., WorkerProcess]
) -> None:
    start_worker(concurrency=1)
    bulk = client.submit_bulk("embed", TEXTS[:10], params={"model": "tiny"}, chunk_size=4)
    plain = client.submit("embed", {"texts": TEXTS[10:], "model": "tiny"})
    client.wait([bulk, plain], timeout=60)
    built = submit_index(client, "docs", [bulk.id, plain.id])
    assert built.result(timeout=60)["items"] == 4
    matrix = np.concatenate([np.stack(list(client.bulk_results(bulk.id))),
                             plain.result(timeout=1)])
    ids = [f"{bulk.id}:{i}" for i in range(10)] + [f"{plain.id}:{i}" for i in range(4)]
    query = np.random.default_rng(11).standard_normal(8).astype(np.float32)
    hits = submit_search(client, "docs", vectors=[query.tolist()], k=4).result(timeout=30)
    assert [h["id"] for h in hits["hits"][0]] == _brute_force(matrix, ids, query, 4)[0]

    extra = client.submit("embed", {"texts": ["a brand new sentence"], "model": "tiny"})
    extra_vector = extra.result(timeout=30)[0]
    submit_index(client, "docs", [extra.id, plain.id]).result(timeout=60)
    again = submit_search(client, "docs", vectors=[extra_vector.tolist()], k=1
                          ).result(timeout=30)
    assert again["version"] == 2 and again["hits"][0][0]["id"] == f"{extra.id}:0"
    manifest = VectorIndex(index_root(client.settings.state_dir), "docs").manifest()
    assert manifest.count == 15 and len(manifest.sources) == 5


def test_index_and_evaluate_wait_for_the_offpeak_window_unless_told_otherwise(
    client: Client, runtime: Runtime, models: Path
) -> None:
    docs = _embed(client, runtime, ["alpha", "beta"])
    deferred = retrieval.submit_index(client, "docs", [docs.id])
    plain = client.submit("index", {"index": "docs", "sources": [{"job": docs.id}]})
    for handle in (deferred, plain):
        chunks = client.chunks(handle.id)
        assert chunks and {c.state for c in chunks} == {"deferred"}
        assert {c.window for c in chunks} == {"offpeak"}
    now = client.submit("index", {"index": "docs", "sources": [{"job": docs.id}]}, window=None)
    assert {c.state for c in client.chunks(now.id)} == {"queued"}


def test_ties_at_the_k_th_hit_go_to_the_earlier_vectors() -> None:
    from orchestrator.vector_index import LoadedIndex, Manifest

    n = 300  # identical vectors: every score ties
    matrix = np.tile(np.array([[1, 0, 0, 0]], np.float32), (n, 1))
    loaded = LoadedIndex(Manifest("ix", 4, "tiny", n, 1, "", "", [], {}), None, matrix,
                         [{"id": str(i)} for i in range(n)], {})
    query = np.array([[1, 0, 0, 0]], np.float32)
    # argpartition picked any 5 of the 300 (e.g. 283-287), so a query's hits depended on
    # the other queries of its batch (k is the batch's largest).
    for k in (1, 5, 299, 300):
        positions, scores = loaded.top_k(query, k)
        assert positions[0].tolist() == list(range(k)) and scores.shape == (1, k)
    scored = np.array([[0.0], [2.0], [1.0], [2.0], [1.0]], np.float32)
    mixed = LoadedIndex(Manifest("iy", 1, "tiny", 5, 1, "", "", [], {}), None, scored,
                        [{"id": str(i)} for i in range(5)], {})
    positions, scores = mixed.top_k(np.array([[1.0]], np.float32), 3)
    assert positions[0].tolist() == [1, 3, 2] and scores[0].tolist() == [2.0, 2.0, 1.0]
    # Fewer than k scores that are numbers: NaN ranks last (the k-th was NaN, nothing was
    # >= it, and the whole batch call raised).
    nan = LoadedIndex(Manifest("iz", 1, "tiny", 3, 1, "", "", [], {}), None,
                      np.array([[np.nan], [1.0], [np.nan]], np.float32),
                      [{"id": str(i)} for i in range(3)], {})
    positions, scores = nan.top_k(np.array([[1.0]], np.float32), 3)
    assert positions[0].tolist()[0] == 1 and scores[0][0] == 1.0
    assert np.isneginf(scores[0][1:]).all()
