"""Tiny deterministic ONNX models built with ``onnx.helper``, for tests, demos and benchmarks.

Nothing here needs torch. ``onnx`` is a dev/export dependency only, so it is imported inside the
functions that write graphs; a worker that merely runs models never imports this module's
builders.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import onnx

OPSET = 17
PAD_TOKEN = "[PAD]"
UNK_TOKEN = "[UNK]"
# fmt: off
DEFAULT_VOCAB: tuple[str, ...] = (
    "the", "a", "an", "of", "to", "in", "and", "is", "it", "on", "for", "with", "at", "by",
    "cat", "dog", "bird", "fish", "car", "train", "plane", "boat", "house", "tree", "river",
    "city", "sun", "moon", "rain", "snow", "red", "blue", "green", "big", "small", "fast",
    "slow", "old", "new", "runs", "sleeps", "eats", "flies", "swims", "reads", "writes",
    "search", "query", "document", "invoice", "payment", "fraud", "score", "model",
)
# fmt: on
MLP_HIDDEN = 64
BATCH = 250


def build_tiny_embedding_model(
    out_dir: Path,
    *,
    vocab: list[str] | None = None,
    dim: int = 8,
    seed: int = 0,
    pooled: bool = True,
) -> tuple[Path, Path]:
    """Write ``model.onnx`` and ``tokenizer.json``: a word-level bag-of-embeddings model.

    The tokenizer is WordLevel over ``[PAD]`` (id 0), ``[UNK]`` (id 1) and ``vocab`` with a
    lowercasing normaliser and a whitespace pre-tokenizer; truncation and padding are left to
    the caller. The graph gathers rows of a seeded random table for ``input_ids`` and, with
    ``pooled`` (the default), mean-pools them under ``attention_mask`` and L2-normalises to
    ``sentence_embedding`` [batch, dim]. With ``pooled=False`` it outputs the raw
    ``token_embeddings`` [batch, seq, dim], like a bare transformer export.

    Returns:
        ``(model_path, tokenizer_path)``.
    """
    from onnx import TensorProto, helper, numpy_helper

    words = list(DEFAULT_VOCAB if vocab is None else vocab)
    token_ids = {PAD_TOKEN: 0, UNK_TOKEN: 1}
    for word in words:
        token_ids.setdefault(word.lower(), len(token_ids))
    table = np.random.default_rng(seed).standard_normal((len(token_ids), dim)).astype(np.float32)

    nodes = [helper.make_node("Gather", ["table", "input_ids"], ["token_embeddings"], axis=0)]
    initializers = [numpy_helper.from_array(table, "table")]
    if pooled:
        output = helper.make_tensor_value_info(
            "sentence_embedding", TensorProto.FLOAT, ["batch", dim]
        )
        nodes += _mean_pool_and_normalise(
            "token_embeddings", "attention_mask", "sentence_embedding"
        )
        initializers += [
            numpy_helper.from_array(np.array([1], dtype=np.int64), "axis_1"),
            numpy_helper.from_array(np.array([-1], dtype=np.int64), "axis_last"),
            numpy_helper.from_array(np.array(1e-9, dtype=np.float32), "eps"),
        ]
    else:
        output = helper.make_tensor_value_info(
            "token_embeddings", TensorProto.FLOAT, ["batch", "sequence", dim]
        )
    graph = helper.make_graph(
        nodes,
        "tiny_embedding",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
            helper.make_tensor_value_info(
                "attention_mask", TensorProto.INT64, ["batch", "sequence"]
            ),
        ],
        [output],
        initializer=initializers,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    model_path = out_dir / "model.onnx"
    _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)]), model_path)
    tokenizer_path = out_dir / "tokenizer.json"
    tokenizer_path.write_text(json.dumps(_word_level_tokenizer(token_ids), indent=1))
    return model_path, tokenizer_path


def _mean_pool_and_normalise(tokens: str, mask: str, out: str) -> list[Any]:
    from onnx import TensorProto, helper

    node = helper.make_node
    return [
        node("Cast", [mask], ["mask_f"], to=TensorProto.FLOAT),
        node("Unsqueeze", ["mask_f", "axis_last"], ["mask_3d"]),
        node("Mul", [tokens, "mask_3d"], ["masked"]),
        node("ReduceSum", ["masked", "axis_1"], ["summed"], keepdims=0),
        node("ReduceSum", ["mask_f", "axis_1"], ["counts"], keepdims=1),
        node("Max", ["counts", "eps"], ["counts_safe"]),
        node("Div", ["summed", "counts_safe"], ["mean"]),
        node("Mul", ["mean", "mean"], ["squares"]),
        node("ReduceSum", ["squares", "axis_last"], ["sum_squares"], keepdims=1),
        node("Sqrt", ["sum_squares"], ["norm"]),
        node("Max", ["norm", "eps"], ["norm_safe"]),
        node("Div", ["mean", "norm_safe"], [out]),
    ]


def _word_level_tokenizer(token_ids: dict[str, int]) -> dict[str, Any]:
    # The serialised form of tokenizers' WordLevel model, so the file is plain data and this
    # function does not depend on the tokenizers version's Python builder API.
    special = [
        {
            "id": token_ids[tok],
            "content": tok,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for tok in (PAD_TOKEN, UNK_TOKEN)
    ]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": special,
        "normalizer": {"type": "Lowercase"},
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": None,
        "decoder": None,
        "model": {"type": "WordLevel", "vocab": token_ids, "unk_token": UNK_TOKEN},
    }


# --- scoring models --------------------------------------------------------------------------


@dataclass(frozen=True)
class ScoringTraining:
    """Weights of the two scorers trained by :func:`train_scoring_models`, and their accuracy."""

    n_features: int
    small: tuple[np.ndarray, np.ndarray]
    large: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
    small_accuracy: float
    large_accuracy: float
    holdout: tuple[np.ndarray, np.ndarray]


def synthetic_classification(
    n: int, n_features: int, *, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """A binary task with a linear part and an interaction a line cannot fit.

    The task (its decision function) depends only on ``n_features``; ``seed`` draws the rows,
    so a different seed gives fresh samples of the same task.

    Returns:
        ``(features float32 [n, n_features], labels int64 [n])``.

    Raises:
        ValueError: ``n_features`` is below 3.
    """
    if n_features < 3:
        raise ValueError(f"n_features must be at least 3, got {n_features}")
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, n_features)).astype(np.float32)
    direction = np.random.default_rng(n_features).standard_normal(n_features).astype(np.float32)
    direction /= np.linalg.norm(direction)
    z = (
        1.2 * (x @ direction)
        + 1.5 * x[:, 0] * x[:, 1]
        - 0.8 * (x[:, 2] ** 2 - 1.0)
        + 0.3 * rng.standard_normal(n).astype(np.float32)
    )
    return x, (z > 0).astype(np.int64)


def train_scoring_models(
    *, n_features: int = 16, seed: int = 0, n_train: int = 2000, n_holdout: int = 1000
) -> ScoringTraining:
    """Fit a logistic regression (full batch) and a one-hidden-layer ReLU MLP (mini-batch Adam).

    Mini-batches of ``BATCH`` rows keep every matrix product under OpenBLAS's threading
    threshold: on a busy 2-core machine its spinning threads made full-batch training 4x slower.
    """
    x, y = synthetic_classification(n_train + n_holdout, n_features, seed=seed)
    x_train, y_train, x_hold, y_hold = x[:n_train], y[:n_train], x[n_train:], y[n_train:]
    onehot = np.eye(2, dtype=np.float32)[y_train]
    rng = np.random.default_rng(seed + 2)
    batches = [slice(i, i + BATCH) for i in range(0, n_train, BATCH)]

    def logistic_grads(params: list[np.ndarray], step: int) -> list[np.ndarray]:
        w, b = params
        delta = (_softmax(x_train @ w + b) - onehot) / n_train
        return [x_train.T @ delta, delta.sum(axis=0)]

    def mlp_grads(params: list[np.ndarray], step: int) -> list[np.ndarray]:
        w1, b1, w2, b2 = params
        rows = batches[step % len(batches)]
        xb = x_train[rows]
        pre = xb @ w1 + b1
        hidden = np.maximum(pre, 0.0)
        delta = (_softmax(hidden @ w2 + b2) - onehot[rows]) / len(xb)
        back = (delta @ w2.T) * (pre > 0)
        return [xb.T @ back, back.sum(axis=0), hidden.T @ delta, delta.sum(axis=0)]

    small = _adam(
        [np.zeros((n_features, 2), np.float32), np.zeros(2, np.float32)],
        logistic_grads,
        steps=200,
        lr=0.05,
    )
    large = _adam(
        [
            (rng.standard_normal((n_features, MLP_HIDDEN)) * np.sqrt(2 / n_features)).astype(
                np.float32
            ),
            np.zeros(MLP_HIDDEN, np.float32),
            (rng.standard_normal((MLP_HIDDEN, 2)) * np.sqrt(1 / MLP_HIDDEN)).astype(np.float32),
            np.zeros(2, np.float32),
        ],
        mlp_grads,
        steps=50 * len(batches),
        lr=0.01,
    )
    return ScoringTraining(
        n_features=n_features,
        small=(small[0], small[1]),
        large=(large[0], large[1], large[2], large[3]),
        small_accuracy=_accuracy(x_hold, y_hold, small),
        large_accuracy=_accuracy(x_hold, y_hold, large),
        holdout=(x_hold, y_hold),
    )


def _accuracy(x: np.ndarray, y: np.ndarray, params: list[np.ndarray]) -> float:
    correct = 0
    for start in range(0, len(x), BATCH):
        logits = x[start : start + BATCH] @ params[0] + params[1]
        if len(params) == 4:
            logits = np.maximum(logits, 0.0) @ params[2] + params[3]
        correct += int((logits.argmax(axis=1) == y[start : start + BATCH]).sum())
    return correct / len(x)


def build_scoring_models(
    out_dir: Path, *, n_features: int = 16, seed: int = 0
) -> tuple[Path, Path]:
    """Train the two scorers and write ``model-small.onnx`` and ``model-large.onnx``.

    Both graphs take ``features`` float32 [N, n_features] and give ``probabilities`` float32
    [N, 2]. Each file records its held-out accuracy in its metadata (``holdout_accuracy``,
    readable as ``ScoringModel.metadata``); the large one is the more accurate.

    Returns:
        ``(small_path, large_path)``.
    """
    from onnx import helper, numpy_helper

    trained = train_scoring_models(n_features=n_features, seed=seed)
    node = helper.make_node
    w, b = trained.small
    small = _scoring_graph(
        "logistic_regression",
        [node("MatMul", ["features", "w"], ["mm"]), node("Add", ["mm", "b"], ["logits"])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
        n_features,
    )
    w1, b1, w2, b2 = trained.large
    large = _scoring_graph(
        "mlp",
        [
            node("MatMul", ["features", "w1"], ["mm1"]),
            node("Add", ["mm1", "b1"], ["pre"]),
            node("Relu", ["pre"], ["hidden"]),
            node("MatMul", ["hidden", "w2"], ["mm2"]),
            node("Add", ["mm2", "b2"], ["logits"]),
        ],
        [
            numpy_helper.from_array(a, n)
            for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"))
        ],
        n_features,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = out_dir / "model-small.onnx", out_dir / "model-large.onnx"
    for model, path, accuracy in (
        (small, paths[0], trained.small_accuracy),
        (large, paths[1], trained.large_accuracy),
    ):
        helper.set_model_props(
            model, {"holdout_accuracy": f"{accuracy:.4f}", "n_features": str(n_features)}
        )
        _save(model, path)
    return paths


def _scoring_graph(
    name: str, nodes: Sequence[Any], initializers: Sequence[Any], n_features: int
) -> onnx.ModelProto:
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [*nodes, helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1)],
        name,
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", n_features])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 2])],
        initializer=list(initializers),
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def _adam(
    params: list[np.ndarray],
    grads: Callable[[list[np.ndarray], int], list[np.ndarray]],
    *,
    steps: int,
    lr: float,
) -> list[np.ndarray]:
    first = [np.zeros_like(p) for p in params]
    second = [np.zeros_like(p) for p in params]
    for t in range(1, steps + 1):
        for p, g, m, v in zip(params, grads(params, t - 1), first, second, strict=True):
            m *= 0.9
            m += 0.1 * g
            v *= 0.999
            v += 0.001 * g * g
            p -= lr * (m / (1 - 0.9**t)) / (np.sqrt(v / (1 - 0.999**t)) + 1e-8)
    return params


def _save(model: onnx.ModelProto, path: Path) -> None:
    import onnx

    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
