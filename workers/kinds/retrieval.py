"""``index``, ``search`` and ``evaluate``: exact vector retrieval over embed results.

- ``index`` (offline, chunked): adds the vectors of finished ``embed`` jobs to a named index
  (``orchestrator.vector_index``). Its bulk field is ``sources``; each mini-batch of sources is
  one atomic commit, and sources already in the index are skipped, so a preempted, resumed or
  redelivered chunk adds every vector exactly once.
- ``search`` (interactive, micro-batched per index): top-k by inner product (cosine for the
  unit-length vectors ``embed`` writes) for query texts, embedded with the index's model, or
  query vectors. Each worker process keeps loaded indexes and reloads on a new version.
- ``evaluate`` (offline, chunked): per item, where a labelled query's relevant ids rank, or
  whether the scoring models label a row right; ``orchestrator.retrieval.evaluation_report``
  turns the rows into recall@k, MRR and accuracy.

Submit through ``orchestrator.retrieval`` (``submit_index``, ``submit_search``,
``submit_evaluate``) to have sources, index names and vector widths checked at the edge.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from orchestrator.db.engine import make_engine
from orchestrator.db.store import JobStore
from orchestrator.errors import DimensionMismatch, PermanentError, RetrievalError
from orchestrator.kinds import BatchPolicy, JobContext, kind
from orchestrator.retrieval import DEFAULT_KS, resolve_source
from orchestrator.settings import Settings
from orchestrator.vector_index import (
    NAME_PATTERN,
    IndexCache,
    LoadedIndex,
    SourceVectors,
    VectorIndex,
    index_root,
)
from workers.kinds.inference import Float32, ModelCache, ModelName, Text
from workers.models.scoring import DEFAULT_SCORING_MODEL

IndexName = Annotated[str, StringConstraints(pattern=NAME_PATTERN)]
JobId = Annotated[str, StringConstraints(min_length=1, max_length=64)]
MAX_K = 1000


@dataclass
class RetrievalResources:
    """Per worker process: model sessions, loaded indexes and (for ``index``) the job store."""

    settings: Settings
    models: ModelCache
    indexes: IndexCache
    store: JobStore | None = None


def setup_search(settings: Settings) -> RetrievalResources:
    # Models load on first use: a worker that never searches pays nothing.
    return RetrievalResources(settings, ModelCache(settings),
                              IndexCache(index_root(settings.state_dir)))


def setup_index(settings: Settings) -> RetrievalResources:
    # The engine connects on first use (its pool is per process, like the runtime's).
    store = JobStore(make_engine(settings.resolved_database_url()))
    return RetrievalResources(settings, ModelCache(settings),
                              IndexCache(index_root(settings.state_dir)), store)


def _embed(res: RetrievalResources, model: str, texts: list[str]) -> np.ndarray:
    embedder = res.models.embedder(model)
    out = np.empty((len(texts), embedder.dim), dtype=np.float32)
    step = res.settings.model_batch
    for start in range(0, len(texts), step):
        out[start:start + step] = embedder.embed(texts[start:start + step])
    return out


def _hits(loaded: LoadedIndex, positions: np.ndarray, scores: np.ndarray, k: int
          ) -> list[list[dict[str, Any]]]:
    out = []
    for pos_row, score_row in zip(positions, scores, strict=True):
        out.append([{**{key: loaded.rows[p][key] for key in ("id", "text", "source", "meta")},
                     "score": float(s)} for p, s in zip(pos_row[:k], score_row[:k],
                                                       strict=True)])
    return out


# --- index -----------------------------------------------------------------------------------


class IndexSource(BaseModel):
    """An embed job (plain, bulk, or one chunk of a bulk job) whose vectors to add."""

    model_config = ConfigDict(extra="forbid")

    job: JobId
    ids: list[Annotated[str, StringConstraints(min_length=1, max_length=512)]] | None = None
    metadata: list[dict[str, Any]] | None = None


class IndexPayload(BaseModel):
    """Add ``sources`` to the index ``index`` (made on first use)."""

    model_config = ConfigDict(extra="forbid")

    index: IndexName
    sources: list[IndexSource] = Field(min_length=1, max_length=100_000)


def _index_one(res: RetrievalResources, payload: IndexPayload) -> list[dict[str, Any]]:
    assert res.store is not None
    loaded: list[tuple[str, list[SourceVectors]]] = []
    for src in payload.sources:
        units = resolve_source(res.store, src.job, src.ids, src.metadata)
        loaded.append((src.job, [SourceVectors(u.job.id, u.parent, u.model, u.vectors(),
                                               u.rows()) for u in units]))
    index = VectorIndex(index_root(res.settings.state_dir), payload.index)
    commit = index.commit([sv for _, svs in loaded for sv in svs])
    return [{"job": job, "units": len(svs),
             "added": sum(commit.added.get(sv.source, 0) for sv in svs),
             "already_present": sum(sv.source in commit.present for sv in svs),
             "index_version": commit.version} for job, svs in loaded]


@kind(
    "index", schema=IndexPayload, tier="offline", max_attempts=3,
    batch=BatchPolicy(key=lambda p: p.index, bulk_field="sources", chunk_size=256,
                      segment_size=8, chunked=True),
    setup=setup_index, window="offpeak",
)
def index(payloads: list[IndexPayload], ctx: JobContext) -> list[Any]:
    """Add finished embed jobs' vectors to a named index; one result row per source."""
    res: RetrievalResources = ctx.resources
    out: list[Any] = []
    for payload in payloads:
        try:
            out.append(_index_one(res, payload))
        except RetrievalError as e:  # this job's input is wrong: fail it alone
            out.append(e)
    ctx.share.weights = [float(len(p.sources)) for p in payloads]
    return out


# --- search ----------------------------------------------------------------------------------


class SearchPayload(BaseModel):
    """Query texts or query vectors; the result is the top ``k`` hits of each."""

    model_config = ConfigDict(extra="forbid")

    index: IndexName
    queries: list[Text] | None = Field(default=None, min_length=1, max_length=1000)
    vectors: list[list[Float32]] | None = Field(default=None, min_length=1, max_length=1000)
    k: int = Field(default=10, ge=1, le=MAX_K)

    @model_validator(mode="after")
    def _one_kind_of_query(self) -> SearchPayload:
        if (self.queries is None) == (self.vectors is None):
            raise ValueError("give either queries (texts) or vectors, not both or neither")
        if self.vectors is not None and len({len(v) for v in self.vectors}) != 1:
            raise ValueError("vectors must all have the same length")
        return self


@kind("search", schema=SearchPayload, tier="interactive",
      batch=BatchPolicy(key=lambda p: p.index), setup=setup_search)
def search(payloads: list[SearchPayload], ctx: JobContext) -> list[Any]:
    """Exact top-k over one index for every query of every job, in one matrix product."""
    res: RetrievalResources = ctx.resources
    loaded = res.indexes.get(payloads[0].index)
    dim = loaded.manifest.dim
    texts = [q for p in payloads if p.queries for q in p.queries]
    embedded = _embed(res, loaded.manifest.model, texts) if texts else None
    blocks: list[np.ndarray | BaseException] = []
    used = 0
    for p in payloads:
        if p.queries is not None:
            assert embedded is not None
            blocks.append(embedded[used:used + len(p.queries)])
            used += len(p.queries)
        elif len(p.vectors[0]) != dim:  # type: ignore[index]
            blocks.append(DimensionMismatch(loaded.manifest.name, dim, len(p.vectors[0])))  # type: ignore[index]
        else:
            blocks.append(np.asarray(p.vectors, dtype=np.float32))
    good = [b for b in blocks if isinstance(b, np.ndarray)]
    k = max(p.k for p in payloads)
    positions, scores = loaded.top_k(np.concatenate(good), k) if good else (None, None)
    out: list[Any] = []
    row = 0
    for p, block in zip(payloads, blocks, strict=True):
        if isinstance(block, BaseException):
            out.append(block)
            continue
        assert positions is not None and scores is not None
        n = len(block)
        out.append({"index": loaded.manifest.name, "version": loaded.manifest.version,
                    "model": loaded.manifest.model,
                    "hits": _hits(loaded, positions[row:row + n], scores[row:row + n], p.k)})
        row += n
    ctx.share.weights = [float(len(b)) if isinstance(b, np.ndarray) else 0.0 for b in blocks]
    return out


# --- evaluate --------------------------------------------------------------------------------


class EvalItem(BaseModel):
    """A labelled query (``query`` or ``vector`` with ``relevant`` ids) or a labelled row."""

    model_config = ConfigDict(extra="forbid")

    query: Text | None = None
    vector: list[Float32] | None = Field(default=None, min_length=1)
    relevant: list[str] | None = Field(default=None, min_length=1)
    row: list[Float32] | None = Field(default=None, min_length=1)
    label: int | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _one_case(self) -> EvalItem:
        is_query = self.query is not None or self.vector is not None
        is_row = self.row is not None or self.label is not None
        if is_query == is_row:
            raise ValueError("an item is either a query (query or vector, with relevant) "
                             "or a row (row with label)")
        if is_query and (self.relevant is None or (self.query is None) == (self.vector is None)):
            raise ValueError("a query item needs exactly one of query/vector, and relevant")
        if is_row and (self.row is None or self.label is None):
            raise ValueError("a row item needs both row and label")
        return self


class EvaluatePayload(BaseModel):
    """Labelled queries against ``index`` and labelled rows for the scoring models."""

    model_config = ConfigDict(extra="forbid")

    items: list[EvalItem] = Field(min_length=1, max_length=100_000)
    index: IndexName | None = None
    ks: list[Annotated[int, Field(ge=1, le=MAX_K)]] = Field(
        default=list(DEFAULT_KS), min_length=1, max_length=20)
    score_model: ModelName = DEFAULT_SCORING_MODEL
    threshold: float = Field(default=0.8, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _consistent(self) -> EvaluatePayload:
        if self.index is None and any(i.row is None for i in self.items):
            raise ValueError("query items need an index")
        widths = {len(i.row) for i in self.items if i.row is not None}
        if len(widths) > 1:
            raise ValueError("rows must all have the same length")
        if len({len(i.vector) for i in self.items if i.vector is not None}) > 1:
            raise ValueError("query vectors must all have the same length")
        self.ks = sorted(set(self.ks))
        return self


def _query_rows(res: RetrievalResources, p: EvaluatePayload, items: list[EvalItem]
                ) -> list[dict[str, Any]]:
    assert p.index is not None
    loaded = res.indexes.get(p.index)
    texts = [i.query for i in items if i.query is not None]
    embedded = iter(_embed(res, loaded.manifest.model, texts) if texts else [])
    matrix = np.stack([next(embedded) if i.query is not None
                       else np.asarray(i.vector, dtype=np.float32) for i in items])
    positions, _ = loaded.top_k(matrix, max(p.ks))
    out = []
    for item, pos_row in zip(items, positions, strict=True):
        relevant = set(item.relevant or ())
        ranked = [loaded.rows[q]["id"] for q in pos_row]
        rank = next((r + 1 for r, doc in enumerate(ranked) if doc in relevant), None)
        out.append({"type": "query", "relevant": len(relevant), "rank": rank,
                    "found": {str(k): len(relevant.intersection(ranked[:k])) for k in p.ks},
                    "index_version": loaded.manifest.version, "model": loaded.manifest.model})
    return out


def _score_rows(res: RetrievalResources, p: EvaluatePayload, items: list[EvalItem]
                ) -> list[dict[str, Any]]:
    scorer = res.models.scorer(p.score_model, p.threshold)
    answers = scorer.score(np.asarray([i.row for i in items], dtype=np.float32)).results()
    return [{"type": "row", "label": i.label, "predicted": a["label"],
             "correct": a["label"] == i.label, "model": a["model"], "escalated": a["escalated"]}
            for i, a in zip(items, answers, strict=True)]


def _evaluate_one(res: RetrievalResources, p: EvaluatePayload) -> list[dict[str, Any]]:
    queries = [(n, i) for n, i in enumerate(p.items) if i.row is None]
    rows = [(n, i) for n, i in enumerate(p.items) if i.row is not None]
    out: list[dict[str, Any] | None] = [None] * len(p.items)
    if queries:
        for (n, _), r in zip(queries, _query_rows(res, p, [i for _, i in queries]), strict=True):
            out[n] = r
    if rows:
        for (n, _), r in zip(rows, _score_rows(res, p, [i for _, i in rows]), strict=True):
            out[n] = r
    return [r for r in out if r is not None]


@kind(
    "evaluate", schema=EvaluatePayload, tier="offline", max_attempts=3,
    batch=BatchPolicy(key=lambda p: f"{p.index}|{p.score_model}@{p.threshold:g}",
                      bulk_field="items", chunk_size=1024, segment_size=64, chunked=True),
    setup=setup_search, window="offpeak",
)
def evaluate(payloads: list[EvaluatePayload], ctx: JobContext) -> list[Any]:
    """One result row per item: the rank of a query's relevant ids, or a row's correctness."""
    res: RetrievalResources = ctx.resources
    out: list[Any] = []
    for payload in payloads:
        try:
            out.append(_evaluate_one(res, payload))
        except (RetrievalError, PermanentError) as e:
            out.append(e)
    ctx.share.weights = [float(len(p.items)) for p in payloads]
    return out
