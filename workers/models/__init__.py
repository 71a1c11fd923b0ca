"""Model sessions of the data plane: sentence embeddings and tabular scorers on onnxruntime.

A worker process builds its sessions once (in ``worker_process_init``) and reuses them for every
batch. ``builders`` makes tiny ONNX models for tests (needs ``onnx``); ``export`` writes the real
ones into the model dir (needs the ``export`` extra: torch and the packaged MiniLM weights).
"""

from workers.models.embedding import DEFAULT_EMBEDDING_MODEL, EmbeddingModel
from workers.models.scoring import (
    DEFAULT_SCORING_MODEL,
    EscalatingScorer,
    ScoreBatch,
    ScoringModel,
)

__all__ = [
    "DEFAULT_EMBEDDING_MODEL",
    "DEFAULT_SCORING_MODEL",
    "EmbeddingModel",
    "EscalatingScorer",
    "ScoreBatch",
    "ScoringModel",
]
