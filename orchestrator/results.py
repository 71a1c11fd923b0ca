"""The result store: bulk chunk results as files under the state dir, written atomically."""

from __future__ import annotations

import json
import os
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
        folder = self.root / parent_id
        folder.mkdir(parents=True, exist_ok=True)
        if hasattr(result, "dtype"):
            path = folder / f"{chunk_id}.npy"
            tmp = folder / f".{chunk_id}.npy.tmp"
            with open(tmp, "wb") as f:
                np.save(f, np.asarray(result), allow_pickle=False)
                f.flush()
                os.fsync(f.fileno())
        else:
            path = folder / f"{chunk_id}.jsonl"
            tmp = folder / f".{chunk_id}.jsonl.tmp"
            with open(tmp, "w") as f:
                for row in result:
                    f.write(json.dumps(row) + "\n")
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
        return str(path)


def read_chunk(path: str) -> Any:
    """A chunk's results: an array for ``.npy``, a list of rows for ``.jsonl``."""
    if path.endswith(".npy"):
        return np.load(path, allow_pickle=False)
    with open(path) as f:
        return [json.loads(line) for line in f]


def iter_rows(paths: list[str]) -> Iterator[Any]:
    for path in paths:
        yield from read_chunk(path)
