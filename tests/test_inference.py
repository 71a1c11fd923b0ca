"""``embed`` and ``score`` through the client and the runtime, on tiny ONNX models."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from orchestrator import Client, InvalidPayload, JobFailed
from orchestrator.errors import ConfigurationError
from orchestrator.model_check import FRESH_S, MAX_ANNOUNCED
from orchestrator.services import Services
from orchestrator.settings import Settings
from tests.conftest import WorkerProcess
from workers.models.builders import build_scoring_models, build_tiny_embedding_model
from workers.models.catalog import installed
from workers.registry import register
from workers.runtime import Runtime


@pytest.fixture
def models(settings: Settings, tmp_path: Path) -> Path:
    """A model dir with a tiny embedding model ("tiny") and the synthetic scoring pair."""
    model_path, tokenizer_path = build_tiny_embedding_model(tmp_path / "build")
    tiny = settings.model_dir / "tiny"
    tiny.mkdir(parents=True)
    shutil.copy(model_path, tiny / "model-int8.onnx")
    shutil.copy(tokenizer_path, tiny / "tokenizer.json")
    build_scoring_models(settings.model_dir / "scoring-synthetic")
    return settings.model_dir


@pytest.fixture
def runtime(settings: Settings, models: Path) -> Iterator[Runtime]:
    rt = Runtime(Services.open(settings), worker="inference-test")
    rt.setup_kinds()
    yield rt
    rt.close()


def test_embed_jobs_share_one_model_call_and_get_unit_vectors(
    client: Client, runtime: Runtime
) -> None:
    a = client.submit("embed", {"texts": ["the cat sat", "a dog"], "model": "tiny"})
    b = client.submit("embed", {"texts": ["the cat sat on the mat"], "model": "tiny"})
    assert a.job().tier == "interactive"
    runtime.execute_batch("embed", "tiny", "interactive", "m1")
    ja, jb = a.job(), b.job()
    assert ja.batch_id == jb.batch_id and ja.batch_size == 2
    va, vb = a.result(timeout=1), b.result(timeout=1)
    assert isinstance(va, np.ndarray) and va.dtype == np.float32  # stored as bytes, not floats
    assert va.shape[0] == 2 and vb.shape[0] == 1 and va.shape[1] == vb.shape[1]
    assert np.allclose(np.linalg.norm(va, axis=1), 1.0, atol=1e-5)
    assert ja.items == 2 and jb.items == 1
    # CPU is shared by tokens: 3 + 2 tokens against 6.
    assert ja.cpu_seconds / jb.cpu_seconds == pytest.approx(5 / 6, rel=1e-6)


def test_the_same_text_gets_the_same_vector_whatever_its_batch(
    client: Client, runtime: Runtime
) -> None:
    alone = client.submit("embed", {"texts": ["the cat"], "model": "tiny"}, tier="nearline")
    runtime.execute_batch("embed", "tiny", "nearline", "m1")
    crowd = client.submit("embed", {"texts": ["the cat", "a dog sat on the mat today"],
                                    "model": "tiny"}, tier="nearline")
    runtime.execute_batch("embed", "tiny", "nearline", "m2")
    assert np.allclose(alone.result(timeout=1)[0], crowd.result(timeout=1)[0], atol=1e-6)


def test_an_unknown_model_fails_the_job_permanently(client: Client, runtime: Runtime) -> None:
    handle = client.submit("embed", {"texts": ["x"], "model": "not-exported"})
    runtime.execute_batch("embed", "not-exported", "interactive", "m1")
    with pytest.raises(JobFailed, match=r"not-exported.*unavailable"):
        handle.result(timeout=1)
    assert handle.job().attempts == 1


def test_score_escalates_unsure_rows_and_says_which_model_answered(
    client: Client, runtime: Runtime
) -> None:
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(20, 16)).round(4).tolist()
    never = client.submit("score", {"rows": rows, "threshold": 0.0})
    runtime.execute_batch("score", "scoring-synthetic@0", "nearline", "m1")
    always = client.submit("score", {"rows": rows, "threshold": 1.0})
    runtime.execute_batch("score", "scoring-synthetic@1", "nearline", "m2")
    some = client.submit("score", {"rows": rows, "threshold": 0.9})
    runtime.execute_batch("score", "scoring-synthetic@0.9", "nearline", "m3")
    assert {r["model"] for r in never.result(timeout=1)} == {"scoring-synthetic/small"}
    assert not any(r["escalated"] for r in never.result(timeout=1))
    assert {r["model"] for r in always.result(timeout=1)} == {"scoring-synthetic/large"}
    mixed = some.result(timeout=1)
    assert len(mixed) == 20 and all(0.0 <= r["score"] <= 1.0 for r in mixed)
    for r, small, large in zip(mixed, never.result(timeout=1), always.result(timeout=1),
                               strict=True):
        assert r == (large if small["score"] < 0.9 else small)


def test_score_payloads_are_checked_at_submit(client: Client) -> None:
    with pytest.raises(InvalidPayload, match="same length"):
        client.submit("score", {"rows": [[1.0, 2.0], [3.0]]})
    with pytest.raises(InvalidPayload, match="threshold"):
        client.submit("score", {"rows": [[1.0]], "threshold": 2})
    with pytest.raises(InvalidPayload, match="texts"):
        client.submit("embed", {"texts": []})
    # Not finite, or past float32 (inf, then NaN, in the model): a raw DataError on
    # PostgreSQL, a NaN score on SQLite.
    for bad in (float("nan"), float("inf"), 1e39):
        with pytest.raises(InvalidPayload, match=r"rows\.0\.0"):
            client.submit("score", {"rows": [[bad, 1.0]]})


def test_a_row_the_model_overflows_on_fails_only_its_own_job(
    client: Client, runtime: Runtime
) -> None:
    good = client.submit("score", {"rows": [[0.1] * 16]})
    signs = (1, 1, 1, -1, -1, 1, -1, 1, 1, 1, -1, -1, -1, -1, 1, -1)
    huge = client.submit("score", {"rows": [[3e38 * s for s in signs]]})  # within float32
    runtime.execute_batch("score", "scoring-synthetic@0.8", "nearline", "m1")
    # Its NaN score went into the batch's finish, which PostgreSQL refused whole: every job of
    # the batch stayed running (on SQLite it "succeeded" with a NaN score).
    assert good.status() == "succeeded"
    assert huge.status() == "failed" and "not a finite number" in (huge.job().error or "")


def test_thresholds_that_print_alike_never_share_a_batch(client: Client, runtime: Runtime
                                                         ) -> None:
    a = client.submit("score", {"rows": [[0.1] * 16], "threshold": 0.93420774})
    b = client.submit("score", {"rows": [[0.1] * 16], "threshold": 0.93420794})
    assert runtime.execute_batch("score", "scoring-synthetic@0.93420774", "nearline", "m1") \
        == {a.id: "succeeded"}
    assert runtime.execute_batch("score", "scoring-synthetic@0.93420794", "nearline", "m2") \
        == {b.id: "succeeded"}


def test_a_row_of_the_wrong_width_fails_only_its_own_job(
    client: Client, runtime: Runtime
) -> None:
    good = client.submit("score", {"rows": [[0.1] * 16]})
    wrong = client.submit("score", {"rows": [[0.1] * 3]})
    runtime.execute_batch("score", "scoring-synthetic@0.8", "nearline", "m1")
    assert good.status() == "succeeded"
    assert wrong.status() == "failed"


def test_bulk_embed_streams_vectors_to_npy_files(client: Client, runtime: Runtime) -> None:
    texts = (f"the cat number {i}" for i in range(50))
    handle = client.submit_bulk("embed", texts, params={"model": "tiny"}, chunk_size=20)
    for chunk in client.chunks(handle.id):
        assert runtime.execute(chunk.id) == "succeeded"
        assert (chunk_ref := client.get(chunk.id).result_ref) and chunk_ref.endswith(".npy")
    vectors = np.stack(list(client.bulk_results(handle.id, timeout=1)))
    assert vectors.shape[0] == 50
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


@pytest.mark.e2e
def test_embed_and_score_run_end_to_end_on_all_three_tiers(
    client: Client, models: Path, start_worker: Callable[..., WorkerProcess]
) -> None:
    start_worker(concurrency=2)
    handles = []
    for tier in ("interactive", "nearline", "offline"):
        handles += [client.submit("embed", {"texts": [f"{tier} text {i}"], "model": "tiny"},
                                  tier=tier) for i in range(5)]
        handles.append(client.submit("score", {"rows": [[0.5] * 16] * 3}, tier=tier))
    jobs = client.wait(handles, timeout=60)
    assert [j.state for j in jobs] == ["succeeded"] * len(jobs)
    assert {j.tier for j in jobs} == {"interactive", "nearline", "offline"}
    # The live worker announced its models: one it does not hold is refused at the edge.
    with pytest.raises(InvalidPayload, match="has the embedding model 'not-exported'"):
        client.submit("embed", {"texts": ["x"], "model": "not-exported"})


def test_an_exported_model_truncates_texts_where_its_manifest_says(models: Path) -> None:
    from workers.models.embedding import EmbeddingModel

    long = " ".join(["word"] * 300)
    plain = EmbeddingModel.from_dir(models, "int8", name="tiny")
    assert plain.count_tokens([long]) == [128]  # no manifest: the constructor's default
    # MiniLM's export says 256, as the reference model truncates (a 200-token text embedded
    # at 128 had cosine 0.92 with the reference; at 256, 1.0).
    (models / "tiny" / "manifest.json").write_text('{"name": "tiny", "max_length": 256}')
    assert EmbeddingModel.from_dir(models, "int8", name="tiny").count_tokens([long]) == [256]


def test_arrays_are_stored_as_bytes_and_come_back_exactly() -> None:
    import json

    from orchestrator.results import decode_result, encode_array

    a = np.random.default_rng(1).normal(size=(3, 384)).astype(np.float32)
    stored = json.loads(json.dumps(encode_array(a)))
    back = decode_result(stored)
    assert back.dtype == np.float32 and back.shape == (3, 384) and np.array_equal(a, back)
    assert decode_result({"label": 1}) == {"label": 1}
    # A 0-d array or a numpy scalar came back with shape (1,).
    for odd in (np.float32(2.5), np.array(7, dtype=np.int64), np.zeros((0, 4), np.float32),
                np.arange(6, dtype=">i4").reshape(2, 3).T):
        again = decode_result(json.loads(json.dumps(encode_array(odd))))
        assert again.shape == np.shape(odd) and np.array_equal(again, odd)


def _announce(client: Client, name: str, tiers: list[str],
              models: dict[str, list[str]] | None) -> None:
    register(client.services.redis, name, tiers, 1, models=models)


def _jobs(client: Client) -> int:
    return len(client.services.store.find(limit=1000))


def test_a_model_no_live_worker_of_the_tier_holds_is_refused_at_submit(client: Client) -> None:
    _announce(client, "w1", ["interactive"], {"embedding": ["tiny"], "scoring": []})
    _announce(client, "w2", ["interactive", "offline"], {"embedding": ["other"], "scoring": []})
    with pytest.raises(InvalidPayload) as refused:
        client.submit("embed", {"texts": ["x"], "model": "missing"})
    [error] = refused.value.errors
    assert error["loc"] == ("model",) and error["type"] == "model_unavailable"
    assert "(they have: other, tiny)" in error["msg"]
    with pytest.raises(InvalidPayload, match="'missing'"):  # a bulk submit, at its first chunk
        client.submit_bulk("embed", iter(["a", "b"]), params={"model": "missing"},
                           tier="offline")
    with pytest.raises(InvalidPayload, match="scoring model 'scoring-synthetic'"):
        client.submit("score", {"rows": [[0.5] * 16]}, tier="interactive")
    assert _jobs(client) == 0  # refused: nothing stored
    client.submit("embed", {"texts": ["x"], "model": "tiny"})  # held by one of them
    client.submit("embed", {"texts": ["x"], "model": "tiny"}, tier="nearline")  # no live
    # worker serves nearline: the job waits for one, which may bring the model
    assert _jobs(client) == 2


def test_a_model_exported_a_moment_ago_is_not_refused_from_a_stale_reading(
    client: Client
) -> None:
    _announce(client, "w1", ["interactive"], {"embedding": ["tiny"], "scoring": []})
    client.submit("embed", {"texts": ["x"], "model": "tiny"})  # the reading is now cached
    _announce(client, "w1", ["interactive"], {"embedding": ["tiny", "new"], "scoring": []})
    time.sleep(FRESH_S)  # (a reading younger than this is trusted)
    client.submit("embed", {"texts": ["x"], "model": "new"})


def test_a_model_the_clients_own_model_dir_holds_is_never_refused(
    client: Client, models: Path
) -> None:
    # The embedded default: workers share the client's model dir, and find a model exported
    # since their last heartbeat there.
    _announce(client, "w1", ["interactive", "nearline"], {"embedding": [], "scoring": []})
    client.submit("embed", {"texts": ["x"], "model": "tiny"})
    client.submit("score", {"rows": [[0.5] * 16]})
    with pytest.raises(InvalidPayload, match="'missing'"):
        client.submit("embed", {"texts": ["x"], "model": "missing"})


def test_workers_that_do_not_announce_their_models_are_not_second_guessed(
    client: Client
) -> None:
    _announce(client, "w1", ["interactive"], {"embedding": ["tiny"], "scoring": []})
    _announce(client, "old", ["interactive"], None)  # a worker from before the announcement
    client.submit("embed", {"texts": ["x"], "model": "anything"})


def test_a_worker_announces_the_models_it_can_open(models: Path) -> None:
    (models / "half-exported").mkdir()
    (models / "half-exported" / "tokenizer.json").write_text("{}")
    assert installed(models, "int8") == {"embedding": ["tiny"], "scoring": ["scoring-synthetic"]}
    assert installed(models, "fp32") == {"embedding": [], "scoring": ["scoring-synthetic"]}
    assert installed(models / "nowhere", "int8") == {"embedding": [], "scoring": []}
    for i in range(MAX_ANNOUNCED):  # more than a worker announces: it announces none
        (models / f"m{i:04d}").mkdir()
        (models / f"m{i:04d}" / "model-small.onnx").touch()
        (models / f"m{i:04d}" / "model-large.onnx").touch()
    assert installed(models, "int8") is None


def test_a_model_family_no_worker_announces_is_not_theirs_to_judge(client: Client) -> None:
    _announce(client, "w1", ["interactive"], {"embedding": ["tiny"]})  # no scoring list
    client.submit("score", {"rows": [[0.5] * 16]}, tier="interactive")


def test_a_worker_runs_the_embedding_variant_its_settings_name(
    client: Client, settings: Settings, models: Path
) -> None:
    # A graph only the int8-rows file has (the tiny model under another name): the worker
    # opens model-int8-rows.onnx, and announces the model only for that variant.
    shutil.copy(models / "tiny" / "model-int8.onnx", models / "tiny" / "model-int8-rows.onnx")
    (models / "tiny" / "model-int8.onnx").unlink()
    rows = settings.model_copy(update={"embed_variant": "int8-rows"})
    assert installed(models, "int8-rows")["embedding"] == ["tiny"]  # type: ignore[index]
    assert installed(models, "int8")["embedding"] == []  # type: ignore[index]
    rt = Runtime(Services.open(rows), worker="rows-test")
    try:
        rt.setup_kinds()
        handle = client.submit("embed", {"texts": ["hello world"], "model": "tiny"})
        rt.execute_batch("embed", "tiny", "interactive", "m-rows")
        [vector] = handle.result(timeout=1)
        assert abs(float(np.linalg.norm(vector)) - 1) < 1e-5
    finally:
        rt.close()
    for bad in ("int4", "INT8", "int8-"):
        with pytest.raises(ConfigurationError, match=r"EMBED_VARIANT|embed_variant"):
            Settings.from_env({**settings.to_env(), "ORCH_EMBED_VARIANT": bad})
