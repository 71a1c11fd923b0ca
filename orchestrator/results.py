"""The result store: bulk chunk results as files under the state dir, written atomically."""

from __future__ import annotations

import base64
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np


class ResultStore:
    """Files under ``root/<parent job>/``; one per chunk, named by the chunk job's id.

    A chunk's file is written to a temporary name and renamed into place, so a redelivered
    chunk replaces its own file whole instead of appending twice, and a reader never sees half
    a file.
    """

    def __init__(self, root: Path) -> None:
        self.root = root

    def write_chunk(self, parent_id: str, chunk_id: str, result: Any) -> str:
        """Write a finished chunk's results (replacing any earlier write); return the path."""
        return self._write(self.root / parent_id, chunk_id, result)

    def write_part(self, parent_id: str, chunk_id: str, start: int, result: Any) -> str:
        """Checkpoint the results of items ``start..`` of a chunk that is being preempted."""
        return self._write(self.root / parent_id, f"{chunk_id}.part-{start:09d}", result)

    def assemble(self, parent_id: str, chunk_id: str, start: int, tail: Any) -> Any:
        """The chunk's whole result: the checkpointed parts before ``start``, then ``tail``.

        Parts are deleted once the whole is written by ``write_chunk``; see ``drop_parts``.
        """
        folder = self.root / parent_id
        parts = sorted(folder.glob(f"{chunk_id}.part-*")) if start else []
        pieces = [read_chunk(str(p)) for p in parts
                  if int(p.name.split(".part-")[1].split(".")[0]) < start]
        pieces.append(tail)
        if hasattr(tail, "dtype"):
            return np.concatenate([np.asarray(p) for p in pieces])
        return [row for piece in pieces for row in piece]

    def covers(self, parent_id: str, chunk_id: str, start: int) -> bool:
        """True when checkpoint parts hold exactly the results of items ``0..start``."""
        if start == 0:
            return True
        rows = 0
        for part in sorted((self.root / parent_id).glob(f"{chunk_id}.part-*")):
            offset = int(part.name.split(".part-")[1].split(".")[0])
            if offset >= start:
                break  # written by a run whose checkpoint was never recorded: not ours
            if offset != rows:
                return False
            rows += len(read_chunk(str(part)))
        return rows == start

    def drop_parts(self, parent_id: str, chunk_id: str) -> None:
        for part in (self.root / parent_id).glob(f"{chunk_id}.part-*"):
            part.unlink(missing_ok=True)

    @staticmethod
    def _write(folder: Path, name: str, result: Any) -> str:
        folder.mkdir(parents=True, exist_ok=True)
        array = hasattr(result, "dtype")
        path = folder / f"{name}.{'npy' if array else 'jsonl'}"
        # Each writer its own temporary file: two attempts of one chunk (a lease taken over
        # from a worker that was only slow) must not write into one file.
        tmp = folder / f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
        try:
            with open(tmp, "wb" if array else "w") as f:
                if array:
                    np.save(f, np.asarray(result), allow_pickle=False)
                else:
                    for row in result:
                        f.write(json.dumps(row, allow_nan=False) + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return str(path)


ARRAY_KEY = "__ndarray__"


def encode_array(array: Any) -> dict[str, Any]:
    """An array as JSON: its dtype, shape and little-endian bytes in base64.

    A batch of embeddings as JSON numbers costs about a microsecond a float to write and read;
    as bytes it costs almost nothing, and float32 values come back exactly.
    """
    a = np.asarray(array)
    shape = list(a.shape)  # (ascontiguousarray turns a 0-d array or a scalar into shape (1,))
    a = np.ascontiguousarray(a)
    a = a.astype(a.dtype.newbyteorder("<"), copy=False)
    return {ARRAY_KEY: {"dtype": a.dtype.str, "shape": shape,
                        "data": base64.b64encode(a.tobytes()).decode("ascii")}}


def decode_result(value: Any) -> Any:
    """A stored result as the caller wants it: arrays decoded, anything else unchanged."""
    if isinstance(value, dict) and set(value) == {ARRAY_KEY}:
        spec = value[ARRAY_KEY]
        raw = base64.b64decode(spec["data"])
        return np.frombuffer(raw, dtype=np.dtype(spec["dtype"])).reshape(spec["shape"]).copy()
    return value


def read_chunk(path: str) -> Any:
    """A chunk's results: an array for ``.npy``, a list of rows for ``.jsonl``."""
    if path.endswith(".npy"):
        return np.load(path, allow_pickle=False)
    with open(path) as f:
        return [json.loads(line) for line in f]


def iter_rows(paths: list[str]) -> Iterator[Any]:
    for path in paths:
        yield from read_chunk(path)
