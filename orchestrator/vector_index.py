"""Named vector indexes stored as files under ``<state dir>/indexes/<name>/``.

An index is a list of immutable segments plus a manifest that names them::

    manifest.json          {"name", "dim", "model", "count", "version", "created_at",
                            "updated_at", "segments": [{"file", "count"}],
                            "sources": {<embed job or chunk id>: {"count", "parent"}}}
    seg-000001.npy         float32 [n, dim], the vectors one commit added
    seg-000001.jsonl       one row per vector: {"id", "text", "source", "item", "meta"}
    .lock                  flock held while a commit reads and rewrites the manifest

A commit writes its segment files (temporary name, fsync, rename), then the manifest the same
way; the manifest's rename is the commit point, so a crash leaves either the old index or the
new one, never half of one (a segment file the manifest does not name is ignored, and the next
commit at the same version replaces it). Segments are never rewritten, so appending costs the
new vectors only, and a reader that has cached older segments loads just the new ones.

Sources are embed jobs, or chunks of bulk embed jobs; each is added whole in one commit and
recorded in ``sources``, which is what makes extending idempotent: a source already present is
skipped, so a redelivered or resumed index chunk never adds a vector twice.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from orchestrator.errors import DimensionMismatch, InvalidSource, UnknownIndex

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"
MANIFEST = "manifest.json"


def index_root(state_dir: Path) -> Path:
    return state_dir / "indexes"


@dataclass(frozen=True)
class Manifest:
    """What an index holds; read from ``manifest.json``."""

    name: str
    dim: int
    model: str
    count: int
    version: int
    created_at: str
    updated_at: str
    segments: list[dict[str, Any]] = field(default_factory=list)
    sources: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dim": self.dim, "model": self.model, "count": self.count,
                "version": self.version, "created_at": self.created_at,
                "updated_at": self.updated_at, "segments": self.segments,
                "sources": self.sources}


@dataclass(frozen=True)
class SourceVectors:
    """The vectors of one source (an embed job or chunk) with one metadata row per vector."""

    source: str
    parent: str | None
    model: str
    vectors: np.ndarray
    rows: list[dict[str, Any]]


@dataclass(frozen=True)
class CommitResult:
    """The index version after the commit; vectors added per source; sources skipped."""

    version: int
    added: dict[str, int]
    present: list[str]


def _atomic_write(path: Path, write: Any, mode: str = "wb") -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, mode) as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class VectorIndex:
    """One named index on disk. Cheap to construct; nothing is read until asked."""

    def __init__(self, root: Path, name: str) -> None:
        if not re.match(NAME_PATTERN, name):
            raise UnknownIndex(name, "an index name is letters, digits, '_', '.' or '-'")
        self.name = name
        self.folder = root / name

    @property
    def manifest_path(self) -> Path:
        return self.folder / MANIFEST

    def exists(self) -> bool:
        return self.manifest_path.exists()

    def manifest(self) -> Manifest:
        """Raises: UnknownIndex when nothing has been committed under this name."""
        try:
            with open(self.manifest_path) as f:
                data = json.load(f)
        except FileNotFoundError:
            raise UnknownIndex(self.name, "no index has been built under this name") from None
        return Manifest(**data)

    def manifest_or_none(self) -> Manifest | None:
        try:
            return self.manifest()
        except UnknownIndex:
            return None

    def stamp(self) -> tuple[int, int, int] | None:
        """A cheap change detector: the manifest's inode, mtime and size (None: no index)."""
        try:
            st = os.stat(self.manifest_path)
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def read_segment(self, segment: dict[str, Any]) -> tuple[np.ndarray, list[dict[str, Any]]]:
        vectors = np.load(self.folder / f"{segment['file']}.npy", allow_pickle=False)
        with open(self.folder / f"{segment['file']}.jsonl") as f:
            rows = [json.loads(line) for line in f]
        return vectors, rows

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / ".lock", "a") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    def commit(self, batch: Sequence[SourceVectors]) -> CommitResult:
        """Add the sources not yet in the index as one new segment, atomically.

        A source already recorded is skipped whole (``present``): that is what makes a
        redelivered or resumed index job add nothing twice.

        Raises:
            DimensionMismatch: a source's vectors do not have the index's dimension.
            InvalidSource: a source was embedded with another model than the index's.
        """
        with self._locked():
            old = self.manifest_or_none()
            dim = old.dim if old else None
            model = old.model if old else None
            sources = dict(old.sources) if old else {}
            vectors: list[np.ndarray] = []
            rows: list[dict[str, Any]] = []
            added: dict[str, int] = {}
            present: list[str] = []
            for src in batch:
                if src.source in sources or src.source in added:
                    present.append(src.source)
                    continue
                if model is not None and src.model != model:
                    raise InvalidSource(src.source, f"embedded with model {src.model!r}, but "
                                        f"index {self.name!r} holds {model!r} vectors")
                if dim is not None and src.vectors.shape[1] != dim:
                    raise DimensionMismatch(self.name, dim, int(src.vectors.shape[1]))
                model, dim = src.model, int(src.vectors.shape[1])
                vectors.append(np.asarray(src.vectors, dtype=np.float32))
                rows.extend(src.rows)
                added[src.source] = len(src.rows)
                sources[src.source] = {"count": len(src.rows), "parent": src.parent}
            if not added:
                return CommitResult(old.version if old else 0, added, present)
            assert dim is not None and model is not None
            version = (old.version if old else 0) + 1
            file = f"seg-{version:06d}"
            matrix = np.concatenate(vectors)
            _atomic_write(self.folder / f"{file}.npy",
                          lambda f: np.save(f, matrix, allow_pickle=False))
            _atomic_write(self.folder / f"{file}.jsonl",
                          lambda f: f.writelines(json.dumps(row) + "\n" for row in rows), "w")
            now = datetime.now(UTC).isoformat()
            manifest = Manifest(
                name=self.name, dim=dim, model=model, count=(old.count if old else 0) + len(rows),
                version=version, created_at=old.created_at if old else now, updated_at=now,
                segments=[*(old.segments if old else []), {"file": file, "count": len(rows)}],
                sources=sources)
            _atomic_write(self.manifest_path, lambda f: json.dump(manifest.to_json(), f), "w")
            _fsync_dir(self.folder)
            return CommitResult(version, added, present)


@dataclass
class LoadedIndex:
    """An index in memory: every segment's vectors as one matrix, and their rows."""

    manifest: Manifest
    stamp: tuple[int, int, int] | None
    matrix: np.ndarray
    rows: list[dict[str, Any]]
    segments: dict[str, tuple[np.ndarray, list[dict[str, Any]]]]

    def top_k(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact inner-product search: (positions, scores), each [n_queries, min(k, count)].

        Ties are broken by position (the earlier vector first), so results are deterministic.

        Raises:
            DimensionMismatch: the queries' width is not the index's dimension.
        """
        if queries.shape[1] != self.manifest.dim:
            raise DimensionMismatch(self.manifest.name, self.manifest.dim, int(queries.shape[1]))
        k = min(k, len(self.matrix))
        scores = queries.astype(np.float32, copy=False) @ self.matrix.T
        # A NaN score ranks last (as -inf); infinities stay what they are.
        scores = np.nan_to_num(scores, nan=-np.inf, posinf=np.inf, neginf=-np.inf)
        if k == len(self.matrix):
            part = np.tile(np.arange(len(self.matrix)), (len(queries), 1))
            picked = scores
            order = np.lexsort((part, -picked), axis=1)
            return (np.take_along_axis(part, order, axis=1),
                    np.take_along_axis(picked, order, axis=1))
        # Every vector scoring at least the k-th best is a candidate, so that ties at the
        # boundary go to the earlier vectors (argpartition alone picks among them at random,
        # and a query's hits then depended on the other queries of its batch).
        kth = -np.partition(-scores, k - 1, axis=1)[:, k - 1]
        positions = np.empty((len(queries), k), dtype=np.int64)
        values = np.empty((len(queries), k), dtype=scores.dtype)
        for i, (row, least) in enumerate(zip(scores, kth, strict=True)):
            above = np.flatnonzero(row > least)
            ties = np.flatnonzero(row == least)[:k - len(above)]  # the earliest of the ties
            candidates = np.concatenate([above, ties])
            best = np.lexsort((candidates, -row[candidates]))
            positions[i], values[i] = candidates[best], row[candidates[best]]
        return positions, values


class IndexCache:
    """Loaded indexes of one worker process, reloaded when their manifest changes.

    Checking costs one ``stat`` per use; a changed manifest loads only the segments this
    process has not read yet (segments are immutable).
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self._loaded: dict[str, LoadedIndex] = {}
        self.loads = 0

    def get(self, name: str) -> LoadedIndex:
        """Raises: UnknownIndex."""
        index = VectorIndex(self.root, name)
        stamp = index.stamp()
        cached = self._loaded.get(name)
        if cached is not None and stamp is not None and cached.stamp == stamp:
            return cached
        manifest = index.manifest()
        if cached is not None and cached.manifest.version == manifest.version:
            cached.stamp = stamp
            return cached
        old = cached.segments if cached is not None else {}
        segments = {s["file"]: old.get(s["file"]) or index.read_segment(s)
                    for s in manifest.segments}
        matrices = [segments[s["file"]][0] for s in manifest.segments]
        matrix = np.concatenate(matrices) if matrices else \
            np.zeros((0, manifest.dim), dtype=np.float32)
        rows = [row for s in manifest.segments for row in segments[s["file"]][1]]
        loaded = LoadedIndex(manifest, stamp, np.ascontiguousarray(matrix, dtype=np.float32),
                             rows, segments)
        self._loaded[name] = loaded
        self.loads += 1
        return loaded
