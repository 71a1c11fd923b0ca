"""Retrieval from the caller's side: submit ``index``, ``search`` and ``evaluate`` with their
inputs checked at the edge, and turn an evaluation's per-item rows into a stored report.

The kinds themselves run in workers (``workers.kinds.retrieval``); what is here needs the
database and the shared state dir, which a payload schema cannot see: that a source is a
finished ``embed`` job, that an index exists, that a query vector has the index's width. Each
check raises a ``RetrievalError`` before anything is stored. The same checks run again in the
worker, so a job submitted with plain ``Client.submit`` fails permanently instead.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from orchestrator.db.models import JobState
from orchestrator.db.store import JobStore, JobView
from orchestrator.errors import DimensionMismatch, InvalidOption, InvalidSource
from orchestrator.results import decode_result
from orchestrator.tiers import Tier
from orchestrator.vector_index import VectorIndex, index_root
from orchestrator.windows import KIND_DEFAULT, _KindDefault

if TYPE_CHECKING:
    from orchestrator.client import Client, JobHandle

DEFAULT_KS = (1, 5, 10)


# --- index sources ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Unit:
    """One embed job, or one chunk of a bulk embed job: the vectors an index adds in one go.

    ``offset`` is the position of its first vector in the stream of ``parent`` (0 for a plain
    job); default vector ids are ``<parent or job id>:<position>``, the same whether the
    caller named the bulk job or one of its chunks.
    """

    job: JobView
    parent: str | None
    offset: int
    ids: list[str] | None
    metadata: list[dict[str, Any]] | None

    @property
    def model(self) -> str:
        return str(self.job.payload.get("model", ""))

    @property
    def texts(self) -> list[str]:
        return list(self.job.payload.get("texts", []))

    def item(self) -> dict[str, Any]:
        """This unit as one item of an ``index`` job's ``sources``."""
        out: dict[str, Any] = {"job": self.job.id}
        if self.ids is not None:
            out["ids"] = self.ids
        if self.metadata is not None:
            out["metadata"] = self.metadata
        return out

    def rows(self) -> list[dict[str, Any]]:
        base = self.parent or self.job.id
        texts = self.texts
        ids = self.ids or [f"{base}:{self.offset + i}" for i in range(len(texts))]
        meta = self.metadata or [{} for _ in texts]
        return [{"id": ids[i], "text": texts[i], "source": self.job.id, "item": i,
                 "meta": meta[i]} for i in range(len(texts))]

    def vectors(self) -> np.ndarray:
        """The unit's embeddings, read from its result (inline or the chunk's file).

        Raises:
            InvalidSource: the result is missing or does not hold one vector per text.
        """
        if self.job.result_ref:
            try:
                vectors = np.load(self.job.result_ref, allow_pickle=False)
            except OSError as e:
                raise InvalidSource(self.job.id, f"its result file cannot be read: {e}") from e
        else:
            vectors = decode_result(self.job.result)
        if not isinstance(vectors, np.ndarray) or vectors.ndim != 2 or \
                len(vectors) != len(self.texts):
            raise InvalidSource(self.job.id, "its result does not hold one vector per text")
        return vectors.astype(np.float32, copy=False)


def _checked_embed(job: JobView | None, job_id: str) -> JobView:
    if job is None:
        raise InvalidSource(job_id, "no such job")
    if job.kind != "embed":
        raise InvalidSource(job_id, f"is a {job.kind!r} job; only embed jobs hold vectors")
    if job.state != JobState.SUCCEEDED:
        raise InvalidSource(job_id, f"is {job.state}; index it once it has succeeded")
    return job


def _sliced(values: list[Any] | None, start: int, n: int) -> list[Any] | None:
    return None if values is None else values[start:start + n]


def resolve_source(store: JobStore, job_id: str, ids: list[str] | None = None,
                   metadata: list[dict[str, Any]] | None = None) -> list[Unit]:
    """The units (jobs or chunks holding vectors) of one source, in stream order.

    ``ids`` and ``metadata``, when given, hold one entry per vector of the whole source.

    Raises:
        InvalidSource: the job is unknown, not ``embed``, not succeeded, has no vectors, or
            ``ids``/``metadata`` do not have one entry per vector.
    """
    job = _checked_embed(store.get(job_id), job_id)
    if job.parent_id is None and "bulk" in job.payload:  # a bulk embed job: its chunks
        size = int(job.payload["bulk"]["chunk_size"])
        chunks = store.chunks(job.id)
        units = [Unit(_checked_embed(c, c.id), job.id, (c.chunk_index or 0) * size, None, None)
                 for c in chunks]
    elif job.parent_id is not None:  # one chunk of a bulk embed job
        parent = store.get(job.parent_id)
        size = int(parent.payload["bulk"]["chunk_size"]) if parent else 0
        units = [Unit(job, job.parent_id, (job.chunk_index or 0) * size, None, None)]
    else:
        units = [Unit(job, None, 0, None, None)]
    total = sum(len(u.texts) for u in units)
    if total == 0:
        raise InvalidSource(job_id, "has no vectors")
    for name, values in (("ids", ids), ("metadata", metadata)):
        if values is not None and len(values) != total:
            raise InvalidSource(job_id, f"{name} has {len(values)} entries for {total} vectors")
    models = {u.model for u in units}
    if len(models) != 1:
        raise InvalidSource(job_id, f"its chunks were embedded with several models: {models}")
    out, start = [], 0
    for u in units:
        n = len(u.texts)
        out.append(Unit(u.job, u.parent, u.offset, _sliced(ids, start, n),
                        _sliced(metadata, start, n)))
        start += n
    return out


def _source_fields(source: str | dict[str, Any]) -> tuple[str, Any, Any]:
    if isinstance(source, str):
        return source, None, None
    if not isinstance(source, dict) or not isinstance(source.get("job"), str):
        raise InvalidSource(str(source)[:80], 'a source is a job id or {"job": id, ...}')
    unknown = set(source) - {"job", "ids", "metadata"}
    if unknown:
        raise InvalidSource(source["job"], f"unknown fields {sorted(unknown)}")
    return source["job"], source.get("ids"), source.get("metadata")


def submit_index(client: Client, index: str, sources: Sequence[str | dict[str, Any]], *,
                 tenant: str = "default", idempotency_key: str | None = None,
                 chunk_size: int | None = None, tier: Tier | str = Tier.OFFLINE,
                 window: str | _KindDefault | None = KIND_DEFAULT) -> JobHandle:
    """Build or extend ``index`` from finished embed jobs, as a chunked, preemptible job.

    Like every ``index`` job it waits for the kind's off-peak window (``offpeak``) unless
    ``window`` names another, or None to run now.

    A source is an embed job id (a plain job, a bulk job, or one chunk of a bulk job) or
    ``{"job": id, "ids": [...], "metadata": [...]}`` with one id / JSON object per vector.
    Bulk embed jobs are expanded into their chunks, so the index job can yield between them.
    Sources already in the index are skipped; the job's result rows (``bulk_results``) say,
    per unit, how many vectors it added.

    Raises:
        InvalidSource: a source is unknown, not a succeeded embed job, empty, mismatched with
            its ids/metadata, or embedded with another model than the index's; or there is
            none.
        UnknownIndex: the name is malformed.
        UnknownKind, InvalidOption, Overloaded, QuotaExceeded, ServiceUnavailable: as for
            ``Client.submit_bulk``.
    """
    if not sources:
        raise InvalidSource("-", "no sources given; name at least one finished embed job")
    existing = VectorIndex(index_root(client.settings.state_dir), index).manifest_or_none()
    model = existing.model if existing else None
    items: list[dict[str, Any]] = []
    for source in sources:
        job_id, ids, metadata = _source_fields(source)
        for unit in resolve_source(client.services.store, job_id, ids, metadata):
            if model is not None and unit.model != model:
                raise InvalidSource(job_id, f"embedded with model {unit.model!r}, but index "
                                    f"{index!r} holds {model!r} vectors")
            model = unit.model
            items.append(unit.item())
    return client.submit_bulk("index", items, params={"index": index}, tier=tier,
                              tenant=tenant, chunk_size=chunk_size,
                              idempotency_key=idempotency_key, window=window)


# --- search ----------------------------------------------------------------------------------


def submit_search(client: Client, index: str, *, queries: Sequence[str] | None = None,
                  vectors: Any = None, k: int = 10, tenant: str = "default",
                  tier: Tier | str | None = None, idempotency_key: str | None = None
                  ) -> JobHandle:
    """Search ``index`` for the ``k`` nearest vectors of each query text or query vector.

    Raises:
        UnknownIndex: no index has that name.
        DimensionMismatch: a query vector is not the index's width.
        InvalidPayload, and the rest as for ``Client.submit``.
    """
    manifest = VectorIndex(index_root(client.settings.state_dir), index).manifest()
    payload: dict[str, Any] = {"index": index, "k": k}
    if queries is not None:
        payload["queries"] = list(queries)
    if vectors is not None:
        matrix = np.asarray(vectors, dtype=np.float32)
        matrix = matrix.reshape(1, -1) if matrix.ndim == 1 else matrix
        if matrix.ndim != 2 or matrix.shape[1] != manifest.dim:
            raise DimensionMismatch(index, manifest.dim, int(matrix.shape[-1]))
        payload["vectors"] = matrix.tolist()
    return client.submit("search", payload, tier=tier, tenant=tenant,
                         idempotency_key=idempotency_key)


# --- evaluate --------------------------------------------------------------------------------


def _items(source: Iterable[dict[str, Any]] | str | Path | None) -> Iterator[dict[str, Any]]:
    """Items given inline, or read one line at a time from a JSON-lines file."""
    if source is None:
        return
    if isinstance(source, str | Path):
        with open(source) as f:
            for line in f:
                if line.strip():
                    yield json.loads(line)
        return
    yield from source


def _dim_checked(items: Iterator[dict[str, Any]], index: str, dim: int | None
                 ) -> Iterator[dict[str, Any]]:
    for item in items:
        vector = item.get("vector") if isinstance(item, dict) else None
        if dim is not None and isinstance(vector, list) and len(vector) != dim:
            raise DimensionMismatch(index, dim, len(vector))
        yield item


def submit_evaluate(client: Client, *, index: str | None = None,
                    queries: Iterable[dict[str, Any]] | str | Path | None = None,
                    rows: Iterable[dict[str, Any]] | str | Path | None = None,
                    ks: Sequence[int] = DEFAULT_KS, score_model: str | None = None,
                    threshold: float | None = None, tenant: str = "default",
                    idempotency_key: str | None = None, chunk_size: int | None = None,
                    tier: Tier | str = Tier.OFFLINE,
                    window: str | _KindDefault | None = KIND_DEFAULT) -> JobHandle:
    """Evaluate retrieval on ``index`` and/or the scoring models, as a chunked offline job.

    It waits for the kind's off-peak window (``offpeak``) unless ``window`` names another, or
    None to run now.

    ``queries``: ``{"query": text | "vector": [..], "relevant": [ids]}`` items; ``rows``:
    ``{"row": [features], "label": int}`` items. Each is a list, any iterable, or the path of a
    JSON-lines file (read a chunk at a time). Read the report with ``evaluation_report``.

    Raises:
        UnknownIndex: ``index`` names no index.
        DimensionMismatch: a query vector is not the index's width (nothing is kept).
        InvalidPayload: an item is malformed (its index in the stream is named).
        and the rest as for ``Client.submit_bulk``.
    """
    dim = None
    if index is not None:
        dim = VectorIndex(index_root(client.settings.state_dir), index).manifest().dim
    params: dict[str, Any] = {"index": index, "ks": list(ks)}
    if score_model is not None:
        params["score_model"] = score_model
    if threshold is not None:
        params["threshold"] = threshold
    items = itertools.chain(_dim_checked(_items(queries), index or "", dim), _items(rows))
    return client.submit_bulk("evaluate", items, params=params, tier=tier, tenant=tenant,
                              chunk_size=chunk_size, idempotency_key=idempotency_key,
                              window=window)


def summarize(rows: Iterable[dict[str, Any]], ks: Sequence[int]) -> dict[str, Any]:
    """Recall@k, MRR and accuracy from ``evaluate``'s per-item rows.

    recall@k is the mean over queries of |relevant ∩ top k| / |relevant|; MRR is the mean of
    1 / rank of the first relevant hit, 0 when none is in the top max(ks) (its cut-off).
    """
    queries = answered = correct = 0
    found = {k: 0.0 for k in ks}
    hits = {k: 0 for k in ks}
    reciprocal = 0.0
    by_model: dict[str, dict[str, int]] = {}
    versions: set[int] = set()
    embed_models: set[str] = set()
    for row in rows:
        if row["type"] == "query":
            queries += 1
            versions.add(int(row["index_version"]))
            embed_models.add(row["model"])
            for k in ks:
                found[k] += row["found"][str(k)] / row["relevant"]
                hits[k] += row["found"][str(k)] > 0
            reciprocal += 1.0 / row["rank"] if row["rank"] else 0.0
        else:
            answered += 1
            correct += bool(row["correct"])
            tally = by_model.setdefault(row["model"], {"rows": 0, "correct": 0})
            tally["rows"] += 1
            tally["correct"] += bool(row["correct"])
    return {
        "queries": queries,
        "recall_at": {str(k): found[k] / queries for k in ks} if queries else {},
        "hit_rate_at": {str(k): hits[k] / queries for k in ks} if queries else {},
        "mrr": reciprocal / queries if queries else None,
        "mrr_cutoff": max(ks) if ks else None,
        "index_versions": sorted(versions),
        "embedding_models": sorted(embed_models),
        "rows": answered,
        "correct": correct,
        "accuracy": correct / answered if answered else None,
        "answered_by": by_model,
    }


def evaluation_report(client: Client, job_id: str, timeout: float | None = None
                      ) -> dict[str, Any]:
    """Wait for an ``evaluate`` job, build its report, store it and return it.

    The report is written atomically to ``<state dir>/results/<job id>/report.json`` (for a
    bulk job, beside its chunks' result files) and is rebuilt from the durable per-item rows
    on every call, so it never disagrees with them.

    Raises:
        InvalidOption: the job is not an ``evaluate`` job.
        JobFailed, JobCancelled, JobTimeout, JobNotFound: as for ``Client.result``.
    """
    job = client.get(job_id)
    if job.kind != "evaluate":
        raise InvalidOption(f"job {job_id} is a {job.kind!r} job, not evaluate")
    if "bulk" in job.payload:
        rows: Iterable[dict[str, Any]] = client.bulk_results(job_id, timeout=timeout)
    else:
        rows = client.result(job_id, timeout=timeout)
    ks = [int(k) for k in job.payload.get("ks", DEFAULT_KS)]
    report = {"job": job_id, "index": job.payload.get("index"),
              "scoring_model": job.payload.get("score_model"), "ks": ks,
              **summarize(rows, ks)}
    folder = client.settings.state_dir / "results" / job_id
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / ".report.json.tmp"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, folder / "report.json")
    return report
