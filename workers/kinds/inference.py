"""``embed`` and ``score``: batch kinds over onnxruntime models.

Both coalesce small jobs of the same model and tier into one model call (see
``orchestrator.batching``) and run bulk jobs as chunks. Model sessions and tokenizers live per
worker process: made once at process start by ``setup_models`` (the default embedding model is
loaded eagerly when its files are there), others on first use, then kept.
"""

from __future__ import annotations

import logging
import math
from typing import Annotated, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from orchestrator.errors import ConfigurationError, PermanentError
from orchestrator.kinds import BatchPolicy, JobContext, kind
from orchestrator.model_check import EMBEDDING, SCORER_SIZES, SCORING
from orchestrator.settings import Settings
from workers.models.embedding import DEFAULT_EMBEDDING_MODEL, EmbeddingModel
from workers.models.scoring import DEFAULT_SCORING_MODEL, EscalatingScorer, ScoringModel

log = logging.getLogger(__name__)

ModelName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")]
Text = Annotated[str, StringConstraints(min_length=1, max_length=100_000)]

#: float32's max as numpy prints it (3.4028235e+38, which still rounds to it): a feature or
#: vector element past it becomes inf, then NaN, in the model
FLOAT32_MAX = 3.4028235e38
#: a number the models take: finite, and within float32 (refused at submit, not in the worker)
Float32 = Annotated[float, Field(allow_inf_nan=False, ge=-FLOAT32_MAX, le=FLOAT32_MAX)]


class ModelCache:
    """The model sessions of one worker process."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._embedders: dict[str, EmbeddingModel] = {}
        self._scorers: dict[str, tuple[ScoringModel, ScoringModel]] = {}

    def embedder(self, name: str) -> EmbeddingModel:
        """Raises: PermanentError when the model's files are not in the model dir."""
        if name not in self._embedders:
            try:
                self._embedders[name] = EmbeddingModel.from_dir(
                    self.settings.model_dir, self.settings.embed_variant, name=name,
                    intra_op_threads=self.settings.model_threads)
            except ConfigurationError as e:
                raise PermanentError(f"embedding model {name!r} unavailable: {e}") from e
        return self._embedders[name]

    def scorer(self, name: str, threshold: float) -> EscalatingScorer:
        """Raises: PermanentError when the pair's files are not in the model dir."""
        if name not in self._scorers:
            try:
                self._scorers[name] = tuple(  # type: ignore[assignment]
                    ScoringModel.from_dir(self.settings.model_dir, size, name=name,
                                          intra_op_threads=self.settings.model_threads)
                    for size in SCORER_SIZES)
            except ConfigurationError as e:
                raise PermanentError(f"scoring model {name!r} unavailable: {e}") from e
        small, large = self._scorers[name]
        return EscalatingScorer(small, large, threshold)


def setup_models(settings: Settings) -> ModelCache:
    """Once per worker process: open the default embedding model if it is exported."""
    cache = ModelCache(settings)
    try:
        cache.embedder(DEFAULT_EMBEDDING_MODEL)
    except PermanentError as e:
        log.info("default embedding model not loaded at start: %s", e)
    return cache


def _slices(n: int, size: int) -> list[slice]:
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


# --- embed -----------------------------------------------------------------------------------


class EmbedPayload(BaseModel):
    """Texts to embed with one model; the result is one unit-length vector per text."""

    model_config = ConfigDict(extra="forbid")

    texts: list[Text] = Field(min_length=1, max_length=100_000)
    model: ModelName = DEFAULT_EMBEDDING_MODEL


@kind(
    "embed", schema=EmbedPayload, tier="interactive",
    batch=BatchPolicy(key=lambda p: p.model, bulk_field="texts", chunk_size=1024),
    setup=setup_models, model_of=lambda p: (EMBEDDING, p.model),
)
def embed(payloads: list[EmbedPayload], ctx: JobContext) -> list[np.ndarray]:
    """Embed every text of every job in model calls of ``ORCH_MODEL_BATCH`` texts."""
    cache: ModelCache = ctx.resources
    model = cache.embedder(payloads[0].model)
    texts = [text for p in payloads for text in p.texts]
    tokens: list[int] = []
    vectors = np.empty((len(texts), model.dim), dtype=np.float32)
    for part in _slices(len(texts), cache.settings.model_batch):
        vectors[part], counted = model.embed_counted(texts[part])
        tokens += counted
    out: list[np.ndarray] = []
    weights: list[float] = []
    start = 0
    for p in payloads:
        end = start + len(p.texts)
        out.append(vectors[start:end])
        weights.append(float(sum(tokens[start:end])))
        start = end
    ctx.share.weights = weights  # the call's CPU is shared by tokens
    return out


# --- score -----------------------------------------------------------------------------------


class ScorePayload(BaseModel):
    """Feature rows to score with a small model, escalating unsure rows to a large one."""

    model_config = ConfigDict(extra="forbid")

    rows: list[list[Float32]] = Field(min_length=1, max_length=1_000_000)
    model: ModelName = DEFAULT_SCORING_MODEL
    threshold: float = Field(default=0.8, ge=0.0, le=1.0,
                             description="rows the small model scores below this escalate")

    @model_validator(mode="after")
    def _rectangular(self) -> ScorePayload:
        width = len(self.rows[0])
        if width == 0 or any(len(row) != width for row in self.rows):
            raise ValueError("rows must be non-empty and all of the same length")
        return self


def _threshold_key(threshold: float) -> str:
    """A threshold in a batch key: short where that is exact ("0.8"), else every digit, so
    that two thresholds never share a batch (the batch runs with its first job's)."""
    short = f"{threshold:g}"
    return short if float(short) == threshold else repr(threshold)


@kind(
    "score", schema=ScorePayload, tier="nearline",
    batch=BatchPolicy(key=lambda p: f"{p.model}@{_threshold_key(p.threshold)}",
                      bulk_field="rows", chunk_size=4096),
    setup=setup_models, model_of=lambda p: (SCORING, p.model),
)
def score(payloads: list[ScorePayload], ctx: JobContext) -> list[Any]:
    """Score every row; each result row says which model answered and whether it escalated."""
    cache: ModelCache = ctx.resources
    scorer = cache.scorer(payloads[0].model, payloads[0].threshold)
    rows = np.asarray([row for p in payloads for row in p.rows], dtype=np.float32)
    answers = []
    for part in _slices(len(rows), max(cache.settings.model_batch, 256)):
        answers.extend(scorer.score(rows[part]).results())
    out: list[Any] = []
    start = 0
    for p in payloads:
        mine = answers[start:start + len(p.rows)]
        bad = [i for i, a in enumerate(mine) if not math.isfinite(a["score"])]
        # Finite features can still overflow the model (float32): that job fails, alone.
        out.append(PermanentError(
            f"rows {bad[:5]} gave a score that is not a finite number (features too large "
            "for the model?)") if bad else mine)
        start += len(p.rows)
    ctx.share.weights = [float(len(p.rows)) for p in payloads]
    return out
