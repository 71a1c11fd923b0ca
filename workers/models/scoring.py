"""Tabular scoring models, and a cascade that asks a larger model only when the small one is unsure.

A scoring model is any ONNX classifier with one float32 input [N, n_features] whose first output
(or the one named ``probabilities``) holds class probabilities [N, n_classes]. In the model dir a
scorer pair lives at ``<model_dir>/<name>/model-small.onnx`` and ``model-large.onnx``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from orchestrator.errors import ConfigurationError, PermanentError
from workers.models._session import metadata, open_session

DEFAULT_SCORING_MODEL = "scoring-synthetic"
PROBABILITIES = "probabilities"


class ScoringModel:
    """One onnxruntime session over a classifier that outputs class probabilities."""

    def __init__(self, path: Path, *, intra_op_threads: int = 1, name: str | None = None) -> None:
        """Load the graph.

        Raises:
            ConfigurationError: the file is missing or unreadable, or its input or output is
                not a 2-D float tensor.
        """
        path = Path(path)
        self._session = open_session(path, intra_op_threads=intra_op_threads)
        inputs = self._session.get_inputs()
        if len(inputs) != 1 or inputs[0].type != "tensor(float)" or len(inputs[0].shape) != 2:
            raise ConfigurationError(
                f"scoring model {path} must take one float32 input [N, n_features]; it takes "
                + ", ".join(f"{i.name} {i.type} {i.shape}" for i in inputs)
            )
        self._input = inputs[0].name
        width = inputs[0].shape[1]
        self._n_features: int | None = width if isinstance(width, int) else None
        outputs = {o.name: o for o in self._session.get_outputs()}
        output = outputs.get(PROBABILITIES) or self._session.get_outputs()[0]
        if output.type != "tensor(float)" or len(output.shape) != 2:
            raise ConfigurationError(
                f"scoring model {path}: output {output.name!r} is {output.type} {output.shape}; "
                "expected float32 probabilities [N, n_classes]"
            )
        self._output = output.name
        classes = output.shape[1]
        self._n_classes: int | None = classes if isinstance(classes, int) else None
        self._name = name or path.stem
        self.metadata = metadata(self._session)

    @classmethod
    def from_dir(
        cls, model_dir: Path, size: str, *, name: str = DEFAULT_SCORING_MODEL, **kw: Any
    ) -> ScoringModel:
        """Load ``<model_dir>/<name>/model-<size>.onnx``, named ``<name>/<size>``.

        Raises:
            ConfigurationError: the file is not there (run ``orchestrator models export``).
        """
        return cls(Path(model_dir) / name / f"model-{size}.onnx", name=f"{name}/{size}", **kw)

    @property
    def name(self) -> str:
        return self._name

    @property
    def n_features(self) -> int | None:
        """The input width the graph declares, or None when it is dynamic."""
        return self._n_features

    @property
    def n_classes(self) -> int | None:
        """The number of classes the graph declares, or None when it is dynamic."""
        return self._n_classes

    def predict_proba(self, rows: np.ndarray) -> np.ndarray:
        """Class probabilities, float32 [n, n_classes].

        Raises:
            PermanentError: ``rows`` is not a finite 2-D numeric array of the model's width.
        """
        batch = self._validate(rows)
        if batch.shape[0] == 0:
            return np.zeros((0, self._n_classes or 0), np.float32)
        (out,) = self._session.run([self._output], {self._input: batch})
        return np.asarray(out, dtype=np.float32)

    def _validate(self, rows: np.ndarray) -> np.ndarray:
        try:
            batch = np.asarray(rows, dtype=np.float32)
        except (TypeError, ValueError) as e:
            raise PermanentError(f"rows are not numeric: {e}") from e
        if batch.ndim != 2:
            raise PermanentError(f"rows must be 2-D [n, n_features], got shape {batch.shape}")
        if self._n_features is not None and batch.shape[1] != self._n_features:
            raise PermanentError(
                f"{self._name} takes {self._n_features} features per row, got {batch.shape[1]}"
            )
        if not np.isfinite(batch).all():
            bad = int(np.flatnonzero(~np.isfinite(batch).all(axis=1))[0])
            raise PermanentError(f"row {bad} has a NaN or infinite feature")
        return batch

    def __repr__(self) -> str:
        return f"ScoringModel(name={self._name!r}, n_features={self._n_features})"


@dataclass(frozen=True)
class ScoreBatch:
    """Per-row answers of an :class:`EscalatingScorer`, and what the escalation cost."""

    scores: np.ndarray
    """float32 [n]: the answering model's probability of ``labels``."""
    labels: np.ndarray
    """int64 [n]: the answering model's most probable class."""
    models: tuple[str, ...]
    """The name of the model that answered each row."""
    escalated: np.ndarray
    """bool [n]: True where the small model was unsure and the large one answered."""
    agreement: float | None
    """Fraction of escalated rows where small and large chose the same label; None if none."""

    @property
    def n_escalated(self) -> int:
        return int(self.escalated.sum())

    def __len__(self) -> int:
        return len(self.labels)

    def results(self) -> list[dict[str, Any]]:
        """One JSON-ready result per row."""
        return [
            {"score": float(s), "label": int(lab), "model": m, "escalated": bool(e)}
            for s, lab, m, e in zip(
                self.scores, self.labels, self.models, self.escalated, strict=True
            )
        ]


class EscalatingScorer:
    """Score every row with ``small``; rows it scores below ``threshold`` go to ``large``."""

    def __init__(self, small: ScoringModel, large: ScoringModel, threshold: float) -> None:
        """Pair two models over the same features.

        Raises:
            ConfigurationError: the threshold is not a finite number >= 0, or the models
                declare different input widths or class counts.
        """
        if not np.isfinite(threshold) or threshold < 0:
            raise ConfigurationError(f"threshold must be a finite number >= 0, got {threshold}")
        for what in ("n_features", "n_classes"):
            a, b = getattr(small, what), getattr(large, what)
            if a is not None and b is not None and a != b:
                raise ConfigurationError(
                    f"{small.name} has {what}={a} but {large.name} has {what}={b}"
                )
        self.small = small
        self.large = large
        self.threshold = float(threshold)

    def score(self, rows: np.ndarray) -> ScoreBatch:
        """Answer each row with the small model, or the large one where the small is unsure.

        Raises:
            PermanentError: the rows do not fit the models (see ``ScoringModel.predict_proba``).
        """
        batch = self.small._validate(rows)
        if len(batch) == 0:
            return ScoreBatch(
                np.zeros(0, np.float32), np.zeros(0, np.int64), (), np.zeros(0, bool), None
            )
        small_p = self.small.predict_proba(batch)
        scores = small_p.max(axis=1)
        labels = small_p.argmax(axis=1).astype(np.int64)
        escalated = scores < self.threshold
        agreement: float | None = None
        if escalated.any():
            large_p = self.large.predict_proba(batch[escalated])
            large_labels = large_p.argmax(axis=1).astype(np.int64)
            agreement = float((large_labels == labels[escalated]).mean())
            scores = scores.copy()
            scores[escalated] = large_p.max(axis=1)
            labels[escalated] = large_labels
        names = (self.small.name, self.large.name)
        return ScoreBatch(
            scores=scores.astype(np.float32, copy=False),
            labels=labels,
            models=tuple(names[int(e)] for e in escalated),
            escalated=escalated,
            agreement=agreement,
        )
